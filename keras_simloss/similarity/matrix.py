"""A class similarity given as a full matrix, and the builders that make one.

- `MatrixSimilarity`: any `C x C` table (hand-made, from data).
- `lower_bound(similarities, lower_bound)`: a table rescaled so that values
  below the bound count as unrelated (Kobs et al., Eq. 3).
- `from_confusion(confusion, lower_bound)`: classes a model confuses.
- `get(identifier)`: a `Similarity` from a similarity, a config or a matrix.
"""

import keras
import numpy as np
from keras import ops

from keras_simloss import _utils
from keras_simloss.similarity.base import Similarity, validate_matrix


@_utils.register
class MatrixSimilarity(Similarity):
    """A class similarity given as a full `C x C` matrix.

    Use it for hand-made tables, confusion-derived similarities, or any matrix
    that has no smaller description. The matrix is saved whole: in the config
    up to 256 entries, else as a binary array in the `.keras` archive. The
    structured kinds store only their arguments instead.

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

    @property
    def uses_dense_table(self):
        return True  # it is one already

    def numpy_rows(self, classes):
        return self.matrix[np.asarray(classes)]

    def __array__(self, dtype=None, copy=None):
        return self.matrix.copy() if dtype is None else self.matrix.astype(dtype)

    _array_arguments = ("matrix",)

    def _arguments(self):
        return {"matrix": self.matrix}


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
        description, so it is saved whole: in the `.keras` archive above 256
        entries).

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
