"""Test helpers: serialization round trips and `.keras` save / reload."""

import json
import os

import keras
import numpy as np


def assert_config_round_trip(obj):
    """`get_config` is JSON-native and `from_config` rebuilds an equal config.

    Returns the rebuilt object and the serialized config.
    """
    serialized = keras.saving.serialize_keras_object(obj)
    text = json.dumps(serialized)  # raises on anything that is not JSON-native
    rebuilt = keras.saving.deserialize_keras_object(json.loads(text))
    assert type(rebuilt) is type(obj)
    assert json.dumps(keras.saving.serialize_keras_object(rebuilt)) == text
    return rebuilt, serialized


def save_and_reload(model, tmp_path, name="model.keras"):
    """Saves `model` as `.keras` and loads it back with no custom_objects."""
    path = os.path.join(tmp_path, name)
    model.save(path)
    return keras.models.load_model(path)


def softmax(logits):
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)
