import json

import keras
import numpy as np
import pytest
from keras import ops

from keras_simloss import similarity
from keras_simloss.datasets import cifar100
from tests.testing import (
    BACKEND,
    JIT_COMPILE,
    assert_config_round_trip,
    compile_function,
    save_and_reload,
    softmax,
    value_and_gradient,
)


def _random_vectors(num_classes, dim, seed):
    return (
        np.random.default_rng(seed).normal(size=(num_classes, dim)).astype(np.float32)
    )


# Each case: (builder call, independent NumPy matrix).
def _ordinal_reference(num_classes, r):
    i, j = np.meshgrid(np.arange(num_classes), np.arange(num_classes), indexing="ij")
    return np.where(i == j, 1.0, float(r) ** np.abs(i - j))


def _embedding_reference(vectors, bound):
    vectors = np.asarray(vectors, np.float64)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    sim = np.clip(unit @ unit.T, 0.0, 1.0)
    out = np.maximum(0.0, sim - bound) / (1.0 - bound)
    np.fill_diagonal(out, 1.0)
    return out


def _hierarchy_reference(levels, values):
    levels = np.atleast_2d(levels)
    num_classes = levels.shape[1]
    out = np.zeros((num_classes, num_classes))
    for i in range(num_classes):
        for j in range(num_classes):
            if i == j:
                out[i, j] = 1.0
            else:
                shared = [v for lvl, v in zip(levels, values) if lvl[i] == lvl[j]]
                out[i, j] = max(shared, default=0.0)
    return out


CASES = {
    "ordinal-r0": (lambda: similarity.ordinal(5, 0.0), lambda: np.eye(5)),
    "ordinal-r0.5": (
        lambda: similarity.ordinal(6, 0.5),
        lambda: _ordinal_reference(6, 0.5),
    ),
    "ordinal-r0.9": (
        lambda: similarity.ordinal(40, 0.9),
        lambda: _ordinal_reference(40, 0.9),
    ),
    "embeddings-l0": (
        lambda: similarity.from_embeddings(_random_vectors(9, 4, 0)),
        lambda: _embedding_reference(_random_vectors(9, 4, 0), 0.0),
    ),
    "embeddings-l0.3": (
        lambda: similarity.from_embeddings(_random_vectors(12, 3, 1), 0.3),
        lambda: _embedding_reference(_random_vectors(12, 3, 1), 0.3),
    ),
    "embeddings-l0.3-keep-rows": (
        lambda: similarity.from_embeddings(
            _random_vectors(12, 3, 1), 0.3, keep_rows=True
        ),
        lambda: _embedding_reference(_random_vectors(12, 3, 1), 0.3),
    ),
    "hierarchy-1level": (
        lambda: similarity.from_hierarchy([0, 0, 1, 1, 1, 2], 0.4),
        lambda: _hierarchy_reference([0, 0, 1, 1, 1, 2], [0.4]),
    ),
    "hierarchy-2levels": (
        lambda: similarity.from_hierarchy(
            [[0, 0, 1, 1, 2, 2], [0, 0, 0, 0, 1, 1]], [0.6, 0.2]
        ),
        lambda: _hierarchy_reference(
            [[0, 0, 1, 1, 2, 2], [0, 0, 0, 0, 1, 1]], [0.6, 0.2]
        ),
    ),
    "matrix": (
        lambda: similarity.MatrixSimilarity([[1, 0.3, 0], [0.1, 1, 0.2], [0, 0.9, 1]]),
        lambda: np.array([[1, 0.3, 0], [0.1, 1, 0.2], [0, 0.9, 1]]),
    ),
    "sparse": (
        lambda: similarity.SparseSimilarity(
            [[1, 2], [0, 0], [1, 0]], [[0.5, 0.25], [0.7, 0.0], [0.1, 0.0]]
        ),
        lambda: np.array([[1, 0.5, 0.25], [0.7, 1, 0], [0, 0.1, 1]]),
    ),
}


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
    assert sim._use_dense_table() is dense_table  # the path the id names
    dense = np.asarray(sim)
    labels = np.arange(sim.num_classes, dtype=np.int32)[::-1].copy()
    classes = np.roll(labels, 1)
    logits = np.random.default_rng(0).normal(size=(sim.num_classes,) * 2)
    logits = logits.astype("float32")

    def outputs(labels, classes, logits):
        return (
            sim.rows(labels),
            sim.log_rows(labels),
            sim.pairs(labels, classes),
            sim.log_weighted_sum_exp(labels, logits),
            sim.weighted_sum(labels, ops.softmax(logits)),
        )

    rows, log_rows, pairs, log_sum, weighted = (
        ops.convert_to_numpy(x)
        for x in compile_function(outputs)(labels, classes, logits)
    )
    np.testing.assert_allclose(rows, dense[labels], atol=1e-6)
    with np.errstate(divide="ignore"):
        np.testing.assert_allclose(np.exp(log_rows), dense[labels], atol=1e-6)
    np.testing.assert_allclose(pairs, dense[labels, classes], atol=1e-6)
    # log(sum_c S[y, c] exp(z_c)) and sum_c S[y, c] p_c, in float64.
    expected = dense[labels].astype(np.float64) * np.exp(logits.astype(np.float64))
    np.testing.assert_allclose(log_sum, np.log(expected.sum(-1)), rtol=1e-5)
    np.testing.assert_allclose(
        weighted, (dense[labels] * softmax(logits)).sum(-1), rtol=1e-5
    )


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_config_round_trip_is_exact(case):
    sim = CASES[case][0]()
    rebuilt, _ = assert_config_round_trip(sim)
    np.testing.assert_array_equal(np.asarray(rebuilt), np.asarray(sim))


def test_ordinal_config_stays_small_for_many_classes():
    sim = similarity.ordinal(1000, 0.7)
    text = json.dumps(keras.saving.serialize_keras_object(sim))
    assert len(text) < 500, text
    assert np.asarray(sim).shape == (1000, 1000)


def test_hierarchy_config_is_linear_in_classes():
    sim = similarity.from_hierarchy(cifar100.FINE_TO_COARSE, 0.5)
    config = sim.get_config()
    assert len(config["ancestors"][0]) == 100 and config["similarities"] == [0.5]


def test_hand_computed_ordinal_values():
    # r = 0.5: 0.5 ** 1 = 0.5, 0.5 ** 2 = 0.25.
    assert np.asarray(similarity.ordinal(3, 0.5)).tolist() == [
        [1.0, 0.5, 0.25],
        [0.5, 1.0, 0.5],
        [0.25, 0.5, 1.0],
    ]


def test_lower_bound_hand_computed():
    # (0.8 - 0.5) / 0.5 = 0.6, (0.4 - 0.5) -> 0.
    s = similarity.lower_bound([[1.0, 0.8, 0.4], [0.8, 1.0, 0.6], [0.4, 0.6, 1.0]], 0.5)
    np.testing.assert_allclose(
        np.asarray(s), [[1.0, 0.6, 0.0], [0.6, 1.0, 0.2], [0.0, 0.2, 1.0]], atol=1e-7
    )


def test_lower_bound_near_one_keeps_only_the_diagonal():
    s = similarity.lower_bound(
        _embedding_reference(_random_vectors(7, 3, 5), 0.0), 0.999999
    )
    np.testing.assert_array_equal(np.asarray(s), np.eye(7, dtype=np.float32))


def test_embeddings_set_exact_unit_diagonal_and_clip_negative_cosines():
    # Parallel vectors of very different scale give a self-cosine that rounds
    # near 1; opposite vectors have cosine -1, clipped to 0.
    vectors = [[1e-3, 3e3], [-1e-3, -3e3], [3.0, 1.0]]
    matrix = np.asarray(similarity.from_embeddings(vectors))
    np.testing.assert_array_equal(np.diagonal(matrix), 1.0)
    assert matrix[0, 1] == 0.0 and matrix.max() <= 1.0


def test_cifar100_hierarchy_puts_rose_near_tulip_not_truck():
    names = cifar100.FINE_LABEL_NAMES
    s = np.asarray(similarity.from_hierarchy(cifar100.FINE_TO_COARSE, 0.5))
    assert s[names.index("rose"), names.index("tulip")] == 0.5
    assert s[names.index("rose"), names.index("pickup_truck")] == 0.0


def test_top_k_keeps_the_largest_neighbours():
    source = similarity.from_embeddings(_random_vectors(30, 5, 3), 0.1)
    dense = np.asarray(source)
    sparse = similarity.top_k(source, k=4)
    kept = np.asarray(sparse)
    for row in range(30):
        others = np.delete(dense[row], row)
        # The kept off-diagonal values are the 4 largest of the row.
        np.testing.assert_allclose(
            np.sort(np.delete(kept[row], row))[-4:], np.sort(others)[-4:], atol=1e-6
        )
    # Nothing is kept that is not in the source.
    assert np.all((kept == dense) | (kept == 0))


def test_top_k_from_matrix_drops_zero_similarities():
    sparse = similarity.top_k(np.eye(4), k=2)
    np.testing.assert_array_equal(sparse.values, 0.0)
    np.testing.assert_array_equal(np.asarray(sparse), np.eye(4))


def test_get_wraps_arrays_and_rejects_strings():
    assert isinstance(similarity.get(np.eye(3)), similarity.MatrixSimilarity)
    ordinal = similarity.ordinal(3, 0.2)
    assert similarity.get(ordinal) is ordinal
    with pytest.raises(TypeError, match="similarity"):
        similarity.get("ordinal")


BAD_MATRICES = {
    "not-square": (
        np.ones((2, 3)),
        r"Expected a square matrix.*Received: matrix.shape=\(2, 3\)",
    ),
    "one-class": (np.ones((1, 1)), r"C >= 2"),
    "not-finite": (
        np.array([[1.0, np.nan], [0.0, 1.0]]),
        r"finite.*matrix\[0, 1\]=nan",
    ),
    "above-one": (np.array([[1.0, 1.5], [0.0, 1.0]]), r"\[0, 1\].*matrix\[0, 1\]=1.5"),
    "negative": (np.array([[1.0, 0.0], [-0.1, 1.0]]), r"\[0, 1\].*matrix\[1, 0\]=-0.1"),
    "diagonal": (np.array([[1.0, 0.0], [0.0, 0.9]]), r"diagonal.*matrix\[1, 1\]=0.9"),
}


@pytest.mark.parametrize("case", list(BAD_MATRICES), ids=list(BAD_MATRICES))
def test_bad_matrix_is_rejected(case):
    matrix, message = BAD_MATRICES[case]
    with pytest.raises(ValueError, match=message):
        similarity.MatrixSimilarity(matrix)


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
            ValueError,
            r"integer ancestor ids",
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


# Every kind of similarity, on the dense-table path and on the on-the-fly path
# (threshold lowered on the instance: C = 6 > 2), as a model would use it.
def _fit_cases():
    num_classes = 6
    vectors = _random_vectors(num_classes, 4, 7)
    builders = {
        "ordinal": lambda: similarity.ordinal(num_classes, 0.5),
        "embeddings": lambda: similarity.from_embeddings(vectors, 0.1),
        "hierarchy": lambda: similarity.from_hierarchy([0, 0, 1, 1, 2, 2], 0.4),
        "matrix": lambda: similarity.MatrixSimilarity(
            _ordinal_reference(num_classes, 0.3)
        ),
        "sparse": lambda: similarity.SparseSimilarity(
            (np.arange(num_classes)[:, None] + np.array([[1, 2]])) % num_classes,
            np.full((num_classes, 2), 0.5),
        ),
    }
    cases = {}
    for kind, build in builders.items():
        if kind in ("ordinal", "embeddings", "hierarchy"):
            cases[f"{kind}-table"] = (build, True)
            cases[f"{kind}-on-the-fly"] = (build, False)
        else:
            cases[kind] = (build, kind == "matrix")
    return cases


FIT_CASES = _fit_cases()
JIT_MODES = [False, True] if JIT_COMPILE else [False]


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
    assert sim._use_dense_table() is dense_table  # the path the id names
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


@pytest.mark.parametrize("batch_size", [-1, 0, 2.5, True], ids=str)
def test_top_k_rejects_bad_batch_size(batch_size):
    with pytest.raises((ValueError, TypeError), match=r"`batch_size`.*batch_size="):
        similarity.top_k(similarity.ordinal(4, 0.5), k=1, batch_size=batch_size)


@pytest.mark.parametrize(
    "indices, values, error, message",
    [
        ([[1], [0]], [["0.5"], ["0.5"]], TypeError, r"`values`.*dtype"),
        ([[1], [0]], [["a"], ["b"]], TypeError, r"`values`.*dtype"),
        ([["1"], ["0"]], [[0.5], [0.5]], TypeError, r"`indices`.*dtype"),
        ([[1], [0]], [[0.5 + 1j], [0.5]], TypeError, r"`values`.*dtype"),
        ([[1], [0]], [[np.nan], [0.5]], ValueError, r"values\[0, 0\]=nan"),
        ([[1], [0]], [[0.5], [-np.inf]], ValueError, r"values\[1, 0\]=-inf"),
    ],
    ids=["numeric-strings", "strings", "string-indices", "complex", "nan", "inf"],
)
def test_sparse_rejects_non_numeric_and_names_the_bad_value(
    indices, values, error, message
):
    with pytest.raises(error, match=message):
        similarity.SparseSimilarity(indices, values)


@pytest.mark.parametrize(
    "matrix",
    [
        np.array([[1.0, 0.5j], [0.5, 1.0]]),
        [["1", "0.5"], ["0.5", "1"]],
        np.array([[1.0, 0.5], [0.5, 1.0]], dtype=object),
    ],
    ids=["complex", "numeric-strings", "object"],
)
def test_matrix_must_hold_real_numbers(matrix):
    with pytest.raises(TypeError, match=r"`matrix`.*real numbers"):
        similarity.MatrixSimilarity(matrix)


@pytest.mark.parametrize("scale", [1e19, 1e-19, 1e30, 1e-30], ids=str)
@pytest.mark.parametrize("dense_table", [True, False], ids=["table", "on-the-fly"])
def test_embedding_rows_are_scale_invariant(scale, dense_table):
    # Cosines do not depend on the vectors' scale; in float32, raw dot
    # products of 1e19-scaled vectors overflow and of 1e-19-scaled ones
    # underflow, so the vectors must be normalised first.
    vectors = _random_vectors(8, 5, 11)
    sim = similarity.EmbeddingSimilarity(vectors * scale, 0.2)
    if not dense_table:
        sim.dense_table_max_classes = 2
    assert sim._use_dense_table() is dense_table
    expected = _embedding_reference(vectors, 0.2)
    labels = np.arange(8, dtype="int32")
    np.testing.assert_allclose(
        ops.convert_to_numpy(sim.rows(labels)), expected, atol=1e-5
    )
    classes = np.roll(labels, 3)
    np.testing.assert_allclose(
        ops.convert_to_numpy(sim.pairs(labels, classes)),
        expected[labels, classes],
        atol=1e-5,
    )
    np.testing.assert_allclose(np.asarray(sim), expected, atol=1e-6)


def _value_and_gradient(function, x, compiled):
    """`value_and_gradient`, optionally inside one XLA-compiled function."""
    if not compiled:
        return value_and_gradient(function, x)
    x = np.asarray(x, np.float32)
    if keras.config.backend() == "tensorflow":
        import tensorflow as tf

        @tf.function(jit_compile=True)
        def step(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                value = function(x)
            return value, tape.gradient(value, x)

        value, gradient = step(tf.constant(x))
        return value.numpy(), gradient.numpy()
    import jax

    value, gradient = jax.jit(jax.value_and_grad(function))(x)
    return np.asarray(value), np.asarray(gradient)


GRADIENT_CASES = [
    (case, dense_table)
    for case in CASES
    for dense_table in (True, False)
    if not (case == "matrix" and not dense_table)
    and not (case == "sparse" and dense_table)
]
COMPILED = [False, True] if JIT_COMPILE else [False]


@pytest.mark.parametrize("closed_form", [False, True], ids=["autodiff", "closed-form"])
@pytest.mark.parametrize("compiled", COMPILED, ids=lambda c: f"compiled={c}")
@pytest.mark.parametrize(
    "case, dense_table",
    GRADIENT_CASES,
    ids=[f"{c}-{'table' if t else 'on-the-fly'}" for c, t in GRADIENT_CASES],
)
def test_gradients_match_closed_form_and_finite_differences(
    case, dense_table, compiled, closed_form
):
    from keras_simloss import sim_loss

    sim = CASES[case][0]()
    assert sim._closed_form_gradient  # the default, for every kind
    sim._closed_form_gradient = closed_form
    if not dense_table and not isinstance(sim, similarity.SparseSimilarity):
        sim.dense_table_max_classes = 1
    assert sim._use_dense_table() is dense_table
    matrix = np.asarray(sim, np.float64)
    num_classes = sim.num_classes
    rng = np.random.default_rng(3)
    labels = rng.integers(0, num_classes, size=5).astype("int32")
    logits = rng.normal(scale=2.0, size=(5, num_classes)).astype("float32")
    # The gradient of a weighted sum over examples.
    upstream = rng.uniform(0.5, 2.0, size=5)
    weights = ops.convert_to_tensor(upstream, "float32")

    def log_sum(z):
        return ops.sum(sim.log_weighted_sum_exp(labels, z) * weights)

    # d/dz log(sum_c S[y, c] e^{z_c}) = q, q_c = S[y, c] e^{z_c} / sum.
    weighted = matrix[labels] * np.exp(logits.astype(np.float64))
    q = weighted / weighted.sum(-1, keepdims=True)
    value, gradient = _value_and_gradient(log_sum, logits, compiled)
    np.testing.assert_allclose(
        value, np.sum(np.log(weighted.sum(-1)) * upstream), rtol=1e-5
    )
    np.testing.assert_allclose(gradient, q * upstream[:, None], atol=1e-5)

    # SimLoss from logits: d/dz = softmax(z) - q (per example), as for cross
    # entropy with q in place of the one-hot label.
    def loss_from_logits(z):
        return ops.sum(sim_loss(labels, z, sim, from_logits=True) * weights)

    _, gradient = _value_and_gradient(loss_from_logits, logits, compiled)
    np.testing.assert_allclose(
        gradient, (softmax(logits) - q) * upstream[:, None], atol=1e-5
    )

    # d/dp sum_c S[y, c] p_c = S[y].
    probabilities = softmax(logits).astype("float32")

    def weighted_sum(p):
        return ops.sum(sim.weighted_sum(labels, p) * weights)

    value, gradient = _value_and_gradient(weighted_sum, probabilities, compiled)
    np.testing.assert_allclose(
        value, np.sum((matrix[labels] * probabilities).sum(-1) * upstream), rtol=1e-5
    )
    np.testing.assert_allclose(gradient, matrix[labels] * upstream[:, None], atol=1e-6)

    # SimLoss from probabilities against central finite differences (float64
    # NumPy reference of the same clipped and renormalised formula).
    def reference(p):
        p = np.clip(p, 1e-7, 1 - 1e-7)
        return np.sum(
            (np.log(p.sum(-1)) - np.log((matrix[labels] * p).sum(-1))) * upstream
        )

    def loss_from_probabilities(p):
        return ops.sum(sim_loss(labels, p, sim) * weights)

    _, gradient = _value_and_gradient(loss_from_probabilities, probabilities, compiled)
    numeric = np.zeros_like(probabilities, np.float64)
    base = probabilities.astype(np.float64)
    for index in np.ndindex(*probabilities.shape):
        step = 1e-3 * base[index]  # relative: some probabilities are tiny
        shifted = base.copy()
        shifted[index] += step
        up = reference(shifted)
        shifted[index] -= 2 * step
        numeric[index] = (up - reference(shifted)) / (2 * step)
    np.testing.assert_allclose(gradient, numeric, rtol=1e-3, atol=1e-3)


MEMORY_CASES = {
    "table": lambda c: similarity.ordinal(c, 0.5),
    "ordinal": lambda c: similarity.ordinal(c, 0.5),
    "embeddings": lambda c: similarity.from_embeddings(_random_vectors(c, 8, 0), 0.2),
    "hierarchy": lambda c: similarity.from_hierarchy(np.arange(c) // 8, 0.5),
    "sparse": lambda c: similarity.SparseSimilarity(
        (np.arange(c)[:, None] + np.arange(1, 4)[None, :]) % c, np.full((c, 3), 0.5)
    ),
}


@pytest.mark.skipif(BACKEND != "jax", reason="XLA memory analysis through JAX")
@pytest.mark.parametrize("case", list(MEMORY_CASES))
def test_training_step_holds_no_more_batch_by_class_buffers_than_cross_entropy(case):
    # XLA's buffer assignment is deterministic: the temporary memory of the
    # compiled value-and-gradient of the loss alone, in units of one
    # (batch, C) float32 buffer. On JAX this tells the closed form from
    # automatic differentiation only; the scheduling details (`_after`,
    # recomputed rows) are checked on TensorFlow in test_losses.py, where a
    # whole compiled training step shows them.
    import jax

    from keras_simloss import sim_loss

    num_classes = 512 if case == "table" else 4096
    sim = MEMORY_CASES[case](num_classes)
    if case == "table":
        assert sim._use_dense_table()
    else:
        sim.dense_table_max_classes = 1
    rng = np.random.default_rng(0)
    logits = jax.numpy.asarray(rng.normal(size=(64, num_classes)), "float32")
    labels = jax.numpy.asarray(rng.integers(0, num_classes, 64), "int32")

    def buffers(loss):
        compiled = jax.jit(jax.value_and_grad(lambda z: jax.numpy.sum(loss(z))))
        memory = compiled.lower(logits).compile().memory_analysis()
        return memory.temp_size_in_bytes / logits.nbytes

    cross_entropy = buffers(
        lambda z: keras.losses.sparse_categorical_crossentropy(labels, z, True)
    )
    closed_form = buffers(lambda z: sim_loss(labels, z, sim, from_logits=True))
    sim._closed_form_gradient = False
    autodiff = buffers(lambda z: sim_loss(labels, z, sim, from_logits=True))
    assert cross_entropy >= 1  # the reference does hold (batch, C) buffers
    assert closed_form <= cross_entropy, (closed_form, cross_entropy)
    if case != "sparse":  # sparse terms are (batch, k + 1) either way
        assert closed_form < autodiff, (closed_form, autodiff)


@pytest.mark.parametrize("case", ["sparse", "ordinal-r0.5"])
def test_weighted_sum_gradient_ignores_a_nan_elsewhere_in_the_row(case):
    # d/dp sum_c S[y, c] p_c = S[y] whatever p holds: a NaN probability in
    # the row makes the value NaN, not the other gradient entries wrong.
    sim = CASES[case][0]()
    matrix = np.asarray(sim, np.float64)
    probabilities = np.full((2, sim.num_classes), 0.2, np.float32)
    probabilities[0, -1] = np.nan
    labels = np.array([2, 1])
    value, gradient = value_and_gradient(
        lambda p: ops.sum(sim.weighted_sum(labels, p)), probabilities
    )
    assert np.isnan(value)
    np.testing.assert_allclose(gradient, matrix[labels], rtol=1e-6)


@pytest.mark.parametrize("keep_rows", [False, True])
def test_keep_rows_decides_whether_the_backward_pass_computes_rows(keep_rows):
    sim = similarity.from_embeddings(_random_vectors(12, 3, 1), keep_rows=keep_rows)
    sim.dense_table_max_classes = 1  # rows on the fly
    calls = []
    compute_rows = sim._compute_rows
    sim._compute_rows = lambda labels: calls.append(1) or compute_rows(labels)
    logits = np.random.default_rng(0).normal(size=(4, 12)).astype("float32")
    value_and_gradient(
        lambda z: ops.sum(sim.logit_loss(np.array([0, 3, 5, 11]), z)), logits
    )
    assert len(calls) == (1 if keep_rows else 2)


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


def _top_k_reference(sim, k):
    """The former `top_k`: full stable sort of every dense row."""
    dense = np.asarray(sim, np.float32).copy()
    np.fill_diagonal(dense, -1.0)
    order = np.argsort(-dense, axis=1, kind="stable")[:, :k]
    values = np.maximum(np.take_along_axis(dense, order, axis=1), 0.0)
    return similarity.SparseSimilarity(order, values)


def _top_k_cases():
    rng = np.random.default_rng(5)
    vectors = rng.normal(size=(2000, 16)).astype(np.float32)
    tied = vectors.copy()
    tied[1::7] = tied[0]  # exact duplicates: equal cosines to everything
    tied[2::11] = 3.0 * tied[5]  # parallel vectors, same cosines
    matrix = rng.choice([0.0, 0.25, 0.5], size=(300, 300)).astype(np.float32)
    matrix = np.maximum(matrix, matrix.T)
    np.fill_diagonal(matrix, 1.0)
    return {
        "embeddings-C2000": lambda: similarity.from_embeddings(vectors),
        "embeddings-C2000-l0.3": lambda: similarity.from_embeddings(vectors, 0.3),
        "embeddings-ties": lambda: similarity.from_embeddings(tied, 0.1),
        "ordinal": lambda: similarity.ordinal(500, 0.6),
        "ordinal-underflow": lambda: similarity.ordinal(500, 0.01),
        "hierarchy": lambda: similarity.from_hierarchy(
            [np.arange(600) // 4, np.arange(600) // 40], [0.6, 0.2]
        ),
        "matrix-many-ties": lambda: similarity.MatrixSimilarity(matrix),
        "sparse": lambda: CASES["sparse"][0](),
    }


TOP_K_CASES = _top_k_cases()


@pytest.mark.parametrize("batch_size", [None, 97], ids=["auto", "97"])
@pytest.mark.parametrize("case", list(TOP_K_CASES), ids=list(TOP_K_CASES))
def test_top_k_is_exact_against_the_full_sort(case, batch_size):
    sim = TOP_K_CASES[case]()
    for k in sorted({1, 2, min(10, sim.num_classes - 1)}):
        expected = _top_k_reference(sim, k)
        result = similarity.top_k(sim, k, batch_size=batch_size)
        np.testing.assert_array_equal(result.indices, expected.indices)
        np.testing.assert_array_equal(result.values, expected.values)


def test_top_k_ties_go_to_the_smaller_index():
    # Classes 1, 2 and 3 are all 0.5 from class 0; k = 2 keeps 1 and 2.
    matrix = np.eye(4)
    matrix[0, 1:] = matrix[1:, 0] = 0.5
    result = similarity.top_k(matrix, k=2)
    assert result.indices[0].tolist() == [1, 2]
    # Embeddings: class 3 duplicates class 1, so both are equally close to 0.
    vectors = [[1.0, 0.2], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]
    result = similarity.top_k(similarity.from_embeddings(vectors), k=1)
    assert result.indices[0].tolist() == [1]
    assert result.indices[2].tolist() == [0]  # cos 0.196 beats 0, 0


ARCHIVE_CASES = {
    "ordinal": (lambda: similarity.ordinal(6, 0.5), False),
    "hierarchy": (lambda: similarity.from_hierarchy([0, 0, 1, 1, 2, 2], 0.4), False),
    "embeddings": (lambda: similarity.from_embeddings(_random_vectors(6, 4, 2)), True),
    "matrix": (
        lambda: similarity.MatrixSimilarity(_ordinal_reference(6, 0.3)),
        True,
    ),
    "sparse": (lambda: FIT_CASES["sparse"][0](), True),
}


@pytest.mark.parametrize("case", list(ARCHIVE_CASES), ids=list(ARCHIVE_CASES))
def test_keras_file_keeps_large_state_as_binary_arrays(case, tmp_path, monkeypatch):
    import zipfile

    from keras_simloss import MistakeSeverity, SimLoss

    # Lowered so that these 6-class similarities count as large.
    monkeypatch.setattr(similarity.Similarity, "config_max_entries", 4)
    build, archived = ARCHIVE_CASES[case]
    sim = build()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 3)).astype("float32")
    y = rng.integers(0, 6, size=16).astype("int32")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(6)])
    model.compile(
        optimizer="adam",
        loss=SimLoss(sim, from_logits=True),
        metrics=[MistakeSeverity(sim)],
    )
    model.fit(x, y, epochs=1, verbose=0)
    expected = model.evaluate(x, y, verbose=0)
    path = str(tmp_path / "model.keras")
    model.save(path)
    with zipfile.ZipFile(path) as archive:
        config = json.loads(archive.read("config.json"))
    saved = config["compile_config"]["loss"]["config"]["similarity"]["config"]
    assert ("arrays_in_archive" in saved) is archived
    if archived:
        for name in type(sim)._array_arguments:
            assert set(saved[name]) == {"shape", "dtype"}  # no numbers
    # A new process has none of the original objects: drop them.
    del model, sim
    import gc

    gc.collect()
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(loaded.evaluate(x, y, verbose=0), expected)
    matrix = np.asarray(build(), np.float64)
    np.testing.assert_array_equal(np.asarray(loaded.loss.similarity), matrix)


def test_large_config_is_small_whatever_the_number_of_classes():
    vectors = _random_vectors(5000, 300, 0)
    sim = similarity.from_embeddings(vectors)
    text = json.dumps(keras.saving.serialize_keras_object(sim))
    assert len(text) < 1000, text
    neighbours = similarity.SparseSimilarity(
        (np.arange(5000)[:, None] + np.arange(1, 11)) % 5000,
        np.full((5000, 10), 0.5),
    )
    assert len(json.dumps(keras.saving.serialize_keras_object(neighbours))) < 1000


def test_old_list_configs_still_load():
    vectors = _random_vectors(40, 8, 1)
    old = {
        "module": "keras_simloss.similarity",
        "class_name": "EmbeddingSimilarity",
        "config": {"vectors": vectors.tolist(), "lower_bound": 0.2},
        "registered_name": "keras_simloss>EmbeddingSimilarity",
    }
    rebuilt = similarity.get(old)
    np.testing.assert_array_equal(
        np.asarray(rebuilt), np.asarray(similarity.from_embeddings(vectors, 0.2))
    )
    assert rebuilt.keep_rows is False  # saved before the argument existed


@pytest.mark.parametrize("keep_rows", [False, True])
def test_keep_rows_is_saved_with_the_model(tmp_path, keep_rows):
    from keras_simloss import SimLoss

    vectors = _random_vectors(100, 4, 2)  # 400 numbers: the archive path
    sim = similarity.from_embeddings(vectors, 0.1, keep_rows=keep_rows)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(100)])
    model.compile(loss=SimLoss(sim, from_logits=True))
    x = np.random.default_rng(0).normal(size=(8, 3)).astype("float32")
    y = np.arange(8) * 11
    model.train_on_batch(x, y)  # the optimizer's state exists, as after fit
    loaded = save_and_reload(model, tmp_path)
    assert loaded.loss.similarity.keep_rows is keep_rows
    assert float(loaded.evaluate(x, y, verbose=0)) == float(
        model.evaluate(x, y, verbose=0)
    )


def test_config_without_its_archive_says_what_is_missing():
    sim = similarity.from_embeddings(_random_vectors(40, 8, 3))
    config = json.loads(json.dumps(keras.saving.serialize_keras_object(sim)))
    config["config"]["arrays_in_archive"] = "0" * 32  # no similarity has these
    orphan = similarity.get(config)
    assert orphan.num_classes == 40 and "40" in repr(orphan)
    with pytest.raises(ValueError, match=r"arrays are stored in a `.keras` archive"):
        np.asarray(orphan)
    # Within one process, a live similarity with the same arrays fills in.
    twin = similarity.get(keras.saving.serialize_keras_object(sim))
    np.testing.assert_array_equal(np.asarray(twin), np.asarray(sim))
