import keras
import numpy as np
import pytest

from keras_simloss import (
    ClassMeanAbsoluteError,
    ClassMeanSquaredError,
    FailedSuperclassAccuracy,
    MistakeSeverity,
    SuperclassAccuracy,
    similarity,
)
from tests.testing import (
    BACKEND,
    JIT_COMPILE,
    assert_config_round_trip,
    compile_function,
    labelled_logits,
    softmax,
)

NUM_CLASSES = 6
SUPERCLASS_OF = np.array([0, 0, 1, 1, 1, 2])
CLASS_VALUES = np.array([1.0, 5.0, 6.0, 20.0, 21.0, 40.0])
SIMILARITY = similarity.ordinal(NUM_CLASSES, 0.5)


# Independent NumPy references over a whole epoch: weighted sums, not means of
# batch means.
def ref_mae(y, pred, w, values=None):
    v = np.arange(NUM_CLASSES, dtype=np.float64) if values is None else values
    return np.sum(w * np.abs(v[pred] - v[y])) / np.sum(w)


def ref_mse(y, pred, w, values=None):
    v = np.arange(NUM_CLASSES, dtype=np.float64) if values is None else values
    return np.sum(w * (v[pred] - v[y]) ** 2) / np.sum(w)


def ref_sa(y, pred, w):
    return np.sum(w * (SUPERCLASS_OF[y] == SUPERCLASS_OF[pred])) / np.sum(w)


def ref_fsa(y, pred, w):
    wrong = y != pred
    if np.sum(w * wrong) == 0:
        return 0.0
    return np.sum(w * wrong * (SUPERCLASS_OF[y] == SUPERCLASS_OF[pred])) / np.sum(
        w * wrong
    )


def ref_severity(y, pred, w):
    wrong = y != pred
    matrix = 0.5 ** np.abs(
        np.arange(NUM_CLASSES)[:, None] - np.arange(NUM_CLASSES)[None, :]
    )
    if np.sum(w * wrong) == 0:
        return 0.0
    return np.sum(w * wrong * (1.0 - matrix[y, pred])) / np.sum(w * wrong)


METRICS = {
    "mae": (ClassMeanAbsoluteError, {}, ref_mae),
    "mae-values": (
        ClassMeanAbsoluteError,
        {"class_values": CLASS_VALUES, "name": "age_mae"},
        lambda y, p, w: ref_mae(y, p, w, CLASS_VALUES),
    ),
    "mse": (ClassMeanSquaredError, {}, ref_mse),
    "mse-values": (
        ClassMeanSquaredError,
        {"class_values": CLASS_VALUES, "name": "age_mse"},
        lambda y, p, w: ref_mse(y, p, w, CLASS_VALUES),
    ),
    "sa": (SuperclassAccuracy, {"superclass_of": SUPERCLASS_OF}, ref_sa),
    "fsa": (FailedSuperclassAccuracy, {"superclass_of": SUPERCLASS_OF}, ref_fsa),
    "severity": (MistakeSeverity, {"similarity": SIMILARITY}, ref_severity),
}


def _data(seed, n=37):
    return labelled_logits(seed, NUM_CLASSES, n)


@pytest.mark.parametrize("name", list(METRICS), ids=list(METRICS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ragged_weighted_batches_match_numpy(name, seed):
    cls, kwargs, reference = METRICS[name]
    metric = cls(**kwargs)
    y, logits, weights = _data(seed)
    for start in range(0, len(y), 10):  # batches of 10, 10, 10, 7
        stop = start + 10
        metric.update_state(
            y[start:stop], logits[start:stop], sample_weight=weights[start:stop]
        )
    expected = reference(y, logits.argmax(-1), weights.astype(np.float64))
    assert float(metric.result()) == pytest.approx(expected, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("name", list(METRICS), ids=list(METRICS))
def test_label_formats_and_weight_shapes_agree(name):
    cls, kwargs, reference = METRICS[name]
    y, logits, weights = _data(5, n=12)
    expected = reference(y, logits.argmax(-1), weights.astype(np.float64))
    for labels, w in [
        (y[:, None], weights[:, None]),
        (np.eye(NUM_CLASSES, dtype=np.float32)[y], weights),
    ]:
        metric = cls(**kwargs)
        metric.update_state(labels, logits, sample_weight=w)
        assert float(metric.result()) == pytest.approx(expected, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("name", list(METRICS), ids=list(METRICS))
def test_reset_state_and_empty_result(name):
    cls, kwargs, _ = METRICS[name]
    metric = cls(**kwargs)
    assert float(metric.result()) == 0.0  # 0 / 0 is 0
    y, logits, _ = _data(3)
    metric.update_state(y, logits)
    metric.reset_state()
    assert float(metric.result()) == 0.0


@pytest.mark.parametrize("name", list(METRICS), ids=list(METRICS))
def test_config_round_trip(name):
    cls, kwargs, _ = METRICS[name]
    metric = cls(**kwargs)
    rebuilt, serialized = assert_config_round_trip(metric)
    assert rebuilt.name == metric.name
    y, logits, weights = _data(8)
    metric.update_state(y, logits, sample_weight=weights)
    rebuilt.update_state(y, logits, sample_weight=weights)
    assert float(rebuilt.result()) == float(metric.result())


def test_hand_computed_cases():
    # Labels 0, 1, 5; predictions 1 (same superclass), 1 (right), 2 (other
    # superclass).
    y = np.array([0, 1, 5])
    probs = np.eye(NUM_CLASSES, dtype=np.float32)[[1, 1, 2]]
    cases = [
        (ClassMeanAbsoluteError(), (1 + 0 + 3) / 3),
        (ClassMeanSquaredError(), (1 + 0 + 9) / 3),
        (ClassMeanAbsoluteError(class_values=CLASS_VALUES), (4 + 0 + 34) / 3),
        (SuperclassAccuracy(SUPERCLASS_OF), 2 / 3),
        (FailedSuperclassAccuracy(SUPERCLASS_OF), 1 / 2),
        # 1 - 0.5 ** 1 and 1 - 0.5 ** 3 over the two mistakes.
        (MistakeSeverity(SIMILARITY), (0.5 + 0.875) / 2),
    ]
    for metric, expected in cases:
        metric.update_state(y, probs)
        assert float(metric.result()) == pytest.approx(expected, rel=1e-6), metric.name


def test_failed_superclass_accuracy_without_mistakes_is_zero():
    metric = FailedSuperclassAccuracy(SUPERCLASS_OF)
    metric.update_state([0, 3], np.eye(NUM_CLASSES)[[0, 3]])
    assert float(metric.result()) == 0.0


@pytest.mark.parametrize(
    "sim",
    [
        similarity.top_k(similarity.ordinal(NUM_CLASSES, 0.5), k=2),
        similarity.from_embeddings(
            np.random.default_rng(0).normal(size=(NUM_CLASSES, 3)), 0.2
        ),
        similarity.from_hierarchy(SUPERCLASS_OF, 0.4),
    ],
    ids=["sparse", "embeddings", "hierarchy"],
)
def test_mistake_severity_with_structured_similarity_matches_dense(sim):
    y, logits, weights = _data(4)
    dense = np.asarray(sim).astype(np.float64)
    pred = logits.argmax(-1)
    wrong = y != pred
    expected = np.sum(weights * wrong * (1 - dense[y, pred])) / np.sum(weights * wrong)
    metric = MistakeSeverity(sim)
    metric.update_state(y, logits, sample_weight=weights)
    assert float(metric.result()) == pytest.approx(expected, rel=1e-5)


def test_metrics_in_xla_compiled_evaluate_match_numpy():
    keras.utils.set_random_seed(1)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(53, 5)).astype(np.float32)
    y = rng.integers(0, NUM_CLASSES, size=53)
    weights = rng.uniform(0, 2, size=53).astype(np.float32)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(NUM_CLASSES)])
    metrics = [cls(**kwargs) for cls, kwargs, _ in METRICS.values()]
    model.compile(
        loss="sparse_categorical_crossentropy",
        weighted_metrics=metrics,
        jit_compile=JIT_COMPILE,
    )
    result = model.evaluate(
        x, y, sample_weight=weights, batch_size=16, verbose=0, return_dict=True
    )
    pred = model.predict(x, verbose=0).argmax(-1)
    for metric, (_, _, reference) in zip(metrics, METRICS.values()):
        expected = reference(y, pred, weights.astype(np.float64))
        assert result[metric.name] == pytest.approx(expected, rel=1e-5, abs=1e-6), (
            metric.name
        )


def test_bad_arguments_and_inputs():
    with pytest.raises(TypeError, match=r"superclass_of.*of integers.*float64"):
        SuperclassAccuracy([0.5, 1.0])
    with pytest.raises(ValueError, match=r"class_values.*finite"):
        ClassMeanAbsoluteError(class_values=[1.0, np.nan])
    with pytest.raises(ValueError, match=r"class_values"):
        ClassMeanSquaredError(class_values=[[1.0, 2.0]])
    with pytest.raises(
        ValueError, match=r"len\(superclass_of\)=6, y_pred.shape\[-1\]=4"
    ):
        SuperclassAccuracy(SUPERCLASS_OF).update_state([0], [[0.1, 0.2, 0.3, 0.4]])
    with pytest.raises(ValueError, match=r"in \[0, 6\)"):
        MistakeSeverity(SIMILARITY).update_state([7], np.full((1, 6), 1 / 6))


# Direction, shapes and bad labels ------------------------------------------------

DIRECTIONS = {
    "mae": "down",
    "mae-values": "down",
    "mse": "down",
    "mse-values": "down",
    "sa": "up",
    "fsa": "up",
    "severity": "down",
}


@pytest.mark.parametrize("name", list(METRICS), ids=list(METRICS))
def test_callbacks_in_auto_mode_know_the_direction(name, tmp_path):
    cls, kwargs, _ = METRICS[name]
    metric = cls(**kwargs)
    assert metric._direction == DIRECTIONS[name]
    rng = np.random.default_rng(4)
    x = rng.normal(size=(32, 5)).astype(np.float32)
    y = rng.integers(0, NUM_CLASSES, size=32)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(NUM_CLASSES)])
    model.compile(
        optimizer="adam", loss="sparse_categorical_crossentropy", metrics=[metric]
    )
    monitor = f"val_{metric.name}"
    stop = keras.callbacks.EarlyStopping(monitor=monitor, patience=1)
    best = keras.callbacks.ModelCheckpoint(
        str(tmp_path / "best.keras"), monitor=monitor, save_best_only=True
    )
    model.fit(x, y, validation_data=(x, y), epochs=2, verbose=0, callbacks=[stop, best])
    expected = keras.ops.greater if DIRECTIONS[name] == "up" else keras.ops.less
    assert stop.monitor_op is expected and best.monitor_op is expected


@pytest.mark.parametrize("name", list(METRICS), ids=list(METRICS))
def test_sequence_labels_match_flat_labels(name):
    # (B, T) labels against (B, T, C) predictions, with per-element weights,
    # give the result of the flattened batch; T == C is no special case.
    cls, kwargs, reference = METRICS[name]
    y, logits, weights = _data(5, n=36)
    metric = cls(**kwargs)
    metric.update_state(
        y.reshape(6, 6),
        logits.reshape(6, 6, NUM_CLASSES),
        sample_weight=weights.reshape(6, 6),
    )
    expected = reference(y, logits.argmax(-1), weights.astype(np.float64))
    assert float(metric.result()) == pytest.approx(expected, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("name", list(METRICS), ids=list(METRICS))
def test_incompatible_shapes_raise(name):
    cls, kwargs, _ = METRICS[name]
    with pytest.raises(ValueError, match=r"y_true.shape=\(4,\), y_pred.shape="):
        cls(**kwargs).update_state(np.zeros(4), np.zeros((4, 1, NUM_CLASSES)))
    with pytest.raises(ValueError, match=r"y_true.shape=\(1,\), y_pred.shape="):
        cls(**kwargs).update_state(np.zeros(1), np.zeros((4, NUM_CLASSES)))


@pytest.mark.parametrize("name", list(METRICS), ids=list(METRICS))
@pytest.mark.parametrize("bad", [-1.0, 6.0, 1000.0, float("nan"), 2.5])
def test_bad_labels_make_the_compiled_result_nan(name, bad):
    if BACKEND == "torch":
        pytest.skip("PyTorch runs eagerly here, where a bad label raises")
    cls, kwargs, _ = METRICS[name]
    metric = cls(**kwargs)

    def update(y, p):
        metric.update_state(y, p)
        return metric.numerator, metric.denominator

    y, logits, _ = _data(6, n=4)
    labels = y.astype(np.float32)
    labels[2] = bad
    if BACKEND == "tensorflow":
        compile_function(update)(labels, logits)
        assert np.isnan(float(metric.result()))
    else:  # JAX: metric state is functional; check the stateless result.
        state = [v.value for v in metric.variables]
        state = compile_function(
            lambda s, yy, p: metric.stateless_update_state(s, yy, p)
        )(state, labels, logits)
        assert np.isnan(float(metric.stateless_result(state)))
    with pytest.raises(ValueError, match=r"Invalid value in `y_true`"):
        cls(**kwargs).update_state(labels, logits)


def _numpy_readout(probabilities, method, values):
    if method == "argmax":
        return values[probabilities.argmax(-1)]
    if method == "mean":
        return probabilities @ values
    cumulative = np.cumsum(probabilities, axis=-1)
    return values[np.argmax(cumulative >= 0.5 - 1e-7, axis=-1)]


@pytest.mark.parametrize("method", ["argmax", "median", "mean"])
@pytest.mark.parametrize("values", [None, CLASS_VALUES], ids=["indices", "values"])
@pytest.mark.parametrize("from_logits", [True, False], ids=["logits", "probs"])
def test_decoded_mae_and_mse_match_numpy(method, values, from_logits):
    y, logits, weights = _data(7)
    probabilities = softmax(logits)
    inputs = logits if from_logits else probabilities.astype(np.float32)
    v = np.arange(NUM_CLASSES, dtype=np.float64) if values is None else values
    error = _numpy_readout(probabilities, method, v) - v[y]
    for cls, expected in (
        (ClassMeanAbsoluteError, np.sum(weights * np.abs(error)) / np.sum(weights)),
        (ClassMeanSquaredError, np.sum(weights * error**2) / np.sum(weights)),
    ):
        metric = cls(class_values=values, decode=method, from_logits=from_logits)
        metric.update_state(y[:20], inputs[:20], sample_weight=weights[:20])
        metric.update_state(y[20:], inputs[20:], sample_weight=weights[20:])
        assert float(metric.result()) == pytest.approx(expected, rel=1e-4, abs=1e-5)
        rebuilt, serialized = assert_config_round_trip(metric)
        assert serialized["config"]["decode"] == method
        assert rebuilt.from_logits is from_logits


def test_decode_argument_is_checked():
    with pytest.raises(ValueError, match=r"`decode`.*Received: decode='mode'"):
        ClassMeanAbsoluteError(decode="mode")
    with pytest.raises(TypeError, match=r"from_logits"):
        ClassMeanSquaredError(from_logits="yes")
    with pytest.raises(ValueError, match=r"increasing"):
        ClassMeanAbsoluteError(class_values=[3.0, 2.0, 1.0], decode="median")


def test_64_bit_superclass_ids_stay_distinct():
    # Class 1's superclass 2**32 is not class 0's superclass 0 (an int32 cast
    # would merge them). True 0, predicted 1: a mistake in another
    # superclass, severity 1 - S[0, 1] = 1.
    ids = [0, 2**32, 1]
    y, p = [0], [[0.1, 0.8, 0.1]]
    for metric, expected in (
        (SuperclassAccuracy(ids), 0.0),
        (FailedSuperclassAccuracy(ids), 0.0),
        (MistakeSeverity(similarity.from_hierarchy(ids, 0.5)), 1.0),
    ):
        metric.update_state(y, p)
        assert float(metric.result()) == expected, metric.name
    assert SuperclassAccuracy(ids).get_config()["superclass_of"] == ids
