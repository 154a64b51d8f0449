"""`top_k`: the `k` most similar classes of each class, exactly, in blocks."""

import numpy as np

from keras_simloss import _utils
from keras_simloss.similarity.base import checked
from keras_simloss.similarity.embedding import EmbeddingSimilarity
from keras_simloss.similarity.matrix import get
from keras_simloss.similarity.sparse import SparseSimilarity

# Rows per block of `top_k`: about this many entries (64 MiB of float32).
_TOP_K_BLOCK_ENTRIES = 1 << 24

# Columns per chunk in `top_k`'s search of embedding rows.
_CHUNK = 64


def top_k(similarity, k, batch_size=None):
    """Keeps the `k` most similar other classes of each class.

    Builds a `SparseSimilarity` from any similarity (a `Similarity` or a dense
    matrix), working through the classes `batch_size` rows at a time, so
    memory is bounded by the block of rows, never `C x C`. Each row is reduced
    by partial selection (`numpy.partition`, `O(C)`; never a full sort).

    The result is exact: the `k` largest `S[i, j]`, `j != i`, in decreasing
    order, ties broken toward the smaller class index `j`. Zero similarities
    are not kept (a row with fewer than `k` positive entries leaves slots
    unused). For `from_embeddings`, the rows are a float32 product of unit
    vectors (BLAS, the bulk of the work); every class whose float32 cosine is
    within the product's rounding-error bound of the `k`-th largest is then
    rescored in float64, so rounding never changes which classes are kept or
    their values (float64 cosines, as `numpy.asarray(similarity)` computes
    them, stored as float32).

    Args:
        similarity: a `Similarity` or an array-like `(C, C)`.
        k: int >= 1, neighbours kept per class.
        batch_size: rows computed at a time, an int >= 1. Defaults to `None`:
            blocks of about 16M entries (64 MiB of float32).

    Returns:
        A `SparseSimilarity` with `O(C * k)` state.

    Example:

    >>> from keras_simloss.similarity import ordinal
    >>> s = top_k(ordinal(4, 0.5), k=1)  # row 1: classes 0 and 2 tie
    >>> s.indices.tolist(), s.values.tolist()
    ([[1], [0], [1], [2]], [[0.5], [0.5], [0.5], [0.5]])
    """
    source = get(similarity)
    num_classes = source.num_classes
    if batch_size is None:
        batch_size = max(1, min(num_classes, _TOP_K_BLOCK_ENTRIES // num_classes))
    batch_size = _utils.check_int("batch_size", batch_size, low=1)
    k = _utils.check_int("k", k, low=1, high=num_classes, high_name="num_classes")
    # Unused slots point at the class itself with value 0, as
    # `SparseSimilarity` stores them.
    indices = np.repeat(np.arange(num_classes, dtype=np.int32)[:, None], k, axis=1)
    values = np.zeros((num_classes, k), np.float32)
    if isinstance(source, EmbeddingSimilarity):
        # Float32 unit vectors, zero rows appended up to a multiple of the
        # chunk width (a zero vector's cosine is 0, which never displaces a
        # class of positive similarity).
        unit = np.zeros(
            (-(-num_classes // _CHUNK) * _CHUNK, source.vectors.shape[1]), np.float32
        )
        unit[:num_classes] = source.unit_vectors()
    for start in range(0, num_classes, batch_size):
        classes = np.arange(start, min(start + batch_size, num_classes))
        if isinstance(source, EmbeddingSimilarity):
            row, column, value = _embedding_candidates(source, unit, classes, k)
        else:
            rows = np.array(source.numpy_rows(classes), np.float32)  # a copy
            row, column, value = _candidates(rows, classes, k)
        _keep_top_k(row, column, value, classes, k, indices, values)
    return checked(SparseSimilarity(indices, values))


def _candidates(rows, classes, k):
    """Entries of `rows` that can be among the `k` largest off-diagonal ones.

    Returns `(row, column, value)` of every entry at least as large as the
    `k`-th largest of its row (so all ties at that value) and above 0.
    """
    num_classes = rows.shape[1]
    rows[np.arange(len(classes)), classes] = -np.inf  # never the class itself
    # The k-th largest of each row by partial selection: O(C), no sort.
    kth = np.partition(rows, num_classes - k, axis=1)[:, num_classes - k]
    row, column = np.nonzero((rows >= kth[:, None]) & (rows > 0))
    return row, column, rows[row, column]


def _embedding_candidates(source, unit, classes, k):
    """`_candidates` of a block of embedding rows, rescored in float64.

    `unit` holds the float32 unit vectors, padded with zero rows to a
    multiple of `_CHUNK`.
    """
    padded, dim = unit.shape
    size = len(classes)
    # The bulk of the work: a float32 (b, d) x (d, C) product (BLAS).
    cosine = unit[classes] @ unit.T
    cosine[np.arange(size), classes] = -np.inf  # never the class itself
    # Error bound of a float32 cosine of unit vectors: rounding the vectors
    # (2u) and any summation order of d products (d u), u = 2^-24. The exact
    # and the float32 k-th largest differ by at most that bound, so every
    # class whose exact value can reach the exact k-th largest has a float32
    # cosine above kth - 2 * bound; 2^-23 more keeps the classes whose values
    # round to the same float32 number.
    margin = 2 * 1.01 * (dim + 2) * 2.0**-24 + 2.0**-23
    # One pass over the block: the maximum of each chunk of columns. The
    # k-th largest chunk maximum is at most the row's k-th largest entry (k
    # chunks hold an entry at least as large), so every candidate lies in a
    # chunk whose maximum is within `margin` of it: only the top chunks are
    # searched further, never the whole row. Chunk c holds the columns
    # c, c + n, c + 2n, ... (n chunks): a maximum over the middle axis is an
    # elementwise maximum of contiguous rows, several times faster than one
    # over a short last axis.
    num_chunks = padded // _CHUNK
    chunks = cosine.reshape(size, _CHUNK, num_chunks)
    chunk_max = chunks.max(axis=1)
    kept = min(num_chunks, k + 8)
    top = np.argpartition(chunk_max, num_chunks - kept, axis=1)[:, -kept:]
    if kept < num_chunks:
        top_max = np.take_along_axis(chunk_max, top, axis=1)
        chunk_kth = np.partition(top_max, kept - k, axis=1)[:, kept - k]
        # Rows where a chunk left out may still hold a candidate (many
        # chunks within the margin) are searched whole, below.
        unsure = np.flatnonzero(top_max.min(axis=1) >= chunk_kth - margin)
    else:
        unsure = []  # every chunk is searched
    # The columns of the top chunks, gathered from the flat block (the
    # fastest NumPy gather).
    columns = (np.arange(_CHUNK)[:, None] * num_chunks + top[:, None, :]).reshape(
        size, _CHUNK * kept
    )
    gathered = np.take(cosine.ravel(), columns + np.arange(size)[:, None] * padded)
    kth = np.partition(gathered, gathered.shape[1] - k, axis=1)[:, -k]
    row, position = np.nonzero(gathered >= (kth - margin)[:, None])
    column = columns[row, position]
    if len(unsure):
        keep = ~np.isin(row, unsure)
        row, column = [row[keep]], [column[keep]]
        for i in unsure:
            full_kth = np.partition(cosine[i], padded - k)[padded - k]
            extra = np.flatnonzero(cosine[i] >= full_kth - margin)
            row.append(np.full(len(extra), i))
            column.append(extra)
        row, column = np.concatenate(row), np.concatenate(column)
    real = column < source.num_classes  # not a padding column
    row, column = row[real], column[real]
    # Exact (float64) cosines of the candidates only: b (k + a few) x d work.
    left = source.unit_vectors(classes, dtype=np.float64)[row]
    right = source.unit_vectors(column, dtype=np.float64)
    exact = np.einsum("ij,ij->i", left, right)
    # As `numpy_rows`: clip into [0, 1], Eq. 3, then float32.
    value = np.maximum(np.clip(exact, 0.0, 1.0) - source.lower_bound, 0.0) / (
        1.0 - source.lower_bound
    )
    value = value.astype(np.float32)
    keep = value > 0
    return row[keep], column[keep], value[keep]


def _keep_top_k(row, column, value, classes, k, indices, values):
    """Writes the `k` best candidates of each row into `indices`/`values`.

    Best means largest value, ties toward the smaller class index.
    """
    order = np.lexsort((column, -value, row))  # by row, value down, index up
    row, column, value = row[order], column[order], value[order]
    first = np.searchsorted(row, np.arange(len(classes)))
    rank = np.arange(len(row)) - first[row]
    keep = rank < k
    target = classes[row[keep]]
    indices[target, rank[keep]] = column[keep]
    values[target, rank[keep]] = value[keep]
