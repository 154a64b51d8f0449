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
    """A test that changes the global dtype policy does not leak it."""
    yield
    if keras.config.dtype_policy().name != "float32":
        keras.config.set_dtype_policy("float32")
