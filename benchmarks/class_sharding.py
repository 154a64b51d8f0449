"""Per-device memory and step time of class-sharded training (JAX).

Compiles the train step of `Dense(C)` on `--features` inputs with each loss,
on one device (no distribution) and with the classes sharded over `n`
simulated host devices (`keras.distribution.ModelParallel`, the kernel laid
out `(None, "model")`, the similarity's state by `sharding.shard_classes`),
and prints, per device, from XLA's memory analysis of the compiled program:

- `peak`: arguments + temporaries + outputs not aliased to arguments, from
  XLA's memory analysis;
- `consts`: constants embedded in the program, which XLA's memory analysis
  leaves out and every device holds whole (the similarity's arrays when
  they are not sharded: on one device, and in the `no shard_classes` row);
- `held`: `peak + consts`, what one device holds during the step, and
  `n x held / one`: `n` times its ratio to one device's (the goal: at most
  `1.1`, i.e. `1 / n` of one device's memory plus 10 %);
- `largest`: the largest buffer of the per-device program, and `full C`
  whether any buffer has an axis of all `C` classes;
- `time / SCCE`: the median of `--repeats` steps against sparse categorical
  cross entropy's under the same layout, taken side by side. Simulated
  devices share this machine's cores: the ratio is meaningful, the absolute
  time is not a GPU's.

    python benchmarks/class_sharding.py                      # C = 1,000,000
    python benchmarks/class_sharding.py --classes 10000000 --no-time
    python benchmarks/class_sharding.py --read-outs          # memory only
    python benchmarks/class_sharding.py --read-outs --kinds sparse hubs
    python benchmarks/class_sharding.py --classes 8192 --kinds matrix --read-outs

The device count is fixed when JAX starts: the script sets
`XLA_FLAGS=--xla_force_host_platform_device_count` to the largest of
`--devices` itself.
"""

import argparse
import os
import re
import statistics
import time


def parse():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--classes", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--dim", type=int, default=64, help="embedding width d")
    parser.add_argument("--k", type=int, default=10, help="neighbours per class")
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-time", action="store_true", help="memory only")
    parser.add_argument(
        "--read-outs",
        action="store_true",
        help="instead of train steps: the memory of the compiled median and "
        "min-risk read-outs of (batch, C) logits (compiled, not run)",
    )
    parser.add_argument(
        "--kinds",
        nargs="+",
        default=["ordinal", "embeddings", "sparse", "hierarchy"],
        choices=["ordinal", "embeddings", "sparse", "hierarchy", "hubs", "matrix"],
        metavar="KIND",
        help="ordinal, embeddings, sparse, hierarchy; hubs: neighbour lists in "
        "which 100 classes are each listed by C / 1000 others; matrix: a "
        "dense C x C table (small C only)",
    )
    return parser.parse_args()


ARGS = parse()
os.environ["KERAS_BACKEND"] = "jax"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + f" --xla_force_host_platform_device_count={max(ARGS.devices)}"
    # Simulated devices are threads; on a busy machine one may reach a
    # collective long after the others, past XLA's default 40 s.
    + " --xla_cpu_collective_call_terminate_timeout_seconds=600"
    + " --xla_cpu_collective_timeout_seconds=600"
)

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_simloss as ks  # noqa: E402

MIB = 2**20
_SHAPE = re.compile(
    r"\b(pred|s8|u8|s16|u16|bf16|f16|s32|u32|f32|s64|u64|f64)\[([0-9,]*)\]"
)
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2}


def make_similarity(kind, num_classes):
    rng = np.random.default_rng(0)
    if kind == "ordinal":
        return ks.similarity.ordinal(num_classes, 0.8)
    if kind == "hierarchy":
        codes = np.arange(num_classes)
        return ks.similarity.from_hierarchy(
            [codes // 10, codes // 100, codes // 1000], [0.6, 0.3, 0.1]
        )
    if kind in ("sparse", "hubs"):
        offsets = rng.choice(np.arange(1, num_classes), size=ARGS.k, replace=False)
        indices = (np.arange(num_classes)[:, None] + offsets[None, :]) % num_classes
        values = rng.uniform(0.1, 0.9, size=(num_classes, ARGS.k)).astype("float32")
        if kind == "hubs":
            # Every tenth class lists one of 100 hubs first.
            hubs = np.arange(100) * (num_classes // 100) + num_classes // 200
            rows = np.arange(0, num_classes, 10)
            hub = hubs[(rows // 10) % 100]
            fine = ~np.any(indices[rows] == hub[:, None], axis=1) & (hub != rows)
            indices[rows[fine], 0] = hub[fine]
        return ks.similarity.SparseSimilarity(indices, values)
    if kind == "matrix":
        table = rng.uniform(size=(num_classes, num_classes)).astype("float32")
        table[rng.uniform(size=table.shape) < 0.7] = 0.0
        np.fill_diagonal(table, 1.0)
        return ks.similarity.MatrixSimilarity(table)
    vectors = rng.standard_normal((num_classes, ARGS.dim), dtype=np.float32)
    return ks.similarity.from_embeddings(vectors, 0.2)


def buffers(text, num_classes):
    """(largest buffer in bytes, its shape, whether a shape has all C, bytes
    of embedded constants) of a compiled program's text."""
    largest, largest_shape, full = 0, "", False
    for kind, dims in _SHAPE.findall(text):
        sizes = [int(d) for d in dims.split(",") if d]
        size = int(np.prod(sizes)) * _BYTES.get(kind, 8 if "64" in kind else 4)
        if size > largest:
            largest, largest_shape = size, f"{kind}[{dims}]"
        full |= num_classes in sizes
    constants = 0
    for line in text.splitlines():
        if " constant(" in line and "{...}" in line:
            found = _SHAPE.search(line.split("=", 1)[1])
            if found:
                kind, dims = found.groups()
                sizes = [int(d) for d in dims.split(",") if d]
                constants += int(np.prod(sizes)) * _BYTES.get(kind, 4)
    return largest, largest_shape, full, constants


def measure(kind, devices, shard_state=True):
    """Memory figures and step times of one configuration."""
    num_classes = ARGS.classes
    if devices == 1:
        keras.distribution.set_distribution(None)
    else:
        mesh = keras.distribution.DeviceMesh(
            (1, devices),
            ["batch", "model"],
            keras.distribution.list_devices()[:devices],
        )
        keras.distribution.set_distribution(
            keras.distribution.ModelParallel(
                layout_map=ks.sharding.class_layout_map(mesh, "logits"),
                batch_dim_name="batch",
            )
        )
    inputs = keras.Input((ARGS.features,))
    model = keras.Model(inputs, keras.layers.Dense(num_classes, name="logits")(inputs))
    if kind == "scce":
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    else:
        similarity = make_similarity(kind, num_classes)
        if devices > 1 and shard_state:
            ks.sharding.shard_classes(model, similarity)
        loss = ks.SimLoss(similarity, from_logits=True)
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss=loss, jit_compile=True)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((ARGS.batch, ARGS.features), dtype=np.float32)
    y = rng.integers(0, num_classes, size=(ARGS.batch,))
    model.optimizer.build(model.trainable_variables)
    distribution = keras.distribution.distribution()
    data = tuple(
        a
        if distribution is None
        else jax.device_put(a, distribution.get_data_layout(a.shape).backend_layout)
        for a in (x, y)
    )
    state = tuple(
        [v.value for v in variables]
        for variables in (
            model.trainable_variables,
            model.non_trainable_variables,
            model.optimizer.variables,
            model.metrics_variables,
        )
    )
    # As Keras's trainer compiles it: the state is donated, so the step's
    # new state (the unchanged similarity state too) reuses its buffers.
    compiled = jax.jit(model.train_step, donate_argnums=0).lower(state, data).compile()
    analysis = compiled.memory_analysis()
    peak = (
        analysis.argument_size_in_bytes
        + analysis.temp_size_in_bytes
        + analysis.output_size_in_bytes
        - analysis.alias_size_in_bytes
    )
    largest, shape, full, constants = buffers(compiled.as_text(), num_classes)
    row = {
        "peak": peak,
        "temp": analysis.temp_size_in_bytes,
        "largest": largest,
        "shape": shape,
        "full": full,
        "constants": constants,
        "times": [],
    }
    if not ARGS.no_time:
        for _ in range(ARGS.repeats + 1):  # the first run is a warm-up
            start = time.perf_counter()
            state = jax.block_until_ready(compiled(state, data))[1]
            row["times"].append(time.perf_counter() - start)
        row["times"] = row["times"][1:]
    keras.distribution.set_distribution(None)
    return row


def measure_read_out(kind, devices):
    """Memory figures of one read-out, compiled for abstract logits."""
    num_classes = ARGS.classes
    spec = jax.ShapeDtypeStruct((ARGS.batch, num_classes), "float32")
    values = {}
    if kind == "median":
        similarity = None
    else:
        similarity = make_similarity(kind, num_classes)
    if devices == 1:
        keras.distribution.set_distribution(None)
    else:
        mesh = keras.distribution.DeviceMesh(
            (1, devices),
            ["batch", "model"],
            keras.distribution.list_devices()[:devices],
        )
        keras.distribution.set_distribution(
            keras.distribution.ModelParallel(
                layout_map=ks.sharding.class_layout_map(mesh, "logits"),
                batch_dim_name="batch",
            )
        )
        layout = keras.distribution.TensorLayout((None, "model"), mesh)
        spec = jax.ShapeDtypeStruct(
            spec.shape, spec.dtype, sharding=layout.backend_layout
        )
        if similarity is not None:
            inputs = keras.Input((ARGS.features,))
            model = keras.Model(
                inputs, keras.layers.Dense(num_classes, name="logits")(inputs)
            )
            values = ks.sharding.shard_classes(model, similarity).values()

    def read_out(logits, values):
        if similarity is None:
            return ks.decode_ordinal(logits, "median", from_logits=True)
        # As inside a trainer's step: the state's arrays are arguments.
        with similarity._reading_state(values):
            return ks.decode_min_risk(logits, similarity, from_logits=True)

    compiled = jax.jit(read_out).lower(spec, values).compile()
    analysis = compiled.memory_analysis()
    peak = (
        analysis.argument_size_in_bytes
        + analysis.temp_size_in_bytes
        + analysis.output_size_in_bytes
        - analysis.alias_size_in_bytes
    )
    largest, shape, full, constants = buffers(compiled.as_text(), num_classes)
    keras.distribution.set_distribution(None)
    return {
        "peak": peak,
        "largest": largest,
        "shape": shape,
        "full": full,
        "constants": constants,
        "times": [],
    }


def main():
    if ARGS.read_outs:
        return main_read_outs()
    kinds = ["scce", *ARGS.kinds]
    batch_by_class = ARGS.batch * ARGS.classes * 4
    print(
        f"C = {ARGS.classes:,}, batch {ARGS.batch}, {ARGS.features} features; "
        f"one (batch, C) float32 buffer = {batch_by_class / MIB:,.0f} MiB; "
        f"embeddings d = {ARGS.dim}, neighbour lists k = {ARGS.k}",
        flush=True,
    )
    header = (
        f"{'loss':<28} {'n':>2} {'peak':>7} {'consts':>6} {'held':>7} "
        f"{'n x held/one':>12} {'largest buffer':>22} {'full C':>6} {'time/SCCE':>9}"
    )
    print(header)
    print("-" * len(header), flush=True)
    results = {}
    for devices in ARGS.devices:
        names = list(kinds)
        if devices > 1 and "embeddings" in kinds:
            names.append("embeddings, no shard_classes")
        for name in names:
            kind = name.split(",")[0]
            row = measure(kind, devices, shard_state="no shard" not in name)
            results[name, devices] = row
            # Printed as measured: a run that runs out of memory keeps its rows.
            print(format_row(name, devices, row, results), flush=True)


def main_read_outs():
    print(
        f"C = {ARGS.classes:,}, batch {ARGS.batch}: read-outs of (batch, C) "
        f"logits; embeddings d = {ARGS.dim}, neighbour lists k = {ARGS.k}",
        flush=True,
    )
    header = (
        f"{'read-out':<28} {'n':>2} {'peak':>7} {'consts':>6} {'held':>7} "
        f"{'n x held/one':>12} {'largest buffer':>22} {'full C':>6}"
    )
    print(header)
    print("-" * len(header), flush=True)
    results = {}
    for devices in ARGS.devices:
        for kind in ["median", *ARGS.kinds]:
            name = "median" if kind == "median" else f"min-risk, {kind}"
            row = measure_read_out(kind, devices)
            results[name, devices] = row
            print(format_row(name, devices, row, results, key=name)[:-10], flush=True)


def format_row(name, devices, row, results, key=None):
    one = results.get((key or name.split(",")[0], 1))
    held = row["peak"] + row["constants"]
    ratio = (
        f"{devices * held / (one['peak'] + one['constants']):.2f}"
        if one and devices > 1
        else ""
    )
    scce = results.get(("scce", devices))
    timing = (
        f"{statistics.median(row['times']) / statistics.median(scce['times']):.2f}"
        if row["times"] and scce
        else ""
    )
    largest = f"{row['largest'] / MIB:,.0f} {row['shape']}"
    return (
        f"{name:<28} {devices:>2} {row['peak'] / MIB:>7,.0f} "
        f"{row['constants'] / MIB:>6,.0f} {held / MIB:>7,.0f} {ratio:>12} "
        f"{largest[:22]:>22} {'yes' if row['full'] else 'no':>6} {timing:>9}"
    )


def footer():
    if ARGS.read_outs:
        print(
            "MiB per device. peak: XLA's memory analysis of the compiled "
            "read-out (the logits, the state's arrays, temporaries, output); "
            "consts: embedded constants; held = peak + consts."
        )
        return
    print(
        "MiB per device. peak: XLA's memory analysis (arguments, temporaries, "
        "unaliased outputs); consts: embedded constants, whole on every "
        "device; held = peak + consts; largest buffer in MiB; time: median "
        f"of {ARGS.repeats} steps over SCCE's under the same layout."
    )


if __name__ == "__main__":
    main()
    footer()
