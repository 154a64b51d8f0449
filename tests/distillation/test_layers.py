"""Tests of layer lookup and pairing (`keras_simloss/distillation/layers.py`).

The models here are shared by the other distillation tests.
"""

import os

import keras
import numpy as np
import pytest

from keras_simloss.distillation import Distiller, find_layer
from keras_simloss.distillation.layers import _recording_outputs
from tests.testing import assert_config_round_trip

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# Models of every kind ---------------------------------------------------------


def conv_net(width, name, num_classes=5, input_shape=(8, 8, 3)):
    inputs = keras.Input(input_shape)
    x = keras.layers.Conv2D(width, 3, padding="same", name="conv1")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(width, 3, padding="same", activation="relu", name="block")(
        x
    )
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name=name)


def nested_net(width, name):
    backbone = keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            keras.layers.Conv2D(
                width, 3, padding="same", activation="relu", name="stem"
            ),
            keras.layers.Conv2D(
                width, 3, padding="same", activation="relu", name="group3"
            ),
        ],
        name="backbone",
    )
    inputs = keras.Input((8, 8, 3))
    x = backbone(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(5)(x), name=name)


def data(n=48, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 5, size=n)
    x = rng.normal(size=(n, 8, 8, 3)).astype(np.float32)
    x[..., 0] += y[:, None, None]  # learnable
    return x, y


# Models of every kind -------------------------------------------------------------


def two_headed(width, name, num_classes=5):
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(width, 3, padding="same", activation="relu", name="block")(
        inputs
    )
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(
        inputs,
        {
            "logits": keras.layers.Dense(num_classes, name="logits")(x),
            "aux": keras.layers.Dense(3, name="aux")(x),
        },
        name=name,
    )


class SubclassedStudent(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.features = keras.layers.Conv2D(4, 3, padding="same", name="features")
        self.pool = keras.layers.GlobalAveragePooling2D()
        self.head = keras.layers.Dense(5)

    def call(self, inputs, training=None):
        return self.head(self.pool(keras.ops.relu(self.features(inputs))))


class _BranchingStudent(keras.Model):
    """A subclassed student with a layer its forward pass never calls."""

    def __init__(self):
        super().__init__(name="student")
        self.flatten = keras.layers.Flatten()
        self.logits = keras.layers.Dense(5)
        self.unused = keras.layers.Dense(3, name="unused")

    def call(self, inputs):
        return self.logits(self.flatten(inputs))


# Layer lookup -------------------------------------------------------------------


def test_nested_backbone_layers_and_names():
    keras.utils.set_random_seed(0)
    teacher, student = nested_net(16, "teacher"), nested_net(4, "student")
    distiller = Distiller(teacher, student, layer_pairs=[("backbone/group3", "group3")])
    distiller.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x, y = data()
    history = distiller.fit(x, y, epochs=2, batch_size=16, verbose=0)
    assert np.all(np.isfinite(history.history["sp_loss"]))
    assert history.history["sp_loss"][0] > 0
    with pytest.raises(ValueError, match=r"No layer named 'group4'.*'backbone/group3'"):
        Distiller(teacher, student, layer_pairs=[("group4", "group3")])


def test_find_layer_by_name_or_path_and_ambiguous_names():
    teacher = nested_net(4, "teacher")
    group3 = teacher.get_layer("backbone").get_layer("group3")
    assert find_layer(teacher, "group3", "teacher") is group3
    assert find_layer(teacher, "backbone/group3", "teacher") is group3
    # Two nested models with a layer of the same name: only a path is unique.
    first = keras.Sequential(
        [keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3, name="stem")], name="a"
    )
    second = keras.Sequential(
        [keras.Input((6, 6, 4)), keras.layers.Conv2D(4, 3, name="stem")], name="b"
    )
    inputs = keras.Input((8, 8, 3))
    twice = keras.Model(inputs, second(first(inputs)), name="twice")
    with pytest.raises(
        ValueError,
        match=r"'stem' is ambiguous in the model 'twice'.*\['a/stem', 'b/stem'\]",
    ):
        find_layer(twice, "stem")
    assert find_layer(twice, "b/stem") is second.get_layer("stem")


def test_recording_outputs_restores_call_and_rejects_a_shared_layer():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((3,))
    hidden = keras.layers.Dense(3, name="hidden")
    shared = keras.layers.Dense(3, name="shared")
    model = keras.Model(inputs, shared(shared(hidden(inputs))))
    x = np.ones((2, 3), np.float32)
    with _recording_outputs({"pair0": hidden}) as recorded:
        model(x)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(recorded["pair0"]),
        keras.ops.convert_to_numpy(hidden(x)),
        rtol=1e-6,
    )
    with pytest.raises(ValueError, match=r"'pair0' is called more than once"):
        with _recording_outputs({"pair0": shared}):
            model(x)
    # The layers' own `call` is back (nothing left on the instances).
    assert "call" not in hidden.__dict__ and "call" not in shared.__dict__


# The student's "unused" layer never runs, so it stays unbuilt, and Keras
# warns about that when the student is built: what this test sets up.
@pytest.mark.filterwarnings("ignore:`build\\(\\)` was called on layer 'student'")
def test_layer_that_does_not_run_is_reported():
    keras.utils.set_random_seed(0)
    student = _BranchingStudent()
    student(np.zeros((1, 8, 8, 3), np.float32))
    distiller = Distiller(conv_net(4, "teacher"), student, [("block", "unused")])
    distiller.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x, y = data(n=8)
    with pytest.raises(ValueError, match=r"'unused' of the student did not run"):
        distiller.fit(x, y, verbose=0)


# layer_pairs="auto" -----------------------------------------------------------------


def _load_example(name):
    import importlib.util

    path = os.path.join(REPO_ROOT, "examples", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_auto_pairs_include_the_papers_choice_for_wide_resnets(caplog):
    wide_resnet = _load_example("distill_cifar10").wide_resnet
    teacher = wide_resnet(16, 2, 10, (32, 32, 3), "teacher")
    student = wide_resnet(10, 1, 10, (32, 32, 3), "student")
    with caplog.at_level("INFO", logger="keras_simloss.distillation"):
        distiller = Distiller(teacher, student, layer_pairs="auto")
    # One pair per resolution (32, 16, 8): the residual groups' outputs, not
    # the batch norm and ReLU that follow the last one.
    assert distiller.layer_pairs == [
        ("group1", "group1"),
        ("group2", "group2"),
        ("group3", "group3"),
    ]
    assert [r.getMessage() for r in caplog.records] == [
        "Distiller 'distiller': layer_pairs='auto' chose "
        "[('group1', 'group1'), ('group2', 'group2'), ('group3', 'group3')]"
    ]
    assert assert_config_round_trip(distiller)[1]["config"]["layer_pairs"][-1] == [
        "group3",
        "group3",
    ]


def test_auto_pairs_for_sequential_nested_and_plain_conv_nets():
    keras.utils.set_random_seed(0)
    sequential = keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            keras.layers.Conv2D(4, 3, padding="same", name="c1"),
            keras.layers.ReLU(name="r1"),
            keras.layers.MaxPooling2D(name="pool"),
            keras.layers.Conv2D(4, 3, padding="same", name="c2"),
            keras.layers.BatchNormalization(name="bn2"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(5),
        ]
    )
    # The nested backbone stays at 8x8; conv_net too (its last 8x8 layer
    # that is not element-wise is "block").
    nested = nested_net(8, "nested")
    plain = conv_net(8, "plain")
    assert Distiller(plain, sequential, layer_pairs="auto").layer_pairs == [
        ("block", "c1")
    ]
    distiller = Distiller(nested, sequential, layer_pairs="auto")
    assert distiller.layer_pairs == [("backbone/group3", "c1")]
    distiller.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x, y = data()
    assert np.isfinite(distiller.fit(x, y, epochs=1, verbose=0).history["sp_loss"][0])


def test_auto_pairs_without_a_shared_resolution_raise():
    small = conv_net(4, "small", input_shape=(8, 8, 3))
    dense = keras.Sequential(
        [keras.Input((8, 8, 3)), keras.layers.Flatten(), keras.layers.Dense(5)],
        name="dense",
    )
    with pytest.raises(
        ValueError,
        match=r"share none.*teacher stages \{'8x8': 'block'\}.*student stages \{\}",
    ):
        Distiller(small, dense, layer_pairs="auto")
    with pytest.raises(ValueError, match=r"share none"):
        Distiller(small, SubclassedStudent(), layer_pairs="auto")
    with pytest.raises(ValueError, match=r'Expected "auto" or a list'):
        Distiller(small, small, layer_pairs="automatic")
