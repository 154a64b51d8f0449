"""One rule wherever a prediction is read: a row holding a NaN is never read
as a class (`_utils.readable_rows`). The loss, every read-out, every metric
and the decoding layer give NaN for it, in eager mode and compiled, on every
backend; the other rows keep their NumPy values."""

import keras
import numpy as np
import pytest

from keras_simloss import (
    ClassMeanAbsoluteError,
    ClassMeanSquaredError,
    ConfusionMatrix,
    FailedSuperclassAccuracy,
    MistakeSeverity,
    OrdinalDecoding,
    SimLoss,
    SuperclassAccuracy,
    decode_ordinal,
    sim_loss,
    similarity,
)
from tests.testing import JIT_COMPILE, compile_function, softmax, to_numpy

COMPILED = [False, True] if JIT_COMPILE else [False]
VALUES = np.array([10.0, 20.0, 35.0, 50.0, 70.0])


def _probabilities():
    """Three rows: a NaN in row 0, row 1 all NaN, row 2 a plain distribution."""
    p = softmax(np.random.default_rng(0).normal(size=(3, 5))).astype(np.float32)
    p[0, 3] = np.nan
    p[1] = np.nan
    return p


def _run(function, compiled, *args):
    return to_numpy((compile_function(function) if compiled else function)(*args))


def _median(p):  # the first class whose cumulative probability reaches 0.5
    return int(np.argmax(np.cumsum(p) >= 0.5 * np.sum(p)))


@pytest.mark.parametrize("compiled", COMPILED, ids=lambda c: f"compiled={c}")
@pytest.mark.parametrize("method", ["argmax", "median", "mean"])
@pytest.mark.parametrize("from_logits", [False, True], ids=["probs", "logits"])
def test_decode_ordinal_gives_nan_for_a_nan_row(method, from_logits, compiled):
    p = _probabilities()
    inputs = np.log(p) if from_logits else p
    got = _run(
        lambda x: decode_ordinal(x, method, VALUES, from_logits=from_logits),
        compiled,
        inputs,
    )
    assert np.all(np.isnan(got[:2])), got
    q = p[2].astype(np.float64)
    expected = {
        "argmax": VALUES[np.argmax(q)],
        "median": VALUES[_median(q)],
        "mean": np.sum(q * VALUES) / np.sum(q),
    }[method]
    np.testing.assert_allclose(got[2], expected, rtol=1e-5)


@pytest.mark.parametrize("method", ["median", "mean"])
def test_a_row_without_mass_is_no_distribution(method):
    p = np.array([[0.0, 0.0, 0.0], [0.2, 0.5, 0.3]], np.float32)
    got = to_numpy(decode_ordinal(p, method))
    assert np.isnan(got[0])
    assert got[1] == pytest.approx(1.0 if method == "median" else 1.1)


@pytest.mark.parametrize("method", ["median", "mean"])
def test_logits_read_as_probabilities_raise_in_eager_mode(method):
    logits = np.array([[-1.0, 2.0, 0.5]], np.float32)  # from_logits forgotten
    with pytest.raises(ValueError, match=r"`y_pred`.*from_logits=True"):
        decode_ordinal(logits, method)
    with pytest.raises(ValueError, match=r"`y_pred`.*probabilities"):
        decode_ordinal(np.array([[0.5, np.inf, 0.1]], np.float32), method)
    # argmax reads logits and probabilities alike: no error.
    assert float(to_numpy(decode_ordinal(logits, "argmax"))[0]) == 1.0


@pytest.mark.skipif(not JIT_COMPILE, reason="compiled functions raise nothing")
@pytest.mark.parametrize("method", ["median", "mean"])
def test_logits_read_as_probabilities_give_nan_when_compiled(method):
    logits = np.array([[-1.0, 2.0, 0.5], [0.2, 0.5, 0.3]], np.float32)
    got = _run(lambda x: decode_ordinal(x, method), True, logits)
    assert np.isnan(got[0])
    assert got[1] == pytest.approx(1.0 if method == "median" else 1.1)


def test_decoding_layer_gives_nan_for_a_nan_row():
    layer = OrdinalDecoding("median", VALUES)
    got = to_numpy(layer(_probabilities()))
    assert np.all(np.isnan(got[:2])) and got[2] == VALUES[_median(_probabilities()[2])]
    with pytest.raises(
        TypeError, match=r"`from_logits`.*Received: from_logits='False'"
    ):
        OrdinalDecoding("median", from_logits="False")


def _metrics():
    sim = similarity.ordinal(5, 0.5)
    superclass_of = [0, 0, 1, 1, 2]
    return [
        ClassMeanAbsoluteError(),
        ClassMeanAbsoluteError(decode="median", name="median_mae"),
        ClassMeanSquaredError(class_values=VALUES),
        SuperclassAccuracy(superclass_of),
        FailedSuperclassAccuracy(superclass_of),
        MistakeSeverity(sim),
    ]


@pytest.mark.parametrize("compiled", COMPILED, ids=lambda c: f"compiled={c}")
def test_every_metric_is_nan_when_a_row_is_nan(compiled):
    p = _probabilities()
    y = np.array([0, 1, 2])
    for metric in _metrics():

        def update(y, p, metric=metric):
            metric.update_state(y, p)
            return metric.result()

        got = float(_run(update, compiled, y, p))
        assert np.isnan(got), metric.name
        # Without the NaN rows the same metric is a number again.
        metric.reset_state()
        assert np.isfinite(float(_run(update, compiled, y[2:], p[2:]))), metric.name


@pytest.mark.parametrize("compiled", COMPILED, ids=lambda c: f"compiled={c}")
def test_confusion_matrix_does_not_count_a_nan_row_as_a_class(compiled):
    metric = ConfusionMatrix(5)

    def update(y, p):
        metric.update_state(y, p)
        return metric.result()

    got = _run(update, compiled, np.array([0, 1, 2]), _probabilities())
    assert np.all(np.isnan(got))


@pytest.mark.parametrize("compiled", COMPILED, ids=lambda c: f"compiled={c}")
@pytest.mark.parametrize("bad", [np.inf, np.nan], ids=["inf", "nan"])
def test_sim_loss_on_probabilities_with_a_non_finite_entry_is_nan(bad, compiled):
    sim = similarity.ordinal(5, 0.5)
    p = softmax(np.random.default_rng(1).normal(size=(2, 5))).astype(np.float32)
    expected = -np.log(np.sum(np.asarray(sim)[[3]] * p[1:], axis=-1))
    p[0, 2] = bad
    got = _run(lambda y, p: sim_loss(y, p, sim), compiled, np.array([1, 3]), p)
    assert np.isnan(got[0])
    np.testing.assert_allclose(got[1:], expected, rtol=1e-5)


@pytest.mark.parametrize(
    "sim",
    [
        similarity.ordinal(5, 0.5),
        similarity.top_k(similarity.ordinal(5, 0.5), 2),
        similarity.from_embeddings(np.random.default_rng(2).normal(size=(5, 3))),
    ],
    ids=["ordinal", "sparse", "embeddings"],
)
@pytest.mark.parametrize("from_logits", [True, False], ids=["logits", "probs"])
def test_an_empty_batch_gives_an_empty_loss_as_keras_does(sim, from_logits):
    y, p = np.zeros((0,), np.int32), np.zeros((0, 5), np.float32)
    expected = keras.losses.sparse_categorical_crossentropy(y, p, from_logits)
    assert to_numpy(sim_loss(y, p, sim, from_logits)).shape == (0,)
    reduced = SimLoss(sim, from_logits=from_logits)(y, p)
    reference = keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits)
    np.testing.assert_array_equal(to_numpy(reduced), to_numpy(reference(y, p)))
    assert to_numpy(expected).shape == (0,)


def test_metric_over_other_classes_names_the_argument_that_gave_them():
    metric = ClassMeanAbsoluteError(class_values=[1.0, 2.0, 3.0, 4.0])
    with pytest.raises(ValueError, match=r"`class_values` for 4 classes.*=6"):
        metric.update_state([0], np.full((1, 6), 1 / 6))
    with pytest.raises(ValueError, match=r"`superclass_of` for 3 classes"):
        SuperclassAccuracy([0, 0, 1]).update_state([0], np.full((1, 6), 1 / 6))
    with pytest.raises(ValueError, match=r"similarity over 5 classes"):
        MistakeSeverity(similarity.ordinal(5, 0.5)).update_state(
            [0], np.full((1, 6), 1 / 6)
        )
