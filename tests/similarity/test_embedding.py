"""`from_embeddings` (`similarity/embedding.py`)."""

import numpy as np
import pytest
from keras import ops

from keras_simloss import similarity
from tests.similarity.cases import (
    embedding_reference,
    random_vectors,
)


def test_embeddings_set_exact_unit_diagonal_and_clip_negative_cosines():
    # Parallel vectors of very different scale give a self-cosine that rounds
    # near 1; opposite vectors have cosine -1, clipped to 0.
    vectors = [[1e-3, 3e3], [-1e-3, -3e3], [3.0, 1.0]]
    matrix = np.asarray(similarity.from_embeddings(vectors))
    np.testing.assert_array_equal(np.diagonal(matrix), 1.0)
    assert matrix[0, 1] == 0.0 and matrix.max() <= 1.0


@pytest.mark.parametrize("scale", [1e19, 1e-19, 1e30, 1e-30], ids=str)
@pytest.mark.parametrize("dense_table", [True, False], ids=["table", "on-the-fly"])
def test_embedding_rows_are_scale_invariant(scale, dense_table):
    # Cosines do not depend on the vectors' scale; in float32, raw dot
    # products of 1e19-scaled vectors overflow and of 1e-19-scaled ones
    # underflow, so the vectors must be normalised first.
    vectors = random_vectors(8, 5, 11)
    sim = similarity.EmbeddingSimilarity(vectors * scale, 0.2)
    if not dense_table:
        sim.dense_table_max_classes = 2
    assert sim.uses_dense_table is dense_table
    expected = embedding_reference(vectors, 0.2)
    labels = np.arange(8, dtype="int32")
    np.testing.assert_allclose(
        ops.convert_to_numpy(sim.rows(labels)), expected, atol=1e-5
    )
    classes = np.roll(labels, 3)
    np.testing.assert_allclose(
        ops.convert_to_numpy(sim.pairs(labels, classes)),
        expected[labels, classes],
        atol=1e-5,
    )
    np.testing.assert_allclose(np.asarray(sim), expected, atol=1e-6)
