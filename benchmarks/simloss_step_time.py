"""Train-step time and peak memory of SimLoss vs sparse categorical cross entropy.

The same model (inputs -> Dense(hidden, relu) -> Dense(C) logits) is trained
with `SparseCategoricalCrossentropy(from_logits=True)` and with `SimLoss`
over several kinds of class similarity, XLA on (`jit_compile=True`). Step
times are measured side by side in one process: the variants take turns,
round after round, and each reports the median over rounds of its mean step
time, so machine noise hits all of them alike. Memory is measured in one
child process per variant, as peak resident set size read from /proc (Linux
only): "peak" over the whole run (XLA compilation included) and "steady"
over the training steps after compilation (the peak is reset in between),
each also as the difference ("extra") to the cross-entropy child, next to the
similarity's own storage (what its config holds).

Issue 2 setting (the default):

    python benchmarks/simloss_step_time.py

Issue 5 setting (large label spaces, sparse top-k and on-the-fly embeddings):

    python benchmarks/simloss_step_time.py --classes 1000 10000 100000 \\
        --similarities sparse embeddings --hidden 256 --embedding-dim 300

Any Keras backend (issue 8), e.g. `KERAS_BACKEND=jax python
benchmarks/simloss_step_time.py`. `ops_cross_entropy` (variant `ops_ce`) is
cross entropy written with `keras.ops`, a reference for what the formula
costs without TensorFlow's fused SCCE kernel. Large label spaces with
neighbour search, saving and a million classes: `large_labels.py`.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_simloss import SimLoss, similarity  # noqa: E402

SIMILARITIES = (
    "ordinal", "matrix", "hierarchy", "embeddings", "embeddings_keep", "sparse", "ops_ce",
)  # fmt: skip


def make_similarity(kind, num_classes, args):
    """The similarity of one variant and its storage in bytes."""
    rng = np.random.default_rng(0)
    if kind == "ordinal":
        return similarity.ordinal(num_classes, 0.7), 8
    if kind == "matrix":
        matrix = similarity.MatrixSimilarity(
            np.asarray(similarity.ordinal(num_classes, 0.7))
        )
        return matrix, matrix.matrix.nbytes
    if kind == "hierarchy":
        sim = similarity.from_hierarchy(np.arange(num_classes) // 10, 0.5)
        return sim, sim.ancestors.nbytes
    if kind in ("embeddings", "embeddings_keep"):
        # `embeddings_keep`: the rows kept from the forward pass for the
        # backward one (`keep_rows=True`) instead of computed twice.
        vectors = rng.normal(size=(num_classes, args.embedding_dim)).astype(np.float32)
        sim = similarity.from_embeddings(
            vectors, lower_bound=0.3, keep_rows=kind == "embeddings_keep"
        )
        return sim, vectors.nbytes
    if kind == "sparse":
        # Neighbour lists of the shape a top-k builder makes: k distinct other
        # classes per class with values in (0, 1). Built directly, since an
        # exact top-k over 100,000 classes is a C^2 precomputation of its own
        # and the loss's cost does not depend on which classes are listed.
        k = args.k
        indices = (
            np.arange(num_classes)[:, None] + 7 * np.arange(1, k + 1)[None, :]
        ) % num_classes
        values = rng.uniform(0.1, 0.9, size=(num_classes, k)).astype(np.float32)
        sim = similarity.SparseSimilarity(indices, values)
        return sim, sim.indices.nbytes + sim.values.nbytes
    raise ValueError(f"Unknown similarity {kind!r}; expected one of {SIMILARITIES}")


def ops_cross_entropy(y_true, y_pred):
    """Cross entropy written with `keras.ops`, `logsumexp(z) - z_y`: what
    SimLoss with the identity computes, without TensorFlow's fused kernel
    that Keras's SCCE calls. A reference for the cost of the formula."""
    labels = keras.ops.cast(keras.ops.reshape(y_true, (-1, 1)), "int32")
    picked = keras.ops.take_along_axis(y_pred, labels, axis=-1)
    return keras.ops.logsumexp(y_pred, axis=-1) - keras.ops.squeeze(picked, -1)


def make_loss(variant, num_classes, args):
    if variant == "scce":
        return keras.losses.SparseCategoricalCrossentropy(from_logits=True), 0
    if variant == "ops_ce":
        return ops_cross_entropy, 0
    sim, storage = make_similarity(variant, num_classes, args)
    return SimLoss(sim, from_logits=True), storage


def make_model(num_classes, args):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((args.features,)),
            keras.layers.Dense(args.hidden, activation="relu"),
            keras.layers.Dense(num_classes),
        ]
    )
    return model


def make_batch(num_classes, args):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(args.batch_size, args.features)).astype(np.float32)
    y = rng.integers(0, num_classes, size=args.batch_size).astype(np.int32)
    return x, y


def compiled(variant, num_classes, args):
    loss, storage = make_loss(variant, num_classes, args)
    model = make_model(num_classes, args)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss, jit_compile=True)
    x, y = make_batch(num_classes, args)
    model.train_on_batch(x, y)  # trace and compile
    model.train_on_batch(x, y)
    return model, storage


def time_steps(model, x, y, steps):
    start = time.perf_counter()
    for _ in range(steps):
        loss = model.train_on_batch(x, y)
    float(np.asarray(loss))  # wait for the last step
    return (time.perf_counter() - start) / steps


def peak_resident_bytes():
    """Peak resident set size of this process (VmHWM).

    Read from /proc rather than `getrusage`, whose `ru_maxrss` on Linux
    carries over the parent's peak through fork and exec.
    """
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM not found in /proc/self/status (Linux only)")


def reset_peak():
    """Resets VmHWM to the current RSS (Linux >= 4.0: clear_refs value 5)."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def child(variant, num_classes, args):
    """Peak RSS of one variant, over the whole run and in steady training."""
    model, storage = compiled(variant, num_classes, args)
    x, y = make_batch(num_classes, args)
    time_steps(model, x, y, 2)
    peak_bytes = peak_resident_bytes()  # compiling included
    reset_peak()
    time_steps(model, x, y, args.steps)
    steady_bytes = peak_resident_bytes()  # training steps only
    print(
        json.dumps(
            {"peak_bytes": peak_bytes, "steady_bytes": steady_bytes, "storage": storage}
        )
    )


def peak_memory(variant, num_classes, args):
    command = [
        sys.executable, __file__, "--child", variant, str(num_classes),
        "--hidden", str(args.hidden), "--features", str(args.features),
        "--batch-size", str(args.batch_size), "--embedding-dim", str(args.embedding_dim),
        "--k", str(args.k), "--steps", str(args.steps),
    ]  # fmt: skip
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--classes", type=int, nargs="+", default=[100, 10000])
    parser.add_argument(
        "--similarities", nargs="+", default=["ordinal", "matrix"], choices=SIMILARITIES
    )
    parser.add_argument("--features", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--embedding-dim", type=int, default=300)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20, help="steps per round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument(
        "--max-matrix-classes",
        type=int,
        default=1000,
        help="skip the dense-matrix variant above this C (a 10,000-class matrix is 400 MB)",
    )
    parser.add_argument(
        "--child", nargs=2, metavar=("VARIANT", "CLASSES"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.child:
        child(args.child[0], int(args.child[1]), args)
        return

    print(
        f"keras {keras.__version__}, backend {keras.config.backend()}, batch "
        f"{args.batch_size}, model {args.features} -> {args.hidden} -> C, XLA on, "
        f"{args.rounds} rounds x {args.steps} steps"
    )
    header = f"{'C':>8} {'loss':<22}{'step ms':>9}{'ratio':>8}"
    if not args.no_memory:
        header += f"{'peak MiB':>10}{'extra':>8}{'steady MiB':>12}{'extra':>8}{'storage MiB':>13}"
    print(header)
    for num_classes in args.classes:
        variants = ["scce"] + [
            kind
            for kind in args.similarities
            if not (kind == "matrix" and num_classes > args.max_matrix_classes)
        ]
        models = {
            variant: compiled(variant, num_classes, args)[0] for variant in variants
        }
        x, y = make_batch(num_classes, args)
        times = {variant: [] for variant in variants}
        for round_index in range(args.rounds):
            order = variants if round_index % 2 == 0 else variants[::-1]
            for variant in order:
                times[variant].append(time_steps(models[variant], x, y, args.steps))
        del models
        median = {
            variant: statistics.median(values) for variant, values in times.items()
        }
        memory = (
            {}
            if args.no_memory
            else {
                variant: peak_memory(variant, num_classes, args) for variant in variants
            }
        )
        for variant in variants:
            name = {"scce": "SCCE", "ops_ce": "CE in keras.ops"}.get(
                variant, f"SimLoss ({variant})"
            )
            line = (
                f"{num_classes:>8} {name:<22}{median[variant] * 1e3:>9.2f}"
                f"{median[variant] / median['scce']:>8.3f}"
            )
            if memory:
                mib = {key: value / 2**20 for key, value in memory[variant].items()}
                base = {key: value / 2**20 for key, value in memory["scce"].items()}
                line += (
                    f"{mib['peak_bytes']:>10.0f}{mib['peak_bytes'] - base['peak_bytes']:>8.1f}"
                    f"{mib['steady_bytes']:>12.0f}"
                    f"{mib['steady_bytes'] - base['steady_bytes']:>8.1f}{mib['storage']:>13.2f}"
                )
            print(line, flush=True)


if __name__ == "__main__":
    main()
