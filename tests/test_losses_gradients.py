"""SimLoss's closed-form gradients on every similarity kind (`losses.py`)."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_simloss import similarity
from tests.similarity.cases import (
    CASES,
    random_vectors,
)
from tests.testing import (
    BACKEND,
    JIT_COMPILE,
    autodiff_sim_loss,
    softmax,
    value_and_gradient,
)


def _value_and_gradient(function, x, compiled):
    """`value_and_gradient`, optionally inside one XLA-compiled function."""
    if not compiled:
        return value_and_gradient(function, x)
    x = np.asarray(x, np.float32)
    if keras.config.backend() == "tensorflow":
        import tensorflow as tf

        @tf.function(jit_compile=True)
        def step(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                value = function(x)
            return value, tape.gradient(value, x)

        value, gradient = step(tf.constant(x))
        return value.numpy(), gradient.numpy()
    import jax

    value, gradient = jax.jit(jax.value_and_grad(function))(x)
    return np.asarray(value), np.asarray(gradient)


GRADIENT_CASES = [
    (case, dense_table)
    for case in CASES
    for dense_table in (True, False)
    if not (case == "matrix" and not dense_table)
    and not (case == "sparse" and dense_table)
]


COMPILED = [False, True] if JIT_COMPILE else [False]


@pytest.mark.parametrize(
    "closed_form", [False, True], ids=["autodiff-reference", "closed-form"]
)
@pytest.mark.parametrize("compiled", COMPILED, ids=lambda c: f"compiled={c}")
@pytest.mark.parametrize(
    "case, dense_table",
    GRADIENT_CASES,
    ids=[f"{c}-{'table' if t else 'on-the-fly'}" for c, t in GRADIENT_CASES],
)
def test_gradients_match_closed_form_and_finite_differences(
    case, dense_table, compiled, closed_form
):
    # `closed_form`: the library's `sim_loss` (gradients in closed form), or
    # the same formulas written here on the public rows and differentiated
    # by the backend (`autodiff_sim_loss`); both must give the NumPy
    # gradients.
    from keras_simloss import sim_loss

    def loss(labels, y_pred, sim, from_logits=False):
        if closed_form:
            return sim_loss(labels, y_pred, sim, from_logits=from_logits)
        return autodiff_sim_loss(sim, labels, y_pred, from_logits)

    sim = CASES[case][0]()
    if not dense_table and not isinstance(sim, similarity.SparseSimilarity):
        sim.dense_table_max_classes = 1
    assert sim.uses_dense_table is dense_table
    matrix = np.asarray(sim, np.float64)
    num_classes = sim.num_classes
    rng = np.random.default_rng(3)
    labels = rng.integers(0, num_classes, size=5).astype("int32")
    logits = rng.normal(scale=2.0, size=(5, num_classes)).astype("float32")
    # The gradient of a weighted sum over examples.
    upstream = rng.uniform(0.5, 2.0, size=5)
    weights = ops.convert_to_tensor(upstream, "float32")

    def log_sum(z):  # on the public log rows
        return ops.sum(ops.logsumexp(z + sim.log_rows(labels), axis=-1) * weights)

    # d/dz log(sum_c S[y, c] e^{z_c}) = q, q_c = S[y, c] e^{z_c} / sum.
    weighted = matrix[labels] * np.exp(logits.astype(np.float64))
    q = weighted / weighted.sum(-1, keepdims=True)
    value, gradient = _value_and_gradient(log_sum, logits, compiled)
    np.testing.assert_allclose(
        value, np.sum(np.log(weighted.sum(-1)) * upstream), rtol=1e-5
    )
    np.testing.assert_allclose(gradient, q * upstream[:, None], atol=1e-5)

    # SimLoss from logits: d/dz = softmax(z) - q (per example), as for cross
    # entropy with q in place of the one-hot label.
    def loss_from_logits(z):
        return ops.sum(loss(labels, z, sim, from_logits=True) * weights)

    _, gradient = _value_and_gradient(loss_from_logits, logits, compiled)
    np.testing.assert_allclose(
        gradient, (softmax(logits) - q) * upstream[:, None], atol=1e-5
    )

    # d/dp sum_c S[y, c] p_c = S[y].
    probabilities = softmax(logits).astype("float32")

    def weighted_sum(p):  # on the public rows
        return ops.sum(ops.sum(sim.rows(labels) * p, axis=-1) * weights)

    value, gradient = _value_and_gradient(weighted_sum, probabilities, compiled)
    np.testing.assert_allclose(
        value, np.sum((matrix[labels] * probabilities).sum(-1) * upstream), rtol=1e-5
    )
    np.testing.assert_allclose(gradient, matrix[labels] * upstream[:, None], atol=1e-6)

    # SimLoss from probabilities against central finite differences (float64
    # NumPy reference of the same clipped and renormalised formula).
    def reference(p):
        p = np.clip(p, 1e-7, 1 - 1e-7)
        return np.sum(
            (np.log(p.sum(-1)) - np.log((matrix[labels] * p).sum(-1))) * upstream
        )

    def loss_from_probabilities(p):
        return ops.sum(loss(labels, p, sim) * weights)

    _, gradient = _value_and_gradient(loss_from_probabilities, probabilities, compiled)
    numeric = np.zeros_like(probabilities, np.float64)
    base = probabilities.astype(np.float64)
    for index in np.ndindex(*probabilities.shape):
        step = 1e-3 * base[index]  # relative: some probabilities are tiny
        shifted = base.copy()
        shifted[index] += step
        up = reference(shifted)
        shifted[index] -= 2 * step
        numeric[index] = (up - reference(shifted)) / (2 * step)
    np.testing.assert_allclose(gradient, numeric, rtol=1e-3, atol=1e-3)


MEMORY_CASES = {
    "table": lambda c: similarity.ordinal(c, 0.5),
    "ordinal": lambda c: similarity.ordinal(c, 0.5),
    "embeddings": lambda c: similarity.from_embeddings(random_vectors(c, 8, 0), 0.2),
    "hierarchy": lambda c: similarity.from_hierarchy(np.arange(c) // 8, 0.5),
    "sparse": lambda c: similarity.SparseSimilarity(
        (np.arange(c)[:, None] + np.arange(1, 4)[None, :]) % c, np.full((c, 3), 0.5)
    ),
}


@pytest.mark.skipif(BACKEND != "jax", reason="XLA memory analysis through JAX")
@pytest.mark.parametrize("case", list(MEMORY_CASES))
def test_training_step_holds_no_more_batch_by_class_buffers_than_cross_entropy(case):
    # XLA's buffer assignment is deterministic: the temporary memory of the
    # compiled value-and-gradient of the loss alone, in units of one
    # (batch, C) float32 buffer. On JAX this tells the closed form from
    # automatic differentiation only; the scheduling details (`_after`,
    # recomputed rows) are checked on TensorFlow in test_losses.py, where a
    # whole compiled training step shows them.
    import jax

    from keras_simloss import sim_loss

    num_classes = 512 if case == "table" else 4096
    sim = MEMORY_CASES[case](num_classes)
    if case == "table":
        assert sim.uses_dense_table
    else:
        sim.dense_table_max_classes = 1
    rng = np.random.default_rng(0)
    logits = jax.numpy.asarray(rng.normal(size=(64, num_classes)), "float32")
    labels = jax.numpy.asarray(rng.integers(0, num_classes, 64), "int32")

    def buffers(loss):
        compiled = jax.jit(jax.value_and_grad(lambda z: jax.numpy.sum(loss(z))))
        memory = compiled.lower(logits).compile().memory_analysis()
        return memory.temp_size_in_bytes / logits.nbytes

    cross_entropy = buffers(
        lambda z: keras.losses.sparse_categorical_crossentropy(labels, z, True)
    )
    closed_form = buffers(lambda z: sim_loss(labels, z, sim, from_logits=True))
    autodiff = buffers(lambda z: autodiff_sim_loss(sim, labels, z))
    assert cross_entropy >= 1  # the reference does hold (batch, C) buffers
    assert closed_form <= cross_entropy, (closed_form, cross_entropy)
    if case != "sparse":  # sparse terms are (batch, k + 1) either way
        assert closed_form < autodiff, (closed_form, autodiff)


@pytest.mark.parametrize("case", ["sparse", "ordinal-r0.5"])
@pytest.mark.parametrize("from_logits", [True, False], ids=["logits", "probs"])
def test_a_nan_prediction_leaves_the_other_examples_gradients_alone(case, from_logits):
    # The backward pass rebuilds each example's rows from its label (after
    # `_after`, which reads the forward value): a NaN in one example's
    # predictions makes its loss and gradient NaN, not another example's
    # gradient wrong.
    from keras_simloss import sim_loss

    sim = CASES[case][0]()
    matrix = np.asarray(sim, np.float64)
    logits = np.random.default_rng(5).normal(size=(2, sim.num_classes))
    inputs = (logits if from_logits else softmax(logits)).astype(np.float32)
    inputs[0, -1] = np.nan
    labels = np.array([2, 1])
    value, gradient = value_and_gradient(
        lambda z: ops.sum(sim_loss(labels, z, sim, from_logits=from_logits)), inputs
    )
    assert np.isnan(value)
    # (From probabilities the NaN entry itself gets 0: the clip's mask of
    # the entries it leaves alone is False for NaN.)
    assert np.all(np.isnan(gradient[0, :-1]))
    p = softmax(logits[1])
    q = matrix[1] * p / np.sum(matrix[1] * p)
    if from_logits:
        expected = p - q  # softmax(z) - q
    else:  # 1 / sum p - S[y] / sum S[y] p, with sum p = 1
        expected = 1.0 - matrix[1] / np.sum(matrix[1] * p)
    np.testing.assert_allclose(gradient[1], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("keep_rows", [False, True])
def test_keep_rows_decides_whether_the_backward_pass_computes_rows(keep_rows):
    sim = similarity.from_embeddings(random_vectors(12, 3, 1), keep_rows=keep_rows)
    from keras_simloss import sim_loss

    sim.dense_table_max_classes = 1  # rows on the fly
    calls = []
    log_rows = sim.log_rows
    sim.log_rows = lambda labels: calls.append(1) or log_rows(labels)
    logits = np.random.default_rng(0).normal(size=(4, 12)).astype("float32")
    labels = np.array([0, 3, 5, 11])
    value_and_gradient(
        lambda z: ops.sum(sim_loss(labels, z, sim, from_logits=True)), logits
    )
    assert len(calls) == (1 if keep_rows else 2)
