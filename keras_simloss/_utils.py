"""Private helpers shared by the losses, the metrics and the similarities."""

import math

import keras
import numpy as np
from keras import ops

PACKAGE = "keras_simloss"
"""The package name under which every public class is registered."""


def register(cls):
    """`keras.saving.register_keras_serializable` with this package's name."""
    return keras.saving.register_keras_serializable(package=PACKAGE)(cls)


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


def concrete_value(x):
    """Returns `x` as a NumPy array when it holds concrete values, else `None`.

    Inside a traced function (`tf.function`, XLA, `jax.jit`,
    `torch.compile`) tensors are symbolic and their values are unknown;
    checks that need values (labels in range, one-hot rows) can then only run
    in eager mode.
    """
    if isinstance(x, np.ndarray):
        return x
    backend = keras.config.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        if not tf.executing_eagerly() or not hasattr(x, "numpy"):
            return None
        return x.numpy()
    if backend == "jax":
        import jax

        if isinstance(x, jax.core.Tracer):
            return None
    if backend == "torch":
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
        values = concrete_value(valid)
        if values is not None and not np.all(values):
            bad = concrete_value(rows)[~values][0]
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
    concrete = concrete_value(valid)
    if concrete is not None and not np.all(concrete):
        bad = np.asarray(concrete_value(y_true))[~concrete]
        raise ValueError(
            "Invalid value in `y_true`. Expected integer class indices in "
            f"[0, {num_classes}). Received: y_true containing "
            f"{bad.ravel()[:5].tolist()}"
        )
    return ops.where(valid, labels, 0), valid


def nan_where_invalid(values, valid):
    """`values` where `valid`, NaN elsewhere (see `sparse_labels`)."""
    return ops.where(valid, values, float("nan"))


def check_num_classes(similarity_classes, output_classes, owner):
    """Raises when the similarity and the model output disagree in size."""
    if similarity_classes != output_classes:
        raise ValueError(
            f"`{owner}` has a similarity over {similarity_classes} classes, "
            f"but the predictions have {output_classes} classes (last axis of "
            f"`y_pred`). The two must match. Received: "
            f"similarity.num_classes={similarity_classes}, "
            f"y_pred.shape[-1]={output_classes}"
        )
