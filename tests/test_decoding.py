import keras
import numpy as np
import pytest

from keras_simloss import OrdinalDecoding, decode_ordinal
from tests.testing import assert_config_round_trip, save_and_reload, softmax

AGES = np.array([1.0, 2.0, 4.0, 7.0, 11.0, 16.0, 22.0])  # increasing, uneven


# Independent NumPy references, float64, written from the definitions.
def ref_decode(probabilities, method, values=None):
    p = np.asarray(probabilities, np.float64)
    v = np.arange(p.shape[-1], dtype=np.float64) if values is None else values
    if method == "argmax":
        return v[np.argmax(p, axis=-1)]
    if method == "mean":
        return np.sum(p * v, axis=-1) / np.sum(p, axis=-1)
    # median: the first class whose cumulative probability reaches 0.5
    flat = p.reshape(-1, p.shape[-1])
    first = [
        next(c for c in range(len(row)) if row[: c + 1].sum() >= 0.5 * row.sum())
        for row in flat
    ]
    return v[np.array(first)].reshape(p.shape[:-1])


def near_median_tie(probabilities):
    """Rows whose cumulative sum passes within rounding of 0.5 (ambiguous)."""
    p = np.asarray(probabilities, np.float64)
    cumulative = np.cumsum(p, axis=-1) / p.sum(axis=-1, keepdims=True)
    return np.any(np.abs(cumulative - 0.5) < 1e-5, axis=-1)


def _logits(seed, shape, scale=2.0):
    return (
        np.random.default_rng(seed).normal(scale=scale, size=shape).astype(np.float32)
    )


def _numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


@pytest.mark.parametrize("method", ["argmax", "median", "mean"])
@pytest.mark.parametrize("values", [None, AGES], ids=["indices", "ages"])
@pytest.mark.parametrize("from_logits", [True, False], ids=["logits", "probs"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_numpy(method, values, from_logits, seed):
    logits = _logits(seed, (41, len(AGES)))
    probabilities = softmax(logits)
    y_pred = logits if from_logits else probabilities.astype(np.float32)
    result = _numpy(decode_ordinal(y_pred, method, values, from_logits=from_logits))
    expected = ref_decode(probabilities, method, values)
    assert result.dtype == np.float32 and result.shape == (41,)
    keep = ~near_median_tie(probabilities) if method == "median" else slice(None)
    np.testing.assert_allclose(result[keep], expected[keep], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["argmax", "median", "mean"])
def test_any_leading_shape(method):
    logits = _logits(3, (2, 3, 5, len(AGES)))
    result = _numpy(decode_ordinal(logits, method, AGES, from_logits=True))
    assert result.shape == (2, 3, 5)
    expected = ref_decode(softmax(logits), method, AGES)
    keep = ~near_median_tie(softmax(logits)) if method == "median" else ...
    np.testing.assert_allclose(result[keep], expected[keep], rtol=1e-5, atol=1e-5)


def test_hand_computed_cases():
    p = np.array(
        [
            [0.2, 0.1, 0.3, 0.4],  # cumulative 0.2, 0.3, 0.6, 1.0
            [0.5, 0.5, 0.0, 0.0],  # 0.5 reached exactly at class 0
            [0.0, 0.0, 0.0, 1.0],
            [0.45, 0.0, 0.0, 0.55],  # bimodal: the median is a mode here
        ],
        np.float32,
    )
    values = [10.0, 20.0, 30.0, 40.0]
    median = _numpy(decode_ordinal(p, "median", values))
    np.testing.assert_array_equal(median, [30.0, 10.0, 40.0, 40.0])
    argmax = _numpy(decode_ordinal(p, "argmax"))
    np.testing.assert_array_equal(argmax, [3.0, 0.0, 3.0, 3.0])
    # 0.1 * 1 + 0.3 * 2 + 0.4 * 3 = 1.9; 0.5; 3; 0.55 * 3 = 1.65
    mean = _numpy(decode_ordinal(p, "mean"))
    np.testing.assert_allclose(mean, [1.9, 0.5, 3.0, 1.65], rtol=1e-6)
    # Unnormalised probabilities are read as the normalised distribution.
    np.testing.assert_allclose(_numpy(decode_ordinal(4.0 * p, "mean")), mean, rtol=1e-6)
    np.testing.assert_array_equal(
        _numpy(decode_ordinal(4.0 * p, "median")), [2, 0, 3, 3]
    )


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_median_and_mean_minimise_expected_absolute_and_squared_error(seed):
    # The decision-theoretic reason for the two read-outs, checked by brute
    # force: no class value has a smaller expected absolute error than the
    # median, and no value on a fine grid a smaller squared error than the
    # mean.
    probabilities = softmax(_logits(seed, (25, len(AGES))))
    median = _numpy(decode_ordinal(probabilities.astype(np.float32), "median", AGES))
    mean = _numpy(decode_ordinal(probabilities.astype(np.float32), "mean", AGES))
    for p, m, mu in zip(probabilities, median, mean):
        absolute = [np.sum(p * np.abs(AGES - c)) for c in AGES]
        assert np.sum(p * np.abs(AGES - m)) <= min(absolute) + 1e-6
        grid = np.linspace(AGES[0], AGES[-1], 2001)
        squared = np.sum(p[None] * (AGES[None] - grid[:, None]) ** 2, axis=1)
        assert np.sum(p * (AGES - mu) ** 2) <= squared.min() + 1e-6


def test_float16_and_extreme_logits():
    logits = np.array([[-1e4, 0.0, 1e4, 0.0], [80.0, 0.0, 0.0, 0.0]], np.float16)
    for method, expected in [("argmax", [2, 0]), ("median", [2, 0]), ("mean", [2, 0])]:
        result = _numpy(decode_ordinal(logits, method, from_logits=True))
        assert result.dtype == np.float32
        np.testing.assert_allclose(result, expected, atol=1e-6)


def _jit(function):
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(function, jit_compile=True)
    if backend == "jax":
        import jax

        return jax.jit(function)
    pytest.skip("XLA compilation is tested on TensorFlow and JAX")


@pytest.mark.parametrize("method", ["argmax", "median", "mean"])
def test_xla_compiled_matches_numpy(method):
    logits = _logits(7, (33, len(AGES)))
    compiled = _jit(lambda x: decode_ordinal(x, method, AGES, from_logits=True))
    result = _numpy(compiled(logits))
    expected = ref_decode(softmax(logits), method, AGES)
    keep = ~near_median_tie(softmax(logits)) if method == "median" else ...
    np.testing.assert_allclose(result[keep], expected[keep], rtol=1e-5, atol=1e-5)


def _age_model(method="median"):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    logits = keras.layers.Dense(len(AGES), name="logits")(inputs)
    ages = OrdinalDecoding(method, AGES, from_logits=True, name="age")(logits)
    return keras.Model(inputs, ages), keras.Model(inputs, logits)


@pytest.mark.parametrize("method", ["argmax", "median", "mean"])
def test_layer_in_a_model_matches_numpy_under_jit(method):
    model, classifier = _age_model(method)
    x = np.random.default_rng(1).normal(size=(19, 4)).astype(np.float32)
    # jit_compile is XLA on TensorFlow and JAX; torch.compile is not tested.
    model.compile(jit_compile=keras.backend.backend() != "torch")
    ages = model.predict(x, batch_size=8, verbose=0)
    logits = classifier.predict(x, verbose=0)
    assert ages.shape == (19,) and ages.dtype == np.float32
    expected = ref_decode(softmax(logits), method, AGES)
    keep = ~near_median_tie(softmax(logits)) if method == "median" else ...
    np.testing.assert_allclose(ages[keep], expected[keep], rtol=1e-5, atol=1e-5)


def test_layer_config_round_trip():
    layer = OrdinalDecoding("mean", [0.5, 1.5, 2.5], from_logits=True, name="age")
    rebuilt, serialized = assert_config_round_trip(layer)
    assert serialized["config"]["class_values"] == [0.5, 1.5, 2.5]
    assert (rebuilt.method, rebuilt.from_logits, rebuilt.name) == ("mean", True, "age")
    assert_config_round_trip(OrdinalDecoding())  # defaults: median over indices


def test_layer_keras_file_round_trip(tmp_path):
    model, _ = _age_model("median")
    x = np.random.default_rng(2).normal(size=(9, 4)).astype(np.float32)
    reloaded = save_and_reload(model, tmp_path)  # no custom_objects
    layer = reloaded.get_layer("age")
    assert isinstance(layer, OrdinalDecoding) and layer.method == "median"
    np.testing.assert_array_equal(
        reloaded.predict(x, verbose=0), model.predict(x, verbose=0)
    )


def test_layer_under_mixed_precision():
    keras.config.set_dtype_policy("mixed_float16")  # reset by conftest
    layer = OrdinalDecoding("mean", AGES, from_logits=True)
    logits = _logits(4, (6, len(AGES)))
    result = _numpy(layer(logits.astype(np.float16)))
    assert result.dtype == np.float32
    expected = ref_decode(softmax(logits.astype(np.float16)), "mean", AGES)
    np.testing.assert_allclose(result, expected, rtol=1e-3)


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"`method`.*Received: method='mode'"):
        decode_ordinal(np.ones((2, 3)), "mode")
    with pytest.raises(ValueError, match=r"`method`"):
        OrdinalDecoding(method=None)
    with pytest.raises(ValueError, match=r"`class_values`.*1-D"):
        decode_ordinal(np.ones((2, 3)), class_values=[[1.0, 2.0, 3.0]])
    with pytest.raises(ValueError, match=r"`class_values`.*finite"):
        OrdinalDecoding("mean", class_values=[1.0, np.inf, 3.0])
    with pytest.raises(TypeError, match=r"`class_values`"):
        decode_ordinal(np.ones((2, 3)), class_values=["a", "b", "c"])
    with pytest.raises(ValueError, match=r"strictly increasing"):
        decode_ordinal(np.ones((2, 3)), "median", class_values=[3.0, 2.0, 1.0])
    # Order does not matter for argmax and mean.
    np.testing.assert_allclose(
        _numpy(decode_ordinal(np.array([[0.5, 0.5, 0.0]]), "mean", [3, 2, 1])), [2.5]
    )
    with pytest.raises(ValueError, match=r"one value per class, 3.*Received: 4"):
        decode_ordinal(np.ones((2, 3)), class_values=[1, 2, 3, 4])


def test_bad_shapes_raise_when_the_model_is_built():
    with pytest.raises(ValueError, match=r"one value per class, 5.*Received: 3"):
        OrdinalDecoding("median", [1, 2, 3])(keras.Input((5,)))
    with pytest.raises(ValueError, match=r"last axis of `y_pred`.*known size"):
        OrdinalDecoding()(keras.Input((None,)))
