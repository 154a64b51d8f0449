"""Test helpers: serialization round trips and `.keras` save / reload."""

import importlib.util
import json
import os
import re

import keras
import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def assert_config_round_trip(obj):
    """`get_config` is JSON-native and `from_config` rebuilds an equal config.

    Returns the rebuilt object and the serialized config.
    """
    serialized = keras.saving.serialize_keras_object(obj)
    text = json.dumps(serialized)  # raises on anything that is not JSON-native
    rebuilt = keras.saving.deserialize_keras_object(json.loads(text))
    assert type(rebuilt) is type(obj)
    assert json.dumps(keras.saving.serialize_keras_object(rebuilt)) == text
    return rebuilt, serialized


def save_and_reload(model, tmp_path, name="model.keras"):
    """Saves `model` as `.keras` and loads it back with no custom_objects."""
    path = os.path.join(tmp_path, name)
    model.save(path)
    return keras.models.load_model(path)


def softmax(logits):
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


BACKEND = keras.config.backend()

# `jit_compile=True` means XLA on TensorFlow and JAX; on PyTorch it means
# `torch.compile`, which is not what these tests are about.
JIT_COMPILE = BACKEND in ("tensorflow", "jax")


def compile_function(function):
    """`function` compiled as the backend would inside `fit`: XLA where there
    is one (`tf.function(jit_compile=True)`, `jax.jit`), eager on PyTorch."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return tf.function(function, jit_compile=True)
    if BACKEND == "jax":
        import jax

        return jax.jit(function)
    return function


def graph_function(function):
    """`function` traced without XLA (TensorFlow's graph mode), else jitted."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return tf.function(function)
    return compile_function(function)


def value_and_gradient(function, x):
    """`(f(x), df/dx)` as NumPy, for a scalar `function` of one array `x`."""
    x = np.asarray(x, np.float32)
    if BACKEND == "tensorflow":
        import tensorflow as tf

        variable = tf.Variable(x)
        with tf.GradientTape() as tape:
            value = function(variable)
        return np.asarray(value), tape.gradient(value, variable).numpy()
    if BACKEND == "jax":
        import jax

        value, gradient = jax.value_and_grad(function)(jax.numpy.asarray(x))
        return np.asarray(value), np.asarray(gradient)
    import torch

    tensor = torch.tensor(x, requires_grad=True)
    value = function(tensor)
    value.backward()
    return value.detach().cpu().numpy(), tensor.grad.detach().cpu().numpy()


def to_numpy(x):
    return keras.ops.convert_to_numpy(x)


def labelled_logits(seed, num_classes, n):
    """`(labels, logits, sample weights)` of `n` examples: about half the
    predictions right (so metrics see both branches), the first three
    weights 0."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, num_classes, size=n)
    logits = rng.normal(size=(n, num_classes)).astype(np.float32)
    right = rng.uniform(size=n) < 0.5
    logits[right, y[right]] += 10.0
    weights = rng.uniform(0.0, 2.0, size=n).astype(np.float32)
    weights[:3] = 0.0
    return y, logits, weights


def autodiff_sim_loss(sim, labels, y_pred, from_logits=True):
    """SimLoss written plainly with `keras.ops` on the similarity's public
    rows and differentiated by the backend's automatic differentiation: the
    reference for the library's closed-form gradients.

    From logits `-logsumexp(log_softmax(z) + log S[y])`; from probabilities
    `-log(sum_c S[y, c] clip(p)_c / sum_c clip(p)_c)`, as `sim_loss`.
    """
    labels = keras.ops.convert_to_tensor(np.asarray(labels, np.int32))
    y_pred = keras.ops.cast(y_pred, "float32")
    if from_logits:
        terms = keras.ops.log_softmax(y_pred, axis=-1) + sim.log_rows(labels)
        return -keras.ops.logsumexp(terms, axis=-1)
    epsilon = keras.config.epsilon()
    clipped = keras.ops.clip(y_pred, epsilon, 1.0 - epsilon)
    total = keras.ops.sum(clipped, axis=-1, keepdims=True)
    return -keras.ops.log(keras.ops.sum(sim.rows(labels) * clipped / total, axis=-1))


EXAMPLES = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"
)


def load_example(name):
    """The module `examples/<name>.py`, loaded from its file."""
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(EXAMPLES, f"{name}.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# A snippet that starts with this line sets up its own backend and devices,
# so it runs in a process of its own (`tests/test_sharding.py`), not in
# `tests/test_examples.py`'s namespace.
SCRIPT_OF_ITS_OWN = "# A script of its own"


def readme_snippets(scripts=False):
    with open(os.path.join(REPO_ROOT, "README.md"), encoding="utf-8") as handle:
        text = handle.read()
    snippets = re.findall(r"^```python\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
    return [s for s in snippets if s.startswith(SCRIPT_OF_ITS_OWN) == scripts]
