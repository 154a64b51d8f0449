"""`SoftLabelCrossEntropy` against NumPy and Keras's own cross entropies."""

import keras
import numpy as np
import pytest

from keras_simloss import SoftLabelCrossEntropy, similarity, soft_label_cross_entropy
from tests.similarity.cases import CASES
from tests.testing import (
    BACKEND,
    JIT_COMPILE,
    assert_config_round_trip,
    compile_function,
    labelled_logits,
    save_and_reload,
    softmax,
    to_numpy,
    value_and_gradient,
)

EPSILON = 1e-7
# The full grid of beta on TensorFlow; one value on the other backends, whose
# share of the suite is the backend's numerics, not the formula's cases.
BETAS = [0.0, 3.0, 40.0] if BACKEND == "tensorflow" else [3.0]


def targets(matrix, labels, beta):
    """`softmax(beta * S[y])` in float64."""
    rows = beta * np.asarray(matrix, np.float64)[labels]
    q = np.exp(rows - rows.max(axis=-1, keepdims=True))
    return q / q.sum(axis=-1, keepdims=True)


def numpy_loss(matrix, labels, y_pred, beta, from_logits):
    """Per-example loss and gradient in float64, written out independently."""
    q = targets(matrix, labels, beta)
    if from_logits:
        p = softmax(y_pred)
        return -(q * np.log(p)).sum(-1), p - q
    clipped = np.clip(np.asarray(y_pred, np.float64), EPSILON, 1 - EPSILON)
    total = clipped.sum(-1, keepdims=True)
    inside = (y_pred >= EPSILON) & (y_pred <= 1 - EPSILON)
    gradient = np.where(inside, 1 / total - q / clipped, 0.0)
    return -(q * np.log(clipped / total)).sum(-1), gradient


def _inputs(num_classes, from_logits, seed=0):
    labels, logits, _ = labelled_logits(seed, num_classes, 7)
    if from_logits:
        return labels, logits
    p = softmax(logits).astype(np.float32)
    p[0, 0] = 0.0  # held by the clip: no gradient there
    return labels, p


@pytest.mark.parametrize("dense_table", [True, False], ids=["table", "on-the-fly"])
@pytest.mark.parametrize("from_logits", [True, False], ids=["logits", "probs"])
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_value_and_gradient_match_numpy(case, beta, from_logits, dense_table):
    build, reference = CASES[case]
    sim = build()
    sim.dense_table_max_classes = 10**6 if dense_table else 0
    labels, y_pred = _inputs(sim.num_classes, from_logits)
    expected, expected_gradient = numpy_loss(
        reference(), labels, y_pred, beta, from_logits
    )
    scale = np.arange(1.0, len(labels) + 1.0)

    def weighted(x):
        loss = soft_label_cross_entropy(labels, x, sim, beta, from_logits)
        return keras.ops.sum(loss * keras.ops.convert_to_tensor(scale, "float32"))

    got = to_numpy(soft_label_cross_entropy(labels, y_pred, sim, beta, from_logits))
    np.testing.assert_allclose(got, expected, rtol=2e-6, atol=2e-6)
    _, gradient = value_and_gradient(weighted, y_pred)
    np.testing.assert_allclose(
        gradient, expected_gradient * scale[:, None], rtol=1e-4, atol=1e-5
    )


def test_large_beta_is_keras_sparse_cross_entropy_and_zero_beta_uniform():
    labels, logits, _ = labelled_logits(1, 6, 9)
    sim = similarity.ordinal(6, 0.5)
    sharp = to_numpy(soft_label_cross_entropy(labels, logits, sim, 200.0, True))
    keras_scce = keras.losses.sparse_categorical_crossentropy(
        labels, logits, from_logits=True
    )
    np.testing.assert_allclose(sharp, to_numpy(keras_scce), rtol=1e-5, atol=1e-5)
    flat = to_numpy(soft_label_cross_entropy(labels, logits, sim, 0.0, True))
    uniform = keras.losses.categorical_crossentropy(
        np.full((9, 6), 1 / 6), logits, from_logits=True
    )
    np.testing.assert_allclose(flat, to_numpy(uniform), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reduction", ["sum_over_batch_size", "sum", None])
def test_weights_and_reductions_match_keras_on_the_same_soft_targets(reduction):
    labels, logits, weights = labelled_logits(2, 5, 8)
    sim = similarity.from_hierarchy([0, 0, 1, 1, 2], 0.6)
    loss = SoftLabelCrossEntropy(sim, beta=4.0, from_logits=True, reduction=reduction)
    keras_loss = keras.losses.CategoricalCrossentropy(
        from_logits=True, reduction=reduction
    )
    q = targets(np.asarray(sim), labels, 4.0).astype(np.float32)
    np.testing.assert_allclose(
        to_numpy(loss(labels, logits, sample_weight=weights)),
        to_numpy(keras_loss(q, logits, sample_weight=weights)),
        rtol=1e-5,
    )
    # Sequences: (batch, time, C) with per-step weights.
    y3, z3 = labels.reshape(2, 4), logits.reshape(2, 4, 5)
    w3 = weights.reshape(2, 4)
    np.testing.assert_allclose(
        to_numpy(loss(y3, z3, sample_weight=w3)),
        to_numpy(keras_loss(q.reshape(2, 4, 5), z3, sample_weight=w3)),
        rtol=1e-5,
    )


def test_sparse_rows_give_the_dense_rows_numbers_at_many_classes():
    vectors = np.random.default_rng(3).normal(size=(3000, 8))
    sparse = similarity.top_k(similarity.from_embeddings(vectors), 5)
    dense = similarity.MatrixSimilarity(np.asarray(sparse))
    labels, logits, _ = labelled_logits(4, 3000, 16)
    for from_logits, y_pred in ((True, logits), (False, softmax(logits))):
        np.testing.assert_allclose(
            to_numpy(
                soft_label_cross_entropy(labels, y_pred, sparse, 8.0, from_logits)
            ),
            to_numpy(soft_label_cross_entropy(labels, y_pred, dense, 8.0, from_logits)),
            rtol=1e-5,
        )


@pytest.mark.parametrize("beta", [-1.0, float("inf"), float("nan")])
def test_a_bad_beta_is_refused_by_name(beta):
    with pytest.raises(ValueError, match="`beta`.*Received: beta="):
        SoftLabelCrossEntropy(similarity.ordinal(3, 0.5), beta)
    with pytest.raises(TypeError, match="`beta`"):
        SoftLabelCrossEntropy(similarity.ordinal(3, 0.5), "2")


def test_other_classes_and_bad_labels_are_refused():
    loss = SoftLabelCrossEntropy(similarity.ordinal(4, 0.5), 2.0)
    with pytest.raises(ValueError, match="similarity over 4 classes.*5 classes"):
        loss([0], np.full((1, 5), 0.2))
    with pytest.raises(ValueError):
        loss([7], np.full((1, 4), 0.25))


def test_nan_rows_empty_batches_and_mixed_precision():
    sim = similarity.ordinal(4, 0.5)
    p = np.full((3, 4), 0.25, np.float32)
    p[1, 2] = np.nan
    got = to_numpy(soft_label_cross_entropy([0, 1, 2], p, sim, 2.0))
    assert np.isnan(got[1]) and np.all(np.isfinite(got[[0, 2]]))
    empty = soft_label_cross_entropy(np.zeros((0,), int), np.zeros((0, 4)), sim, 2.0)
    assert tuple(empty.shape) == (0,)
    # float16 logits far beyond float16's exp: the loss is float32 and finite.
    half = keras.ops.cast(np.array([[30.0, -30.0, 0.0, 10.0]]), "float16")
    value = soft_label_cross_entropy([1], half, sim, 2.0, from_logits=True)
    assert keras.backend.standardize_dtype(value.dtype) == "float32"
    assert np.isfinite(to_numpy(value)).all()


@pytest.mark.skipif(not JIT_COMPILE, reason="XLA on TensorFlow and JAX")
def test_a_label_out_of_range_gives_nan_when_compiled():
    sim = similarity.ordinal(4, 0.5)
    compiled = compile_function(
        lambda y, z: soft_label_cross_entropy(y, z, sim, 2.0, from_logits=True)
    )
    got = to_numpy(compiled(np.array([1, 9]), np.zeros((2, 4), np.float32)))
    assert np.isfinite(got[0]) and np.isnan(got[1])


def test_fits_compiled_and_reloads_with_the_same_numbers(tmp_path):
    vectors = np.random.default_rng(5).normal(size=(300, 4)).astype(np.float32)
    sim = similarity.from_embeddings(vectors, 0.2)  # archived in the file
    loss = SoftLabelCrossEntropy(sim, beta=6.0, from_logits=True)
    rebuilt, _ = assert_config_round_trip(
        SoftLabelCrossEntropy(similarity.ordinal(5, 0.3), beta=2.5)
    )
    assert rebuilt.beta == 2.5 and not rebuilt.from_logits
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(300)])
    model.compile("adam", loss=loss, jit_compile=JIT_COMPILE)
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(64, 3)).astype(np.float32), rng.integers(0, 300, 64)
    history = model.fit(x, y, epochs=2, batch_size=16, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    reloaded = save_and_reload(model, tmp_path)
    np.testing.assert_allclose(
        reloaded.evaluate(x, y, verbose=0), model.evaluate(x, y, verbose=0), rtol=1e-5
    )
