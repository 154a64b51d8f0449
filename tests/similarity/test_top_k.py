"""`top_k` (`similarity/top_k.py`): exact, ties to the smaller index, in blocks."""

import importlib

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


def _heavily_tied_cases():
    """Rows with hundreds of classes tied at the top (issue 18), and the path
    each must take at k = 10: `prefix` (settled from the first tied classes
    of the row), `whole` (rows searched whole; also `prefix` where listed)."""
    rng = np.random.default_rng(18)
    # One-hot "attribute" vectors: a third of the classes at cosine 1.
    attributes = np.eye(3, dtype=np.float32)[rng.integers(0, 3, 3000)]
    # A few distinct vectors, repeated and scaled: duplicates and parallel
    # vectors, whose float64 cosines may differ in the last bits.
    few = rng.normal(size=(5, 8)).astype(np.float32)
    scale = rng.choice([1.0, 3.0, 0.1], size=(2000, 1)).astype(np.float32)
    repeated = few[rng.integers(0, 5, 2000)] * scale
    # One-hot in 150 dimensions: about 10 classes at cosine 1, fewer than
    # k + 1 = 11, then 1400 tied at 0: searched whole.
    small_groups = np.eye(150, dtype=np.float32)[rng.integers(0, 150, 1500)]
    return {
        "one-hot-attributes": (
            lambda: similarity.from_embeddings(attributes),
            {"prefix"},
        ),
        "one-hot-attributes-l0.5": (
            lambda: similarity.from_embeddings(attributes, 0.5),
            {"prefix"},
        ),
        "duplicated-and-parallel": (
            lambda: similarity.from_embeddings(repeated, 0.1),
            {"prefix"},
        ),
        "one-hot-groups-below-k": (
            lambda: similarity.from_embeddings(small_groups),
            {"prefix", "whole"},
        ),
        # Dense rows: 999 classes tied at 0.5 in each row.
        "hierarchy-blocks-of-1000": (
            lambda: similarity.from_hierarchy(np.arange(3000) // 1000, 0.5),
            {"prefix"},
        ),
        # 6 classes at 0.6, then 493 tied at 0.3: fewer than k at the top.
        "hierarchy-two-levels": (
            lambda: similarity.from_hierarchy(
                [np.arange(2000) // 7, np.arange(2000) // 500], [0.6, 0.3]
            ),
            {"whole"},
        ),
    }


HEAVILY_TIED_CASES = _heavily_tied_cases()


def _spy_on_tie_paths(monkeypatch):
    """Counts the rows settled from a prefix and the rows searched whole."""
    module = importlib.import_module("keras_simloss.similarity.top_k")
    counts = {"prefix": 0, "whole": 0}
    first_at_bound, best = module._first_at_bound, module._best

    def spied_first_at_bound(*args):
        result = first_at_bound(*args)
        counts["prefix"] += int(result[-1].sum())
        return result

    def spied_best(values, k, rows=None, width=None):
        counts["whole"] += len(values) if rows is None else len(rows)
        return best(values, k, rows, width)

    monkeypatch.setattr(module, "_first_at_bound", spied_first_at_bound)
    monkeypatch.setattr(module, "_best", spied_best)
    return counts


@pytest.mark.parametrize("k", [1, 10], ids=["k1", "k10"])
@pytest.mark.parametrize("case", list(HEAVILY_TIED_CASES), ids=list(HEAVILY_TIED_CASES))
def test_top_k_is_exact_on_heavily_tied_rows(case, k, monkeypatch):
    build, paths = HEAVILY_TIED_CASES[case]
    sim = build()
    expected = _top_k_reference(sim, k)
    counts = _spy_on_tie_paths(monkeypatch)
    # Blocks of 250 rows: several blocks, each with its own tied rows; rows
    # searched in pieces of a few rows, so that pieces split each block.
    module = importlib.import_module("keras_simloss.similarity.top_k")
    monkeypatch.setattr(module, "_PIECE_ENTRIES", 1 << 14)
    result = similarity.top_k(sim, k, batch_size=250)
    np.testing.assert_array_equal(result.indices, expected.indices)
    np.testing.assert_array_equal(result.values, expected.values)
    if k == 10:
        # The rows took the tie paths, not the search of the top chunks
        # (which would still be exact here, only slow at large C).
        assert {path for path, rows in counts.items() if rows} == paths


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


_DEVICE_CASES = {
    "embeddings-C2000": (lambda: TOP_K_CASES["embeddings-C2000"](), 0),
    "embeddings-C2000-l0.3": (lambda: TOP_K_CASES["embeddings-C2000-l0.3"](), 0),
    "embeddings-ties": (lambda: TOP_K_CASES["embeddings-ties"](), 1),
    "duplicated-and-parallel": (HEAVILY_TIED_CASES["duplicated-and-parallel"][0], 1),
    "one-hot-groups-below-k": (HEAVILY_TIED_CASES["one-hot-groups-below-k"][0], 1),
    "few-classes": (lambda: similarity.from_embeddings(random_vectors(9, 3, 1)), 0),
}


@pytest.mark.parametrize("case", list(_DEVICE_CASES), ids=list(_DEVICE_CASES))
def test_top_k_on_device_equals_the_full_sort(case, monkeypatch):
    build, tied = _DEVICE_CASES[case]
    sim = build()
    module = importlib.import_module("keras_simloss.similarity.top_k")
    searched = []
    candidates = module._candidates

    def spied_candidates(block, *args):
        searched.append(len(block))
        return candidates(block, *args)

    monkeypatch.setattr(module, "_candidates", spied_candidates)
    for k in sorted({1, min(10, sim.num_classes - 1)}):
        expected = _top_k_reference(sim, k)
        result = similarity.top_k(sim, k, batch_size=333, on_device=True)
        np.testing.assert_array_equal(result.indices, expected.indices)
        np.testing.assert_array_equal(result.values, expected.values)
    # Rows of ties spread over the row fall back to the NumPy search; the
    # others are settled from the device's candidates alone.
    assert bool(searched) == bool(tied), searched


def test_top_k_on_device_must_be_a_bool():
    with pytest.raises(TypeError, match="on_device"):
        similarity.top_k(similarity.ordinal(4, 0.5), k=1, on_device="yes")
