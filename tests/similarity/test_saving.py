"""Saving similarities: configs, archived arrays, old configs (`similarity/saving.py`)."""

import json

import keras
import numpy as np
import pytest

from keras_simloss import similarity
from tests.similarity.cases import (
    FIT_CASES,
    ordinal_reference,
    random_vectors,
)
from tests.testing import (
    save_and_reload,
)

ARCHIVE_CASES = {
    "ordinal": (lambda: similarity.ordinal(6, 0.5), False),
    "hierarchy": (lambda: similarity.from_hierarchy([0, 0, 1, 1, 2, 2], 0.4), False),
    "embeddings": (lambda: similarity.from_embeddings(random_vectors(6, 4, 2)), True),
    "matrix": (
        lambda: similarity.MatrixSimilarity(ordinal_reference(6, 0.3)),
        True,
    ),
    "sparse": (lambda: FIT_CASES["sparse"][0](), True),
}


@pytest.mark.parametrize("case", list(ARCHIVE_CASES), ids=list(ARCHIVE_CASES))
def test_keras_file_keeps_large_state_as_binary_arrays(case, tmp_path, monkeypatch):
    import zipfile

    from keras_simloss import MistakeSeverity, SimLoss

    # Lowered so that these 6-class similarities count as large.
    monkeypatch.setattr(similarity.Similarity, "config_max_entries", 4)
    build, archived = ARCHIVE_CASES[case]
    sim = build()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 3)).astype("float32")
    y = rng.integers(0, 6, size=16).astype("int32")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(6)])
    model.compile(
        optimizer="adam",
        loss=SimLoss(sim, from_logits=True),
        metrics=[MistakeSeverity(sim)],
    )
    model.fit(x, y, epochs=1, verbose=0)
    expected = model.evaluate(x, y, verbose=0)
    path = str(tmp_path / "model.keras")
    model.save(path)
    with zipfile.ZipFile(path) as archive:
        config = json.loads(archive.read("config.json"))
    saved = config["compile_config"]["loss"]["config"]["similarity"]["config"]
    assert ("arrays_in_archive" in saved) is archived
    if archived:
        for name in type(sim)._array_arguments:
            assert set(saved[name]) == {"shape", "dtype"}  # no numbers
    # A new process has none of the original objects: drop them.
    del model, sim
    import gc

    gc.collect()
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(loaded.evaluate(x, y, verbose=0), expected)
    matrix = np.asarray(build(), np.float64)
    np.testing.assert_array_equal(np.asarray(loaded.loss.similarity), matrix)


def test_large_config_is_small_whatever_the_number_of_classes():
    vectors = random_vectors(5000, 300, 0)
    sim = similarity.from_embeddings(vectors)
    text = json.dumps(keras.saving.serialize_keras_object(sim))
    assert len(text) < 1000, text
    neighbours = similarity.SparseSimilarity(
        (np.arange(5000)[:, None] + np.arange(1, 11)) % 5000,
        np.full((5000, 10), 0.5),
    )
    assert len(json.dumps(keras.saving.serialize_keras_object(neighbours))) < 1000


def test_old_list_configs_still_load():
    vectors = random_vectors(40, 8, 1)
    old = {
        "module": "keras_simloss.similarity",
        "class_name": "EmbeddingSimilarity",
        "config": {"vectors": vectors.tolist(), "lower_bound": 0.2},
        "registered_name": "keras_simloss>EmbeddingSimilarity",
    }
    rebuilt = similarity.get(old)
    np.testing.assert_array_equal(
        np.asarray(rebuilt), np.asarray(similarity.from_embeddings(vectors, 0.2))
    )
    assert rebuilt.keep_rows is False  # saved before the argument existed


@pytest.mark.parametrize("keep_rows", [False, True])
def test_keep_rows_is_saved_with_the_model(tmp_path, keep_rows):
    from keras_simloss import SimLoss

    vectors = random_vectors(100, 4, 2)  # 400 numbers: the archive path
    sim = similarity.from_embeddings(vectors, 0.1, keep_rows=keep_rows)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(100)])
    model.compile(loss=SimLoss(sim, from_logits=True))
    x = np.random.default_rng(0).normal(size=(8, 3)).astype("float32")
    y = np.arange(8) * 11
    model.train_on_batch(x, y)  # the optimizer's state exists, as after fit
    loaded = save_and_reload(model, tmp_path)
    assert loaded.loss.similarity.keep_rows is keep_rows
    assert float(loaded.evaluate(x, y, verbose=0)) == float(
        model.evaluate(x, y, verbose=0)
    )


def test_config_without_its_archive_says_what_is_missing():
    sim = similarity.from_embeddings(random_vectors(40, 8, 3))
    config = json.loads(json.dumps(keras.saving.serialize_keras_object(sim)))
    config["config"]["arrays_in_archive"] = "0" * 32  # no similarity has these
    orphan = similarity.get(config)
    assert orphan.num_classes == 40 and "40" in repr(orphan)
    with pytest.raises(ValueError, match=r"arrays are stored in a `.keras` archive"):
        np.asarray(orphan)
    # Within one process, a live similarity with the same arrays fills in.
    twin = similarity.get(keras.saving.serialize_keras_object(sim))
    np.testing.assert_array_equal(np.asarray(twin), np.asarray(sim))
