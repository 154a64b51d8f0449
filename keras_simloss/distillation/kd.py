"""Hinton's logit distillation (KD): the student matches the teacher's
softened class probabilities.

Reference:
    Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network",
    2015. https://arxiv.org/abs/1503.02531
"""

from keras import ops

from keras_simloss import _utils

# Largest allowed temperature: beyond it the softened probabilities are all
# but uniform and the T^2 factor leaves the range where float32 training
# makes sense (Hinton's temperatures are 1 to 20).
MAX_TEMPERATURE = 100.0


def check_temperature(temperature):
    """Validates a softmax temperature, `0 < temperature <= 100`."""
    return _utils.check_number(
        "temperature",
        temperature,
        0.0,
        MAX_TEMPERATURE,
        low_inclusive=False,
        high_inclusive=True,
    )


def _check_logits(logits, name):
    """Logits must be a tensor with a class axis."""
    if not hasattr(logits, "shape"):
        logits = ops.convert_to_tensor(logits)
    if len(logits.shape) < 1:
        raise ValueError(
            f"Invalid value for argument `{name}`. Expected logits of shape "
            f"(..., num_classes). Received: {name}.shape={tuple(logits.shape)}"
        )
    return logits


def logit_distillation_loss(
    teacher_logits, student_logits, temperature=4.0, sample_weight=None
):
    """Logit-distillation loss: KL divergence of the softened predictions.

    With `T` the temperature and `w` the sample weights (1 by default):

        p_T = softmax(z_T / T),  p_S = softmax(z_S / T)
        L_KD = T^2 * mean(w * KL(p_T || p_S))

    The KL divergence is taken over the class axis (the last) and the mean
    over every other axis, as Keras's `"sum_over_batch_size"` reduction
    does: `sum(w * KL) / count`, zero weights included in the count. The
    factor `T^2` keeps the gradients' scale independent of `T`. Computed in
    float32 from log-probabilities (log-softmax, never the log of a
    probability), so it stays finite for logits far apart.

    Args:
        teacher_logits: the teacher's logits, shape `(b, ..., C)`.
        student_logits: the student's logits, of the teacher's shape.
        temperature: the softmax temperature `T`, `0 < T <= 100`. Defaults
            to `4.0`.
        sample_weight: optional weights: a scalar, per example `(b,)` or
            `(b, 1)`, or per element of the logits' leading shape
            `(b, ...)`. A per-example weight spreads over any further axes
            (time steps, pixels). Defaults to `None` (all 1).

    Returns:
        A float32 scalar.

    Example:

    >>> import numpy as np
    >>> teacher = np.array([[0.0, 0.0]])
    >>> student = np.array([[0.0, np.log(9.0)]])
    >>> # At T = 2: p_T = [1/2, 1/2], p_S = softmax([0, log 3]) = [1/4, 3/4];
    >>> # KL = 1/2 log(2) + 1/2 log(2/3) = 1/2 log(4/3) = 0.143841, and
    >>> # T^2 * KL = 4 * 0.143841 = 0.575364
    >>> round(float(logit_distillation_loss(teacher, student, 2.0)), 6)
    0.575364

    Reference:
        Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural
        Network", 2015. https://arxiv.org/abs/1503.02531
    """
    temperature = check_temperature(temperature)
    teacher_logits = _check_logits(teacher_logits, "teacher_logits")
    student_logits = _check_logits(student_logits, "student_logits")
    if teacher_logits.shape[-1] != student_logits.shape[-1]:
        raise ValueError(
            "Teacher and student logits must be over the same classes (last "
            f"axis). Received: teacher_logits.shape={tuple(teacher_logits.shape)}"
            f", student_logits.shape={tuple(student_logits.shape)}"
        )
    # float32 whatever the policy: the KL divergence is a small difference
    # of log-probabilities, which float16 would round away.
    teacher_log_probs = ops.log_softmax(
        ops.cast(teacher_logits, "float32") / temperature, axis=-1
    )
    student_log_probs = ops.log_softmax(
        ops.cast(student_logits, "float32") / temperature, axis=-1
    )
    kl = ops.sum(
        ops.exp(teacher_log_probs) * (teacher_log_probs - student_log_probs),
        axis=-1,
    )
    if sample_weight is not None:
        # As Keras's "sum_over_batch_size": sum(w * kl) / count, with
        # per-example weights spread over any further axes (time steps,
        # pixels) and a trailing axis of 1 dropped.
        kl = kl * _utils.expand_sample_weight(sample_weight, kl)
    return temperature**2 * ops.mean(kl)
