"""Finding layers in teacher and student, recording their outputs, pairing them.

- `find_layer`: a layer by name or path, nested models included.
- `resolution_stages`, `auto_layer_pairs`: the pairs `layer_pairs="auto"`
  chooses, matched by spatial resolution.
- `_recording_outputs`: the activations of chosen layers on one forward pass.
"""

import contextlib

import keras


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
    (Sequential, Functional, nested backbones, subclassed) on any backend,
    where a multi-output functional view cannot reach inside nested models.
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


# Layers that only rescale or gate their input element-wise. A stage's
# representative layer is its last layer that is not one of these, so that
# the output of a residual group is chosen rather than the normalisation
# and activation that follow it (pre-activation networks).
_ELEMENTWISE_LAYERS = (
    keras.layers.Activation,
    keras.layers.BatchNormalization,
    keras.layers.Dropout,
    keras.layers.ELU,
    keras.layers.GroupNormalization,
    keras.layers.LayerNormalization,
    keras.layers.LeakyReLU,
    keras.layers.PReLU,
    keras.layers.ReLU,
    keras.layers.Softmax,
    keras.layers.SpatialDropout2D,
)


def _output_shape(layer):
    try:
        output = layer.output
    except (AttributeError, ValueError, RuntimeError):
        return None  # no symbolic output (subclassed) or a shared layer
    if isinstance(output, (list, tuple, dict)):
        return None
    return tuple(output.shape)


def resolution_stages(model):
    """`{spatial shape: last layer path}` of a model, in forward order.

    A stage is a run of layers whose outputs have the same spatial size
    (an image's height and width, a volume's three axes: outputs of rank 4
    or more); its representative is the last layer of the run that is not an
    element-wise normalisation, activation or dropout layer. Layers inside
    nested models are visited with their paths (`"backbone/block3"`).
    Subclassed models, whose layers have no symbolic outputs, have no stages.
    """
    channels_first = keras.config.image_data_format() == "channels_first"
    stages = {}
    order = []

    def visit(container, prefix):
        for layer in container.layers:
            path = f"{prefix}{layer.name}"
            if isinstance(layer, keras.Model) and layer.layers:
                visit(layer, f"{path}/")
                continue
            shape = _output_shape(layer)
            if (
                shape is None
                or len(shape) < 4
                or isinstance(layer, keras.layers.InputLayer)
            ):
                continue
            spatial = shape[2:] if channels_first else shape[1:-1]
            if spatial not in stages:
                order.append(spatial)
                stages[spatial] = None
            if not isinstance(layer, _ELEMENTWISE_LAYERS) or stages[spatial] is None:
                stages[spatial] = path

    visit(model, "")
    return {spatial: stages[spatial] for spatial in order}


def auto_layer_pairs(teacher, student):
    """SP layer pairs matched by spatial resolution (`layer_pairs="auto"`).

    For each spatial size that both models have (see `resolution_stages`),
    pairs the teacher's representative layer with the student's, in the
    teacher's order. For WideResNets these are the outputs of the residual
    groups, the last of which is the paper's choice.

    Raises:
        ValueError: when no spatial size is shared, listing both models'.
    """
    teacher_stages = resolution_stages(teacher)
    student_stages = resolution_stages(student)
    pairs = [
        (name, student_stages[spatial])
        for spatial, name in teacher_stages.items()
        if spatial in student_stages
    ]
    if not pairs:
        raise ValueError(
            'Invalid value for argument `layer_pairs`: "auto" pairs teacher and '
            "student layers whose outputs have the same spatial size, and these "
            "models share none (auto needs functional or sequential models "
            "with image-like activations). Give the pairs by name. Received: "
            f"teacher stages {_describe(teacher_stages)}, student stages "
            f"{_describe(student_stages)}"
        )
    return pairs


def _describe(stages):
    return {"x".join(str(d) for d in spatial): name for spatial, name in stages.items()}


def _check_layer_pairs(layer_pairs):
    message = (
        'Invalid value for argument `layer_pairs`. Expected "auto" or a list '
        "of (teacher_layer_name, student_layer_name) pairs of strings. "
        "Received: "
    )
    if isinstance(layer_pairs, str) or not isinstance(layer_pairs, (list, tuple)):
        raise ValueError(f"{message}layer_pairs={layer_pairs!r}")
    pairs = []
    for pair in layer_pairs:
        if (
            isinstance(pair, str)
            or not isinstance(pair, (list, tuple))
            or len(pair) != 2
            or not all(isinstance(n, str) and n for n in pair)
        ):
            raise ValueError(f"{message}{pair!r} in layer_pairs={layer_pairs!r}")
        pairs.append((pair[0], pair[1]))
    return pairs


def _input_shapes(model):
    """The shapes of `model`'s inputs without the batch axis, or `None`."""
    inputs = getattr(model, "inputs", None)
    if not inputs:
        return None
    return [tuple(tensor.shape[1:]) for tensor in inputs]
