"""Metrics that measure how good the mistakes are.

Every metric here keeps float32 sums over the epoch (most a weighted
numerator and a weighted denominator, reporting their ratio, 0 when the
denominator is 0; `QuadraticWeightedKappa` two class histograms and a sum).
A mean of per-batch means would be wrong with a ragged last batch or with
sample weights; sums are not. Predictions are reduced with `argmax` by
default, so logits and probabilities give the same result. Metrics that
read one predicted class take `decode=` a similarity instead, to score the
min-risk class (`keras_simloss.decode_min_risk`) a deployed model outputs
(then `from_logits` says what `y_pred` holds).

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

from keras_simloss import _utils, decoding, sharding
from keras_simloss import similarity as similarity_lib
from keras_simloss.similarity.saving import SimilarityHolder

__all__ = [
    "AccuracyWithinK",
    "ClassMeanAbsoluteError",
    "ClassMeanSquaredError",
    "ConfusionMatrix",
    "FailedSuperclassAccuracy",
    "MistakeSeverity",
    "QuadraticWeightedKappa",
    "SuperclassAccuracy",
    "TopKMistakeSeverity",
]


class _ClassReader:
    """How a metric reads one predicted class: `decode="argmax"`,
    `"median"` where allowed, or a similarity (min-risk decoding under it;
    `"min_risk"`: under the metric's own similarity)."""

    decode = "argmax"
    from_logits = False
    _decode_similarity = None  # the similarity of min-risk decoding, if any

    def _init_decode(self, decode, from_logits, methods=("argmax",), own=None):
        """Validates `decode` (one of `methods`, a similarity, or
        `"min_risk"` where the metric has a similarity `own`)."""
        self.from_logits = _utils.check_bool("from_logits", from_logits)
        if isinstance(decode, dict):  # from a config
            decode = similarity_lib.get(decode)
        if isinstance(decode, str):
            if decode == "min_risk" and own is not None:
                self.decode, self._decode_similarity = "min_risk", own
                return
            choices = methods + (("min_risk",) if own is not None else ())
            self.decode = _utils.check_choice("decode", decode, choices)
            return
        try:
            self._decode_similarity = similarity_lib.get(decode)
        except (TypeError, ValueError) as error:
            raise ValueError(
                "Invalid value for argument `decode`. Expected one of "
                f"{list(methods)} or a similarity for min-risk decoding. "
                f"Received: decode={decode!r}"
            ) from error
        self.decode = self._decode_similarity

    def _predicted(self, y_pred):
        """`(classes, valid)`: the predicted class of each row of `(N, C)`,
        int32 `(N,)`, by argmax, median or min-risk decoding, and whether
        the row could be read (`None` for argmax: the caller's NaN rule)."""
        if self.decode == "median":
            median = decoding.decode_ordinal(
                y_pred, "median", from_logits=self.from_logits
            )
            read = ops.logical_not(ops.isnan(median))
            return ops.cast(ops.where(read, median, 0.0), "int32"), read
        if self._decode_similarity is None:
            return _argmax(y_pred), None
        return decoding.min_risk_classes(
            y_pred, self._decode_similarity, self.from_logits, type(self).__name__
        )

    def _decode_config(self):
        if self._decode_similarity is None or self.decode == "min_risk":
            return self.decode
        return keras.saving.serialize_keras_object(self._decode_similarity)

    def save_own_variables(self, store):
        """Saves the decoding similarity's large arrays (if any)."""
        if self._decode_similarity is not None:
            self._decode_similarity.save_own_variables(store)

    def load_own_variables(self, store):
        """Restores the decoding similarity's large arrays (if any)."""
        if self._decode_similarity is not None:
            self._decode_similarity.load_own_variables(store)


class _RatioMetric(_ClassReader, keras.metrics.Metric):
    """Weighted `sum(numerator) / sum(denominator)` over an epoch.

    Subclasses set `num_classes` (or `None` for any), `_direction` (`"up"`
    when higher is better, `"down"` when lower is; Keras callbacks read it in
    `mode="auto"`), and implement `_terms(labels, y_pred)`, which gets flat
    int32 labels `(N,)` and float32 predictions `(N, C)` and returns the
    per-example numerator and denominator as float32 tensors of shape `(N,)`,
    and optionally a third, whether each example could be read (NaN where
    not).

    A metric that reads one predicted class calls `_init_decode` and
    `_predicted` (see `_ClassReader`).
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
        numerator, denominator, *read = self._terms(
            ops.reshape(labels, (-1,)), ops.reshape(y_pred, (-1, num_classes))
        )
        # A label that is not a class (possible only inside compiled steps;
        # eager mode raised) or a row of predictions holding a NaN makes the
        # result NaN, as it makes the loss NaN: never a plausible number.
        valid = ops.reshape(ops.logical_and(valid, _utils.readable_rows(y_pred)), (-1,))
        if read and read[0] is not None:
            valid = ops.logical_and(valid, read[0])
        numerator = _utils.nan_where_invalid(numerator, valid)
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
        self._init_decode(decode, from_logits, methods=decoding.METHODS)
        self.class_values = _utils.check_class_values(
            class_values, increasing=isinstance(decode, str) and decode == "median"
        )
        if self._decode_similarity is not None:
            self.num_classes = self._decode_similarity.num_classes
        if self.class_values is not None:
            self.num_classes = self.class_values.shape[0]
            self._classes_from = "class_values"

    def _values(self, classes):
        if self.class_values is None:
            return ops.cast(classes, "float32")
        return ops.take(ops.convert_to_tensor(self.class_values), classes)

    def _difference(self, labels, y_pred):
        """Read-out minus true value per example, and which rows were read."""
        if self._decode_similarity is not None:
            classes, read = self._predicted(y_pred)
            return self._values(classes) - self._values(labels), read
        predicted = decoding.decode_ordinal(
            y_pred, self.decode, self.class_values, self.from_logits
        )
        return predicted - self._values(labels), None

    def get_config(self):
        config = super().get_config()
        config["class_values"] = (
            None if self.class_values is None else self.class_values.tolist()
        )
        config["decode"] = self._decode_config()
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
            error), see `keras_simloss.decode_ordinal`, or a similarity for
            the min-risk class under it (`keras_simloss.decode_min_risk`).
            Use the read-out your model will be used with. Defaults to
            `"argmax"`.
        from_logits: whether `y_pred` holds logits; matters for all but
            `"argmax"`. Defaults to `False`.
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
        difference, read = self._difference(labels, y_pred)
        error = ops.abs(difference)
        return error, ops.ones_like(error), read


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
            error), see `keras_simloss.decode_ordinal`, or a similarity for
            the min-risk class under it (`keras_simloss.decode_min_risk`).
            Use the read-out your model will be used with. Defaults to
            `"argmax"`.
        from_logits: whether `y_pred` holds logits; matters for all but
            `"argmax"`. Defaults to `False`.
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
        difference, read = self._difference(labels, y_pred)
        error = ops.square(difference)
        return error, ops.ones_like(error), read


class _SuperclassMetric(_RatioMetric):
    def __init__(
        self, superclass_of, decode="argmax", from_logits=False, name=None, dtype=None
    ):
        super().__init__(name=name, dtype=dtype)
        self._init_decode(decode, from_logits)
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
        config["decode"] = self._decode_config()
        config["from_logits"] = self.from_logits
        return config


@_utils.register
class SuperclassAccuracy(_SuperclassMetric):
    """Superclass accuracy (SA): the predicted class is in the true superclass.

    `mean [superclass(argmax(p)) == superclass(y)]`. Always >= accuracy.

    Args:
        superclass_of: 1-D integer array, the superclass id of each class
            (e.g. `keras_simloss.datasets.cifar100.FINE_TO_COARSE`).
        decode: `"argmax"` (the default), or a similarity: score the
            min-risk class under it (`keras_simloss.decode_min_risk`).
        from_logits: whether `y_pred` holds logits; matters for min-risk
            decoding only. Defaults to `False`.
        name: Defaults to `"superclass_accuracy"`.
        dtype: dtype of the result. Defaults to `None` (float32).

    Example:

    >>> m = SuperclassAccuracy(superclass_of=[0, 0, 1])
    >>> m.update_state([0, 0], [[0.1, 0.9, 0.0], [0.0, 0.2, 0.8]])
    >>> float(m.result())  # 1 is in 0's superclass, 2 is not
    0.5
    """

    def __init__(
        self,
        superclass_of,
        decode="argmax",
        from_logits=False,
        name="superclass_accuracy",
        dtype=None,
    ):
        super().__init__(superclass_of, decode, from_logits, name=name, dtype=dtype)

    def _terms(self, labels, y_pred):
        predicted, read = self._predicted(y_pred)
        correct = ops.cast(self._same_superclass(labels, predicted), "float32")
        return correct, ops.ones_like(correct), read


@_utils.register
class FailedSuperclassAccuracy(_SuperclassMetric):
    """Failed superclass accuracy (FSA): SA over the misclassified examples.

    `(#superclass correct - #correct) / (N - #correct)`, counted over the
    whole epoch; 0 when there is no mistake. It says how often a wrong
    prediction is at least in the right superclass.

    Args:
        superclass_of: 1-D integer array, the superclass id of each class.
        decode: `"argmax"` (the default), or a similarity: score the
            min-risk class under it (`keras_simloss.decode_min_risk`).
        from_logits: whether `y_pred` holds logits; matters for min-risk
            decoding only. Defaults to `False`.
        name: Defaults to `"failed_superclass_accuracy"`.
        dtype: dtype of the result. Defaults to `None` (float32).

    Example:

    >>> m = FailedSuperclassAccuracy(superclass_of=[0, 0, 1])
    >>> m.update_state([0, 0, 2], [[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    >>> float(m.result())  # one mistake (0 -> 1), in the right superclass
    1.0
    """

    def __init__(
        self,
        superclass_of,
        decode="argmax",
        from_logits=False,
        name="failed_superclass_accuracy",
        dtype=None,
    ):
        super().__init__(superclass_of, decode, from_logits, name=name, dtype=dtype)

    def _terms(self, labels, y_pred):
        predicted, read = self._predicted(y_pred)
        mistake = labels != predicted
        rescued = ops.logical_and(mistake, self._same_superclass(labels, predicted))
        return ops.cast(rescued, "float32"), ops.cast(mistake, "float32"), read


class _SimilarityMetric(SimilarityHolder, _RatioMetric):
    """A metric over a class similarity: its config and `.keras` arrays."""

    _direction = "down"

    def __init__(self, similarity, name, dtype):
        super().__init__(name=name, dtype=dtype)
        self.similarity = similarity_lib.get(similarity)
        self.num_classes = self.similarity.num_classes

    def get_config(self):
        config = super().get_config()
        config["similarity"] = keras.saving.serialize_keras_object(self.similarity)
        return config


@_utils.register
class MistakeSeverity(_SimilarityMetric):
    """Mean severity of the mistakes: `1 - S[y, argmax(p)]` over mistakes.

    Correct predictions are left out (they would add 0 and dilute the mean);
    0 when there is no mistake. Lower is better: the model's errors land on
    classes similar to the truth.

    Args:
        similarity: a `keras_simloss.similarity.Similarity` or a `(C, C)`
            array-like, as for `SimLoss`.
        decode: `"argmax"` (the default) or `"min_risk"`: score the class of
            least expected cost `1 - S` under this similarity
            (`keras_simloss.decode_min_risk`).
        from_logits: whether `y_pred` holds logits; matters for
            `"min_risk"` only. Defaults to `False`.
        name: Defaults to `"mistake_severity"`.
        dtype: dtype of the result. Defaults to `None` (float32).

    Example:

    >>> from keras_simloss import similarity
    >>> m = MistakeSeverity(similarity.ordinal(3, 0.5))
    >>> m.update_state([0, 0, 1], [[0, 1, 0], [0, 0, 1], [0, 1, 0]])
    >>> float(m.result())  # ((1 - 0.5) + (1 - 0.25)) / 2 mistakes
    0.625
    """

    def __init__(
        self,
        similarity,
        decode="argmax",
        from_logits=False,
        name="mistake_severity",
        dtype=None,
    ):
        super().__init__(similarity, name=name, dtype=dtype)
        self._init_decode(decode, from_logits, own=self.similarity)

    def _terms(self, labels, y_pred):
        predicted, read = self._predicted(y_pred)
        mistake = ops.cast(labels != predicted, "float32")
        severity = 1.0 - self.similarity.pairs(labels, predicted)
        return severity * mistake, mistake, read

    def get_config(self):
        config = super().get_config()
        config["decode"] = self.decode
        config["from_logits"] = self.from_logits
        return config


@_utils.register
class TopKMistakeSeverity(_SimilarityMetric):
    """Severity of the top `k` predictions: average or best `1 - S` over them.

    For each example, the `k` most likely classes `j_1, ..., j_k` and their
    distances to the truth `d = 1 - S[y, j]`; `mode="average"` reports the
    mean of `d` over the `k` (Bertinetto et al.'s "average hierarchical
    distance@k"), `mode="best"` the smallest ("hierarchical distance of the
    best@k"), averaged over all examples, correct ones included. With
    `from_hierarchy` similarities `d` is the hierarchy's distance scaled to
    `[0, 1]`; `k = 1` is the mean of `1 - S[y, argmax]` over all examples.
    Lower is better. Ties among the top `k` go to the smaller index.

    Args:
        similarity: a `Similarity` or a `(C, C)` array-like.
        k: int, `1 <= k <= C`. Defaults to `5`.
        mode: `"average"` or `"best"`. Defaults to `"average"`.
        name: Defaults to `"mistake_severity_at_{k}"` (`"best_..."` for
            `mode="best"`).
        dtype: dtype of the result. Defaults to `None` (float32).

    Example:

    >>> from keras_simloss import similarity
    >>> s = similarity.ordinal(4, 0.5)
    >>> m = TopKMistakeSeverity(s, k=2)
    >>> m.update_state([0], [[0.1, 0.2, 0.6, 0.1]])  # top 2: classes 2 and 1
    >>> float(m.result())  # ((1 - 0.25) + (1 - 0.5)) / 2
    0.625

    Reference:
        Bertinetto et al., "Making Better Mistakes: Leveraging Class
        Hierarchies with Deep Networks", CVPR 2020.
        https://arxiv.org/abs/1912.09393
    """

    MODES = ("average", "best")

    def __init__(self, similarity, k=5, mode="average", name=None, dtype=None):
        similarity = similarity_lib.get(similarity)
        k = _utils.check_int("k", k, low=1)
        if k > similarity.num_classes:
            raise ValueError(
                "Invalid value for argument `k`. Expected 1 <= k <= the number "
                f"of classes of the similarity ({similarity.num_classes}). "
                f"Received: k={k}"
            )
        mode = _utils.check_choice("mode", mode, self.MODES)
        if name is None:
            name = f"{'best_' if mode == 'best' else ''}mistake_severity_at_{k}"
        super().__init__(similarity, name=name, dtype=dtype)
        self.k, self.mode = k, mode

    def _terms(self, labels, y_pred):
        # Over classes sharded by `shard_classes`: per shard, then over the
        # candidates (no device gathers a whole row).
        classes = ops.cast(sharding.top_k(y_pred, self.k, self.similarity)[1], "int32")
        repeated = ops.reshape(
            ops.broadcast_to(ops.expand_dims(labels, -1), ops.shape(classes)), (-1,)
        )
        distance = 1.0 - ops.reshape(
            self.similarity.pairs(repeated, ops.reshape(classes, (-1,))), (-1, self.k)
        )
        if self.mode == "average":
            per_example = ops.mean(distance, axis=-1)
        else:
            per_example = ops.min(distance, axis=-1)
        return per_example, ops.ones_like(per_example)

    def get_config(self):
        config = super().get_config()
        config.update({"k": self.k, "mode": self.mode})
        return config


@_utils.register
class AccuracyWithinK(_RatioMetric):
    """Accuracy within `k` classes: `mean [|predicted - y| <= k]`.

    The standard "off-by-k" accuracy of ordinal tasks (ratings, grades, age
    groups): `k = 0` is accuracy, `k = 1` counts a neighbouring class as a
    hit. The predicted class is the argmax, the median class
    (`decode="median"`), or the min-risk class under a similarity.

    Args:
        k: int `>= 0`, below the number of classes. Defaults to `1`.
        decode: `"argmax"`, `"median"` (`keras_simloss.decode_ordinal`) or a
            similarity (min-risk decoding). Defaults to `"argmax"`.
        from_logits: whether `y_pred` holds logits; matters for all but
            `"argmax"`. Defaults to `False`.
        name: Defaults to `"accuracy_within_{k}"`.
        dtype: dtype of the result. Defaults to `None` (float32).

    Example:

    >>> m = AccuracyWithinK(k=1)
    >>> m.update_state([0, 2, 4], np.eye(5)[[1, 0, 4]])  # off by 1, 2 and 0
    >>> round(float(m.result()), 4)
    0.6667
    """

    def __init__(self, k=1, decode="argmax", from_logits=False, name=None, dtype=None):
        k = _utils.check_int("k", k, low=0)
        super().__init__(name=name or f"accuracy_within_{k}", dtype=dtype)
        self.k = k
        self._init_decode(decode, from_logits, methods=("argmax", "median"))
        if self._decode_similarity is not None:
            self.num_classes = self._decode_similarity.num_classes

    def _terms(self, labels, y_pred):
        num_classes = y_pred.shape[-1]
        if self.k >= num_classes:
            raise ValueError(
                "Invalid value for argument `k`. Expected k below the number "
                f"of classes ({num_classes}, the last axis of `y_pred`); every "
                f"prediction is within it. Received: k={self.k}"
            )
        predicted, read = self._predicted(y_pred)
        hit = ops.cast(ops.abs(predicted - labels) <= self.k, "float32")
        return hit, ops.ones_like(hit), read

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "k": self.k,
                "decode": self._decode_config(),
                "from_logits": self.from_logits,
            }
        )
        return config


@_utils.register
class QuadraticWeightedKappa(_ClassReader, keras.metrics.Metric):
    """Quadratic weighted kappa (Cohen's kappa with weights `(i - j)^2`).

    The agreement of predicted and true ordered classes beyond chance:
    `1 - sum_ij w_ij O_ij / sum_ij w_ij E_ij` with `O` the (weighted)
    confusion counts, `E` the outer product of their marginals divided by
    the total and `w_ij = (i - j)^2`. 1 is perfect agreement, 0 chance level,
    below 0 worse than chance. Equal to scikit-learn's
    `cohen_kappa_score(y, y_hat, weights="quadratic",
    labels=range(C), sample_weight=w)`.

    Epoch-exact with `O(C)` state: it accumulates the weighted histograms of
    the true and the predicted classes and the weighted sum of
    `(y - y_hat)^2`, so the expectation term is computed from the whole
    epoch's marginals. The result is NaN while the kappa is undefined (no
    examples yet, or every true and predicted class the same one), as in
    scikit-learn; a NaN prediction row or a label that is not a class makes
    it NaN too.

    Args:
        num_classes: int >= 2, the number of classes `C`.
        decode: `"argmax"` (the default), `"median"` or a similarity
            (min-risk decoding), as for `AccuracyWithinK`.
        from_logits: whether `y_pred` holds logits; matters for all but
            `"argmax"`. Defaults to `False`.
        name: Defaults to `"quadratic_weighted_kappa"`.
        dtype: dtype of the result. Defaults to `None` (float32).

    Example:

    >>> m = QuadraticWeightedKappa(3)
    >>> m.update_state([0, 1, 2, 2], np.eye(3)[[0, 2, 2, 1]])
    >>> round(float(m.result()), 4)  # as sklearn's cohen_kappa_score
    0.6364
    """

    _direction = "up"

    def __init__(
        self,
        num_classes,
        decode="argmax",
        from_logits=False,
        name="quadratic_weighted_kappa",
        dtype=None,
    ):
        super().__init__(name=name, dtype=dtype)
        self.num_classes = _utils.check_int("num_classes", num_classes, low=2)
        self._init_decode(decode, from_logits, methods=("argmax", "median"))
        self.true_counts = self.add_variable(
            shape=(self.num_classes,),
            initializer="zeros",
            dtype="float32",
            name="true_counts",
        )
        self.predicted_counts = self.add_variable(
            shape=(self.num_classes,),
            initializer="zeros",
            dtype="float32",
            name="predicted_counts",
        )
        self.squared_error = self.add_variable(
            shape=(), initializer="zeros", dtype="float32", name="squared_error"
        )

    def update_state(self, y_true, y_pred, sample_weight=None):
        y_pred = ops.cast(ops.convert_to_tensor(y_pred), "float32")
        num_classes = _utils.static_num_classes(y_pred)
        _utils.check_num_classes(
            self.num_classes, num_classes, "QuadraticWeightedKappa", "num_classes"
        )
        labels, valid = _utils.sparse_labels(y_true, y_pred)
        flat = ops.reshape(y_pred, (-1, num_classes))
        labels = ops.reshape(labels, (-1,))
        predicted, read = self._predicted(flat)
        valid = ops.logical_and(
            ops.reshape(valid, (-1,)), ops.reshape(_utils.readable_rows(y_pred), (-1,))
        )
        if read is not None:
            valid = ops.logical_and(valid, read)
        if sample_weight is None:
            weight = ops.ones(ops.shape(labels), "float32")
        else:
            weight = _flat_weight(sample_weight, labels)
        # An unreadable example makes every sum NaN rather than being
        # counted as some class.
        weight = ops.where(valid, weight, float("nan"))
        difference = ops.cast(predicted - labels, "float32")
        self.true_counts.assign_add(
            ops.segment_sum(weight, labels, num_segments=self.num_classes)
        )
        self.predicted_counts.assign_add(
            ops.segment_sum(weight, predicted, num_segments=self.num_classes)
        )
        self.squared_error.assign_add(ops.sum(weight * ops.square(difference)))

    def result(self):
        classes = ops.arange(self.num_classes, dtype="float32")
        true, predicted = self.true_counts, self.predicted_counts
        total = ops.sum(true)
        true_mean = ops.sum(true * classes) / total
        predicted_mean = ops.sum(predicted * classes) / total
        # sum_ij (i - j)^2 t_i p_j / N, from centred moments (no cancellation
        # of large raw moments): N (var_t + var_p + (mean_t - mean_p)^2).
        expected = (
            ops.sum(true * ops.square(classes - true_mean))
            + ops.sum(predicted * ops.square(classes - predicted_mean))
            + total * ops.square(true_mean - predicted_mean)
        )
        kappa = 1.0 - self.squared_error / expected  # 0 / 0: NaN, undefined
        return ops.cast(kappa, self.dtype)

    def get_config(self):
        return {
            "num_classes": self.num_classes,
            "decode": self._decode_config(),
            "from_logits": self.from_logits,
            "name": self.name,
            "dtype": self.dtype,
        }


@_utils.register
class ConfusionMatrix(_ClassReader, keras.metrics.Metric):
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
        decode: `"argmax"` (the default), or a similarity: count the
            min-risk class under it (`keras_simloss.decode_min_risk`).
        from_logits: whether `y_pred` holds logits; matters for min-risk
            decoding only. Defaults to `False`.
        name: Defaults to `"confusion_matrix"`.
        dtype: dtype of the result. Defaults to `None` (float32).

    Example:

    >>> m = ConfusionMatrix(3)
    >>> m.update_state([0, 0, 2], [[0.9, 0.1, 0], [0.2, 0.8, 0], [0, 0, 1]],
    ...                sample_weight=[1.0, 2.0, 1.0])
    >>> np.asarray(m.result()).tolist()  # true 0 -> predicted 1 with weight 2
    [[1.0, 2.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0]]
    """

    def __init__(
        self,
        num_classes,
        decode="argmax",
        from_logits=False,
        name="confusion_matrix",
        dtype=None,
    ):
        super().__init__(name=name, dtype=dtype)
        self.num_classes = _utils.check_int("num_classes", num_classes, low=2)
        self._init_decode(decode, from_logits)
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
        predicted, read = self._predicted(
            ops.reshape(ops.cast(y_pred, "float32"), (-1, num_classes))
        )
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
        if read is not None:
            valid = ops.logical_and(ops.reshape(valid, (-1,)), read)
        counts = ops.where(ops.all(valid), counts, float("nan"))
        self.counts.assign_add(counts)

    def result(self):
        return ops.cast(self.counts, self.dtype)

    def get_config(self):
        return {
            "num_classes": self.num_classes,
            "decode": self._decode_config(),
            "from_logits": self.from_logits,
            "name": self.name,
            "dtype": self.dtype,
        }
