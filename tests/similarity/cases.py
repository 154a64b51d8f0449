"""Shared cases of the similarity tests: every kind with an independent NumPy matrix."""

import numpy as np

from keras_simloss import similarity
from tests.testing import (
    JIT_COMPILE,
)


def random_vectors(num_classes, dim, seed):
    return (
        np.random.default_rng(seed).normal(size=(num_classes, dim)).astype(np.float32)
    )


# Each case: (builder call, independent NumPy matrix).
def ordinal_reference(num_classes, r):
    i, j = np.meshgrid(np.arange(num_classes), np.arange(num_classes), indexing="ij")
    return np.where(i == j, 1.0, float(r) ** np.abs(i - j))


def embedding_reference(vectors, bound):
    vectors = np.asarray(vectors, np.float64)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    sim = np.clip(unit @ unit.T, 0.0, 1.0)
    out = np.maximum(0.0, sim - bound) / (1.0 - bound)
    np.fill_diagonal(out, 1.0)
    return out


def hierarchy_reference(levels, values):
    levels = np.atleast_2d(levels)
    num_classes = levels.shape[1]
    out = np.zeros((num_classes, num_classes))
    for i in range(num_classes):
        for j in range(num_classes):
            if i == j:
                out[i, j] = 1.0
            else:
                shared = [v for lvl, v in zip(levels, values) if lvl[i] == lvl[j]]
                out[i, j] = max(shared, default=0.0)
    return out


CASES = {
    "ordinal-r0": (lambda: similarity.ordinal(5, 0.0), lambda: np.eye(5)),
    "ordinal-r0.5": (
        lambda: similarity.ordinal(6, 0.5),
        lambda: ordinal_reference(6, 0.5),
    ),
    "ordinal-r0.9": (
        lambda: similarity.ordinal(40, 0.9),
        lambda: ordinal_reference(40, 0.9),
    ),
    "embeddings-l0": (
        lambda: similarity.from_embeddings(random_vectors(9, 4, 0)),
        lambda: embedding_reference(random_vectors(9, 4, 0), 0.0),
    ),
    "embeddings-l0.3": (
        lambda: similarity.from_embeddings(random_vectors(12, 3, 1), 0.3),
        lambda: embedding_reference(random_vectors(12, 3, 1), 0.3),
    ),
    "embeddings-l0.3-keep-rows": (
        lambda: similarity.from_embeddings(
            random_vectors(12, 3, 1), 0.3, keep_rows=True
        ),
        lambda: embedding_reference(random_vectors(12, 3, 1), 0.3),
    ),
    "hierarchy-1level": (
        lambda: similarity.from_hierarchy([0, 0, 1, 1, 1, 2], 0.4),
        lambda: hierarchy_reference([0, 0, 1, 1, 1, 2], [0.4]),
    ),
    "hierarchy-2levels": (
        lambda: similarity.from_hierarchy(
            [[0, 0, 1, 1, 2, 2], [0, 0, 0, 0, 1, 1]], [0.6, 0.2]
        ),
        lambda: hierarchy_reference(
            [[0, 0, 1, 1, 2, 2], [0, 0, 0, 0, 1, 1]], [0.6, 0.2]
        ),
    ),
    "matrix": (
        lambda: similarity.MatrixSimilarity([[1, 0.3, 0], [0.1, 1, 0.2], [0, 0.9, 1]]),
        lambda: np.array([[1, 0.3, 0], [0.1, 1, 0.2], [0, 0.9, 1]]),
    ),
    "sparse": (
        lambda: similarity.SparseSimilarity(
            [[1, 2], [0, 0], [1, 0]], [[0.5, 0.25], [0.7, 0.0], [0.1, 0.0]]
        ),
        lambda: np.array([[1, 0.5, 0.25], [0.7, 1, 0], [0, 0.1, 1]]),
    ),
}


# Every kind of similarity, on the dense-table path and on the on-the-fly path
# (threshold lowered on the instance: C = 6 > 2), as a model would use it.
def _fit_cases():
    num_classes = 6
    vectors = random_vectors(num_classes, 4, 7)
    builders = {
        "ordinal": lambda: similarity.ordinal(num_classes, 0.5),
        "embeddings": lambda: similarity.from_embeddings(vectors, 0.1),
        "hierarchy": lambda: similarity.from_hierarchy([0, 0, 1, 1, 2, 2], 0.4),
        "matrix": lambda: similarity.MatrixSimilarity(
            ordinal_reference(num_classes, 0.3)
        ),
        "sparse": lambda: similarity.SparseSimilarity(
            (np.arange(num_classes)[:, None] + np.array([[1, 2]])) % num_classes,
            np.full((num_classes, 2), 0.5),
        ),
    }
    cases = {}
    for kind, build in builders.items():
        if kind in ("ordinal", "embeddings", "hierarchy"):
            cases[f"{kind}-table"] = (build, True)
            cases[f"{kind}-on-the-fly"] = (build, False)
        else:
            cases[kind] = (build, kind == "matrix")
    return cases


FIT_CASES = _fit_cases()


JIT_MODES = [False, True] if JIT_COMPILE else [False]
