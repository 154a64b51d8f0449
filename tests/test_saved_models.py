"""Models saved by keras_simloss 0.1.0 load and give the same numbers.

The `.keras` files in `tests/fixtures/` were written by 0.1.0
(`tests/fixtures/make_fixtures.py`, TensorFlow backend). Each test loads one
on the current backend and compares its loss and metric with NumPy, from
the similarity rebuilt here in NumPy and the model's own weights.
"""

import os

import keras
import numpy as np
import pytest

import keras_simloss  # noqa: F401  (registers the classes load_model needs)
from tests.fixtures import make_fixtures as fixtures
from tests.testing import softmax

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


def _ordinal(num_classes, r):
    distance = np.abs(np.arange(num_classes)[:, None] - np.arange(num_classes))
    return r ** distance.astype(np.float64)


def _embeddings(vectors, bound):
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    matrix = np.maximum(np.clip(unit @ unit.T, 0.0, 1.0) - bound, 0.0) / (1 - bound)
    np.fill_diagonal(matrix, 1.0)
    return matrix


def _hierarchy(levels, values):
    levels = np.asarray(levels)
    matrix = np.zeros((levels.shape[1],) * 2)
    for level, value in zip(levels, values):
        matrix = np.maximum(matrix, np.where(level[:, None] == level, value, 0.0))
    np.fill_diagonal(matrix, 1.0)
    return matrix


def _top_k(matrix, k):
    """The `k` largest off-diagonal entries per row (ties: smaller index)."""
    result = np.eye(len(matrix))
    for i, row in enumerate(matrix):
        order = sorted(
            (j for j in range(len(row)) if j != i), key=lambda j: (-row[j], j)
        )
        for j in order[:k]:
            result[i, j] = row[j]
    return result


# name -> (the similarity as a NumPy matrix, from_logits)
SPECS = {
    "ordinal": (_ordinal(6, 0.5), True),
    "matrix": (fixtures.hand_matrix(), True),
    "matrix_archived": (fixtures.archived_matrix(), True),
    "embeddings_archived": (
        _embeddings(fixtures.embedding_vectors(20, 16, 3), 0.2),
        True,
    ),
    "embeddings_keep_rows": (
        _embeddings(fixtures.embedding_vectors(5, 3, 4), 0.1),
        True,
    ),
    "hierarchy_probabilities": (_hierarchy(fixtures.HIERARCHY, [0.6, 0.3]), False),
    "sparse_archived": (_top_k(_ordinal(40, 0.6), 7), True),
}


def _data(model, num_classes, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(64, 4)).astype(np.float32)
    y = rng.integers(0, num_classes, size=64)
    kernel, bias = (np.asarray(w, np.float64) for w in model.layers[-1].get_weights())
    return x, y, x.astype(np.float64) @ kernel + bias


@pytest.mark.parametrize("name", sorted(SPECS))
def test_model_saved_by_0_1_0_gives_the_numpy_loss_and_metric(name):
    matrix, from_logits = SPECS[name]
    model = keras.models.load_model(os.path.join(HERE, f"{name}.keras"))
    x, y, logits = _data(model, len(matrix))
    probabilities = softmax(logits)
    if not from_logits:  # as SimLoss reads probabilities: clipped, renormalised
        eps = keras.config.epsilon()
        probabilities = np.clip(probabilities, eps, 1 - eps)
        probabilities /= probabilities.sum(axis=-1, keepdims=True)
    expected_loss = -np.log(np.sum(matrix[y] * probabilities, axis=-1)).mean()
    predicted = logits.argmax(axis=-1)
    mistakes = predicted != y
    assert mistakes.any() and not mistakes.all()  # both branches are seen
    expected_severity = (1.0 - matrix[y, predicted])[mistakes].mean()
    logs = model.evaluate(x, y, batch_size=16, verbose=0, return_dict=True)
    np.testing.assert_allclose(logs["loss"], expected_loss, rtol=1e-5)
    np.testing.assert_allclose(logs["mistake_severity"], expected_severity, rtol=1e-5)


def test_ordinal_decoding_layer_saved_by_0_1_0_gives_the_numpy_median():
    model = keras.models.load_model(os.path.join(HERE, "ordinal_decoding.keras"))
    rng = np.random.default_rng(1)
    x = rng.normal(size=(32, 4)).astype(np.float32)
    kernel, bias = (np.asarray(w, np.float64) for w in model.layers[0].get_weights())
    cumulative = np.cumsum(softmax(x @ kernel + bias), axis=-1)
    values = np.array([10.0, 20.0, 35.0, 50.0, 70.0])
    expected = values[np.argmax(cumulative >= 0.5, axis=-1)]
    np.testing.assert_array_equal(model.predict(x, verbose=0), expected)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_the_loss_config_is_the_one_0_1_0_saved(name):
    # The whole serialized loss, module paths and content hashes included:
    # the redesign moved code, not what a saved file says.
    import json
    import zipfile

    path = os.path.join(HERE, f"{name}.keras")
    with zipfile.ZipFile(path) as archive:
        saved = json.loads(archive.read("config.json"))["compile_config"]["loss"]
    model = keras.models.load_model(path)
    assert keras.saving.serialize_keras_object(model.loss) == saved
