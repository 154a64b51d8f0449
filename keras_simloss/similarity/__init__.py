"""Class-similarity matrices for `SimLoss` and `MistakeSeverity`.

A class similarity `S` is a `C x C` matrix with entries in `[0, 1]` and a unit
diagonal: `S[i, j]` says how acceptable it is to predict class `j` when the
answer is class `i`. This module builds `S` from the sources a user has:

- `ordinal(num_classes, reduction_factor)`: ordered classes (ages, ratings),
  `S[i, j] = r ** |i - j|` (Kobs et al., Eq. 2).
- `lower_bound(similarities, lower_bound)`: any similarity table, rescaled so
  that values below the bound `l` count as unrelated (Eq. 3).
- `from_embeddings(vectors, lower_bound)`: cosine similarity of class-name
  embeddings (word vectors), clipped at 0, then Eq. 3.
- `from_hierarchy(ancestors, similarities)`: classes that share a parent
  (e.g. CIFAR-100's superclasses) get a fixed similarity.
- `from_confusion(confusion, lower_bound)`: classes a model confuses (Eq. 3).
- `top_k(similarity, k)`: keeps only the `k` most similar classes per class,
  for label spaces too large for a dense matrix.

Each builder returns a `Similarity` (the contract is in `similarity/base.py`,
one kind per module beside it). It stores only what it was built from
(so a 1,000-class ordinal matrix is two numbers in a saved config), computes
the rows it needs inside the loss with `keras.ops`, and turns into the dense
`float32` matrix with `numpy.asarray(similarity)`. Structured similarities
(ordinal, embeddings, hierarchy, sparse) never build `C x C` inside the loss:
they compute the rows of the batch's labels on the fly, so they scale to
label spaces where a dense matrix would not fit in memory. State that is
data (embedding tables, neighbour lists, hand-made matrices) goes into a
`.keras` file as binary arrays, not into the config (see `saving.py`).

Reference:
    Kobs, Steininger, Zehe, Lautenschlager, Hotho, "SimLoss: Class
    Similarities in Cross Entropy", 2020. https://arxiv.org/abs/2003.03182
"""

from keras_simloss.similarity.base import Similarity, validate_matrix
from keras_simloss.similarity.embedding import EmbeddingSimilarity, from_embeddings
from keras_simloss.similarity.hierarchy import HierarchySimilarity, from_hierarchy
from keras_simloss.similarity.matrix import (
    MatrixSimilarity,
    from_confusion,
    get,
    lower_bound,
)
from keras_simloss.similarity.ordinal import OrdinalSimilarity, ordinal
from keras_simloss.similarity.sparse import SparseSimilarity
from keras_simloss.similarity.top_k import top_k

# A saved config names its class's module: the public path, as in 0.1.0, not
# the module of this subpackage that holds the class now.
for _kind in (
    EmbeddingSimilarity,
    HierarchySimilarity,
    MatrixSimilarity,
    OrdinalSimilarity,
    Similarity,
    SparseSimilarity,
):
    _kind.__module__ = __name__
del _kind

__all__ = [
    "EmbeddingSimilarity",
    "HierarchySimilarity",
    "MatrixSimilarity",
    "OrdinalSimilarity",
    "Similarity",
    "SparseSimilarity",
    "from_confusion",
    "from_embeddings",
    "from_hierarchy",
    "get",
    "lower_bound",
    "ordinal",
    "top_k",
    "validate_matrix",
]
