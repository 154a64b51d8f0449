"""Read a predicted distribution over ordered classes as one number.

For ordered classes (ages, ratings, grades) with values `v_1 < ... < v_C`
and a predicted distribution `p`, three read-outs are in use, each best for
a different error measure:

- `"argmax"`: `v[argmax_c p_c]`, the most likely class; maximises the chance
  of an exact hit (accuracy).
- `"median"`: `v[m]` with `m` the first class whose cumulative probability
  `p_1 + ... + p_m` reaches 0.5; minimises the expected absolute error
  (MAE) under `p`.
- `"mean"`: `sum_c p_c v_c`, the expected value; minimises the expected
  squared error (MSE) under `p`. It may fall between classes.

`decode_ordinal` is the pure function (`keras.ops`, any backend, traceable
under XLA); `OrdinalDecoding` is the same as a layer, to append to a trained
classifier so that the exported model outputs an age.

For any class similarity `S` (ordered or not), `decode_min_risk` picks the
class of minimum expected cost with cost `1 - S` (Karthik et al.'s CRM), and
`MinRiskDecoding` is the same as a layer.

References:
    Rothe, Timofte, Van Gool, "DEX: Deep EXpectation of apparent age from a
    single image", ICCV Workshops 2015 (the mean read-out).
    Paplham, Franc, "A Call to Reflect on Evaluation Practices for Age
    Estimation", CVPR 2024. https://arxiv.org/abs/2307.04570
    Karthik, Prabhu, Dokania, Torr, "No Cost Likelihood Manipulation at Test
    Time for Making Better Mistakes in Deep Networks", ICLR 2021.
    https://arxiv.org/abs/2104.00795
"""

import keras
from keras import ops

from keras_simloss import _backend, _utils
from keras_simloss import similarity as similarity_lib
from keras_simloss.similarity.saving import SimilarityHolder

__all__ = [
    "METHODS",
    "MinRiskDecoding",
    "OrdinalDecoding",
    "decode_min_risk",
    "decode_ordinal",
]

METHODS = ("argmax", "median", "mean")


def _check_shape(y_pred, class_values):
    """The number of classes of `y_pred`; checks `class_values` against it."""
    num_classes = _utils.static_num_classes(y_pred)
    if class_values is not None and class_values.shape[0] != num_classes:
        raise ValueError(
            "Invalid value for argument `class_values`. Expected one value per "
            f"class, {num_classes} (the last axis of `y_pred`). Received: "
            f"{class_values.shape[0]} class values for y_pred.shape="
            f"{tuple(y_pred.shape)}"
        )
    return num_classes


def _decode(y_pred, method, class_values, from_logits):
    """`decode_ordinal` on already validated arguments."""
    y_pred = ops.convert_to_tensor(y_pred)
    num_classes = _check_shape(y_pred, class_values)
    # float32 whatever the input dtype: a float16 cumulative sum over many
    # classes would round the 0.5 crossing, and ages need more than 11 bits.
    y_pred = ops.cast(y_pred, "float32")
    if method == "argmax":
        # Softmax keeps the order, so logits and probabilities give the same.
        index = ops.argmax(y_pred, axis=-1)
        valid = _utils.readable_rows(y_pred)
    else:
        if from_logits:
            probabilities = ops.softmax(y_pred, axis=-1)
            valid = _utils.readable_rows(probabilities)  # NaN in, NaN out
        else:
            probabilities = y_pred
            valid = _utils.check_probabilities(y_pred, _utils.readable_rows(y_pred))
        # Divide by the total (1 up to rounding) so that the read-out does not
        # depend on whether the probabilities were normalised exactly. A row
        # without mass (all zeros) is no distribution: NaN.
        total = ops.sum(probabilities, axis=-1)
        valid = ops.logical_and(valid, total > 0.0)
        if method == "mean":
            values = (
                ops.arange(num_classes, dtype="float32")
                if class_values is None
                else ops.convert_to_tensor(class_values)
            )
            mean = ops.sum(probabilities * values, axis=-1) / total
            return _utils.nan_where_invalid(mean, valid)
        # The cumulative sum only grows, so the number of classes still
        # below half the mass is the index of the first one that reaches it.
        below = _count_below(probabilities, 0.5 * total, num_classes)
        index = ops.minimum(below, num_classes - 1)
    index = ops.cast(index, "int32")
    if class_values is None:
        value = ops.cast(index, "float32")
    else:
        value = ops.take(ops.convert_to_tensor(class_values), index)
    # A row that cannot be read (a NaN; see `_utils.readable_rows`) is never
    # read as a class.
    return _utils.nan_where_invalid(value, valid)


def _count_below(probabilities, level, num_classes):
    """How many cumulative sums `p_1 + ... + p_m` of each row are below
    `level`, int32 of shape `probabilities.shape[:-1]`."""
    blocks = _backend.class_blocks(num_classes)
    if blocks == 1:
        cumulative = ops.cumsum(probabilities, axis=-1)
        return ops.sum(ops.cast(cumulative < ops.expand_dims(level, -1), "int32"), -1)
    # Classes sharded over devices (`keras_simloss.sharding`): XLA would
    # gather whole rows for one scan over all classes. Written as local work
    # plus a small scan instead: each block (a device's classes) scans its
    # own, and adds the mass of the blocks before it, a scan over `(..., n)`
    # block totals; the count is a local sum plus an all-reduce.
    cut = ops.reshape(
        probabilities, tuple(probabilities.shape[:-1]) + (blocks, num_classes // blocks)
    )
    within = ops.cumsum(cut, axis=-1)
    totals = within[..., -1]
    before = ops.concatenate(
        [ops.zeros_like(totals[..., :1]), ops.cumsum(totals, axis=-1)[..., :-1]], -1
    )
    cumulative = within + ops.expand_dims(before, -1)
    below = cumulative < ops.expand_dims(ops.expand_dims(level, -1), -1)
    return ops.sum(ops.cast(below, "int32"), axis=(-2, -1))


def decode_ordinal(y_pred, method="argmax", class_values=None, from_logits=False):
    """Turns predicted class distributions into values by an ordinal read-out.

    With `v` the class values (the class indices `0, ..., C - 1` when
    `class_values` is `None`) and `p` the predicted distribution:

    - `"argmax"`: `v[argmax_c p_c]` (most likely class; best for accuracy);
    - `"median"`: `v[m]`, `m` the first class with `p_1 + ... + p_m >= 0.5`
      (minimises the expected absolute error);
    - `"mean"`: `sum_c p_c v_c` (minimises the expected squared error).

    Computed in float32 with `keras.ops`, so it runs on TensorFlow, JAX and
    PyTorch and inside XLA. For `"median"` and `"mean"` the probabilities
    are divided by their sum (1 up to rounding). The median is read from a
    float32 cumulative sum: where the exact one lies within float32 rounding
    of one half (of the softmax and of the sum; margins below `1e-5`
    with thousands of classes of similar probability), the read-out may be
    the next class. With the classes sharded over devices
    (`keras_simloss.sharding`) each device scans its own classes.

    A row that cannot be read gives NaN, never a class: a row holding a NaN
    (a diverged model), and for `"median"` and `"mean"` a row without mass
    (all zeros). Probabilities (`from_logits=False`) with a negative or
    infinite entry raise a `ValueError` in eager mode for `"median"` and
    `"mean"` (the usual cause: logits without `from_logits=True`) and give
    NaN inside a compiled function.

    Args:
        y_pred: tensor of shape `(..., C)`: logits (`from_logits=True`) or
            probabilities. The last axis must have a known size.
        method: `"argmax"`, `"median"` or `"mean"`. Defaults to `"argmax"`.
        class_values: optional 1-D array-like of `C` finite numbers, the
            value of each class (e.g. the ages `1, ..., 90`). Must be strictly
            increasing for `"median"`. Defaults to `None`, the class indices.
        from_logits: whether `y_pred` holds logits. Defaults to `False`.

    Returns:
        A float32 tensor of shape `y_pred.shape[:-1]`.

    Example:

    >>> p = np.array([[0.2, 0.1, 0.3, 0.4], [0.3, 0.3, 0.4, 0.0]])
    >>> for method in METHODS:  # argmax 3 and 2; cumulative 0.2, 0.3, 0.6 ...
    ...     print(method, np.asarray(decode_ordinal(p, method), np.float64).round(4))
    argmax [3. 2.]
    median [2. 1.]
    mean [1.9 1.1]
    >>> ages = decode_ordinal(p, "median", class_values=[10, 20, 30, 40])
    >>> np.asarray(ages).tolist()
    [30.0, 20.0]
    """
    method = _utils.check_choice("method", method, METHODS)
    class_values = _utils.check_class_values(class_values, method == "median")
    from_logits = _utils.check_bool("from_logits", from_logits)
    return _decode(y_pred, method, class_values, from_logits)


@_utils.register
class OrdinalDecoding(keras.layers.Layer):
    """Layer that reads a class distribution as a value (e.g. an age).

    Append it to a trained classifier to export a model that outputs the
    value directly: `(..., C)` logits or probabilities in, `(...)` float32
    values out, by `decode_ordinal`. It has no weights; its config holds the
    arguments, so a saved model loads with `keras.models.load_model` and no
    `custom_objects` once `keras_simloss` is imported.

    Args:
        method: `"argmax"`, `"median"` or `"mean"`. Defaults to `"median"`,
            the read-out with the smallest expected absolute error.
        class_values: optional 1-D array-like of `C` numbers, the value of
            each class. Defaults to `None`, the class indices.
        from_logits: whether the inputs are logits. Defaults to `False`.
        **kwargs: base layer arguments (`name`, ...).

    Example:

    >>> import keras
    >>> classifier = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3)])
    >>> exported = keras.Sequential(
    ...     [classifier, OrdinalDecoding("mean", [20, 30, 40], from_logits=True)]
    ... )
    >>> exported.predict(np.zeros((4, 2)), verbose=0).shape
    (4,)
    """

    def __init__(self, method="median", class_values=None, from_logits=False, **kwargs):
        super().__init__(**kwargs)
        self.method = _utils.check_choice("method", method, METHODS)
        self.class_values = _utils.check_class_values(
            class_values, self.method == "median"
        )
        self.from_logits = _utils.check_bool("from_logits", from_logits)
        self.built = True  # no weights

    def call(self, inputs):
        return _decode(inputs, self.method, self.class_values, self.from_logits)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)[:-1]

    def compute_output_spec(self, inputs):
        _check_shape(inputs, self.class_values)
        return keras.KerasTensor(tuple(inputs.shape)[:-1], dtype="float32")

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "method": self.method,
                "class_values": (
                    None if self.class_values is None else self.class_values.tolist()
                ),
                "from_logits": self.from_logits,
            }
        )
        return config


def min_risk_classes(y_pred, similarity, from_logits, owner="decode_min_risk"):
    """`(classes, valid)` of min-risk decoding, on validated arguments.

    `classes`: int32 of shape `y_pred.shape[:-1]`; `valid`: whether each row
    could be read (callers give the others NaN).
    """
    y_pred = ops.cast(ops.convert_to_tensor(y_pred), "float32")
    num_classes = _utils.static_num_classes(y_pred)
    _utils.check_num_classes(similarity.num_classes, num_classes, owner)
    leading = ops.shape(y_pred)[:-1]
    if from_logits:
        probabilities = ops.softmax(y_pred, axis=-1)
        valid = _utils.readable_rows(probabilities)
    else:
        probabilities = y_pred
        valid = _utils.check_probabilities(y_pred, _utils.readable_rows(y_pred))
        # The expected similarities scale with the total, so it is not
        # divided out; a row without mass is no distribution.
        valid = ops.logical_and(valid, ops.sum(y_pred, axis=-1) > 0.0)
    flat = ops.reshape(probabilities, (-1, num_classes))
    if 0 in tuple(flat.shape):
        return ops.zeros(leading, "int32"), valid
    classes = ops.argmax(similarity.expected(flat), axis=-1)
    return ops.reshape(ops.cast(classes, "int32"), leading), valid


def decode_min_risk(y_pred, similarity, from_logits=False):
    """The class of least expected cost under the predictions (min-risk).

    For each example, the class `j` that maximises the expected similarity
    to the truth under the predicted distribution `p`,
    `sum_c p_c S[c, j]`: the minimum expected cost with cost `1 - S`
    (Karthik et al.'s CRM, "conditional risk minimisation"). With `S` the
    identity it is the argmax. It changes only the read-out, not the model:
    apply it to a model trained with any loss.

    Computed with `keras.ops` in float32 on any backend and under XLA;
    `Similarity.expected` gives the expected similarities without a `C x C`
    matrix for the structured kinds (`ordinal`: two scans, `O(C log C)` per
    example; a hierarchy that is a tree: one segment sum per level;
    `top_k`/`SparseSimilarity`: one per neighbour slot; embeddings: all rows
    in blocks, `O(C^2 d)` per batch). Ties go to the smaller class index.

    Args:
        y_pred: logits (`from_logits=True`) or probabilities, `(..., C)`.
        similarity: a `Similarity` or a `(C, C)` array-like over the same
            `C` classes.
        from_logits: whether `y_pred` holds logits. Defaults to `False`.

    Returns:
        float32 class indices of shape `y_pred.shape[:-1]` (exact up to
        2**24 classes); NaN for a row that cannot be read: one holding a NaN,
        a row of probabilities without mass (all zeros), and, inside a
        compiled function, probabilities with a negative or infinite entry
        (which raise a `ValueError` in eager mode: the usual cause is logits
        passed without `from_logits=True`). Cast to int after checking for
        NaN, e.g. with `keras.ops.isnan`.

    Example:

    >>> from keras_simloss import similarity
    >>> p = np.array([[0.4, 0.0, 0.3, 0.3]])  # argmax says class 0
    >>> s = similarity.ordinal(4, 0.5)
    >>> # class 2: 0.4 * 0.25 + 0.3 * 1 + 0.3 * 0.5 = 0.55
    >>> # class 0: 0.4 * 1 + 0.3 * 0.25 + 0.3 * 0.125 = 0.5125
    >>> np.asarray(decode_min_risk(p, s)).tolist()
    [2.0]

    Reference:
        Karthik et al., "No Cost Likelihood Manipulation at Test Time for
        Making Better Mistakes in Deep Networks", ICLR 2021.
        https://arxiv.org/abs/2104.00795
    """
    similarity = similarity_lib.get(similarity)
    from_logits = _utils.check_bool("from_logits", from_logits)
    classes, valid = min_risk_classes(y_pred, similarity, from_logits)
    return _utils.nan_where_invalid(ops.cast(classes, "float32"), valid)


@_utils.register
class MinRiskDecoding(SimilarityHolder, keras.layers.Layer):
    """Layer that outputs the min-risk class of its inputs (`decode_min_risk`).

    Append it to a trained classifier to export a model whose output is the
    class of least expected cost under a similarity: `(..., C)` in, float32
    class indices `(...)` out (NaN for unreadable rows). It has no weights;
    the similarity is saved in its config and, if large, in the `.keras`
    archive, as for `SimLoss`.

    Args:
        similarity: a `Similarity` or a `(C, C)` array-like.
        from_logits: whether the inputs are logits. Defaults to `False`.
        **kwargs: base layer arguments (`name`, ...).

    Example:

    >>> import keras
    >>> from keras_simloss import similarity
    >>> classifier = keras.Sequential([keras.Input((2,)), keras.layers.Dense(5)])
    >>> exported = keras.Sequential(
    ...     [classifier, MinRiskDecoding(similarity.ordinal(5, 0.7), from_logits=True)]
    ... )
    >>> exported.predict(np.zeros((4, 2)), verbose=0).shape
    (4,)
    """

    def __init__(self, similarity, from_logits=False, **kwargs):
        super().__init__(**kwargs)
        self.similarity = similarity_lib.get(similarity)
        self.from_logits = _utils.check_bool("from_logits", from_logits)
        self.built = True  # no weights

    def call(self, inputs):
        return decode_min_risk(inputs, self.similarity, self.from_logits)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)[:-1]

    def compute_output_spec(self, inputs):
        _utils.check_num_classes(
            self.similarity.num_classes,
            _utils.static_num_classes(inputs),
            "MinRiskDecoding",
        )
        return keras.KerasTensor(tuple(inputs.shape)[:-1], dtype="float32")

    def get_config(self):
        config = super().get_config()
        config["similarity"] = keras.saving.serialize_keras_object(self.similarity)
        config["from_logits"] = self.from_logits
        return config
