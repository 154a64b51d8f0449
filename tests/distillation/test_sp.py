"""Tests of the similarity-preserving loss (`keras_simloss/distillation/sp.py`)."""

import keras
import numpy as np
import pytest

from keras_simloss.distillation import SimilarityPreserving, similarity_preserving_loss
from tests.distillation.test_layers import conv_net, data
from tests.testing import assert_config_round_trip, value_and_gradient


def numpy_sp(teacher, student):
    """SP loss in float64: row-normalised Gram matrices, ||.||_F^2 / b^2."""

    def gram(features):
        flat = np.asarray(features, np.float64).reshape(len(features), -1)
        g = flat @ flat.T
        return g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)

    b = len(teacher)
    return np.sum((gram(teacher) - gram(student)) ** 2) / b**2


SHAPES = {
    "conv-vs-conv": ((8, 6, 6, 16), (8, 3, 3, 4)),
    "conv-vs-dense": ((8, 4, 4, 8), (8, 10)),
    "dense-vs-dense": ((5, 32), (5, 7)),
    "rank5": ((4, 2, 3, 3, 2), (4, 6)),
}


@pytest.mark.parametrize("shapes", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sp_loss_matches_numpy(shapes, seed):
    rng = np.random.default_rng(seed)
    teacher_shape, student_shape = SHAPES[shapes]
    teacher = np.maximum(rng.normal(size=teacher_shape), 0).astype(np.float32)
    student = rng.normal(size=student_shape).astype(np.float32)
    got = float(similarity_preserving_loss(teacher, student))
    assert got == pytest.approx(numpy_sp(teacher, student), rel=1e-5, abs=1e-7)


def test_sp_oracles():
    rng = np.random.default_rng(3)
    teacher = rng.normal(size=(6, 4, 4, 8)).astype(np.float32)
    student = rng.normal(size=(6, 2, 2, 3)).astype(np.float32)
    base = float(similarity_preserving_loss(teacher, student))
    assert base > 0
    assert float(similarity_preserving_loss(teacher, teacher)) == pytest.approx(
        0.0, abs=1e-10
    )
    # Invariant to a positive scale of either side.
    assert float(similarity_preserving_loss(37.0 * teacher, student)) == pytest.approx(
        base, rel=1e-5
    )
    assert float(similarity_preserving_loss(teacher, 1e-3 * student)) == pytest.approx(
        base, rel=1e-5
    )
    # NHWC vs NCHW flattening.
    nchw = np.transpose(teacher, (0, 3, 1, 2))
    assert float(similarity_preserving_loss(nchw, student)) == pytest.approx(
        base, rel=1e-5
    )
    # At most 4 / b: orthogonal teacher rows vs identical student rows comes
    # close; random inputs stay below.
    b = 6
    assert base <= 4 / b
    worst = float(similarity_preserving_loss(np.eye(b), -np.ones((b, 3))))
    assert worst <= 4 / b


def test_sp_loss_in_float16_is_finite_and_float32():
    big = np.full((4, 300), 300.0, np.float16)  # a float16 Gram would overflow
    value = similarity_preserving_loss(big, np.eye(4, dtype=np.float16))
    assert keras.backend.standardize_dtype(value.dtype) == "float32"
    assert np.isfinite(float(value))
    assert float(value) == pytest.approx(numpy_sp(big, np.eye(4)), rel=1e-5)


def test_sp_loss_rejects_different_batch_sizes():
    with pytest.raises(ValueError, match=r"same batch size.*\(4, 3\).*\(5, 3\)"):
        similarity_preserving_loss(np.ones((4, 3)), np.ones((5, 3)))


def test_similarity_preserving_in_keras_distiller():
    keras.utils.set_random_seed(0)
    teacher, student = conv_net(16, "teacher"), conv_net(4, "student")
    loss = SimilarityPreserving("block", "block")
    rebuilt, _ = assert_config_round_trip(loss)
    assert (rebuilt.teacher_layer_name, rebuilt.student_layer_name) == (
        "block",
        "block",
    )
    distiller = keras.distillation.Distiller(
        teacher,
        student,
        distillation_losses=[loss],
        distillation_loss_weights=[3000.0],
        student_loss_weight=0.5,
    )
    distiller.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x, y = data()
    history = distiller.fit(x, y, epochs=5, batch_size=16, verbose=0)
    distillation = history.history["distillation_loss"]
    assert np.all(np.isfinite(distillation)) and distillation[-1] < distillation[0]
    with pytest.raises(ValueError, match="No layer named 'nope'"):
        keras.distillation.Distiller(
            teacher, student, [SimilarityPreserving("nope", "block")]
        )


# Numerics of the SP loss ----------------------------------------------------------


def _numpy_sp_dead_row_frozen(teacher, student, dead):
    """`numpy_sp` with the normalised Gram row `dead` of the student held at
    0: the convention for an all-zero row, as a function that has a
    derivative there."""

    def gram(features, frozen=None):
        flat = np.asarray(features, np.float64).reshape(len(features), -1)
        g = flat @ flat.T
        g = g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-300)
        if frozen is not None:
            g[frozen] = 0.0
        return g

    b = len(teacher)
    return np.sum((gram(teacher) - gram(student, dead)) ** 2) / b**2


def test_sp_gradient_with_an_all_zero_row_is_finite_and_correct():
    # Dead ReLUs: one example's activations are all zero, so its Gram row is
    # zero. The loss jumps there (a nearby row normalises to a unit vector);
    # the gradient through that row's own normalisation is defined as 0,
    # the rest is the ordinary derivative.
    rng = np.random.default_rng(40)
    teacher = rng.normal(size=(5, 6)).astype(np.float32)
    student = rng.normal(size=(5, 4)).astype(np.float32)
    student[2] = 0.0
    value, gradient = value_and_gradient(
        lambda s: similarity_preserving_loss(teacher, s), student
    )
    assert float(value) == pytest.approx(numpy_sp(teacher, student), rel=1e-5)
    step = 1e-3
    numeric = np.zeros(student.shape, np.float64)
    for index in np.ndindex(student.shape):
        up, down = student.astype(np.float64), student.astype(np.float64)
        up[index] += step
        down[index] -= step
        numeric[index] = (
            _numpy_sp_dead_row_frozen(teacher, up, 2)
            - _numpy_sp_dead_row_frozen(teacher, down, 2)
        ) / (2 * step)
    np.testing.assert_allclose(gradient, numeric, rtol=1e-2, atol=1e-5)
    assert np.abs(gradient).max() < 10.0  # not 1 / epsilon
    # The teacher side, all zero, and float16 activations behind a ReLU (a
    # gradient of 1 / epsilon would be inf there, and inf * 0 = NaN).
    _, teacher_gradient = value_and_gradient(
        lambda t: similarity_preserving_loss(t, student), np.zeros((5, 6))
    )
    assert np.all(np.isfinite(teacher_gradient))
    _, half_gradient = value_and_gradient(
        lambda s: (
            3000.0
            * similarity_preserving_loss(
                teacher, keras.ops.relu(keras.ops.cast(s, "float16"))
            )
        ),
        np.where(np.arange(5)[:, None] == 2, -1.0, student),
    )
    assert np.all(np.isfinite(half_gradient))


@pytest.mark.parametrize("scale", [1e-20, 1e-8, 1e9, 1e20])
def test_sp_scale_invariance_over_the_float32_range(scale):
    rng = np.random.default_rng(41)
    teacher = rng.normal(size=(6, 4, 4, 3)).astype(np.float32)
    student = rng.normal(size=(6, 10)).astype(np.float32)
    base = numpy_sp(teacher, student)
    scaled = (teacher.astype(np.float64) * scale).astype(np.float32)
    assert float(similarity_preserving_loss(scaled, student)) == pytest.approx(
        base, rel=1e-4
    )
    assert float(similarity_preserving_loss(teacher, student * scale)) == (
        pytest.approx(base, rel=1e-4)
    )


def test_sp_rejects_scalars_empty_batches_and_lists():
    with pytest.raises(ValueError, match=r"teacher_features.*batch axis"):
        similarity_preserving_loss(np.float32(1.0), np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"at least one example.*\(0, 3\)"):
        similarity_preserving_loss(np.ones((0, 3)), np.ones((0, 2)))
    with pytest.raises(ValueError, match=r"teacher_outputs.*list of 2 items"):
        SimilarityPreserving("a", "b").validate_outputs(
            [np.ones((2, 3)), np.ones((2, 3))], np.ones((2, 3))
        )
