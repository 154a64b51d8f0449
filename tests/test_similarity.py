import json

import keras
import numpy as np
import pytest
from keras import ops

from keras_simloss import similarity
from keras_simloss.datasets import cifar100
from tests.testing import JIT_COMPILE, assert_config_round_trip, softmax


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


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_rows_and_pairs_in_graph_match_dense(case):
    sim = CASES[case][0]()
    dense = np.asarray(sim)
    labels = np.arange(sim.num_classes, dtype=np.int32)[::-1].copy()
    classes = np.roll(labels, 1)
    np.testing.assert_allclose(
        ops.convert_to_numpy(sim.rows(labels)), dense[labels], atol=1e-6
    )
    np.testing.assert_allclose(
        ops.convert_to_numpy(sim.pairs(labels, classes)),
        dense[labels, classes],
        atol=1e-6,
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
