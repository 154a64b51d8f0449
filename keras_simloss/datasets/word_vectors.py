"""Class-name vectors from word2vec or GloVe files, for `from_embeddings`.

Parsing is delegated to gensim (`pip install "keras-simloss[vectors]"`), which
reads word2vec text and binary files and header-less GloVe text files.
"""

import dataclasses
import os

import numpy as np

__all__ = ["ClassVectors", "load_word_vectors"]


@dataclasses.dataclass(frozen=True)
class ClassVectors:
    """Vectors found for a list of class names.

    Attributes:
        names: the class names that have a vector, in the order asked.
        indices: the position of each found name in the list asked for.
        vectors: float32 array of shape `(len(names), dim)`.
        missing: the class names with no vector, in the order asked.
    """

    names: tuple
    indices: tuple
    vectors: np.ndarray
    missing: tuple


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

    def lookup(name):
        for candidate in (name, name.lower()):
            if candidate in table.key_to_index:
                return table[candidate]
        if combine_words:
            parts = name.replace(" ", "_").split("_")
            if len(parts) > 1 and all(
                part.lower() in table.key_to_index or part in table.key_to_index
                for part in parts
            ):
                return np.mean([lookup(part) for part in parts], axis=0)
        return None

    found_names, indices, vectors, missing = [], [], [], []
    for index, name in enumerate(names):
        vector = lookup(name)
        if vector is None:
            missing.append(name)
        else:
            found_names.append(name)
            indices.append(index)
            vectors.append(np.asarray(vector, np.float32))
    if missing and on_missing == "raise":
        raise ValueError(
            f"{len(missing)} of {len(names)} class names have no vector in "
            f"{path!r}: {', '.join(missing)}"
        )
    return ClassVectors(
        names=tuple(found_names),
        indices=tuple(indices),
        vectors=np.stack(vectors)
        if vectors
        else np.zeros((0, table.vector_size), np.float32),
        missing=tuple(missing),
    )
