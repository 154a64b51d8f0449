"""Similarity of ordered classes (ages, ratings): `S[i, j] = r ** |i - j|`."""

import math

import numpy as np
from keras import ops

from keras_simloss import _backend, _utils
from keras_simloss.similarity.base import Similarity, checked

# Classes per block of `expected` (a (K, K) product within blocks).
_EXPECTED_BLOCK = 64


def _scan_blocks(values, factor, direction):
    """Exclusive scan `out_n = factor * out_(n - 1) + values_(n - 1)` along
    axis 1 (`direction=-1`: from the right), by doubling: log2(n) shifted
    adds of `(batch, n)`; powers of `factor` that underflow end it early."""
    count = values.shape[1]

    def shifted(x, step):
        pad = ops.zeros_like(x[:, :step])
        if direction > 0:
            return ops.concatenate([pad, x[:, :-step]], axis=1)
        return ops.concatenate([x[:, step:], pad], axis=1)

    total, step, power = values, 1, float(factor)
    while step < count and power > 0.0:
        total = total + power * shifted(total, step)
        step, power = step * 2, power * power
    # Inclusive to exclusive: block n receives from n - 1 and beyond.
    return shifted(total, 1)


@_utils.register
class OrdinalSimilarity(Similarity):
    """Similarity of ordered classes: `S[i, j] = r ** |i - j|` (Eq. 2).

    Built by `ordinal`; see there.
    """

    def __init__(self, num_classes, reduction_factor):
        self.num_classes = _utils.check_int("num_classes", num_classes, low=2)
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

    def _pairs(self, labels, classes):
        # r ** |y - c| per example, as `_compute_rows` computes each entry,
        # without a (batch, C) row.
        return ops.power(
            ops.convert_to_tensor(self.reduction_factor, "float32"),
            ops.cast(ops.abs(labels - classes), "float32"),
        )

    symmetric = True

    def _compute_expected(self, probabilities):
        # (p @ S)_j = sum_c p_c r^|j - c| without C x C, exactly (every term
        # >= 0, nothing cancels). The classes are cut into blocks of K:
        # pairs within a block are one (K, K) product; a block's mass to the
        # left reaches class j of block n as r^(j - start_n) L_n, with
        # L_n = r^K L_(n-1) + u_(n-1) and u_a = sum_(c in a) p_c
        # r^(start_(a+1) - c); the right side mirrors it. The carries are
        # (batch, C / K) scans by doubling, so the step holds a few
        # (batch, C) buffers and does O(batch C K) work in matrix products.
        r = self.reduction_factor
        num_classes = self.num_classes
        size = min(num_classes, _EXPECTED_BLOCK)
        shards = _backend.class_blocks(num_classes)
        if shards > 1:
            # Classes sharded over devices: blocks that do not straddle two
            # devices (a divisor of a device's classes) and no padding, so
            # the products stay local and only the `(batch, C / K)` carries
            # cross devices.
            width = num_classes // shards
            size = max(
                d for d in range(1, min(width, _EXPECTED_BLOCK) + 1) if width % d == 0
            )
        blocks = -(-num_classes // size)
        offsets = np.arange(size)
        within = r ** np.abs(offsets[:, None] - offsets[None, :]).astype(np.float64)
        padded = ops.pad(probabilities, [[0, 0], [0, blocks * size - num_classes]])
        cut = ops.reshape(padded, (-1, blocks, size))
        result = ops.einsum(
            "bnk,kj->bnj", cut, ops.convert_to_tensor(within, "float32")
        )
        if r == 0.0 or blocks == 1:
            return ops.reshape(result, (-1, blocks * size))[:, :num_classes]
        to_right = ops.convert_to_tensor(r ** (size - offsets), "float32")  # u_a
        to_left = ops.convert_to_tensor(r ** (offsets + 1.0), "float32")
        left = _scan_blocks(ops.einsum("bnk,k->bn", cut, to_right), r**size, 1)
        right = _scan_blocks(ops.einsum("bnk,k->bn", cut, to_left), r**size, -1)
        result = (
            result
            + ops.expand_dims(left, -1) * ops.convert_to_tensor(r**offsets, "float32")
            + ops.expand_dims(right, -1)
            * ops.convert_to_tensor(r ** (size - 1.0 - offsets), "float32")
        )
        return ops.reshape(result, (-1, blocks * size))[:, :num_classes]

    def numpy_rows(self, classes):
        classes = np.asarray(classes)
        distances = np.abs(classes[:, None] - np.arange(self.num_classes)[None, :])
        return (self.reduction_factor ** distances.astype(np.float64)).astype(
            np.float32
        )

    def _arguments(self):
        return {
            "num_classes": self.num_classes,
            "reduction_factor": self.reduction_factor,
        }

    def __repr__(self):
        return (
            f"OrdinalSimilarity(num_classes={self.num_classes}, "
            f"reduction_factor={self.reduction_factor})"
        )


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
    return checked(OrdinalSimilarity(num_classes, reduction_factor))
