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
  distillation, running the student once per step.

Reference:
    Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019.
    https://arxiv.org/abs/1907.09682
"""

import contextlib

import keras
from keras import ops

__all__ = ["Distiller", "SimilarityPreserving", "similarity_preserving_loss"]

_PACKAGE = "keras_simloss"
_EPSILON = 1e-12


def _batch_size(features):
    return features.shape[0] if len(features.shape) else None


def check_same_batch(teacher_features, student_features, context=""):
    """Raises a `ValueError` when the two batch sizes are known and differ."""
    teacher_batch = _batch_size(teacher_features)
    student_batch = _batch_size(student_features)
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


def _normalized_gram(features):
    # float32 whatever the policy: a Gram of float16 activations overflows.
    flat = ops.reshape(ops.cast(features, "float32"), (ops.shape(features)[0], -1))
    gram = ops.matmul(flat, ops.transpose(flat))
    # Row L2 normalisation; the epsilon guards all-zero rows (e.g. dead ReLUs).
    norm = ops.sqrt(ops.sum(ops.square(gram), axis=-1, keepdims=True))
    return gram / ops.maximum(norm, _EPSILON)


def similarity_preserving_loss(teacher_features, student_features):
    """Similarity-preserving distillation loss for one pair of activations.

    With `Q_T`, `Q_S` the activations reshaped to `(b, -1)`:

        G_T = normalize_rows(Q_T Q_T^T),  G_S = normalize_rows(Q_S Q_S^T)
        L_SP = || G_T - G_S ||_F^2 / b^2

    Properties: 0 when both activations are equal; unchanged when either is
    multiplied by a positive scalar; independent of the memory layout of the
    non-batch axes (NHWC or NCHW); at most `4 / b`. Computed in float32.

    Args:
        teacher_features: teacher activations, shape `(b, ...)`, any rank.
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
    teacher_features = ops.convert_to_tensor(teacher_features)
    student_features = ops.convert_to_tensor(student_features)
    check_same_batch(teacher_features, student_features)
    difference = _normalized_gram(teacher_features) - _normalized_gram(student_features)
    batch = ops.cast(ops.shape(difference)[0], "float32")
    return ops.sum(ops.square(difference)) / ops.square(batch)


@keras.saving.register_keras_serializable(package=_PACKAGE)
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
    (Sequential, Functional, nested backbones, subclassed), where a
    multi-output functional view cannot reach inside nested models.
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
    """Replicas in sync under `tf.distribute` (1 on other backends)."""
    if keras.config.backend() != "tensorflow":
        return 1
    import tensorflow as tf

    return tf.distribute.get_strategy().num_replicas_in_sync


def _multi_worker():
    """Whether training runs under a multi-worker `tf.distribute` strategy."""
    if keras.config.backend() != "tensorflow":
        return False
    import tensorflow as tf

    strategy = tf.distribute.get_strategy()
    resolver = getattr(strategy, "cluster_resolver", None)
    if (
        not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
        or resolver is None
    ):
        return False
    return len(resolver.cluster_spec().as_dict().get("worker", [])) > 1


def _check_number(name, value, low, high=None, low_inclusive=True):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"Invalid type for argument `{name}`. Expected a number. "
            f"Received: {name}={value!r}"
        )
    above = value >= low if low_inclusive else value > low
    if not above or (high is not None and value > high) or value != value:
        bounds = f"{low} {'<=' if low_inclusive else '<'} {name}"
        if high is not None:
            bounds += f" <= {high}"
        raise ValueError(
            f"Invalid value for argument `{name}`. Expected {bounds}. "
            f"Received: {name}={value}"
        )
    return float(value)


def _input_shapes(model):
    inputs = getattr(model, "inputs", None)
    if not inputs:
        return None
    return [tuple(tensor.shape[1:]) for tensor in inputs]


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Distiller(keras.Model):
    """Trains a student from a frozen teacher with similarity preservation.

    Training loss (per replica batch):

        L = (1 - alpha) * L_student(y, z_S)
            + alpha * T^2 * KL(softmax(z_T / T) || softmax(z_S / T))
            + gamma * sum over layer pairs of L_SP(teacher layer, student layer)

    `L_student` is the loss given to `compile` (any Keras loss, `SimLoss`
    included, with sample and class weights), and `L_SP` is
    `similarity_preserving_loss`. With `alpha = 0` (the default) the logit
    term is off; `alpha > 0` gives the paper's KD+SP setting.

    Each step runs the teacher once in inference mode outside the gradient
    tape, and the student once in training mode: that one pass yields both
    the predictions and the chosen activations (so batch-norm statistics move
    once). Only the student's weights change. The compiled metrics see the
    student's predictions; `predict` and `call` are the student's.
    History reports `loss` (the total), `student_loss`, `sp_loss` and, when on,
    `kd_loss`, for training and validation alike.

    Layers are named per model, nested models included (`"block3"` when
    unique, else a path such as `"backbone/block3"`).

    Under `tf.distribute`, each replica sees its local batch; with
    `gram_batch="replica"` (the default) the Gram matrices cover that local
    batch, as in single-device training with a batch of that size. With
    `gram_batch="global"` the activations are all-gathered across replicas
    first, so the Gram matrices cover the global batch (at the cost of one
    all-gather per layer and a `B x B` Gram).

    Args:
        teacher: a built `keras.Model`. It is frozen (`trainable = False`).
        student: a built `keras.Model` with the same inputs as the teacher.
        layer_pairs: list of `(teacher_layer_name, student_layer_name)`.
        gamma: weight of the SP term, >= 0. Defaults to `3000.0` (the
            paper's CIFAR-10 setting).
        alpha: weight of the logit-distillation term in `[0, 1]`; the
            student loss gets `1 - alpha`. Defaults to `0.0` (off).
        temperature: softmax temperature of the logit term, > 0. Defaults
            to `4.0`. Both models must output logits when `alpha > 0`.
        gram_batch: `"replica"` or `"global"`, see above. Defaults to
            `"replica"`.
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
        self.gamma = _check_number("gamma", gamma, 0.0)
        self.alpha = _check_number("alpha", alpha, 0.0, 1.0)
        self.temperature = _check_number(
            "temperature", temperature, 0.0, low_inclusive=False
        )
        if gram_batch not in ("replica", "global"):
            raise ValueError(
                "Invalid value for argument `gram_batch`. Expected 'replica' "
                f"or 'global'. Received: gram_batch={gram_batch!r}"
            )
        self.gram_batch = gram_batch
        pairs = []
        for pair in layer_pairs:
            if (
                isinstance(pair, str)
                or len(pair) != 2
                or not all(isinstance(n, str) for n in pair)
            ):
                raise ValueError(
                    "Invalid value for argument `layer_pairs`. Expected a "
                    "list of (teacher_layer_name, student_layer_name) pairs. "
                    f"Received: {pair!r}"
                )
            pairs.append((pair[0], pair[1]))
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
        # build (which BackupAndRestore requires, and which fails under
        # MultiWorkerMirroredStrategy, keras-team/keras#20585).
        if teacher.built and student.built:
            self.built = True
        self._total_tracker = keras.metrics.Mean(name="loss")
        self._student_tracker = keras.metrics.Mean(name="student_loss")
        self._sp_tracker = keras.metrics.Mean(name="sp_loss")
        self._kd_tracker = keras.metrics.Mean(name="kd_loss")

    # Forward passes ---------------------------------------------------------

    def call(self, inputs, training=None):
        return self.student(inputs, training=training)

    def _recorded(self, recorded, role):
        """The recorded activations of the pairs, in order."""
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
        return features

    def _teacher_forward(self, x):
        with _recording_outputs(self._teacher_layers) as recorded:
            logits = self.teacher(x, training=False)
        features = [ops.stop_gradient(f) for f in self._recorded(recorded, "teacher")]
        return ops.stop_gradient(logits), features

    def _student_forward(self, x, training):
        with _recording_outputs(self._student_layers) as recorded:
            y_pred = self.student(x, training=training)
        return y_pred, self._recorded(recorded, "student")

    # Losses -----------------------------------------------------------------

    def _gather(self, features):
        if self.gram_batch != "global" or _num_replicas() == 1:
            return features
        import tensorflow as tf

        context = tf.distribute.get_replica_context()
        return context.all_gather(features, axis=0)

    def _sp_loss(self, teacher_features, student_features):
        total = 0.0
        for (teacher_name, student_name), t, s in zip(
            self.layer_pairs, teacher_features, student_features
        ):
            check_same_batch(
                t, s, f" for the pair ({teacher_name!r}, {student_name!r})"
            )
            total = total + similarity_preserving_loss(self._gather(t), self._gather(s))
        return total

    def _kd_loss(self, teacher_logits, student_logits):
        t = ops.cast(teacher_logits, "float32") / self.temperature
        s = ops.cast(student_logits, "float32") / self.temperature
        teacher_log_probs = ops.log_softmax(t, axis=-1)
        student_log_probs = ops.log_softmax(s, axis=-1)
        kl = ops.sum(
            ops.exp(teacher_log_probs) * (teacher_log_probs - student_log_probs),
            axis=-1,
        )
        return self.temperature**2 * ops.mean(kl)

    def _step_losses(self, x, y, sample_weight, training):
        """Forward passes and every loss part; returns (y_pred, total, parts)."""
        teacher_logits, teacher_features = self._teacher_forward(x)
        y_pred, student_features = self._student_forward(x, training)
        # The compiled loss (plus regularisers), already divided by the number
        # of replicas, as Keras does before summing gradients across them.
        student_loss = self.compute_loss(
            x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=training
        )
        replicas = _num_replicas()
        sp_loss = (
            self._sp_loss(teacher_features, student_features)
            if self.layer_pairs
            else 0.0
        )
        kd_loss = self._kd_loss(teacher_logits, y_pred) if self.alpha > 0 else 0.0
        total = (1.0 - self.alpha) * student_loss + (
            self.gamma * sp_loss + self.alpha * kd_loss
        ) / replicas
        parts = {"student": student_loss * replicas, "sp": sp_loss, "kd": kd_loss}
        return y_pred, total, parts

    def _track(self, total, parts, x):
        batch = ops.shape(keras.tree.flatten(x)[0])[0]
        self._total_tracker.update_state(total * _num_replicas(), sample_weight=batch)
        self._student_tracker.update_state(parts["student"], sample_weight=batch)
        if self.layer_pairs:
            self._sp_tracker.update_state(parts["sp"], sample_weight=batch)
        if self.alpha > 0:
            self._kd_tracker.update_state(parts["kd"], sample_weight=batch)

    # Steps (TensorFlow backend: GradientTape) -------------------------------

    def train_step(self, data):
        import tensorflow as tf

        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        # The teacher is frozen, so these are the student's; taken from the
        # distiller, in its order, as Keras builds the optimizer from them when
        # it restores a checkpoint.
        variables = self.trainable_variables
        with tf.GradientTape() as tape:
            y_pred, total, parts = self._step_losses(x, y, sample_weight, training=True)
            # Loss scaling under mixed_float16 (identity otherwise).
            scaled = self.optimizer.scale_loss(total)
        gradients = tape.gradient(scaled, variables)
        self.optimizer.apply_gradients(zip(gradients, variables))
        self._track(total, parts, x)
        return self._step_logs(x, y, y_pred, sample_weight)

    def test_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        y_pred, total, parts = self._step_losses(x, y, sample_weight, training=False)
        self._track(total, parts, x)
        return self._step_logs(x, y, y_pred, sample_weight)

    def _step_logs(self, x, y, y_pred, sample_weight):
        logs = self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
        if _multi_worker():
            # Workaround for a second multi-worker failure in Keras 3.15's
            # TensorFlow trainer (see keras-team/keras#20585): it reduces each
            # log across workers with `strategy.reduce("MEAN", v, axis=0)`,
            # which rejects scalars. Shape (1,) reduces to the same scalar.
            logs = {name: ops.reshape(value, (1,)) for name, value in logs.items()}
        return logs

    def predict_step(self, data):
        x, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        return self.student(x, training=False)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Workaround for keras-team/keras#20585 (open as of Keras 3.15): under
        # MultiWorkerMirroredStrategy, Keras's TensorFlow trainer builds
        # metrics and optimizer from the first batch after reducing its
        # per-replica values with `strategy.reduce`, which fails on a
        # PerReplica batch before the first step. Building from the first
        # replica's local batch instead needs no cross-worker call and gives
        # the same shapes. Everything else goes to Keras unchanged.
        strategy = getattr(self, "_distribute_strategy", None)
        symbolic_build = getattr(self, "_symbolic_build", None)
        if strategy is None or iterator is None or symbolic_build is None:
            return super()._maybe_symbolic_build(
                iterator=iterator, data_batch=data_batch
            )
        import tensorflow as tf

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
            symbolic_build(data_batch=local_batch)

    @property
    def metrics(self):
        # Our own "loss" tracker (the total) replaces Keras's, which only its
        # own train_step updates; the part trackers follow, then the compiled
        # metrics of the student.
        own = [self._total_tracker, self._student_tracker]
        if self.layer_pairs:
            own.append(self._sp_tracker)
        if self.alpha > 0:
            own.append(self._kd_tracker)
        trackers = {
            id(m)
            for m in (
                self._total_tracker,
                self._student_tracker,
                self._sp_tracker,
                self._kd_tracker,
            )
        }
        rest = [
            m for m in super().metrics if id(m) not in trackers and m.name != "loss"
        ]
        return own + rest

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
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["teacher"] = keras.saving.deserialize_keras_object(config["teacher"])
        config["student"] = keras.saving.deserialize_keras_object(config["student"])
        return cls(**config)
