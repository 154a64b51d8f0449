"""Tests of logit distillation (`keras_simloss/distillation/kd.py`) and of the
`Distiller`'s KD term."""

import keras
import numpy as np
import pytest

from keras_simloss.distillation import Distiller, logit_distillation_loss
from tests.distillation.test_layers import conv_net, data, two_headed
from tests.testing import JIT_COMPILE, softmax, value_and_gradient


def numpy_kd(teacher_logits, student_logits, temperature, sample_weight=None):
    """T^2 * mean(w * KL(softmax(t / T) || softmax(s / T))) in float64."""
    p_t = softmax(np.asarray(teacher_logits, np.float64) / temperature)
    p_s = softmax(np.asarray(student_logits, np.float64) / temperature)
    kl = np.sum(p_t * (np.log(p_t) - np.log(p_s)), axis=-1)
    if sample_weight is not None:
        weight = np.asarray(sample_weight, np.float64)
        if weight.ndim == kl.ndim + 1 and weight.shape[-1] == 1:
            weight = weight[..., 0]
        weight = weight.reshape(weight.shape + (1,) * (kl.ndim - weight.ndim))
        kl = kl * weight
    return temperature**2 * np.mean(kl)


# The pure function ------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 4.0, 20.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_logit_distillation_loss_matches_numpy(seed, temperature):
    rng = np.random.default_rng(seed)
    teacher = (3.0 * rng.normal(size=(8, 5))).astype(np.float32)
    student = (3.0 * rng.normal(size=(8, 5))).astype(np.float32)
    value = logit_distillation_loss(teacher, student, temperature)
    assert keras.backend.standardize_dtype(value.dtype) == "float32"
    assert tuple(value.shape) == ()
    assert float(value) == pytest.approx(
        numpy_kd(teacher, student, temperature), rel=1e-5, abs=1e-7
    )
    # 0 for equal logits, and the default temperature is 4.
    assert float(logit_distillation_loss(teacher, teacher)) == pytest.approx(
        0.0, abs=1e-6
    )
    assert float(logit_distillation_loss(teacher, student)) == pytest.approx(
        numpy_kd(teacher, student, 4.0), rel=1e-5
    )


SAMPLE_WEIGHTS = {
    # name: (logits shape, sample weight shape)
    "per-example": ((6, 5), (6,)),
    "per-example-trailing-1": ((6, 5), (6, 1)),
    "per-example-over-steps": ((6, 4, 5), (6,)),
    "per-step": ((6, 4, 5), (6, 4)),
    "per-step-trailing-1": ((6, 4, 5), (6, 4, 1)),
    "scalar": ((6, 5), ()),
}


@pytest.mark.parametrize(
    "shapes", list(SAMPLE_WEIGHTS.values()), ids=list(SAMPLE_WEIGHTS)
)
def test_logit_distillation_loss_with_sample_weights(shapes):
    logits_shape, weight_shape = shapes
    rng = np.random.default_rng(7)
    teacher = rng.normal(size=logits_shape).astype(np.float32)
    student = rng.normal(size=logits_shape).astype(np.float32)
    weight = rng.uniform(0.0, 2.0, size=weight_shape).astype(np.float32)
    if weight.ndim:
        weight.flat[0] = 0.0  # a zero weight still counts in the mean
    got = float(logit_distillation_loss(teacher, student, 2.0, sample_weight=weight))
    assert got == pytest.approx(
        numpy_kd(teacher, student, 2.0, weight), rel=1e-5, abs=1e-7
    )


def test_logit_distillation_loss_is_float32_and_finite_for_extreme_logits():
    # Logits 1e4 apart: the probabilities underflow to 0, but the KL is
    # computed from log-probabilities and stays finite, as does its gradient.
    teacher = np.array([[1e4, -1e4, 0.0], [0.0, 0.0, 0.0]], np.float32)
    student = np.array([[-1e4, 1e4, 0.0], [5.0, -5.0, 0.0]], np.float32)
    value, gradient = value_and_gradient(
        lambda s: logit_distillation_loss(teacher, s, 1.0), student
    )
    assert np.isfinite(value) and np.all(np.isfinite(gradient))
    # Row 0: KL = log p_T(0) - log p_S(0) = 0 - (-2e4); row 1 from NumPy.
    assert float(value) == pytest.approx(
        (2e4 + numpy_kd(teacher[1:], student[1:], 1.0)) / 2, rel=1e-5
    )
    # float16 logits are computed in float32.
    half = logit_distillation_loss(
        teacher[1:].astype(np.float16), student[1:].astype(np.float16), 1.0
    )
    assert keras.backend.standardize_dtype(half.dtype) == "float32"
    assert float(half) == pytest.approx(
        numpy_kd(teacher[1:], student[1:], 1.0), rel=1e-5
    )


def test_logit_distillation_loss_rejects_bad_arguments():
    logits = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match=r"same classes.*\(2, 3\).*\(2, 4\)"):
        logit_distillation_loss(logits, np.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"0.0 < temperature <= 100.0"):
        logit_distillation_loss(logits, logits, temperature=0.0)
    with pytest.raises(TypeError, match=r"`temperature`. Expected a number"):
        logit_distillation_loss(logits, logits, temperature="4")
    with pytest.raises(ValueError, match=r"Invalid shape for argument `sample_weight`"):
        logit_distillation_loss(logits, logits, sample_weight=np.ones((2, 3, 2)))


def test_logit_distillation_loss_equals_the_distillers_kd_loss():
    keras.utils.set_random_seed(0)
    distiller = Distiller(
        conv_net(16, "teacher"),
        conv_net(4, "student"),
        [("block", "block")],
        alpha=0.4,
        temperature=3.0,
    )
    distiller.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = data(n=12, seed=2)
    weights = np.linspace(0.0, 2.0, len(y)).astype(np.float32)
    result = distiller.evaluate(
        x, y, sample_weight=weights, batch_size=12, verbose=0, return_dict=True
    )
    expected = logit_distillation_loss(
        distiller.teacher.predict(x, verbose=0),
        distiller.student.predict(x, verbose=0),
        temperature=3.0,
        sample_weight=weights,
    )
    assert result["kd_loss"] == pytest.approx(float(expected), rel=1e-5)


# The Distiller's KD term --------------------------------------------------------


@pytest.mark.parametrize("logits_output", [None, "logits"])
def test_multi_output_models(logits_output):
    keras.utils.set_random_seed(0)
    distiller = Distiller(
        two_headed(16, "teacher"),
        two_headed(4, "student"),
        [("block", "block")],
        gamma=10.0,
        alpha=0.5,
        logits_output=logits_output,
    )
    distiller.compile(
        optimizer="adam",
        loss={
            "logits": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            "aux": "mse",
        },
        jit_compile=JIT_COMPILE,
    )
    x, y = data()
    targets = {"logits": y, "aux": np.tile(y.astype(np.float32)[:, None] / 5.0, 3)}
    history = distiller.fit(x, targets, epochs=2, batch_size=16, verbose=0)
    for key in ("loss", "student_loss", "sp_loss", "kd_loss"):
        assert np.all(np.isfinite(history.history[key])), key
    teacher = distiller.teacher.predict(x, verbose=0)
    student = distiller.student.predict(x, verbose=0)
    weights = {
        "aux": np.linspace(2.0, 0.0, len(y)).astype(np.float32),
        "logits": np.linspace(0.0, 2.0, len(y)).astype(np.float32),
    }

    def kd(name):
        # Each output's KD term weighted by that output's sample weights.
        p_t, p_s = softmax(teacher[name] / 4.0), softmax(student[name] / 4.0)
        kl = np.sum(p_t * (np.log(p_t) - np.log(p_s)), axis=-1)
        return 16.0 * np.sum(kl * weights[name]) / len(y)

    expected = kd("logits") if logits_output else kd("logits") + kd("aux")
    assert kd("aux") > 1e-4  # the aux head's term is not trivially 0
    result = distiller.evaluate(
        x,
        targets,
        sample_weight=weights,
        verbose=0,
        batch_size=48,
        return_dict=True,
    )
    assert result["kd_loss"] == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_kd_weights_spread_over_sequence_steps():
    # Per-example weights (b,) with sequence logits (b, T, C), T == b: each
    # example's weight applies to all its steps, as in Keras's losses.
    keras.utils.set_random_seed(0)

    def sequence_model(width, name):
        inputs = keras.Input((4, 3))
        x = keras.layers.Dense(width, activation="relu", name="hidden")(inputs)
        return keras.Model(inputs, keras.layers.Dense(5)(x), name=name)

    distiller = Distiller(
        sequence_model(8, "teacher"),
        sequence_model(4, "student"),
        alpha=0.5,
        temperature=1.0,
    )
    distiller.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(42)
    x = rng.normal(size=(4, 4, 3)).astype(np.float32)
    y = rng.integers(0, 5, size=(4, 4))
    w = np.array([0.0, 1.0, 2.0, 3.0], np.float32)
    result = distiller.evaluate(
        x, y, sample_weight=w, batch_size=4, verbose=0, return_dict=True
    )
    p_t = softmax(distiller.teacher.predict(x, verbose=0))
    p_s = softmax(distiller.student.predict(x, verbose=0))
    kl = np.sum(p_t * (np.log(p_t) - np.log(p_s)), axis=-1)  # (b, T)
    expected = np.sum(kl * w[:, None]) / kl.size
    assert result["kd_loss"] == pytest.approx(expected, rel=1e-4)


def test_kd_needs_the_same_classes():
    keras.utils.set_random_seed(0)
    distiller = Distiller(
        conv_net(8, "teacher", num_classes=5),
        conv_net(4, "student", num_classes=3),
        [("block", "block")],
        alpha=0.5,
    )
    distiller.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    x, y = data()
    with pytest.raises(ValueError, match=r"same classes.*\(\w*, ?5\).*\(\w*, ?3\)"):
        distiller.fit(x, y % 3, epochs=1, verbose=0)
    distiller = Distiller(
        conv_net(8, "teacher"),
        conv_net(4, "student"),
        alpha=0.5,
        logits_output="logits",
    )
    distiller.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    with pytest.raises(ValueError, match=r"logits_output.*no entry 'logits'"):
        distiller.fit(x, y, epochs=1, verbose=0)
