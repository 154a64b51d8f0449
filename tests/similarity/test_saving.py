"""Saving similarities: configs, archived arrays, old configs (`similarity/saving.py`)."""

import copy
import gc
import io
import json
import zipfile

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


def banded_matrix(num_classes=17):
    """`0.9 ** |i - j|` within two classes of the diagonal, else 0."""
    distance = np.abs(np.arange(num_classes)[:, None] - np.arange(num_classes))
    return np.where(distance <= 2, 0.9**distance, 0.0)


# Similarities large enough for the archive at the default 256 entries.
ARCHIVED = {
    "matrix": lambda: similarity.MatrixSimilarity(banded_matrix()),  # 289
    "embeddings": lambda: similarity.from_embeddings(
        np.random.default_rng(0).normal(size=(40, 8))  # 320
    ),
    "sparse": lambda: similarity.top_k(similarity.ordinal(40, 0.6), 7),  # 560
}

COPIES = {
    # Keras copies a loss by saving it to a `.keras` archive in memory and
    # loading that: the copy's similarity is filled by `load_own_variables`.
    "deepcopy_loss": lambda loss: copy.deepcopy(loss).similarity,
    "deepcopy": lambda loss: copy.deepcopy(loss.similarity),
    "copy": lambda loss: copy.copy(loss.similarity),
}


def _loss_inputs(num_classes):
    rng = np.random.default_rng(1)
    return rng.integers(0, num_classes, size=8), rng.normal(size=(8, num_classes))


@pytest.mark.parametrize("how", list(COPIES), ids=list(COPIES))
@pytest.mark.parametrize("kind", list(ARCHIVED), ids=list(ARCHIVED))
def test_a_copy_that_dies_leaves_the_original_usable(kind, how):
    from keras_simloss import SimLoss

    loss = SimLoss(ARCHIVED[kind](), from_logits=True)
    expected = np.asarray(loss.similarity)
    twin = COPIES[how](loss)
    np.testing.assert_array_equal(np.asarray(twin), expected)
    del twin
    gc.collect()
    config = loss.get_config()
    assert "arrays_in_archive" in config["similarity"]["config"]
    rebuilt = SimLoss.from_config(config)  # pending: filled from `loss`
    np.testing.assert_array_equal(np.asarray(rebuilt.similarity), expected)
    labels, logits = _loss_inputs(expected.shape[0])
    assert float(rebuilt(labels, logits)) == float(loss(labels, logits))


@pytest.mark.parametrize("how", ["deepcopy", "copy"])
@pytest.mark.parametrize("kind", list(ARCHIVED), ids=list(ARCHIVED))
def test_a_copy_is_independent_and_stands_in_for_the_original(kind, how):
    from keras_simloss import SimLoss

    original = ARCHIVED[kind]()
    original.rows([0, 1])  # caches a backend tensor on the original
    cached = dict(original.__dict__["_tensors"])
    # Copied before the original's config (and content hash) exists.
    twin = COPIES[how](SimLoss(original))
    config = keras.saving.serialize_keras_object(original)
    expected = np.asarray(original)
    del original
    gc.collect()
    rebuilt = similarity.get(config)  # only the copy has the arrays now
    np.testing.assert_array_equal(np.asarray(rebuilt), expected)
    # The copy makes its own tensors rather than sharing the original's.
    assert "_tensors" not in twin.__dict__
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(twin.rows([0, 1])), expected[:2]
    )
    assert all(twin._tensors[key] is not cached[key] for key in cached)


def _train_one_batch(model):
    # The optimizer's state then exists, as after `fit`, so that it reloads.
    num_classes = model.output_shape[-1]
    x = np.random.default_rng(0).normal(size=(8, 3)).astype("float32")
    model.train_on_batch(x, np.arange(8) % num_classes)


# The archived array that `_damage` changes, per kind.
DAMAGED_ARRAY = {"matrix": "matrix", "embeddings": "vectors", "sparse": "values"}


def _damage(path, name):
    """Halves one number of the array `name` in a `.keras` file's weights."""
    import h5py

    with zipfile.ZipFile(path) as archive:
        members = {info.filename: archive.read(info) for info in archive.infolist()}
    weights = io.BytesIO(members["model.weights.h5"])
    with h5py.File(weights, "r+") as file:
        found = []
        file.visititems(
            lambda key, item: (
                found.append(key)
                if isinstance(item, h5py.Dataset) and key.split("/")[-1] == name
                else None
            )
        )
        (key,) = found  # under the loss's path, e.g. "compile_loss/.../vars"
        array = file[key][...]
        before = array.copy()
        array.flat[1] *= 0.5  # still a valid similarity: only the hash knows
        assert not np.array_equal(array, before)
        file[key][...] = array
    members["model.weights.h5"] = weights.getvalue()
    with zipfile.ZipFile(path, "w") as archive:
        for filename, data in members.items():
            archive.writestr(filename, data)


@pytest.mark.parametrize("kind", list(ARCHIVED), ids=list(ARCHIVED))
def test_a_damaged_keras_file_says_that_it_is_damaged(kind, tmp_path):
    from keras_simloss import SimLoss

    sim = ARCHIVED[kind]()
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(sim.num_classes)])
    model.compile(loss=SimLoss(sim, from_logits=True))
    _train_one_batch(model)
    path = str(tmp_path / "model.keras")
    model.save(path)
    _damage(path, DAMAGED_ARRAY[kind])
    del model, sim
    gc.collect()
    # Keras retries the loss from its other paths with empty stores; the
    # error it reports must still be the diagnosis, not "has no array".
    with pytest.raises(ValueError, match="do not match the content hash") as error:
        keras.models.load_model(path)
    assert "damaged or mixes two saves" in str(error.value)
    assert "has no array" not in str(error.value)


def _compiled_model(sim, metric=None):
    from keras_simloss import MistakeSeverity, SimLoss

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(sim.num_classes)])
    model.compile(
        optimizer="adam",
        loss=SimLoss(sim, from_logits=True),
        metrics=[MistakeSeverity(metric or sim)],
    )
    _train_one_batch(model)
    return model


@pytest.mark.parametrize("kind", list(ARCHIVED), ids=list(ARCHIVED))
def test_legacy_h5_refuses_a_similarity_whose_arrays_need_an_archive(kind, tmp_path):
    sim = ARCHIVED[kind]()
    model = _compiled_model(sim)
    name = type(sim).__name__
    with pytest.raises(ValueError, match=rf"Cannot save this {name} in the legacy"):
        model.save(str(tmp_path / "model.h5"))
    # An archived similarity used by a metric only is refused too.
    metric_only = _compiled_model(similarity.ordinal(sim.num_classes, 0.5), sim)
    with pytest.raises(ValueError, match=r"path ending in `.keras`"):
        metric_only.save(str(tmp_path / "metric.h5"))
    # The ways out that the message names work, and nothing else changed.
    model.save(str(tmp_path / "model_only.h5"), include_optimizer=False)
    loaded = keras.models.load_model(str(tmp_path / "model_only.h5"))
    assert loaded.layers[-1].get_weights()[0].shape == (3, sim.num_classes)
    config = keras.saving.serialize_keras_object(sim)
    assert "arrays_in_archive" in config["config"]
    # A new model: Keras's `.h5` save drops the optimizer from the model's
    # compile config (`model._compile_config`), refused or not.
    reloaded = save_and_reload(_compiled_model(sim), tmp_path)
    np.testing.assert_array_equal(np.asarray(reloaded.loss.similarity), np.asarray(sim))


SMALL = {
    "ordinal": lambda: similarity.ordinal(6, 0.5),
    "matrix": lambda: similarity.MatrixSimilarity(ordinal_reference(6, 0.3)),
    "hierarchy": lambda: similarity.from_hierarchy([0, 0, 1, 1, 2, 2], 0.4),
}


@pytest.mark.parametrize("kind", list(SMALL), ids=list(SMALL))
def test_legacy_h5_keeps_similarities_held_in_the_config(kind, tmp_path):
    import h5py

    sim = SMALL[kind]()
    model = _compiled_model(sim)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 3)).astype("float32")
    y = rng.integers(0, sim.num_classes, size=16)
    model.fit(x, y, epochs=1, verbose=0)
    expected = model.evaluate(x, y, verbose=0)
    path = str(tmp_path / "model.h5")
    model.save(path)
    with h5py.File(path, "r") as file:
        assert "arrays_in_archive" not in str(file.attrs["training_config"])
    del model, sim
    gc.collect()
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(loaded.evaluate(x, y, verbose=0), expected, rtol=1e-6)
    np.testing.assert_array_equal(
        np.asarray(loaded.loss.similarity), np.asarray(SMALL[kind]())
    )


@pytest.mark.parametrize("keep_rows", [False, True])
def test_a_similarity_waiting_for_its_arrays_knows_its_other_arguments(keep_rows):
    # Before the arrays arrive, `keep_rows` is the config's, not the class
    # default (the loss reads it).
    sim = similarity.from_embeddings(random_vectors(40, 8, 5), keep_rows=keep_rows)
    config = json.loads(json.dumps(keras.saving.serialize_keras_object(sim)))
    config["config"]["arrays_in_archive"] = "1" * 32  # no similarity has these
    waiting = similarity.get(config)
    assert waiting.keep_rows is keep_rows and waiting.lower_bound == 0.0
