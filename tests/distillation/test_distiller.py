"""Tests of the `Distiller` (`keras_simloss/distillation/distiller.py`)."""

import keras
import numpy as np
import pytest

from keras_simloss import SimLoss, similarity
from keras_simloss.distillation import Distiller
from tests.distillation.test_layers import (
    SubclassedStudent,
    conv_net,
    data,
)
from tests.distillation.test_sp import numpy_sp
from tests.testing import (
    JIT_COMPILE,
    assert_config_round_trip,
    save_and_reload,
    softmax,
    to_numpy,
)


def make_distiller(seed=0, **kwargs):
    keras.utils.set_random_seed(seed)
    teacher = conv_net(16, "teacher")
    student = conv_net(4, "student")
    kwargs.setdefault("layer_pairs", [("block", "block")])
    return Distiller(teacher, student, **kwargs)


# Distiller --------------------------------------------------------------------


@pytest.mark.parametrize(
    "jit_compile",
    [False, True] if JIT_COMPILE else [False],
    ids=["graph", "xla"] if JIT_COMPILE else ["default"],
)
def test_fit_trains_only_the_student_and_reports_each_part(jit_compile):
    distiller = make_distiller(alpha=0.3)
    distiller.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        jit_compile=jit_compile,
    )
    x, y = data()
    teacher_before = [w.copy() for w in distiller.teacher.get_weights()]
    student_before = [w.copy() for w in distiller.student.get_weights()]
    history = distiller.fit(
        x, y, epochs=6, batch_size=16, validation_data=(x, y), verbose=0
    )
    logs = history.history
    for key in [
        "loss",
        "student_loss",
        "sp_loss",
        "kd_loss",
        "accuracy",
        "val_loss",
        "val_sp_loss",
    ]:
        assert key in logs, sorted(logs)
        assert np.all(np.isfinite(logs[key]))
    assert logs["loss"][-1] < logs["loss"][0]
    for before, after in zip(teacher_before, distiller.teacher.get_weights()):
        np.testing.assert_array_equal(before, after)  # BN statistics included
    assert any(
        not np.array_equal(before, after)
        for before, after in zip(student_before, distiller.student.get_weights())
    )
    # predict is the student's (up to XLA's rounding).
    np.testing.assert_allclose(
        distiller.predict(x, verbose=0),
        distiller.student.predict(x, verbose=0),
        rtol=1e-5,
        atol=1e-6,
    )


def test_student_runs_once_per_step_so_batch_norm_moves_once():
    distiller = make_distiller()
    distiller.compile(
        optimizer=keras.optimizers.SGD(0.0), loss="sparse_categorical_crossentropy"
    )
    x, y = data(n=16)
    bn = distiller.student.get_layer("bn")
    conv = keras.Model(
        distiller.student.inputs, distiller.student.get_layer("conv1").output
    )
    batch_mean = conv.predict(x, verbose=0).mean(axis=(0, 1, 2))
    distiller.fit(x, y, epochs=1, batch_size=16, shuffle=False, verbose=0)
    # One update from zeros: moving_mean = (1 - momentum) * batch mean. A
    # second forward pass in training mode would give a different value.
    np.testing.assert_allclose(
        to_numpy(bn.moving_mean), (1 - bn.momentum) * batch_mean, rtol=1e-4, atol=1e-6
    )


def test_loss_parts_match_independent_computation():
    sim = similarity.ordinal(5, 0.5)
    distiller = make_distiller(gamma=100.0, alpha=0.25, temperature=2.0)
    distiller.compile(loss=SimLoss(sim, from_logits=True))
    x, y = data(n=12, seed=4)
    weights = np.random.default_rng(5).uniform(0, 2, size=12).astype(np.float32)
    result = distiller.evaluate(
        x, y, sample_weight=weights, batch_size=12, verbose=0, return_dict=True
    )

    teacher_view = keras.Model(
        distiller.teacher.inputs, distiller.teacher.get_layer("block").output
    )
    student_view = keras.Model(
        distiller.student.inputs, distiller.student.get_layer("block").output
    )
    teacher_logits = distiller.teacher.predict(x, verbose=0)
    student_logits = distiller.student.predict(x, verbose=0)
    sp = numpy_sp(
        teacher_view.predict(x, verbose=0), student_view.predict(x, verbose=0)
    )
    per_example = -np.log(np.sum(np.asarray(sim)[y] * softmax(student_logits), axis=-1))
    student = np.sum(per_example * weights) / len(y)
    p_t, p_s = softmax(teacher_logits / 2.0), softmax(student_logits / 2.0)
    # The KD term is weighted per example like the compiled loss.
    kl = np.sum(p_t * (np.log(p_t) - np.log(p_s)), axis=-1)
    kd = 4.0 * np.sum(kl * weights) / len(y)
    assert result["sp_loss"] == pytest.approx(sp, rel=1e-4)
    assert result["student_loss"] == pytest.approx(student, rel=1e-5)
    assert result["kd_loss"] == pytest.approx(kd, rel=1e-4)
    assert result["loss"] == pytest.approx(
        0.75 * student + 100.0 * sp + 0.25 * kd, rel=1e-4
    )


def test_simloss_student_with_sample_and_class_weights_under_xla():
    distiller = make_distiller()
    distiller.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=SimLoss(similarity.ordinal(5, 0.6), from_logits=True),
        jit_compile=JIT_COMPILE,
    )
    x, y = data()
    weights = np.linspace(0.5, 1.5, len(y)).astype(np.float32)
    history = distiller.fit(
        x, y, sample_weight=weights, epochs=6, batch_size=16, verbose=0
    )
    student_loss = history.history["student_loss"]
    assert np.all(np.isfinite(student_loss)) and min(student_loss[1:]) < student_loss[0]
    history = distiller.fit(
        x, y, class_weight={c: 1.0 + c for c in range(5)}, epochs=1, verbose=0
    )
    assert np.isfinite(history.history["loss"][0])


def test_sequential_models_work():
    keras.utils.set_random_seed(0)

    def sequential(width, name):
        return keras.Sequential(
            [
                keras.Input((8, 8, 3)),
                keras.layers.Conv2D(width, 3, activation="relu", name="features"),
                keras.layers.Flatten(),
                keras.layers.Dense(5),
            ],
            name=name,
        )

    distiller = Distiller(
        sequential(8, "t"), sequential(2, "s"), [("features", "features")]
    )
    distiller.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x, y = data()
    assert np.isfinite(distiller.fit(x, y, epochs=1, verbose=0).history["sp_loss"][0])


def test_mixed_float16_trains_with_finite_loss():
    keras.config.set_dtype_policy("mixed_float16")
    distiller = make_distiller(alpha=0.5)
    distiller.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    assert isinstance(distiller.optimizer, keras.optimizers.LossScaleOptimizer)
    x, y = data()
    history = distiller.fit(x * 100.0, y, epochs=3, batch_size=16, verbose=0)
    for key in ("loss", "sp_loss", "kd_loss"):
        assert np.all(np.isfinite(history.history[key])), key


def test_student_save_gives_a_plain_model(tmp_path):
    distiller = make_distiller()
    distiller.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x, y = data()
    distiller.fit(x, y, epochs=1, verbose=0)
    loaded = save_and_reload(distiller.student, tmp_path, "student.keras")
    assert isinstance(loaded, keras.Model) and not isinstance(loaded, Distiller)
    np.testing.assert_array_equal(
        loaded.predict(x, verbose=0), distiller.student.predict(x, verbose=0)
    )


def test_distiller_config_and_keras_file_round_trip(tmp_path):
    distiller = make_distiller(
        alpha=0.2, gamma=50.0, temperature=3.0, gram_batch="global"
    )
    rebuilt, serialized = assert_config_round_trip(distiller)
    assert serialized["config"]["layer_pairs"] == [["block", "block"]]
    assert (rebuilt.gamma, rebuilt.alpha, rebuilt.temperature, rebuilt.gram_batch) == (
        50.0,
        0.2,
        3.0,
        "global",
    )
    distiller.compile(
        optimizer="adam",
        loss=SimLoss(similarity.ordinal(5, 0.5), from_logits=True),
        metrics=["accuracy"],
    )
    x, y = data()
    distiller.fit(x, y, epochs=1, verbose=0)
    loaded = save_and_reload(distiller, tmp_path)
    assert isinstance(loaded, Distiller)
    np.testing.assert_array_equal(
        loaded.predict(x, verbose=0), distiller.predict(x, verbose=0)
    )
    for a, b in zip(loaded.teacher.get_weights(), distiller.teacher.get_weights()):
        np.testing.assert_array_equal(a, b)
    before = distiller.evaluate(x, y, verbose=0, return_dict=True)
    assert loaded.evaluate(x, y, verbose=0, return_dict=True) == pytest.approx(before)


class _Interrupt(keras.callbacks.Callback):
    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            raise RuntimeError("interrupted")


def test_backup_and_restore_resumes_to_the_same_weights(tmp_path):
    x, y = data()

    def run(callbacks):
        distiller = make_distiller(seed=7)
        distiller.compile(
            optimizer=keras.optimizers.Adam(1e-2),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        distiller.fit(
            x, y, epochs=4, batch_size=16, shuffle=False, verbose=0, callbacks=callbacks
        )
        return distiller

    reference = run([])
    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    checkpoint = keras.callbacks.ModelCheckpoint(
        str(tmp_path / "best.keras"), monitor="loss"
    )
    with pytest.raises(RuntimeError, match="interrupted"):
        run([backup, checkpoint, _Interrupt(epoch=2)])
    resumed = run([backup, checkpoint])
    for a, b in zip(reference.student.get_weights(), resumed.student.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    best = keras.models.load_model(str(tmp_path / "best.keras"))
    assert isinstance(best, Distiller)


BAD_ARGUMENTS = {
    "gamma<0": (
        {"gamma": -1.0},
        ValueError,
        r"0.0 <= gamma <= 1000000.0. Received: gamma=-1.0",
    ),
    "gamma=inf": ({"gamma": float("inf")}, ValueError, r"gamma=inf"),
    "gamma=1e30": ({"gamma": 1e30}, ValueError, r"gamma <= 1000000.0"),
    "gamma=nan": ({"gamma": float("nan")}, ValueError, r"gamma=nan"),
    "gamma=str": ({"gamma": "3000"}, TypeError, r"`gamma`. Expected a number"),
    "no-terms": (
        {"layer_pairs": []},
        ValueError,
        r"Nothing to distil.*layer_pairs=\[\], alpha=0",
    ),
    "gamma=0": ({"gamma": 0.0}, ValueError, r"Nothing to distil"),
    "alpha>1": ({"alpha": 1.5}, ValueError, r"alpha <= 1.0"),
    "temperature=0": ({"temperature": 0.0}, ValueError, r"0.0 < temperature"),
    "temperature=inf": (
        {"temperature": float("inf")},
        ValueError,
        r"temperature=inf",
    ),
    "gram-batch": ({"gram_batch": "all"}, ValueError, r"gram_batch"),
    "pair-shape": ({"layer_pairs": ["block"]}, ValueError, r"layer_pairs"),
    "pairs=None": (
        {"layer_pairs": None},
        ValueError,
        r"`layer_pairs`. Expected \"auto\" or a list.*Received: layer_pairs=None",
    ),
    "logits-output": ({"logits_output": 1.5}, TypeError, r"logits_output=1.5"),
    "unknown-layer": (
        {"layer_pairs": [("nope", "block")]},
        ValueError,
        r"No layer named 'nope' in the teacher.*'block'",
    ),
}


@pytest.mark.parametrize(
    "kwargs, error, message", list(BAD_ARGUMENTS.values()), ids=list(BAD_ARGUMENTS)
)
def test_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        make_distiller(**kwargs)


def test_numpy_scalars_are_accepted():
    distiller = make_distiller(
        gamma=np.float32(3000), alpha=np.float64(0.5), temperature=np.int64(4)
    )
    assert (distiller.gamma, distiller.alpha, distiller.temperature) == (
        3000.0,
        0.5,
        4.0,
    )
    assert type(distiller.gamma) is float


def test_different_input_shapes_are_rejected():
    with pytest.raises(ValueError, match=r"same inputs.*\(8, 8, 3\).*\(16, 16, 3\)"):
        Distiller(
            conv_net(4, "t"),
            conv_net(4, "s", input_shape=(16, 16, 3)),
            [("block", "block")],
        )


def test_pair_with_different_batch_sizes_is_rejected():
    keras.utils.set_random_seed(0)
    # A student whose chosen layer merges pairs of examples: (8, ...) -> (4, ...).
    inputs = keras.Input((8, 8, 3), batch_size=8)
    merged = keras.layers.Lambda(
        lambda t: keras.ops.reshape(t, (4, -1)), name="merged"
    )(inputs)
    unmerged = keras.layers.Lambda(lambda t: keras.ops.reshape(t, (8, -1)))(merged)
    student = keras.Model(inputs, keras.layers.Dense(5)(unmerged), name="student")
    distiller = Distiller(conv_net(4, "teacher"), student, [("block", "merged")])
    distiller.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x, y = data(n=8)
    with pytest.raises(
        ValueError, match=r"same batch size.*for the pair \('block', 'merged'\)"
    ):
        distiller.fit(x, y, batch_size=8, verbose=0)


def test_teacher_regularisation_losses_stay_out_of_the_student_loss():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(
        8,
        3,
        padding="same",
        name="block",
        activity_regularizer=keras.regularizers.L2(10.0),
    )(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    teacher = keras.Model(inputs, keras.layers.Dense(5)(x))
    student = conv_net(4, "student")
    distiller = Distiller(teacher, student, [("block", "block")], gamma=1.0)
    distiller.compile(
        optimizer=keras.optimizers.SGD(0.0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x, y = data(n=16)
    history = distiller.fit(x, y, epochs=1, batch_size=16, verbose=0)
    # The student's loss on its training-mode pass (batch-norm on batch
    # statistics); with a learning rate of 0 the weights did not move.
    expected = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(
        y, student(x, training=True)
    )
    assert history.history["student_loss"][0] == pytest.approx(
        float(to_numpy(expected)), rel=1e-4
    )


def test_logs_hold_only_the_parts_that_are_on():
    distiller = make_distiller(alpha=0.0)
    distiller.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    x, y = data(n=16)
    logs = distiller.fit(x, y, epochs=1, verbose=0).history
    assert sorted(logs) == ["loss", "sp_loss", "student_loss"]
    names = [m.name for m in distiller.metrics]
    assert len(names) == len(set(names)), names


@pytest.mark.parametrize("kind", ["sequential", "subclassed"])
def test_unbuilt_students_are_built_from_the_first_batch(kind):
    keras.utils.set_random_seed(0)
    if kind == "sequential":
        student = keras.Sequential(
            [
                keras.layers.Conv2D(4, 3, padding="same", name="features"),
                keras.layers.GlobalAveragePooling2D(),
                keras.layers.Dense(5),
            ]
        )
    else:
        student = SubclassedStudent()
    assert not student.built
    distiller = Distiller(conv_net(8, "teacher"), student, [("block", "features")])
    distiller.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=JIT_COMPILE,
    )
    x, y = data()
    before = None
    history = distiller.fit(x, y, epochs=2, batch_size=16, verbose=0)
    assert student.built and student.trainable_weights
    assert np.all(np.isfinite(history.history["sp_loss"]))
    before = [w.copy() for w in student.get_weights()]
    distiller.fit(x, y, epochs=1, batch_size=16, verbose=0)
    assert any(not np.array_equal(a, b) for a, b in zip(before, student.get_weights()))
