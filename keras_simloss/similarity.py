"""Class-similarity matrices for `SimLoss` and `MistakeSeverity`.

A class similarity `S` is a `C x C` matrix with entries in `[0, 1]` and a unit
diagonal: `S[i, j]` says how acceptable it is to predict class `j` when the
answer is class `i`. This module builds `S` from the sources a user has:

- `ordinal(num_classes, reduction_factor)`: ordered classes (ages, ratings),
  `S[i, j] = r ** |i - j|` (Kobs et al., Eq. 2).
- `lower_bound(similarities, lower_bound)`: any similarity table, rescaled so
  that values below the bound `l` count as unrelated (Eq. 3).
- `from_embeddings(vectors, lower_bound)`: cosine similarity of class-name
  embeddings (word vectors), clipped at 0, then Eq. 3.
- `from_hierarchy(ancestors, similarities)`: classes that share a parent
  (e.g. CIFAR-100's superclasses) get a fixed similarity.
- `from_confusion(confusion, lower_bound)`: classes a model confuses (Eq. 3).
- `top_k(similarity, k)`: keeps only the `k` most similar classes per class,
  for label spaces too large for a dense matrix.

Each builder returns a `Similarity`. It stores only what it was built from
(so a 1,000-class ordinal matrix is two numbers in a saved config), computes
the rows it needs inside the loss with `keras.ops`, and turns into the dense
`float32` matrix with `numpy.asarray(similarity)`. Structured similarities
(ordinal, embeddings, hierarchy, sparse) never build `C x C` inside the loss:
they compute the rows of the batch's labels on the fly, so they scale to
label spaces where a dense matrix would not fit in memory. State that is
data (embedding tables, neighbour lists, hand-made matrices) goes into a
`.keras` file as binary arrays, not into the config (see `Similarity`).

Reference:
    Kobs, Steininger, Zehe, Lautenschlager, Hotho, "SimLoss: Class
    Similarities in Cross Entropy", 2020. https://arxiv.org/abs/2003.03182
"""

import hashlib
import math
import weakref

import keras
import numpy as np
from keras import ops

from keras_simloss import _utils

__all__ = [
    "EmbeddingSimilarity",
    "HierarchySimilarity",
    "MatrixSimilarity",
    "OrdinalSimilarity",
    "Similarity",
    "SparseSimilarity",
    "from_confusion",
    "from_embeddings",
    "from_hierarchy",
    "get",
    "lower_bound",
    "ordinal",
    "top_k",
]

# Dense matrices up to this many classes are checked entry by entry after a
# builder made them (C^2 work); larger ones rely on the argument checks, which
# already guarantee the properties.
_MAX_CLASSES_CHECKED_DENSE = 2048


def _check_num_classes(num_classes, name="num_classes"):
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)):
        raise TypeError(
            f"Invalid type for argument `{name}`. Expected an int. "
            f"Received: {name}={num_classes!r} of type "
            f"{type(num_classes).__name__}"
        )
    if num_classes < 2:
        raise ValueError(
            f"Invalid value for argument `{name}`. Expected {name} >= 2. "
            f"Received: {name}={num_classes}"
        )
    return int(num_classes)


def _real_array(value, name, expected, integer=False):
    """`value` as a NumPy array of real numbers (or of integers).

    `numpy.asarray(value, float)` would also take numeric strings ("0.5") and
    drop the imaginary part of complex numbers, so the dtype is checked
    before any conversion.
    """
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as error:  # e.g. ragged nested lists
        raise TypeError(
            f"Invalid type for argument `{name}`. Expected {expected} of "
            f"{'integers' if integer else 'real numbers'}. Received: {name} of "
            f"type {type(value).__name__} ({error})"
        ) from None
    kinds = "iu" if integer else "biuf"
    if array.dtype.kind not in kinds:
        raise TypeError(
            f"Invalid type for argument `{name}`. Expected {expected} of "
            f"{'integers' if integer else 'real numbers'}. Received: {name} of "
            f"dtype {array.dtype}"
        )
    return array


def validate_matrix(matrix, name="similarity"):
    """Checks that `matrix` is a valid class similarity; returns it as float32.

    Valid means: a square 2-D array of at least 2 classes, finite, with every
    entry in `[0, 1]` and a diagonal of exactly 1.

    Args:
        matrix: array-like of shape `(C, C)`.
        name: the argument name used in error messages.

    Returns:
        A `float32` NumPy array of shape `(C, C)`.
    """
    array = _real_array(matrix, name, "a square matrix").astype(np.float64)
    if array.ndim != 2 or array.shape[0] != array.shape[1] or array.shape[0] < 2:
        raise ValueError(
            f"Invalid value for argument `{name}`. Expected a square matrix of "
            f"shape (C, C) with C >= 2. Received: {name}.shape={array.shape}"
        )
    if not np.all(np.isfinite(array)):
        where = tuple(int(i) for i in np.argwhere(~np.isfinite(array))[0])
        raise ValueError(
            f"Invalid value for argument `{name}`. Expected finite values. "
            f"Received: {name}[{where[0]}, {where[1]}]={array[where]}"
        )
    outside = (array < 0) | (array > 1)
    if np.any(outside):
        where = tuple(int(i) for i in np.argwhere(outside)[0])
        raise ValueError(
            f"Invalid value for argument `{name}`. Expected every entry in "
            f"[0, 1]. Received: {name}[{where[0]}, {where[1]}]={array[where]}"
        )
    diagonal = np.diagonal(array)
    if np.any(diagonal != 1):
        i = int(np.argmax(diagonal != 1))
        raise ValueError(
            f"Invalid value for argument `{name}`. Expected a diagonal of "
            f"exactly 1 (every class is fully similar to itself). Received: "
            f"{name}[{i}, {i}]={diagonal[i]}"
        )
    return array.astype(np.float32)


def _int32(x):
    return ops.cast(_as_tensor(x), "int32")


def _float32(x):
    return ops.cast(_as_tensor(x), "float32")


def _as_tensor(x):
    """`x` as a tensor; on TensorFlow a `tf.Variable` is read (some ops need
    a tensor's `ndim`, which a variable lacks)."""
    x = ops.convert_to_tensor(x)
    if keras.config.backend() == "tensorflow":
        import tensorflow as tf

        if isinstance(x, tf.Variable):
            x = tf.convert_to_tensor(x)
    return x


def _spread(terms, positions, like):
    """Per-class values: `terms` itself for whole rows, else `terms` placed at
    `positions` in a zero tensor shaped `like` (summed where they repeat)."""
    if positions is None:
        return terms
    return _scatter_add(ops.zeros_like(like), positions, terms)


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
    uses where a NaN `value` makes the whole row NaN anyway (in
    `logit_loss` and `probability_loss` it comes from a NaN input).

    Rows computed from it wait for `value`, and a compiler cannot merge them
    (common-subexpression elimination) with rows computed from `labels`
    elsewhere. `logit_loss` and `probability_loss` use it so that their
    `(batch, C)` temporaries exist one at a time: the forward pass's rows
    after the normaliser, the backward pass's recomputed rows after the
    forward pass's value (else a scheduler may compute them first and hold
    them through the forward pass, or merge them with the forward pass's and
    hold those until the backward pass).
    """
    return ops.where(ops.isnan(ops.reshape(value, (-1,))), 0, labels)


def _with_gradient(forward, backward, inputs, labels):
    """`forward(inputs, labels)[0]` with a gradient defined in closed form.

    `forward(inputs, labels)` returns `(value, residuals)`;
    `backward(inputs, labels, residuals, upstream)` returns the gradient
    with respect to `inputs` (labels have none). Only `inputs`, `labels` and
    `residuals` are kept for the backward pass, which computes everything
    else itself. JAX gets an explicit `jax.custom_vjp` with exactly these
    residuals, rather than `jax.custom_gradient` (what
    `keras.ops.custom_gradient` uses), whose residuals are whatever its
    backward rule closes over; elsewhere `keras.ops.custom_gradient`. (As
    for any `custom_vjp`, JAX's forward-mode differentiation, `jax.jvp`,
    does not apply; `jax.grad` and its nestings do.)
    """
    if keras.config.backend() == "jax":
        import jax

        @jax.custom_vjp
        def function(inputs, labels):
            return forward(inputs, labels)[0]

        def function_forward(inputs, labels):
            value, residuals = forward(inputs, labels)
            return value, (inputs, labels, residuals)

        def function_backward(saved, upstream):
            inputs, labels, residuals = saved
            return backward(inputs, labels, residuals, upstream), None

        function.defvjp(function_forward, function_backward)
        return function(inputs, labels)

    @ops.custom_gradient
    def function(inputs, labels):
        value, residuals = forward(inputs, labels)

        def gradient(*args, upstream=None):
            upstream = args[0] if upstream is None else upstream
            return backward(inputs, labels, residuals, upstream), None

        return value, gradient

    return function(inputs, labels)


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


def _eager_tensor(name, array):
    """`array` as a backend tensor created outside any traced function."""
    backend = keras.config.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.init_scope():
            return tf.Variable(array, trainable=False, name=name)
    if backend == "jax":
        import jax

        with jax.ensure_compile_time_eval():
            return ops.convert_to_tensor(array)
    if backend == "torch":
        import torch

        # On Keras's default device, named explicitly: the first call may
        # come from Keras's symbolic build, which runs under the "meta"
        # device (shapes only, no values), and a cached meta tensor would
        # give garbage later. A graph break on the first call only: the
        # tensor is made eagerly and `torch.compile` then reads it like any
        # other captured tensor.
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return torch.compiler.disable(torch.as_tensor)(array, device=device)
    return ops.convert_to_tensor(array)


class Similarity:
    """Base class of a `C x C` class similarity stored in compact form.

    Subclasses implement `_compute_rows` (the similarity rows of a batch of
    labels, with `keras.ops`, traceable under XLA) and `numpy_rows` (the same
    in NumPy, outside the graph), plus `get_config`. `SimLoss` calls
    `logit_loss` and `probability_loss`, metrics call `pairs`; a subclass
    with a cheaper form (such as sparse neighbour lists) overrides the pieces
    they are made of (`_log_terms`, `_weight_terms`, `_pairs`).

    `numpy.asarray(similarity)` gives the dense `float32` matrix.

    Saving. Small state is written into the config as numbers. State that is
    data (an embedding table, neighbour lists, a hand-made matrix) with more
    than `config_max_entries` numbers is kept out of the config, which then
    holds only its shape (a few hundred bytes whatever `C`), and is written as
    binary arrays into the `.keras` archive by `save_own_variables` (Keras
    calls it through `SimLoss`). `from_config` of such a config gives a
    similarity whose arrays are still missing: `load_own_variables` (called
    by `keras.models.load_model`) supplies them, or, within one process, any
    live similarity with the same arrays (matched by a content hash, so a
    `MistakeSeverity` sharing the loss's similarity is restored with it).
    """

    num_classes = None

    # Array state with more numbers than this is saved as binary arrays in
    # the `.keras` archive rather than as JSON numbers in the config.
    config_max_entries = 256

    # The array arguments of the constructor (saved as arrays when large).
    _array_arguments = ()

    # Whether `logit_loss`, `probability_loss`, `log_weighted_sum_exp` and
    # `weighted_sum` define their gradient in closed form (`_with_gradient`)
    # rather than by automatic differentiation, which keeps `(batch, C)`
    # buffers from the forward pass for the backward one (`exp(z - max z)`
    # of the logsumexp; the rows). False is kept for tests, which check that
    # both give the same gradients.
    _closed_form_gradient = True

    # With the closed form: whether the backward pass recomputes the rows
    # (for tables, ordinal and hierarchy rows an elementwise pass that the
    # compiler fuses into the gradient's; for neighbour lists a gather of
    # k + 1 logits; for embeddings a second product, see `keep_rows`)
    # instead of keeping them from the forward pass, which would hold a
    # `(batch, C)` buffer through it.
    _recompute_rows = True

    # Up to this many classes, rows are gathered from a dense table built
    # once (C^2 floats, at most 4 MiB) rather than computed for every batch:
    # a gather is the cheapest row there is. Larger label spaces compute the
    # rows of the batch's labels on the fly and never hold C x C.
    dense_table_max_classes = 1024

    def _use_dense_table(self):
        return self.num_classes <= self.dense_table_max_classes

    def _tensor(self, key, make_array):
        """The array `make_array()` as a tensor, made once and reused.

        The first call may come from inside a traced function (`tf.function`,
        `jax.jit`, `torch.compile`), yet the cached tensor outlives that
        trace, so it is always created outside every trace (a tensor made
        inside one would leak, e.g. JAX's `UnexpectedTracerError`):

        - TensorFlow: a non-trainable `tf.Variable` made under
          `tf.init_scope`. A traced or XLA function reads it as an input
          instead of embedding a copy of the table as a constant in the
          graph and in every compiled program.
        - JAX: a concrete array made under `jax.ensure_compile_time_eval`.
        - PyTorch: a plain tensor, made outside `torch.compile`'s graph.
        """
        cache = self.__dict__.setdefault("_tensors", {})
        if key not in cache:
            cache[key] = _eager_tensor(key, make_array())
        return _as_tensor(cache[key])  # on TensorFlow, a read of the variable

    def _dense_tables(self):
        """`(S, log S)` as float32 NumPy arrays, built on first use."""
        tables = getattr(self, "_tables", None)
        if tables is None:
            matrix = np.asarray(self, dtype=np.float32)
            with np.errstate(divide="ignore"):
                tables = (matrix, np.log(matrix))  # log 0 = -inf, on purpose
            self._tables = tables
        return tables

    def rows(self, labels):
        """Rows `S[labels]` as a `float32` tensor of shape `(batch, C)`."""
        if self._use_dense_table():
            table = self._tensor("similarity_table", lambda: self._dense_tables()[0])
            return ops.take(table, labels, axis=0)
        return self._compute_rows(labels)

    def log_rows(self, labels):
        """`log(S[labels])`, `-inf` where the similarity is 0."""
        if self._use_dense_table():
            table = self._tensor(
                "log_similarity_table", lambda: self._dense_tables()[1]
            )
            return ops.take(table, labels, axis=0)
        return self._compute_log_rows(labels)

    def _compute_rows(self, labels):
        """Rows computed on the fly with `keras.ops`, without a C x C table."""
        raise NotImplementedError

    def _compute_log_rows(self, labels):
        return ops.log(self._compute_rows(labels))

    def numpy_rows(self, classes):
        """Rows `S[classes]` as a `float32` NumPy array, computed eagerly."""
        raise NotImplementedError

    def log_weighted_sum_exp(self, labels, logits):
        """`log(sum_c S[y, c] * exp(z_c))` for each example; shape `(batch,)`.

        Computed as `logsumexp(z + log S[y])`: entries with similarity 0 get
        `-inf` and drop out, and the unit diagonal keeps one finite term.

        The gradient is `d/dz_c = q_c` with
        `q_c = S[y, c] exp(z_c) / sum_k S[y, k] exp(z_k)`, defined in closed
        form and rebuilt in the backward pass (as in `logit_loss`, which is
        what `SimLoss` uses).

        Args:
            labels: integer class indices of shape `(batch,)`.
            logits: float tensor of shape `(batch, C)`; computed in float32.

        Returns:
            A float32 tensor of shape `(batch,)`.
        """
        labels = _int32(labels)
        logits = _float32(logits)
        if not self._closed_form_gradient:
            return ops.logsumexp(self._log_terms(labels, logits)[0], axis=-1)

        def forward(logits, labels):
            saved = self._log_terms(labels, logits)
            value = ops.logsumexp(saved[0], axis=-1)
            if self._recompute_rows:
                saved = None  # nothing of size (batch, C) kept for backward
            return value, (value, saved)

        def backward(logits, labels, residuals, upstream):
            value, saved = residuals
            terms, positions = saved or self._log_terms(labels, logits)
            q = ops.exp(terms - ops.expand_dims(value, -1))
            q = q * ops.expand_dims(upstream, -1)
            return _spread(q, positions, logits)

        return _with_gradient(forward, backward, logits, labels)

    def weighted_sum(self, labels, probabilities):
        """`sum_c S[y, c] * p_c` for each example; shape `(batch,)`.

        The gradient is `d/dp_c = S[y, c]`, defined in closed form as for
        `log_weighted_sum_exp`.

        Args:
            labels: integer class indices of shape `(batch,)`.
            probabilities: float tensor of shape `(batch, C)`; computed in
                float32.

        Returns:
            A float32 tensor of shape `(batch,)`.
        """
        labels = _int32(labels)
        probabilities = _float32(probabilities)
        if not self._closed_form_gradient:
            weights, values, _ = self._weight_terms(labels, probabilities)
            return ops.sum(weights * values, axis=-1)

        def forward(probabilities, labels):
            saved = self._weight_terms(labels, probabilities)
            value = ops.sum(saved[0] * saved[1], axis=-1)
            if self._recompute_rows:
                saved = None  # nothing of size (batch, C) kept for backward
            return value, (value, saved)

        def backward(probabilities, labels, residuals, upstream):
            value, saved = residuals
            weights, _, positions = saved or self._weight_terms(labels, probabilities)
            weights = weights * ops.expand_dims(upstream, -1)
            return _spread(weights, positions, probabilities)

        return _with_gradient(forward, backward, probabilities, labels)

    def logit_loss(self, labels, logits):
        """Per-example SimLoss from logits; shape `(batch,)`.

        `-log(sum_c S[y, c] softmax(z)_c)`, computed in log space as
        `-logsumexp(log_softmax(z) + log S[y])` (every term `<= 0`, so
        nothing overflows). The gradient `d/dz = softmax(z) - q`, with
        `q_c = S[y, c] softmax(z)_c / sum_k S[y, k] softmax(z)_k`, is defined
        in closed form and rebuilt in the backward pass from the logits and
        three numbers per example, in one elementwise pass over `(batch, C)`
        (`k + 1` classes for a `SparseSimilarity`). Automatic
        differentiation of the same formula would keep `(batch, C)` buffers
        (`exp(z - max z)`, the rows) from the forward pass for the backward
        one; this keeps none, so training holds no more `(batch, C)` buffers
        than sparse categorical cross entropy (measured under XLA in
        `benchmarks/large_labels.py`). `SimLoss` calls this.

        Args:
            labels: integer class indices of shape `(batch,)`.
            logits: float tensor of shape `(batch, C)`; computed in float32.

        Returns:
            A float32 tensor of shape `(batch,)`.
        """
        labels = _int32(labels)
        logits = _float32(logits)
        if not self._closed_form_gradient:
            shift = _log_softmax_shift(logits)
            terms, _ = self._log_terms(labels, logits, shift)
            return -ops.logsumexp(terms, axis=-1)

        def forward(logits, labels):
            # Log-softmax is `(z - max z) - log(sum(exp(z - max z)))`: both
            # numbers are kept (not their rounded sum, the logsumexp, whose
            # rounding at large |z| would shift every softmax entry alike).
            # The weighted sum waits for them, so a compiler runs the two
            # reductions one after the other and holds one temporary
            # (batch, C) buffer at a time, not two.
            shift = _log_softmax_shift(logits)
            saved = self._log_terms(_after(labels, shift[1]), logits, shift)
            value = -ops.logsumexp(saved[0], axis=-1)
            if self._recompute_rows:
                saved = None  # nothing of size (batch, C) kept for backward
            return value, (shift, value, saved)

        def backward(logits, labels, residuals, upstream):
            shift, value, saved = residuals
            terms, positions = saved or self._log_terms(
                _after(labels, value), logits, shift
            )
            upstream = ops.expand_dims(upstream, -1)
            softmax = ops.exp((logits - shift[0]) - shift[1])
            # q = exp(terms - log(sum(exp(terms)))) = exp(terms + value)
            q = ops.exp(terms + ops.expand_dims(value, -1))
            if positions is None:
                return (softmax - q) * upstream
            return _scatter_add(softmax * upstream, positions, -q * upstream)

        return _with_gradient(forward, backward, logits, labels)

    def probability_loss(self, labels, probabilities, epsilon):
        """Per-example SimLoss from probabilities; shape `(batch,)`.

        `p` is clipped to `[epsilon, 1 - epsilon]` (so that log never sees
        0) and divided by its sum: `loss = -log(sum_c S[y, c] p_c / sum_c
        p_c)`. The gradient
        `d/dp_c = m_c (1 / sum_k p_k - S[y, c] / sum_k S[y, k] p_k)`, with
        `m_c = 1` where `epsilon <= p_c <= 1 - epsilon` and 0 where the
        clip holds `p_c`, is defined in closed form and rebuilt in the
        backward pass from `p` and two numbers per example, so no
        `(batch, C)` buffer is kept from the forward pass (see
        `logit_loss`). `SimLoss` calls this.

        Args:
            labels: integer class indices of shape `(batch,)`.
            probabilities: float tensor of shape `(batch, C)`; computed in
                float32.
            epsilon: the clipping bound, in `(0, 0.5)`.

        Returns:
            A float32 tensor of shape `(batch,)`.
        """
        labels = _int32(labels)
        probabilities = _float32(probabilities)
        low, high = float(epsilon), 1.0 - float(epsilon)

        def forward(probabilities, labels):
            # The weighted sum divides by the total: as in `logit_loss`, the
            # two reductions then run one after the other.
            total = ops.sum(ops.clip(probabilities, low, high), axis=-1)
            total = ops.expand_dims(total, -1)
            saved = self._weight_terms(_after(labels, total), probabilities)
            weights, values, _ = saved
            weighted = ops.sum(weights * (ops.clip(values, low, high) / total), -1)
            if self._recompute_rows:
                saved = None  # nothing of size (batch, C) kept for backward
            return -ops.log(weighted), (total, weighted, saved)

        if not self._closed_form_gradient:
            return forward(probabilities, labels)[0]

        def backward(probabilities, labels, residuals, upstream):
            total, weighted, saved = residuals
            weights, values, positions = saved or self._weight_terms(
                _after(labels, weighted), probabilities
            )
            scale = ops.expand_dims(upstream, -1) / total
            whole = ops.where(
                (probabilities >= low) & (probabilities <= high), scale, 0.0
            )
            part = ops.where(
                (values >= low) & (values <= high),
                weights * (scale / ops.expand_dims(weighted, -1)),
                0.0,
            )
            if positions is None:
                return whole - part
            return _scatter_add(whole, positions, -part)

        return _with_gradient(forward, backward, probabilities, labels)

    def pairs(self, labels, classes):
        """`S[labels[i], classes[i]]` for each example; shape `(batch,)`."""
        return self._pairs(_int32(labels), _int32(classes))

    # The per-kind pieces of the three methods above. `positions` is `None`
    # when the terms are whole rows `(batch, C)`, else the class index of
    # each term `(batch, n)` (a sparse similarity's own class and neighbours).

    def _log_terms(self, labels, logits, shift=()):
        """`z_c - shift + log S[y, c]` for the classes that count, and their
        classes. `shift`: `(batch, 1)` tensors subtracted one after the
        other (see `_log_softmax_shift`)."""
        return _shifted(logits, shift) + self.log_rows(labels), None

    def _weight_terms(self, labels, probabilities):
        """`(S[y, c], p_c)` for the classes that count, and their classes."""
        return self.rows(labels), probabilities, None

    def _pairs(self, labels, classes):
        picked = ops.take_along_axis(
            self.rows(labels), ops.expand_dims(classes, -1), axis=-1
        )
        return ops.squeeze(picked, -1)

    def __array__(self, dtype=None, copy=None):
        matrix = np.concatenate(
            [
                self.numpy_rows(np.arange(start, min(start + 1024, self.num_classes)))
                for start in range(0, self.num_classes, 1024)
            ]
        )
        return matrix if dtype is None else matrix.astype(dtype)

    def get_config(self):
        """The constructor arguments; large arrays as placeholders (above)."""
        arguments = self._arguments()
        arrays = self._archived_arrays(arguments)
        config = {}
        for name, value in arguments.items():
            if name in arrays:
                config[name] = {"shape": list(value.shape), "dtype": str(value.dtype)}
            elif isinstance(value, np.ndarray):
                config[name] = value.tolist()
            else:
                config[name] = value
        if arrays:
            config[_ARCHIVE_KEY] = self._fingerprint(arrays)
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        fingerprint = config.pop(_ARCHIVE_KEY, None)
        if fingerprint is None:
            return cls(**config)  # everything in the config (or an old config)
        # The arrays are in a `.keras` archive: `load_own_variables` fills in.
        similarity = cls.__new__(cls)
        similarity._pending = (config, fingerprint)
        similarity.num_classes = config[cls._array_arguments[0]]["shape"][0]
        return similarity

    def save_own_variables(self, store):
        """Writes the arrays that the config leaves out into a Keras store.

        Called by `SimLoss.save_own_variables` (and `MistakeSeverity`'s) when
        Keras saves a `.keras` file; `store` takes NumPy arrays by name.
        """
        if not self._array_arguments:
            return  # the config holds everything
        for name, array in self._archived_arrays(self._arguments()).items():
            store[name] = array

    def load_own_variables(self, store):
        """Reads the arrays that the config left out from a Keras store.

        Does nothing when the config held everything (small state, or a
        config saved before arrays went into the archive).
        """
        pending = self.__dict__.get("_pending")
        if pending is None:
            return
        config, fingerprint = pending
        arrays = {}
        for name in self._array_arguments:
            if not isinstance(config.get(name), dict):
                continue
            if name not in store:
                raise ValueError(
                    f"The saved state of this {type(self).__name__} has no "
                    f"array `{name}`: the `.keras` archive does not match its "
                    f"config. Received arrays: {sorted(store.keys())}"
                )
            arrays[name] = np.asarray(store[name])
        if self._fingerprint(arrays) != fingerprint:
            raise ValueError(
                f"The arrays saved for this {type(self).__name__} do not match "
                "the content hash in its config: the `.keras` archive is "
                "damaged or mixes two saves."
            )
        self._fill(arrays)

    def _arguments(self):
        """The constructor arguments (arrays as NumPy arrays)."""
        raise NotImplementedError

    def _archived_arrays(self, arguments):
        """The array arguments that go into the archive: all, when large."""
        arrays = {name: arguments[name] for name in self._array_arguments}
        if sum(array.size for array in arrays.values()) > self.config_max_entries:
            return arrays
        return {}

    def _fingerprint(self, arrays):
        """A content hash of `arrays` (this similarity's own ones are hashed
        once, and it is registered under the hash)."""
        own = "_pending" not in self.__dict__
        if own and "_own_fingerprint" in self.__dict__:
            return self._own_fingerprint  # the arrays never change
        digest = hashlib.blake2b(type(self).__name__.encode(), digest_size=16)
        for name in sorted(arrays):
            array = np.ascontiguousarray(arrays[name])
            digest.update(f"{name}:{array.dtype.str}:{array.shape}".encode())
            digest.update(memoryview(array).cast("B"))
        fingerprint = digest.hexdigest()
        if own:
            self._own_fingerprint = fingerprint
            _WITH_ARRAYS[fingerprint] = self
        return fingerprint

    def _fill(self, arrays):
        """Completes a similarity made by `from_config` with its arrays."""
        config, fingerprint = self.__dict__.pop("_pending")
        self.__init__(**{**config, **arrays})  # validates them, as on creation
        _WITH_ARRAYS[fingerprint] = self

    def __getattr__(self, name):
        # Only reached when an attribute is missing: the arrays of a
        # similarity made from a config whose arrays are in an archive.
        pending = self.__dict__.get("_pending")
        if pending is None or name.startswith("__"):
            raise AttributeError(
                f"{type(self).__name__!r} object has no attribute {name!r}"
            )
        config, fingerprint = pending
        twin = _WITH_ARRAYS.get(fingerprint)
        if twin is None or "_pending" in twin.__dict__:
            raise ValueError(
                f"This {type(self).__name__} was made from a config whose "
                "arrays are stored in a `.keras` archive, and they were never "
                "loaded. Load the model with `keras.models.load_model(path)` "
                "(its SimLoss restores them; a metric restores them only when "
                "it shares the loss's similarity, since Keras saves no state "
                "of compiled metrics), or build the similarity again."
            )
        self._fill({name: getattr(twin, name) for name in self._array_arguments})
        return getattr(self, name)

    def __repr__(self):
        return f"{type(self).__name__}(num_classes={self.num_classes})"


# The config key that marks arrays stored in the archive; its value is their
# content hash.
_ARCHIVE_KEY = "arrays_in_archive"

# Similarities whose arrays are at hand, by content hash (weakly held).
_WITH_ARRAYS = weakref.WeakValueDictionary()


@_utils.register
class MatrixSimilarity(Similarity):
    """A class similarity given as a full `C x C` matrix.

    Use it for hand-made tables, confusion-derived similarities, or any matrix
    that has no smaller description. The config stores the whole matrix; the
    builders in this module store only their arguments instead.

    Args:
        matrix: array-like of shape `(C, C)`, entries in `[0, 1]`, diagonal 1.

    Example:

    >>> s = MatrixSimilarity([[1.0, 0.5], [0.5, 1.0]])
    >>> s.num_classes
    2
    """

    def __init__(self, matrix):
        self.matrix = validate_matrix(matrix, name="matrix")
        self.num_classes = self.matrix.shape[0]

    def _use_dense_table(self):
        return True  # it is one already

    def numpy_rows(self, classes):
        return self.matrix[np.asarray(classes)]

    def __array__(self, dtype=None, copy=None):
        return self.matrix.copy() if dtype is None else self.matrix.astype(dtype)

    _array_arguments = ("matrix",)

    def _arguments(self):
        return {"matrix": self.matrix}


@_utils.register
class OrdinalSimilarity(Similarity):
    """Similarity of ordered classes: `S[i, j] = r ** |i - j|` (Eq. 2).

    Built by `ordinal`; see there.
    """

    def __init__(self, num_classes, reduction_factor):
        self.num_classes = _check_num_classes(num_classes)
        self.reduction_factor = _utils.check_number(
            "reduction_factor", reduction_factor, 0.0, 1.0
        )

    def _distances(self, labels):
        classes = ops.arange(self.num_classes, dtype="int32")
        return ops.cast(
            ops.abs(ops.expand_dims(labels, -1) - ops.expand_dims(classes, 0)),
            "float32",
        )

    def _compute_rows(self, labels):
        # 0 ** 0 == 1, so reduction_factor=0 gives the identity rows.
        return ops.power(
            ops.convert_to_tensor(self.reduction_factor, "float32"),
            self._distances(labels),
        )

    def _compute_log_rows(self, labels):
        distances = self._distances(labels)
        if self.reduction_factor == 0.0:
            return ops.where(distances == 0, 0.0, float("-inf"))
        # |i - j| * log(r) directly, so far-away classes do not underflow to
        # exp(-inf) before the log.
        return distances * math.log(self.reduction_factor)

    def numpy_rows(self, classes):
        classes = np.asarray(classes)
        distances = np.abs(classes[:, None] - np.arange(self.num_classes)[None, :])
        return (self.reduction_factor ** distances.astype(np.float64)).astype(
            np.float32
        )

    def get_config(self):
        return {
            "num_classes": self.num_classes,
            "reduction_factor": self.reduction_factor,
        }

    def __repr__(self):
        return (
            f"OrdinalSimilarity(num_classes={self.num_classes}, "
            f"reduction_factor={self.reduction_factor})"
        )


@_utils.register
class EmbeddingSimilarity(Similarity):
    """Similarity from class embeddings, computed on the fly.

    `S[i, j] = max(0, s(i, j) - l) / (1 - l)` with `s(i, j) = max(0,
    cos(e_i, e_j))` and an exact unit diagonal (Eq. 3). The loss computes the
    rows of the batch's labels with one `(batch, d) x (d, C)` product, so the
    state is the `C x d` table, never `C x C`. Built by `from_embeddings`
    (see there for `keep_rows`).
    """

    def __init__(self, vectors, lower_bound=0.0, keep_rows=False):
        table = _real_array(vectors, "vectors", "an array").astype(np.float32)
        if table.ndim != 2 or table.shape[0] < 2 or table.shape[1] < 1:
            raise ValueError(
                "Invalid value for argument `vectors`. Expected shape "
                "(num_classes, dim) with num_classes >= 2. Received: "
                f"vectors.shape={table.shape}"
            )
        if not np.all(np.isfinite(table)):
            row = int(np.argmax(~np.all(np.isfinite(table), axis=1)))
            raise ValueError(
                "Invalid value for argument `vectors`. Expected finite values. "
                f"Received: a non-finite value in vectors[{row}]"
            )
        norms = np.linalg.norm(table.astype(np.float64), axis=1)
        if np.any(norms == 0):
            raise ValueError(
                "Invalid value for argument `vectors`. Expected no all-zero "
                "row (the cosine similarity of a zero vector is undefined). "
                f"Received: vectors[{int(np.argmax(norms == 0))}] is all zeros"
            )
        if not isinstance(keep_rows, bool):
            raise TypeError(
                "Invalid type for argument `keep_rows`. Expected a bool. "
                f"Received: keep_rows={keep_rows!r}"
            )
        self.vectors = table
        self.lower_bound = _utils.check_number("lower_bound", lower_bound, 0.0, 1.0)
        self.keep_rows = keep_rows
        self.num_classes = table.shape[0]
        self._norms = norms  # float64, C numbers

    def _unit_vectors(self, classes=None, dtype=np.float32):
        """Rows of the table scaled to unit length (all rows by default).

        Normalised in float64 before any product: in float32, dot products
        of raw vectors overflow for entries near 1e19 and underflow near
        1e-19, while unit vectors give dot products in [-1, 1] at any scale.
        """
        if classes is None:
            vectors, norms = self.vectors, self._norms
        else:
            vectors, norms = self.vectors[classes], self._norms[classes]
        unit = vectors.astype(np.float64)
        unit /= norms[:, None]
        return unit.astype(dtype, copy=False)

    def _unit_tensor(self):
        # The loss holds the unit table only (one C x d table, as before).
        return self._tensor("unit_vectors", self._unit_vectors)

    def _from_cosine(self, cosine, same_class):
        # Rounding can push a self-cosine a little above 1: clip into [0, 1]
        # (negative cosines mean unrelated), apply Eq. 3, and set the
        # diagonal to exactly 1.
        similarity = ops.clip(cosine, 0.0, 1.0)
        similarity = ops.maximum(similarity - self.lower_bound, 0.0) / (
            1.0 - self.lower_bound
        )
        return ops.where(same_class, 1.0, similarity)

    def _compute_rows(self, labels):
        unit = self._unit_tensor()
        # (b, d) x (d, C): the only O(b C d) work; no C x C matrix is formed.
        # An einsum rather than `matmul(x, transpose(unit))`: where the table
        # is a compile-time constant (JAX), a transpose is folded into a
        # second, transposed copy of it.
        cosine = ops.einsum("bd,cd->bc", ops.take(unit, labels, axis=0), unit)
        same_class = ops.expand_dims(labels, -1) == ops.arange(
            self.num_classes, dtype="int32"
        )
        return self._from_cosine(cosine, same_class)

    def _pairs(self, labels, classes):
        # Two vectors per example instead of a whole row.
        unit = self._unit_tensor()
        cosine = ops.sum(
            ops.take(unit, labels, axis=0) * ops.take(unit, classes, axis=0), axis=-1
        )
        return self._from_cosine(cosine, labels == classes)

    def numpy_rows(self, classes):
        classes = np.asarray(classes)
        unit = self._unit_vectors(dtype=np.float64)
        similarity = np.clip(unit[classes] @ unit.T, 0.0, 1.0)
        similarity = np.maximum(similarity - self.lower_bound, 0.0) / (
            1.0 - self.lower_bound
        )
        similarity[np.arange(len(classes)), classes] = 1.0
        return similarity.astype(np.float32)

    _array_arguments = ("vectors",)

    @property
    def _recompute_rows(self):
        return not self.keep_rows

    def _arguments(self):
        return {
            "vectors": self.vectors,
            "lower_bound": self.lower_bound,
            "keep_rows": self.keep_rows,
        }

    def __repr__(self):
        if "_pending" in self.__dict__:
            return super().__repr__()
        return (
            f"EmbeddingSimilarity(num_classes={self.num_classes}, "
            f"dim={self.vectors.shape[1]}, lower_bound={self.lower_bound}"
            + (", keep_rows=True)" if self.keep_rows else ")")
        )


@_utils.register
class HierarchySimilarity(Similarity):
    """Similarity from a tree of classes. Built by `from_hierarchy`.

    `S[i, j] = 1` if `i == j`, else the largest `similarities[k]` over the
    levels `k` at which `i` and `j` have the same ancestor, else 0.
    """

    def __init__(self, ancestors, similarities):
        levels = np.asarray(ancestors)
        if levels.ndim == 1:
            levels = levels[None, :]
        if (
            levels.ndim != 2
            or levels.shape[1] < 2
            or not np.issubdtype(levels.dtype, np.integer)
        ):
            raise ValueError(
                "Invalid value for argument `ancestors`. Expected integer "
                "ancestor ids of shape (num_classes,) for one level or "
                "(num_levels, num_classes) for several, with num_classes >= 2. "
                f"Received: ancestors of shape {levels.shape} and dtype "
                f"{levels.dtype}"
            )
        values = np.atleast_1d(np.asarray(similarities, dtype=np.float64))
        if values.ndim != 1 or values.shape[0] != levels.shape[0]:
            raise ValueError(
                "Invalid value for argument `similarities`. Expected one value "
                f"per level of `ancestors` ({levels.shape[0]}). Received: "
                f"similarities={np.asarray(similarities).tolist()}"
            )
        for value in values:
            _utils.check_number("similarities", float(value), 0.0, 1.0)
        self.ancestors = levels.astype(np.int64)
        self.similarities = values
        self.num_classes = levels.shape[1]

    def _compute_rows(self, labels):
        result = None
        for index, (level, value) in enumerate(zip(self.ancestors, self.similarities)):
            ancestor_of = self._tensor(
                f"ancestors_{index}", lambda level=level: level.astype(np.int32)
            )
            same = ops.expand_dims(ops.take(ancestor_of, labels), -1) == (
                ops.expand_dims(ancestor_of, 0)
            )
            term = ops.where(same, float(value), 0.0)
            result = term if result is None else ops.maximum(result, term)
        same_class = ops.expand_dims(labels, -1) == ops.arange(
            self.num_classes, dtype="int32"
        )
        return ops.where(same_class, 1.0, result)

    def _pairs(self, labels, classes):
        result = ops.zeros(ops.shape(labels), "float32")
        for index, (level, value) in enumerate(zip(self.ancestors, self.similarities)):
            ancestor_of = self._tensor(
                f"ancestors_{index}", lambda level=level: level.astype(np.int32)
            )
            same = ops.take(ancestor_of, labels) == ops.take(ancestor_of, classes)
            result = ops.maximum(result, ops.where(same, float(value), 0.0))
        return ops.where(labels == classes, 1.0, result)

    def numpy_rows(self, classes):
        classes = np.asarray(classes)
        result = np.zeros((len(classes), self.num_classes), np.float32)
        for level, value in zip(self.ancestors, self.similarities):
            same = level[classes][:, None] == level[None, :]
            result = np.maximum(result, np.where(same, value, 0.0))
        result[np.arange(len(classes)), classes] = 1.0
        return result.astype(np.float32)

    def get_config(self):
        return {
            "ancestors": self.ancestors.tolist(),
            "similarities": self.similarities.tolist(),
        }

    def __repr__(self):
        return (
            f"HierarchySimilarity(num_classes={self.num_classes}, "
            f"similarities={self.similarities.tolist()})"
        )


@_utils.register
class SparseSimilarity(Similarity):
    """A similarity that keeps at most `k` similar classes per class.

    Row `i` of `S` is 1 at `i`, `values[i, n]` at `indices[i, n]` and 0
    elsewhere. State is `O(C * k)` and the loss does `O(batch * k)` extra work
    (a gather of `k` logits per example), so it suits label spaces far too
    large for a dense `C x C` matrix. Built by `top_k`, or directly from
    neighbour lists.

    Args:
        indices: integer array of shape `(C, k)`: the neighbours of each class.
            A class must not list itself or the same neighbour twice; unused
            slots have value 0 (their index is then ignored).
        values: float array of shape `(C, k)` in `[0, 1]`: the similarities.

    Example:

    >>> s = SparseSimilarity(indices=[[1], [0], [1]], values=[[0.5], [0.5], [0.25]])
    >>> np.asarray(s).tolist()
    [[1.0, 0.5, 0.0], [0.5, 1.0, 0.0], [0.0, 0.25, 1.0]]
    """

    def __init__(self, indices, values):
        indices = _real_array(indices, "indices", "an array", integer=True)
        values = _real_array(values, "values", "an array").astype(np.float64)
        if indices.ndim != 2 or indices.shape != values.shape or indices.shape[0] < 2:
            raise ValueError(
                "Invalid value for arguments `indices` and `values`. Expected "
                "an integer array and a float array of the same shape "
                "(num_classes, k), num_classes >= 2. Received: indices of "
                f"shape {indices.shape} and dtype {indices.dtype}, values of "
                f"shape {values.shape}"
            )
        num_classes = indices.shape[0]
        if np.any((indices < 0) | (indices >= num_classes)):
            raise ValueError(
                "Invalid value for argument `indices`. Expected class indices "
                f"in [0, {num_classes}). Received: "
                f"{indices[(indices < 0) | (indices >= num_classes)][:5].tolist()}"
            )
        bad = ~((values >= 0) & (values <= 1))  # NaN fails both comparisons
        if np.any(bad):
            i, j = (int(n) for n in np.argwhere(bad)[0])
            raise ValueError(
                "Invalid value for argument `values`. Expected finite values "
                f"in [0, 1]. Received: values[{i}, {j}]={values[i, j]}"
            )
        values = values.astype(np.float32)
        used = values > 0
        own = indices == np.arange(num_classes)[:, None]
        if np.any(own & used):
            row = int(np.argmax(np.any(own & used, axis=1)))
            raise ValueError(
                "Invalid value for argument `indices`. A class must not list "
                "itself as a neighbour (the diagonal is always 1). Received: "
                f"indices[{row}] contains {row}"
            )
        # Unused slots point at the class itself with value 0, so that
        # duplicates among them are harmless and every index is in range.
        indices = np.where(used, indices, np.arange(num_classes)[:, None])
        ordered = np.sort(
            np.where(used, indices, -1 - np.arange(indices.shape[1])), axis=1
        )
        if np.any(ordered[:, 1:] == ordered[:, :-1]):
            row = int(np.argmax(np.any(ordered[:, 1:] == ordered[:, :-1], axis=1)))
            raise ValueError(
                "Invalid value for argument `indices`. Expected each neighbour "
                f"at most once per class. Received: indices[{row}]="
                f"{indices[row].tolist()}"
            )
        self.indices = indices.astype(np.int32)
        self.values = np.where(used, values, 0.0).astype(np.float32)
        self.num_classes = num_classes

    def _neighbours(self, labels):
        indices = ops.take(
            self._tensor("indices", lambda: self.indices), labels, axis=0
        )
        values = ops.take(self._tensor("values", lambda: self.values), labels, axis=0)
        return indices, values

    def _use_dense_table(self):
        return False  # the neighbour lists are cheaper than any row

    def _compute_rows(self, labels):
        indices, values = self._neighbours(labels)
        spread = ops.one_hot(indices, self.num_classes) * ops.expand_dims(values, -1)
        return ops.maximum(
            ops.sum(spread, axis=1), ops.one_hot(labels, self.num_classes)
        )

    def _positions_and_weights(self, labels):
        """The own class and the `k` neighbours, `(batch, k + 1)`, and `S`."""
        indices, values = self._neighbours(labels)
        positions = ops.concatenate([ops.expand_dims(labels, -1), indices], axis=-1)
        weights = ops.concatenate([ops.ones_like(values[:, :1]), values], axis=-1)
        return positions, weights

    def _log_terms(self, labels, logits, shift=()):
        # k + 1 logits per example instead of a row of C. The true class
        # enters with log S = log 1 = 0; unused slots have log 0 = -inf and
        # drop out of the logsumexp.
        positions, weights = self._positions_and_weights(labels)
        terms = _shifted(ops.take_along_axis(logits, positions, axis=-1), shift)
        return terms + ops.log(weights), positions

    def _weight_terms(self, labels, probabilities):
        positions, weights = self._positions_and_weights(labels)
        return (
            weights,
            ops.take_along_axis(probabilities, positions, axis=-1),
            positions,
        )

    def _pairs(self, labels, classes):
        indices, values = self._neighbours(labels)
        match = ops.cast(indices == ops.expand_dims(classes, -1), "float32")
        return ops.where(labels == classes, 1.0, ops.sum(values * match, axis=-1))

    def numpy_rows(self, classes):
        classes = np.asarray(classes)
        result = np.zeros((len(classes), self.num_classes), np.float32)
        rows = np.arange(len(classes))[:, None]
        result[rows, self.indices[classes]] = self.values[classes]
        result[np.arange(len(classes)), classes] = 1.0
        return result

    _array_arguments = ("indices", "values")

    def _arguments(self):
        return {"indices": self.indices, "values": self.values}

    def __repr__(self):
        if "_pending" in self.__dict__:
            return super().__repr__()
        return (
            f"SparseSimilarity(num_classes={self.num_classes}, "
            f"k={self.indices.shape[1]})"
        )


def _checked(similarity):
    """Validates a builder's output entry by entry where that is cheap."""
    if similarity.num_classes <= _MAX_CLASSES_CHECKED_DENSE:
        validate_matrix(np.asarray(similarity), name="similarity")
    return similarity


def ordinal(num_classes, reduction_factor):
    """Similarity of ordered classes: `S[i, j] = r ** |i - j|` (Eq. 2).

    For ordinal targets (ages, ratings, severity grades): a prediction one
    class away costs little, far away costs as much as any wrong class.
    `reduction_factor=0` gives the identity (plain cross entropy).

    Args:
        num_classes: int >= 2, the number of classes `C`.
        reduction_factor: float `r` in `[0, 1)`. The paper's age experiments
            found small `r` (about 0.4) helps accuracy and larger `r` (0.7 to
            0.8) helps MAE; `r = 0.9` let the model collapse onto a few
            classes.

    Returns:
        An `OrdinalSimilarity`; its config is the two arguments, whatever `C`.

    Example:

    >>> np.asarray(ordinal(3, 0.5)).tolist()
    [[1.0, 0.5, 0.25], [0.5, 1.0, 0.5], [0.25, 0.5, 1.0]]

    Reference:
        Kobs et al., "SimLoss: Class Similarities in Cross Entropy", 2020,
        Eq. 2. https://arxiv.org/abs/2003.03182
    """
    return _checked(OrdinalSimilarity(num_classes, reduction_factor))


def lower_bound(similarities, lower_bound):
    """Rescales a similarity table with a lower bound `l` (Eq. 3).

    `S[i, j] = max(0, sim(i, j) - l) / (1 - l)`: similarities at or below `l`
    become 0 (unrelated classes), the diagonal stays 1. `l` close to 1 keeps
    only the diagonal, i.e. plain cross entropy.

    Args:
        similarities: array-like `(C, C)` of similarities in `[0, 1]` with a
            diagonal of 1.
        lower_bound: float `l` in `[0, 1)`.

    Returns:
        A `MatrixSimilarity` holding the rescaled matrix.

    Example:

    >>> s = lower_bound([[1.0, 0.6], [0.6, 1.0]], lower_bound=0.5)
    >>> np.asarray(s, dtype=np.float64).round(6).tolist()  # (0.6 - 0.5) / 0.5
    [[1.0, 0.2], [0.2, 1.0]]
    """
    bound = _utils.check_number("lower_bound", lower_bound, 0.0, 1.0)
    matrix = validate_matrix(similarities, name="similarities").astype(np.float64)
    rescaled = np.maximum(matrix - bound, 0.0) / (1.0 - bound)
    np.fill_diagonal(rescaled, 1.0)
    return MatrixSimilarity(rescaled)


def from_embeddings(vectors, lower_bound=0.0, keep_rows=False):
    """Similarity from class-name embeddings (word vectors), Eq. 3.

    `sim(i, j) = max(0, cos(e_i, e_j))`, then `S = max(0, sim - l) / (1 - l)`
    with an exact unit diagonal. The paper used 300-d word2vec vectors
    (Google News) of the CIFAR-100 class names;
    `keras_simloss.datasets.load_word_vectors` reads such files.

    The rows are computed on the fly inside the loss from the `C x d` table,
    so this scales to very many classes; `numpy.asarray` gives the dense
    matrix when it fits. A training step computes the rows of its labels
    twice, in the forward and in the backward pass, so that it holds no
    `(batch, C)` buffer beyond what cross entropy holds; `keep_rows=True`
    keeps them from the forward pass instead: one `(batch, d) x (d, C)`
    product less per step, one `(batch, C)` float32 buffer more (measured in
    the README's large-label tables).

    Args:
        vectors: array-like `(C, d)`, one non-zero vector per class.
        lower_bound: float `l` in `[0, 1)`. Defaults to `0.0`. The paper's
            CIFAR-100 runs found `l = 0.9` best for accuracy and `l = 0.0`
            collapsed.
        keep_rows: bool, trade memory for time as above. Defaults to
            `False`. The loss's values and gradients are the same either way.

    Returns:
        An `EmbeddingSimilarity`.

    Example:

    >>> s = from_embeddings([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]], lower_bound=0.5)
    >>> np.asarray(s, dtype=np.float64).round(4).tolist()  # (cos 45deg - 0.5) / 0.5
    [[1.0, 0.4142, 0.0], [0.4142, 1.0, 0.4142], [0.0, 0.4142, 1.0]]
    """
    return _checked(EmbeddingSimilarity(vectors, lower_bound, keep_rows))


def from_hierarchy(ancestors, similarities=0.5):
    """Similarity from a class hierarchy.

    Two different classes that share an ancestor at level `k` get similarity
    `similarities[k]` (the largest over shared levels); the diagonal is 1;
    classes with no shared ancestor get 0.

    Args:
        ancestors: the ancestor id of every class, shape `(C,)` for one level
            (e.g. `keras_simloss.datasets.cifar100.FINE_TO_COARSE`), or
            `(num_levels, C)` for several, nearest level first.
        similarities: float in `[0, 1)`, or one per level. Defaults to `0.5`.

    Returns:
        A `HierarchySimilarity`; its config holds `O(C)` numbers.

    Example:

    >>> np.asarray(from_hierarchy([0, 0, 1], 0.5)).tolist()
    [[1.0, 0.5, 0.0], [0.5, 1.0, 0.0], [0.0, 0.0, 1.0]]
    """
    return _checked(HierarchySimilarity(ancestors, similarities))


def top_k(similarity, k, batch_size=None):
    """Keeps the `k` most similar other classes of each class.

    Builds a `SparseSimilarity` from any similarity (a `Similarity` or a dense
    matrix), working through the classes `batch_size` rows at a time, so
    memory is bounded by the block of rows, never `C x C`. Each row is reduced
    by partial selection (`numpy.partition`, `O(C)`; never a full sort).

    The result is exact: the `k` largest `S[i, j]`, `j != i`, in decreasing
    order, ties broken toward the smaller class index `j`. Zero similarities
    are not kept (a row with fewer than `k` positive entries leaves slots
    unused). For `from_embeddings`, the rows are a float32 product of unit
    vectors (BLAS, the bulk of the work); every class whose float32 cosine is
    within the product's rounding-error bound of the `k`-th largest is then
    rescored in float64, so rounding never changes which classes are kept or
    their values (float64 cosines, as `numpy.asarray(similarity)` computes
    them, stored as float32).

    Args:
        similarity: a `Similarity` or an array-like `(C, C)`.
        k: int >= 1, neighbours kept per class.
        batch_size: rows computed at a time, an int >= 1. Defaults to `None`:
            blocks of about 16M entries (64 MiB of float32).

    Returns:
        A `SparseSimilarity` with `O(C * k)` state.

    Example:

    >>> s = top_k(ordinal(4, 0.5), k=1)  # row 1: classes 0 and 2 tie
    >>> s.indices.tolist(), s.values.tolist()
    ([[1], [0], [1], [2]], [[0.5], [0.5], [0.5], [0.5]])
    """
    source = get(similarity)
    num_classes = source.num_classes
    if batch_size is None:
        batch_size = max(1, min(num_classes, _TOP_K_BLOCK_ENTRIES // num_classes))
    if (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, (int, np.integer))
        or batch_size < 1
    ):
        raise ValueError(
            "Invalid value for argument `batch_size`. Expected an int >= 1. "
            f"Received: batch_size={batch_size!r}"
        )
    if (
        isinstance(k, bool)
        or not isinstance(k, (int, np.integer))
        or not (1 <= k < num_classes)
    ):
        raise ValueError(
            "Invalid value for argument `k`. Expected an int with 1 <= k < "
            f"num_classes={num_classes}. Received: k={k!r}"
        )
    # Unused slots point at the class itself with value 0, as
    # `SparseSimilarity` stores them.
    indices = np.repeat(np.arange(num_classes, dtype=np.int32)[:, None], k, axis=1)
    values = np.zeros((num_classes, k), np.float32)
    if isinstance(source, EmbeddingSimilarity):
        # Float32 unit vectors, zero rows appended up to a multiple of the
        # chunk width (a zero vector's cosine is 0, which never displaces a
        # class of positive similarity).
        unit = np.zeros(
            (-(-num_classes // _CHUNK) * _CHUNK, source.vectors.shape[1]), np.float32
        )
        unit[:num_classes] = source._unit_vectors()
    for start in range(0, num_classes, batch_size):
        classes = np.arange(start, min(start + batch_size, num_classes))
        if isinstance(source, EmbeddingSimilarity):
            row, column, value = _embedding_candidates(source, unit, classes, k)
        else:
            rows = np.array(source.numpy_rows(classes), np.float32)  # a copy
            row, column, value = _candidates(rows, classes, k)
        _keep_top_k(row, column, value, classes, k, indices, values)
    return _checked(SparseSimilarity(indices, values))


# Rows per block of `top_k`: about this many entries (64 MiB of float32).
_TOP_K_BLOCK_ENTRIES = 1 << 24


def _candidates(rows, classes, k):
    """Entries of `rows` that can be among the `k` largest off-diagonal ones.

    Returns `(row, column, value)` of every entry at least as large as the
    `k`-th largest of its row (so all ties at that value) and above 0.
    """
    num_classes = rows.shape[1]
    rows[np.arange(len(classes)), classes] = -np.inf  # never the class itself
    # The k-th largest of each row by partial selection: O(C), no sort.
    kth = np.partition(rows, num_classes - k, axis=1)[:, num_classes - k]
    row, column = np.nonzero((rows >= kth[:, None]) & (rows > 0))
    return row, column, rows[row, column]


def _embedding_candidates(source, unit, classes, k):
    """`_candidates` of a block of embedding rows, rescored in float64.

    `unit` holds the float32 unit vectors, padded with zero rows to a
    multiple of `_CHUNK`.
    """
    padded, dim = unit.shape
    size = len(classes)
    # The bulk of the work: a float32 (b, d) x (d, C) product (BLAS).
    cosine = unit[classes] @ unit.T
    cosine[np.arange(size), classes] = -np.inf  # never the class itself
    # Error bound of a float32 cosine of unit vectors: rounding the vectors
    # (2u) and any summation order of d products (d u), u = 2^-24. The exact
    # and the float32 k-th largest differ by at most that bound, so every
    # class whose exact value can reach the exact k-th largest has a float32
    # cosine above kth - 2 * bound; 2^-23 more keeps the classes whose values
    # round to the same float32 number.
    margin = 2 * 1.01 * (dim + 2) * 2.0**-24 + 2.0**-23
    # One pass over the block: the maximum of each chunk of columns. The
    # k-th largest chunk maximum is at most the row's k-th largest entry (k
    # chunks hold an entry at least as large), so every candidate lies in a
    # chunk whose maximum is within `margin` of it: only the top chunks are
    # searched further, never the whole row. Chunk c holds the columns
    # c, c + n, c + 2n, ... (n chunks): a maximum over the middle axis is an
    # elementwise maximum of contiguous rows, several times faster than one
    # over a short last axis.
    num_chunks = padded // _CHUNK
    chunks = cosine.reshape(size, _CHUNK, num_chunks)
    chunk_max = chunks.max(axis=1)
    kept = min(num_chunks, k + 8)
    top = np.argpartition(chunk_max, num_chunks - kept, axis=1)[:, -kept:]
    if kept < num_chunks:
        top_max = np.take_along_axis(chunk_max, top, axis=1)
        chunk_kth = np.partition(top_max, kept - k, axis=1)[:, kept - k]
        # Rows where a chunk left out may still hold a candidate (many
        # chunks within the margin) are searched whole, below.
        unsure = np.flatnonzero(top_max.min(axis=1) >= chunk_kth - margin)
    else:
        unsure = []  # every chunk is searched
    # The columns of the top chunks, gathered from the flat block (the
    # fastest NumPy gather).
    columns = (np.arange(_CHUNK)[:, None] * num_chunks + top[:, None, :]).reshape(
        size, _CHUNK * kept
    )
    gathered = np.take(cosine.ravel(), columns + np.arange(size)[:, None] * padded)
    kth = np.partition(gathered, gathered.shape[1] - k, axis=1)[:, -k]
    row, position = np.nonzero(gathered >= (kth - margin)[:, None])
    column = columns[row, position]
    if len(unsure):
        keep = ~np.isin(row, unsure)
        row, column = [row[keep]], [column[keep]]
        for i in unsure:
            full_kth = np.partition(cosine[i], padded - k)[padded - k]
            extra = np.flatnonzero(cosine[i] >= full_kth - margin)
            row.append(np.full(len(extra), i))
            column.append(extra)
        row, column = np.concatenate(row), np.concatenate(column)
    real = column < source.num_classes  # not a padding column
    row, column = row[real], column[real]
    # Exact (float64) cosines of the candidates only: b (k + a few) x d work.
    left = source._unit_vectors(classes, dtype=np.float64)[row]
    right = source._unit_vectors(column, dtype=np.float64)
    exact = np.einsum("ij,ij->i", left, right)
    # As `numpy_rows`: clip into [0, 1], Eq. 3, then float32.
    value = np.maximum(np.clip(exact, 0.0, 1.0) - source.lower_bound, 0.0) / (
        1.0 - source.lower_bound
    )
    value = value.astype(np.float32)
    keep = value > 0
    return row[keep], column[keep], value[keep]


# Columns per chunk in `top_k`'s search of embedding rows.
_CHUNK = 64


def _keep_top_k(row, column, value, classes, k, indices, values):
    """Writes the `k` best candidates of each row into `indices`/`values`.

    Best means largest value, ties toward the smaller class index.
    """
    order = np.lexsort((column, -value, row))  # by row, value down, index up
    row, column, value = row[order], column[order], value[order]
    first = np.searchsorted(row, np.arange(len(classes)))
    rank = np.arange(len(row)) - first[row]
    keep = rank < k
    target = classes[row[keep]]
    indices[target, rank[keep]] = column[keep]
    values[target, rank[keep]] = value[keep]


def get(identifier):
    """Returns a `Similarity` from a `Similarity`, a config or a matrix.

    Args:
        identifier: a `Similarity` (returned as is), a dict made by
            `keras.saving.serialize_keras_object`, or an array-like `(C, C)`
            (wrapped in a `MatrixSimilarity`).
    """
    if isinstance(identifier, Similarity):
        return identifier
    if isinstance(identifier, dict):
        result = keras.saving.deserialize_keras_object(identifier)
        if not isinstance(result, Similarity):
            raise ValueError(
                "Invalid value for argument `similarity`. Expected the config "
                "of a keras_simloss Similarity. Received: "
                f"{identifier.get('class_name')!r}"
            )
        return result
    if identifier is None or isinstance(identifier, str):
        raise TypeError(
            "Invalid value for argument `similarity`. Expected a Similarity "
            "(e.g. keras_simloss.similarity.ordinal(...)) or a (C, C) matrix. "
            f"Received: similarity={identifier!r}"
        )
    return MatrixSimilarity(identifier)


def from_confusion(confusion, lower_bound=0.0):
    """Similarity from the confusion matrix of an earlier model.

    Classes that a model often mistakes for each other look alike to it, so
    its confusion counts on held-out data say which mistakes are "near".
    With counts `M[i, j]` (true class `i`, predicted `j`) and the row rates
    `P[i, j] = M[i, j] / sum_k M[i, k]`:

        sim(i, j) = min(1, (P[i, j] + P[j, i]) / (P[i, i] + P[j, j]))

    i.e. how often the pair is confused (either way) relative to how often
    its two classes are recognised; `sim(i, i) = 1`. It is symmetric, lies in
    `[0, 1]`, is 0 for classes never confused and 1 for classes confused at
    least as often as recognised (when both hit rates are 0, any confusion
    counts as 1). Then Eq. 3: `S = max(0, sim - l) / (1 - l)`, diagonal 1.
    A lower bound such as `0.05` removes the rare, chance confusions that a
    small validation set always has.

    Two-stage recipe: train with cross entropy, count the confusion on the
    validation data (`keras_simloss.ConfusionMatrix`), build `S` here,
    retrain with `SimLoss(S)`. For very many classes pass the result to
    `top_k` to keep only the nearest classes.

    Args:
        confusion: array-like `(C, C)` of non-negative finite counts (weighted
            counts are fine), rows the true classes; every class needs at
            least one example (a non-zero row).
        lower_bound: float `l` in `[0, 1)`. Defaults to `0.0`.

    Returns:
        A `MatrixSimilarity` (a confusion-derived matrix has no smaller exact
        description, so the config holds the `C x C` matrix).

    Example:

    >>> counts = [[7, 3, 0], [2, 8, 0], [0, 0, 10]]
    >>> s = from_confusion(counts)  # sim(0, 1) = (0.3 + 0.2) / (0.7 + 0.8)
    >>> np.asarray(s, dtype=np.float64).round(4).tolist()
    [[1.0, 0.3333, 0.0], [0.3333, 1.0, 0.0], [0.0, 0.0, 1.0]]

    References:
        Kobs et al., "SimLoss: Class Similarities in Cross Entropy", 2020,
        Eq. 3. https://arxiv.org/abs/2003.03182
        Related: Zhang et al., "Delving Deep into Label Smoothing" (Online
        Label Smoothing), 2021. https://arxiv.org/abs/2011.12562
    """
    bound = _utils.check_number("lower_bound", lower_bound, 0.0, 1.0)
    if keras.ops.is_tensor(confusion):
        confusion = ops.convert_to_numpy(confusion)
    try:
        counts = np.asarray(confusion, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise TypeError(
            "Invalid value for argument `confusion`. Expected a square matrix "
            f"of counts. Received: confusion of type {type(confusion).__name__} "
            f"({error})"
        ) from None
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1] or counts.shape[0] < 2:
        raise ValueError(
            "Invalid value for argument `confusion`. Expected a square matrix "
            "of shape (C, C) with C >= 2. Received: confusion.shape="
            f"{counts.shape}"
        )
    bad = ~np.isfinite(counts) | (counts < 0)
    if np.any(bad):
        i, j = (int(k) for k in np.argwhere(bad)[0])
        raise ValueError(
            "Invalid value for argument `confusion`. Expected non-negative "
            f"finite counts. Received: confusion[{i}, {j}]={counts[i, j]}"
        )
    totals = counts.sum(axis=1)
    if np.any(totals == 0):
        i = int(np.argmax(totals == 0))
        raise ValueError(
            "Invalid value for argument `confusion`. Expected at least one "
            "example of every class (a non-zero row; rows are the true "
            f"classes). Received: row {i} of confusion is all zeros"
        )
    rates = counts / totals[:, None]
    hits = np.diagonal(rates)
    confused = rates + rates.T  # exactly symmetric: a + b == b + a
    recognised = hits[:, None] + hits[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        # Two classes that are never recognised: any confusion counts as 1.
        sim = np.where(
            recognised > 0, confused / recognised, (confused > 0).astype(float)
        )
    sim = np.minimum(sim, 1.0)
    rescaled = np.maximum(sim - bound, 0.0) / (1.0 - bound)  # Eq. 3
    np.fill_diagonal(rescaled, 1.0)
    return MatrixSimilarity(rescaled)
