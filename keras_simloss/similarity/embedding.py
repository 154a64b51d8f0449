"""Similarity from class embeddings (word vectors of the class names), Eq. 3."""

import numpy as np
from keras import ops

from keras_simloss import _utils
from keras_simloss.similarity.base import (
    _EXPECTED_BLOCK_ENTRIES,
    Similarity,
    blocked_columns,
    checked,
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
        table = _utils.real_array("vectors", vectors, "an array").astype(np.float32)
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
        self.vectors = table
        self.lower_bound = _utils.check_number("lower_bound", lower_bound, 0.0, 1.0)
        self.keep_rows = _utils.check_bool("keep_rows", keep_rows)
        self.num_classes = table.shape[0]
        self._norms = norms  # float64, C numbers

    def unit_vectors(self, classes=None, dtype=np.float32):
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

    def _class_arrays(self):
        return {**super()._class_arrays(), "unit_vectors": (self.unit_vectors, 0)}

    def _unit_tensor(self):
        # The loss holds the unit table only (one C x d table, as before).
        return self._tensor("unit_vectors", self.unit_vectors)

    def _from_cosine(self, cosine, same_class):
        # Rounding can push a self-cosine a little above 1: clip into [0, 1]
        # (negative cosines mean unrelated), apply Eq. 3, and set the
        # diagonal to exactly 1.
        similarity = ops.clip(cosine, 0.0, 1.0)
        similarity = ops.maximum(similarity - self.lower_bound, 0.0) / (
            1.0 - self.lower_bound
        )
        return ops.where(same_class, 1.0, similarity)

    symmetric = True  # p @ S by the base class's blocks of rows

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

    def _ring_arrays(self):
        return ("unit_vectors",)

    def _expected_from_shard(self, probabilities, visiting, own, same_shard, start):
        # The visiting block's rows against this device's classes, a block
        # of this device's classes at a time: O(batch w^2 + w^2 d) work.
        del start
        unit, visiting_unit = own["unit_vectors"], visiting["unit_vectors"]
        width = unit.shape[0]
        positions = ops.arange(width, dtype="int32")

        def rows_of(classes):
            cosine = ops.einsum(
                "kd,cd->kc", ops.take(unit, classes, axis=0), visiting_unit
            )
            same = ops.logical_and(
                same_shard, ops.expand_dims(classes, -1) == positions
            )
            return self._from_cosine(cosine, same)

        # Blocks of rows 1 / n the size of one device's, as the rest.
        shards = self.num_classes // width
        entries = max(_EXPECTED_BLOCK_ENTRIES // shards, width)
        return blocked_columns(probabilities, width, rows_of, entries)

    def _pairs(self, labels, classes):
        # Two vectors per example instead of a whole row.
        unit = self._unit_tensor()
        cosine = ops.sum(
            ops.take(unit, labels, axis=0) * ops.take(unit, classes, axis=0), axis=-1
        )
        return self._from_cosine(cosine, labels == classes)

    def numpy_rows(self, classes):
        classes = np.asarray(classes)
        unit = self.unit_vectors(dtype=np.float64)
        similarity = np.clip(unit[classes] @ unit.T, 0.0, 1.0)
        similarity = np.maximum(similarity - self.lower_bound, 0.0) / (
            1.0 - self.lower_bound
        )
        similarity[np.arange(len(classes)), classes] = 1.0
        return similarity.astype(np.float32)

    _array_arguments = ("vectors",)

    def _arguments(self):
        return {
            "vectors": self.vectors,
            "lower_bound": self.lower_bound,
            "keep_rows": self.keep_rows,
        }

    def __repr__(self):
        if self._arrays_pending:
            return super().__repr__()
        return (
            f"EmbeddingSimilarity(num_classes={self.num_classes}, "
            f"dim={self.vectors.shape[1]}, lower_bound={self.lower_bound}"
            + (", keep_rows=True)" if self.keep_rows else ")")
        )


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
    `benchmarks/README.md`, "Large label spaces").

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
    return checked(EmbeddingSimilarity(vectors, lower_bound, keep_rows))
