"""The similarity-preserving (SP) loss: row-normalised Gram matrices compared.

- `similarity_preserving_loss`: the pure loss for one pair of activations.
- `SimilarityPreserving`: the same as a `keras.distillation.DistillationLoss`.

Reference:
    Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019.
    https://arxiv.org/abs/1907.09682
"""

import keras
from keras import ops

from keras_simloss import _utils
from keras_simloss.distillation.layers import find_layer


def _check_features(features, name):
    """Features must be one tensor with a non-empty batch axis."""
    if isinstance(features, (list, tuple, dict)):
        raise ValueError(
            f"Invalid value for argument `{name}`. Expected one tensor of "
            f"shape (batch, ...). Received: a {type(features).__name__} of "
            f"{len(features)} items (a layer or model with several outputs; "
            "pick a layer whose output is a single tensor)"
        )
    if not hasattr(features, "shape"):
        features = ops.convert_to_tensor(features)
    if len(features.shape) < 1:
        raise ValueError(
            f"Invalid value for argument `{name}`. Expected a tensor of shape "
            f"(batch, ...) with a batch axis. Received: {name}.shape="
            f"{tuple(features.shape)}"
        )
    if features.shape[0] == 0:
        raise ValueError(
            f"Invalid value for argument `{name}`. Expected a batch of at "
            f"least one example. Received: {name}.shape={tuple(features.shape)}"
        )
    return features


def check_same_batch(teacher_features, student_features, context=""):
    """Raises a `ValueError` when the two batch sizes are known and differ."""
    teacher_batch = teacher_features.shape[0]
    student_batch = student_features.shape[0]
    if (
        teacher_batch is not None
        and student_batch is not None
        and teacher_batch != student_batch
    ):
        raise ValueError(
            "Teacher and student activations must have the same batch size "
            f"(the Gram matrices are batch x batch){context}. Received: "
            f"teacher_features.shape={tuple(teacher_features.shape)}, "
            f"student_features.shape={tuple(student_features.shape)}"
        )


def _normalized_gram(features, groups):
    """Row-normalised Gram matrices of `groups` equal slices of the batch.

    Returns float32 of shape `(groups, b / groups, b / groups)`.
    """
    # float32 whatever the policy: a Gram of float16 activations overflows.
    features = ops.cast(features, "float32")
    # SP is invariant to a positive scale of the activations, so divide by
    # their largest magnitude first: the Gram's entries and their squares
    # then stay far from float32 overflow (activations of 1e20) and
    # underflow (1e-20). The scale is a constant for the gradient, which is
    # exact because the loss does not depend on it.
    scale = ops.stop_gradient(ops.max(ops.abs(features)))
    features = features / ops.maximum(scale, 1e-30)
    flat = ops.reshape(features, (groups, ops.shape(features)[0] // groups, -1))
    gram = ops.matmul(flat, ops.transpose(flat, (0, 2, 1)))
    # Row L2 normalisation. An all-zero row (dead ReLUs) stays zero, and
    # the guard sits before the square root and in both branches of the
    # `where`: sqrt has no derivative at 0 (NaN on JAX), and dividing by an
    # epsilon instead gives that row a gradient of about 1 / epsilon (1e10
    # and more, inf in float16). The loss jumps at a zero row (any nearby row
    # normalises to a unit vector), so it has no derivative there; the
    # gradient through the dead row's own normalisation is defined as 0.
    squared_norm = ops.sum(ops.square(gram), axis=-1, keepdims=True)
    alive = squared_norm > 0.0
    inverse_norm = ops.where(alive, ops.rsqrt(ops.where(alive, squared_norm, 1.0)), 0.0)
    return gram * inverse_norm


def _grouped_similarity_preserving_loss(teacher_features, student_features, groups):
    """The SP loss of each of `groups` equal slices of the batch, averaged.

    With `groups=1` this is `similarity_preserving_loss` without the checks;
    the `Distiller` uses more groups for the per-device slices of a batch
    under `keras.distribution` (`gram_batch="replica"`).
    """
    difference = _normalized_gram(teacher_features, groups) - _normalized_gram(
        student_features, groups
    )
    local_batch = ops.cast(ops.shape(difference)[-1], "float32")
    # Per slice ||.||_F^2 / b^2, averaged over the slices.
    return ops.mean(ops.sum(ops.square(difference), axis=(1, 2))) / ops.square(
        local_batch
    )


def similarity_preserving_loss(teacher_features, student_features):
    """Similarity-preserving distillation loss for one pair of activations.

    With `Q_T`, `Q_S` the activations reshaped to `(b, -1)`:

        G_T = normalize_rows(Q_T Q_T^T),  G_S = normalize_rows(Q_S Q_S^T)
        L_SP = || G_T - G_S ||_F^2 / b^2

    Properties: 0 when both activations are equal; unchanged when either is
    multiplied by a positive scalar (over the whole float32 range: the
    activations are rescaled before the products); independent of the memory
    layout of the non-batch axes (NHWC or NCHW); at most `4 / b`. Computed
    in float32. An all-zero activation row (dead ReLUs) gives a zero Gram
    row; the gradient through that row's own normalisation is 0 (the loss
    has no derivative there), so gradients stay finite, also in float16.

    Args:
        teacher_features: teacher activations, shape `(b, ...)`, any rank
            >= 1, `b >= 1`.
        student_features: student activations, shape `(b, ...)`; other axes
            may differ from the teacher's.

    Returns:
        A float32 scalar.

    Example:

    >>> import numpy as np
    >>> t = np.array([[1.0, 0.0], [0.0, 1.0]])
    >>> s = np.array([[1.0, 1.0], [1.0, 1.0]])
    >>> # G_T = I, G_S rows = [1, 1] / sqrt(2):
    >>> # 2 * ((1 - 1/sqrt(2))^2 + (1/sqrt(2))^2) / 2^2 = 0.292893
    >>> round(float(similarity_preserving_loss(t, s)), 6)
    0.292893

    Reference:
        Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV
        2019, Eq. 3-4. https://arxiv.org/abs/1907.09682
    """
    teacher_features = _check_features(teacher_features, "teacher_features")
    student_features = _check_features(student_features, "student_features")
    check_same_batch(teacher_features, student_features)
    return _grouped_similarity_preserving_loss(
        teacher_features, student_features, groups=1
    )


@_utils.register
class SimilarityPreserving(keras.distillation.DistillationLoss):
    """SP loss between a teacher layer and a student layer.

    A `keras.distillation.DistillationLoss`, so it plugs into Keras's own
    `keras.distillation.Distiller` (which finds the layers through
    `teacher_layer_name` / `student_layer_name`). Weight it there with
    `distillation_loss_weights`; the paper used `gamma = 3000`.

    Args:
        teacher_layer_name: name of the teacher layer whose output is used.
        student_layer_name: name of the student layer whose output is used.

    Example:

    ```python
    distiller = keras.distillation.Distiller(
        teacher, student,
        distillation_losses=[SimilarityPreserving("block3", "block3")],
        distillation_loss_weights=[3000.0],
    )
    ```
    """

    def __init__(self, teacher_layer_name, student_layer_name):
        for argument, value in (
            ("teacher_layer_name", teacher_layer_name),
            ("student_layer_name", student_layer_name),
        ):
            if not isinstance(value, str) or not value:
                raise ValueError(
                    f"Invalid value for argument `{argument}`. Expected a "
                    f"layer name. Received: {argument}={value!r}"
                )
        self.teacher_layer_name = teacher_layer_name
        self.student_layer_name = student_layer_name

    def validate_model_compatibility(self, teacher, student):
        find_layer(teacher, self.teacher_layer_name, "teacher")
        find_layer(student, self.student_layer_name, "student")

    def validate_outputs(self, teacher_outputs, student_outputs):
        teacher_outputs = _check_features(teacher_outputs, "teacher_outputs")
        student_outputs = _check_features(student_outputs, "student_outputs")
        check_same_batch(teacher_outputs, student_outputs)

    def compute_loss(self, teacher_outputs, student_outputs, **kwargs):
        return similarity_preserving_loss(teacher_outputs, student_outputs)

    def get_config(self):
        return {
            "teacher_layer_name": self.teacher_layer_name,
            "student_layer_name": self.student_layer_name,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)
