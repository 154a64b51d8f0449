"""Metrics that measure how good the mistakes are.

Every metric here keeps two float32 sums over the epoch, a weighted numerator
and a weighted denominator, and reports their ratio (0 when the denominator is
0). A mean of per-batch means would be wrong with a ragged last batch or with
sample weights; sums are not. Predictions are reduced with `argmax`, so
logits and probabilities give the same result.

Shapes are those of Keras's sparse metrics: predictions `(..., C)`, labels
of shape `y_pred.shape[:-1]` (optionally with a trailing 1) or one-hot rows
of `y_pred`'s shape; sample weights per example or per element. A label that
is not a class raises a `ValueError` in eager mode and makes the result NaN
inside a compiled step (as it makes `SimLoss` NaN). Each metric declares
whether higher or lower is better, so Keras callbacks (`EarlyStopping`,
`ModelCheckpoint(save_best_only=True)`) work in their default `mode="auto"`.
"""

import keras
from keras import ops

from keras_simloss import _utils, decoding
from keras_simloss import similarity as similarity_lib

__all__ = [
    "ClassMeanAbsoluteError",
    "ClassMeanSquaredError",
    "ConfusionMatrix",
    "FailedSuperclassAccuracy",
    "MistakeSeverity",
    "SuperclassAccuracy",
]


class _RatioMetric(keras.metrics.Metric):
    """Weighted `sum(numerator) / sum(denominator)` over an epoch.

    Subclasses set `num_classes` (or `None` for any), `_direction` (`"up"`
    when higher is better, `"down"` when lower is; Keras callbacks read it in
    `mode="auto"`), and implement `_terms(labels, y_pred)`, which gets flat
    int32 labels `(N,)` and float32 predictions `(N, C)` and returns the
    per-example numerator and denominator as float32 tensors of shape `(N,)`.
    """

    num_classes = None
    # What gave the metric its classes, named when predictions disagree.
    _classes_from = "similarity"
    _direction = "up"

    def __init__(self, name, dtype=None):
        super().__init__(name=name, dtype=dtype)
        self.numerator = self.add_variable(
            shape=(), initializer="zeros", dtype="float32", name="numerator"
        )
        self.denominator = self.add_variable(
            shape=(), initializer="zeros", dtype="float32", name="denominator"
        )

    def _terms(self, labels, y_pred):
        raise NotImplementedError

    def update_state(self, y_true, y_pred, sample_weight=None):
        y_pred = ops.cast(ops.convert_to_tensor(y_pred), "float32")
        num_classes = _utils.static_num_classes(y_pred)
        if self.num_classes is not None:
            _utils.check_num_classes(
                self.num_classes, num_classes, type(self).__name__, self._classes_from
            )
        labels, valid = _utils.sparse_labels(y_true, y_pred)
        numerator, denominator = self._terms(
            ops.reshape(labels, (-1,)), ops.reshape(y_pred, (-1, num_classes))
        )
        # A label that is not a class (possible only inside compiled steps;
        # eager mode raised) or a row of predictions holding a NaN makes the
        # result NaN, as it makes the loss NaN: never a plausible number.
        valid = ops.logical_and(valid, _utils.readable_rows(y_pred))
        numerator = _utils.nan_where_invalid(numerator, ops.reshape(valid, (-1,)))
        if sample_weight is not None:
            weight = _flat_weight(sample_weight, labels)
            numerator = numerator * weight
            denominator = denominator * weight
        self.numerator.assign_add(ops.sum(numerator))
        self.denominator.assign_add(ops.sum(denominator))

    def result(self):
        # 0 / 0 is defined as 0 (e.g. no mistakes yet for FSA).
        return ops.cast(ops.divide_no_nan(self.numerator, self.denominator), self.dtype)

    def get_config(self):
        return {"name": self.name, "dtype": self.dtype}


def _flat_weight(sample_weight, labels):
    """Sample weights as a flat `(N,)` float32 tensor matching `labels`."""
    weight = _utils.expand_sample_weight(sample_weight, labels)
    return ops.reshape(ops.broadcast_to(weight, ops.shape(labels)), (-1,))


def _argmax(y_pred):
    return ops.cast(ops.argmax(y_pred, axis=-1), "int32")


class _ClassDistanceMetric(_RatioMetric):
    _direction = "down"

    def __init__(
        self,
        class_values=None,
        decode="argmax",
        from_logits=False,
        name=None,
        dtype=None,
    ):
        super().__init__(name=name, dtype=dtype)
        self.decode = _utils.check_choice("decode", decode, decoding.METHODS)
        self.from_logits = _utils.check_bool("from_logits", from_logits)
        self.class_values = _utils.check_class_values(
            class_values, increasing=decode == "median"
        )
        if self.class_values is not None:
            self.num_classes = self.class_values.shape[0]
            self._classes_from = "class_values"

    def _difference(self, labels, y_pred):
        """Read-out minus true value, per example."""
        if self.class_values is None:
            truth = ops.cast(labels, "float32")
        else:
            truth = ops.take(ops.convert_to_tensor(self.class_values), labels)
        predicted = decoding.decode_ordinal(
            y_pred, self.decode, self.class_values, self.from_logits
        )
        return predicted - truth

    def get_config(self):
        config = super().get_config()
        config["class_values"] = (
            None if self.class_values is None else self.class_values.tolist()
        )
        config["decode"] = self.decode
        config["from_logits"] = self.from_logits
        return config


@_utils.register
class ClassMeanAbsoluteError(_ClassDistanceMetric):
    """Mean absolute error between the predicted and the true class.

    `mean |r(p) - v[y]|` with `v` the class values (ages, ratings), or the
    class indices when `class_values` is `None`, and `r(p)` the read-out of
    the predicted distribution, by default `v[argmax(p)]`. For ordinal tasks
    this is the MAE of the SimLoss paper.

    Args:
        class_values: optional 1-D array, the value of each class (e.g. the
            age of each age class). Defaults to `None`, the class indices.
        decode: the read-out of the predicted distribution:
            `"argmax"` (the paper's), `"median"` (minimises the expected
            absolute error) or `"mean"` (minimises the expected squared
            error), see `keras_simloss.decode_ordinal`. Use the read-out
            your model will be used with. Defaults to `"argmax"`.
        from_logits: whether `y_pred` holds logits; matters for `"median"`
            and `"mean"` only. Defaults to `False`.
        name: Defaults to `"class_mae"`.
        dtype: dtype of the result. Defaults to `None` (float32).

    Example:

    >>> m = ClassMeanAbsoluteError()
    >>> m.update_state([0, 2], [[0.1, 0.9, 0.0], [0.0, 0.2, 0.8]])
    >>> float(m.result())  # (|1 - 0| + |2 - 2|) / 2
    0.5
    >>> m = ClassMeanAbsoluteError(decode="median")
    >>> m.update_state([0, 2], [[0.4, 0.2, 0.4], [0.0, 0.2, 0.8]])
    >>> float(m.result())  # medians 1 and 2: (1 + 0) / 2
    0.5
    """

    def __init__(
        self,
        class_values=None,
        decode="argmax",
        from_logits=False,
        name="class_mae",
        dtype=None,
    ):
        super().__init__(class_values, decode, from_logits, name=name, dtype=dtype)

    def _terms(self, labels, y_pred):
        error = ops.abs(self._difference(labels, y_pred))
        return error, ops.ones_like(error)


@_utils.register
class ClassMeanSquaredError(_ClassDistanceMetric):
    """Mean squared error between the predicted and the true class.

    `mean (r(p) - v[y])^2` with `v` the class values, or the class indices
    when `class_values` is `None`, and `r(p)` the read-out, by default
    `v[argmax(p)]`.

    Args:
        class_values: optional 1-D array, the value of each class. Defaults
            to `None`, the class indices.
        decode: the read-out of the predicted distribution:
            `"argmax"` (the paper's), `"median"` (minimises the expected
            absolute error) or `"mean"` (minimises the expected squared
            error), see `keras_simloss.decode_ordinal`. Use the read-out
            your model will be used with. Defaults to `"argmax"`.
        from_logits: whether `y_pred` holds logits; matters for `"median"`
            and `"mean"` only. Defaults to `False`.
        name: Defaults to `"class_mse"`.
        dtype: dtype of the result. Defaults to `None` (float32).

    Example:

    >>> m = ClassMeanSquaredError(class_values=[10.0, 20.0, 30.0])
    >>> m.update_state([0, 2], [[0.1, 0.0, 0.9], [0.0, 0.2, 0.8]])
    >>> float(m.result())  # ((30 - 10)^2 + 0) / 2
    200.0
    """

    def __init__(
        self,
        class_values=None,
        decode="argmax",
        from_logits=False,
        name="class_mse",
        dtype=None,
    ):
        super().__init__(class_values, decode, from_logits, name=name, dtype=dtype)

    def _terms(self, labels, y_pred):
        error = ops.square(self._difference(labels, y_pred))
        return error, ops.ones_like(error)


class _SuperclassMetric(_RatioMetric):
    def __init__(self, superclass_of, name=None, dtype=None):
        super().__init__(name=name, dtype=dtype)
        # The ids as given (for the config), and as exact int32 codes for
        # the graph: a cast would merge ids that differ above 2**31.
        self.superclass_of = _utils.check_vector(
            "superclass_of", superclass_of, integer=True
        )
        self._superclass_codes = _utils.dense_codes(self.superclass_of)
        self.num_classes = self.superclass_of.shape[0]

    _classes_from = "superclass_of"

    def _same_superclass(self, labels, predicted):
        superclass_of = ops.convert_to_tensor(self._superclass_codes)
        return ops.take(superclass_of, labels) == ops.take(superclass_of, predicted)

    def get_config(self):
        config = super().get_config()
        config["superclass_of"] = self.superclass_of.tolist()
        return config


@_utils.register
class SuperclassAccuracy(_SuperclassMetric):
    """Superclass accuracy (SA): the predicted class is in the true superclass.

    `mean [superclass(argmax(p)) == superclass(y)]`. Always >= accuracy.

    Args:
        superclass_of: 1-D integer array, the superclass id of each class
            (e.g. `keras_simloss.datasets.cifar100.FINE_TO_COARSE`).
        name: Defaults to `"superclass_accuracy"`.
        dtype: dtype of the result. Defaults to `None` (float32).

    Example:

    >>> m = SuperclassAccuracy(superclass_of=[0, 0, 1])
    >>> m.update_state([0, 0], [[0.1, 0.9, 0.0], [0.0, 0.2, 0.8]])
    >>> float(m.result())  # 1 is in 0's superclass, 2 is not
    0.5
    """

    def __init__(self, superclass_of, name="superclass_accuracy", dtype=None):
        super().__init__(superclass_of=superclass_of, name=name, dtype=dtype)

    def _terms(self, labels, y_pred):
        predicted = _argmax(y_pred)
        correct = ops.cast(self._same_superclass(labels, predicted), "float32")
        return correct, ops.ones_like(correct)


@_utils.register
class FailedSuperclassAccuracy(_SuperclassMetric):
    """Failed superclass accuracy (FSA): SA over the misclassified examples.

    `(#superclass correct - #correct) / (N - #correct)`, counted over the
    whole epoch; 0 when there is no mistake. It says how often a wrong
    prediction is at least in the right superclass.

    Args:
        superclass_of: 1-D integer array, the superclass id of each class.
        name: Defaults to `"failed_superclass_accuracy"`.
        dtype: dtype of the result. Defaults to `None` (float32).

    Example:

    >>> m = FailedSuperclassAccuracy(superclass_of=[0, 0, 1])
    >>> m.update_state([0, 0, 2], [[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    >>> float(m.result())  # one mistake (0 -> 1), in the right superclass
    1.0
    """

    def __init__(self, superclass_of, name="failed_superclass_accuracy", dtype=None):
        super().__init__(superclass_of=superclass_of, name=name, dtype=dtype)

    def _terms(self, labels, y_pred):
        predicted = _argmax(y_pred)
        mistake = labels != predicted
        rescued = ops.logical_and(mistake, self._same_superclass(labels, predicted))
        return ops.cast(rescued, "float32"), ops.cast(mistake, "float32")


@_utils.register
class MistakeSeverity(_RatioMetric):
    """Mean severity of the mistakes: `1 - S[y, argmax(p)]` over mistakes.

    Correct predictions are left out (they would add 0 and dilute the mean);
    0 when there is no mistake. Lower is better: the model's errors land on
    classes similar to the truth.

    Args:
        similarity: a `keras_simloss.similarity.Similarity` or a `(C, C)`
            array-like, as for `SimLoss`.
        name: Defaults to `"mistake_severity"`.
        dtype: dtype of the result. Defaults to `None` (float32).

    Example:

    >>> from keras_simloss import similarity
    >>> m = MistakeSeverity(similarity.ordinal(3, 0.5))
    >>> m.update_state([0, 0, 1], [[0, 1, 0], [0, 0, 1], [0, 1, 0]])
    >>> float(m.result())  # ((1 - 0.5) + (1 - 0.25)) / 2 mistakes
    0.625
    """

    def __init__(self, similarity, name="mistake_severity", dtype=None):
        super().__init__(name=name, dtype=dtype)
        self.similarity = similarity_lib.get(similarity)
        self.num_classes = self.similarity.num_classes

    _direction = "down"

    def _terms(self, labels, y_pred):
        predicted = _argmax(y_pred)
        mistake = ops.cast(labels != predicted, "float32")
        severity = 1.0 - self.similarity.pairs(labels, predicted)
        return severity * mistake, mistake

    def get_config(self):
        config = super().get_config()
        config["similarity"] = keras.saving.serialize_keras_object(self.similarity)
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["similarity"] = similarity_lib.get(config["similarity"])
        return cls(**config)

    def save_own_variables(self, store):
        """Saves the similarity's large arrays (if any) into the `.keras` file."""
        self.similarity.save_own_variables(store)

    def load_own_variables(self, store):
        """Restores the similarity's large arrays from the `.keras` file."""
        self.similarity.load_own_variables(store)


@_utils.register
class ConfusionMatrix(keras.metrics.Metric):
    """Weighted confusion matrix over an epoch: `counts[true, predicted]`.

    `counts[i, j]` is the summed sample weight (the number of examples when
    unweighted) of the examples of class `i` predicted as `j` (`argmax`, so
    logits and probabilities give the same). It accumulates over the epoch
    and `result()` returns the `(C, C)` counts. Labels, predictions and
    sample weights take the same shapes as the other metrics here.

    Use it on held-out data to build a class similarity for a second training
    run, `keras_simloss.similarity.from_confusion(metric.result())`. Counts
    are float32 sums, exact up to 2**24 (16.7 million) per cell. The result
    is a matrix, not a scalar: read it from `evaluate(..., return_dict=True)`
    or `History` (in `fit`'s progress bar it shows as the mean of its cells),
    and do not monitor it with callbacks.

    Args:
        num_classes: int >= 2, the number of classes `C`.
        name: Defaults to `"confusion_matrix"`.
        dtype: dtype of the result. Defaults to `None` (float32).

    Example:

    >>> m = ConfusionMatrix(3)
    >>> m.update_state([0, 0, 2], [[0.9, 0.1, 0], [0.2, 0.8, 0], [0, 0, 1]],
    ...                sample_weight=[1.0, 2.0, 1.0])
    >>> np.asarray(m.result()).tolist()  # true 0 -> predicted 1 with weight 2
    [[1.0, 2.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0]]
    """

    def __init__(self, num_classes, name="confusion_matrix", dtype=None):
        super().__init__(name=name, dtype=dtype)
        self.num_classes = _utils.check_int("num_classes", num_classes, low=2)
        self.counts = self.add_variable(
            shape=(self.num_classes, self.num_classes),
            initializer="zeros",
            dtype="float32",
            name="counts",
        )

    def update_state(self, y_true, y_pred, sample_weight=None):
        y_pred = ops.convert_to_tensor(y_pred)
        num_classes = _utils.static_num_classes(y_pred)
        if num_classes != self.num_classes:
            raise ValueError(
                f"`ConfusionMatrix` counts {self.num_classes} classes, but the "
                f"predictions have {num_classes} (last axis of `y_pred`). "
                f"Received: num_classes={self.num_classes}, "
                f"y_pred.shape={tuple(y_pred.shape)}"
            )
        labels, valid = _utils.sparse_labels(y_true, y_pred)
        predicted = ops.reshape(_argmax(y_pred), (-1,))
        if sample_weight is None:
            weight = ops.ones(ops.shape(predicted), "float32")
        else:
            weight = _flat_weight(sample_weight, labels)
        # One scatter-add into the flattened C x C cells: O(batch + C^2),
        # with no (batch, C) one-hot tensors.
        cell = ops.reshape(labels, (-1,)) * self.num_classes + predicted
        counts = ops.segment_sum(weight, cell, num_segments=self.num_classes**2)
        counts = ops.reshape(counts, (self.num_classes, self.num_classes))
        # A label that is not a class (only possible inside a compiled step;
        # eager mode raised) or a row of predictions holding a NaN makes
        # every count NaN, as it makes the other metrics NaN, rather than
        # being counted as some class.
        valid = ops.logical_and(valid, _utils.readable_rows(y_pred))
        counts = ops.where(ops.all(valid), counts, float("nan"))
        self.counts.assign_add(counts)

    def result(self):
        return ops.cast(self.counts, self.dtype)

    def get_config(self):
        return {"num_classes": self.num_classes, "name": self.name, "dtype": self.dtype}
