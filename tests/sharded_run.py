"""Class-sharded training on simulated JAX devices, against one device.

Run by `tests/test_sharding.py` in a subprocess (the device count is fixed
when JAX starts): `python tests/sharded_run.py DEVICES [LOSS ...]
[--kinds K,...]`. For every kind of similarity (default all six) and loss
(default both: `simloss soft_labels`) it trains one SGD step of a model
whose output kernel is laid out `(None, "model")` with the similarity's
state sharded, and the same step on one device without any distribution;
it prints, as one JSON line, both runs' losses, metrics and gradients, the
state's layouts and shard shapes, `p @ S` (`Similarity.expected`, what
min-risk decoding reads) and its layout, and every buffer shape of the
compiled sharded step (whose metrics include the median and the min-risk
read-outs) that has a full axis of `C` classes.
"""

import json
import os
import re
import sys

NUM_CLASSES = 4000  # divisible by 4 and 8
BATCH = 32
FEATURES = 8
HUBS = [11, 2011]  # each listed by about 300 others in the "hubs" kind


def main(devices, loss_names, kinds):
    os.environ["KERAS_BACKEND"] = "jax"
    # Simulated devices are threads of this process; on a busy machine one
    # may reach a collective long after the others, past XLA's default 40 s
    # (it then aborts the process).
    os.environ["XLA_FLAGS"] = (
        f"--xla_force_host_platform_device_count={devices} "
        "--xla_cpu_collective_call_terminate_timeout_seconds=600 "
        "--xla_cpu_collective_timeout_seconds=600"
    )
    import jax
    import keras
    import numpy as np

    import keras_simloss as ks

    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(NUM_CLASSES, 6)).astype("float32")
    offsets = rng.choice(np.arange(1, NUM_CLASSES), 4, replace=False)
    neighbours = (np.arange(NUM_CLASSES)[:, None] + offsets[None, :]) % NUM_CLASSES
    closeness = rng.uniform(0.1, 0.9, size=neighbours.shape).astype("float32")
    levels = [np.arange(NUM_CLASSES) // 10, np.arange(NUM_CLASSES) // 200]
    # A hand-made table: not symmetric, 70 % zeros (log S = -inf there);
    # drawn apart, so that the other kinds' data stay as they were.
    table_rng = np.random.default_rng(3)
    matrix = np.where(
        table_rng.uniform(size=(NUM_CLASSES, NUM_CLASSES)) < 0.3,
        table_rng.uniform(size=(NUM_CLASSES, NUM_CLASSES)),
        0.0,
    )
    np.fill_diagonal(matrix, 1.0)
    # Neighbour lists with two hubs, classes 11 and 2011, each listed by ~300
    # others drawn from all classes, so from every device's block (more
    # than 64: no turned-around lists, `p @ S` scatters).
    hub_lists = neighbours.copy()
    hub_rng = np.random.default_rng(4)
    for slot, hub in enumerate(HUBS):
        rows = hub_rng.choice(NUM_CLASSES, 300, replace=False)
        rows = rows[(rows != hub) & ~np.any(hub_lists[rows] == hub, axis=1)]
        hub_lists[rows, slot] = hub
    makers = {
        "ordinal": lambda: ks.similarity.ordinal(NUM_CLASSES, 0.7),
        "embeddings": lambda: ks.similarity.from_embeddings(vectors, 0.2),
        "sparse": lambda: ks.similarity.SparseSimilarity(neighbours, closeness),
        "hierarchy": lambda: ks.similarity.from_hierarchy(levels, [0.6, 0.3]),
        "matrix": lambda: ks.similarity.MatrixSimilarity(matrix),
        "hubs": lambda: ks.similarity.SparseSimilarity(hub_lists, closeness),
    }
    losses = {
        "simloss": lambda s: ks.SimLoss(s, from_logits=True),
        "soft_labels": lambda s: ks.SoftLabelCrossEntropy(s, 4.0, from_logits=True),
    }
    kernel = rng.normal(size=(FEATURES, NUM_CLASSES)).astype("float32")
    bias = rng.normal(size=(NUM_CLASSES,)).astype("float32")
    x = rng.normal(size=(BATCH, FEATURES)).astype("float32")
    y = rng.integers(0, NUM_CLASSES, size=(BATCH,))
    weights = rng.uniform(0.5, 2.0, size=(BATCH,)).astype("float32")

    mesh = keras.distribution.DeviceMesh(
        (1, devices), ["batch", "model"], keras.distribution.list_devices()
    )
    layout_map = ks.sharding.class_layout_map(mesh, "logits")

    def step(kind, loss_name, sharded):
        keras.distribution.set_distribution(
            keras.distribution.ModelParallel(
                layout_map=layout_map, batch_dim_name="batch"
            )
            if sharded
            else None
        )
        similarity = makers[kind]()
        inputs = keras.Input((FEATURES,))
        model = keras.Model(
            inputs, keras.layers.Dense(NUM_CLASSES, name="logits")(inputs)
        )
        model.get_layer("logits").set_weights([kernel, bias])
        result = {}
        if sharded:
            state = ks.sharding.shard_classes(model, similarity)
            result["layouts"] = {k: list(v) for k, v in state.layouts.items()}
            result["shards"] = {
                key: [
                    [list(shard.data.shape) for shard in value.addressable_shards],
                    list(value.shape),
                ]
                for key, value in state.values().items()
            }
        model.compile(
            optimizer=keras.optimizers.SGD(1.0),
            loss=losses[loss_name](similarity),
            metrics=[
                ks.metrics.MistakeSeverity(similarity, name="severity"),
                ks.metrics.TopKMistakeSeverity(similarity, k=3, name="top3"),
                # Read-outs: the ordinal median and the min-risk class.
                ks.metrics.ClassMeanAbsoluteError(
                    decode="median", from_logits=True, name="median_mae"
                ),
                ks.metrics.ClassMeanAbsoluteError(
                    decode=similarity, from_logits=True, name="min_risk_mae"
                ),
            ],
            jit_compile=True,
        )
        logs = model.train_on_batch(x, y, sample_weight=weights, return_dict=True)
        result["logs"] = {k: float(v) for k, v in logs.items()}
        # SGD with learning rate 1: the step moved the kernel by -gradient.
        gradient = kernel - np.asarray(model.get_layer("logits").kernel.numpy())
        result["gradient"] = gradient.ravel()[:: NUM_CLASSES // 50].tolist()
        result["gradient_norm"] = float(np.linalg.norm(gradient))
        evaluated = model.evaluate(x, y, verbose=0, return_dict=True)
        result["evaluated"] = {k: float(v) for k, v in evaluated.items()}
        logits = model.predict(x, verbose=0)
        result["min_risk"] = ks.decode_min_risk(
            model(x), similarity, from_logits=True
        ).tolist()
        # The median read-out, compiled on the model's (sharded) logits, and
        # a float64 NumPy reference with each row's margin: how far the
        # cumulative sums next to the crossing are from half the mass (a
        # float32 sum may cross elsewhere when that is within its rounding).
        result["medians"] = np.asarray(
            jax.jit(lambda z: ks.decode_ordinal(z, "median", from_logits=True))(
                model(x)
            )
        ).tolist()
        exact = np.exp(logits.astype(np.float64) - logits.max(-1, keepdims=True))
        cumulative = np.cumsum(exact / exact.sum(-1, keepdims=True), axis=-1)
        result["medians_float64"] = np.argmax(cumulative >= 0.5, axis=-1).tolist()
        result["median_margins"] = np.min(np.abs(cumulative - 0.5), axis=-1).tolist()
        probabilities = keras.ops.softmax(model(x))
        if sharded:
            # As inside a trainer's step: the state's arrays as arguments.
            def expected(p, values):
                with similarity._reading_state(values):
                    return similarity.expected(p)

            values = state.values()
            result["expected_spec"] = list(
                jax.jit(expected)(probabilities, values).sharding.spec
            )
            product = np.asarray(jax.jit(expected)(probabilities, values))
        else:
            product = np.asarray(similarity.expected(probabilities))
        # A sample of the entries, and the hubs' columns whole.
        result["expected"] = np.concatenate(
            [product.ravel()[::97], product[:, HUBS].ravel()]
        ).tolist()
        if sharded:
            result["full_class_buffers"] = full_class_buffers(model, x, y, weights)
            path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"{kind}.keras")
            model.save(path)
            loaded = keras.saving.load_model(path)
            result["reloaded_max_difference"] = float(
                np.max(np.abs(loaded.predict(x, verbose=0) - logits))
            )
        return result

    def full_class_buffers(model, x, y, weights):
        distribution = keras.distribution.distribution()
        state = tuple(
            [v.value for v in variables]
            for variables in (
                model.trainable_variables,
                model.non_trainable_variables,
                model.optimizer.variables,
                model.metrics_variables,
            )
        )
        data = tuple(
            jax.device_put(a, distribution.get_data_layout(a.shape).backend_layout)
            for a in (x, y, weights)
        )
        text = jax.jit(model.train_step).lower(state, data).compile().as_text()
        shapes = set(re.findall(r"[a-z]+[0-9]*\[([0-9,]+)\]", text))
        return sorted(s for s in shapes if str(NUM_CLASSES) in s.split(","))

    results = {"devices": len(jax.devices()), "runs": {}}
    for kind in kinds:
        for loss_name in loss_names:
            results["runs"][f"{kind}-{loss_name}"] = {
                "one": step(kind, loss_name, sharded=False),
                "sharded": step(kind, loss_name, sharded=True),
            }
    results["top_k"] = top_k_matches(devices)
    results["small_blocks"] = small_blocks(mesh, layout_map)
    keras.distribution.set_distribution(None)
    results["top_k_on_devices"] = top_k_on_devices()
    results["errors"] = errors(makers, layout_map, mesh)
    print(json.dumps(results))


def top_k_matches(devices):
    """Whether `sharding.top_k` over sharded classes gives `ops.top_k`'s
    values and indices, on rows with many ties."""
    import jax
    import keras
    import numpy as np

    import keras_simloss as ks

    rng = np.random.default_rng(1)
    similarity = ks.similarity.ordinal(NUM_CLASSES, 0.5)
    inputs = keras.Input((FEATURES,))
    model = keras.Model(inputs, keras.layers.Dense(NUM_CLASSES, name="logits")(inputs))
    ks.sharding.shard_classes(model, similarity)
    values = rng.integers(0, 3, size=(BATCH, NUM_CLASSES)).astype("float32")
    layout = keras.distribution.TensorLayout(
        (None, "model"), keras.distribution.distribution().device_mesh
    )
    sharded = jax.device_put(values, layout.backend_layout)
    results = {}
    for k in (1, 7, NUM_CLASSES // devices + 3):
        expected = keras.ops.top_k(values, k, sorted=True)
        got = jax.jit(lambda v, k=k: ks.sharding.top_k(v, k, similarity))(sharded)
        results[str(k)] = bool(
            np.array_equal(np.asarray(got[0]), np.asarray(expected[0]))
            and np.array_equal(np.asarray(got[1]), np.asarray(expected[1]))
        )
    return results


def model_of(num_classes, layouts):
    """`Dense(num_classes, name="logits")` on `FEATURES` inputs, built under
    `ModelParallel` with `layouts`, which stays the active distribution."""
    import keras

    keras.distribution.set_distribution(
        keras.distribution.ModelParallel(layout_map=layouts, batch_dim_name="batch")
    )
    inputs = keras.Input((FEATURES,))
    return keras.Model(inputs, keras.layers.Dense(num_classes, name="logits")(inputs))


def small_blocks(mesh, layout_map):
    """`p @ S`, rows, `log S` rows and pairs over sharded classes against
    NumPy, where each device has a few classes: the dense table of the
    structured kinds (beside their own arrays) at `C = 3 n`, and hub lists
    (a class listed by 70 others) with at least as many neighbours per
    class as a device has classes. The probabilities have zeros. Returns,
    per case, the largest absolute difference, whether `log S` is `-inf` in
    the same places, and (hubs) whether the ring pushes partial sums."""
    import jax
    import keras
    import numpy as np

    import keras_simloss as ks

    devices = mesh.shape[1]
    rng = np.random.default_rng(5)
    dense_classes = 3 * devices
    # 72 classes (18 or 9 per device), 18 neighbours each, 20 % of the
    # slots unused; class 3 is listed by at least 70 others.
    hub_classes, slots = 72, 18
    everyone = np.arange(hub_classes)
    hub_indices = np.stack(
        [rng.permutation(np.delete(everyone, c))[:slots] for c in everyone]
    )
    hub_values = rng.uniform(0.1, 0.9, size=hub_indices.shape)
    hub_values[rng.uniform(size=hub_values.shape) < 0.2] = 0.0
    listing = [c for c in everyone if c != 3 and 3 not in hub_indices[c]][:70]
    hub_slots = rng.integers(0, slots, len(listing))
    hub_indices[listing, hub_slots] = 3
    hub_values[listing, hub_slots] = 0.5
    hubs = ks.similarity.SparseSimilarity(hub_indices, hub_values)
    table = np.where(
        rng.uniform(size=(dense_classes, dense_classes)) < 0.4,
        rng.uniform(size=(dense_classes, dense_classes)),
        0.0,
    )
    np.fill_diagonal(table, 1.0)
    cases = {
        "ordinal": ks.similarity.ordinal(dense_classes, 0.6),
        "hierarchy": ks.similarity.from_hierarchy(
            [np.arange(dense_classes) // 2, np.arange(dense_classes) // 6],
            [0.7, 0.2],
        ),
        "embeddings": ks.similarity.from_embeddings(
            rng.normal(size=(dense_classes, 3)), 0.1
        ),
        "matrix": ks.similarity.MatrixSimilarity(table),
        "hubs": hubs,
    }
    results = {}
    for name, similarity in cases.items():
        num_classes = similarity.num_classes
        model = model_of(num_classes, layout_map)
        state = ks.sharding.shard_classes(model, similarity)
        matrix = np.asarray(similarity, np.float64)  # NumPy rows
        p = rng.uniform(size=(BATCH, num_classes)) * (
            rng.uniform(size=(BATCH, num_classes)) < 0.6
        )
        p[0] = np.eye(num_classes)[0]
        p[1] = np.eye(num_classes)[-1]
        p = (p / p.sum(-1, keepdims=True)).astype("float32")
        labels = rng.integers(0, num_classes, BATCH).astype("int32")
        classes = rng.integers(0, num_classes, BATCH).astype("int32")

        def read(p, labels, classes, values, similarity=similarity):
            with similarity._reading_state(values):
                return (
                    similarity.expected(p),
                    similarity.rows(labels),
                    similarity.log_rows(labels),
                    similarity.pairs(labels, classes),
                )

        expected, rows, log_rows, pairs = (
            np.asarray(a) for a in jax.jit(read)(p, labels, classes, state.values())
        )
        finite = np.isfinite(log_rows)
        with np.errstate(divide="ignore"):
            log_reference = np.log(matrix[labels])
        results[name] = {
            "pushes": similarity._ring_pushes() if name == "hubs" else None,
            "difference": float(
                max(
                    np.max(np.abs(expected - p.astype(np.float64) @ matrix)),
                    np.max(np.abs(rows - matrix[labels])),
                    np.max(np.abs(log_rows[finite] - log_reference[finite])),
                    np.max(np.abs(pairs - matrix[labels, classes])),
                )
            ),
            "same_zeros": bool(np.array_equal(finite, np.isfinite(log_reference))),
            # Sharded, the host builds `S` for the state, not `log S` too.
            "host_tables": "_tables" in similarity.__dict__,
        }
    keras.distribution.set_distribution(None)
    return results


def top_k_on_devices():
    """Whether `similarity.top_k(on_device=True)`, which splits each block's
    rows over the devices, gives the NumPy path's lists, entry for entry, on
    vectors with many ties (repeated and parallel ones)."""
    import jax
    import numpy as np

    import keras_simloss as ks

    rng = np.random.default_rng(2)
    vectors = rng.integers(-1, 2, size=(1001, 3)).astype("float32")  # ties
    vectors[np.all(vectors == 0, axis=1)] = 1.0
    similarity = ks.similarity.from_embeddings(vectors, 0.1)
    expected = ks.similarity.top_k(similarity, 6, batch_size=250)
    got = ks.similarity.top_k(similarity, 6, batch_size=250, on_device=True)
    module = sys.modules["keras_simloss.similarity.top_k"]
    block = module._row_split()(np.arange(250))
    return {
        "devices": len(jax.devices()),
        "block_devices": len(block.sharding.device_set),
        "block_rows": int(block.shape[0]),
        "equal": bool(
            np.array_equal(got.indices, expected.indices)
            and np.array_equal(got.values, expected.values)
        ),
    }


def errors(makers, layout_map, mesh):
    """The message of each input `shard_classes` refuses."""
    import keras

    import keras_simloss as ks

    other = keras.distribution.LayoutMap(mesh)
    other["logits/kernel"] = (None, "batch")
    cases = {
        "indivisible": lambda: ks.sharding.shard_classes(
            model_of(NUM_CLASSES + 2, keras.distribution.LayoutMap(mesh)),
            ks.similarity.ordinal(NUM_CLASSES + 2, 0.5),
        ),
        "batch_axis": lambda: ks.sharding.shard_classes(
            model_of(NUM_CLASSES, layout_map), makers["ordinal"](), axis="batch"
        ),
        "unknown_axis": lambda: ks.sharding.shard_classes(
            model_of(NUM_CLASSES, layout_map), makers["ordinal"](), axis="classes"
        ),
        "other_axis": lambda: ks.sharding.shard_classes(
            model_of(NUM_CLASSES, other), makers["ordinal"]()
        ),
        "not_sharded": lambda: ks.sharding.shard_classes(
            model_of(NUM_CLASSES, keras.distribution.LayoutMap(mesh)),
            makers["ordinal"](),
        ),
        "twice": lambda: [
            ks.sharding.shard_classes(model_of(NUM_CLASSES, layout_map), s)
            for s in [makers["ordinal"]()] * 2
        ],
    }

    def without_distribution():
        model = model_of(NUM_CLASSES, layout_map)
        keras.distribution.set_distribution(None)
        ks.sharding.shard_classes(model, makers["ordinal"]())

    cases["no_distribution"] = without_distribution
    messages = {}
    for name, case in cases.items():
        try:
            case()
            messages[name] = None
        except ValueError as error:
            messages[name] = str(error)
    return messages


if __name__ == "__main__":
    arguments = sys.argv[2:]
    kinds = ["ordinal", "embeddings", "sparse", "hierarchy", "matrix", "hubs"]
    if "--kinds" in arguments:
        at = arguments.index("--kinds")
        kinds = arguments[at + 1].split(",")
        arguments = arguments[:at] + arguments[at + 2 :]
    main(int(sys.argv[1]), arguments or ["simloss", "soft_labels"], kinds)
