"""`Similarity.expected`, `decode_min_risk` and `MinRiskDecoding` against
NumPy's `p @ S` and its argmax."""

import keras
import numpy as np
import pytest

from keras_simloss import MinRiskDecoding, decode_min_risk, similarity
from tests.similarity.cases import CASES, hierarchy_reference, random_vectors
from tests.testing import (
    JIT_COMPILE,
    assert_config_round_trip,
    compile_function,
    save_and_reload,
    softmax,
    to_numpy,
)

COMPILED = [False, True] if JIT_COMPILE else [False]

# Hierarchies beyond CASES: a tree whose similarities do not fall with the
# level (the nearer level's value is the smaller), and levels that do not nest
# (no tree: the rows are read in blocks).
LEVELS_TREE = [[0, 0, 1, 1, 2, 2, 3], [0, 0, 0, 0, 1, 1, 1], [0] * 7]
LEVELS_NOT_NESTED = [[0, 0, 1, 1, 2, 2, 3], [0, 1, 1, 2, 2, 0, 0]]
EXTRA = {
    "tree-rising": (
        lambda: similarity.from_hierarchy(LEVELS_TREE, [0.2, 0.5, 0.1]),
        lambda: hierarchy_reference(LEVELS_TREE, [0.2, 0.5, 0.1]),
    ),
    "not-nested": (
        lambda: similarity.from_hierarchy(LEVELS_NOT_NESTED, [0.6, 0.3]),
        lambda: hierarchy_reference(LEVELS_NOT_NESTED, [0.6, 0.3]),
    ),
}
ALL = {**CASES, **EXTRA}


def _probabilities(num_classes, n=9, seed=0):
    rng = np.random.default_rng(seed)
    return softmax(3.0 * rng.normal(size=(n, num_classes))).astype(np.float32)


@pytest.mark.parametrize("compiled", COMPILED, ids=lambda c: f"compiled={c}")
@pytest.mark.parametrize("dense_table", [True, False], ids=["table", "on-the-fly"])
@pytest.mark.parametrize("case", sorted(ALL))
def test_expected_similarity_is_p_times_s(case, dense_table, compiled):
    build, reference = ALL[case]
    sim = build()
    sim.dense_table_max_classes = 10**6 if dense_table else 0
    p = _probabilities(sim.num_classes)
    function = compile_function(sim.expected) if compiled else sim.expected
    np.testing.assert_allclose(
        to_numpy(function(p)), p.astype(np.float64) @ reference(), atol=1e-6
    )


@pytest.mark.large
def test_expected_similarity_without_a_table_at_3000_classes():
    num_classes = 3000
    vectors = random_vectors(num_classes, 6, 2)
    codes = np.arange(num_classes)
    kinds = {
        "ordinal": similarity.ordinal(num_classes, 0.95),
        "embeddings": similarity.from_embeddings(vectors, 0.1),
        "tree": similarity.from_hierarchy([codes // 10, codes // 300], [0.6, 0.2]),
        "sparse": similarity.top_k(similarity.from_embeddings(vectors), 4),
    }
    p = _probabilities(num_classes, n=5)
    for kind, sim in kinds.items():
        assert not sim.uses_dense_table
        matrix = np.asarray(sim, np.float64)  # NumPy rows, built independently
        got = to_numpy(compile_function(sim.expected)(p))
        np.testing.assert_allclose(got, p @ matrix, rtol=1e-5, atol=1e-7, err_msg=kind)


@pytest.mark.parametrize("hub", [False, True], ids=["few-listers", "hub"])
def test_sparse_expected_similarity_with_and_without_a_hub(hub):
    # Without a hub the lists are turned around and gathered; a class listed
    # by every other one (more than 64 listers) is scattered slot by slot.
    num_classes = 100
    classes = np.arange(num_classes)
    indices = np.stack([(classes + 1) % num_classes, (classes + 2) % num_classes], 1)
    if hub:
        indices[1 : num_classes - 1, 1] = 0
    values = np.random.default_rng(8).uniform(0.1, 0.9, size=indices.shape)
    sim = similarity.SparseSimilarity(indices, values)
    reference = np.eye(num_classes)
    for c in classes:
        reference[c, indices[c]] = values[c]
    p = _probabilities(num_classes, n=4)
    got = to_numpy(compile_function(sim.expected)(p))
    np.testing.assert_allclose(got, p.astype(np.float64) @ reference, atol=1e-6)
    assert (sim._incoming_arrays is None) == hub


@pytest.mark.skipif(
    keras.config.backend() != "jax", reason="XLA memory analysis through JAX"
)
def test_sparse_expected_memory_with_a_hub_does_not_grow_with_the_slots():
    # XLA's buffer assignment is deterministic. In units of one (batch, C)
    # float32 buffer: the scatter-adds of a hub's lists, one slot at a
    # time, hold as much with 12 slots as with 2, about 2 buffers (unrolled,
    # XLA held every slot's update at once: 12 buffers for 12 slots).
    import jax

    num_classes, batch = 2000, 64
    classes = np.arange(num_classes)
    rng = np.random.default_rng(3)

    def buffers(slots):
        offsets = rng.choice(np.arange(1, num_classes), size=slots, replace=False)
        indices = (classes[:, None] + offsets) % num_classes
        # Slot 0 of every class that does not list class 0 yet: class 0.
        listed = np.any(indices == 0, axis=1)
        indices[~listed & (classes > 0), 0] = 0
        values = rng.uniform(0.1, 0.9, size=indices.shape)
        sim = similarity.SparseSimilarity(indices, values)
        p = jax.ShapeDtypeStruct((batch, num_classes), "float32")
        compiled = jax.jit(sim.expected).lower(p).compile()
        assert sim._incoming_arrays is None  # class 0 is a hub
        return compiled.memory_analysis().temp_size_in_bytes / (batch * num_classes * 4)

    few, many = buffers(2), buffers(12)
    assert many <= few + 0.5, (few, many)
    assert many <= 4, many


@pytest.mark.parametrize("from_logits", [True, False], ids=["logits", "probs"])
@pytest.mark.parametrize("case", sorted(ALL))
def test_decode_min_risk_is_the_argmax_of_expected_similarity(case, from_logits):
    build, reference = ALL[case]
    sim = build()
    logits = 2.0 * np.random.default_rng(1).normal(size=(2, 6, sim.num_classes))
    logits = logits.astype(np.float32)
    y_pred = logits if from_logits else softmax(logits).astype(np.float32)
    expected = np.argmax(softmax(logits) @ reference(), axis=-1)
    got = to_numpy(decode_min_risk(y_pred, sim, from_logits=from_logits))
    assert got.shape == (2, 6) and got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)


def test_with_the_identity_it_is_keras_argmax():
    p = _probabilities(5, n=20, seed=3)
    got = to_numpy(decode_min_risk(p, np.eye(5)))
    np.testing.assert_array_equal(got, to_numpy(keras.ops.argmax(p, axis=-1)))


def test_it_differs_from_argmax_where_the_mass_lies_elsewhere():
    # argmax says 0; classes 2 and 3 together hold more nearby mass.
    p = np.array([[0.4, 0.0, 0.3, 0.3]], np.float32)
    sim = similarity.ordinal(4, 0.5)
    assert to_numpy(decode_min_risk(p, sim)).tolist() == [2.0]


@pytest.mark.parametrize("compiled", COMPILED, ids=lambda c: f"compiled={c}")
def test_unreadable_rows_give_nan_never_a_class(compiled):
    sim = similarity.ordinal(4, 0.5)
    p = np.array(
        [[0.1, np.nan, 0.4, 0.5], [0, 0, 0, 0], [0.1, 0.2, 0.3, 0.4]], np.float32
    )
    function = lambda x: decode_min_risk(x, sim)  # noqa: E731
    if compiled:
        function = compile_function(function)
    got = to_numpy(function(p))
    # Row 2: class 2 scores 0.025 + 0.1 + 0.3 + 0.2 = 0.625, class 3
    # 0.0125 + 0.05 + 0.15 + 0.4 = 0.6125.
    assert np.isnan(got[0]) and np.isnan(got[1]) and got[2] == 2.0
    logits = np.array([[2.0, -1.0, 0.5, 0.0]], np.float32)
    if compiled:  # logits read as probabilities: NaN, as nothing can be raised
        assert np.isnan(to_numpy(function(logits))[0])
    else:
        with pytest.raises(ValueError, match="from_logits=True"):
            decode_min_risk(logits, sim)


def test_bad_arguments_are_refused_by_name():
    sim = similarity.ordinal(4, 0.5)
    with pytest.raises(ValueError, match="similarity over 4 classes.*5 classes"):
        decode_min_risk(np.full((1, 5), 0.2), sim)
    with pytest.raises(TypeError, match="`from_logits`"):
        decode_min_risk(np.full((1, 4), 0.25), sim, from_logits="False")
    with pytest.raises(TypeError, match="`similarity`"):
        decode_min_risk(np.full((1, 4), 0.25), None)


def test_a_kind_that_is_not_symmetric_must_say_how():
    class OneWay(similarity.Similarity):
        num_classes = 3

        def _compute_rows(self, labels):
            return keras.ops.one_hot(labels, 3)

        def numpy_rows(self, classes):
            return np.eye(3, dtype=np.float32)[classes]

        def _arguments(self):
            return {}

    sim = OneWay()
    sim.dense_table_max_classes = 0
    with pytest.raises(NotImplementedError, match="_compute_expected"):
        sim.expected(np.full((1, 3), 1 / 3, np.float32))


def test_the_layer_saves_and_reloads_with_an_archived_similarity(tmp_path):
    vectors = random_vectors(300, 5, 4)  # over 256 entries: archived
    sim = similarity.from_embeddings(vectors, 0.2)
    layer = MinRiskDecoding(sim, from_logits=True)
    rebuilt, _ = assert_config_round_trip(MinRiskDecoding(similarity.ordinal(6, 0.4)))
    assert rebuilt.similarity.num_classes == 6 and not rebuilt.from_logits
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(300, name="scores"), layer]
    )
    x = np.random.default_rng(5).normal(size=(8, 3)).astype(np.float32)
    got = model.predict(x, verbose=0)
    scores = model.get_layer("scores")(x)
    np.testing.assert_array_equal(got, to_numpy(decode_min_risk(scores, sim, True)))
    reloaded = save_and_reload(model, tmp_path)
    np.testing.assert_array_equal(reloaded.predict(x, verbose=0), got)
    with pytest.raises(ValueError, match="similarity over 300 classes"):
        keras.Sequential([keras.Input((4,)), MinRiskDecoding(sim)])
