"""Private helpers shared by the losses, the metrics and the similarities."""

import math

import keras
import numpy as np
from keras import ops

from keras_simloss import _backend

PACKAGE = "keras_simloss"
"""The package name under which every public class is registered."""


def register(cls):
    """`keras.saving.register_keras_serializable` with this package's name."""
    return keras.saving.register_keras_serializable(package=PACKAGE)(cls)


# Argument validators. One exception type per kind of mistake, as in Keras:
# a `TypeError` when the argument has the wrong type (a float where an int is
# needed, a string where a number is), a `ValueError` when its type is right
# but its value is not (out of range, wrong shape, not finite). Messages name
# the argument, the expected and the received value.


def check_int(name, value, low=None, high=None, high_name=None):
    """Validates an integer argument in `[low, high)`; returns a Python int.

    Python and NumPy integers are accepted (booleans are not); `low` and
    `high` are optional bounds, `low` inclusive and `high` exclusive.
    `high_name` names the upper bound in the message (`k < num_classes=10`).
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(
            f"Invalid type for argument `{name}`. Expected an int. "
            f"Received: {name}={value!r} of type {type(value).__name__}"
        )
    value = int(value)
    if (low is not None and value < low) or (high is not None and value >= high):
        if high is None:
            bounds = f"{name} >= {low}"
        else:
            upper = f"{high_name}={high}" if high_name else f"{high}"
            lower = f"{low} <= " if low is not None else ""
            bounds = f"{lower}{name} < {upper}"
        raise ValueError(
            f"Invalid value for argument `{name}`. Expected an int with "
            f"{bounds}. Received: {name}={value}"
        )
    return value


def check_bool(name, value):
    """Validates a boolean argument (a Python bool, nothing coerced)."""
    if not isinstance(value, bool):
        raise TypeError(
            f"Invalid type for argument `{name}`. Expected a bool. "
            f"Received: {name}={value!r}"
        )
    return value


def check_choice(name, value, choices):
    """Validates that `value` is one of `choices` (strings)."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(
            f"Invalid value for argument `{name}`. Expected one of "
            f"{tuple(choices)}. Received: {name}={value!r}"
        )
    return value


def check_number(
    name,
    value,
    low=None,
    high=None,
    low_inclusive=True,
    high_inclusive=False,
):
    """Validates a finite real scalar argument; returns it as a Python float.

    Python and NumPy ints and floats are accepted (booleans are not). The
    bounds are optional; `low_inclusive` / `high_inclusive` say whether each
    is allowed.
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(
        value, (int, float, np.integer, np.floating)
    ):
        raise TypeError(
            f"Invalid type for argument `{name}`. Expected a number. "
            f"Received: {name}={value!r} of type {type(value).__name__}"
        )
    value = float(value)
    ok = math.isfinite(value)
    if low is not None:
        ok = ok and (value >= low if low_inclusive else value > low)
    if high is not None:
        ok = ok and (value <= high if high_inclusive else value < high)
    if not ok:
        parts = []
        if low is not None:
            parts.append(f"{low} {'<=' if low_inclusive else '<'} ")
        parts.append(name)
        if high is not None:
            parts.append(f" {'<=' if high_inclusive else '<'} {high}")
        raise ValueError(
            f"Invalid value for argument `{name}`. Expected a finite number "
            f"with {''.join(parts)}. Received: {name}={value}"
        )
    return value


def real_array(name, value, expected, integer=False):
    """`value` as a NumPy array of real numbers (or of integers).

    `numpy.asarray(value, float)` would also take numeric strings ("0.5") and
    drop the imaginary part of complex numbers, so the dtype is checked
    before any conversion: anything but real numbers (booleans included) or,
    with `integer=True`, integers raises a `TypeError`. `expected` describes
    the array in the message ("a square matrix").
    """
    what = "integers" if integer else "real numbers"
    if keras.ops.is_tensor(value):
        value = ops.convert_to_numpy(value)
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as error:  # e.g. ragged nested lists
        raise TypeError(
            f"Invalid type for argument `{name}`. Expected {expected} of "
            f"{what}. Received: {name} of type {type(value).__name__} ({error})"
        ) from None
    if array.dtype.kind not in ("iu" if integer else "biuf"):
        raise TypeError(
            f"Invalid type for argument `{name}`. Expected {expected} of "
            f"{what}. Received: {name} of dtype {array.dtype}"
        )
    return array


def check_vector(name, value, integer=False, per="class"):
    """A 1-D array of at least 2 numbers (finite) or integers, one per `per`.

    Returns a float64 NumPy array, or integers in their own dtype (never
    cast, so ids of any size stay exact). Wrong dtypes raise a `TypeError`
    (see `real_array`), a wrong shape or a non-finite value a `ValueError`.
    """
    array = real_array(name, value, "a 1-D array", integer=integer)
    if array.ndim != 1 or array.shape[0] < 2:
        raise ValueError(
            f"Invalid value for argument `{name}`. Expected a 1-D array, one "
            f"per {per} (at least 2). Received: {name} of shape {array.shape}"
        )
    if integer:
        return array
    array = array.astype(np.float64)
    if not np.all(np.isfinite(array)):
        raise ValueError(
            f"Invalid value for argument `{name}`. Expected finite values. "
            f"Received: {name}={array.tolist()}"
        )
    return array


def check_class_values(class_values, increasing=False):
    """Validates `class_values`, the value of each class; float32 or `None`.

    Any finite 1-D array of at least 2 numbers; with `increasing=True`
    (the median read-out) strictly increasing values, since "the first class
    whose cumulative probability reaches 0.5" is the median only when the
    classes are in the order of their values.
    """
    if class_values is None:
        return None
    array = check_vector("class_values", class_values)
    if increasing and np.any(np.diff(array) <= 0):
        i = int(np.argmax(np.diff(array) <= 0))
        raise ValueError(
            "Invalid value for argument `class_values`. Expected strictly "
            'increasing values for method="median" (the classes must be in '
            "the order of their values). Received: class_values"
            f"[{i}]={array[i]}, class_values[{i + 1}]={array[i + 1]}"
        )
    return array.astype(np.float32)


def static_num_classes(y_pred, what="y_pred"):
    """The size of the last axis of `y_pred`, which must be known statically."""
    num_classes = y_pred.shape[-1] if len(y_pred.shape) else None
    if num_classes is None:
        raise ValueError(
            f"The last axis of `{what}` (the classes) must have a known size. "
            f"Received: {what}.shape={tuple(y_pred.shape)}"
        )
    return num_classes


def _shapes_agree(a, b):
    """Static shapes agree where both sizes are known."""
    return len(a) == len(b) and all(
        x is None or y is None or x == y for x, y in zip(a, b)
    )


def _label_kind(y_true_shape, y_pred_shape):
    """`"sparse"`, `"sparse1"` (trailing 1) or `"one_hot"`, from static shapes.

    Decided by rank, as Keras's sparse and categorical cross entropies do,
    never by a coincidence of sizes: labels with one axis fewer than the
    predictions are class indices; labels of the predictions' rank are
    one-hot rows when their last axis has the predictions' size, and class
    indices with a trailing axis of 1 when it is 1.
    """
    leading = y_pred_shape[:-1]
    if len(y_true_shape) == len(y_pred_shape) and y_true_shape[-1] is None:
        raise ValueError(
            "The last axis of `y_true` must have a known size when labels and "
            "predictions have the same rank: 1 means class indices, "
            f"{y_pred_shape[-1]} one-hot rows. Received: "
            f"y_true.shape={tuple(y_true_shape)}, "
            f"y_pred.shape={tuple(y_pred_shape)}"
        )
    if len(y_true_shape) == len(y_pred_shape) - 1:
        if _shapes_agree(y_true_shape, leading):
            return "sparse"
    elif len(y_true_shape) == len(y_pred_shape):
        if _shapes_agree(y_true_shape, y_pred_shape) and y_true_shape[-1] != 1:
            return "one_hot"
        if y_true_shape[-1] == 1 and _shapes_agree(y_true_shape[:-1], leading):
            return "sparse1"
    raise ValueError(
        "Labels and predictions have incompatible shapes. Expected `y_true` "
        "of shape y_pred.shape[:-1] (class indices), y_pred.shape[:-1] + (1,) "
        "(class indices) or y_pred.shape (one-hot rows), with "
        f"y_pred.shape[-1] the number of classes. Received: "
        f"y_true.shape={tuple(y_true_shape)}, y_pred.shape={tuple(y_pred_shape)}"
    )


def sparse_labels(y_true, y_pred):
    """Validated integer labels of shape `y_pred.shape[:-1]`, and a validity mask.

    Accepted, as for Keras's cross entropies (decided by rank, at trace
    time): class indices of shape `y_pred.shape[:-1]` or
    `y_pred.shape[:-1] + (1,)`, and one-hot rows of shape `y_pred.shape`.
    Any other combination raises a `ValueError` naming both shapes.

    Values: in eager mode a label outside `[0, C)`, a non-integer or NaN
    label, or a row that is not exactly one-hot raises a `ValueError`.
    Inside a compiled function no error can be raised; such examples are
    flagged in the returned mask instead, and get the placeholder class 0 so
    that every gather stays in range. Callers turn the flagged examples'
    values into NaN, so a bad label is never silently read as another class.

    Args:
        y_true: the labels.
        y_pred: the predictions, shape `(..., C)`; only its static shape is
            used.

    Returns:
        `(labels, valid)`: int32 labels and a boolean mask, both of shape
        `y_pred.shape[:-1]`.
    """
    if isinstance(y_true, (list, tuple)):
        y_true = np.asarray(y_true)
    if (
        isinstance(y_true, np.ndarray)
        and np.issubdtype(y_true.dtype, np.integer)
        and y_true.size
        and (y_true.min() < 0 or y_true.max() > np.iinfo(np.int32).max)
    ):
        # Checked before the conversion: JAX without 64-bit mode converts
        # int64 to int32, which would wrap 2**32 to class 0.
        bad = y_true[(y_true < 0) | (y_true > np.iinfo(np.int32).max)]
        raise ValueError(
            "Invalid value in `y_true`. Expected integer class indices in "
            f"[0, {static_num_classes(y_pred)}). Received: y_true containing "
            f"{bad.ravel()[:5].tolist()}"
        )
    y_true = ops.convert_to_tensor(y_true)
    if len(y_pred.shape) < 1:
        raise ValueError(
            "Expected predictions with a class axis, of shape (..., C). "
            f"Received: y_pred.shape={tuple(y_pred.shape)}"
        )
    num_classes = static_num_classes(y_pred)
    kind = _label_kind(tuple(y_true.shape), tuple(y_pred.shape))
    if kind == "one_hot":
        rows = ops.cast(y_true, "float32")
        exact = ops.all(ops.logical_or(rows == 0.0, rows == 1.0), axis=-1)
        valid = ops.logical_and(exact, ops.sum(rows, axis=-1) == 1.0)
        labels = ops.cast(ops.argmax(rows, axis=-1), "int32")
        values = _backend.concrete_value(valid)
        if values is not None and not np.all(values):
            bad = _backend.concrete_value(rows)[~values][0]
            raise ValueError(
                "Invalid value in `y_true`. Labels of the predictions' shape "
                "must be one-hot: every row all zeros but a single 1 (soft "
                "labels are not supported; pass class indices or exact one-hot "
                f"rows). Received: a y_true row {bad.tolist()}"
            )
        return labels, valid
    if kind == "sparse1":
        y_true = ops.squeeze(y_true, axis=-1)
    if "int" in keras.backend.standardize_dtype(y_true.dtype):
        # The range check in the labels' own dtype: a cast to int32 first
        # would wrap 2**32 to class 0.
        valid = ops.logical_and(y_true >= 0, y_true < num_classes)
        labels = ops.cast(ops.where(valid, y_true, 0), "int32")
    else:
        values = ops.cast(y_true, "float32")
        # NaN fails every comparison, so it is flagged too.
        valid = ops.logical_and(
            ops.logical_and(values >= 0.0, values < float(num_classes)),
            values == ops.floor(values),
        )
        labels = ops.cast(ops.where(valid, values, 0.0), "int32")
    concrete = _backend.concrete_value(valid)
    if concrete is not None and not np.all(concrete):
        bad = np.asarray(_backend.concrete_value(y_true))[~concrete]
        raise ValueError(
            "Invalid value in `y_true`. Expected integer class indices in "
            f"[0, {num_classes}). Received: y_true containing "
            f"{bad.ravel()[:5].tolist()}"
        )
    return ops.where(valid, labels, 0), valid


def expand_sample_weight(sample_weight, values):
    """Sample weights as a float32 tensor that broadcasts against `values`.

    As in Keras: a scalar, per-example weights `(batch,)` or `(batch, 1)`,
    or per-element weights of `values`' shape (optionally with a trailing
    1, which is dropped); missing trailing axes (time steps, pixels) are
    added, so a per-example weight spreads over them.
    """
    weight = ops.cast(ops.convert_to_tensor(sample_weight), "float32")
    rank = len(values.shape)
    if len(weight.shape) == rank + 1 and weight.shape[-1] == 1:
        weight = ops.squeeze(weight, -1)
    if len(weight.shape) > rank:
        raise ValueError(
            "Invalid shape for argument `sample_weight`. Expected a scalar, "
            "the labels' leading shape or the labels' shape. Received: "
            f"sample_weight.shape={tuple(weight.shape)} for labels of shape "
            f"{tuple(values.shape)}"
        )
    while len(weight.shape) < rank:
        weight = ops.expand_dims(weight, -1)
    return weight


def nan_where_invalid(values, valid):
    """`values` where `valid`, NaN elsewhere (see `sparse_labels`)."""
    return ops.where(valid, values, float("nan"))


def check_num_classes(expected_classes, output_classes, owner, source="similarity"):
    """Raises when the classes of `owner` and of the model output differ.

    `source` names what gave `owner` its classes: `"similarity"`, or an
    argument such as `"class_values"` (one value per class).
    """
    if expected_classes == output_classes:
        return
    if source == "similarity":
        raise ValueError(
            f"`{owner}` has a similarity over {expected_classes} classes, "
            f"but the predictions have {output_classes} classes (last axis of "
            f"`y_pred`). The two must match. Received: "
            f"similarity.num_classes={expected_classes}, "
            f"y_pred.shape[-1]={output_classes}"
        )
    raise ValueError(
        f"`{owner}` has `{source}` for {expected_classes} classes, but the "
        f"predictions have {output_classes} classes (last axis of `y_pred`). "
        f"The two must match. Received: len({source})={expected_classes}, "
        f"y_pred.shape[-1]={output_classes}"
    )


def dense_codes(ids):
    """Integer ids as int32 codes `0, ..., n - 1` of the distinct ids, exactly.

    Ids are labels, not numbers: `[0, 2**32, 1]` are three different
    superclasses, which a cast to int32 would merge (2**32 wraps to 0). The
    codes keep the ids' order, so equal ids get equal codes and only they.
    """
    return np.unique(np.asarray(ids), return_inverse=True)[1].astype(np.int32)


# Predictions --------------------------------------------------------------
#
# One rule wherever a prediction is read (the loss, the read-outs, every
# metric): an example whose row of predictions holds a NaN is never read as
# a class. Its loss, read-out or metric contribution is NaN, as for a label
# that is not a class (`sparse_labels`), so a diverged model reports NaN,
# never a plausible number. No error is raised for NaN: evaluating a
# diverged model should report it, not stop.


def readable_rows(y_pred):
    """Per example (`y_pred.shape[:-1]`): whether its row holds no NaN.

    Read from the row's plain sum, which is NaN exactly when the row holds a
    NaN (or both infinities, no predictions either): a sum reads the row
    with no elementwise producer, so under XLA no `(batch, C)` mask is held
    for it in a training step.
    """
    return ops.logical_not(ops.isnan(ops.sum(y_pred, axis=-1)))


def check_probabilities(y_pred, readable):
    """Per example: whether its row is a distribution (finite, `>= 0`).

    For read-outs that weigh classes by their probabilities (median, mean).
    In eager mode a readable row (no NaN, see `readable_rows`) with a
    negative or infinite entry raises a `ValueError`: the usual cause is
    logits passed without `from_logits=True`. Inside a compiled function it
    is flagged in the returned mask instead (callers give it NaN).
    """
    proper = ops.all(ops.logical_and(ops.isfinite(y_pred), y_pred >= 0.0), axis=-1)
    concrete = _backend.concrete_value(
        ops.logical_or(proper, ops.logical_not(readable))
    )
    if concrete is not None and not np.all(concrete):
        row = np.asarray(_backend.concrete_value(y_pred))[~concrete][0]
        raise ValueError(
            "Invalid value in `y_pred`. Expected probabilities (finite and "
            "non-negative); pass `from_logits=True` for logits. Received: a "
            f"y_pred row {np.round(row, 6).tolist()[:10]}"
        )
    return ops.logical_and(readable, proper)
