"""`top_k`: the `k` most similar classes of each class, exactly, in blocks."""

import numpy as np

from keras_simloss import _utils
from keras_simloss.similarity.base import checked
from keras_simloss.similarity.embedding import EmbeddingSimilarity
from keras_simloss.similarity.matrix import get
from keras_simloss.similarity.sparse import SparseSimilarity

# Rows per block of `top_k`: about this many entries (64 MiB of float32).
_TOP_K_BLOCK_ENTRIES = 1 << 24

# Entries per piece where rows are searched in pieces (`_unsure_rows`,
# `_best`, `_Float64Cosines.whole`): 16 MiB of int64 keys or float64 values.
_PIECE_ENTRIES = _TOP_K_BLOCK_ENTRIES // 8

# Columns per chunk in `top_k`'s search of a row.
_CHUNK = 64

# Float64 numbers rescored at a time (16 MiB per side, whatever `d`).
_RESCORE_ENTRIES = 1 << 21

# Columns of the first prefix of a row `_unsure_rows` searches.
_PREFIX = 256


def top_k(similarity, k, batch_size=None, on_device=False):
    """Keeps the `k` most similar other classes of each class.

    Builds a `SparseSimilarity` from any similarity (a `Similarity` or a dense
    matrix), working through the classes `batch_size` rows at a time, so
    memory is bounded by the block of rows, never `C x C`. Each row costs
    `O(C)`: one pass for the maximum of each chunk of 64 columns, then
    partial selection on the top chunks (never a full sort). Ties cost no
    more: a row whose top value many classes share (duplicated or parallel
    vectors, shared ancestors) is settled from the first of them in index
    order, as no class exceeds that value and ties go to the smaller index.

    The result is exact: the `k` largest `S[i, j]`, `j != i`, in decreasing
    order, ties broken toward the smaller class index `j`. Zero similarities
    are not kept (a row with fewer than `k` positive entries leaves slots
    unused). For `from_embeddings`, the rows are a float32 product of unit
    vectors (BLAS, the bulk of the work); every class whose float32 cosine is
    within the product's rounding-error bound of the `k`-th largest is then
    rescored in float64, so rounding never changes which classes are kept or
    their values (float64 cosines, as `numpy.asarray(similarity)` computes
    them, stored as float32). A row of ties spread over it that is not
    settled so is searched whole, in float64 for embeddings (the float64 unit
    vectors, `C x d`, are then kept while `top_k` runs).

    With `on_device=True`, for `from_embeddings`, the active Keras backend
    does the bulk of the work on its default device (a GPU where there is
    one): each block's float32 product and a partial selection of its top
    `k + 8` classes; only those come back to the host, where the rows are
    settled as above (float64 rescoring near the cut). A row whose `k + 8`
    candidates do not reach below the rounding margin of its `k`-th value
    (ties spread over the row) is searched by the NumPy path. The result is
    the same, entry for entry. Other kinds take the NumPy path. On JAX with
    several devices (GPUs, or simulated host devices), each block's rows
    are split over all of them; every device holds the `C x d` table.

    Args:
        similarity: a `Similarity` or an array-like `(C, C)`.
        k: int >= 1, neighbours kept per class.
        batch_size: rows computed at a time, an int >= 1. Defaults to `None`:
            blocks of about 16M entries (64 MiB of float32).
        on_device: bool, default `False`: whether the block products and the
            partial selection of embeddings run on the Keras backend's device
            rather than in NumPy.

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
    # Rows are padded with zeros up to a multiple of the chunk width (a zero
    # never displaces a class of positive similarity, and is never kept).
    padded = -(-num_classes // _CHUNK) * _CHUNK
    scores = None  # the rows' values are exact
    on_device = _utils.check_bool("on_device", on_device)
    if isinstance(source, EmbeddingSimilarity):
        unit = np.zeros((padded, source.vectors.shape[1]), np.float32)
        unit[:num_classes] = source.unit_vectors()
        scores = _Float64Cosines(source)
        if on_device:
            _device_top_k(source, unit, scores, k, batch_size, indices, values)
            return checked(SparseSimilarity(indices, values))
    for start in range(0, num_classes, batch_size):
        classes = np.arange(start, min(start + batch_size, num_classes))
        if scores is None:
            block = np.zeros((len(classes), padded), np.float32)
            block[:, :num_classes] = source.numpy_rows(classes)
        else:
            # The bulk of the work: a float32 (b, d) x (d, C) product (BLAS).
            block = unit[classes] @ unit.T
        row, column, value = _candidates(block, classes, k, num_classes, scores)
        del block  # before the next one is made: one block at a time
        _keep_top_k(row, column, value, classes, k, indices, values)
    return checked(SparseSimilarity(indices, values))


def _device_top_k(source, unit, scores, k, batch_size, indices, values):
    """`top_k` of embeddings with the block products and a partial selection
    on the Keras backend's device (see `top_k`); fills `indices`/`values`."""
    from keras import ops

    num_classes = source.num_classes
    count = min(num_classes, k + 8)  # candidates per row from the device
    table = ops.convert_to_tensor(unit[:num_classes])
    columns = ops.arange(num_classes, dtype="int32")

    def block_top(rows):
        cosine = ops.matmul(ops.take(table, rows, axis=0), ops.transpose(table))
        own = ops.expand_dims(rows, -1) == ops.expand_dims(columns, 0)
        cosine = ops.where(own, float("-inf"), cosine)  # never the class itself
        return ops.top_k(cosine, count, sorted=True)

    split = _row_split()
    for start in range(0, num_classes, batch_size):
        classes = np.arange(start, min(start + batch_size, num_classes))
        top, column = block_top(split(classes))
        top, column = top[: len(classes)], column[: len(classes)]
        top = ops.convert_to_numpy(top).astype(np.float64)
        column = ops.convert_to_numpy(column).astype(np.int64)
        # Every class whose exact value can reach the k-th largest has a
        # float32 cosine of at least kth - margin (see `_Float64Cosines`).
        floor = top[:, k - 1] - scores.margin
        sure = (top[:, -1] < floor) | (count == num_classes)
        band = (top >= floor[:, None]) & sure[:, None]
        row, position = np.nonzero(band)
        column = column[row, position]
        value = scores.rescore(classes[row], column)
        keep = value > 0
        found = [(row[keep], column[keep], value[keep])]
        unsure = np.flatnonzero(~sure)
        if len(unsure):
            # Ties spread over the row: the NumPy path's search, on these
            # rows' float32 block.
            block = unit[classes[unsure]] @ unit.T
            part = _candidates(block, classes[unsure], k, num_classes, scores)
            found.append((unsure[part[0]], part[1], part[2]))
        row, column, value = (np.concatenate(parts) for parts in zip(*found))
        _keep_top_k(row, column, value, classes, k, indices, values)


def _row_split():
    """`classes -> int32 tensor` for `_device_top_k`'s blocks: on JAX with
    several local devices of the default platform, the block's rows laid
    out over all of them (padded with the last class to a multiple of
    their count), so that XLA splits the product and the selection by rows;
    elsewhere a tensor on the default device."""
    from keras import ops

    from keras_simloss import _backend

    devices = []
    if _backend.backend() == "jax":
        import jax

        devices = jax.local_devices()
    if len(devices) < 2:
        return lambda classes: ops.convert_to_tensor(classes.astype(np.int32))
    mesh = jax.sharding.Mesh(np.asarray(devices), ("rows",))
    layout = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("rows"))

    def split(classes):
        padded = np.full(-(-len(classes) // len(devices)) * len(devices), classes[-1])
        padded[: len(classes)] = classes
        return jax.device_put(padded.astype(np.int32), layout)

    return split


def _candidates(block, classes, k, num_classes, scores):
    """Entries of a block of rows that can be among their `k` best.

    `block`: the float32 rows of `classes`, padded with zeros to a multiple
    of `_CHUNK` columns (their diagonal is overwritten). `scores`: `None` where they are the
    exact values; for embeddings the `_Float64Cosines` of the float32
    cosines they hold. Returns `(row, column, value)`, values above 0: for
    most rows every class that can be among the `k` best (`_keep_top_k`
    picks them), for the rows `_unsure_rows` settles their `k` best.
    """
    size, padded = block.shape
    block[np.arange(size), classes] = -np.inf  # never the class itself
    margin = 0.0 if scores is None else scores.margin
    # One pass over the block: the maximum of each chunk of columns. The
    # k-th largest chunk maximum is at most the row's k-th largest entry (k
    # chunks hold an entry at least as large), so every candidate lies in a
    # chunk whose maximum is within `margin` of it: only the top chunks are
    # searched further, never the whole row. Chunk c holds the columns
    # c, c + n, c + 2n, ... (n chunks): a maximum over the middle axis is an
    # elementwise maximum of contiguous rows, several times faster than one
    # over a short last axis.
    num_chunks = padded // _CHUNK
    chunk_max = block.reshape(size, _CHUNK, num_chunks).max(axis=1)
    kept = min(num_chunks, k + 8)
    top_keys = _top_keys(chunk_max, kept)
    top = _LOW - (top_keys & _LOW)  # the chunks
    unsure = np.zeros(size, bool)
    if kept >= k:
        top_max = _key_values(top_keys)
        threshold = _kth_largest(top_max, k)  # at most the row's k-th largest
        if kept < num_chunks:
            # Rows where a chunk left out may still hold a candidate (many
            # chunks within the margin: ties spread over the row).
            unsure = top_max.min(axis=1) >= threshold - margin
    sure = np.flatnonzero(~unsure)
    # The columns of the top chunks of the other rows, gathered from the
    # flat block (the fastest NumPy gather).
    columns = (np.arange(_CHUNK)[:, None] * num_chunks + top[sure, None, :]).reshape(
        len(sure), _CHUNK * kept
    )
    gathered = np.take(block.ravel(), columns + sure[:, None] * padded)
    if kept >= k:
        # The k-th largest chunk maximum stands for the row's k-th largest
        # entry: a few more candidates (where the row's top entries share a
        # chunk), no partial selection of the gathered columns.
        threshold = threshold[sure]
    else:
        threshold = _kth_largest(gathered, k)  # fewer than k chunks: all here
    band = (gathered >= (threshold - margin)[:, None]) & (columns < num_classes)
    position_row, position = np.nonzero(band)
    row, column = sure[position_row], columns[position_row, position]
    if scores is None:
        value = gathered[position_row, position]
    else:
        # Exact (float64) cosines of the candidates only: b (k + a few) x d
        # work (at most the gathered columns of a row).
        value = scores.rescore(classes[row], column)
    keep = value > 0
    found = [
        (row[keep], column[keep], value[keep]),
        _unsure_rows(
            block, classes, np.flatnonzero(unsure), chunk_max, k, num_classes, scores
        ),
    ]
    return tuple(np.concatenate(parts) for parts in zip(*found))


def _unsure_rows(block, classes, rows, chunk_max, k, num_classes, scores):
    """`(row, column, value)` of the `k` best of rows the chunks do not bound.

    `rows`: positions in `block` (as in `_candidates`), of rows with many
    entries within the margin of their top values, as duplicated or
    parallel vectors and shared ancestors make them.

    No class of row `i` has a value above `bound`: the row's largest entry
    for exact values; for embeddings `S(best + margin)`, `best` the row's
    largest float32 cosine and `margin` the product's error bound (`S`:
    clip, Eq. 3, float32, all monotone). Where `k` classes have the value
    `bound`, the first `k` of them by index are the row's `k` best: no class
    is larger, and any other class equal to them has a larger index. All
    their entries in `block` are at least `floor`: `bound` itself for exact
    values; for embeddings `least - margin`, `least` the smallest float64
    cosine of value `bound`. So the entries of at least `floor` are sought
    in a prefix of the row (4 times longer each time: `O(k)` columns where
    ties are dense), and the first `2 k + 8` of them rescored, until `k`
    have the value `bound`. A class with duplicates or parallel vectors has
    them all at cosine 1 (clipped), so its row is settled so. The other rows
    are searched whole (`_best`; for embeddings in float64).
    """
    best = chunk_max[rows].max(axis=1)
    if scores is None:
        bound = floor = best
        pending = np.flatnonzero(bound > 0)  # else none is positive: none kept
    else:
        bound = scores.values(best.astype(np.float64) + scores.margin)
        pending = np.flatnonzero(bound > 0)
        floor = np.zeros(len(rows))
        floor[pending] = scores.least(bound[pending]) - scores.margin
    width = min(num_classes, max(_PREFIX, 8 * k))
    found = [(np.zeros(0, int), np.zeros(0, int), np.zeros(0, np.float32))]
    whole = [np.zeros(0, int)]
    while len(pending):
        left = [np.zeros(0, int)]
        piece = max(1, _PIECE_ENTRIES // width)
        for start in range(0, len(pending), piece):
            part = pending[start : start + piece]
            reach = block[rows[part], :width] >= floor[part, None]
            # Rows with `k` entries that may have the value `bound` so far.
            ready = (np.count_nonzero(reach, axis=1) >= k) | (width == num_classes)
            left.append(part[~ready])
            reach, part = reach[ready], part[ready]
            row, column, value, settled = _first_at_bound(
                block, classes, rows[part], reach, bound[part], k, scores
            )
            found.append((part[row], column, value))
            whole.append(part[~settled])
        pending = np.concatenate(left)
        # Prefixes grow 4 times, to the whole row once over half of it.
        width = num_classes if 8 * width > num_classes else 4 * width
    whole = np.concatenate(whole)
    if scores is None:
        row, column, value = _best(block, k, rows[whole], num_classes)
    else:
        row, column, value = scores.whole(classes[rows[whole]], k)
    found.append((whole[row], column, value))
    row, column, value = (np.concatenate(parts) for parts in zip(*found))
    return rows[row], column, value


def _first_at_bound(block, classes, rows, reach, bound, k, scores):
    """The first `k` entries of value `bound` in each row, where there are.

    `reach[r]`: the entries of a prefix of row `rows[r]` of `block` that may
    have the value `bound[r]` (see `_unsure_rows`); the first `2 k + 8` of
    them are rescored. Returns `(row, column, value, settled)`: positions
    in `rows` of the settled rows' entries, and which rows are settled.
    """
    hit_row, column = np.divmod(np.flatnonzero(reach), reach.shape[1])
    first = np.searchsorted(hit_row, np.arange(len(rows)))
    keep = np.arange(len(hit_row)) - first[hit_row] < 2 * k + 8
    hit_row, column = hit_row[keep], column[keep]
    if scores is None:
        value = block[rows[hit_row], column]
    else:
        value = scores.rescore(classes[rows[hit_row]], column)
    equal = value == bound[hit_row]
    before = np.cumsum(equal) - equal  # equal ones before, in all rows
    first = np.searchsorted(hit_row, np.arange(len(rows)))
    rank = before - before[first[hit_row]]  # equal ones before, in the row
    settled = np.bincount(hit_row, equal, len(rows)) >= k
    keep = equal & (rank < k) & settled[hit_row]
    return hit_row[keep], column[keep], value[keep], settled


# Ties ---------------------------------------------------------------------
#
# `numpy.partition` slows down by 10x and more on rows of a few distinct
# values (introselect falls back to its slow pivot), and a threshold at the
# k-th value lets every class tied with it through. Both are avoided by one
# int64 key per entry, distinct within a row and ordered as the result must
# be: the float32 value's bits in the high half (made monotone), then
# `2^32 - 1 - column`, so that of equal values the smaller column ranks
# higher. The `k` largest keys of a row are then exactly its `k` best
# entries.

_LOW = np.int64(0xFFFFFFFF)


def _keys(values):
    """int64 keys of a 2-d float32 array, ordered as (value, -column)."""
    bits = values.view(np.int32)
    # Bit patterns of non-negative floats are ordered as the numbers;
    # flipping all but the sign bit of negative ones orders those too.
    keys = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).astype(np.int64)
    keys <<= 32
    keys += _LOW - np.arange(values.shape[1], dtype=np.int64)
    return keys


def _key_values(keys):
    """The float32 values of keys made by `_keys`."""
    bits = (keys >> 32).astype(np.int32)
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF)).view(np.float32)


def _top_keys(values, count):
    """The `count` largest keys of each row of `values`, in no order."""
    width = values.shape[1]
    return np.partition(_keys(values), width - count, axis=1)[:, width - count :]


def _kth_largest(values, k):
    """The `k`-th largest entry of each row of a float32 array."""
    width = values.shape[1]
    kth = np.partition(_keys(values), width - k, axis=1)[:, width - k]
    return _key_values(kth)


def _best(values, k, rows=None, width=None):
    """`(row, column, value)` of the `k` best positive entries of each row.

    Of `values[rows, :width]` (all by default; `row` counts in `rows`).
    Best means largest value, ties toward the smaller column; exactly `k`
    entries per row before the zeros are dropped, whatever the ties, in
    `O(C)` per row. Works through pieces of `_PIECE_ENTRIES` keys.
    """
    rows = np.arange(len(values)) if rows is None else rows
    width = values.shape[1] if width is None else width
    piece = max(1, _PIECE_ENTRIES // width)
    row, column = [np.zeros(0, int)], [np.zeros(0, int)]
    for start in range(0, len(rows), piece):
        keys = _keys(values[rows[start : start + piece], :width])
        kth = np.partition(keys, width - k, axis=1)[:, width - k]
        part_row, part_column = np.nonzero(keys >= kth[:, None])
        row.append(part_row + start)
        column.append(part_column)
    row, column = np.concatenate(row), np.concatenate(column)
    value = values[rows[row], column]
    keep = value > 0
    return row[keep], column[keep], value[keep]


# Embeddings ---------------------------------------------------------------


class _Float64Cosines:
    """Float64 values of an `EmbeddingSimilarity`, as `numpy_rows` has them.

    `margin`: error bound of a float32 cosine of unit vectors: rounding the
    vectors (2u) and any summation order of d products (d u), u = 2^-24.
    The exact and the float32 k-th largest differ by at most that bound, so
    every class whose exact value can reach the exact k-th largest has a
    float32 cosine above kth - 2 * bound (and above any t <= kth less that);
    2^-23 more keeps the classes whose values round to the same float32
    number.
    """

    def __init__(self, source):
        self.source = source
        dim = source.vectors.shape[1]
        self.margin = 2 * 1.01 * (dim + 2) * 2.0**-24 + 2.0**-23
        self.table = None  # float64 unit vectors, made by `whole`

    def values(self, cosine):
        """Float64 cosines to float32 values, in place: clip into [0, 1],
        Eq. 3, float32 (as `EmbeddingSimilarity.numpy_rows`)."""
        np.clip(cosine, 0.0, 1.0, out=cosine)
        cosine -= self.source.lower_bound
        np.maximum(cosine, 0.0, out=cosine)
        cosine /= 1.0 - self.source.lower_bound
        return cosine.astype(np.float32)

    def rescore(self, targets, columns):
        """Values of the pairs `(targets, columns)`: `O(d)` each."""
        value = np.empty(len(targets), np.float32)
        step = max(1, _RESCORE_ENTRIES // self.source.vectors.shape[1])
        for start in range(0, len(targets), step):
            part = slice(start, start + step)
            left = self.source.unit_vectors(targets[part], dtype=np.float64)
            right = self.source.unit_vectors(columns[part], dtype=np.float64)
            value[part] = self.values(np.einsum("ij,ij->i", left, right))
        return value

    def least(self, bound):
        """The smallest float64 cosine of each value `bound > 0`.

        Bisection on the bit patterns of positive float64 numbers (ordered as
        the numbers), between 0 (value 0) and 1 (value 1).
        """
        low = np.zeros(len(bound), np.int64)
        high = np.full(len(bound), np.float64(1.0).view(np.int64))
        while np.any(high - low > 1):
            middle = (low + high) // 2
            reach = self.values(middle.view(np.float64).copy()) >= bound
            high = np.where(reach, middle, high)
            low = np.where(reach, low, middle)
        return high.view(np.float64)

    def whole(self, targets, k):
        """`(row, column, value)` of the `k` best of the whole rows `targets`.

        A float64 product with the unit vectors, as `numpy_rows` computes
        it, in pieces of `_PIECE_ENTRIES` values, then `_best`.
        """
        num_classes = self.source.num_classes
        if len(targets) and self.table is None:
            self.table = self.source.unit_vectors(dtype=np.float64)
        piece = max(1, _PIECE_ENTRIES // num_classes)
        found = [(np.zeros(0, int), np.zeros(0, int), np.zeros(0, np.float32))]
        for start in range(0, len(targets), piece):
            part = targets[start : start + piece]
            left = self.source.unit_vectors(part, dtype=np.float64)
            value = self.values(left @ self.table.T)
            value[np.arange(len(part)), part] = -np.inf  # never the class itself
            row, column, value = _best(value, k)
            found.append((row + start, column, value))
        return tuple(np.concatenate(parts) for parts in zip(*found))


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
