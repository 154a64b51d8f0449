"""Metrics that measure how good the mistakes are.

Every metric here keeps two float32 sums over the epoch, a weighted numerator
and a weighted denominator, and reports their ratio (0 when the denominator is
0). A mean of per-batch means would be wrong with a ragged last batch or with
sample weights; sums are not. Predictions are reduced with `argmax`, so
logits and probabilities give the same result. Labels may be integer indices
of shape `(batch,)` / `(batch, 1)` or one-hot rows of shape `(batch, C)`.
"""

import keras
import numpy as np
from keras import ops

from keras_simloss import _utils
from keras_simloss import similarity as similarity_lib

__all__ = [
    "ClassMeanAbsoluteError",
    "ClassMeanSquaredError",
    "FailedSuperclassAccuracy",
    "MistakeSeverity",
    "SuperclassAccuracy",
]

_PACKAGE = "keras_simloss"


class _RatioMetric(keras.metrics.Metric):
    """Weighted `sum(numerator) / sum(denominator)` over an epoch.

    Subclasses set `num_classes` (or `None` for any) and implement
    `_terms(labels, predicted)`, returning the per-example numerator and
    denominator as float32 tensors of shape `(batch,)`.
    """

    num_classes = None

    def __init__(self, name, dtype=None):
        super().__init__(name=name, dtype=dtype)
        self.numerator = self.add_variable(
            shape=(), initializer="zeros", dtype="float32", name="numerator"
        )
        self.denominator = self.add_variable(
            shape=(), initializer="zeros", dtype="float32", name="denominator"
        )

    def _terms(self, labels, predicted):
        raise NotImplementedError

    def update_state(self, y_true, y_pred, sample_weight=None):
        y_pred = ops.convert_to_tensor(y_pred)
        num_classes = _utils.static_num_classes(y_pred)
        if self.num_classes is not None:
            _utils.check_num_classes(self.num_classes, num_classes, type(self).__name__)
        labels = _utils.sparse_labels(ops.convert_to_tensor(y_true), num_classes)
        predicted = ops.cast(ops.argmax(y_pred, axis=-1), "int32")
        numerator, denominator = self._terms(labels, predicted)
        if sample_weight is not None:
            weight = ops.cast(ops.convert_to_tensor(sample_weight), "float32")
            if len(weight.shape) == 2 and weight.shape[-1] == 1:
                weight = ops.squeeze(weight, -1)
            weight = ops.broadcast_to(weight, ops.shape(numerator))
            numerator = numerator * weight
            denominator = denominator * weight
        self.numerator.assign_add(ops.sum(numerator))
        self.denominator.assign_add(ops.sum(denominator))

    def result(self):
        # 0 / 0 is defined as 0 (e.g. no mistakes yet for FSA).
        return ops.cast(ops.divide_no_nan(self.numerator, self.denominator), self.dtype)

    def get_config(self):
        return {"name": self.name, "dtype": self.dtype}


def _check_class_array(name, values, integer):
    array = np.asarray(values)
    kind_ok = (
        np.issubdtype(array.dtype, np.integer)
        if integer
        else np.issubdtype(array.dtype, np.number)
        and not np.issubdtype(array.dtype, np.complexfloating)
    )
    if array.ndim != 1 or array.shape[0] < 2 or not kind_ok:
        expected = "integer ids" if integer else "numbers"
        raise ValueError(
            f"Invalid value for argument `{name}`. Expected a 1-D array of "
            f"{expected}, one per class (at least 2). Received: {name} of "
            f"shape {array.shape} and dtype {array.dtype}"
        )
    if not integer and not np.all(np.isfinite(array)):
        raise ValueError(
            f"Invalid value for argument `{name}`. Expected finite values. "
            f"Received: {name}={array.tolist()}"
        )
    return array.astype(np.int32 if integer else np.float32)


class _ClassDistanceMetric(_RatioMetric):
    def __init__(self, class_values=None, name=None, dtype=None):
        super().__init__(name=name, dtype=dtype)
        if class_values is None:
            self.class_values = None
        else:
            self.class_values = _check_class_array("class_values", class_values, False)
            self.num_classes = self.class_values.shape[0]

    def _difference(self, labels, predicted):
        if self.class_values is None:
            return ops.cast(predicted - labels, "float32")
        values = ops.convert_to_tensor(self.class_values)
        return ops.take(values, predicted) - ops.take(values, labels)

    def get_config(self):
        config = super().get_config()
        config["class_values"] = (
            None if self.class_values is None else self.class_values.tolist()
        )
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ClassMeanAbsoluteError(_ClassDistanceMetric):
    """Mean absolute error between the predicted and the true class.

    `mean |v[argmax(p)] - v[y]|` with `v` the class values (ages, ratings), or
    the class indices when `class_values` is `None`. For ordinal tasks this is
    the MAE of the SimLoss paper.

    Args:
        class_values: optional 1-D array, the value of each class (e.g. the
            age of each age class). Defaults to `None`, the class indices.
        name: Defaults to `"class_mae"`.
        dtype: dtype of the result. Defaults to `None` (float32).

    Example:

    >>> m = ClassMeanAbsoluteError()
    >>> m.update_state([0, 2], [[0.1, 0.9, 0.0], [0.0, 0.2, 0.8]])
    >>> float(m.result())  # (|1 - 0| + |2 - 2|) / 2
    0.5
    """

    def __init__(self, class_values=None, name="class_mae", dtype=None):
        super().__init__(class_values=class_values, name=name, dtype=dtype)

    def _terms(self, labels, predicted):
        error = ops.abs(self._difference(labels, predicted))
        return error, ops.ones_like(error)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ClassMeanSquaredError(_ClassDistanceMetric):
    """Mean squared error between the predicted and the true class.

    `mean (v[argmax(p)] - v[y])^2` with `v` the class values, or the class
    indices when `class_values` is `None`.

    Args:
        class_values: optional 1-D array, the value of each class. Defaults
            to `None`, the class indices.
        name: Defaults to `"class_mse"`.
        dtype: dtype of the result. Defaults to `None` (float32).

    Example:

    >>> m = ClassMeanSquaredError(class_values=[10.0, 20.0, 30.0])
    >>> m.update_state([0, 2], [[0.1, 0.0, 0.9], [0.0, 0.2, 0.8]])
    >>> float(m.result())  # ((30 - 10)^2 + 0) / 2
    200.0
    """

    def __init__(self, class_values=None, name="class_mse", dtype=None):
        super().__init__(class_values=class_values, name=name, dtype=dtype)

    def _terms(self, labels, predicted):
        error = ops.square(self._difference(labels, predicted))
        return error, ops.ones_like(error)


class _SuperclassMetric(_RatioMetric):
    def __init__(self, superclass_of, name=None, dtype=None):
        super().__init__(name=name, dtype=dtype)
        self.superclass_of = _check_class_array("superclass_of", superclass_of, True)
        self.num_classes = self.superclass_of.shape[0]

    def _same_superclass(self, labels, predicted):
        superclass_of = ops.convert_to_tensor(self.superclass_of)
        return ops.take(superclass_of, labels) == ops.take(superclass_of, predicted)

    def get_config(self):
        config = super().get_config()
        config["superclass_of"] = self.superclass_of.tolist()
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
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

    def _terms(self, labels, predicted):
        correct = ops.cast(self._same_superclass(labels, predicted), "float32")
        return correct, ops.ones_like(correct)


@keras.saving.register_keras_serializable(package=_PACKAGE)
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

    def _terms(self, labels, predicted):
        mistake = labels != predicted
        rescued = ops.logical_and(mistake, self._same_superclass(labels, predicted))
        return ops.cast(rescued, "float32"), ops.cast(mistake, "float32")


@keras.saving.register_keras_serializable(package=_PACKAGE)
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

    def _terms(self, labels, predicted):
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
