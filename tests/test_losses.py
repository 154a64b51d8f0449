import re

import keras
import numpy as np
import pytest

import keras_simloss
from keras_simloss import SimLoss, sim_loss, similarity
from tests.testing import (
    BACKEND,
    JIT_COMPILE,
    assert_config_round_trip,
    compile_function,
    graph_function,
    save_and_reload,
    softmax,
    to_numpy,
    value_and_gradient,
)


def numpy_sim_loss(labels, probabilities, matrix, clip=False):
    """Eq. 1 per example, in float64: -log(sum_c S[y, c] p_c).

    With `clip`, probabilities are first clipped to [1e-7, 1 - 1e-7] and
    renormalised, as Keras's cross entropy (and SimLoss) do for inputs that
    are probabilities.
    """
    probabilities = np.asarray(probabilities, np.float64)
    matrix = np.asarray(matrix, np.float64)
    if clip:
        probabilities = np.clip(probabilities, 1e-7, 1 - 1e-7)
        probabilities = probabilities / probabilities.sum(axis=-1, keepdims=True)
    return -np.log(np.sum(matrix[labels] * probabilities, axis=-1))


def test_hand_check_from_spec():
    # C=3, r=0.5, y=0, p=[0.2, 0.5, 0.3]: -log(0.2 + 0.25 + 0.075) = -log(0.525).
    loss = SimLoss(similarity.ordinal(3, 0.5))
    value = float(loss(np.array([0]), np.array([[0.2, 0.5, 0.3]])))
    assert value == pytest.approx(0.6443570, abs=1e-6)
    logits_loss = SimLoss(similarity.ordinal(3, 0.5), from_logits=True)
    # log p are valid logits for p (softmax(log p) = p).
    value = float(logits_loss(np.array([0]), np.log([[0.2, 0.5, 0.3]])))
    assert value == pytest.approx(0.6443570, abs=1e-6)


def test_zero_when_all_mass_on_true_class():
    loss = SimLoss(similarity.ordinal(4, 0.5), from_logits=True, reduction=None)
    values = loss(np.array([2]), np.array([[-50.0, -50.0, 50.0, -50.0]]))
    assert float(values[0]) == pytest.approx(0.0, abs=1e-6)


def test_mass_on_a_neighbour_costs_less_than_far_away():
    loss = SimLoss(similarity.ordinal(10, 0.5), reduction=None)
    near = np.full((1, 10), 0.01)
    near[0, 6] = 0.91  # true class 5, mass on 6
    far = np.full((1, 10), 0.01)
    far[0, 0] = 0.91
    assert float(loss([5], near)[0]) < float(loss([5], far)[0])


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("num_classes", [2, 7, 31])
@pytest.mark.parametrize("reduction_factor", [0.0, 0.3, 0.9])
@pytest.mark.parametrize("from_logits", [True, False], ids=["logits", "probs"])
def test_matches_numpy_reference(seed, num_classes, reduction_factor, from_logits):
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=3.0, size=(16, num_classes)).astype(np.float32)
    labels = rng.integers(0, num_classes, size=16)
    sim = similarity.ordinal(num_classes, reduction_factor)
    expected = numpy_sim_loss(labels, softmax(logits), np.asarray(sim))
    inputs = logits if from_logits else softmax(logits).astype(np.float32)
    got = keras.ops.convert_to_numpy(
        sim_loss(labels, inputs, sim, from_logits=from_logits)
    )
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("from_logits", [True, False], ids=["logits", "probs"])
@pytest.mark.parametrize(
    "label_format", ["sparse", "column", "one-hot", "float"], ids=lambda f: f
)
def test_label_formats_agree(label_format, from_logits):
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(8, 5)).astype(np.float32)
    labels = rng.integers(0, 5, size=8)
    inputs = logits if from_logits else softmax(logits).astype(np.float32)
    formatted = {
        "sparse": labels,
        "column": labels[:, None],
        "one-hot": np.eye(5, dtype=np.float32)[labels],
        "float": labels.astype(np.float32),
    }[label_format]
    loss = SimLoss(similarity.ordinal(5, 0.4), from_logits=from_logits, reduction=None)
    expected = numpy_sim_loss(
        labels, softmax(logits), np.asarray(similarity.ordinal(5, 0.4))
    )
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(loss(formatted, inputs)), expected, rtol=1e-5
    )


@pytest.mark.parametrize(
    "sim_case",
    ["ordinal", "embeddings", "hierarchy", "matrix", "sparse"],
)
@pytest.mark.parametrize("from_logits", [True, False], ids=["logits", "probs"])
@pytest.mark.parametrize("on_the_fly", [False, True], ids=["table", "on-the-fly"])
def test_every_similarity_kind_matches_numpy(sim_case, from_logits, on_the_fly):
    rng = np.random.default_rng(7)
    sim = {
        "ordinal": similarity.ordinal(12, 0.8),
        "embeddings": similarity.from_embeddings(rng.normal(size=(12, 4)), 0.2),
        "hierarchy": similarity.from_hierarchy(np.arange(12) // 3, 0.5),
        "matrix": similarity.lower_bound(
            np.asarray(similarity.from_embeddings(rng.normal(size=(12, 4)))), 0.1
        ),
        "sparse": similarity.top_k(similarity.ordinal(12, 0.6), k=3),
    }[sim_case]
    if on_the_fly:
        sim.dense_table_max_classes = 0  # as for a label space too large for a table
    logits = rng.normal(scale=2.0, size=(20, 12)).astype(np.float32)
    labels = rng.integers(0, 12, size=20)
    expected = numpy_sim_loss(labels, softmax(logits), np.asarray(sim))
    inputs = logits if from_logits else softmax(logits).astype(np.float32)
    got = keras.ops.convert_to_numpy(
        sim_loss(labels, inputs, sim, from_logits=from_logits)
    )
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("from_logits", [True, False], ids=["logits", "probs"])
@pytest.mark.parametrize(
    "reduction", ["sum_over_batch_size", "sum", "mean", "mean_with_sample_weight", None]
)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_identity_equals_sparse_categorical_crossentropy(
    from_logits, reduction, weighted
):
    rng = np.random.default_rng(11)
    logits = rng.normal(scale=4.0, size=(32, 10)).astype(np.float32)
    inputs = logits if from_logits else softmax(logits).astype(np.float32)
    labels = rng.integers(0, 10, size=32)
    weights = rng.uniform(size=32).astype(np.float32) if weighted else None
    if weighted:
        weights[:5] = 0.0
    ours = SimLoss(np.eye(10), from_logits=from_logits, reduction=reduction)
    theirs = keras.losses.SparseCategoricalCrossentropy(
        from_logits=from_logits, reduction=reduction
    )
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(ours(labels, inputs, sample_weight=weights)),
        keras.ops.convert_to_numpy(theirs(labels, inputs, sample_weight=weights)),
        rtol=1e-5,
        atol=1e-5,
    )


def test_zero_weights_give_zero_loss():
    loss = SimLoss(similarity.ordinal(4, 0.5), reduction="sum")
    value = loss([0, 1], [[0.1, 0.2, 0.3, 0.4]] * 2, sample_weight=[0.0, 0.0])
    assert float(value) == 0.0


@pytest.mark.parametrize("from_logits", [True, False], ids=["logits", "probs"])
@pytest.mark.parametrize("sim_case", ["ordinal", "sparse", "embeddings"])
def test_extreme_logits_give_finite_loss_and_gradients(from_logits, sim_case):
    sim = {
        "ordinal": similarity.ordinal(6, 0.5),
        "sparse": similarity.top_k(similarity.ordinal(6, 0.5), k=2),
        "embeddings": similarity.from_embeddings(
            np.random.default_rng(0).normal(size=(6, 3)), 0.5
        ),
    }[sim_case]
    raw = np.array(
        [
            [1e4, -1e4, 0, 0, 0, 0],
            [-1e4, -1e4, -1e4, -1e4, -1e4, 1e4],
            [0, 0, 0, 0, 0, 0],
        ],
        np.float32,
    )
    loss = SimLoss(sim, from_logits=from_logits)

    def value_of(z):
        inputs = z if from_logits else keras.ops.softmax(z)
        return loss(np.array([5, 0, 3]), inputs)

    value, gradient = value_and_gradient(value_of, raw)
    assert np.isfinite(float(value))
    assert np.all(np.isfinite(gradient))
    if from_logits:
        # Example 1: all mass on class 0, label 5, r = 0.5 -> the similarity
        # that survives is S[5, 0] = 0.5 ** 5 (dense) or 0 (sparse), so the
        # loss is large but finite.
        assert float(value) > 1.0


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_training_stays_finite(policy):
    keras.config.set_dtype_policy(policy)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8)).astype(np.float32)
    y = rng.integers(0, 5, size=64)
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(5),
        ]
    )
    assert model.layers[-1].compute_dtype != "float32"
    model.compile(
        optimizer="adam",
        loss=SimLoss(similarity.ordinal(5, 0.5), from_logits=True),
        jit_compile=False,
    )
    history = model.fit(x, y, epochs=3, batch_size=16, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    # Half-precision logits of large magnitude: the float32 loss is finite.
    logits = keras.ops.cast(
        keras.ops.convert_to_tensor([[6e4, -6e4, 0, 0, 0]]), model.compute_dtype
    )
    value = SimLoss(similarity.ordinal(5, 0.5), from_logits=True)([4], logits)
    assert np.isfinite(float(value))


def _ordinal_data(num_samples, num_classes, seed):
    """Inputs whose first feature encodes the class, so neighbours look alike."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, size=num_samples)
    x = rng.normal(scale=0.3, size=(num_samples, 4)).astype(np.float32)
    x[:, 0] += labels / num_classes * 4.0
    return x, labels


def _small_model(num_classes, activation=None):
    return keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(num_classes, activation=activation),
        ]
    )


@pytest.mark.parametrize("from_logits", [True, False], ids=["logits", "probs"])
def test_fit_under_xla_with_sample_and_class_weights(from_logits):
    keras.utils.set_random_seed(0)
    x, y = _ordinal_data(256, 8, 0)
    model = _small_model(8, None if from_logits else "softmax")
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=SimLoss(similarity.ordinal(8, 0.5), from_logits=from_logits),
        metrics=[keras_simloss.ClassMeanAbsoluteError()],
        jit_compile=JIT_COMPILE,
    )
    weights = np.random.default_rng(1).uniform(0.5, 1.5, size=256).astype(np.float32)
    history = model.fit(x, y, sample_weight=weights, epochs=8, batch_size=64, verbose=0)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    history = model.fit(
        x,
        y,
        class_weight={c: 1.0 + c / 8 for c in range(8)},
        epochs=2,
        batch_size=64,
        verbose=0,
    )
    assert np.all(np.isfinite(history.history["loss"]))

    # The XLA-compiled evaluation equals Eq. 1 in NumPy on the model's outputs
    # (weighted mean over the whole set, one batch).
    outputs = model.predict(x, batch_size=256, verbose=0)
    probabilities = softmax(outputs) if from_logits else outputs
    per_example = numpy_sim_loss(
        y, probabilities, np.asarray(similarity.ordinal(8, 0.5))
    )
    expected = np.sum(per_example * weights) / len(y)
    got = model.evaluate(
        x, y, sample_weight=weights, batch_size=256, verbose=0, return_dict=True
    )
    assert got["loss"] == pytest.approx(expected, rel=1e-4)


def test_config_round_trip_is_exact():
    loss = SimLoss(
        similarity.ordinal(90, 0.8), from_logits=True, reduction="sum", name="age"
    )
    rebuilt, serialized = assert_config_round_trip(loss)
    assert serialized["config"]["similarity"]["config"] == {
        "num_classes": 90,
        "reduction_factor": 0.8,
    }
    assert (rebuilt.from_logits, rebuilt.reduction, rebuilt.name) == (
        True,
        "sum",
        "age",
    )


def test_hand_made_matrix_is_stored_whole():
    matrix = [[1.0, 0.25, 0.0], [0.25, 1.0, 0.5], [0.0, 0.5, 1.0]]
    rebuilt, serialized = assert_config_round_trip(SimLoss(matrix))
    assert serialized["config"]["similarity"]["config"]["matrix"] == matrix
    np.testing.assert_array_equal(np.asarray(rebuilt.similarity), matrix)


def test_saved_model_loads_without_custom_objects(tmp_path):
    keras.utils.set_random_seed(0)
    x, y = _ordinal_data(64, 6, 2)
    model = _small_model(6)
    model.compile(
        optimizer="adam",
        loss=SimLoss(similarity.ordinal(6, 0.7), from_logits=True),
        metrics=[
            keras_simloss.ClassMeanAbsoluteError(),
            keras_simloss.ClassMeanSquaredError(class_values=np.arange(6) * 10.0),
            keras_simloss.SuperclassAccuracy([0, 0, 0, 1, 1, 1]),
            keras_simloss.FailedSuperclassAccuracy([0, 0, 0, 1, 1, 1]),
            keras_simloss.MistakeSeverity(
                similarity.from_hierarchy([0, 0, 0, 1, 1, 1], 0.5)
            ),
        ],
    )
    model.fit(x, y, epochs=1, verbose=0)
    before = model.evaluate(x, y, verbose=0, return_dict=True)
    loaded = save_and_reload(model, tmp_path)
    assert isinstance(loaded.loss, SimLoss)
    after = loaded.evaluate(x, y, verbose=0, return_dict=True)
    assert after == before
    outputs = loaded.predict(x, verbose=0)
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(loaded.loss(y, outputs)),
        keras.ops.convert_to_numpy(model.loss(y, outputs)),
    )


def test_size_mismatch_names_both_sizes():
    loss = SimLoss(similarity.ordinal(10, 0.5))
    with pytest.raises(
        ValueError, match=r"similarity.num_classes=10, y_pred.shape\[-1\]=12"
    ):
        loss([0], np.full((1, 12), 1 / 12))


def test_size_mismatch_is_caught_when_compiling_a_model():
    model = _small_model(5)
    model.compile(loss=SimLoss(similarity.ordinal(7, 0.5), from_logits=True))
    x, y = _ordinal_data(8, 5, 0)
    with pytest.raises(
        ValueError, match=r"similarity.num_classes=7, y_pred.shape\[-1\]=5"
    ):
        model.fit(x, y, verbose=0)


@pytest.mark.parametrize(
    "bad_label", [-1, 4, 2.5], ids=["negative", "too-large", "fraction"]
)
def test_labels_out_of_range_raise_in_eager_mode(bad_label):
    loss = SimLoss(similarity.ordinal(4, 0.5))
    with pytest.raises(ValueError, match=r"Expected integer class indices in \[0, 4\)"):
        loss(np.array([0, bad_label], dtype=np.float32), np.full((2, 4), 0.25))


def test_soft_labels_are_rejected():
    loss = SimLoss(similarity.ordinal(3, 0.5))
    with pytest.raises(ValueError, match="one-hot"):
        loss(np.array([[0.9, 0.1, 0.0]]), np.full((1, 3), 1 / 3))


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"diagonal"):
        SimLoss(np.full((3, 3), 0.5))
    with pytest.raises(TypeError, match="from_logits"):
        SimLoss(np.eye(3), from_logits="yes")
    with pytest.raises(ValueError, match="reduction"):
        SimLoss(np.eye(3), reduction="median")
    with pytest.raises(TypeError, match="similarity"):
        SimLoss(None)


# Large label spaces: structured similarities equal the dense path ----------


def _large_similarities(num_classes=2000, dim=16, k=8):
    vectors = (
        np.random.default_rng(21).normal(size=(num_classes, dim)).astype(np.float32)
    )
    embeddings = similarity.from_embeddings(vectors, lower_bound=0.2)
    sparse = similarity.top_k(embeddings, k=k)
    return {"embeddings": embeddings, "sparse": sparse}


LARGE = _large_similarities()


@pytest.mark.parametrize("kind", list(LARGE))
@pytest.mark.parametrize("from_logits", [True, False], ids=["logits", "probs"])
@pytest.mark.parametrize("reduction", ["sum_over_batch_size", None])
def test_structured_similarity_equals_dense_under_xla(kind, from_logits, reduction):
    structured = LARGE[kind]
    dense = similarity.MatrixSimilarity(np.asarray(structured))
    num_classes = structured.num_classes
    rng = np.random.default_rng(22)
    logits = rng.normal(scale=3.0, size=(64, num_classes)).astype(np.float32)
    # Put some labels next to their most similar classes' mass.
    labels = rng.integers(0, num_classes, size=64)
    inputs = logits if from_logits else softmax(logits).astype(np.float32)
    weights = rng.uniform(0, 2, size=64).astype(np.float32)

    def compiled(sim):
        loss = SimLoss(sim, from_logits=from_logits, reduction=reduction)
        return compile_function(lambda y, p, w: loss(y, p, sample_weight=w))

    ours = to_numpy(compiled(structured)(labels, inputs, weights))
    reference = to_numpy(compiled(dense)(labels, inputs, weights))
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5)
    expected = numpy_sim_loss(
        labels, softmax(logits), np.asarray(structured), clip=not from_logits
    )
    expected = expected * weights
    if reduction is not None:
        expected = expected.mean()
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", list(LARGE))
def test_structured_configs_stay_compact(kind):
    import json

    sim = LARGE[kind]
    text = json.dumps(keras.saving.serialize_keras_object(SimLoss(sim)))
    state = sim.vectors.size if kind == "embeddings" else sim.indices.size * 2
    # The arrays go into the `.keras` archive: the config holds their
    # shapes and a hash, a few hundred characters whatever their size (the
    # limit that binds), and far less than the state or a dense matrix.
    assert '"arrays_in_archive"' in text
    assert len(text) < 1000 < state < sim.num_classes**2


def test_structured_similarities_train_under_xla_and_reload(tmp_path):
    num_classes = 300
    rng = np.random.default_rng(23)
    embeddings = similarity.from_embeddings(
        rng.normal(size=(num_classes, 8)), lower_bound=0.3
    )
    sparse = similarity.top_k(embeddings, k=5)
    x = rng.normal(size=(128, 6)).astype(np.float32)
    y = rng.integers(0, num_classes, size=128)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(num_classes)])
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=SimLoss(sparse, from_logits=True),
        metrics=[keras_simloss.MistakeSeverity(embeddings)],
        jit_compile=JIT_COMPILE,
    )
    history = model.fit(x, y, epochs=5, batch_size=32, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    loaded = save_and_reload(model, tmp_path)
    assert isinstance(loaded.loss.similarity, similarity.SparseSimilarity)
    assert loaded.evaluate(x, y, verbose=0, return_dict=True) == model.evaluate(
        x, y, verbose=0, return_dict=True
    )


# Shapes of every rank (as Keras's SparseCategoricalCrossentropy) -------------


IDENTITY_2 = np.eye(2)
IDENTITY_3 = np.eye(3)


# Ported from keras/src/losses/losses_test.py (SparseCategoricalCrossentropy),
# with Keras's expected numbers: SimLoss with the identity similarity is SCCE.
def test_keras_scce_cases_unweighted_and_weighted():
    y_true = np.array([0, 1, 2])
    y_pred = np.array(
        [[0.9, 0.05, 0.05], [0.5, 0.89, 0.6], [0.05, 0.01, 0.94]], dtype="float32"
    )
    logits = np.array([[8.0, 1.0, 1.0], [0.0, 9.0, 1.0], [2.0, 3.0, 5.0]])
    assert float(SimLoss(IDENTITY_3)(y_true, y_pred)) == pytest.approx(0.3239, abs=1e-3)
    from_logits = SimLoss(IDENTITY_3, from_logits=True)
    assert float(from_logits(y_true, logits)) == pytest.approx(0.0573, abs=1e-3)
    column = y_true.reshape(3, 1)
    assert float(SimLoss(IDENTITY_3)(column, y_pred, sample_weight=2.3)) == (
        pytest.approx(0.7449, abs=1e-3)
    )
    weights = np.array([[1.2], [3.4], [5.6]])
    assert float(SimLoss(IDENTITY_3)(column, y_pred, sample_weight=weights)) == (
        pytest.approx(1.0696, abs=1e-3)
    )
    assert float(from_logits(column, logits, sample_weight=weights)) == (
        pytest.approx(0.31829, abs=1e-3)
    )
    no_reduction = SimLoss(IDENTITY_3, from_logits=True, reduction=None)
    np.testing.assert_allclose(
        to_numpy(no_reduction(column, logits)),
        (0.001822, 0.000459, 0.169846),
        rtol=1e-3,
        atol=1e-6,
    )


def test_keras_scce_binary_segmentation():
    y_true = np.array([[0, 1, 1, 0], [1, 0, 1, 0], [0, 0, 1, 1], [1, 1, 0, 1]])
    y_pred = np.array(
        [
            [[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]],
            [[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]],
            [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]],
            [[0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]],
        ]
    )
    assert float(SimLoss(IDENTITY_2)(y_true, y_pred)) == pytest.approx(0.0, abs=1e-5)
    y_pred[0, 3] = [0.2, 0.8]
    y_pred[3, 3] = [0.6, 0.4]
    expected = np.array([-np.log(0.2), -np.log(0.4)])
    assert float(SimLoss(IDENTITY_2)(y_true, y_pred)) == pytest.approx(
        expected.sum() / 16.0, rel=1e-4
    )


def test_keras_scce_multi_class_segmentation_matches_keras():
    rng = np.random.default_rng(31)
    y_true = rng.integers(0, 3, size=(4, 4))
    y_pred = softmax(rng.normal(size=(4, 4, 3))).astype(np.float32)
    weights = rng.uniform(size=(4, 4)).astype(np.float32)
    for sample_weight in (None, weights, weights[:, 0]):
        ours = SimLoss(IDENTITY_3)(y_true, y_pred, sample_weight=sample_weight)
        theirs = keras.losses.SparseCategoricalCrossentropy()(
            y_true, y_pred, sample_weight=sample_weight
        )
        assert float(ours) == pytest.approx(float(theirs), rel=1e-5)


def test_sequences_with_similarity_match_numpy():
    # Integer labels (B, T) against predictions (B, T, C) with T == C: class
    # indices, never one-hot rows.
    rng = np.random.default_rng(32)
    sim = similarity.ordinal(4, 0.5)
    y_true = rng.integers(0, 4, size=(3, 4))
    logits = rng.normal(size=(3, 4, 4)).astype(np.float32)
    got = to_numpy(SimLoss(sim, from_logits=True, reduction=None)(y_true, logits))
    expected = numpy_sim_loss(
        y_true.ravel(), softmax(logits.reshape(-1, 4)), np.asarray(sim)
    ).reshape(3, 4)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    one_hot = np.eye(4)[y_true]
    np.testing.assert_allclose(
        to_numpy(SimLoss(sim, from_logits=True, reduction=None)(one_hot, logits)),
        expected,
        rtol=1e-5,
    )


BAD_SHAPES = {
    "(b,1,C)-vs-(b,)": ((4,), (4, 1, 3)),
    "labels-batch-1": ((1,), (4, 3)),
    "labels-batch-differs": ((5, 1), (4, 3)),
    "one-hot-wrong-width": ((4, 2), (4, 3)),
    "too-many-label-axes": ((4, 3, 1, 1), (4, 3)),
}


@pytest.mark.parametrize("shapes", list(BAD_SHAPES.values()), ids=list(BAD_SHAPES))
@pytest.mark.parametrize("where", ["eager", "compiled"])
def test_incompatible_shapes_raise_naming_both(shapes, where):
    label_shape, pred_shape = shapes
    labels = np.zeros(label_shape, np.float32)
    predictions = np.full(pred_shape, 1.0 / pred_shape[-1], np.float32)
    loss = SimLoss(similarity.ordinal(pred_shape[-1], 0.5))
    call = loss if where == "eager" else compile_function(lambda y, p: loss(y, p))
    pattern = (
        rf"y_true.shape={re.escape(str(label_shape))}, "
        rf"y_pred.shape={re.escape(str(pred_shape))}"
    )
    with pytest.raises(ValueError, match=pattern):
        call(labels, predictions)


def test_fit_with_an_extra_output_axis_is_refused_not_broadcast():
    # A (b, 1, C) output with (b,) labels used to pair every label with every
    # prediction; now it is refused when the step is traced.
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(3), keras.layers.Reshape((1, 3))]
    )
    model.compile(loss=SimLoss(similarity.ordinal(3, 0.5), from_logits=True))
    x = np.zeros((8, 4), np.float32)
    with pytest.raises(ValueError, match=r"y_true.shape=\((8|None),\)"):
        model.fit(x, np.zeros(8), epochs=1, verbose=0)


# Bad label values ---------------------------------------------------------------

BAD_LABELS = {"-1": -1.0, "C": 4.0, "1000": 1000.0, "nan": float("nan"), "2.5": 2.5}


@pytest.mark.parametrize("bad", list(BAD_LABELS.values()), ids=list(BAD_LABELS))
def test_bad_labels_raise_in_eager_mode(bad):
    loss = SimLoss(similarity.ordinal(4, 0.5))
    with pytest.raises(ValueError, match=r"Invalid value in `y_true`.*\[0, 4\)"):
        loss(np.array([0.0, bad]), np.full((2, 4), 0.25, np.float32))


def test_soft_labels_raise_in_eager_mode():
    with pytest.raises(ValueError, match="must be one-hot"):
        SimLoss(similarity.ordinal(3, 0.5))(
            np.array([[0.9, 0.1, 0.0]]), np.full((1, 3), 1 / 3, np.float32)
        )


@pytest.mark.parametrize("bad", list(BAD_LABELS.values()), ids=list(BAD_LABELS))
@pytest.mark.parametrize("mode", ["graph", "xla"])
@pytest.mark.parametrize("from_logits", [True, False], ids=["logits", "probs"])
def test_bad_labels_give_nan_inside_compiled_steps(bad, mode, from_logits):
    """The bad example's loss is NaN, the others keep their exact values."""
    sim = similarity.ordinal(4, 0.5)
    loss = SimLoss(sim, from_logits=from_logits, reduction=None)
    wrap = graph_function if mode == "graph" else compile_function
    compiled = wrap(lambda y, p: loss(y, p))
    logits = np.random.default_rng(33).normal(size=(3, 4)).astype(np.float32)
    inputs = logits if from_logits else softmax(logits).astype(np.float32)
    if BACKEND == "torch":
        pytest.skip("PyTorch runs eagerly here; eager mode raises (tested above)")
    got = to_numpy(compiled(np.array([0.0, bad, 3.0], np.float32), inputs))
    assert np.isnan(got[1])
    expected = numpy_sim_loss(
        np.array([0, 3]), softmax(logits[[0, 2]]), np.asarray(sim)
    )
    np.testing.assert_allclose(got[[0, 2]], expected, rtol=1e-5)


def test_bad_label_in_fit_makes_the_loss_nan_and_terminate_on_nan_stops():
    if BACKEND == "torch":
        pytest.skip("PyTorch's fit runs eagerly here, where a bad label raises")
    keras.utils.set_random_seed(0)
    x, y = _ordinal_data(64, 4, 3)
    y = y.astype(np.float32)
    y[5] = -1.0
    model = _small_model(4)
    model.compile(
        optimizer="adam",
        loss=SimLoss(similarity.ordinal(4, 0.5), from_logits=True),
        metrics=[keras_simloss.ClassMeanAbsoluteError()],
        jit_compile=JIT_COMPILE,
    )
    history = model.fit(
        x,
        y,
        epochs=3,
        batch_size=64,
        verbose=0,
        callbacks=[keras.callbacks.TerminateOnNaN()],
    )
    assert len(history.history["loss"]) == 1
    assert np.isnan(history.history["loss"][0])
    assert np.isnan(history.history["class_mae"][0])
    # The weights stay finite: the bad example adds no gradient.
    assert all(np.all(np.isfinite(w)) for w in model.get_weights())


# Gradients ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "sim_case", ["ordinal", "embeddings", "hierarchy", "sparse", "matrix"]
)
@pytest.mark.parametrize("on_the_fly", [False, True], ids=["table", "on-the-fly"])
def test_logit_gradient_is_softmax_minus_similarity_weighted_softmax(
    sim_case, on_the_fly
):
    # dL/dz_c = softmax(z)_c - q_c with q_c = S[y, c] exp(z_c) / sum_k S[y, k]
    # exp(z_k), for the per-example loss -log(sum_c S[y, c] softmax(z)_c).
    rng = np.random.default_rng(34)
    sim = {
        "ordinal": similarity.ordinal(7, 0.6),
        "embeddings": similarity.from_embeddings(rng.normal(size=(7, 3)), 0.1),
        "hierarchy": similarity.from_hierarchy([0, 0, 1, 1, 1, 2, 2], 0.4),
        "sparse": similarity.top_k(similarity.ordinal(7, 0.6), k=2),
        "matrix": similarity.lower_bound(
            np.asarray(similarity.from_embeddings(rng.normal(size=(7, 3)))), 0.2
        ),
    }[sim_case]
    if on_the_fly:
        sim.dense_table_max_classes = 0
    logits = rng.normal(scale=2.0, size=(5, 7)).astype(np.float32)
    labels = rng.integers(0, 7, size=5)
    loss = SimLoss(sim, from_logits=True, reduction="sum")
    _, gradient = value_and_gradient(lambda z: loss(labels, z), logits)
    matrix = np.asarray(sim, np.float64)
    weighted = matrix[labels] * np.exp(logits - logits.max(axis=1, keepdims=True))
    q = weighted / weighted.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(gradient, softmax(logits) - q, rtol=1e-4, atol=1e-6)


def test_probability_gradient_matches_finite_differences():
    rng = np.random.default_rng(35)
    sim = similarity.ordinal(5, 0.5)
    probabilities = softmax(rng.normal(size=(3, 5))).astype(np.float64)
    labels = np.array([0, 2, 4])
    loss = SimLoss(sim, reduction="sum")
    _, gradient = value_and_gradient(lambda p: loss(labels, p), probabilities)

    def numpy_loss(p):
        p = np.clip(p, 1e-7, 1 - 1e-7)
        return np.sum(
            np.log(p.sum(axis=1)) - np.log(np.sum(np.asarray(sim)[labels] * p, axis=1))
        )

    step = 1e-4
    numeric = np.zeros_like(probabilities)
    for index in np.ndindex(probabilities.shape):
        up, down = probabilities.copy(), probabilities.copy()
        up[index] += step
        down[index] -= step
        numeric[index] = (numpy_loss(up) - numpy_loss(down)) / (2 * step)
    np.testing.assert_allclose(gradient, numeric, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize(
    "sim",
    [
        similarity.ordinal(6, 0.5),
        similarity.SparseSimilarity([[1], [2], [3], [4], [5], [0]], [[0.5]] * 6),
    ],
    ids=["ordinal", "sparse"],
)
def test_probability_gradient_is_zero_where_the_clip_holds(sim):
    # Entries below epsilon = 1e-7 or above 1 - epsilon are held by the clip
    # and get no gradient; the others get 1 / sum(p) - S[y, c] / sum(S[y] p).
    probabilities = np.array(
        [
            [1e-9, 0.5, 0.3, 0.2 - 1e-9, 0.0, 0.0],
            [0.0, 1.0, 0.0, 0.0, 0.0, 0.0],
            [0.2, 0.2, 0.2, 0.2, 0.1, 0.1],
        ],
        np.float32,
    )
    labels = np.array([1, 2, 5])
    upstream = np.array([1.0, 2.0, 0.5])
    weights = keras.ops.convert_to_tensor(upstream, "float32")
    _, gradient = value_and_gradient(
        lambda p: keras.ops.sum(sim_loss(labels, p, sim) * weights), probabilities
    )
    clipped = np.clip(probabilities.astype(np.float64), 1e-7, 1 - 1e-7)
    rows = np.asarray(sim, np.float64)[labels]
    inside = (probabilities >= np.float32(1e-7)) & (
        probabilities <= np.float32(1 - 1e-7)
    )
    expected = inside * (
        1 / clipped.sum(-1, keepdims=True)
        - rows / (rows * clipped).sum(-1, keepdims=True)
    )
    expected *= upstream[:, None]
    np.testing.assert_allclose(gradient, expected, rtol=1e-5, atol=1e-6)
    assert np.all(gradient[~inside] == 0)


@pytest.mark.parametrize("scale", [1e2, 1e4, 1e6])
def test_logit_gradient_keeps_its_precision_for_large_logits(scale):
    # A rounded logsumexp (spacing 0.06 near 1e6) must not shift every
    # softmax entry: the gradient is checked against float64 NumPy.
    sim = similarity.ordinal(6, 0.5)
    logits = np.full((2, 6), scale, np.float32)
    logits[:, 3] -= 1.0
    logits[1, 0] += 2.0
    labels = np.array([0, 3])
    _, gradient = value_and_gradient(
        lambda z: keras.ops.sum(sim_loss(labels, z, sim, from_logits=True)), logits
    )
    shifted = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    probabilities = softmax(shifted)
    weighted = np.asarray(sim, np.float64)[labels] * probabilities
    expected = probabilities - weighted / weighted.sum(-1, keepdims=True)
    np.testing.assert_allclose(gradient, expected, atol=1e-6)


def test_large_int64_labels_do_not_wrap_to_a_class():
    predictions = np.full((2, 4), 0.25, np.float32)
    for labels in (np.array([0, 2**32], np.int64), np.array([0, -(2**32)], np.int64)):
        with pytest.raises(ValueError, match=r"Invalid value in `y_true`"):
            sim_loss(labels, predictions, similarity.ordinal(4, 0.5))


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.function input signatures")
def test_labels_with_an_unknown_last_axis_of_the_predictions_rank_raise():
    import tensorflow as tf

    loss = SimLoss(similarity.ordinal(3, 0.5), from_logits=True)
    traced = tf.function(
        lambda y, p: loss(y, p),
        input_signature=[
            tf.TensorSpec((None, None), tf.float32),
            tf.TensorSpec((None, 3), tf.float32),
        ],
    )
    with pytest.raises(ValueError, match=r"last axis of `y_true` must have a known"):
        traced.get_concrete_function()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "mixed_float16"])
def test_half_precision_loss_dtype_is_refused(dtype):
    # Keras casts labels to the loss dtype: 257 would become 256 in bfloat16.
    if dtype == "mixed_float16":
        dtype = keras.DTypePolicy(dtype)
    with pytest.raises(ValueError, match=r"`dtype`.*round class indices"):
        SimLoss(similarity.ordinal(3, 0.5), dtype=dtype)
    assert SimLoss(similarity.ordinal(3, 0.5), dtype="float64").dtype == "float64"


# A training step compiled by XLA (TensorFlow): the bytes of its temporary
# buffers, read from XLA's buffer assignment (deterministic for a program),
# in a child process because XLA reads its dump flags once per process.
_STEP_MEMORY_SCRIPT = r"""
import sys
import numpy as np
import keras
from keras_simloss import SimLoss, similarity

kind, closed_form, num_classes = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3])
rng = np.random.default_rng(0)
if kind == "scce":
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
else:
    sim = {
        "ordinal": lambda: similarity.ordinal(num_classes, 0.5),
        "embeddings": lambda: similarity.from_embeddings(
            rng.normal(size=(num_classes, 8)), 0.2
        ),
        "hierarchy": lambda: similarity.from_hierarchy(np.arange(num_classes) // 8),
        "sparse": lambda: similarity.SparseSimilarity(
            (np.arange(num_classes)[:, None] + np.arange(1, 4)) % num_classes,
            np.full((num_classes, 3), 0.5),
        ),
    }[kind]()
    sim.dense_table_max_classes = 1  # rows on the fly
    if closed_form:
        loss = SimLoss(sim, from_logits=True)
    else:  # the same formula, differentiated by TensorFlow

        class AutodiffSimLoss(keras.losses.Loss):
            def call(self, y_true, y_pred):
                labels = keras.ops.cast(keras.ops.reshape(y_true, (-1,)), "int32")
                terms = keras.ops.log_softmax(y_pred, axis=-1) + sim.log_rows(labels)
                return -keras.ops.logsumexp(terms, axis=-1)

        loss = AutodiffSimLoss()
model = keras.Sequential(
    [
        keras.Input((32,)),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(num_classes),
    ]
)
model.compile(optimizer="adam", loss=loss, jit_compile=True)
model.train_on_batch(
    rng.normal(size=(256, 32)).astype("float32"), rng.integers(0, num_classes, 256)
)
"""


def _xla_step_temp_bytes(tmp_path, kind, closed_form, num_classes):
    import glob
    import os
    import subprocess
    import sys

    dump = tmp_path / f"{kind}-{closed_form}"
    env = dict(
        os.environ,
        KERAS_BACKEND="tensorflow",
        TF_CPP_MIN_LOG_LEVEL="3",
        XLA_FLAGS=f"--xla_dump_to={dump} --xla_dump_hlo_as_text",
    )
    command = [sys.executable, "-c", _STEP_MEMORY_SCRIPT, kind]
    command += ["1" if closed_form else "0", str(num_classes)]
    subprocess.run(command, env=env, check=True, capture_output=True)
    files = glob.glob(str(dump / "*one_step_on_data*buffer-assignment.txt"))
    assert len(files) == 1, f"expected one train-step buffer assignment: {files}"
    with open(files[0]) as handle:
        found = re.search(r"Total bytes used: (\d+)", handle.read())
    assert found, "XLA's buffer-assignment dump has no 'Total bytes used' line"
    return int(found.group(1))


@pytest.mark.large
@pytest.mark.skipif(
    BACKEND != "tensorflow", reason="XLA's buffer assignment through TensorFlow"
)
def test_compiled_step_holds_no_more_batch_by_class_buffers_than_scce(tmp_path):
    num_classes = 8192
    buffer = 256 * num_classes * 4  # one (batch, C) float32 buffer

    def extra(kind, closed_form=True):
        used = _xla_step_temp_bytes(tmp_path, kind, closed_form, num_classes)
        return (used - reference) / buffer

    reference = _xla_step_temp_bytes(tmp_path, "scce", True, num_classes)
    # The measure sees the buffer that automatic differentiation keeps.
    assert extra("ordinal", closed_form=False) > 0.75
    for kind in ("ordinal", "embeddings", "hierarchy", "sparse"):
        assert extra(kind) < 0.25, kind
