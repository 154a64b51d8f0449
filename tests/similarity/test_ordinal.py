"""`ordinal` (`similarity/ordinal.py`)."""

import json

import keras
import numpy as np

from keras_simloss import similarity


def test_ordinal_config_stays_small_for_many_classes():
    sim = similarity.ordinal(1000, 0.7)
    text = json.dumps(keras.saving.serialize_keras_object(sim))
    assert len(text) < 500, text
    assert np.asarray(sim).shape == (1000, 1000)


def test_hand_computed_ordinal_values():
    # r = 0.5: 0.5 ** 1 = 0.5, 0.5 ** 2 = 0.25.
    assert np.asarray(similarity.ordinal(3, 0.5)).tolist() == [
        [1.0, 0.5, 0.25],
        [0.5, 1.0, 0.5],
        [0.25, 0.5, 1.0],
    ]
