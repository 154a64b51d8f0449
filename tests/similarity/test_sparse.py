"""`SparseSimilarity` (`similarity/sparse.py`)."""

import numpy as np
import pytest

from keras_simloss import similarity


@pytest.mark.parametrize(
    "indices, values, error, message",
    [
        ([[1], [0]], [["0.5"], ["0.5"]], TypeError, r"`values`.*dtype"),
        ([[1], [0]], [["a"], ["b"]], TypeError, r"`values`.*dtype"),
        ([["1"], ["0"]], [[0.5], [0.5]], TypeError, r"`indices`.*dtype"),
        ([[1], [0]], [[0.5 + 1j], [0.5]], TypeError, r"`values`.*dtype"),
        ([[1], [0]], [[np.nan], [0.5]], ValueError, r"values\[0, 0\]=nan"),
        ([[1], [0]], [[0.5], [-np.inf]], ValueError, r"values\[1, 0\]=-inf"),
    ],
    ids=["numeric-strings", "strings", "string-indices", "complex", "nan", "inf"],
)
def test_sparse_rejects_non_numeric_and_names_the_bad_value(
    indices, values, error, message
):
    with pytest.raises(error, match=message):
        similarity.SparseSimilarity(indices, values)
