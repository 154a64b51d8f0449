"""Private helpers shared by the losses, the metrics and the similarities."""

import keras
import numpy as np
from keras import ops


def concrete_value(x):
    """Returns `x` as a NumPy array when it holds concrete values, else `None`.

    Inside a traced function (`tf.function`, XLA, `jax.jit`) tensors are
    symbolic and their values are unknown; checks that need values (labels in
    range, one-hot rows) can then only run in eager mode.
    """
    if isinstance(x, np.ndarray):
        return x
    if keras.config.backend() == "tensorflow":
        import tensorflow as tf

        if not tf.executing_eagerly() or not hasattr(x, "numpy"):
            return None
        return x.numpy()
    if keras.config.backend() == "jax":
        import jax

        if isinstance(x, jax.core.Tracer):
            return None
    return ops.convert_to_numpy(x)


def static_num_classes(y_pred, what="y_pred"):
    """The size of the last axis of `y_pred`, which must be known statically."""
    num_classes = y_pred.shape[-1] if len(y_pred.shape) else None
    if num_classes is None:
        raise ValueError(
            f"The last axis of `{what}` (the classes) must have a known size. "
            f"Received: {what}.shape={tuple(y_pred.shape)}"
        )
    return num_classes


def sparse_labels(y_true, num_classes):
    """Integer labels of shape `(batch,)` from sparse or one-hot `y_true`.

    Accepted: integer (or integral float) labels of shape `(batch,)` or
    `(batch, 1)`, and one-hot rows of shape `(batch, num_classes)`. One-hot
    rows are turned into indices with `argmax`; in eager mode they are checked
    to be exactly one-hot (soft labels are not supported and would otherwise be
    silently rounded). In eager mode labels are checked to lie in
    `[0, num_classes)`. Inside a traced (XLA) function no value check can run;
    gathers then clamp out-of-range indices (XLA semantics), so bad labels give
    wrong values instead of an error.
    """
    rank = len(y_true.shape)
    if rank == 2 and y_true.shape[-1] == num_classes and num_classes > 1:
        one_hot = concrete_value(y_true)
        if one_hot is not None:
            bad_rows = ~np.all((one_hot == 0) | (one_hot == 1), axis=-1) | (
                one_hot.sum(axis=-1) != 1
            )
            if np.any(bad_rows):
                raise ValueError(
                    "Labels of shape (batch, num_classes) must be one-hot: "
                    "every row all zeros but a single 1 (soft labels are not "
                    "supported; pass class indices or exact one-hot rows). "
                    f"Received: a y_true row {one_hot[bad_rows][0].tolist()}"
                )
        labels = ops.argmax(y_true, axis=-1)
    elif rank == 2 and y_true.shape[-1] == 1:
        labels = ops.squeeze(y_true, axis=-1)
    else:
        labels = y_true
    if len(labels.shape) != 1:
        raise ValueError(
            "Expected labels of shape (batch,), (batch, 1) or (batch, "
            f"num_classes) with num_classes={num_classes}. Received: "
            f"y_true.shape={tuple(y_true.shape)}"
        )
    values = concrete_value(labels)
    if values is not None and values.size:
        bad = (values != np.round(values)) | (values < 0) | (values >= num_classes)
        if np.any(bad):
            raise ValueError(
                "Invalid value in `y_true`. Expected integer class indices in "
                f"[0, {num_classes}). Received: y_true containing "
                f"{values[bad][:5].tolist()}"
            )
    return ops.cast(labels, "int32")


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
