"""The `Similarity` contract: what a kind of class similarity provides.

A class similarity `S` is a `C x C` matrix with entries in `[0, 1]` and a unit
diagonal. A kind stores it in compact form (two numbers, an embedding table,
neighbour lists) and gives the losses and metrics the parts they read:

- `rows(labels)`: `S[labels]`, `(batch, C)` float32, with `keras.ops`;
- `log_rows(labels)`: `log S[labels]`, `-inf` where `S` is 0;
- `sparse_rows(labels)`: for kinds whose rows are mostly zeros, the classes
  that count and their similarities, `(batch, n)` each; `None` (the
  default) means the rows are read whole;
- `pairs(labels, classes)`: `S[labels[i], classes[i]]`, `(batch,)`;
- `expected(probabilities)`: `p @ S`, the expected similarity of each class
  `j` to the truth, `sum_c p_c S[c, j]`, `(batch, C)` (min-risk decoding);
- `numpy_rows(classes)`: the rows in NumPy, eagerly, outside any graph;
- `numpy.asarray(similarity)`: the dense float32 matrix.

To add a kind, subclass `Similarity` and implement `_compute_rows` (the rows
of a batch of labels with `keras.ops`, traceable under XLA, never a `C x C`
matrix), `numpy_rows` and `_arguments` (the constructor arguments, for the
config; see `saving.ArraySaving`); optionally `_compute_log_rows` (when
`log` of the rows would underflow), `_pairs` (when two entries are cheaper
than a row), `sparse_rows`, and `_compute_expected` (`p @ S` without the
table; the default reads the `C` rows in blocks, which is right only for a
symmetric `S`: a kind sets `symmetric = True` to use it).
"""

import contextlib

import numpy as np
from keras import ops

from keras_simloss import _backend, _utils
from keras_simloss.similarity.saving import ArraySaving

# Dense matrices up to this many classes are checked entry by entry after a
# builder made them (C^2 work); larger ones rely on the argument checks, which
# already guarantee the properties.
_MAX_CLASSES_CHECKED_DENSE = 2048

# Rows per block when a similarity is turned into a dense matrix.
_NUMPY_BLOCK_ROWS = 1024

# Entries of the `(block, C)` rows that `expected` computes at a time when it
# reads all rows of `S` in blocks (16 MiB of float32).
_EXPECTED_BLOCK_ENTRIES = 2**22


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
    array = _utils.real_array(name, matrix, "a square matrix").astype(np.float64)
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


def checked(similarity):
    """Validates a builder's output entry by entry where that is cheap."""
    if similarity.num_classes <= _MAX_CLASSES_CHECKED_DENSE:
        validate_matrix(np.asarray(similarity), name="similarity")
    return similarity


def blocked_columns(probabilities, num_columns, rows_of, entries=None):
    """`(batch, num_columns)`: column `j` is `probabilities . rows_of([j])`,
    computed a block of columns at a time (`(block, c)` rows and `(batch, c)`
    probabilities in memory, `c` the last axis of `probabilities`).

    `rows_of(classes)` gives `(block, c)` for int32 `classes`; for a
    symmetric `S`, its rows are its columns. `entries`: the most entries of
    a block of rows, default `_EXPECTED_BLOCK_ENTRIES`."""
    width = probabilities.shape[-1]
    entries = _EXPECTED_BLOCK_ENTRIES if entries is None else entries
    block = max(1, min(num_columns, entries // max(width, 1)))
    count = -(-num_columns // block)
    offsets = ops.arange(block, dtype="int32")

    def columns(start):
        # The last block repeats the last column; its extra columns are cut
        # off below.
        classes = ops.minimum(start + offsets, num_columns - 1)
        return ops.einsum("bc,kc->bk", probabilities, rows_of(classes))

    parts = ops.map(columns, ops.arange(count, dtype="int32") * block)
    flat = ops.reshape(ops.transpose(parts, (1, 0, 2)), (-1, count * block))
    return flat[:, :num_columns]


def int32(x):
    return ops.cast(_backend.as_tensor(x), "int32")


class Similarity(ArraySaving):
    """Base class of a `C x C` class similarity stored in compact form.

    See the module docstring for the contract a kind implements. `SimLoss`
    reads `rows`, `log_rows` and `sparse_rows`; metrics read `pairs`.

    Attributes:
        num_classes: the number of classes `C`.
        dense_table_max_classes: up to this many classes (default 1,024),
            `rows` and `log_rows` gather from a dense `C x C` table built
            once (at most 4 MiB): a gather is the cheapest row there is.
            Larger label spaces compute the rows of the batch's labels on the
            fly and never hold `C x C`. Set it on an instance to choose the
            path (0: always on the fly); `uses_dense_table` says which is
            taken. Under class sharding only `S` is laid out on the
            devices, and `log_rows` is the log of the gathered rows.
        keep_rows: whether a training step keeps the rows of the forward
            pass for the backward one (one `(batch, C)` buffer held through
            the step) rather than computing them again. Defaults to `False`;
            `from_embeddings(..., keep_rows=True)` sets it.
    """

    num_classes = None
    dense_table_max_classes = 1024
    keep_rows = False
    # Whether `S[i, j] == S[j, i]` by construction: the default
    # `_compute_expected` reads columns as rows.
    symmetric = False

    # Extension points of 0.1.0 that nothing calls any more, and what
    # replaced them: a subclass defining one would be silently ignored.
    _REPLACED = {
        "_log_terms": "sparse_rows",
        "_weight_terms": "sparse_rows",
        "_use_dense_table": "uses_dense_table",
        "_recompute_rows": "keep_rows",
        "logit_loss": "keras_simloss.sim_loss",
        "probability_loss": "keras_simloss.sim_loss",
    }

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for name, replacement in Similarity._REPLACED.items():
            if name in vars(cls):
                raise TypeError(
                    f"{cls.__name__} defines `{name}`, which keras_simloss no "
                    f"longer calls (since the loss moved to losses.py); "
                    f"implement `{replacement}` instead (see "
                    "keras_simloss/similarity/base.py)."
                )

    @property
    def uses_dense_table(self):
        """Whether `rows` gathers from a dense table (see the attribute)."""
        return self.num_classes <= self.dense_table_max_classes

    def rows(self, labels):
        """Rows `S[labels]` as a `float32` tensor of shape `(batch, C)`."""
        labels = int32(labels)
        if self.uses_dense_table:
            table = self._tensor("similarity_table", lambda: self._dense_tables()[0])
            return ops.take(table, labels, axis=0)
        return self._compute_rows(labels)

    def log_rows(self, labels):
        """`log(S[labels])`, `(batch, C)`, `-inf` where the similarity is 0."""
        labels = int32(labels)
        if self.uses_dense_table:
            if self.__dict__.get("_state") is not None:
                # Sharded: one table on the devices, not two; the log of
                # its `(batch, C / n)` rows costs what gathering them does.
                return ops.log(self.rows(labels))
            table = self._tensor(
                "log_similarity_table", lambda: self._dense_tables()[1]
            )
            return ops.take(table, labels, axis=0)
        return self._compute_log_rows(labels)

    def sparse_rows(self, labels):
        """`(classes, similarities)` that make up rows `S[labels]`, or `None`.

        For kinds with a few non-zero entries per row: `(batch, n)` int32
        class indices (the label's own class first, a class at most once per
        row where its similarity is positive) and their `(batch, n)` float32
        similarities; every other class has similarity 0. `None` (the
        default): read the rows whole.
        """
        return None

    def pairs(self, labels, classes):
        """`S[labels[i], classes[i]]` for each example; shape `(batch,)`."""
        return self._pairs(int32(labels), int32(classes))

    def expected(self, probabilities):
        """`p @ S`: for each class `j`, `sum_c p_c S[c, j]`; `(batch, C)`.

        Under a predicted distribution `p` over the true class `c`, the
        expected similarity of a prediction `j` to the truth (one minus the
        expected cost with cost `1 - S`), as min-risk decoding reads it.
        float32, with `keras.ops`, traceable under XLA. Kinds with a dense
        table multiply by it; the structured kinds never form `C x C`.

        Args:
            probabilities: float tensor `(batch, C)`.
        """
        probabilities = ops.cast(probabilities, "float32")
        from keras_simloss import sharding  # it imports this module

        sharded = sharding.ring_expected(self, probabilities)
        if sharded is not None:
            return sharded
        if self.uses_dense_table:
            table = self._tensor("similarity_table", lambda: self._dense_tables()[0])
            return ops.matmul(probabilities, table)
        return self._compute_expected(probabilities)

    def numpy_rows(self, classes):
        """Rows `S[classes]` as a `float32` NumPy array, computed eagerly."""
        raise NotImplementedError

    def __array__(self, dtype=None, copy=None):
        matrix = np.concatenate(
            [
                self.numpy_rows(
                    np.arange(start, min(start + _NUMPY_BLOCK_ROWS, self.num_classes))
                )
                for start in range(0, self.num_classes, _NUMPY_BLOCK_ROWS)
            ]
        )
        return matrix if dtype is None else matrix.astype(dtype)

    def __repr__(self):
        return f"{type(self).__name__}(num_classes={self.num_classes})"

    # What a kind implements --------------------------------------------------

    def _compute_rows(self, labels):
        """Rows computed on the fly with `keras.ops`, without a C x C table."""
        raise NotImplementedError

    def _compute_log_rows(self, labels):
        return ops.log(self._compute_rows(labels))

    def _compute_expected(self, probabilities):
        """`p @ S` from all rows of `S`, `block` at a time (`O(batch C^2)`
        work, `(block, C)` and `(batch, C)` memory): column `j` of a
        symmetric `S` is row `j`."""
        if not self.symmetric:
            raise NotImplementedError(
                f"{type(self).__name__} does not say it is symmetric: implement "
                "`_compute_expected` (p @ S) or set `symmetric = True`."
            )
        return blocked_columns(probabilities, self.num_classes, self._compute_rows)

    def _ring_arrays(self):
        """The keys of the sharded state that travel round the devices for
        `p @ S` over sharded classes (`keras_simloss.sharding.ring_expected`),
        a tuple; `None`: the kind has no such form (XLA then computes
        `_compute_expected` over gathered rows)."""
        return None

    def _ring_pushes(self):
        """Whether the ring passes partial sums instead of `p`: each device
        adds what its own classes give to a visiting block of columns
        (`_expected_into_shard`). Default `False`."""
        return False

    def _expected_into_shard(self, probabilities, own, same_shard, start):
        """One device's additions to a visiting block of `p @ S` (a ring
        that pushes, `_ring_pushes`): `probabilities` `(batch, w)` over this
        device's classes, `own` its state arrays, `same_shard` whether the
        block is its own, `start` (a traced int32) the block's first class.
        Returns `(batch, w)`: `sum_(c on this device) p_c S[c, j]` for the
        block's classes `j`."""
        raise NotImplementedError

    def _expected_from_shard(self, probabilities, visiting, own, same_shard, start):
        """One device's part of `p @ S` from one visiting block of classes.

        `probabilities` `(batch, w)`: `p` over the visiting block, the `w`
        classes from `start` on (a traced int32); `visiting`: the arrays of
        `_ring_arrays()` for those classes; `own`: all state arrays for this
        device's `w` classes; `same_shard`: whether the two blocks are the
        same (a traced bool). Returns `(batch, w)`:
        `sum_(c in block) p_c S[c, j]` for this device's classes `j`."""
        raise NotImplementedError

    def _pairs(self, labels, classes):
        rows = self.rows(labels)
        if self.__dict__.get("_state") is not None:
            # Rows sharded over their classes: picking one entry by index
            # would gather whole rows; a masked sum stays local (plus an
            # all-reduce of `(batch,)`), and adds exactly one entry.
            chosen = ops.arange(self.num_classes, dtype="int32") == classes[:, None]
            return ops.sum(ops.where(chosen, rows, 0.0), axis=-1)
        picked = ops.take_along_axis(rows, ops.expand_dims(classes, -1), axis=-1)
        return ops.squeeze(picked, -1)

    # Tensors cached for the graph ----------------------------------------------

    def _class_arrays(self):
        """The per-class arrays the tensors of `_tensor` are made from:
        `{key: (make_array, class_axis)}`, `class_axis` the array's axis of
        `C` classes (what `keras_simloss.sharding` splits over devices).
        A kind adds the keys it reads with `_tensor` to these.

        A dense table is split by columns: the rows `S[labels]` a loss reads
        are then sharded as the logits are, each device gathering its own
        `C / n` columns of them. `log S` is not kept beside it (`log_rows`
        takes the log of the rows)."""
        if not self.uses_dense_table:
            return {}
        return {"similarity_table": (self._dense_table, 1)}

    def _tensor(self, key, make_array):
        """The array `make_array()` as a tensor, made once and reused.

        The first call may come from inside a traced function, yet the cached
        tensor outlives that trace, so it is made outside every trace
        (`_backend.eager_tensor`); on TensorFlow it is a variable, read here.

        Once `keras_simloss.sharding.shard_classes` laid the similarity's
        arrays out over devices, they are variables of the model's state
        (read through the trainer's state, so that a compiled step takes
        them as sharded arguments, not as replicated constants); a backward
        pass reads the values its forward pass read (`_reading_state`).
        """
        reading = self.__dict__.get("_reading")
        if reading is not None and key in reading:
            return reading[key]
        state = self.__dict__.get("_state")
        if state is not None:
            return state.read(key)
        cache = self.__dict__.setdefault("_tensors", {})
        if key not in cache:
            cache[key] = _backend.eager_tensor(key, make_array())
        return _backend.as_tensor(cache[key])

    def _dense_table(self):
        """`S` as a float32 NumPy array, without building `log S` (for the
        sharded state, which keeps `S` only); not cached unless
        `_dense_tables` built it."""
        tables = self.__dict__.get("_tables")
        return np.asarray(self, dtype=np.float32) if tables is None else tables[0]

    def _dense_tables(self):
        """`(S, log S)` as float32 NumPy arrays, built on first use."""
        tables = self.__dict__.get("_tables")
        if tables is None:
            matrix = np.asarray(self, dtype=np.float32)
            with np.errstate(divide="ignore"):
                tables = (matrix, np.log(matrix))  # log 0 = -inf, on purpose
            self._tables = tables
        return tables

    # Sharded state (see `keras_simloss.sharding`) ----------------------------

    def _state_values(self):
        """The sharded state's tensors as read now, `{key: tensor}` (empty
        when the arrays are not sharded): a loss's forward pass keeps them
        for its backward pass, which a trainer may trace after the scope
        that maps the state to the step's arguments has closed."""
        state = self.__dict__.get("_state")
        return {} if state is None else state.values()

    @contextlib.contextmanager
    def _reading_state(self, values):
        """Within: `_tensor` returns `values[key]` for the keys in `values`."""
        previous = self.__dict__.get("_reading")
        self._reading = {**(previous or {}), **values} if values else previous
        try:
            yield
        finally:
            self._reading = previous
