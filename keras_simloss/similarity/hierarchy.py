"""Similarity from a class hierarchy (e.g. CIFAR-100's superclasses)."""

import numpy as np
from keras import ops

from keras_simloss import _utils
from keras_simloss.similarity.base import Similarity, checked


@_utils.register
class HierarchySimilarity(Similarity):
    """Similarity from a tree of classes. Built by `from_hierarchy`.

    `S[i, j] = 1` if `i == j`, else the largest `similarities[k]` over the
    levels `k` at which `i` and `j` have the same ancestor, else 0.
    """

    def __init__(self, ancestors, similarities):
        levels = _utils.real_array("ancestors", ancestors, "ancestor ids", integer=True)
        if levels.ndim == 1:
            levels = levels[None, :]
        if levels.ndim != 2 or levels.shape[1] < 2:
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

    def _class_arrays(self):
        arrays = super()._class_arrays()
        for index, level in enumerate(self.ancestors):
            arrays[f"ancestors_{index}"] = (
                lambda level=level: _utils.dense_codes(level),
                0,
            )
        return arrays

    def _ancestor_codes(self, index):
        """Level `index`'s ancestor ids as exact int32 codes (a tensor).

        Ids are labels: a cast to int32 would merge ids that differ above
        2**31 (`2**32` and `0`), so they are mapped to dense codes once.
        """
        return self._tensor(
            f"ancestors_{index}", lambda: _utils.dense_codes(self.ancestors[index])
        )

    symmetric = True

    def _nested_weights(self):
        """For a tree, the weights of `p @ S` by group masses; else `None`.

        Nested means each level's groups lie inside one group of the next
        level (sharing an ancestor at level `k` implies sharing every later
        one), so `S[c, j] = t_m`, `m` the first level `c` and `j` share and
        `t_k = max(s_k, s_(k+1), ...)`. Then `(p @ S)_j = (1 - t_1) p_j +
        sum_k (t_k - t_(k+1)) M_k(j)` (`t_(L+1) = 0`), with `M_k(j)` the
        mass of `j`'s group at level `k`: every weight is `>= 0`.
        """
        codes = [_utils.dense_codes(level) for level in self.ancestors]
        for near, far in zip(codes, codes[1:]):
            first = np.full(near.max() + 1, -1, np.int64)
            first[near] = far  # any one of each group's later ids
            if np.any(first[near] != far):
                return None
        suffix = np.maximum.accumulate(self.similarities[::-1])[::-1]
        following = np.append(suffix[1:], 0.0)
        return 1.0 - suffix[0], suffix - following

    def _compute_expected(self, probabilities):
        weights = self.__dict__.get("_expected_weights", False)
        if weights is False:
            weights = self._expected_weights = self._nested_weights()
        if weights is None:  # not a tree: read all rows in blocks
            return super()._compute_expected(probabilities)
        own, levels = weights
        result = float(own) * probabilities
        by_class = ops.transpose(probabilities)  # (C, batch): segments on axis 0
        for index, weight in enumerate(levels):
            if weight == 0.0:
                continue
            codes = self._ancestor_codes(index)
            groups = int(np.max(_utils.dense_codes(self.ancestors[index]))) + 1
            mass = ops.segment_sum(by_class, codes, num_segments=groups)
            result = result + float(weight) * ops.transpose(ops.take(mass, codes, 0))
        return result

    def _compute_rows(self, labels):
        result = None
        for index, value in enumerate(self.similarities):
            ancestor_of = self._ancestor_codes(index)
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
        for index, value in enumerate(self.similarities):
            ancestor_of = self._ancestor_codes(index)
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

    # The ids stay in the config whatever their number (`O(C)` integers): a
    # metric built from a hierarchy must load without a loss to restore it.
    _array_arguments = ()

    def _arguments(self):
        return {"ancestors": self.ancestors, "similarities": self.similarities}

    def __repr__(self):
        return (
            f"HierarchySimilarity(num_classes={self.num_classes}, "
            f"similarities={self.similarities.tolist()})"
        )


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
    return checked(HierarchySimilarity(ancestors, similarities))
