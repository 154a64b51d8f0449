import keras
import numpy as np
import pytest

from keras_simloss import ConfusionMatrix, SimLoss, similarity
from tests.testing import assert_config_round_trip, labelled_logits

NUM_CLASSES = 5


# Independent NumPy references.
def ref_counts(y, predicted, weights):
    counts = np.zeros((NUM_CLASSES, NUM_CLASSES))
    for true, guess, weight in zip(y, predicted, weights):
        counts[true, guess] += weight
    return counts


def ref_from_confusion(counts, bound=0.0):
    """The documented formula, written out entry by entry."""
    counts = np.asarray(counts, np.float64)
    size = len(counts)
    rate = [[counts[i, j] / counts[i].sum() for j in range(size)] for i in range(size)]
    result = np.eye(size)
    for i in range(size):
        for j in range(size):
            if i == j:
                continue
            confused = rate[i][j] + rate[j][i]
            recognised = rate[i][i] + rate[j][j]
            if recognised > 0:
                sim = min(1.0, confused / recognised)
            else:
                sim = 1.0 if confused > 0 else 0.0
            result[i, j] = max(0.0, sim - bound) / (1.0 - bound)
    return result


def _data(seed, n=43):
    return labelled_logits(seed, NUM_CLASSES, n)


# ConfusionMatrix ---------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ragged_weighted_batches_match_numpy(seed):
    y, logits, weights = _data(seed)
    metric = ConfusionMatrix(NUM_CLASSES)
    for start in range(0, len(y), 10):  # batches of 10, 10, 10, 10, 3
        stop = start + 10
        metric.update_state(
            y[start:stop], logits[start:stop], sample_weight=weights[start:stop]
        )
    result = keras.ops.convert_to_numpy(metric.result())
    assert result.shape == (NUM_CLASSES, NUM_CLASSES)
    expected = ref_counts(y, logits.argmax(-1), weights.astype(np.float64))
    np.testing.assert_allclose(result, expected, rtol=1e-6, atol=1e-6)


def test_unweighted_counts_and_label_formats():
    y, logits, _ = _data(4, n=12)
    expected = ref_counts(y, logits.argmax(-1), np.ones(12))
    for labels, weight in [
        (y, None),
        (y[:, None], np.ones((12, 1), np.float32)),
        (np.eye(NUM_CLASSES, dtype=np.float32)[y], np.ones(12, np.float32)),
    ]:
        metric = ConfusionMatrix(NUM_CLASSES)
        metric.update_state(labels, logits, sample_weight=weight)
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(metric.result()), expected
        )
    assert expected.sum() == 12


def test_hand_computed_and_reset():
    metric = ConfusionMatrix(3)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(metric.result()), 0)
    # true 2 predicted 1 twice, true 0 predicted 0 once
    metric.update_state([2, 0, 2], np.eye(3, dtype=np.float32)[[1, 0, 1]])
    expected = [[1, 0, 0], [0, 0, 0], [0, 2, 0]]
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(metric.result()), expected)
    metric.reset_state()
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(metric.result()), 0)


def test_config_round_trip():
    metric = ConfusionMatrix(NUM_CLASSES, name="val_confusion")
    rebuilt, serialized = assert_config_round_trip(metric)
    assert serialized["config"]["num_classes"] == NUM_CLASSES
    assert rebuilt.name == "val_confusion"
    y, logits, weights = _data(8)
    metric.update_state(y, logits, sample_weight=weights)
    rebuilt.update_state(y, logits, sample_weight=weights)
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(rebuilt.result()),
        keras.ops.convert_to_numpy(metric.result()),
    )


def _model():
    keras.utils.set_random_seed(1)
    return keras.Sequential([keras.Input((6,)), keras.layers.Dense(NUM_CLASSES)])


def test_in_compiled_evaluate_matches_numpy():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(53, 6)).astype(np.float32)
    y = rng.integers(0, NUM_CLASSES, size=53)
    weights = rng.uniform(0, 2, size=53).astype(np.float32)
    model = _model()
    # jit_compile is XLA on TensorFlow and JAX; torch.compile is not tested.
    model.compile(
        loss="sparse_categorical_crossentropy",
        weighted_metrics=[ConfusionMatrix(NUM_CLASSES)],
        jit_compile=keras.backend.backend() != "torch",
    )
    result = model.evaluate(
        x, y, sample_weight=weights, batch_size=16, verbose=0, return_dict=True
    )
    counts = keras.ops.convert_to_numpy(result["confusion_matrix"])
    predicted = model.predict(x, verbose=0).argmax(-1)
    expected = ref_counts(y, predicted, weights.astype(np.float64))
    np.testing.assert_allclose(counts, expected, rtol=1e-5, atol=1e-5)


def test_invalid_label_inside_compiled_step_gives_nan():
    if keras.backend.backend() == "torch":
        pytest.skip("torch runs eagerly here; the eager check raises instead")
    x = np.zeros((4, 6), np.float32)
    model = _model()
    model.compile(
        loss=lambda y_true, y_pred: keras.ops.mean(y_pred, axis=-1),  # ignores y
        metrics=[ConfusionMatrix(NUM_CLASSES)],
        jit_compile=True,
    )
    result = model.evaluate(
        x, np.array([0, 1, 7, 2]), batch_size=4, verbose=0, return_dict=True
    )
    assert np.all(np.isnan(keras.ops.convert_to_numpy(result["confusion_matrix"])))


def test_bad_arguments_and_inputs():
    with pytest.raises(ValueError, match=r"`num_classes`.*Received"):
        ConfusionMatrix(1)
    for bad in (2.0, True, "3"):
        with pytest.raises(TypeError, match=r"`num_classes`.*Received"):
            ConfusionMatrix(bad)
    metric = ConfusionMatrix(3)
    with pytest.raises(ValueError, match=r"counts 3 classes.*y_pred.shape=\(1, 4\)"):
        metric.update_state([0], [[0.1, 0.2, 0.3, 0.4]])
    with pytest.raises(ValueError, match=r"in \[0, 3\)"):
        metric.update_state([3], [[0.1, 0.2, 0.7]])


# from_confusion ----------------------------------------------------------


def _random_counts(seed, size=NUM_CLASSES):
    rng = np.random.default_rng(seed)
    counts = rng.poisson(2.0, size=(size, size)).astype(np.float64)
    counts += np.diag(rng.integers(0, 20, size=size))
    counts[:, 0] += 1  # no empty row
    counts[size - 1, size - 1] = 0  # one class never recognised
    return counts


@pytest.mark.parametrize("bound", [0.0, 0.1, 0.5], ids=lambda b: f"l={b}")
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_from_confusion_matches_numpy(seed, bound):
    counts = _random_counts(seed)
    s = similarity.from_confusion(counts, lower_bound=bound)
    assert isinstance(s, similarity.MatrixSimilarity)
    matrix = np.asarray(s)
    np.testing.assert_allclose(matrix, ref_from_confusion(counts, bound), atol=1e-6)
    np.testing.assert_array_equal(matrix, matrix.T)
    np.testing.assert_array_equal(np.diagonal(matrix), 1.0)
    assert np.all((matrix >= 0) & (matrix <= 1))


def test_from_confusion_hand_computed_cases():
    # sim(0, 1) = (0.3 + 0.2) / (0.7 + 0.8) = 1/3; (1/3 - 0.2) / 0.8 = 1/6.
    counts = [[7, 3, 0], [2, 8, 0], [0, 0, 10]]
    np.testing.assert_allclose(
        np.asarray(similarity.from_confusion(counts, lower_bound=0.2)),
        [[1, 1 / 6, 0], [1 / 6, 1, 0], [0, 0, 1]],
        rtol=1e-6,
    )
    # Never confused: the identity (plain cross entropy).
    np.testing.assert_array_equal(
        np.asarray(similarity.from_confusion(np.diag([3.0, 1.0, 5.0]))), np.eye(3)
    )
    # Uniform guessing: every pair as often confused as recognised.
    np.testing.assert_array_equal(
        np.asarray(similarity.from_confusion(np.ones((4, 4)))), np.ones((4, 4))
    )
    # Class 0 always called 1 and never recognised: (1 + 0) / (0 + 1) = 1;
    # two classes never recognised and swapped: 2 / 0 counts as 1.
    np.testing.assert_array_equal(
        np.asarray(similarity.from_confusion([[0, 5], [0, 5]])), np.ones((2, 2))
    )
    np.testing.assert_array_equal(
        np.asarray(similarity.from_confusion([[0, 4], [4, 0]])), np.ones((2, 2))
    )


def test_from_confusion_depends_on_rates_only():
    # Rows are normalised first, so a class with more validation examples
    # does not look more similar to the others.
    counts = _random_counts(5)
    scaled = counts * np.array([1.0, 10.0, 0.5, 3.0, 7.0])[:, None]
    np.testing.assert_allclose(
        np.asarray(similarity.from_confusion(scaled)),
        np.asarray(similarity.from_confusion(counts)),
        rtol=1e-6,
    )


def test_from_confusion_of_a_metric_result_round_trips_and_trains():
    y, logits, weights = _data(6, n=200)
    metric = ConfusionMatrix(NUM_CLASSES)
    metric.update_state(y, logits, sample_weight=weights)
    s = similarity.from_confusion(metric.result(), lower_bound=0.05)
    rebuilt, _ = assert_config_round_trip(s)
    np.testing.assert_array_equal(np.asarray(rebuilt), np.asarray(s))
    loss = SimLoss(s, from_logits=True)
    value = keras.ops.convert_to_numpy(loss(y, logits))
    assert np.isfinite(value) and value >= 0


def test_from_confusion_bad_input():
    with pytest.raises(ValueError, match=r"`confusion`.*square.*\(2, 3\)"):
        similarity.from_confusion(np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"`confusion`.*square"):
        similarity.from_confusion(np.ones((1, 1)))
    with pytest.raises(ValueError, match=r"`confusion`.*square"):
        similarity.from_confusion(np.ones((2, 2, 2)))
    with pytest.raises(ValueError, match=r"non-negative.*confusion\[0, 1\]=-1"):
        similarity.from_confusion([[1, -1], [0, 1]])
    with pytest.raises(ValueError, match=r"non-negative finite.*confusion\[1, 0\]"):
        similarity.from_confusion([[1, 0], [np.nan, 1]])
    with pytest.raises(ValueError, match=r"finite.*inf"):
        similarity.from_confusion([[1, np.inf], [0, 1]])
    with pytest.raises(ValueError, match=r"row 1 of confusion is all zeros"):
        similarity.from_confusion([[1, 0, 0], [0, 0, 0], [0, 0, 1]])
    with pytest.raises(TypeError, match=r"`confusion`"):
        similarity.from_confusion([["a", "b"], ["c", "d"]])
    with pytest.raises(ValueError, match=r"`lower_bound`"):
        similarity.from_confusion(np.eye(2), lower_bound=1.0)
