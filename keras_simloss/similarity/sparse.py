"""A similarity that keeps at most `k` similar classes per class."""

import numpy as np
from keras import ops

from keras_simloss import _utils
from keras_simloss.similarity.base import Similarity, int32

# `expected` gathers from the turned-around neighbour lists while no class is
# listed by more than this many others (else it scatters, slot by slot).
_MAX_INCOMING_ROUNDS = 64


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
        indices = _utils.real_array("indices", indices, "an array", integer=True)
        values = _utils.real_array("values", values, "an array").astype(np.float64)
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

    def _class_arrays(self):
        arrays = {
            "indices": (lambda: self.indices, 0),
            "values": (lambda: self.values, 0),
        }
        if self._incoming_lists() is not None:
            arrays["incoming"] = (lambda: self._incoming_lists()[0], 1)
            arrays["incoming_weights"] = (lambda: self._incoming_lists()[1], 1)
        return arrays

    def _incoming_lists(self):
        """`_incoming()`, computed once."""
        arrays = self.__dict__.get("_incoming_arrays", False)
        if arrays is False:
            arrays = self._incoming_arrays = self._incoming()
        return arrays

    def _neighbours(self, labels):
        indices = ops.take(
            self._tensor("indices", lambda: self.indices), labels, axis=0
        )
        values = ops.take(self._tensor("values", lambda: self.values), labels, axis=0)
        return indices, values

    @property
    def uses_dense_table(self):
        return False  # the neighbour lists are cheaper than any row

    def _compute_rows(self, labels):
        indices, values = self._neighbours(labels)
        spread = ops.one_hot(indices, self.num_classes) * ops.expand_dims(values, -1)
        return ops.maximum(
            ops.sum(spread, axis=1), ops.one_hot(labels, self.num_classes)
        )

    def _incoming(self):
        """The neighbour lists turned around: for each class `j`, the classes
        `c` that list it and `S[c, j]`, `(rounds, C)` each, `rounds` the
        largest number of classes listing one class (padding: `j` itself
        with 0). `None` when that exceeds `_MAX_INCOMING_ROUNDS`."""
        used = self.values > 0
        sources = np.broadcast_to(np.arange(self.num_classes)[:, None], used.shape)
        targets, sources, values = (
            self.indices[used],
            sources[used],
            self.values[used],
        )
        order = np.argsort(targets, kind="stable")
        targets, sources, values = targets[order], sources[order], values[order]
        counts = np.bincount(targets, minlength=self.num_classes)
        rounds = int(counts.max(initial=0))
        if rounds > _MAX_INCOMING_ROUNDS:
            return None
        # The position of each edge among its target's incoming edges.
        rank = np.arange(len(targets)) - np.repeat(np.cumsum(counts) - counts, counts)
        incoming = np.tile(np.arange(self.num_classes, dtype=np.int32), (rounds, 1))
        weights = np.zeros((rounds, self.num_classes), np.float32)
        incoming[rank, targets] = sources
        weights[rank, targets] = values
        return incoming, weights

    def _compute_expected(self, probabilities):
        # (p @ S)_j = p_j + sum over the classes c listing j of p_c S[c, j].
        # Gathered round by round from the turned-around lists: each round
        # one gather and one multiply-add over (batch, C), fused, so
        # O(batch C rounds) work in about two (batch, C) buffers.
        arrays = self._incoming_lists()
        if arrays is None:
            return self._scattered_expected(probabilities)
        incoming = self._tensor("incoming", lambda: arrays[0])
        weights = self._tensor("incoming_weights", lambda: arrays[1])
        result = probabilities
        for index in range(arrays[0].shape[0]):
            picked = ops.take(probabilities, incoming[index], axis=1)
            result = result + picked * weights[index]
        return result

    def _ring_arrays(self):
        # Only `p` travels: this device's turned-around lists name, for each
        # of its classes, the classes listing it, wherever they are. With
        # hubs (no turned-around lists) partial sums travel instead.
        return ()

    def _ring_pushes(self):
        return self._incoming_lists() is None

    def _expected_into_shard(self, probabilities, own, same_shard, start):
        # This device's classes scatter `p_c S[c, j]` into the visiting
        # block, as `_scattered_expected` does into all `C`: O(batch w k)
        # work per block, `(w, batch)` memory.
        by_class = ops.transpose(probabilities)
        start_sums = ops.where(same_shard, by_class, 0.0)  # S[j, j] = 1
        return ops.transpose(
            _scatter_slots(start_sums, by_class, own["indices"], own["values"], start)
        )

    def _expected_from_shard(self, probabilities, visiting, own, same_shard, start):
        # Each round, the entries of this device's turned-around lists that
        # fall in the visiting block: O(batch w rounds) work per block, so
        # the ring's n blocks cost what one device's whole `p @ S` costs,
        # in `(batch, w)` memory.
        del visiting
        width = probabilities.shape[-1]
        incoming, weights = own["incoming"], own["incoming_weights"]
        result = ops.where(same_shard, probabilities, 0.0)  # S[j, j] = 1
        for index in range(incoming.shape[0]):
            local = incoming[index] - start
            inside = ops.logical_and(local >= 0, local < width)
            picked = ops.take(probabilities, ops.clip(local, 0, width - 1), axis=1)
            result = result + picked * ops.where(inside, weights[index], 0.0)
        return result

    def _scattered_expected(self, probabilities):
        """`p @ S` by one scatter-add per neighbour slot into `(C, batch)`,
        for lists where some class is listed by very many (hubs)."""
        by_class = ops.transpose(probabilities)
        indices = self._tensor("indices", lambda: self.indices)
        values = self._tensor("values", lambda: self.values)
        return ops.transpose(_scatter_slots(by_class, by_class, indices, values, 0))

    def sparse_rows(self, labels):
        """The own class and the `k` neighbours, `(batch, k + 1)`, and `S`.

        The own class has similarity 1; unused slots point at the class
        itself with similarity 0 (so they add nothing).
        """
        labels = int32(labels)
        indices, values = self._neighbours(labels)
        positions = ops.concatenate([ops.expand_dims(labels, -1), indices], axis=-1)
        weights = ops.concatenate([ops.ones_like(values[:, :1]), values], axis=-1)
        return positions, weights

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
        if self._arrays_pending:
            return super().__repr__()
        return (
            f"SparseSimilarity(num_classes={self.num_classes}, "
            f"k={self.indices.shape[1]})"
        )


def _scatter_slots(sums, by_class, indices, values, start):
    """`sums` `(w, batch)` plus, for each class `c` of `by_class` (`p`
    transposed, `(m, batch)`) and each slot of its lists `indices` /
    `values` (`(m, k)`), `p_c S[c, j]` added at row `j - start` where `j`
    falls in `[start, start + w)`.

    One scatter-add per slot, in a loop: unrolled, XLA held every slot's
    `(m, batch)` update at once (measured: 12 buffers for 12 slots, 2 now).
    """
    width = sums.shape[0]

    def add_slot(slot, sums):
        local = ops.take(indices, slot, axis=1) - start
        inside = ops.logical_and(local >= 0, local < width)
        weight = ops.where(inside, ops.take(values, slot, axis=1), 0.0)
        return ops.scatter_update(
            sums,
            ops.expand_dims(ops.clip(local, 0, width - 1), -1),
            by_class * ops.expand_dims(weight, -1),
            reduction="add",
        )

    return ops.fori_loop(0, indices.shape[1], add_slot, sums)
