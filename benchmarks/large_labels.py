"""SimLoss for very large label spaces: neighbour search, saving, memory, speed.

Prints, side by side in one run (issue 12):

1. `topk`: `similarity.top_k(from_embeddings(vectors), k)` against the bare
   blocked `C x C x d` float32 product it is built on (same blocks, same
   process), with the peak memory NumPy allocated during `top_k`, for
   random vectors and for heavily tied ones (a few one-hot "attribute"
   vectors, each shared by many classes; issue 18) of the same `C` and `d`.
2. `save`: `.keras` save and load time, file size and config size of a
   `features -> C` model compiled with SimLoss (each kind of similarity)
   against the same model with `SparseCategoricalCrossentropy`, and whether
   the reloaded model (`keras.models.load_model(path)`, no custom objects)
   gives the identical loss.
3. `memory`: extra peak and steady resident memory of a training step
   against SCCE at several batch sizes (one child process per variant, as in
   `simloss_step_time.py`).
4. `steps`: train-step time ratios SimLoss / SCCE at several `C`, XLA on.
5. `million`: `SparseSimilarity` from neighbour lists at a million classes
   trains under XLA, saves and loads (against SCCE).

Everything runs on the CPU here and takes a while (about 40 minutes on 2
cores); pick sections with `--sections`. The default setting:

    python benchmarks/large_labels.py

Times on a shared machine are noisy; the side-by-side runs (variants taking
turns, medians) keep the ratios comparable within one run.
"""

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
import tracemalloc
import zipfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import simloss_step_time as step_bench  # noqa: E402

from keras_simloss import SimLoss, similarity  # noqa: E402

SECTIONS = ("topk", "save", "memory", "steps", "million")


def label(variant):
    return {
        "scce": "SCCE",
        "ops_ce": "CE in keras.ops",
        "embeddings_keep": "embeddings, keep_rows",
    }.get(variant, variant)


def random_vectors(num_classes, dim, seed=0):
    return np.random.default_rng(seed).normal(size=(num_classes, dim)).astype("f4")


def neighbour_lists(num_classes, k, seed=0):
    """k distinct other classes per class with values in (0, 1), as `top_k`
    makes them, built directly (the loss's cost does not depend on which
    classes are listed)."""
    rng = np.random.default_rng(seed)
    offsets = np.arange(1, k + 1) * 7
    indices = (np.arange(num_classes)[:, None] + offsets[None, :]) % num_classes
    values = rng.uniform(0.1, 0.9, size=(num_classes, k)).astype(np.float32)
    return similarity.SparseSimilarity(indices, values)


# 1. Neighbour search -------------------------------------------------------


def bare_product(unit, batch_size):
    """The `C x C x d` product in the blocks `top_k` uses, results dropped."""
    num_classes = unit.shape[0]
    for start in range(0, num_classes, batch_size):
        block = unit[start : start + batch_size] @ unit.T
        del block


def tied_vectors(num_classes, dim, attributes, seed=0):
    """One-hot "attribute" vectors: `attributes` distinct ones (at most `dim`),
    each shared by about `C / attributes` classes, so every row has that many
    classes tied at cosine 1 and the rest at 0 (issue 18)."""
    rng = np.random.default_rng(seed)
    return np.eye(dim, dtype="f4")[rng.integers(0, min(attributes, dim), num_classes)]


def timed_top_k(source, k, batch_size):
    """(seconds, peak bytes NumPy allocated) of one `top_k`."""
    tracemalloc.start()
    start = time.perf_counter()
    result = similarity.top_k(source, k, batch_size=batch_size)
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    del result
    gc.collect()
    return seconds, peak


def section_topk(args):
    num_classes, dim, k = args.topk_classes, args.topk_dim, args.k
    vectors = random_vectors(num_classes, dim)
    sources = {
        "random": similarity.from_embeddings(vectors),
        "tied": similarity.from_embeddings(
            tied_vectors(num_classes, dim, args.topk_tied_attributes)
        ),
    }
    # Blocks of about 16M entries, as `top_k` chooses by default; passed to
    # it explicitly so that every side works through the same blocks.
    batch_size = max(1, (1 << 24) // num_classes)
    unit = sources["random"].unit_vectors()
    print(
        f"\n## top_k vs the bare product (C = {num_classes:,}, d = {dim}, "
        f"k = {k}, blocks of {batch_size} rows)"
    )
    times = {"product": [], "random": [], "tied": []}
    peak = {"random": 0, "tied": 0}
    for round_index in range(args.topk_rounds):
        # Sides take turns, in both orders, so that load changes hit all.
        order = ["product", "random", "tied"]
        for side in order if round_index % 2 == 0 else order[::-1]:
            if side == "product":
                start = time.perf_counter()
                bare_product(unit, batch_size)
                times["product"].append(time.perf_counter() - start)
                continue
            seconds, side_peak = timed_top_k(sources[side], k, batch_size)
            times[side].append(seconds)
            peak[side] = max(peak[side], side_peak)
    median = {side: statistics.median(values) for side, values in times.items()}
    product = median["product"]
    print("| what | seconds | ratio to product | peak MiB allocated |")
    print("|---|---|---|---|")
    print(f"| bare C x C x d float32 product | {product:.2f} | 1.00 | - |")
    print(
        f"| `top_k(from_embeddings(random vectors), k={k})` | "
        f"{median['random']:.2f} | {median['random'] / product:.2f} | "
        f"{peak['random'] / 2**20:.0f} |"
    )
    print(
        f"| `top_k(from_embeddings(tied vectors), k={k})`: "
        f"{min(args.topk_tied_attributes, dim)} one-hot attribute vectors | "
        f"{median['tied']:.2f} | {median['tied'] / product:.2f} | "
        f"{peak['tied'] / 2**20:.0f} |"
    )
    print(
        f"(tied / random: {median['tied'] / median['random']:.2f}; table itself: "
        f"{vectors.nbytes / 2**20:.0f} MiB; rounds: "
        f"{ {side: [round(t, 3) for t in values] for side, values in times.items()} })"
    )


# 2. Saving ------------------------------------------------------------------


def make_loss(kind, num_classes, args):
    """(loss, bytes of similarity state saved as binary arrays in the
    `.keras` archive) of one variant; the losses are the step-time
    benchmark's."""
    loss, _ = step_bench.make_loss(kind, num_classes, args)
    if not hasattr(loss, "similarity"):
        return loss, 0  # SCCE
    # What Keras writes into the archive: the loss's own store.
    store = {}
    loss.save_own_variables(store)
    return loss, sum(np.asarray(array).nbytes for array in store.values())


def small_model(num_classes, features):
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((features,)), keras.layers.Dense(num_classes)])


def save_and_load(kind, num_classes, args, directory):
    loss, state = make_loss(kind, num_classes, args)
    model = small_model(num_classes, args.save_features)
    model.compile(optimizer="adam", loss=loss, jit_compile=True)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(args.batch_size, args.save_features)).astype("f4")
    y = rng.integers(0, num_classes, size=args.batch_size).astype("int32")
    model.train_on_batch(x, y)  # optimizer state exists, as after training
    before = float(model.evaluate(x, y, verbose=0))
    path = os.path.join(directory, f"{kind}_{num_classes}.keras")
    start = time.perf_counter()
    model.save(path)
    save_seconds = time.perf_counter() - start
    with zipfile.ZipFile(path) as archive:
        config_bytes = len(archive.read("config.json"))
    weights_bytes = sum(
        int(np.prod(v.shape)) * 4 for v in model.variables + model.optimizer.variables
    )
    del model, loss
    gc.collect()
    start = time.perf_counter()
    loaded = keras.models.load_model(path)
    load_seconds = time.perf_counter() - start
    after = float(loaded.evaluate(x, y, verbose=0))
    size = os.path.getsize(path)
    del loaded
    gc.collect()
    os.remove(path)
    return {
        "save_s": save_seconds,
        "load_s": load_seconds,
        "file": size,
        "config": config_bytes,
        "weights": weights_bytes,
        "state": state,
        "identical": before == after,
        "loss": before,
    }


def print_save_table(num_classes, kinds, args):
    print(
        f"\n## .keras save / load (C = {num_classes:,}, model "
        f"{args.save_features} -> C, Adam state included)"
    )
    print(
        "| loss | save s | load s | file MiB | config KiB | (file - SCCE file) / "
        "similarity state | identical loss after load |"
    )
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as directory:
        base = save_and_load("scce", num_classes, args, directory)
        rows = [("SCCE", base)] + [
            (kind, save_and_load(kind, num_classes, args, directory)) for kind in kinds
        ]
    for name, row in rows:
        overhead = (
            f"{(row['file'] - base['file']) / row['state']:.3f}"
            if row["state"]
            else "-"
        )
        print(
            f"| {name} | {row['save_s']:.2f} | {row['load_s']:.2f} | "
            f"{row['file'] / 2**20:.1f} | {row['config'] / 1024:.1f} | {overhead} | "
            f"{row['identical']} |",
            flush=True,
        )
    print(
        f"(weights + Adam state: {base['weights'] / 2**20:.1f} MiB float32; "
        "similarity state: embeddings table / neighbour lists / matrix)"
    )


def section_save(args):
    print_save_table(
        args.save_classes, ["ordinal", "hierarchy", "embeddings", "sparse"], args
    )
    print_save_table(args.matrix_classes, ["matrix"], args)


# 3. Memory ------------------------------------------------------------------


def step_args(args, batch_size, hidden):
    return argparse.Namespace(
        features=args.features,
        hidden=hidden,
        batch_size=batch_size,
        embedding_dim=args.embedding_dim,
        k=args.k,
        steps=args.memory_steps,
    )


def section_memory(args):
    num_classes = args.memory_classes
    print(
        f"\n## Extra resident memory against SCCE (C = {num_classes:,}, model "
        f"{args.features} -> {args.hidden} -> C, XLA on; one process each)"
    )
    print(
        "| batch | loss | peak MiB | extra peak MiB | steady MiB | extra steady "
        "MiB | similarity storage MiB | one batch x C buffer MiB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for batch_size in args.memory_batches:
        child_args = step_args(args, batch_size, args.hidden)
        results = {
            variant: step_bench.peak_memory(variant, num_classes, child_args)
            for variant in ["scce"] + args.kinds
        }
        base = results["scce"]
        for variant, result in results.items():
            print(
                f"| {batch_size} | {label(variant)} | "
                f"{result['peak_bytes'] / 2**20:.0f} | "
                f"{(result['peak_bytes'] - base['peak_bytes']) / 2**20:.0f} | "
                f"{result['steady_bytes'] / 2**20:.0f} | "
                f"{(result['steady_bytes'] - base['steady_bytes']) / 2**20:.0f} | "
                f"{result['storage'] / 2**20:.1f} | "
                f"{batch_size * num_classes * 4 / 2**20:.0f} |",
                flush=True,
            )


# 4. Step times ----------------------------------------------------------------


def step_ratios(num_classes, kinds, args, batch_size, hidden, rounds, steps):
    child_args = step_args(args, batch_size, hidden)
    variants = ["scce"] + kinds
    models = {
        variant: step_bench.compiled(variant, num_classes, child_args)[0]
        for variant in variants
    }
    x, y = step_bench.make_batch(num_classes, child_args)
    times = {variant: [] for variant in variants}
    for round_index in range(rounds):
        order = variants if round_index % 2 == 0 else variants[::-1]
        for variant in order:
            times[variant].append(step_bench.time_steps(models[variant], x, y, steps))
    del models
    gc.collect()
    median = {variant: statistics.median(values) for variant, values in times.items()}
    for variant in variants:
        print(
            f"| {num_classes:,} | {batch_size} | {args.features} -> {hidden} -> C | "
            f"{label(variant)} | "
            f"{median[variant] * 1e3:.1f} | {median[variant] / median['scce']:.3f} |",
            flush=True,
        )


def section_steps(args):
    print(
        f"\n## Train-step time, SimLoss / SCCE ({keras.config.backend()}, XLA on, "
        f"median of {args.rounds} rounds x {args.steps} steps)"
    )
    print("| C | batch | model | loss | step ms | ratio to SCCE |")
    print("|---|---|---|---|---|---|")
    for num_classes in args.step_classes:
        if num_classes >= 1_000_000:
            step_ratios(
                num_classes, [kind for kind in args.kinds if kind in ("sparse", "ops_ce")],
                args, args.million_batch,
                args.million_hidden, max(3, args.rounds // 2), max(2, args.steps // 2),
            )  # fmt: skip
        else:
            step_ratios(
                num_classes, args.kinds, args, args.batch_size, args.hidden,
                args.rounds, args.steps,
            )  # fmt: skip


# 5. A million classes -------------------------------------------------------


def section_million(args):
    num_classes, features = args.million_classes, args.million_features
    print(
        f"\n## {num_classes:,} classes: SparseSimilarity from neighbour lists "
        f"(k = {args.k}), model {features} -> C, batch {args.million_batch}, XLA on"
    )
    rng = np.random.default_rng(2)
    x = rng.normal(size=(args.million_batch * 4, features)).astype("f4")
    y = rng.integers(0, num_classes, size=len(x)).astype("int32")
    print(
        "| loss | build s | fit s (4 steps, compile included) | step ms | save s | load s | file MiB | identical loss after load |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for kind in ("scce", "sparse"):
        start = time.perf_counter()
        if kind == "scce":
            loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        else:
            loss = SimLoss(neighbour_lists(num_classes, args.k), from_logits=True)
        build = time.perf_counter() - start
        model = small_model(num_classes, features)
        model.compile(optimizer="adam", loss=loss, jit_compile=True)
        start = time.perf_counter()
        model.fit(x, y, batch_size=args.million_batch, epochs=1, verbose=0)
        fit = time.perf_counter() - start
        step = step_bench.time_steps(
            model, x[: args.million_batch], y[: args.million_batch], 3
        )
        before = float(model.evaluate(x, y, batch_size=args.million_batch, verbose=0))
        with tempfile.TemporaryDirectory() as directory:
            path = os.path.join(directory, "model.keras")
            start = time.perf_counter()
            model.save(path)
            save = time.perf_counter() - start
            size = os.path.getsize(path)
            del model, loss
            gc.collect()
            start = time.perf_counter()
            loaded = keras.models.load_model(path)
            load = time.perf_counter() - start
            after = float(
                loaded.evaluate(x, y, batch_size=args.million_batch, verbose=0)
            )
            del loaded
            gc.collect()
        print(
            f"| {'SCCE' if kind == 'scce' else 'SimLoss (sparse)'} | {build:.1f} | "
            f"{fit:.1f} | {step * 1e3:.0f} | {save:.1f} | {load:.1f} | "
            f"{size / 2**20:.0f} | {before == after} |",
            flush=True,
        )


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS
    )
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--embedding-dim", type=int, default=300)
    parser.add_argument(
        "--kinds",
        nargs="+",
        default=["sparse", "embeddings", "embeddings_keep", "ordinal", "ops_ce"],
        help="SimLoss variants of `memory` and `steps` (`embeddings_keep`: "
        "from_embeddings(..., keep_rows=True); `ops_ce`: cross entropy "
        "written with keras.ops, a reference)",
    )
    parser.add_argument("--topk-classes", type=int, default=100_000)
    parser.add_argument("--topk-dim", type=int, default=300)
    parser.add_argument("--topk-rounds", type=int, default=1)
    parser.add_argument(
        "--topk-tied-attributes",
        type=int,
        default=3,
        help="distinct one-hot vectors of the tied `topk` case (at most d)",
    )
    parser.add_argument("--save-classes", type=int, default=100_000)
    parser.add_argument("--save-features", type=int, default=64)
    parser.add_argument("--matrix-classes", type=int, default=4_000)
    parser.add_argument("--features", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--memory-classes", type=int, default=100_000)
    parser.add_argument("--memory-batches", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--memory-steps", type=int, default=3)
    parser.add_argument(
        "--step-classes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000]
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--million-classes", type=int, default=1_000_000)
    parser.add_argument("--million-features", type=int, default=64)
    parser.add_argument("--million-hidden", type=int, default=64)
    parser.add_argument("--million-batch", type=int, default=256)
    args = parser.parse_args(argv)
    print(
        f"keras {keras.__version__}, backend {keras.config.backend()}, "
        f"{os.cpu_count()} CPUs"
    )
    for section in args.sections:
        globals()[f"section_{section}"](args)


if __name__ == "__main__":
    main()
