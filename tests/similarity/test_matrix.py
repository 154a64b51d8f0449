"""`MatrixSimilarity`, `lower_bound`, `get` (`similarity/matrix.py`)."""

import numpy as np
import pytest

from keras_simloss import similarity
from tests.similarity.cases import (
    embedding_reference,
    random_vectors,
)


def test_lower_bound_hand_computed():
    # (0.8 - 0.5) / 0.5 = 0.6, (0.4 - 0.5) -> 0.
    s = similarity.lower_bound([[1.0, 0.8, 0.4], [0.8, 1.0, 0.6], [0.4, 0.6, 1.0]], 0.5)
    np.testing.assert_allclose(
        np.asarray(s), [[1.0, 0.6, 0.0], [0.6, 1.0, 0.2], [0.0, 0.2, 1.0]], atol=1e-7
    )


def test_lower_bound_near_one_keeps_only_the_diagonal():
    s = similarity.lower_bound(
        embedding_reference(random_vectors(7, 3, 5), 0.0), 0.999999
    )
    np.testing.assert_array_equal(np.asarray(s), np.eye(7, dtype=np.float32))


def test_get_wraps_arrays_and_rejects_strings():
    assert isinstance(similarity.get(np.eye(3)), similarity.MatrixSimilarity)
    ordinal = similarity.ordinal(3, 0.2)
    assert similarity.get(ordinal) is ordinal
    with pytest.raises(TypeError, match="similarity"):
        similarity.get("ordinal")


BAD_MATRICES = {
    "not-square": (
        np.ones((2, 3)),
        r"Expected a square matrix.*Received: matrix.shape=\(2, 3\)",
    ),
    "one-class": (np.ones((1, 1)), r"C >= 2"),
    "not-finite": (
        np.array([[1.0, np.nan], [0.0, 1.0]]),
        r"finite.*matrix\[0, 1\]=nan",
    ),
    "above-one": (np.array([[1.0, 1.5], [0.0, 1.0]]), r"\[0, 1\].*matrix\[0, 1\]=1.5"),
    "negative": (np.array([[1.0, 0.0], [-0.1, 1.0]]), r"\[0, 1\].*matrix\[1, 0\]=-0.1"),
    "diagonal": (np.array([[1.0, 0.0], [0.0, 0.9]]), r"diagonal.*matrix\[1, 1\]=0.9"),
}


@pytest.mark.parametrize("case", list(BAD_MATRICES), ids=list(BAD_MATRICES))
def test_bad_matrix_is_rejected(case):
    matrix, message = BAD_MATRICES[case]
    with pytest.raises(ValueError, match=message):
        similarity.MatrixSimilarity(matrix)


@pytest.mark.parametrize(
    "matrix",
    [
        np.array([[1.0, 0.5j], [0.5, 1.0]]),
        [["1", "0.5"], ["0.5", "1"]],
        np.array([[1.0, 0.5], [0.5, 1.0]], dtype=object),
    ],
    ids=["complex", "numeric-strings", "object"],
)
def test_matrix_must_hold_real_numbers(matrix):
    with pytest.raises(TypeError, match=r"`matrix`.*real numbers"):
        similarity.MatrixSimilarity(matrix)
