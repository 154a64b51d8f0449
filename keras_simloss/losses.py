"""SimLoss and soft-label cross entropy: losses that know which classes are alike."""

import math

import keras
from keras import ops

from keras_simloss import _backend, _utils
from keras_simloss import similarity as similarity_lib
from keras_simloss.similarity.saving import SimilarityHolder

__all__ = ["SimLoss", "SoftLabelCrossEntropy", "sim_loss", "soft_label_cross_entropy"]


# The maths of SimLoss ---------------------------------------------------------
#
# Both per-example losses below read the similarity only through its row
# contract (`rows`, `log_rows`, `sparse_rows`, `keep_rows`; see
# `similarity/base.py`), and define their gradient in closed form: the
# backward pass rebuilds it from the inputs and a few numbers per example.
# Automatic differentiation of the same formulas would keep `(batch, C)`
# buffers from the forward pass for the backward one (`exp(z - max z)` of the
# logsumexp, the rows); this keeps none, so a training step holds no more
# `(batch, C)` buffers than sparse categorical cross entropy (measured under
# XLA in `benchmarks/large_labels.py`, guarded by
# `test_compiled_step_holds_no_more_batch_by_class_buffers_than_scce`).
#
# "Terms" are the per-class pieces of one example's sum: whole rows
# `(batch, C)` (`positions` is `None`), or, for a similarity with sparse
# rows, the `(batch, n)` classes that count (`positions` their indices).


def _with_gradient(similarity, forward, backward, inputs, labels):
    """`_backend.with_gradient`, with the similarity's sharded state (see
    `keras_simloss.sharding`) as the forward pass read it kept for the
    backward pass: a trainer may trace the backward pass after the scope
    that maps the state to the step's arguments has closed, and would then
    read the variables' values as constants (whole, on every device)."""

    def forward_with_state(inputs, labels):
        value, residuals = forward(inputs, labels)
        return value, (residuals, similarity._state_values())

    def backward_with_state(inputs, labels, residuals, upstream):
        residuals, state = residuals
        with similarity._reading_state(state):
            return backward(inputs, labels, residuals, upstream)

    return _backend.with_gradient(
        forward_with_state, backward_with_state, inputs, labels
    )


def _log_softmax_shift(logits):
    """`(max z, log(sum(exp(z - max z))))`, each `(batch, 1)`:
    `log_softmax(z) = (z - max z) - log(sum(exp(z - max z)))`.

    A non-finite maximum is replaced by 0, as in Keras's logsumexp. The
    maximum carries no gradient (log-softmax does not depend on it).
    """
    peak = ops.stop_gradient(ops.max(logits, axis=-1, keepdims=True))
    peak = ops.where(ops.isfinite(peak), peak, 0.0)
    total = ops.sum(ops.exp(logits - peak), axis=-1, keepdims=True)
    return peak, ops.log(total)


def _shifted(values, shift):
    """`values` minus each tensor of `shift` in turn."""
    for part in shift:
        values = values - part
    return values


def _after(labels, value):
    """`labels` again, as a tensor computed from `value` `(batch,)` or
    `(batch, 1)`: the same values, except 0 where `value` is NaN. Only for
    uses where a NaN `value` makes the whole row NaN anyway (here it comes
    from a NaN input).

    Rows computed from it wait for `value`, and a compiler cannot merge them
    (common-subexpression elimination) with rows computed from `labels`
    elsewhere. The losses use it so that their `(batch, C)` temporaries
    exist one at a time: the forward pass's rows after the normaliser, the
    backward pass's recomputed rows after the forward pass's value (else a
    scheduler may compute them first and hold them through the forward pass,
    or merge them with the forward pass's and hold those until the backward
    pass).
    """
    return ops.where(ops.isnan(ops.reshape(value, (-1,))), 0, labels)


def _scatter_add(inputs, positions, terms):
    """`inputs` `(batch, C)` with `terms[i, n]` added at `positions[i, n]`."""
    batch = ops.shape(positions)[0]
    rows = ops.broadcast_to(
        ops.expand_dims(ops.arange(batch, dtype="int32"), -1), ops.shape(positions)
    )
    coordinates = ops.reshape(ops.stack([rows, positions], axis=-1), (-1, 2))
    return ops.scatter_update(
        inputs, coordinates, ops.reshape(terms, (-1,)), reduction="add"
    )


def _log_terms(similarity, labels, logits, shift):
    """`z_c - shift + log S[y, c]` for the classes that count, and their
    classes. `shift`: `(batch, 1)` tensors subtracted one after the other
    (see `_log_softmax_shift`)."""
    entries = similarity.sparse_rows(labels)
    if entries is None:
        return _shifted(logits, shift) + similarity.log_rows(labels), None
    # k + 1 logits per example instead of a row of C. The true class enters
    # with log S = log 1 = 0; unused slots have log 0 = -inf and drop out of
    # the logsumexp.
    positions, weights = entries
    terms = _shifted(ops.take_along_axis(logits, positions, axis=-1), shift)
    return terms + ops.log(weights), positions


def _weight_terms(similarity, labels, probabilities):
    """`(S[y, c], p_c)` for the classes that count, and their classes."""
    entries = similarity.sparse_rows(labels)
    if entries is None:
        return similarity.rows(labels), probabilities, None
    positions, weights = entries
    return weights, ops.take_along_axis(probabilities, positions, axis=-1), positions


def _logit_loss(similarity, labels, logits):
    """Per-example SimLoss from logits; shape `(batch,)`.

    `-log(sum_c S[y, c] softmax(z)_c)`, computed in log space as
    `-logsumexp(log_softmax(z) + log S[y])` (every term `<= 0`, so nothing
    overflows). The gradient `d/dz = softmax(z) - q`, with
    `q_c = S[y, c] softmax(z)_c / sum_k S[y, k] softmax(z)_k`, is rebuilt in
    the backward pass from the logits and three numbers per example, in one
    elementwise pass over `(batch, C)` (`k + 1` classes for sparse rows).

    Args:
        similarity: a `Similarity`.
        labels: int32 class indices of shape `(batch,)`.
        logits: float32 tensor of shape `(batch, C)`.
    """

    def forward(logits, labels):
        # Log-softmax is `(z - max z) - log(sum(exp(z - max z)))`: both
        # numbers are kept (not their rounded sum, the logsumexp, whose
        # rounding at large |z| would shift every softmax entry alike). The
        # weighted sum waits for them, so a compiler runs the two reductions
        # one after the other and holds one temporary (batch, C) buffer at a
        # time, not two.
        shift = _log_softmax_shift(logits)
        saved = _log_terms(similarity, _after(labels, shift[1]), logits, shift)
        value = -ops.logsumexp(saved[0], axis=-1)
        if not similarity.keep_rows:
            saved = None  # nothing of size (batch, C) kept for backward
        return value, (shift, value, saved)

    def backward(logits, labels, residuals, upstream):
        shift, value, saved = residuals
        terms, positions = saved or _log_terms(
            similarity, _after(labels, value), logits, shift
        )
        upstream = ops.expand_dims(upstream, -1)
        softmax = ops.exp((logits - shift[0]) - shift[1])
        # q = exp(terms - log(sum(exp(terms)))) = exp(terms + value)
        q = ops.exp(terms + ops.expand_dims(value, -1))
        if positions is None:
            return (softmax - q) * upstream
        return _scatter_add(softmax * upstream, positions, -q * upstream)

    return _with_gradient(similarity, forward, backward, logits, labels)


def _probability_loss(similarity, labels, probabilities, epsilon):
    """Per-example SimLoss from probabilities; shape `(batch,)`.

    `p` is clipped to `[epsilon, 1 - epsilon]` (so that log never sees 0)
    and divided by its sum: `loss = -log(sum_c S[y, c] p_c / sum_c p_c)`.
    The gradient `d/dp_c = m_c (1 / sum_k p_k - S[y, c] / sum_k S[y, k] p_k)`,
    with `m_c = 1` where `epsilon <= p_c <= 1 - epsilon` and 0 where the clip
    holds `p_c`, is rebuilt in the backward pass from `p` and two numbers per
    example.

    Args:
        similarity: a `Similarity`.
        labels: int32 class indices of shape `(batch,)`.
        probabilities: float32 tensor of shape `(batch, C)`.
        epsilon: the clipping bound, in `(0, 0.5)`.
    """
    low, high = float(epsilon), 1.0 - float(epsilon)

    def forward(probabilities, labels):
        # The weighted sum divides by the total: as in `_logit_loss`, the two
        # reductions then run one after the other.
        total = ops.sum(ops.clip(probabilities, low, high), axis=-1)
        total = ops.expand_dims(total, -1)
        saved = _weight_terms(similarity, _after(labels, total), probabilities)
        weights, values, _ = saved
        weighted = ops.sum(weights * (ops.clip(values, low, high) / total), -1)
        if not similarity.keep_rows:
            saved = None  # nothing of size (batch, C) kept for backward
        return -ops.log(weighted), (total, weighted, saved)

    def backward(probabilities, labels, residuals, upstream):
        total, weighted, saved = residuals
        weights, values, positions = saved or _weight_terms(
            similarity, _after(labels, weighted), probabilities
        )
        scale = ops.expand_dims(upstream, -1) / total
        whole = ops.where((probabilities >= low) & (probabilities <= high), scale, 0.0)
        part = ops.where(
            (values >= low) & (values <= high),
            weights * (scale / ops.expand_dims(weighted, -1)),
            0.0,
        )
        if positions is None:
            return whole - part
        return _scatter_add(whole, positions, -part)

    return _with_gradient(similarity, forward, backward, probabilities, labels)


# Soft-label cross entropy ------------------------------------------------------
#
# Targets `q = softmax(beta * S[y])`. The largest entry of a row of `S` is its
# diagonal, 1, so `q_c = w_c / sum_k w_k` with `w_c = exp(beta (S[y, c] - 1))
# <= 1`: nothing overflows at any beta. For a similarity with sparse rows,
# every class off the `k + 1` listed ones has `S = 0`, so its weight is the
# same `base = exp(-beta)`; the listed ones carry `w - base` on top, and the
# total is `C base + sum (w - base)`: `O(k)` work beyond the logits' own
# reductions, as for SimLoss. Gradients in closed form, as for SimLoss:
# `softmax(z) - q` from logits; from probabilities `m_c (1 / T - q_c / p_c)`
# with `T` the clipped total and `m_c` the clip's mask.


def _soft_targets(similarity, labels, beta):
    """`(weights, positions, base, total)`: `q = (base + weights at positions)
    / total` (`positions` `None`: `weights` are whole rows and `base` 0)."""
    entries = similarity.sparse_rows(labels)
    if entries is None:
        weights = ops.exp(beta * (similarity.rows(labels) - 1.0))
        return weights, None, 0.0, ops.sum(weights, axis=-1, keepdims=True)
    positions, values = entries
    base = math.exp(-beta)
    # Unused slots (similarity 0) carry exactly nothing on top of the base.
    weights = ops.where(values > 0.0, ops.exp(beta * (values - 1.0)) - base, 0.0)
    total = similarity.num_classes * base + ops.sum(weights, axis=-1, keepdims=True)
    return weights, positions, base, total


def _target_sum(targets, log_p, log_p_sum):
    """`sum_c q_c log p_c` per example, `(batch,)`: `log_p` is `(batch, C)`
    (whole rows) or the listed classes' `(batch, n)`; `log_p_sum` the sum of
    `log p` over all classes (sparse rows only)."""
    weights, positions, base, total = targets
    # A weight that underflowed to 0 contributes 0, even against log p = -inf.
    weighted = ops.sum(ops.where(weights > 0.0, weights * log_p, 0.0), axis=-1)
    if positions is not None and base > 0.0:
        weighted = weighted + base * log_p_sum
    return weighted / ops.squeeze(total, -1)


def _soft_logit_loss(similarity, labels, logits, beta):
    """Per-example soft-label cross entropy from logits; shape `(batch,)`."""
    num_classes = similarity.num_classes

    def targets_and_logs(labels, logits, shift):
        targets = _soft_targets(similarity, labels, beta)
        positions = targets[1]
        if positions is None:
            return targets, _shifted(logits, shift), None
        picked = _shifted(ops.take_along_axis(logits, positions, axis=-1), shift)
        # sum_c log p_c = sum_c (z_c - max z) - C log(sum exp(z - max z)):
        # terms <= 0, so the sum does not cancel large logits.
        total = ops.sum(logits - shift[0], axis=-1) - num_classes * ops.squeeze(
            shift[1], -1
        )
        return targets, picked, total

    def forward(logits, labels):
        shift = _log_softmax_shift(logits)
        targets, log_p, log_p_sum = targets_and_logs(
            _after(labels, shift[1]), logits, shift
        )
        return -_target_sum(targets, log_p, log_p_sum), (shift,)

    def backward(logits, labels, residuals, upstream):
        (shift,) = residuals
        weights, positions, base, total = _soft_targets(
            similarity, _after(labels, shift[1]), beta
        )
        upstream = ops.expand_dims(upstream, -1)
        softmax = ops.exp((logits - shift[0]) - shift[1])
        if positions is None:
            return (softmax - weights / total) * upstream
        return _scatter_add(
            (softmax - base / total) * upstream,
            positions,
            -(weights / total) * upstream,
        )

    return _with_gradient(similarity, forward, backward, logits, labels)


def _soft_probability_loss(similarity, labels, probabilities, epsilon, beta):
    """Per-example soft-label cross entropy from probabilities, clipped to
    `[epsilon, 1 - epsilon]` and divided by their sum, as in `sim_loss`."""
    low, high = float(epsilon), 1.0 - float(epsilon)

    def forward(probabilities, labels):
        clipped = ops.clip(probabilities, low, high)
        total = ops.sum(clipped, axis=-1, keepdims=True)
        targets = _soft_targets(similarity, _after(labels, total), beta)
        positions = targets[1]
        if positions is None:
            log_p, log_sum = ops.log(clipped), None
        else:
            log_p = ops.log(
                ops.clip(ops.take_along_axis(probabilities, positions, -1), low, high)
            )
            log_sum = ops.sum(ops.log(clipped), axis=-1)
        loss = ops.log(ops.squeeze(total, -1)) - _target_sum(targets, log_p, log_sum)
        return loss, (total,)

    def backward(probabilities, labels, residuals, upstream):
        (total,) = residuals
        weights, positions, base, target_total = _soft_targets(
            similarity, _after(labels, total), beta
        )
        upstream = ops.expand_dims(upstream, -1)
        inside = (probabilities >= low) & (probabilities <= high)
        if positions is None:
            gradient = 1.0 / total - (weights / target_total) / probabilities
            return ops.where(inside, gradient * upstream, 0.0)
        whole = ops.where(
            inside,
            (1.0 / total - (base / target_total) / probabilities) * upstream,
            0.0,
        )
        values = ops.take_along_axis(probabilities, positions, axis=-1)
        part = ops.where(
            (values >= low) & (values <= high),
            (weights / target_total) / values * upstream,
            0.0,
        )
        return _scatter_add(whole, positions, -part)

    return _with_gradient(similarity, forward, backward, probabilities, labels)


def check_beta(beta):
    """Validates the soft labels' `beta`: a finite number `>= 0`."""
    return _utils.check_number("beta", beta, 0.0)


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
    whatever the inputs' dtype, with the gradient in closed form (see
    `_logit_loss` and `_probability_loss` above).

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
        An example whose predictions hold a NaN, or whose probabilities an
        infinity, has a NaN loss.

    Example:

    >>> from keras_simloss import similarity
    >>> loss = sim_loss([0], [[0.2, 0.5, 0.3]], similarity.ordinal(3, 0.5))
    >>> round(float(loss[0]), 6)  # -log(0.2 + 0.5 * 0.5 + 0.25 * 0.3)
    0.644357

    Reference:
        Kobs et al., "SimLoss: Class Similarities in Cross Entropy", 2020.
        https://arxiv.org/abs/2003.03182
    """
    return _per_example(
        "SimLoss",
        y_true,
        y_pred,
        similarity,
        from_logits,
        _logit_loss,
        _probability_loss,
    )


def _per_example(
    owner, y_true, y_pred, similarity, from_logits, logit_loss, probability_loss
):
    """The shapes, checks and NaN rules shared by the losses; `logit_loss`
    and `probability_loss` compute the loss of a flat batch."""
    similarity = similarity_lib.get(similarity)
    # float32 whatever the policy: float16 rounds small probabilities to 0
    # and overflows exp of moderate logits.
    y_pred = ops.cast(ops.convert_to_tensor(y_pred), "float32")
    num_classes = _utils.static_num_classes(y_pred)
    _utils.check_num_classes(similarity.num_classes, num_classes, owner)
    labels, valid = _utils.sparse_labels(y_true, y_pred)
    # The similarities work on a flat batch: (..., C) -> (N, C).
    leading = ops.shape(labels)
    labels = ops.reshape(labels, (-1,))
    y_pred = ops.reshape(y_pred, (-1, num_classes))
    if 0 in tuple(y_pred.shape):
        # An empty batch has an empty loss, as Keras's cross entropies give
        # (Keras's `max` refuses an empty tensor on TensorFlow and PyTorch).
        return ops.zeros(leading, "float32")
    if from_logits:
        loss = logit_loss(similarity, labels, y_pred)
    else:
        # Clipped so that log never sees 0 and divided by the total, so
        # unnormalised inputs are treated as distributions. The clip would
        # turn an infinite entry into 1 - epsilon: such a row gives NaN
        # instead, as a NaN does. (Its plain sum is not finite; a sum reads
        # the row with no elementwise producer, so XLA holds no (batch, C)
        # mask for it.)
        loss = probability_loss(similarity, labels, y_pred, keras.config.epsilon())
        finite = ops.isfinite(ops.sum(y_pred, axis=-1))
        loss = _utils.nan_where_invalid(loss, finite)
    # A label that is not a class (seen only inside compiled steps; eager
    # mode raised) gives NaN, never the loss of another class.
    return _utils.nan_where_invalid(ops.reshape(loss, leading), valid)


def soft_label_cross_entropy(y_true, y_pred, similarity, beta, from_logits=False):
    """Per-example cross entropy against soft labels from a class similarity.

    The target of a label `y` is `q = softmax(beta * S[y])`, i.e.
    `q_c ∝ exp(-beta * d(y, c))` with `d = 1 - S` (Bertinetto et al.'s
    soft labels; with `S = ordinal(C, r)`-like distances, SORD), and

        loss = -sum_c q_c log p_c

    `beta = 0` gives uniform targets; large `beta` approaches sparse
    categorical cross entropy (`q` one-hot on `y`). Shapes, label rules,
    NaN rules, float32 numerics and the clipping of probabilities are those
    of `sim_loss`; the gradient is in closed form, and structured
    similarities never form a `C x C` matrix (sparse ones read `k + 1`
    classes per example beyond the logits' own reductions).

    Args:
        y_true: class indices, or one-hot rows (decided by rank).
        y_pred: logits or probabilities of shape `(..., C)`.
        similarity: a `Similarity` or a `(C, C)` array-like.
        beta: the targets' sharpness, a finite number `>= 0`.
        from_logits: whether `y_pred` holds logits. Defaults to `False`.

    Returns:
        A float32 tensor of shape `y_pred.shape[:-1]`.

    Example:

    >>> from keras_simloss import similarity
    >>> s = similarity.ordinal(3, 0.5)
    >>> loss = soft_label_cross_entropy([0], [[0.5, 0.3, 0.2]], s, beta=2.0)
    >>> q = np.exp(2.0 * np.array([1.0, 0.5, 0.25]))
    >>> q /= q.sum()
    >>> round(float(loss[0]), 5) == round(float(-(q * np.log([0.5, 0.3, 0.2])).sum()), 5)
    True

    Reference:
        Bertinetto, Mueller, Tertikas, Samangooei, Lord, "Making Better
        Mistakes: Leveraging Class Hierarchies with Deep Networks", CVPR
        2020, https://arxiv.org/abs/1912.09393 (soft labels). Diaz, Marathe,
        "Soft Labels for Ordinal Regression", CVPR 2019 (SORD).
    """
    beta = check_beta(beta)
    from_logits = _utils.check_bool("from_logits", from_logits)
    return _per_example(
        "SoftLabelCrossEntropy",
        y_true,
        y_pred,
        similarity,
        from_logits,
        lambda s, labels, logits: _soft_logit_loss(s, labels, logits, beta),
        lambda s, labels, p, eps: _soft_probability_loss(s, labels, p, eps, beta),
    )


class _SimilarityLoss(SimilarityHolder, keras.losses.Loss):
    """What the losses over a class similarity share: the dtype rule, the
    similarity's config and its arrays in the `.keras` archive."""

    def __init__(self, similarity, from_logits, reduction, name, dtype):
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
        self.from_logits = _utils.check_bool("from_logits", from_logits)
        self.similarity = similarity_lib.get(similarity)

    @property
    def num_classes(self):
        """The number of classes `C` of the similarity."""
        return self.similarity.num_classes

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "similarity": keras.saving.serialize_keras_object(self.similarity),
                "from_logits": self.from_logits,
            }
        )
        return config


@_utils.register
class SimLoss(_SimilarityLoss):
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
        super().__init__(similarity, from_logits, reduction, name, dtype)

    def call(self, y_true, y_pred):
        return sim_loss(y_true, y_pred, self.similarity, from_logits=self.from_logits)


@_utils.register
class SoftLabelCrossEntropy(_SimilarityLoss):
    """Cross entropy against soft labels `softmax(beta * S[y])`.

    The best-known alternative to SimLoss for "better mistakes": instead of
    counting mass on similar classes as partly correct (SimLoss), it trains
    the model to put mass on them, in proportion to `exp(-beta * (1 - S))`
    (Bertinetto et al., 2020; SORD, Diaz & Marathe, 2019, for ordered
    classes). See `soft_label_cross_entropy` for the formula and rules.

    Args:
        similarity: a `Similarity` or a `(C, C)` array-like, as for `SimLoss`.
        beta: the targets' sharpness, a finite number `>= 0`: 0 gives
            uniform targets, large values cross entropy. Bertinetto et al.
            searched beta over 4 to 30 on hierarchy distances scaled to
            [0, 1]; pick it on held-out data.
        from_logits: whether `y_pred` holds logits. Defaults to `False`.
        reduction: as for any Keras loss. Defaults to `"sum_over_batch_size"`.
        name: Defaults to `"soft_label_cross_entropy"`.
        dtype: `"float32"`, `"float64"` or `None`, as for `SimLoss`.

    Example:

    >>> from keras_simloss import similarity
    >>> loss = SoftLabelCrossEntropy(similarity.ordinal(5, 0.5), beta=5.0)
    >>> float(loss([2], [[0.0, 0.0, 1.0, 0.0, 0.0]])) > 0  # q is not one-hot
    True

    In a model: `model.compile(loss=SoftLabelCrossEntropy(s, beta=10.0,
    from_logits=True))`.
    """

    def __init__(
        self,
        similarity,
        beta,
        from_logits=False,
        reduction="sum_over_batch_size",
        name="soft_label_cross_entropy",
        dtype=None,
    ):
        super().__init__(similarity, from_logits, reduction, name, dtype)
        self.beta = check_beta(beta)

    def call(self, y_true, y_pred):
        return soft_label_cross_entropy(
            y_true, y_pred, self.similarity, self.beta, from_logits=self.from_logits
        )

    def get_config(self):
        config = super().get_config()
        config["beta"] = self.beta
        return config
