"""`top_k` (`similarity/top_k.py`): exact, ties to the smaller index, in blocks."""

import numpy as np
import pytest

from keras_simloss import similarity
from tests.similarity.cases import (
    CASES,
    random_vectors,
)


def test_top_k_keeps_the_largest_neighbours():
    source = similarity.from_embeddings(random_vectors(30, 5, 3), 0.1)
    dense = np.asarray(source)
    sparse = similarity.top_k(source, k=4)
    kept = np.asarray(sparse)
    for row in range(30):
        others = np.delete(dense[row], row)
        # The kept off-diagonal values are the 4 largest of the row.
        np.testing.assert_allclose(
            np.sort(np.delete(kept[row], row))[-4:], np.sort(others)[-4:], atol=1e-6
        )
    # Nothing is kept that is not in the source.
    assert np.all((kept == dense) | (kept == 0))


def test_top_k_from_matrix_drops_zero_similarities():
    sparse = similarity.top_k(np.eye(4), k=2)
    np.testing.assert_array_equal(sparse.values, 0.0)
    np.testing.assert_array_equal(np.asarray(sparse), np.eye(4))


@pytest.mark.parametrize("batch_size", [-1, 0, 2.5, True], ids=str)
def test_top_k_rejects_bad_batch_size(batch_size):
    with pytest.raises((ValueError, TypeError), match=r"`batch_size`.*batch_size="):
        similarity.top_k(similarity.ordinal(4, 0.5), k=1, batch_size=batch_size)


def _top_k_reference(sim, k):
    """The former `top_k`: full stable sort of every dense row."""
    dense = np.asarray(sim, np.float32).copy()
    np.fill_diagonal(dense, -1.0)
    order = np.argsort(-dense, axis=1, kind="stable")[:, :k]
    values = np.maximum(np.take_along_axis(dense, order, axis=1), 0.0)
    return similarity.SparseSimilarity(order, values)


def _top_k_cases():
    rng = np.random.default_rng(5)
    vectors = rng.normal(size=(2000, 16)).astype(np.float32)
    tied = vectors.copy()
    tied[1::7] = tied[0]  # exact duplicates: equal cosines to everything
    tied[2::11] = 3.0 * tied[5]  # parallel vectors, same cosines
    matrix = rng.choice([0.0, 0.25, 0.5], size=(300, 300)).astype(np.float32)
    matrix = np.maximum(matrix, matrix.T)
    np.fill_diagonal(matrix, 1.0)
    return {
        "embeddings-C2000": lambda: similarity.from_embeddings(vectors),
        "embeddings-C2000-l0.3": lambda: similarity.from_embeddings(vectors, 0.3),
        "embeddings-ties": lambda: similarity.from_embeddings(tied, 0.1),
        "ordinal": lambda: similarity.ordinal(500, 0.6),
        "ordinal-underflow": lambda: similarity.ordinal(500, 0.01),
        "hierarchy": lambda: similarity.from_hierarchy(
            [np.arange(600) // 4, np.arange(600) // 40], [0.6, 0.2]
        ),
        "matrix-many-ties": lambda: similarity.MatrixSimilarity(matrix),
        "sparse": lambda: CASES["sparse"][0](),
    }


TOP_K_CASES = _top_k_cases()


@pytest.mark.parametrize("batch_size", [None, 97], ids=["auto", "97"])
@pytest.mark.parametrize("case", list(TOP_K_CASES), ids=list(TOP_K_CASES))
def test_top_k_is_exact_against_the_full_sort(case, batch_size):
    sim = TOP_K_CASES[case]()
    for k in sorted({1, 2, min(10, sim.num_classes - 1)}):
        expected = _top_k_reference(sim, k)
        result = similarity.top_k(sim, k, batch_size=batch_size)
        np.testing.assert_array_equal(result.indices, expected.indices)
        np.testing.assert_array_equal(result.values, expected.values)


def test_top_k_ties_go_to_the_smaller_index():
    # Classes 1, 2 and 3 are all 0.5 from class 0; k = 2 keeps 1 and 2.
    matrix = np.eye(4)
    matrix[0, 1:] = matrix[1:, 0] = 0.5
    result = similarity.top_k(matrix, k=2)
    assert result.indices[0].tolist() == [1, 2]
    # Embeddings: class 3 duplicates class 1, so both are equally close to 0.
    vectors = [[1.0, 0.2], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]
    result = similarity.top_k(similarity.from_embeddings(vectors), k=1)
    assert result.indices[0].tolist() == [1]
    assert result.indices[2].tolist() == [0]  # cos 0.196 beats 0, 0


@pytest.mark.parametrize("k", [1.5, True, "2"], ids=str)
def test_top_k_rejects_a_k_of_another_type_with_a_type_error(k):
    with pytest.raises(TypeError, match=r"`k`.*Expected an int"):
        similarity.top_k(similarity.ordinal(4, 0.5), k=k)
