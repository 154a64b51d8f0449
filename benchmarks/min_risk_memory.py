"""Memory and time of min-risk decoding and of the soft-label loss at many classes.

Compiles, with JAX's XLA, (1) `decode_min_risk` from logits and (2) a loss
with its gradient with respect to the logits, for each structured kind of
similarity, next to sparse categorical cross entropy's forward pass (1) and
forward plus backward (2) on the same `(batch, C)` logits, and prints XLA's
own memory analysis of each compiled program: the temporary buffers it
allocates (`temp`) and the largest live total (`temp + arguments + output`).
One `(batch, C)` float32 buffer is the unit. Times are medians of
`--repeats` runs, taken side by side, as ratios to SCCE's.

    KERAS_BACKEND=jax python benchmarks/min_risk_memory.py
    KERAS_BACKEND=jax python benchmarks/min_risk_memory.py --classes 10000 --time-embeddings

Embeddings read all `C` rows in blocks (`O(batch C^2 d)`): at 100,000 classes
that is minutes on 2 CPU cores, so they are compiled (memory) but timed only
with `--time-embeddings`.
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_simloss as ks  # noqa: E402
from keras_simloss import similarity  # noqa: E402

KINDS = ("ordinal", "hierarchy", "sparse", "embeddings")


def make_similarity(kind, num_classes, args):
    rng = np.random.default_rng(0)
    if kind == "ordinal":
        return similarity.ordinal(num_classes, 0.8)
    if kind == "hierarchy":  # a 3-level tree: groups of 10, 100, 1,000
        codes = np.arange(num_classes)
        return similarity.from_hierarchy(
            [codes // 10, codes // 100, codes // 1000], [0.6, 0.3, 0.1]
        )
    if kind == "sparse":  # neighbour lists (top_k's search is not measured)
        return _sparse(num_classes, args.k, rng)
    return similarity.from_embeddings(rng.normal(size=(num_classes, args.dim)), 0.2)


def _sparse(num_classes, k, rng):
    """`k` neighbours per class at the same random offsets, random values."""
    offsets = rng.choice(np.arange(1, num_classes), size=k, replace=False)
    indices = (np.arange(num_classes)[:, None] + offsets[None, :]) % num_classes
    values = rng.uniform(0.1, 0.9, size=(num_classes, k))
    return similarity.SparseSimilarity(indices, values)


def analyse(function, *shapes):
    compiled = jax.jit(function).lower(*shapes).compile()
    memory = compiled.memory_analysis()
    peak = (
        memory.temp_size_in_bytes
        + memory.argument_size_in_bytes
        + memory.output_size_in_bytes
    )
    return compiled, memory.temp_size_in_bytes, peak


def timed(compiled, inputs, repeats):
    jax.block_until_ready(compiled(*inputs))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*inputs))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--classes", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--k", type=int, default=10, help="neighbours (sparse)")
    parser.add_argument("--dim", type=int, default=50, help="embedding size")
    parser.add_argument("--beta", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--time-embeddings", action="store_true")
    args = parser.parse_args(argv)
    if keras.config.backend() != "jax":
        parser.error("run with KERAS_BACKEND=jax (XLA's memory analysis via JAX)")

    num_classes, batch = args.classes, args.batch
    unit = batch * num_classes * 4
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(batch, num_classes)).astype(np.float32))
    labels = jnp.asarray(rng.integers(0, num_classes, batch).astype(np.int32))
    logit_shape = jax.ShapeDtypeStruct((batch, num_classes), jnp.float32)
    label_shape = jax.ShapeDtypeStruct((batch,), jnp.int32)

    def scce(y, z):
        return keras.losses.sparse_categorical_crossentropy(y, z, from_logits=True)

    def with_gradient(loss):
        return jax.value_and_grad(lambda z, y: jnp.sum(loss(y, z)))

    print(
        f"C = {num_classes:,}, batch {batch}; one (batch, C) float32 buffer = "
        f"{unit / 2**20:.0f} MiB; XLA's memory analysis (JAX, "
        f"{jax.devices()[0].platform}); times: median of {args.repeats}"
    )
    print("\n## decode_min_risk from logits, against SCCE's forward pass")
    print(
        f"{'read-out':<24}{'temp MiB':>10}{'peak MiB':>10}{'peak/buf':>10}{'time ratio':>12}"
    )
    base, temp, peak = analyse(scce, label_shape, logit_shape)
    base_time = timed(base, (labels, logits), args.repeats)
    print(
        f"{'SCCE forward':<24}{temp / 2**20:>10.0f}{peak / 2**20:>10.0f}{peak / unit:>10.2f}{1.0:>12.2f}"
    )
    for kind in KINDS:
        sim = make_similarity(kind, num_classes, args)
        compiled, temp, peak = analyse(
            lambda z, sim=sim: ks.decode_min_risk(z, sim, from_logits=True), logit_shape
        )
        ratio = "-"
        if kind != "embeddings" or args.time_embeddings:
            ratio = f"{timed(compiled, (logits,), args.repeats) / base_time:.2f}"
        print(
            f"{'min-risk, ' + kind:<24}{temp / 2**20:>10.0f}{peak / 2**20:>10.0f}{peak / unit:>10.2f}{ratio:>12}"
        )

    print("\n## loss and its gradient (d/dlogits), against SCCE's")
    print(
        f"{'loss':<30}{'temp MiB':>10}{'peak MiB':>10}{'peak/buf':>10}{'time ratio':>12}"
    )
    base, temp, peak = analyse(with_gradient(scce), logit_shape, label_shape)
    base_time = timed(base, (logits, labels), args.repeats)
    print(
        f"{'SCCE':<30}{temp / 2**20:>10.0f}{peak / 2**20:>10.0f}{peak / unit:>10.2f}{1.0:>12.2f}"
    )
    for kind in KINDS:
        sim = make_similarity(kind, num_classes, args)
        losses = {
            "SimLoss": ks.SimLoss(sim, from_logits=True, reduction=None),
            "soft labels": ks.SoftLabelCrossEntropy(
                sim, args.beta, from_logits=True, reduction=None
            ),
        }
        for name, loss in losses.items():
            compiled, temp, peak = analyse(
                with_gradient(loss), logit_shape, label_shape
            )
            ratio = timed(compiled, (logits, labels), args.repeats) / base_time
            print(
                f"{name + ', ' + kind:<30}{temp / 2**20:>10.0f}{peak / 2**20:>10.0f}{peak / unit:>10.2f}{ratio:>12.2f}"
            )


if __name__ == "__main__":
    main()
