"""Similarity-preserving knowledge distillation (SP).

Inputs the teacher sees as similar should look similar to the student too, in
the student's own activation space: the student matches the teacher's
batch-wise similarity (Gram) matrices, not its activations, so teacher and
student layers may differ in shape, channels and spatial size.

- `similarity_preserving_loss`: the pure loss for one pair of activations.
- `SimilarityPreserving`: the same as a `keras.distillation.DistillationLoss`,
  for Keras's own `keras.distillation.Distiller`.
- `Distiller`: a `keras.Model` that trains a student from a frozen teacher
  with the compiled student loss (any Keras loss, `SimLoss` included)
  `+ gamma * sum of SP over layer pairs`, optionally plus Hinton logit
  distillation, running the student once per step, on every Keras backend.

Reference:
    Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019.
    https://arxiv.org/abs/1907.09682
"""

import contextlib
import inspect
import logging

import keras
from keras import ops

from keras_simloss import _utils

__all__ = [
    "Distiller",
    "SimilarityPreserving",
    "auto_layer_pairs",
    "resolution_stages",
    "similarity_preserving_loss",
]

logger = logging.getLogger(__name__)


def _check_features(features, name):
    """Features must be one tensor with a non-empty batch axis."""
    if isinstance(features, (list, tuple, dict)):
        raise ValueError(
            f"Invalid value for argument `{name}`. Expected one tensor of "
            f"shape (batch, ...). Received: a {type(features).__name__} of "
            f"{len(features)} items (a layer or model with several outputs; "
            "pick a layer whose output is a single tensor)"
        )
    if not hasattr(features, "shape"):
        features = ops.convert_to_tensor(features)
    if len(features.shape) < 1:
        raise ValueError(
            f"Invalid value for argument `{name}`. Expected a tensor of shape "
            f"(batch, ...) with a batch axis. Received: {name}.shape="
            f"{tuple(features.shape)}"
        )
    if features.shape[0] == 0:
        raise ValueError(
            f"Invalid value for argument `{name}`. Expected a batch of at "
            f"least one example. Received: {name}.shape={tuple(features.shape)}"
        )
    return features


def check_same_batch(teacher_features, student_features, context=""):
    """Raises a `ValueError` when the two batch sizes are known and differ."""
    teacher_batch = teacher_features.shape[0]
    student_batch = student_features.shape[0]
    if (
        teacher_batch is not None
        and student_batch is not None
        and teacher_batch != student_batch
    ):
        raise ValueError(
            "Teacher and student activations must have the same batch size "
            f"(the Gram matrices are batch x batch){context}. Received: "
            f"teacher_features.shape={tuple(teacher_features.shape)}, "
            f"student_features.shape={tuple(student_features.shape)}"
        )


def _normalized_gram(features, groups):
    """Row-normalised Gram matrices of `groups` equal slices of the batch.

    Returns float32 of shape `(groups, b / groups, b / groups)`.
    """
    # float32 whatever the policy: a Gram of float16 activations overflows.
    features = ops.cast(features, "float32")
    # SP is invariant to a positive scale of the activations, so divide by
    # their largest magnitude first: the Gram's entries and their squares
    # then stay far from float32 overflow (activations of 1e20) and
    # underflow (1e-20). The scale is a constant for the gradient, which is
    # exact because the loss does not depend on it.
    scale = ops.stop_gradient(ops.max(ops.abs(features)))
    features = features / ops.maximum(scale, 1e-30)
    flat = ops.reshape(features, (groups, ops.shape(features)[0] // groups, -1))
    gram = ops.matmul(flat, ops.transpose(flat, (0, 2, 1)))
    # Row L2 normalisation. An all-zero row (dead ReLUs) stays zero, and
    # the guard sits before the square root and in both branches of the
    # `where`: sqrt has no derivative at 0 (NaN on JAX), and dividing by an
    # epsilon instead gives that row a gradient of about 1 / epsilon (1e10
    # and more, inf in float16). The loss jumps at a zero row (any nearby row
    # normalises to a unit vector), so it has no derivative there; the
    # gradient through the dead row's own normalisation is defined as 0.
    squared_norm = ops.sum(ops.square(gram), axis=-1, keepdims=True)
    alive = squared_norm > 0.0
    inverse_norm = ops.where(alive, ops.rsqrt(ops.where(alive, squared_norm, 1.0)), 0.0)
    return gram * inverse_norm


def _sp_loss(teacher_features, student_features, groups=1):
    difference = _normalized_gram(teacher_features, groups) - _normalized_gram(
        student_features, groups
    )
    local_batch = ops.cast(ops.shape(difference)[-1], "float32")
    # Per slice ||.||_F^2 / b^2, averaged over the slices.
    return ops.mean(ops.sum(ops.square(difference), axis=(1, 2))) / ops.square(
        local_batch
    )


def similarity_preserving_loss(teacher_features, student_features):
    """Similarity-preserving distillation loss for one pair of activations.

    With `Q_T`, `Q_S` the activations reshaped to `(b, -1)`:

        G_T = normalize_rows(Q_T Q_T^T),  G_S = normalize_rows(Q_S Q_S^T)
        L_SP = || G_T - G_S ||_F^2 / b^2

    Properties: 0 when both activations are equal; unchanged when either is
    multiplied by a positive scalar (over the whole float32 range: the
    activations are rescaled before the products); independent of the memory
    layout of the non-batch axes (NHWC or NCHW); at most `4 / b`. Computed
    in float32. An all-zero activation row (dead ReLUs) gives a zero Gram
    row; the gradient through that row's own normalisation is 0 (the loss
    has no derivative there), so gradients stay finite, also in float16.

    Args:
        teacher_features: teacher activations, shape `(b, ...)`, any rank
            >= 1, `b >= 1`.
        student_features: student activations, shape `(b, ...)`; other axes
            may differ from the teacher's.

    Returns:
        A float32 scalar.

    Example:

    >>> import numpy as np
    >>> t = np.array([[1.0, 0.0], [0.0, 1.0]])
    >>> s = np.array([[1.0, 1.0], [1.0, 1.0]])
    >>> # G_T = I, G_S rows = [1, 1] / sqrt(2):
    >>> # 2 * ((1 - 1/sqrt(2))^2 + (1/sqrt(2))^2) / 2^2 = 0.292893
    >>> round(float(similarity_preserving_loss(t, s)), 6)
    0.292893

    Reference:
        Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV
        2019, Eq. 3-4. https://arxiv.org/abs/1907.09682
    """
    teacher_features = _check_features(teacher_features, "teacher_features")
    student_features = _check_features(student_features, "student_features")
    check_same_batch(teacher_features, student_features)
    return _sp_loss(teacher_features, student_features)


@_utils.register
class SimilarityPreserving(keras.distillation.DistillationLoss):
    """SP loss between a teacher layer and a student layer.

    A `keras.distillation.DistillationLoss`, so it plugs into Keras's own
    `keras.distillation.Distiller` (which finds the layers through
    `teacher_layer_name` / `student_layer_name`). Weight it there with
    `distillation_loss_weights`; the paper used `gamma = 3000`.

    Args:
        teacher_layer_name: name of the teacher layer whose output is used.
        student_layer_name: name of the student layer whose output is used.

    Example:

    ```python
    distiller = keras.distillation.Distiller(
        teacher, student,
        distillation_losses=[SimilarityPreserving("block3", "block3")],
        distillation_loss_weights=[3000.0],
    )
    ```
    """

    def __init__(self, teacher_layer_name, student_layer_name):
        for argument, value in (
            ("teacher_layer_name", teacher_layer_name),
            ("student_layer_name", student_layer_name),
        ):
            if not isinstance(value, str) or not value:
                raise ValueError(
                    f"Invalid value for argument `{argument}`. Expected a "
                    f"layer name. Received: {argument}={value!r}"
                )
        self.teacher_layer_name = teacher_layer_name
        self.student_layer_name = student_layer_name

    def validate_model_compatibility(self, teacher, student):
        find_layer(teacher, self.teacher_layer_name, "teacher")
        find_layer(student, self.student_layer_name, "student")

    def validate_outputs(self, teacher_outputs, student_outputs):
        teacher_outputs = _check_features(teacher_outputs, "teacher_outputs")
        student_outputs = _check_features(student_outputs, "student_outputs")
        check_same_batch(teacher_outputs, student_outputs)

    def compute_loss(self, teacher_outputs, student_outputs, **kwargs):
        return similarity_preserving_loss(teacher_outputs, student_outputs)

    def get_config(self):
        return {
            "teacher_layer_name": self.teacher_layer_name,
            "student_layer_name": self.student_layer_name,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def _named_layers(model, prefix=""):
    """`(path, layer)` for every layer of `model`, nested models included."""
    for layer in model.layers:
        path = f"{prefix}{layer.name}"
        yield path, layer
        if isinstance(layer, keras.Model):
            yield from _named_layers(layer, prefix=f"{path}/")


def find_layer(model, name, role="model"):
    """Finds a layer by name, searching nested models too.

    `name` is a layer name (unique across the nesting) or a path such as
    `"backbone/block3"`. Raises a `ValueError` listing what is available.
    """
    layers = list(_named_layers(model))
    matches = [layer for path, layer in layers if path == name]
    if not matches and "/" not in name:
        matches = [layer for path, layer in layers if path.rsplit("/", 1)[-1] == name]
        if len(matches) > 1:
            paths = [path for path, layer in layers if path.rsplit("/", 1)[-1] == name]
            raise ValueError(
                f"Layer name {name!r} is ambiguous in the {role} "
                f"{model.name!r}; use a path. Candidates: {paths}"
            )
    if not matches:
        raise ValueError(
            f"No layer named {name!r} in the {role} {model.name!r}. Available "
            f"layers: {[path for path, _ in layers]}"
        )
    return matches[0]


@contextlib.contextmanager
def _recording_outputs(layers):
    """Records the outputs of `layers` while the block runs.

    Each layer's `call` is wrapped on the instance for the duration of the
    block and restored afterwards. This is what lets one forward pass of a
    model return its intermediate activations for any model kind
    (Sequential, Functional, nested backbones, subclassed) on any backend,
    where a multi-output functional view cannot reach inside nested models.
    """
    outputs = {}
    originals = {}
    try:
        for layer in layers.values():
            if id(layer) in originals:
                continue
            original = layer.__dict__.get("call")
            originals[id(layer)] = (layer, original)
            keys = [k for k, candidate in layers.items() if candidate is layer]
            bound_call = layer.call

            def recording_call(*args, _bound=bound_call, _keys=keys, **kwargs):
                result = _bound(*args, **kwargs)
                for k in _keys:
                    if k in outputs:
                        raise ValueError(
                            f"Layer {k!r} is called more than once in a forward "
                            "pass (a shared layer); its activations are "
                            "ambiguous. Pick a layer that runs once."
                        )
                    outputs[k] = result
                return result

            # Keras reads the call signature once at construction; the wrapper
            # forwards every argument unchanged.
            object.__setattr__(layer, "call", recording_call)
        yield outputs
    finally:
        for layer, original in originals.values():
            if original is None:
                object.__delattr__(layer, "call")
            else:
                object.__setattr__(layer, "call", original)


def _num_replicas():
    """Replicas in sync under `tf.distribute` (1 on other backends).

    Under `tf.distribute` each replica runs the step on its local batch and
    Keras divides the loss by this number before summing gradients.
    """
    if keras.config.backend() != "tensorflow":
        return 1
    import tensorflow as tf

    return tf.distribute.get_strategy().num_replicas_in_sync


def _data_parallel_shards():
    """Devices the batch is split over by `keras.distribution` (JAX), else 1.

    Under `keras.distribution.DataParallel` the step runs once over the
    global batch, laid out across devices (SPMD): this is the number of
    per-device slices of it.
    """
    if keras.config.backend() != "jax":
        return 1
    distribution = keras.distribution.distribution()
    if distribution is None:
        return 1
    mesh = distribution.device_mesh
    batch_axis = getattr(distribution, "batch_dim_name", None)
    if batch_axis not in mesh.axis_names:
        return 1
    return int(mesh.shape[list(mesh.axis_names).index(batch_axis)])


def _multi_worker(strategy=None):
    """Whether `strategy` (default: the current one) spans several workers."""
    if keras.config.backend() != "tensorflow":
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


def _input_shapes(model):
    inputs = getattr(model, "inputs", None)
    if not inputs:
        return None
    return [tuple(tensor.shape[1:]) for tensor in inputs]


# Layers that only rescale or gate their input element-wise. A stage's
# representative layer is its last layer that is not one of these, so that
# the output of a residual group is chosen rather than the normalisation
# and activation that follow it (pre-activation networks).
_ELEMENTWISE_LAYERS = (
    keras.layers.Activation,
    keras.layers.BatchNormalization,
    keras.layers.Dropout,
    keras.layers.ELU,
    keras.layers.GroupNormalization,
    keras.layers.LayerNormalization,
    keras.layers.LeakyReLU,
    keras.layers.PReLU,
    keras.layers.ReLU,
    keras.layers.Softmax,
    keras.layers.SpatialDropout2D,
)


def _output_shape(layer):
    try:
        output = layer.output
    except (AttributeError, ValueError, RuntimeError):
        return None  # no symbolic output (subclassed) or a shared layer
    if isinstance(output, (list, tuple, dict)):
        return None
    return tuple(output.shape)


def resolution_stages(model):
    """`{spatial shape: last layer path}` of a model, in forward order.

    A stage is a run of layers whose outputs have the same spatial size
    (an image's height and width, a volume's three axes: outputs of rank 4
    or more); its representative is the last layer of the run that is not an
    element-wise normalisation, activation or dropout layer. Layers inside
    nested models are visited with their paths (`"backbone/block3"`).
    Subclassed models, whose layers have no symbolic outputs, have no stages.
    """
    channels_first = keras.config.image_data_format() == "channels_first"
    stages = {}
    order = []

    def visit(container, prefix):
        for layer in container.layers:
            path = f"{prefix}{layer.name}"
            if isinstance(layer, keras.Model) and layer.layers:
                visit(layer, f"{path}/")
                continue
            shape = _output_shape(layer)
            if (
                shape is None
                or len(shape) < 4
                or isinstance(layer, keras.layers.InputLayer)
            ):
                continue
            spatial = shape[2:] if channels_first else shape[1:-1]
            if spatial not in stages:
                order.append(spatial)
                stages[spatial] = None
            if not isinstance(layer, _ELEMENTWISE_LAYERS) or stages[spatial] is None:
                stages[spatial] = path

    visit(model, "")
    return {spatial: stages[spatial] for spatial in order}


def auto_layer_pairs(teacher, student):
    """SP layer pairs matched by spatial resolution (`layer_pairs="auto"`).

    For each spatial size that both models have (see `resolution_stages`),
    pairs the teacher's representative layer with the student's, in the
    teacher's order. For WideResNets these are the outputs of the residual
    groups, the last of which is the paper's choice.

    Raises:
        ValueError: when no spatial size is shared, listing both models'.
    """
    teacher_stages = resolution_stages(teacher)
    student_stages = resolution_stages(student)
    pairs = [
        (name, student_stages[spatial])
        for spatial, name in teacher_stages.items()
        if spatial in student_stages
    ]
    if not pairs:
        raise ValueError(
            'Invalid value for argument `layer_pairs`: "auto" pairs teacher and '
            "student layers whose outputs have the same spatial size, and these "
            "models share none (auto needs functional or sequential models "
            "with image-like activations). Give the pairs by name. Received: "
            f"teacher stages {_describe(teacher_stages)}, student stages "
            f"{_describe(student_stages)}"
        )
    return pairs


def _describe(stages):
    return {"x".join(str(d) for d in spatial): name for spatial, name in stages.items()}


def _check_layer_pairs(layer_pairs):
    message = (
        'Invalid value for argument `layer_pairs`. Expected "auto" or a list '
        "of (teacher_layer_name, student_layer_name) pairs of strings. "
        "Received: "
    )
    if isinstance(layer_pairs, str) or not isinstance(layer_pairs, (list, tuple)):
        raise ValueError(f"{message}layer_pairs={layer_pairs!r}")
    pairs = []
    for pair in layer_pairs:
        if (
            isinstance(pair, str)
            or not isinstance(pair, (list, tuple))
            or len(pair) != 2
            or not all(isinstance(n, str) and n for n in pair)
        ):
            raise ValueError(f"{message}{pair!r} in layer_pairs={layer_pairs!r}")
        pairs.append((pair[0], pair[1]))
    return pairs


# Largest allowed weights: beyond them the weighted loss and its gradients
# leave the range where float32 training makes sense (the paper's gamma is
# 3000; Hinton's temperatures are 1 to 20).
_MAX_GAMMA = 1e6
_MAX_TEMPERATURE = 100.0


@_utils.register
class Distiller(keras.Model):
    """Trains a student from a frozen teacher with similarity preservation.

    Training loss (per replica batch):

        L = (1 - alpha) * L_student(y, z_S)
            + alpha * T^2 * KL(softmax(z_T / T) || softmax(z_S / T))
            + gamma * sum over layer pairs of L_SP(teacher layer, student layer)

    `L_student` is the loss given to `compile` (any Keras loss, `SimLoss`
    included, with sample and class weights; regularisation losses of the
    student are part of it), and `L_SP` is `similarity_preserving_loss`.
    With `alpha = 0` (the default) the logit term is off; `alpha > 0` gives
    the paper's KD+SP setting. The KD term is weighted per example by the
    sample (and class) weights as the compiled loss is; the SP term compares
    pairs of examples and is not weighted.

    The step is Keras's own on every backend (TensorFlow, JAX, PyTorch): the
    distiller's `call` runs the student once and records the activations of
    the chosen layers on that pass, and `compute_loss` adds the teacher's
    forward pass (inference mode, no gradient) and the distillation terms.
    So the student runs once per step (batch-norm statistics move once),
    where `keras.distillation.Distiller` runs it twice. Only the student's
    weights change. The compiled metrics see the student's predictions;
    `predict` and `call` are the student's. History reports `loss` (the
    total), `student_loss`, `sp_loss` and, when on, `kd_loss`, for training
    and validation alike.

    Layers are named per model, nested models included (`"block3"` when
    unique, else a path such as `"backbone/block3"`). Models with several
    outputs (a list or dict) work: the compiled loss and metrics see the
    whole structure as in any Keras model, and the KD term uses the output
    named by `logits_output`, or, by default, every output (the teacher's
    and the student's outputs must then have the same structure, as in
    `keras.distillation.LogitsDistillation`), summed. Unbuilt students and
    teachers are built by Keras from the first batch.

    Data parallelism: with `gram_batch="replica"` (the default) the Gram
    matrices cover each replica's (or device's) slice of the batch, as in
    single-device training with a batch of that size; with
    `gram_batch="global"` they cover the global batch. Under
    `tf.distribute` that costs one all-gather per layer; under
    `keras.distribution.DataParallel` (JAX) the step already sees the
    global batch, and `"replica"` splits it into the per-device slices.

    Args:
        teacher: a `keras.Model`. It is frozen (`trainable = False`).
        student: a `keras.Model` with the same inputs as the teacher.
        layer_pairs: list of `(teacher_layer_name, student_layer_name)`, or
            `"auto"`: pair the last layer of each spatial-resolution stage
            of the teacher with the student's stage of the same resolution
            (see `auto_layer_pairs`; functional and sequential models, nested
            ones included). The chosen pairs are in `distiller.layer_pairs`
            and logged once (logger `keras_simloss.distillation`, INFO).
        gamma: weight of the SP term, `0 <= gamma <= 1e6`. Defaults to
            `3000.0` (the paper's CIFAR-10 setting).
        alpha: weight of the logit-distillation term in `[0, 1]`; the
            student loss gets `1 - alpha`. Defaults to `0.0` (off).
        temperature: softmax temperature of the logit term,
            `0 < temperature <= 100`. Defaults to `4.0`. Both models must
            output logits when `alpha > 0`.
        gram_batch: `"replica"` or `"global"`, see above. Defaults to
            `"replica"`.
        logits_output: for models with several outputs, the key (dict) or
            index (list) of the logits used by the KD term. Defaults to
            `None`: every output.
        name: Defaults to `"distiller"`.

    Example:

    ```python
    distiller = Distiller(teacher, student, layer_pairs=[("group3", "group3")])
    distiller.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        jit_compile=True,
    )
    distiller.fit(train_data, validation_data=val_data, epochs=10)
    distiller.student.save("student.keras")
    ```

    Reference:
        Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV
        2019. https://arxiv.org/abs/1907.09682
    """

    def __init__(
        self,
        teacher,
        student,
        layer_pairs=(),
        gamma=3000.0,
        alpha=0.0,
        temperature=4.0,
        gram_batch="replica",
        logits_output=None,
        name="distiller",
        **kwargs,
    ):
        super().__init__(name=name, **kwargs)
        for role, model in (("teacher", teacher), ("student", student)):
            if not isinstance(model, keras.Model):
                raise TypeError(
                    f"Invalid type for argument `{role}`. Expected a "
                    f"keras.Model. Received: {type(model).__name__}"
                )
        teacher_shapes, student_shapes = _input_shapes(teacher), _input_shapes(student)
        if (
            teacher_shapes is not None
            and student_shapes is not None
            and (teacher_shapes != student_shapes)
        ):
            raise ValueError(
                "Teacher and student must take the same inputs. Received: "
                f"teacher input shapes {teacher_shapes}, student input "
                f"shapes {student_shapes}"
            )
        self.gamma = _utils.check_number(
            "gamma", gamma, 0.0, _MAX_GAMMA, high_inclusive=True
        )
        self.alpha = _utils.check_number("alpha", alpha, 0.0, 1.0, high_inclusive=True)
        self.temperature = _utils.check_number(
            "temperature",
            temperature,
            0.0,
            _MAX_TEMPERATURE,
            low_inclusive=False,
            high_inclusive=True,
        )
        if gram_batch not in ("replica", "global"):
            raise ValueError(
                "Invalid value for argument `gram_batch`. Expected 'replica' "
                f"or 'global'. Received: gram_batch={gram_batch!r}"
            )
        self.gram_batch = gram_batch
        if logits_output is not None and (
            isinstance(logits_output, bool) or not isinstance(logits_output, (str, int))
        ):
            raise ValueError(
                "Invalid value for argument `logits_output`. Expected None, an "
                "output key (str) or an output index (int). Received: "
                f"logits_output={logits_output!r}"
            )
        self.logits_output = logits_output
        if isinstance(layer_pairs, str) and layer_pairs == "auto":
            pairs = auto_layer_pairs(teacher, student)
            logger.info("Distiller %r: layer_pairs='auto' chose %s", name, pairs)
        else:
            pairs = _check_layer_pairs(layer_pairs)
        self.layer_pairs = pairs
        if not pairs and self.alpha == 0.0:
            raise ValueError(
                "Nothing to distil: `layer_pairs` is empty and `alpha=0` turns "
                "the logit term off. Give at least one (teacher_layer_name, "
                "student_layer_name) pair or set alpha > 0. Received: "
                f"layer_pairs={list(layer_pairs)}, alpha={alpha}"
            )
        if pairs and self.gamma == 0.0 and self.alpha == 0.0:
            raise ValueError(
                "Nothing to distil: gamma=0 turns the SP term off and alpha=0 "
                "the logit term. Received: gamma=0, alpha=0"
            )
        self._teacher_layers = {
            f"pair{i}": find_layer(teacher, t, "teacher")
            for i, (t, _) in enumerate(pairs)
        }
        self._student_layers = {
            f"pair{i}": find_layer(student, s, "student")
            for i, (_, s) in enumerate(pairs)
        }
        self.teacher = teacher
        self.student = student
        self.teacher.trainable = False
        # With both models built, so is the distiller: fit needs no symbolic
        # build (which BackupAndRestore requires). Otherwise Keras builds it
        # from the first batch.
        if teacher.built and student.built:
            self.built = True
        # Trackers of the loss parts that are on; Keras tracks them as the
        # model's metrics (after its own "loss", the total).
        self._student_tracker = keras.metrics.Mean(name="student_loss")
        if pairs:
            self._sp_tracker = keras.metrics.Mean(name="sp_loss")
        if self.alpha > 0:
            self._kd_tracker = keras.metrics.Mean(name="kd_loss")
        # The student's activations of the latest `call`, handed to
        # `compute_loss` of the same step (kept out of Keras's tracking).
        object.__setattr__(self, "_last_pass", None)

    # Forward passes ---------------------------------------------------------

    def _run_recorded(self, model, layers, x, training):
        if not model.built:
            # Build first, outside the recording: building may call layers
            # (symbolically) once more.
            model(x, training=training)
        with _recording_outputs(layers) as recorded:
            outputs = model(x, training=training)
        role = "teacher" if model is self.teacher else "student"
        features = []
        for index, (teacher_name, student_name) in enumerate(self.layer_pairs):
            if f"pair{index}" not in recorded:
                name = teacher_name if role == "teacher" else student_name
                raise ValueError(
                    f"Layer {name!r} of the {role} did not run in its forward "
                    "pass (it is not on the path from the inputs to the "
                    "outputs), so it has no activations to distil."
                )
            features.append(recorded[f"pair{index}"])
        return outputs, features

    def call(self, inputs, training=None):
        y_pred, features = self._run_recorded(
            self.student, self._student_layers, inputs, training
        )
        object.__setattr__(self, "_last_pass", (y_pred, features))
        return y_pred

    def _student_features(self, x, y_pred, training):
        """The activations of the pass that made `y_pred` (run it if unknown)."""
        last_pass = self._last_pass
        object.__setattr__(self, "_last_pass", None)
        if last_pass is not None and last_pass[0] is y_pred:
            return last_pass[1]
        # `compute_loss` called with predictions this distiller did not
        # make in its latest call (e.g. by hand): run the student again.
        return self._run_recorded(self.student, self._student_layers, x, training)[1]

    # Losses -----------------------------------------------------------------

    def _gram_groups(self, features):
        """`(features, groups)` for the SP term, per `gram_batch`."""
        replicas = _num_replicas()
        if self.gram_batch == "global" and replicas > 1:
            import tensorflow as tf

            context = tf.distribute.get_replica_context()
            if context is not None:  # None in Keras's symbolic build
                return context.all_gather(features, axis=0), 1
        shards = _data_parallel_shards()
        if self.gram_batch == "replica" and shards > 1:
            return features, shards
        return features, 1

    def _sp_loss(self, teacher_features, student_features):
        total = 0.0
        for (teacher_name, student_name), t, s in zip(
            self.layer_pairs, teacher_features, student_features
        ):
            t = _check_features(t, f"activations of teacher layer {teacher_name!r}")
            s = _check_features(s, f"activations of student layer {student_name!r}")
            check_same_batch(
                t, s, f" for the pair ({teacher_name!r}, {student_name!r})"
            )
            t, groups = self._gram_groups(t)
            s, _ = self._gram_groups(s)
            total = total + _sp_loss(t, s, groups)
        return total

    def _logits(self, outputs, role):
        if self.logits_output is None:
            return outputs
        try:
            return outputs[self.logits_output]
        except (KeyError, IndexError, TypeError):
            raise ValueError(
                f"Invalid value for argument `logits_output`. The {role}'s "
                f"outputs have no entry {self.logits_output!r}. Received: "
                f"outputs of structure {keras.tree.map_structure(lambda t: tuple(t.shape), outputs)}"
            ) from None

    def _kd_weights(self, sample_weight, outputs):
        """Per-output sample weights for the KD term, or `None`s."""
        flat_outputs = keras.tree.flatten(outputs)
        if sample_weight is None:
            return [None] * len(flat_outputs)
        if self.logits_output is not None and isinstance(
            sample_weight, (dict, list, tuple)
        ):
            sample_weight = sample_weight[self.logits_output]
        weights = keras.tree.flatten(sample_weight)
        if len(weights) == 1:
            return weights * len(flat_outputs)
        if len(weights) != len(flat_outputs):
            raise ValueError(
                "The KD term needs one sample weight per logits output. "
                f"Received: {len(weights)} sample weights for "
                f"{len(flat_outputs)} outputs"
            )
        return weights

    def _kd_loss(self, teacher_outputs, student_outputs, sample_weight):
        teacher_logits = self._logits(teacher_outputs, "teacher")
        student_logits = self._logits(student_outputs, "student")
        try:
            keras.tree.assert_same_structure(teacher_logits, student_logits)
        except (ValueError, TypeError):
            raise ValueError(
                "The KD term (alpha > 0) pairs the teacher's and the student's "
                "logits, so their outputs must have the same structure; pick "
                "one with `logits_output`. Received: teacher outputs "
                f"{keras.tree.map_structure(lambda t: tuple(t.shape), teacher_logits)}, "
                "student outputs "
                f"{keras.tree.map_structure(lambda t: tuple(t.shape), student_logits)}"
            ) from None
        total = 0.0
        for t, s, weight in zip(
            keras.tree.flatten(teacher_logits),
            keras.tree.flatten(student_logits),
            self._kd_weights(sample_weight, student_logits),
        ):
            if t.shape[-1] != s.shape[-1]:
                raise ValueError(
                    "The KD term (alpha > 0) needs teacher and student logits "
                    "over the same classes. Received: teacher logits of shape "
                    f"{tuple(t.shape)}, student logits of shape {tuple(s.shape)}"
                )
            t = ops.cast(t, "float32") / self.temperature
            s = ops.cast(s, "float32") / self.temperature
            teacher_log_probs = ops.log_softmax(t, axis=-1)
            student_log_probs = ops.log_softmax(s, axis=-1)
            kl = ops.sum(
                ops.exp(teacher_log_probs) * (teacher_log_probs - student_log_probs),
                axis=-1,
            )
            if weight is not None:
                # As Keras's "sum_over_batch_size": sum(w * kl) / count, with
                # per-example weights spread over any further axes (time
                # steps, pixels) and a trailing axis of 1 dropped.
                weight = ops.cast(ops.convert_to_tensor(weight), "float32")
                if len(weight.shape) == len(kl.shape) + 1 and weight.shape[-1] == 1:
                    weight = ops.squeeze(weight, -1)
                while len(weight.shape) < len(kl.shape):
                    weight = ops.expand_dims(weight, -1)
                kl = kl * weight
            total = total + self.temperature**2 * ops.mean(kl)
        return total

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        """The total loss of a step, as Keras's trainers call it.

        `y_pred` is the output of this distiller's latest `call`, whose
        student activations are reused; the teacher runs here, in inference
        mode and without gradient.
        """
        if y_pred is None:
            y_pred = self(x, training=training)
        student_features = self._student_features(x, y_pred, training)
        teacher_outputs, teacher_features = self._run_recorded(
            self.teacher, self._teacher_layers, x, False
        )
        teacher_outputs = keras.tree.map_structure(ops.stop_gradient, teacher_outputs)
        teacher_features = [ops.stop_gradient(f) for f in teacher_features]
        # The compiled loss plus regularisers, already divided by the number
        # of replicas, as Keras does before summing gradients across them.
        student_loss = super().compute_loss(
            x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=training
        )
        replicas = _num_replicas()
        sp_loss = (
            self._sp_loss(teacher_features, student_features)
            if self.layer_pairs
            else 0.0
        )
        kd_loss = (
            self._kd_loss(teacher_outputs, y_pred, sample_weight)
            if self.alpha > 0
            else 0.0
        )
        total = (1.0 - self.alpha) * student_loss + (
            self.gamma * sp_loss + self.alpha * kd_loss
        ) / replicas
        batch = ops.shape(keras.tree.flatten(x)[0])[0]
        self._student_tracker.update_state(student_loss * replicas, sample_weight=batch)
        if self.layer_pairs:
            self._sp_tracker.update_state(sp_loss, sample_weight=batch)
        if self.alpha > 0:
            self._kd_tracker.update_state(kd_loss, sample_weight=batch)
        return total

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        logs = super().compute_metrics(x, y, y_pred, sample_weight=sample_weight)
        if _multi_worker():
            # Workaround for a second multi-worker failure in Keras 3.15's
            # TensorFlow trainer (see keras-team/keras#20585): it reduces each
            # log across workers with `strategy.reduce("MEAN", v, axis=0)`,
            # which rejects scalars. Shape (1,) reduces to the same scalar.
            logs = {name: ops.reshape(value, (1,)) for name, value in logs.items()}
        return logs

    @property
    def losses(self):
        # The student's only (its activity and weight regularisation): the
        # teacher's forward pass in `compute_loss` may add activity losses of
        # its own, which are no part of the student's objective. On JAX,
        # Keras sets `_losses_override` to the losses of the stateless call,
        # which runs the student only.
        if self._losses_override:
            return self._losses_override
        return self.student.losses

    # Multi-worker TensorFlow ------------------------------------------------

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Overrides a private Keras method, only under multi-worker
        # tf.distribute; see `_build_from_local_batch`.
        strategy = getattr(self, "_distribute_strategy", None)
        if iterator is not None and _multi_worker(strategy):
            return _build_from_local_batch(self, iterator)
        return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    # Serialization ----------------------------------------------------------

    def get_config(self):
        return {
            "name": self.name,
            "teacher": keras.saving.serialize_keras_object(self.teacher),
            "student": keras.saving.serialize_keras_object(self.student),
            "layer_pairs": [list(pair) for pair in self.layer_pairs],
            "gamma": self.gamma,
            "alpha": self.alpha,
            "temperature": self.temperature,
            "gram_batch": self.gram_batch,
            "logits_output": self.logits_output,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["teacher"] = keras.saving.deserialize_keras_object(config["teacher"])
        config["student"] = keras.saving.deserialize_keras_object(config["student"])
        return cls(**config)


# The private API of Keras's TensorFlow trainer that `_build_from_local_batch`
# relies on; a test checks it is still there, so a Keras change fails loudly.
KERAS_PRIVATE_BUILD_API = {
    "_maybe_symbolic_build": ("self", "iterator", "data_batch"),
    "_symbolic_build": ("self", "iterator", "data_batch"),
}


def keras_private_build_api_changed():
    """Names of the private Keras methods above that changed or disappeared."""
    changed = []
    for method, parameters in KERAS_PRIVATE_BUILD_API.items():
        function = getattr(keras.Model, method, None)
        if (
            function is None
            or tuple(inspect.signature(function).parameters) != parameters
        ):
            changed.append(method)
    return changed


def _build_from_local_batch(model, iterator):
    """Workaround for keras-team/keras#20585 (open as of Keras 3.15).

    Under `MultiWorkerMirroredStrategy`, Keras's TensorFlow trainer builds
    metrics and optimizer from the first batch after reducing its
    per-replica values with `strategy.reduce`, which fails on a `PerReplica`
    batch before the first step. Building from the first replica's local
    batch instead needs no cross-worker call and gives the same shapes.
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
