"""Top-k mistake severity, accuracy within k classes, quadratic weighted
kappa, and min-risk decoding inside the metrics, against NumPy and
scikit-learn, over several batches (epoch-exact), weighted, and compiled."""

import keras
import numpy as np
import pytest

from keras_simloss import (
    AccuracyWithinK,
    ClassMeanAbsoluteError,
    ConfusionMatrix,
    FailedSuperclassAccuracy,
    MistakeSeverity,
    QuadraticWeightedKappa,
    SuperclassAccuracy,
    TopKMistakeSeverity,
    similarity,
)
from tests.similarity.cases import hierarchy_reference, ordinal_reference
from tests.testing import (
    BACKEND,
    JIT_COMPILE,
    assert_config_round_trip,
    compile_function,
    labelled_logits,
    save_and_reload,
    softmax,
    to_numpy,
)

sklearn_metrics = pytest.importorskip("sklearn.metrics")

COMPILED = [False, True] if JIT_COMPILE else [False]
C = 7
LEVELS = [[0, 0, 1, 1, 2, 2, 3], [0, 0, 0, 0, 1, 1, 1]]


def _data(seed=0, n=40):
    labels, logits, weights = labelled_logits(seed, C, n)
    return labels, softmax(logits).astype(np.float32), weights


def _accumulate(metric, labels, p, weights, compiled, batch=16):
    """The metric over the batches of 16 (a ragged last one), as `evaluate`."""
    batches = [slice(s, s + batch) for s in range(0, len(labels), batch)]
    if compiled and BACKEND == "jax":
        # JAX compiles the metric's pure form, as its trainer does.
        import jax

        @jax.jit
        def step(state, y, x, w):
            return metric.stateless_update_state(state, y, x, sample_weight=w)

        state = [variable.value for variable in metric.variables]
        for part in batches:
            state = step(state, labels[part], p[part], weights[part])
        return float(to_numpy(metric.stateless_result(state)))

    def update(y, x, w):
        metric.update_state(y, x, sample_weight=w)
        return metric.result()

    function = compile_function(update) if compiled else update
    for part in batches:
        result = function(labels[part], p[part], weights[part])
    return float(to_numpy(result))


def _min_risk(p, matrix):
    return np.argmax(p.astype(np.float64) @ matrix, axis=-1)


def _read(p, decode, r):
    """The NumPy predicted class of `decode` ("min_risk": under
    `ordinal(C, r)`), and the `decode` argument that asks the metric for it."""
    if decode == "argmax":
        return p.argmax(-1), decode
    if decode == "median":
        return (np.cumsum(p, -1) < 0.5).sum(-1), decode
    return _min_risk(p, ordinal_reference(C, r)), similarity.ordinal(C, r)


def _weighted_mean(values, weights):
    return np.sum(values * weights) / np.sum(weights)


@pytest.mark.parametrize("compiled", COMPILED, ids=lambda c: f"compiled={c}")
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("mode", ["average", "best"])
def test_top_k_mistake_severity_matches_numpy(mode, k, compiled):
    labels, p, weights = _data(1)
    matrix = hierarchy_reference(LEVELS, [0.6, 0.2])
    metric = TopKMistakeSeverity(similarity.from_hierarchy(LEVELS, [0.6, 0.2]), k, mode)
    top = np.argsort(-p, axis=-1, kind="stable")[:, :k]
    distance = 1.0 - matrix[labels[:, None], top]
    per_example = distance.mean(-1) if mode == "average" else distance.min(-1)
    got = _accumulate(metric, labels, p, weights, compiled)
    assert got == pytest.approx(_weighted_mean(per_example, weights), rel=1e-5)
    assert metric._direction == "down"


@pytest.mark.parametrize("compiled", COMPILED, ids=lambda c: f"compiled={c}")
@pytest.mark.parametrize("decode", ["argmax", "median", "min_risk"])
@pytest.mark.parametrize("k", [0, 1, 2])
def test_accuracy_within_k_matches_numpy(k, decode, compiled):
    labels, p, weights = _data(2)
    predicted, decode = _read(p, decode, 0.6)
    metric = AccuracyWithinK(k, decode=decode)
    got = _accumulate(metric, labels, p, weights, compiled)
    hit = (np.abs(predicted - labels) <= k).astype(float)
    assert got == pytest.approx(_weighted_mean(hit, weights), rel=1e-5)
    assert metric.name == f"accuracy_within_{k}" and metric._direction == "up"


@pytest.mark.parametrize("compiled", COMPILED, ids=lambda c: f"compiled={c}")
@pytest.mark.parametrize("decode", ["argmax", "median", "min_risk"])
def test_quadratic_weighted_kappa_is_scikit_learns_over_the_epoch(decode, compiled):
    labels, p, weights = _data(3, n=70)
    predicted, decode = _read(p, decode, 0.7)
    metric = QuadraticWeightedKappa(C, decode=decode)
    got = _accumulate(metric, labels, p, weights, compiled)
    expected = sklearn_metrics.cohen_kappa_score(
        labels, predicted, weights="quadratic", labels=range(C), sample_weight=weights
    )
    assert got == pytest.approx(expected, abs=1e-5)
    # Epoch-exact: not the mean of the per-batch kappas.
    per_batch = [
        sklearn_metrics.cohen_kappa_score(
            labels[s : s + 16],
            predicted[s : s + 16],
            weights="quadratic",
            labels=range(C),
            sample_weight=weights[s : s + 16],
        )
        for s in range(0, 70, 16)
    ]
    assert abs(np.mean(per_batch) - expected) > 1e-3
    metric.reset_state()
    assert np.isnan(float(to_numpy(metric.result())))  # undefined: no examples


@pytest.mark.parametrize("compiled", COMPILED, ids=lambda c: f"compiled={c}")
def test_metrics_score_the_min_risk_class_when_asked(compiled):
    labels, p, weights = _data(4)
    matrix = hierarchy_reference(LEVELS, [0.6, 0.2])
    sim = similarity.from_hierarchy(LEVELS, [0.6, 0.2])
    predicted = _min_risk(p, matrix)
    superclass = np.array(LEVELS[0])
    same = superclass[predicted] == superclass[labels]
    wrong = predicted != labels
    values = np.arange(C) * 10.0
    cases = [
        (SuperclassAccuracy(LEVELS[0], decode=sim), _weighted_mean(same, weights)),
        (
            FailedSuperclassAccuracy(LEVELS[0], decode=sim),
            np.sum((same & wrong) * weights) / np.sum(wrong * weights),
        ),
        (
            MistakeSeverity(sim, decode="min_risk"),
            np.sum((1 - matrix[labels, predicted]) * wrong * weights)
            / np.sum(wrong * weights),
        ),
        (
            ClassMeanAbsoluteError(values, decode=sim),
            _weighted_mean(np.abs(values[predicted] - values[labels]), weights),
        ),
    ]
    assert np.any(predicted != p.argmax(-1))  # the read-outs differ here
    for metric, expected in cases:
        got = _accumulate(metric, labels, p, weights, compiled)
        assert got == pytest.approx(expected, rel=1e-5), metric.name


def test_the_confusion_matrix_counts_the_min_risk_class_of_a_plain_matrix():
    labels, p, weights = _data(7)
    matrix = ordinal_reference(C, 0.6)
    predicted = _min_risk(p, matrix)
    metric = ConfusionMatrix(C, decode=matrix)  # a (C, C) array works too
    metric.update_state(labels, p, sample_weight=weights)
    expected = np.zeros((C, C))
    np.add.at(expected, (labels, predicted), weights)
    np.testing.assert_allclose(to_numpy(metric.result()), expected, rtol=1e-6)
    rebuilt, _ = assert_config_round_trip(metric)
    assert isinstance(rebuilt.decode, similarity.MatrixSimilarity)


@pytest.mark.parametrize("compiled", COMPILED, ids=lambda c: f"compiled={c}")
def test_a_nan_row_makes_every_new_metric_nan(compiled):
    sim = similarity.ordinal(C, 0.5)
    labels, p, weights = _data(5, n=8)
    p[3, 2] = np.nan
    for metric in (
        TopKMistakeSeverity(sim, 2),
        AccuracyWithinK(1),
        AccuracyWithinK(1, decode="median"),
        AccuracyWithinK(1, decode=sim),
        QuadraticWeightedKappa(C),
        QuadraticWeightedKappa(C, decode=sim),
        SuperclassAccuracy(LEVELS[0], decode=sim),
    ):
        assert np.isnan(_accumulate(metric, labels, p, weights, compiled)), metric.name


def test_bad_arguments_are_refused_by_name():
    sim = similarity.ordinal(C, 0.5)
    with pytest.raises(ValueError, match=r"`k`.*k <= the number of classes"):
        TopKMistakeSeverity(sim, k=C + 1)
    with pytest.raises(ValueError, match="`k`"):
        TopKMistakeSeverity(sim, k=0)
    with pytest.raises(TypeError, match="`k`"):
        TopKMistakeSeverity(sim, k=2.0)
    with pytest.raises(ValueError, match="`mode`"):
        TopKMistakeSeverity(sim, mode="worst")
    with pytest.raises(ValueError, match="`k`"):
        AccuracyWithinK(k=-1)
    with pytest.raises(ValueError, match=r"`k`.*below the number of classes"):
        AccuracyWithinK(k=C).update_state([0], np.full((1, C), 1 / C))
    with pytest.raises(ValueError, match="`decode`"):
        AccuracyWithinK(decode="mean")
    with pytest.raises(ValueError, match="`decode`"):
        SuperclassAccuracy(LEVELS[0], decode="min_risk")
    with pytest.raises(ValueError, match="similarity over 5 classes"):
        QuadraticWeightedKappa(C, decode=similarity.ordinal(5, 0.5)).update_state(
            [0], np.full((1, C), 1 / C)
        )
    with pytest.raises(ValueError, match="`num_classes` for 7 classes"):
        QuadraticWeightedKappa(C).update_state([0], np.full((1, 5), 0.2))


def test_configs_round_trip_and_a_compiled_model_reloads(tmp_path):
    sim = similarity.from_hierarchy(LEVELS, [0.6, 0.2])
    metrics = [
        TopKMistakeSeverity(sim, 3, "best"),
        AccuracyWithinK(2, decode=sim, from_logits=True),
        QuadraticWeightedKappa(C, decode="median", from_logits=True),
        SuperclassAccuracy(LEVELS[0], decode=sim, from_logits=True),
        MistakeSeverity(sim, decode="min_risk", from_logits=True),
    ]
    for metric in metrics:
        rebuilt, _ = assert_config_round_trip(metric)
        assert rebuilt.name == metric.name
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(C)])
    model.compile(
        "adam",
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=metrics,
        jit_compile=JIT_COMPILE,
    )
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(50, 3)).astype(np.float32), rng.integers(0, C, 50)
    model.fit(x, y, epochs=1, batch_size=16, verbose=0)
    results = model.evaluate(x, y, batch_size=16, verbose=0, return_dict=True)
    assert all(np.isfinite(value) for value in results.values())
    reloaded = save_and_reload(model, tmp_path)
    again = reloaded.evaluate(x, y, batch_size=16, verbose=0, return_dict=True)
    for name, value in results.items():
        assert again[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name


def test_top_k_severity_over_the_shipped_wordnet_tree_of_cifar100():
    from keras_simloss.datasets import cifar100_hierarchy

    tree = cifar100_hierarchy()
    sim = tree.similarity()
    matrix = hierarchy_reference(tree.ancestors, sim.similarities)
    labels, logits, weights = labelled_logits(9, 100, 30)
    top = np.argsort(-logits, axis=-1, kind="stable")[:, :5]
    distance = 1.0 - matrix[labels[:, None], top]
    for mode, per_example in (
        ("average", distance.mean(-1)),
        ("best", distance.min(-1)),
    ):
        metric = TopKMistakeSeverity(sim, 5, mode)
        metric.update_state(labels, logits, sample_weight=weights)
        expected = _weighted_mean(per_example, weights)
        assert float(to_numpy(metric.result())) == pytest.approx(expected, rel=1e-5)
