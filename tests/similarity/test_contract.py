"""The `Similarity` contract, checked on every kind (`similarity/base.py`)."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_simloss import similarity
from tests.similarity.cases import (
    CASES,
    FIT_CASES,
    JIT_MODES,
)
from tests.testing import (
    assert_config_round_trip,
    compile_function,
    softmax,
)


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_dense_matrix_matches_numpy_reference(case):
    build, reference = CASES[case]
    matrix = np.asarray(build())
    assert matrix.dtype == np.float32
    np.testing.assert_allclose(matrix, reference(), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.diagonal(matrix), 1.0)


@pytest.mark.parametrize("dense_table", [True, False], ids=["table", "on-the-fly"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_rows_and_pairs_in_graph_match_dense(case, dense_table):
    sim = CASES[case][0]()
    if not dense_table:
        if isinstance(sim, similarity.MatrixSimilarity):
            pytest.skip("a matrix is always a table")
        sim.dense_table_max_classes = 1  # compute the rows on the fly
    elif isinstance(sim, similarity.SparseSimilarity):
        pytest.skip("neighbour lists are never a table")
    assert sim.uses_dense_table is dense_table  # the path the id names
    dense = np.asarray(sim)
    labels = np.arange(sim.num_classes, dtype=np.int32)[::-1].copy()
    classes = np.roll(labels, 1)
    logits = np.random.default_rng(0).normal(size=(sim.num_classes,) * 2)
    logits = logits.astype("float32")

    from keras_simloss import sim_loss

    def outputs(labels, classes, logits):
        return (
            sim.rows(labels),
            sim.log_rows(labels),
            sim.pairs(labels, classes),
            sim_loss(labels, logits, sim, from_logits=True),
            sim_loss(labels, ops.softmax(logits), sim),
        )

    rows, log_rows, pairs, from_logits, from_probabilities = (
        ops.convert_to_numpy(x)
        for x in compile_function(outputs)(labels, classes, logits)
    )
    np.testing.assert_allclose(rows, dense[labels], atol=1e-6)
    with np.errstate(divide="ignore"):
        np.testing.assert_allclose(np.exp(log_rows), dense[labels], atol=1e-6)
    np.testing.assert_allclose(pairs, dense[labels, classes], atol=1e-6)
    # -log(sum_c S[y, c] p_c) in float64 (the probabilities are far from the
    # clip, which then changes nothing).
    expected = -np.log((dense[labels] * softmax(logits)).sum(-1))
    np.testing.assert_allclose(from_logits, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(from_probabilities, expected, rtol=1e-5, atol=1e-6)
    entries = sim.sparse_rows(labels)
    if isinstance(sim, similarity.SparseSimilarity):
        positions, weights = (ops.convert_to_numpy(x) for x in entries)
        rebuilt = np.zeros_like(dense[labels])
        np.maximum.at(rebuilt, (np.arange(len(labels))[:, None], positions), weights)
        np.testing.assert_array_equal(positions[:, 0], labels)  # own class first
        np.testing.assert_allclose(rebuilt, dense[labels], atol=1e-6)
    else:
        assert entries is None


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_config_round_trip_is_exact(case):
    sim = CASES[case][0]()
    rebuilt, _ = assert_config_round_trip(sim)
    np.testing.assert_array_equal(np.asarray(rebuilt), np.asarray(sim))


@pytest.mark.parametrize(
    "call, error, message",
    [
        (
            lambda: similarity.ordinal(10, 1.0),
            ValueError,
            r"reduction_factor < 1.0. Received: reduction_factor=1.0",
        ),
        (
            lambda: similarity.ordinal(10, -0.1),
            ValueError,
            r"Received: reduction_factor=-0.1",
        ),
        (
            lambda: similarity.ordinal(1, 0.5),
            ValueError,
            r"num_classes >= 2. Received: num_classes=1",
        ),
        (lambda: similarity.ordinal(10.0, 0.5), TypeError, r"num_classes"),
        (lambda: similarity.ordinal(10, "0.5"), TypeError, r"reduction_factor"),
        (
            lambda: similarity.lower_bound(np.eye(3), 1.0),
            ValueError,
            r"lower_bound < 1.0",
        ),
        (
            lambda: similarity.from_embeddings(np.ones((3, 2)), lower_bound=-1),
            ValueError,
            r"lower_bound",
        ),
        (
            lambda: similarity.from_embeddings([[1.0, 0.0], [0.0, 0.0]]),
            ValueError,
            r"vectors\[1\] is all zeros",
        ),
        (
            lambda: similarity.from_embeddings([[1.0, np.inf], [0.0, 1.0]]),
            ValueError,
            r"finite",
        ),
        (
            lambda: similarity.from_embeddings(np.ones(3)),
            ValueError,
            r"vectors.shape=\(3,\)",
        ),
        (
            lambda: similarity.from_hierarchy([0.5, 1.0, 1.0]),
            TypeError,
            r"ancestor ids of integers.*float64",
        ),
        (
            lambda: similarity.from_hierarchy([0, 1, 1], [0.5, 0.2]),
            ValueError,
            r"one value per level",
        ),
        (
            lambda: similarity.from_hierarchy([0, 1, 1], 1.0),
            ValueError,
            r"similarities < 1.0",
        ),
        (
            lambda: similarity.SparseSimilarity([[0], [0]], [[0.5], [0.5]]),
            ValueError,
            r"itself",
        ),
        (
            lambda: similarity.SparseSimilarity(
                [[1, 1], [0, 0]], [[0.5, 0.4], [0.1, 0.0]]
            ),
            ValueError,
            r"at most once",
        ),
        (
            lambda: similarity.SparseSimilarity([[5], [0]], [[0.5], [0.5]]),
            ValueError,
            r"in \[0, 2\)",
        ),
        (
            lambda: similarity.SparseSimilarity([[1], [0]], [[1.5], [0.5]]),
            ValueError,
            r"in \[0, 1\]",
        ),
        (
            lambda: similarity.top_k(np.eye(3), k=3),
            ValueError,
            r"k < num_classes=3. Received: k=3",
        ),
        (
            lambda: similarity.from_embeddings(np.eye(3), keep_rows=1),
            TypeError,
            r"`keep_rows`. Expected a bool. Received: keep_rows=1",
        ),
    ],
    ids=[
        "r=1",
        "r<0",
        "C=1",
        "C-float",
        "r-str",
        "l=1",
        "l<0",
        "zero-vector",
        "inf-vector",
        "vectors-1d",
        "float-ancestors",
        "levels-mismatch",
        "hierarchy-sim=1",
        "sparse-self",
        "sparse-duplicate",
        "sparse-range",
        "sparse-value",
        "top-k-too-large",
        "keep-rows-int",
    ],
)
def test_builders_reject_bad_arguments(call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize("jit_compile", JIT_MODES, ids=lambda jit: f"jit={jit}")
@pytest.mark.parametrize("case", list(FIT_CASES), ids=list(FIT_CASES))
def test_fit_and_evaluate_on_the_active_backend(case, jit_compile):
    # Cached tensors must be made outside every trace: on JAX a table cached
    # during the first trace leaked a tracer (UnexpectedTracerError).
    from keras_simloss import MistakeSeverity, SimLoss

    build, dense_table = FIT_CASES[case]
    sim = build()
    if not dense_table and not isinstance(sim, similarity.SparseSimilarity):
        sim.dense_table_max_classes = 2
    assert sim.uses_dense_table is dense_table  # the path the id names
    matrix = np.asarray(sim, np.float64)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(24, 3)).astype("float32")
    y = rng.integers(0, sim.num_classes, size=24).astype("int32")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(sim.num_classes)])
    model.compile(
        optimizer="adam",
        loss=SimLoss(sim, from_logits=True),
        metrics=[MistakeSeverity(sim)],
        jit_compile=jit_compile,
    )
    history = model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    loss, severity = model.evaluate(x, y, batch_size=8, verbose=0)
    # Independent NumPy reference on the trained model's outputs.
    logits = np.asarray(model.predict(x, batch_size=8, verbose=0), np.float64)
    probabilities = softmax(logits)
    expected_loss = np.mean(-np.log(np.sum(matrix[y] * probabilities, axis=-1)))
    predicted = logits.argmax(axis=-1)
    mistakes = predicted != y
    expected_severity = (
        np.sum(1.0 - matrix[y, predicted][mistakes]) / mistakes.sum()
        if mistakes.any()
        else 0.0
    )
    assert loss == pytest.approx(expected_loss, rel=1e-4, abs=1e-5)
    assert severity == pytest.approx(expected_severity, rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("case", ["sparse", "ordinal-r0.5"])
def test_variable_predictions(case):
    # A variable is not a tensor on TensorFlow (no `ndim`); it used to fail
    # in the sparse path's gathers.
    from keras_simloss import sim_loss

    sim = CASES[case][0]()
    matrix = np.asarray(sim, np.float64)
    logits = np.random.default_rng(0).normal(size=(4, sim.num_classes))
    labels = np.array([0, 1, 2, 0])
    expected = -np.log(np.sum(matrix[labels] * softmax(logits), axis=-1))
    variables = [keras.Variable(logits.astype("float32"))]
    if keras.config.backend() == "tensorflow":
        import tensorflow as tf

        variables.append(tf.Variable(logits.astype("float32")))
    for variable in variables:
        loss = sim_loss(labels, variable, sim, from_logits=True)
        np.testing.assert_allclose(ops.convert_to_numpy(loss), expected, rtol=1e-5)


@pytest.mark.parametrize(
    "name, replacement",
    [("_log_terms", "sparse_rows"), ("_recompute_rows", "keep_rows")],
)
def test_a_kind_overriding_a_removed_extension_point_is_refused(name, replacement):
    # 0.1.0's per-kind hooks are no longer called: a subclass defining one
    # would silently compute something else, so it is refused at definition.
    with pytest.raises(TypeError, match=rf"`{name}`.*`{replacement}`"):
        type("OldKind", (similarity.Similarity,), {name: lambda self: None})
