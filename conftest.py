"""Shared pytest set-up: quiet TensorFlow, NumPy in doctests, clean policies."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _doctest_numpy(doctest_namespace):
    doctest_namespace["np"] = np


@pytest.fixture(autouse=True)
def _reset_keras_state():
    """Every test starts from the float32 policy and a fresh Keras session."""
    yield
    keras.config.set_dtype_policy("float32")
    keras.backend.clear_session()
