"""Class-sharded training: the label space split over devices.

When `C` outgrows one device, `keras.distribution.ModelParallel` can lay the
output layer's kernel out as `(None, "model")`: each device then holds `C / n`
columns and computes `C / n` logits, and XLA's partitioner (GSPMD) turns the
loss's sums over classes into local sums plus an all-reduce. Two helpers make
SimLoss, soft labels and the similarity metrics train that way:

- `class_layout_map`: the `LayoutMap` entries that shard an output layer's
  kernel and bias over a mesh axis;
- `shard_classes`: lays a similarity's per-class state (embedding table,
  neighbour lists, hierarchy ids, dense table) out along the same axis, as
  variables of the model's state, so each device holds `1 / n` of it.

Without `shard_classes` the numbers are the same, but the similarity's arrays
are constants of the compiled step, whole on every device (at `C = 10**7`
and `d = 300`, 12 GB each).

Example, on 4 simulated CPU devices (JAX; set
`XLA_FLAGS=--xla_force_host_platform_device_count=4` before JAX starts):

```python
import keras
import keras_simloss as ks

mesh = keras.distribution.DeviceMesh((1, 4), ["batch", "model"])
keras.distribution.set_distribution(
    keras.distribution.ModelParallel(
        layout_map=ks.sharding.class_layout_map(mesh, "logits"),
        batch_dim_name="batch",
    )
)
similarity = ks.similarity.from_embeddings(vectors)  # (C, d)
inputs = keras.Input((64,))
model = keras.Model(inputs, keras.layers.Dense(C, name="logits")(inputs))
ks.sharding.shard_classes(model, similarity)  # before `fit`
model.compile("adam", loss=ks.SimLoss(similarity, from_logits=True))
```

What stays whole: the labels, and per example a few numbers (`(batch,)`)
and the gathered rows of the state (`(batch, d)` embedding rows, `(batch, k)`
neighbour lists). `benchmarks/class_sharding.py` measures per-device memory.

The read-outs stay sharded too: the ordinal median scans each device's
classes and adds the mass before them (`_backend.class_blocks`); min-risk
decoding's `p @ S` is blocked along the devices for `ordinal`, a segment sum
for a tree hierarchy, and a ring of `n` steps for embeddings, neighbour
lists (hubs included: classes listed by more than 64 others) and dense
tables, which are split by columns (`ring_expected`).
"""

import keras
import numpy as np
from keras import ops

from keras_simloss import _backend
from keras_simloss.similarity.base import Similarity

__all__ = [
    "SimilarityState",
    "class_layout_map",
    "ring_expected",
    "shard_classes",
    "top_k",
]


def class_layout_map(device_mesh, output_layer, axis="model", layout_map=None):
    """A `LayoutMap` that shards `output_layer`'s classes over `axis`.

    The layer's kernel `(features, C)` gets the layout `(None, axis)` and its
    bias `(C,)` gets `(axis,)`: each device holds `C / n` output columns and
    computes `C / n` logits per example.

    Args:
        device_mesh: a `keras.distribution.DeviceMesh` with an axis named
            `axis`.
        output_layer: the name of the `Dense` layer that gives the logits
            (a regex, as `LayoutMap` keys are: matched against variable paths
            such as `"logits/kernel"`).
        axis: the mesh axis to shard the classes over. Default `"model"`.
        layout_map: an existing `LayoutMap` (of the same mesh) to add the two
            entries to; default a new one.

    Returns:
        The `LayoutMap`, for `keras.distribution.ModelParallel(layout_map=...)`.
    """
    _check_axis(device_mesh, axis)
    if layout_map is None:
        layout_map = keras.distribution.LayoutMap(device_mesh)
    elif layout_map.device_mesh is not device_mesh:
        raise ValueError(
            "Invalid value for argument `layout_map`. Expected a LayoutMap of "
            f"`device_mesh`. Received: layout_map.device_mesh="
            f"{layout_map.device_mesh}, device_mesh={device_mesh}"
        )
    layout_map[f"{output_layer}/kernel"] = (None, axis)
    layout_map[f"{output_layer}/bias"] = (axis,)
    return layout_map


def shard_classes(model, similarity, axis="model"):
    """Lays `similarity`'s per-class state out over the mesh axis `axis`.

    Call it under the active `keras.distribution.ModelParallel`, after the
    model is built and before `fit`/`evaluate`: it makes a `SimilarityState`
    (the similarity's per-class arrays as non-trainable variables, each
    sharded along its class axis), tracks it on `model`, and from then on
    the similarity reads its arrays from there. Every loss, metric and
    read-out holding this similarity object then works on the sharded state
    inside the model's compiled steps (the trainer passes the variables in
    as sharded arguments).

    Checks, each a `ValueError` naming both sides: a distribution is active
    and has `axis`; `axis` is not the batch axis; its size divides `C`; and
    every variable of `model` with an axis of `C` entries (the output
    kernel and bias) shards that axis over `axis`, not over another mesh
    axis and not at all (the logits would then be whole on every device).

    Args:
        model: the built `keras.Model` whose output layer gives the `C`
            logits.
        similarity: a `Similarity`, or a loss, metric or layer holding one in
            its `similarity` attribute.
        axis: the mesh axis the classes are sharded over. Default `"model"`.

    Returns:
        The `SimilarityState` (also tracked on `model`).
    """
    similarity = _similarity_of(similarity)
    if _backend.backend() != "jax":
        raise ValueError(
            "shard_classes needs `keras.distribution.ModelParallel`, which "
            "Keras runs on the JAX backend (its TensorFlow distribution is a "
            f"prototype). Received: keras.config.backend()={_backend.backend()!r}"
        )
    distribution = keras.distribution.distribution()
    if distribution is None:
        raise ValueError(
            "shard_classes needs an active `keras.distribution` (e.g. "
            "`keras.distribution.set_distribution(ModelParallel(...))`). "
            "Received: keras.distribution.distribution()=None"
        )
    mesh = distribution.device_mesh
    _check_axis(mesh, axis)
    batch_axis = getattr(distribution, "batch_dim_name", None)
    if axis == batch_axis:
        raise ValueError(
            f"Invalid value for argument `axis`. Expected a mesh axis other "
            f"than the batch axis: the per-class state has no batch axis, and "
            f"the batch's examples must see every class. Received: "
            f"axis={axis!r}, distribution.batch_dim_name={batch_axis!r}"
        )
    devices = mesh.shape[list(mesh.axis_names).index(axis)]
    num_classes = similarity.num_classes
    if num_classes % devices:
        raise ValueError(
            f"Invalid value for argument `axis`. Expected a mesh axis whose "
            f"size divides the number of classes. Received: axis={axis!r} of "
            f"size {devices}, similarity.num_classes={num_classes} "
            f"({num_classes} % {devices} = {num_classes % devices})"
        )
    if not model.built:
        raise ValueError(
            "shard_classes needs a built model (its output kernel's layout is "
            f"checked). Received: model {model.name!r} with model.built=False"
        )
    _check_model_layout(model, num_classes, axis)
    if similarity.__dict__.get("_state") is not None:
        raise ValueError(
            "Invalid value for argument `similarity`: its state is already "
            f"sharded (by an earlier shard_classes call, over "
            f"{similarity._state.axis!r}). Received: {similarity!r}"
        )
    state = SimilarityState(similarity, mesh, axis)
    index = sum(isinstance(m, SimilarityState) for m in model._metrics)
    setattr(model, f"_simloss_state_{index}", state)
    similarity._state = state
    return state


class SimilarityState(keras.metrics.Metric):
    """A similarity's per-class arrays, sharded along their class axis.

    Made by `shard_classes`; a `Metric` of the model only so that Keras's
    trainers pass its variables into every compiled step (training,
    evaluation, the metrics' updates) as sharded arguments. It reports no
    result, keeps its values across `reset_state`, and is not saved (the
    similarity holds the arrays: a loaded model is sharded again by calling
    `shard_classes` on it).

    Attributes:
        axis: the mesh axis the classes are sharded over.
        layouts: `{key: axes}`, each array's layout, e.g. `("model", None)`.
    """

    def __init__(self, similarity, device_mesh, axis, name="similarity_state"):
        super().__init__(name=name)
        self.axis = axis
        self.shards = device_mesh.shape[list(device_mesh.axis_names).index(axis)]
        self._mesh = device_mesh
        self.layouts = {}
        self._state_variables = {}
        for key, (make_array, class_axis) in similarity._class_arrays().items():
            array = np.asarray(make_array())
            axes = [None] * array.ndim
            axes[class_axis] = axis
            self.layouts[key] = tuple(axes)
            variable = keras.Variable(
                array,
                dtype=str(array.dtype),
                trainable=False,
                autocast=False,
                name=key,
                layout=keras.distribution.TensorLayout(axes, device_mesh),
            )
            self._tracker.add_to_store("variables", variable)
            self._state_variables[key] = variable

    def read(self, key):
        """The variable `key` as a tensor (inside a trainer's step: the
        step's argument for it)."""
        variable = self._state_variables.get(key)
        if variable is None:
            raise KeyError(
                f"The sharded similarity state has no array {key!r} (it has "
                f"{sorted(self._state_variables)}): a similarity kind reads an "
                "array with `_tensor` that its `_class_arrays` does not list."
            )
        return _backend.as_tensor(variable)

    def values(self):
        return {key: self.read(key) for key in self._state_variables}

    def constrain(self, parts):
        """`parts` `(batch, shards, C / shards)` laid out with the shards
        over the axis (where a distribution is active), so that XLA splits
        the classes there without moving them."""
        distribution = keras.distribution.distribution()
        if distribution is None:
            return parts
        import jax

        batch_axis = getattr(distribution, "batch_dim_name", None)
        mesh = self._mesh.backend_mesh
        spec = jax.sharding.PartitionSpec(batch_axis, self.axis, None)
        return jax.lax.with_sharding_constraint(
            parts, jax.sharding.NamedSharding(mesh, spec)
        )

    def update_state(self, *args, **kwargs):
        pass

    def result(self):
        return {}  # no entry in the logs

    def reset_state(self):
        pass  # the arrays are constants of training, not statistics

    def save_own_variables(self, store):
        pass

    def load_own_variables(self, store):
        pass

    def __deepcopy__(self, memo):
        return self  # copies of a loss share the model's one state

    def get_config(self):
        return {"name": self.name, "axis": self.axis}


def top_k(values, k, similarity=None):
    """`keras.ops.top_k(values, k, sorted=True)` over the last axis, which
    stays sharded when it is the classes of a sharded `similarity`.

    XLA's partitioner gathers a whole `(batch, C)` row onto every device for
    a top-k over a sharded axis. Here each device takes the top `k` of its
    own `C / n` classes, and the top `k` of those `n k` candidates is the
    result: the same values and indices (ties to the smaller index, as
    `top_k` breaks them: candidates are ordered by shard, then by rank).

    Args:
        values: `(batch, C)` tensor.
        k: how many, `1 <= k <= C`.
        similarity: the `Similarity` whose classes are the last axis; only
            when `shard_classes` sharded it does the split apply.

    Returns:
        `(values, indices)`, each `(batch, k)`, as `keras.ops.top_k`.
    """
    state = None if similarity is None else similarity.__dict__.get("_state")
    if state is None or state.shards == 1:
        return ops.top_k(values, k, sorted=True)
    shards = state.shards
    width = values.shape[-1] // shards
    local = min(k, width)
    parts = state.constrain(ops.reshape(values, (-1, shards, width)))
    part_values, part_indices = ops.top_k(parts, local, sorted=True)
    offsets = ops.arange(shards, dtype="int32")[:, None] * width
    part_indices = ops.cast(part_indices, "int32") + offsets
    candidates = ops.reshape(part_values, (-1, shards * local))
    top_values, positions = ops.top_k(candidates, k, sorted=True)
    indices = ops.take_along_axis(
        ops.reshape(part_indices, (-1, shards * local)), positions, axis=-1
    )
    return top_values, indices


def ring_expected(similarity, probabilities):
    """`p @ S` over classes sharded by `shard_classes`, or `None` (not
    sharded, or a kind without a ring form: `Similarity._ring_arrays`).

    XLA's partitioner would gather whole `(batch, C)` rows for these
    kinds' `p @ S` (every class's column needs `p` over all classes).
    Written instead as local work plus collectives, a ring as in ring
    attention: each device keeps its `w = C / n` columns and, in `n` steps,
    adds the part of `p @ S` due to one visiting block of `w` classes, then
    passes `p` over that block (and the kind's travelling arrays, e.g. the
    unit vectors) on to the next device (`ppermute`). A dense table is
    split by columns, so only `p` travels. Neighbour lists with hubs (no
    turned-around lists) push instead (`Similarity._ring_pushes`): the
    partial sums of one block of columns travel, and each device adds what
    its own classes' lists give to them. Each device holds `(batch, w)`
    buffers and never a whole row.
    """
    state = similarity.__dict__.get("_state")
    distribution = keras.distribution.distribution()
    if state is None or state.shards == 1 or distribution is None:
        return None
    if similarity.uses_dense_table:
        travelling, from_shard, pushes = (), _dense_expected_from_shard, False
    else:
        travelling = similarity._ring_arrays()
        from_shard = similarity._expected_from_shard
        pushes = similarity._ring_pushes()
    if travelling is None:
        return None
    import jax
    from jax.sharding import PartitionSpec

    axis, shards = state.axis, state.shards
    width = similarity.num_classes // shards
    keys = sorted(state.layouts)
    arrays = [similarity._tensor(key, None) for key in keys]
    batch_axis = getattr(distribution, "batch_dim_name", None)
    if batch_axis not in distribution.device_mesh.axis_names:
        batch_axis = None
    spec = PartitionSpec(batch_axis, axis)
    turn = [(i, (i + 1) % shards) for i in range(shards)]

    def local(p, *own_arrays):
        own = dict(zip(keys, own_arrays))
        here = jax.lax.axis_index(axis)

        def step(i, carry):
            total, visiting_p, visiting = carry
            source = (here - i) % shards  # whose classes are visiting
            total = total + from_shard(
                visiting_p, visiting, own, source == here, source * width
            )
            visiting_p, visiting = jax.lax.ppermute((visiting_p, visiting), axis, turn)
            return total, visiting_p, visiting

        start = (ops.zeros_like(p), p, {key: own[key] for key in travelling})
        return jax.lax.fori_loop(0, shards, step, start)[0]

    def local_push(p, *own_arrays):
        # The partial sums of one block of columns travel instead; after
        # `n` steps and `n` passes each block's sums are back home.
        own = dict(zip(keys, own_arrays))
        here = jax.lax.axis_index(axis)

        def step(i, visiting_total):
            target = (here - i) % shards  # whose columns are visiting
            visiting_total = visiting_total + similarity._expected_into_shard(
                p, own, target == here, target * width
            )
            return jax.lax.ppermute(visiting_total, axis, turn)

        return jax.lax.fori_loop(0, shards, step, ops.zeros_like(p))

    return jax.shard_map(
        local_push if pushes else local,
        mesh=state._mesh.backend_mesh,
        in_specs=(spec,) + tuple(PartitionSpec(*state.layouts[k]) for k in keys),
        out_specs=spec,
        check_vma=False,
    )(probabilities, *arrays)


def _dense_expected_from_shard(probabilities, visiting, own, same_shard, start):
    """A dense table's part of `p @ S` from one visiting block: this
    device's columns of the table (`(C, w)`) hold the visiting classes'
    rows of them, `(w, w)`, which `p` over those classes multiplies."""
    del visiting, same_shard
    import jax

    block = jax.lax.dynamic_slice_in_dim(
        own["similarity_table"], start, probabilities.shape[-1], axis=0
    )
    return ops.matmul(probabilities, block)


def _similarity_of(value):
    holder = value
    value = getattr(value, "similarity", value)
    if not isinstance(value, Similarity):
        raise TypeError(
            "Invalid value for argument `similarity`. Expected a Similarity, or "
            "a loss, metric or layer holding one. Received: "
            f"{type(holder).__name__}"
        )
    return value


def _check_axis(device_mesh, axis):
    names = list(device_mesh.axis_names)
    if axis not in names:
        raise ValueError(
            f"Invalid value for argument `axis`. Expected one of the device "
            f"mesh's axes {names}. Received: axis={axis!r}"
        )


def _check_model_layout(model, num_classes, axis):
    """Every axis of `num_classes` entries in the model's variables is
    sharded over `axis` (and at least one is)."""
    found = []
    for variable in model.variables:
        spec = _spec(variable)
        for index, size in enumerate(variable.shape):
            if size != num_classes:
                continue
            on = spec[index] if index < len(spec) else None
            if on != axis:
                raise ValueError(
                    f"The similarity's classes would be sharded over {axis!r}, "
                    f"but the model's variable {variable.path!r} of shape "
                    f"{tuple(variable.shape)} lays its axis {index} of "
                    f"{num_classes} classes out over {on!r} (layout "
                    f"{tuple(spec)}). Give it the layout with {axis!r} on that "
                    "axis (see `class_layout_map`), or shard over its axis."
                )
            found.append(variable.path)
    if not found:
        raise ValueError(
            f"The model {model.name!r} has no variable with an axis of "
            f"{num_classes} classes (an output kernel `(features, C)`): "
            "its logits would not be sharded over the classes. Received "
            f"variables of shapes {[tuple(v.shape) for v in model.variables]}"
        )


def _spec(variable):
    """The mesh axis of each of `variable`'s axes (`None`: not sharded)."""
    sharding = getattr(variable.value, "sharding", None)
    spec = tuple(getattr(sharding, "spec", ()) or ())
    return spec + (None,) * (len(variable.shape) - len(spec))
