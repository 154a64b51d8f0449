"""The `Distiller`: a student trained from a frozen teacher with SP and KD.

Composes the SP loss (`sp.py`), the KD loss (`kd.py`) and the layer lookup
(`layers.py`) into a `keras.Model` whose `compute_loss` every Keras
backend's trainer runs.
"""

import logging

import keras
from keras import ops

from keras_simloss import _backend, _utils
from keras_simloss.distillation.kd import check_temperature, logit_distillation_loss
from keras_simloss.distillation.layers import (
    _check_layer_pairs,
    _input_shapes,
    _recording_outputs,
    auto_layer_pairs,
    find_layer,
)
from keras_simloss.distillation.sp import (
    _check_features,
    _grouped_similarity_preserving_loss,
    check_same_batch,
)

# The subpackage's logger, as documented (not this module's).
logger = logging.getLogger("keras_simloss.distillation")

# Largest allowed SP weight: beyond it the weighted loss and its gradients
# leave the range where float32 training makes sense (the paper's gamma is
# 3000).
_MAX_GAMMA = 1e6


# Argument checks of the Distiller -------------------------------------------


def _check_models(teacher, student):
    """Both are `keras.Model`s with the same input shapes (where known)."""
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


def _check_logits_output(logits_output):
    """`None`, an output key (str) or an output index (int, not a bool)."""
    if logits_output is not None and (
        isinstance(logits_output, bool) or not isinstance(logits_output, (str, int))
    ):
        raise TypeError(
            "Invalid type for argument `logits_output`. Expected None, an "
            "output key (str) or an output index (int). Received: "
            f"logits_output={logits_output!r}"
        )
    return logits_output


def _choose_layer_pairs(layer_pairs, teacher, student, name):
    """The validated pairs, or those `"auto"` chooses (logged once)."""
    if isinstance(layer_pairs, str) and layer_pairs == "auto":
        pairs = auto_layer_pairs(teacher, student)
        logger.info("Distiller %r: layer_pairs='auto' chose %s", name, pairs)
        return pairs
    return _check_layer_pairs(layer_pairs)


def _check_something_to_distil(pairs, gamma, alpha, received_alpha):
    """At least one term is on: SP (pairs and gamma > 0) or KD (alpha > 0)."""
    if not pairs and alpha == 0.0:
        raise ValueError(
            "Nothing to distil: `layer_pairs` is empty and `alpha=0` turns "
            "the logit term off. Give at least one (teacher_layer_name, "
            "student_layer_name) pair or set alpha > 0. Received: "
            f"layer_pairs={list(pairs)}, alpha={received_alpha}"
        )
    if pairs and gamma == 0.0 and alpha == 0.0:
        raise ValueError(
            "Nothing to distil: gamma=0 turns the SP term off and alpha=0 "
            "the logit term. Received: gamma=0, alpha=0"
        )


def _find_pair_layers(model, pairs, role):
    """`{"pair<i>": layer}` of `model`'s side (`role`) of each pair."""
    side = 0 if role == "teacher" else 1
    return {
        f"pair{i}": find_layer(model, pair[side], role) for i, pair in enumerate(pairs)
    }


# The distiller -----------------------------------------------------------------


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
        _check_models(teacher, student)
        self.gamma = _utils.check_number(
            "gamma", gamma, 0.0, _MAX_GAMMA, high_inclusive=True
        )
        self.alpha = _utils.check_number("alpha", alpha, 0.0, 1.0, high_inclusive=True)
        self.temperature = check_temperature(temperature)
        self.gram_batch = _utils.check_choice(
            "gram_batch", gram_batch, ("replica", "global")
        )
        self.logits_output = _check_logits_output(logits_output)
        self.layer_pairs = _choose_layer_pairs(layer_pairs, teacher, student, name)
        _check_something_to_distil(self.layer_pairs, self.gamma, self.alpha, alpha)
        self._teacher_layers = _find_pair_layers(teacher, self.layer_pairs, "teacher")
        self._student_layers = _find_pair_layers(student, self.layer_pairs, "student")
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
        if self.layer_pairs:
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
        if self.gram_batch == "global" and _backend.num_replicas() > 1:
            gathered = _backend.all_gather_replicas(features)
            if gathered is not None:  # None in Keras's symbolic build
                return gathered, 1
        shards = _backend.data_parallel_shards()
        if self.gram_batch == "replica" and shards > 1:
            return features, shards
        return features, 1

    def _similarity_preserving_term(self, teacher_features, student_features):
        """The SP loss summed over the layer pairs."""
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
            total = total + _grouped_similarity_preserving_loss(t, s, groups)
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

    def _logit_distillation_weights(self, sample_weight, outputs):
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

    def _logit_distillation_term(self, teacher_outputs, student_outputs, sample_weight):
        """`logit_distillation_loss` summed over the logits outputs."""
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
            self._logit_distillation_weights(sample_weight, student_logits),
        ):
            if t.shape[-1] != s.shape[-1]:
                raise ValueError(
                    "The KD term (alpha > 0) needs teacher and student logits "
                    "over the same classes. Received: teacher logits of shape "
                    f"{tuple(t.shape)}, student logits of shape {tuple(s.shape)}"
                )
            total = total + logit_distillation_loss(t, s, self.temperature, weight)
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
        replicas = _backend.num_replicas()
        sp_loss = (
            self._similarity_preserving_term(teacher_features, student_features)
            if self.layer_pairs
            else 0.0
        )
        kd_loss = (
            self._logit_distillation_term(teacher_outputs, y_pred, sample_weight)
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
        if _backend.multi_worker():
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
        # tf.distribute; see `_backend.build_from_local_batch`.
        strategy = getattr(self, "_distribute_strategy", None)
        if iterator is not None and _backend.multi_worker(strategy):
            return _backend.build_from_local_batch(self, iterator)
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
