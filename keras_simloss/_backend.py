"""Backend plumbing: the few places where TensorFlow, JAX and PyTorch differ.

Everything else in the package is written with `keras.ops`. What is here:

- tensors made once and reused across traced functions (`eager_tensor`),
  and reading values where they are concrete (`concrete_value`);
- a gradient defined in closed form with exactly the residuals given
  (`with_gradient`);
- data-parallel replica and device counts (`num_replicas`,
  `data_parallel_shards`), and the blocks of a class axis that a
  distribution may shard (`class_blocks`);
- a workaround for Keras's multi-worker TensorFlow trainer
  (`multi_worker`, `build_from_local_batch`);
- whether Keras is writing a legacy `.h5` file (`saving_legacy_h5`).

The last two read Keras internals that have no public API; tests fail
loudly when Keras changes them.
"""

import keras
import numpy as np
from keras import ops


def backend():
    return keras.config.backend()


# Tensors ---------------------------------------------------------------------


def as_tensor(x):
    """`x` as a tensor; on TensorFlow a `tf.Variable` is read (some ops need
    a tensor's `ndim`, which a variable lacks)."""
    x = ops.convert_to_tensor(x)
    if backend() == "tensorflow":
        import tensorflow as tf

        if isinstance(x, tf.Variable):
            x = tf.convert_to_tensor(x)
    return x


def eager_tensor(name, array):
    """`array` as a backend tensor created outside any traced function.

    A tensor cached for reuse outlives the trace that first asked for it, so
    it is always created outside every trace (a tensor made inside one would
    leak, e.g. JAX's `UnexpectedTracerError`):

    - TensorFlow: a non-trainable `tf.Variable` made under `tf.init_scope`.
      A traced or XLA function reads it as an input instead of embedding a
      copy of the array as a constant in the graph and in every compiled
      program.
    - JAX: a concrete array made under `jax.ensure_compile_time_eval`.
    - PyTorch: a plain tensor, made outside `torch.compile`'s graph.
    """
    name_of_backend = backend()
    if name_of_backend == "tensorflow":
        import tensorflow as tf

        with tf.init_scope():
            return tf.Variable(array, trainable=False, name=name)
    if name_of_backend == "jax":
        import jax

        with jax.ensure_compile_time_eval():
            return ops.convert_to_tensor(array)
    if name_of_backend == "torch":
        import torch

        # On Keras's default device, named explicitly: the first call may
        # come from Keras's symbolic build, which runs under the "meta"
        # device (shapes only, no values), and a cached meta tensor would
        # give garbage later. A graph break on the first call only: the
        # tensor is made eagerly and `torch.compile` then reads it like any
        # other captured tensor.
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return torch.compiler.disable(torch.as_tensor)(array, device=device)
    return ops.convert_to_tensor(array)


def concrete_value(x):
    """Returns `x` as a NumPy array when it holds concrete values, else `None`.

    Inside a traced function (`tf.function`, XLA, `jax.jit`,
    `torch.compile`) tensors are symbolic and their values are unknown;
    checks that need values (labels in range, one-hot rows) can then only run
    in eager mode.
    """
    if isinstance(x, np.ndarray):
        return x
    name = backend()
    if name == "tensorflow":
        import tensorflow as tf

        if not tf.executing_eagerly() or not hasattr(x, "numpy"):
            return None
        return x.numpy()
    if name == "jax":
        import jax

        if isinstance(x, jax.core.Tracer):
            return None
    if name == "torch":
        import torch

        if torch.compiler.is_compiling():
            return None
        if isinstance(x, torch.Tensor) and x.device.type == "meta":
            return None
    if isinstance(x, keras.KerasTensor):
        return None
    try:
        return ops.convert_to_numpy(x)
    except Exception:  # a symbolic tensor of another kind
        return None


# Gradients -------------------------------------------------------------------


def with_gradient(forward, backward, inputs, labels):
    """`forward(inputs, labels)[0]` with a gradient defined in closed form.

    `forward(inputs, labels)` returns `(value, residuals)`;
    `backward(inputs, labels, residuals, upstream)` returns the gradient
    with respect to `inputs` (labels have none). Only `inputs`, `labels` and
    `residuals` are kept for the backward pass, which computes everything
    else itself. JAX gets an explicit `jax.custom_vjp` with exactly these
    residuals, rather than `jax.custom_gradient` (what
    `keras.ops.custom_gradient` uses), whose residuals are whatever its
    backward rule closes over; elsewhere `keras.ops.custom_gradient`. (As
    for any `custom_vjp`, JAX's forward-mode differentiation, `jax.jvp`,
    does not apply; `jax.grad` and its nestings do.)
    """
    if backend() == "jax":
        import jax

        @jax.custom_vjp
        def function(inputs, labels):
            return forward(inputs, labels)[0]

        def function_forward(inputs, labels):
            value, residuals = forward(inputs, labels)
            return value, (inputs, labels, residuals)

        def function_backward(saved, upstream):
            inputs, labels, residuals = saved
            return backward(inputs, labels, residuals, upstream), None

        function.defvjp(function_forward, function_backward)
        return function(inputs, labels)

    @ops.custom_gradient
    def function(inputs, labels):
        value, residuals = forward(inputs, labels)

        def gradient(*args, upstream=None):
            upstream = args[0] if upstream is None else upstream
            return backward(inputs, labels, residuals, upstream), None

        return value, gradient

    return function(inputs, labels)


# Data parallelism ------------------------------------------------------------


def num_replicas():
    """Replicas in sync under `tf.distribute` (1 on other backends).

    Under `tf.distribute` each replica runs the step on its local batch and
    Keras divides the loss by this number before summing gradients.
    """
    if backend() != "tensorflow":
        return 1
    import tensorflow as tf

    return tf.distribute.get_strategy().num_replicas_in_sync


def data_parallel_shards():
    """Devices the batch is split over by `keras.distribution` (JAX), else 1.

    Under `keras.distribution.DataParallel` the step runs once over the
    global batch, laid out across devices (SPMD): this is the number of
    per-device slices of it.
    """
    if backend() != "jax":
        return 1
    distribution = keras.distribution.distribution()
    if distribution is None:
        return 1
    mesh = distribution.device_mesh
    batch_axis = getattr(distribution, "batch_dim_name", None)
    if batch_axis not in mesh.axis_names:
        return 1
    return int(mesh.shape[list(mesh.axis_names).index(batch_axis)])


def class_blocks(num_classes):
    """Blocks of the class axis a computation along it should keep apart.

    Under a `keras.distribution` on JAX whose mesh has axes besides the
    batch axis (`ModelParallel`, where `keras_simloss.sharding` lays the
    classes out), the product `n` of those axes' sizes when it divides
    `num_classes`, else 1. A scan over the classes cut into `n` equal blocks
    (a reshape to `(..., n, C / n)`, a scan within each block, and a scan of
    the `n` block totals) keeps each block on the device that holds it,
    where XLA's partitioner would gather a whole sharded row for one scan
    over all `C`. Whether the classes are sharded at all does not matter for
    the numbers: the blocked scan gives the same ones.
    """
    if backend() != "jax":
        return 1
    distribution = keras.distribution.distribution()
    if distribution is None:
        return 1
    mesh = distribution.device_mesh
    batch_axis = getattr(distribution, "batch_dim_name", None)
    blocks = 1
    for name, size in zip(mesh.axis_names, mesh.shape):
        if name != batch_axis:
            blocks *= int(size)
    return blocks if blocks > 1 and num_classes % blocks == 0 else 1


def all_gather_replicas(features):
    """`features` of every `tf.distribute` replica, concatenated on axis 0.

    Returns `None` outside a replica context (Keras's symbolic build).
    """
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    if context is None:
        return None
    return context.all_gather(features, axis=0)


# Multi-worker TensorFlow -----------------------------------------------------


def multi_worker(strategy=None):
    """Whether `strategy` (default: the current one) spans several workers."""
    if backend() != "tensorflow":
        return False
    import tensorflow as tf

    strategy = strategy or tf.distribute.get_strategy()
    resolver = getattr(strategy, "cluster_resolver", None)
    if (
        not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
        or resolver is None
    ):
        return False
    return len(resolver.cluster_spec().as_dict().get("worker", [])) > 1


def build_from_local_batch(model, iterator):
    """Workaround for keras-team/keras#20585 (open as of Keras 3.15).

    Under `MultiWorkerMirroredStrategy`, Keras's TensorFlow trainer builds
    metrics and optimizer from the first batch after reducing its
    per-replica values with `strategy.reduce`, which fails on a `PerReplica`
    batch before the first step. Building from the first replica's local
    batch instead needs no cross-worker call and gives the same shapes.

    It calls two private methods of `keras.Model` (`_maybe_symbolic_build`
    is overridden by the caller, `_symbolic_build` called here);
    `tests/distillation/test_distributed.py` checks their signatures, so a
    Keras change fails loudly.
    """
    import tensorflow as tf

    strategy = model._distribute_strategy
    for _, _, batches in iterator:
        batch = next(batches)
        break
    local_batch = keras.tree.map_structure(
        lambda value: (
            strategy.experimental_local_results(value)[0]
            if isinstance(value, tf.distribute.DistributedValues)
            else value
        ),
        batch,
    )
    with strategy.scope():
        model._symbolic_build(data_batch=local_batch)


# Saving ------------------------------------------------------------------------


def saving_legacy_h5():
    """Whether Keras is writing a legacy `.h5` file, which has no archive.

    Keras's own `Sequential` and `Functional` read the same flag to write
    their legacy configs. It has no public API: a Keras without it counts as
    "no", and `test_legacy_h5_refuses_a_similarity_whose_arrays_need_an_archive`
    then fails, so the change does not go unnoticed.
    """
    try:
        from keras.src.backend.common import global_state
    except ImportError:
        return False
    return bool(global_state.get_global_attribute("use_legacy_config", False))
