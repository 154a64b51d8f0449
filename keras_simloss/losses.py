"""SimLoss: cross entropy that knows which classes are alike."""

import keras
from keras import ops

from keras_simloss import _utils
from keras_simloss import similarity as similarity_lib

__all__ = ["SimLoss", "sim_loss"]


def sim_loss(y_true, y_pred, similarity, from_logits=False):
    """Per-example SimLoss (Kobs et al., Eq. 1).

    For a label `y`, predicted probabilities `p` and a class similarity `S`:

        loss = -log( sum_c S[y, c] * p_c )

    With `S` the identity this is sparse categorical cross entropy. From
    logits `z` it is computed in log space as
    `-logsumexp(log_softmax(z) + log S[y])`, where `log 0 = -inf` and the
    unit diagonal keeps one finite term. From probabilities, as in Keras's
    cross entropy, they are clipped to `[epsilon, 1 - epsilon]` so that log
    never sees 0, and divided by their sum, so
    `loss = -log(sum_c S[y, c] p_c / sum_c p_c)`. Both run in float32
    whatever the inputs' dtype, with the gradient in closed form
    (`Similarity.logit_loss`, `Similarity.probability_loss`).

    Args:
        y_true: class indices of shape `y_pred.shape[:-1]` (optionally with
            a trailing axis of 1), or one-hot rows of shape `y_pred.shape`.
            Which of the two is decided by rank, as in Keras.
        y_pred: logits or probabilities of shape `(..., C)`.
        similarity: a `keras_simloss.similarity.Similarity` or a `(C, C)`
            array-like.
        from_logits: whether `y_pred` holds logits. Defaults to `False`.

    Returns:
        A float32 tensor of shape `y_pred.shape[:-1]`. An example whose label
        is not a class index (out of `[0, C)`, negative, NaN, non-integer, or
        a row that is not one-hot) raises a `ValueError` in eager mode; inside
        a compiled function, where nothing can be raised, its loss is NaN.

    Example:

    >>> from keras_simloss import similarity
    >>> loss = sim_loss([0], [[0.2, 0.5, 0.3]], similarity.ordinal(3, 0.5))
    >>> round(float(loss[0]), 6)  # -log(0.2 + 0.5 * 0.5 + 0.25 * 0.3)
    0.644357

    Reference:
        Kobs et al., "SimLoss: Class Similarities in Cross Entropy", 2020.
        https://arxiv.org/abs/2003.03182
    """
    similarity = similarity_lib.get(similarity)
    # float32 whatever the policy: float16 rounds small probabilities to 0
    # and overflows exp of moderate logits.
    y_pred = ops.cast(ops.convert_to_tensor(y_pred), "float32")
    num_classes = _utils.static_num_classes(y_pred)
    _utils.check_num_classes(similarity.num_classes, num_classes, "SimLoss")
    labels, valid = _utils.sparse_labels(y_true, y_pred)
    # The similarities work on a flat batch: (..., C) -> (N, C).
    leading = ops.shape(labels)
    labels = ops.reshape(labels, (-1,))
    y_pred = ops.reshape(y_pred, (-1, num_classes))
    if from_logits:
        loss = similarity.logit_loss(labels, y_pred)
    else:
        # Clipped so that log never sees 0 and divided by the total, so
        # unnormalised inputs are treated as distributions. The unit diagonal
        # keeps the weighted sum >= epsilon / total.
        loss = similarity.probability_loss(labels, y_pred, keras.config.epsilon())
    # A label that is not a class (seen only inside compiled steps; eager
    # mode raised) gives NaN, never the loss of another class.
    return _utils.nan_where_invalid(ops.reshape(loss, leading), valid)


@keras.saving.register_keras_serializable(package="keras_simloss")
class SimLoss(keras.losses.Loss):
    """Cross entropy with class similarities (SimLoss).

    For a label `y`, predicted probabilities `p` and a class-similarity
    matrix `S` with entries in `[0, 1]` and a unit diagonal:

        loss = -log( sum_c S[y, c] * p_c )

    Probability mass on classes similar to the true one counts partly as
    correct, so "31 instead of 30" or "rose instead of tulip" costs less than
    "truck instead of rose". `S = identity` gives sparse categorical cross
    entropy. The loss is 0 when all mass is on the true class.

    Logits are handled in log space and everything runs in float32, so the
    loss is finite for extreme logits and under mixed precision. Structured
    similarities (`ordinal`, `from_embeddings`, `from_hierarchy`, `top_k`)
    compute only the rows of the batch's labels and never a `C x C` matrix.

    Args:
        similarity: the class similarity: a
            `keras_simloss.similarity.Similarity` (from `ordinal`,
            `from_embeddings`, `from_hierarchy`, `lower_bound`, `top_k`) or a
            `(C, C)` array-like with entries in `[0, 1]` and a unit diagonal.
        from_logits: whether `y_pred` holds logits rather than
            probabilities. Defaults to `False`.
        reduction: as for any Keras loss. Defaults to `"sum_over_batch_size"`.
        name: Defaults to `"sim_loss"`.
        dtype: dtype of the reduced loss, `"float32"` or `"float64"` (Keras
            casts the labels to it, so half precision is refused). The
            per-example loss is always computed in float32. Defaults to
            `None` (`keras.config.floatx()`).

    Shapes, as for Keras's cross entropies: `y_pred` is `(..., C)` (a batch,
    a sequence, an image of per-pixel scores); labels are class indices of
    shape `y_pred.shape[:-1]` (or with a trailing 1), or one-hot rows of
    `y_pred`'s shape, decided by rank. Any other pair of shapes raises a
    `ValueError` when the loss is first traced. Sample weights of the labels'
    shape (per element) or of the batch shape work as in Keras.

    Bad label values (out of `[0, C)`, negative, NaN, non-integer, soft
    rows) raise a `ValueError` in eager mode. Inside a compiled step (graph
    or XLA), where nothing can be raised, the loss of such an example is
    NaN, so the epoch's loss is NaN and `keras.callbacks.TerminateOnNaN`
    stops the run; the other examples' gradients stay finite.

    Example:

    >>> import numpy as np
    >>> from keras_simloss import SimLoss, similarity
    >>> loss = SimLoss(similarity.ordinal(3, reduction_factor=0.5))
    >>> # -log(0.2 * 1 + 0.5 * 0.5 + 0.3 * 0.25) = -log(0.525)
    >>> round(float(loss(np.array([0]), np.array([[0.2, 0.5, 0.3]]))), 6)
    0.644357

    In a model: `model.compile(loss=SimLoss(similarity.ordinal(90, 0.8)))`.

    Reference:
        Kobs, Steininger, Zehe, Lautenschlager, Hotho, "SimLoss: Class
        Similarities in Cross Entropy", 2020. https://arxiv.org/abs/2003.03182
    """

    def __init__(
        self,
        similarity,
        from_logits=False,
        reduction="sum_over_batch_size",
        name="sim_loss",
        dtype=None,
    ):
        compute_dtype = (
            dtype.compute_dtype if isinstance(dtype, keras.DTypePolicy) else dtype
        )
        if dtype is not None and keras.backend.standardize_dtype(compute_dtype) not in (
            "float32",
            "float64",
        ):
            # Keras casts the labels to the loss's dtype before `call`: in
            # float16 or bfloat16 class indices above 2048 or 256 round.
            raise ValueError(
                "Invalid value for argument `dtype`. Expected None, 'float32' or "
                "'float64' (Keras casts the labels to it, and half precision "
                "would round class indices; the loss is computed in float32 "
                f"under any policy anyway). Received: dtype={dtype!r}"
            )
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        if not isinstance(from_logits, bool):
            raise TypeError(
                "Invalid type for argument `from_logits`. Expected a bool. "
                f"Received: from_logits={from_logits!r}"
            )
        self.similarity = similarity_lib.get(similarity)
        self.from_logits = from_logits

    @property
    def num_classes(self):
        """The number of classes `C` of the similarity."""
        return self.similarity.num_classes

    def call(self, y_true, y_pred):
        return sim_loss(y_true, y_pred, self.similarity, from_logits=self.from_logits)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "similarity": keras.saving.serialize_keras_object(self.similarity),
                "from_logits": self.from_logits,
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["similarity"] = similarity_lib.get(config["similarity"])
        return cls(**config)

    def save_own_variables(self, store):
        """Saves the similarity's large arrays (if any) into the `.keras` file."""
        self.similarity.save_own_variables(store)

    def load_own_variables(self, store):
        """Restores the similarity's large arrays from the `.keras` file."""
        self.similarity.load_own_variables(store)
