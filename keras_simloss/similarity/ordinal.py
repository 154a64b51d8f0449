"""Similarity of ordered classes (ages, ratings): `S[i, j] = r ** |i - j|`."""

import math

import numpy as np
from keras import ops

from keras_simloss import _utils
from keras_simloss.similarity.base import Similarity, checked


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

    symmetric = True

    def _compute_expected(self, probabilities):
        # (p @ S)_j = L_j + R_j with L_j = sum_{c <= j} r^(j - c) p_c (the
        # recurrence L_j = r L_(j-1) + p_j) and R_j = sum_{c > j} r^(c - j)
        # p_c: two scans by doubling (Hillis-Steele), log2(C) shifted adds
        # each, O(batch C log C) work, no C x C. Every term is >= 0, so
        # nothing cancels; r^shift underflowing to 0 ends a scan early.
        r = self.reduction_factor
        left, right = probabilities, probabilities
        shift = 1
        while shift < self.num_classes and r**shift > 0.0:
            factor = float(r**shift)
            pad = ops.zeros_like(left[:, :shift])
            left = left + factor * ops.concatenate([pad, left[:, :-shift]], -1)
            right = right + factor * ops.concatenate([right[:, shift:], pad], -1)
            shift *= 2
        if r == 0.0:
            return left
        after = ops.concatenate([right[:, 1:], ops.zeros_like(right[:, :1])], -1)
        return left + r * after

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
