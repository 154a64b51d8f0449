import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from keras_simloss import SimLoss, similarity
from keras_simloss.distillation import (
    Distiller,
    SimilarityPreserving,
    keras_private_build_api_changed,
    similarity_preserving_loss,
)
from tests.testing import (
    BACKEND,
    JIT_COMPILE,
    assert_config_round_trip,
    save_and_reload,
    softmax,
    to_numpy,
    value_and_gradient,
)

tensorflow_only = pytest.mark.skipif(
    BACKEND != "tensorflow", reason="tf.distribute runs on the TensorFlow backend"
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def numpy_sp(teacher, student):
    """SP loss in float64: row-normalised Gram matrices, ||.||_F^2 / b^2."""

    def gram(features):
        flat = np.asarray(features, np.float64).reshape(len(features), -1)
        g = flat @ flat.T
        return g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)

    b = len(teacher)
    return np.sum((gram(teacher) - gram(student)) ** 2) / b**2


SHAPES = {
    "conv-vs-conv": ((8, 6, 6, 16), (8, 3, 3, 4)),
    "conv-vs-dense": ((8, 4, 4, 8), (8, 10)),
    "dense-vs-dense": ((5, 32), (5, 7)),
    "rank5": ((4, 2, 3, 3, 2), (4, 6)),
}


@pytest.mark.parametrize("shapes", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sp_loss_matches_numpy(shapes, seed):
    rng = np.random.default_rng(seed)
    teacher_shape, student_shape = SHAPES[shapes]
    teacher = np.maximum(rng.normal(size=teacher_shape), 0).astype(np.float32)
    student = rng.normal(size=student_shape).astype(np.float32)
    got = float(similarity_preserving_loss(teacher, student))
    assert got == pytest.approx(numpy_sp(teacher, student), rel=1e-5, abs=1e-7)


def test_sp_oracles():
    rng = np.random.default_rng(3)
    teacher = rng.normal(size=(6, 4, 4, 8)).astype(np.float32)
    student = rng.normal(size=(6, 2, 2, 3)).astype(np.float32)
    base = float(similarity_preserving_loss(teacher, student))
    assert base > 0
    assert float(similarity_preserving_loss(teacher, teacher)) == pytest.approx(
        0.0, abs=1e-10
    )
    # Invariant to a positive scale of either side.
    assert float(similarity_preserving_loss(37.0 * teacher, student)) == pytest.approx(
        base, rel=1e-5
    )
    assert float(similarity_preserving_loss(teacher, 1e-3 * student)) == pytest.approx(
        base, rel=1e-5
    )
    # NHWC vs NCHW flattening.
    nchw = np.transpose(teacher, (0, 3, 1, 2))
    assert float(similarity_preserving_loss(nchw, student)) == pytest.approx(
        base, rel=1e-5
    )
    # At most 4 / b: orthogonal teacher rows vs identical student rows comes
    # close; random inputs stay below.
    b = 6
    assert base <= 4 / b
    worst = float(similarity_preserving_loss(np.eye(b), -np.ones((b, 3))))
    assert worst <= 4 / b


def test_sp_loss_in_float16_is_finite_and_float32():
    big = np.full((4, 300), 300.0, np.float16)  # a float16 Gram would overflow
    value = similarity_preserving_loss(big, np.eye(4, dtype=np.float16))
    assert keras.backend.standardize_dtype(value.dtype) == "float32"
    assert np.isfinite(float(value))
    assert float(value) == pytest.approx(numpy_sp(big, np.eye(4)), rel=1e-5)


def test_sp_loss_rejects_different_batch_sizes():
    with pytest.raises(ValueError, match=r"same batch size.*\(4, 3\).*\(5, 3\)"):
        similarity_preserving_loss(np.ones((4, 3)), np.ones((5, 3)))


# Models ---------------------------------------------------------------------


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


def test_similarity_preserving_in_keras_distiller():
    keras.utils.set_random_seed(0)
    teacher, student = conv_net(16, "teacher"), conv_net(4, "student")
    loss = SimilarityPreserving("block", "block")
    rebuilt, _ = assert_config_round_trip(loss)
    assert (rebuilt.teacher_layer_name, rebuilt.student_layer_name) == (
        "block",
        "block",
    )
    distiller = keras.distillation.Distiller(
        teacher,
        student,
        distillation_losses=[loss],
        distillation_loss_weights=[3000.0],
        student_loss_weight=0.5,
    )
    distiller.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x, y = data()
    history = distiller.fit(x, y, epochs=5, batch_size=16, verbose=0)
    distillation = history.history["distillation_loss"]
    assert np.all(np.isfinite(distillation)) and distillation[-1] < distillation[0]
    with pytest.raises(ValueError, match="No layer named 'nope'"):
        keras.distillation.Distiller(
            teacher, student, [SimilarityPreserving("nope", "block")]
        )


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
    "logits-output": ({"logits_output": 1.5}, ValueError, r"logits_output=1.5"),
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


class _BranchingStudent(keras.Model):
    """A subclassed student with a layer its forward pass never calls."""

    def __init__(self):
        super().__init__(name="student")
        self.flatten = keras.layers.Flatten()
        self.logits = keras.layers.Dense(5)
        self.unused = keras.layers.Dense(3, name="unused")

    def call(self, inputs):
        return self.logits(self.flatten(inputs))


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


def _run_script(script, timeout=240):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=REPO_ROOT)
    completed = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=REPO_ROOT,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


_MIRRORED = """
    import json
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    from tests.test_distillation import conv_net, data, numpy_sp
    from keras_simloss.distillation import Distiller

    x, y = data(n=64)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    results = {"replicas": strategy.num_replicas_in_sync}
    for gram_batch in ("replica", "global"):
        keras.utils.set_random_seed(0)
        with strategy.scope():
            distiller = Distiller(conv_net(16, "teacher"), conv_net(4, "student"),
                                  [("block", "block")], gram_batch=gram_batch)
            distiller.compile(optimizer=keras.optimizers.Adam(1e-2),
                              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        # SP over 16 examples per step: each replica's 8 vs the global 16.
        evaluated = distiller.evaluate(x[:16], y[:16], batch_size=16, verbose=0, return_dict=True)
        t = keras.Model(distiller.teacher.inputs, distiller.teacher.get_layer("block").output)
        s = keras.Model(distiller.student.inputs, distiller.student.get_layer("block").output)
        ft, fs = t.predict(x[:16], verbose=0), s.predict(x[:16], verbose=0)
        results[gram_batch] = {
            "evaluated_sp": evaluated["sp_loss"],
            "global_sp": float(numpy_sp(ft, fs)),
            "local_sp": float((numpy_sp(ft[:8], fs[:8]) + numpy_sp(ft[8:], fs[8:])) / 2),
            "losses": distiller.fit(x, y, epochs=5, batch_size=16, verbose=0).history["loss"],
        }
    print(json.dumps(results))
"""


@tensorflow_only
def test_mirrored_strategy_on_two_logical_cpus():
    results = _run_script(_MIRRORED)
    assert results["replicas"] == 2
    for gram_batch in ("replica", "global"):
        losses = results[gram_batch]["losses"]
        assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    replica, global_ = results["replica"], results["global"]
    # The per-replica Gram covers each local half of the batch; the global
    # one the whole batch, as on a single device.
    assert replica["evaluated_sp"] == pytest.approx(replica["local_sp"], rel=1e-4)
    assert global_["evaluated_sp"] == pytest.approx(global_["global_sp"], rel=1e-4)
    assert global_["global_sp"] != pytest.approx(global_["local_sp"], rel=1e-3)


_MULTI_WORKER = """
    import json, os, sys
    index, ports = int(sys.argv[1]), sys.argv[2].split(",")
    os.environ["TF_CONFIG"] = json.dumps({
        "cluster": {"worker": [f"127.0.0.1:{port}" for port in ports]},
        "task": {"type": "worker", "index": index},
    })
    import numpy as np
    import tensorflow as tf
    import keras
    from tests.test_distillation import conv_net, data
    from keras_simloss.distillation import Distiller

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    x, y = data(n=64)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(16).with_options(options)
    keras.utils.set_random_seed(0)
    with strategy.scope():
        distiller = Distiller(conv_net(16, "teacher"), conv_net(4, "student"),
                              [("block", "block")])
        distiller.compile(optimizer=keras.optimizers.Adam(1e-2), metrics=["accuracy"],
                          loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = distiller.fit(dataset, epochs=4, verbose=0)
    evaluated = distiller.evaluate(dataset, verbose=0, return_dict=True)
    print(json.dumps({
        "replicas": strategy.num_replicas_in_sync,
        "loss": [float(v) for v in history.history["loss"]],
        "evaluated_loss": float(evaluated["loss"]),
        "trainable_sum": float(sum(
            np.sum(w.numpy()) for w in distiller.student.trainable_weights)),
    }))
"""


def _free_ports(count):
    import socket

    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


@tensorflow_only
def test_multi_worker_mirrored_strategy_with_two_local_workers():
    ports = ",".join(str(port) for port in _free_ports(2))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=REPO_ROOT)
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(_MULTI_WORKER), str(index), ports],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO_ROOT,
        )
        for index in range(2)
    ]
    results = []
    try:
        for worker in workers:
            stdout, stderr = worker.communicate(timeout=240)
            assert worker.returncode == 0, stderr[-3000:]
            results.append(json.loads(stdout.strip().splitlines()[-1]))
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
    for result in results:
        assert result["replicas"] == 2
        assert (
            np.all(np.isfinite(result["loss"]))
            and result["loss"][-1] < result["loss"][0]
        )
        assert np.isfinite(result["evaluated_loss"])
    # The workers stay in sync: same history and same trainable weights.
    # (Batch-norm moving statistics are per worker, as in any Keras model.)
    assert results[0]["loss"] == results[1]["loss"]
    assert results[0]["trainable_sum"] == results[1]["trainable_sum"]


# Numerics of the SP loss ----------------------------------------------------------


def _numpy_sp_dead_row_frozen(teacher, student, dead):
    """`numpy_sp` with the normalised Gram row `dead` of the student held at
    0: the convention for an all-zero row, as a function that has a
    derivative there."""

    def gram(features, frozen=None):
        flat = np.asarray(features, np.float64).reshape(len(features), -1)
        g = flat @ flat.T
        g = g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-300)
        if frozen is not None:
            g[frozen] = 0.0
        return g

    b = len(teacher)
    return np.sum((gram(teacher) - gram(student, dead)) ** 2) / b**2


def test_sp_gradient_with_an_all_zero_row_is_finite_and_correct():
    # Dead ReLUs: one example's activations are all zero, so its Gram row is
    # zero. The loss jumps there (a nearby row normalises to a unit vector);
    # the gradient through that row's own normalisation is defined as 0,
    # the rest is the ordinary derivative.
    rng = np.random.default_rng(40)
    teacher = rng.normal(size=(5, 6)).astype(np.float32)
    student = rng.normal(size=(5, 4)).astype(np.float32)
    student[2] = 0.0
    value, gradient = value_and_gradient(
        lambda s: similarity_preserving_loss(teacher, s), student
    )
    assert float(value) == pytest.approx(numpy_sp(teacher, student), rel=1e-5)
    step = 1e-3
    numeric = np.zeros(student.shape, np.float64)
    for index in np.ndindex(student.shape):
        up, down = student.astype(np.float64), student.astype(np.float64)
        up[index] += step
        down[index] -= step
        numeric[index] = (
            _numpy_sp_dead_row_frozen(teacher, up, 2)
            - _numpy_sp_dead_row_frozen(teacher, down, 2)
        ) / (2 * step)
    np.testing.assert_allclose(gradient, numeric, rtol=1e-2, atol=1e-5)
    assert np.abs(gradient).max() < 10.0  # not 1 / epsilon
    # The teacher side, all zero, and float16 activations behind a ReLU (a
    # gradient of 1 / epsilon would be inf there, and inf * 0 = NaN).
    _, teacher_gradient = value_and_gradient(
        lambda t: similarity_preserving_loss(t, student), np.zeros((5, 6))
    )
    assert np.all(np.isfinite(teacher_gradient))
    _, half_gradient = value_and_gradient(
        lambda s: (
            3000.0
            * similarity_preserving_loss(
                teacher, keras.ops.relu(keras.ops.cast(s, "float16"))
            )
        ),
        np.where(np.arange(5)[:, None] == 2, -1.0, student),
    )
    assert np.all(np.isfinite(half_gradient))


@pytest.mark.parametrize("scale", [1e-20, 1e-8, 1e9, 1e20])
def test_sp_scale_invariance_over_the_float32_range(scale):
    rng = np.random.default_rng(41)
    teacher = rng.normal(size=(6, 4, 4, 3)).astype(np.float32)
    student = rng.normal(size=(6, 10)).astype(np.float32)
    base = numpy_sp(teacher, student)
    scaled = (teacher.astype(np.float64) * scale).astype(np.float32)
    assert float(similarity_preserving_loss(scaled, student)) == pytest.approx(
        base, rel=1e-4
    )
    assert float(similarity_preserving_loss(teacher, student * scale)) == (
        pytest.approx(base, rel=1e-4)
    )


def test_sp_rejects_scalars_empty_batches_and_lists():
    with pytest.raises(ValueError, match=r"teacher_features.*batch axis"):
        similarity_preserving_loss(np.float32(1.0), np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"at least one example.*\(0, 3\)"):
        similarity_preserving_loss(np.ones((0, 3)), np.ones((0, 2)))
    with pytest.raises(ValueError, match=r"teacher_outputs.*list of 2 items"):
        SimilarityPreserving("a", "b").validate_outputs(
            [np.ones((2, 3)), np.ones((2, 3))], np.ones((2, 3))
        )


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


@pytest.mark.parametrize("logits_output", [None, "logits"])
def test_multi_output_models(logits_output):
    keras.utils.set_random_seed(0)
    distiller = Distiller(
        two_headed(16, "teacher"),
        two_headed(4, "student"),
        [("block", "block")],
        gamma=10.0,
        alpha=0.5,
        logits_output=logits_output,
    )
    distiller.compile(
        optimizer="adam",
        loss={
            "logits": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            "aux": "mse",
        },
        jit_compile=JIT_COMPILE,
    )
    x, y = data()
    targets = {"logits": y, "aux": np.tile(y.astype(np.float32)[:, None] / 5.0, 3)}
    history = distiller.fit(x, targets, epochs=2, batch_size=16, verbose=0)
    for key in ("loss", "student_loss", "sp_loss", "kd_loss"):
        assert np.all(np.isfinite(history.history[key])), key
    teacher = distiller.teacher.predict(x, verbose=0)
    student = distiller.student.predict(x, verbose=0)
    weights = {
        "aux": np.linspace(2.0, 0.0, len(y)).astype(np.float32),
        "logits": np.linspace(0.0, 2.0, len(y)).astype(np.float32),
    }

    def kd(name):
        # Each output's KD term weighted by that output's sample weights.
        p_t, p_s = softmax(teacher[name] / 4.0), softmax(student[name] / 4.0)
        kl = np.sum(p_t * (np.log(p_t) - np.log(p_s)), axis=-1)
        return 16.0 * np.sum(kl * weights[name]) / len(y)

    expected = kd("logits") if logits_output else kd("logits") + kd("aux")
    assert kd("aux") > 1e-4  # the aux head's term is not trivially 0
    result = distiller.evaluate(
        x,
        targets,
        sample_weight=weights,
        verbose=0,
        batch_size=48,
        return_dict=True,
    )
    assert result["kd_loss"] == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_kd_weights_spread_over_sequence_steps():
    # Per-example weights (b,) with sequence logits (b, T, C), T == b: each
    # example's weight applies to all its steps, as in Keras's losses.
    keras.utils.set_random_seed(0)

    def sequence_model(width, name):
        inputs = keras.Input((4, 3))
        x = keras.layers.Dense(width, activation="relu", name="hidden")(inputs)
        return keras.Model(inputs, keras.layers.Dense(5)(x), name=name)

    distiller = Distiller(
        sequence_model(8, "teacher"),
        sequence_model(4, "student"),
        alpha=0.5,
        temperature=1.0,
    )
    distiller.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(42)
    x = rng.normal(size=(4, 4, 3)).astype(np.float32)
    y = rng.integers(0, 5, size=(4, 4))
    w = np.array([0.0, 1.0, 2.0, 3.0], np.float32)
    result = distiller.evaluate(
        x, y, sample_weight=w, batch_size=4, verbose=0, return_dict=True
    )
    p_t = softmax(distiller.teacher.predict(x, verbose=0))
    p_s = softmax(distiller.student.predict(x, verbose=0))
    kl = np.sum(p_t * (np.log(p_t) - np.log(p_s)), axis=-1)  # (b, T)
    expected = np.sum(kl * w[:, None]) / kl.size
    assert result["kd_loss"] == pytest.approx(expected, rel=1e-4)


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


def test_kd_needs_the_same_classes():
    keras.utils.set_random_seed(0)
    distiller = Distiller(
        conv_net(8, "teacher", num_classes=5),
        conv_net(4, "student", num_classes=3),
        [("block", "block")],
        alpha=0.5,
    )
    distiller.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    x, y = data()
    with pytest.raises(ValueError, match=r"same classes.*\(\w*, ?5\).*\(\w*, ?3\)"):
        distiller.fit(x, y % 3, epochs=1, verbose=0)
    distiller = Distiller(
        conv_net(8, "teacher"),
        conv_net(4, "student"),
        alpha=0.5,
        logits_output="logits",
    )
    distiller.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    with pytest.raises(ValueError, match=r"logits_output.*no entry 'logits'"):
        distiller.fit(x, y, epochs=1, verbose=0)


class SubclassedStudent(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.features = keras.layers.Conv2D(4, 3, padding="same", name="features")
        self.pool = keras.layers.GlobalAveragePooling2D()
        self.head = keras.layers.Dense(5)

    def call(self, inputs, training=None):
        return self.head(self.pool(keras.ops.relu(self.features(inputs))))


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


@tensorflow_only
def test_private_keras_build_api_is_unchanged():
    # The multi-worker workaround overrides `_maybe_symbolic_build` and calls
    # `_symbolic_build`; if Keras renames them this fails, instead of the
    # workaround silently not running.
    assert keras_private_build_api_changed() == []


# Backends ---------------------------------------------------------------------

_LOSS_VALUES = """
    import json, sys
    import numpy as np
    import keras
    sys.path.insert(0, ".")
    from tests.test_distillation import conv_net, data
    from keras_simloss import Distiller, SimLoss, similarity, sim_loss

    weights = np.load(sys.argv[1], allow_pickle=True)
    teacher, student = conv_net(16, "teacher"), conv_net(4, "student")
    teacher.set_weights(list(weights["teacher"]))
    student.set_weights(list(weights["student"]))
    distiller = Distiller(teacher, student, [("block", "block")], gamma=100.0,
                          alpha=0.25, temperature=2.0)
    distiller.compile(loss=SimLoss(similarity.ordinal(5, 0.5), from_logits=True))
    x, y = data(n=12, seed=4)
    w = np.linspace(0.5, 1.5, 12).astype(np.float32)
    result = distiller.evaluate(x, y, sample_weight=w, batch_size=12, verbose=0,
                                return_dict=True)
    logits = np.random.default_rng(0).normal(size=(6, 5)).astype(np.float32)
    result["sim_loss"] = [float(v) for v in keras.ops.convert_to_numpy(
        sim_loss([0, 1, 2, 3, 4, 2], logits, similarity.ordinal(5, 0.7), True))]
    print(json.dumps({k: v if isinstance(v, list) else float(v)
                      for k, v in result.items()}))
"""


@pytest.mark.skipif(
    BACKEND != "tensorflow", reason="runs every backend itself, once per suite"
)
def test_loss_values_agree_across_backends_within_1e_5(tmp_path):
    keras.utils.set_random_seed(0)
    teacher, student = conv_net(16, "teacher"), conv_net(4, "student")
    path = str(tmp_path / "weights.npz")
    np.savez(
        path,
        teacher=np.array(teacher.get_weights(), dtype=object),
        student=np.array(student.get_weights(), dtype=object),
    )
    results = {}
    for backend in ("tensorflow", "jax", "torch"):
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
        done = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(_LOSS_VALUES), path],
            capture_output=True,
            text=True,
            env=env,
            cwd=REPO_ROOT,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        results[backend] = json.loads(done.stdout.strip().splitlines()[-1])
    reference = results["tensorflow"]
    for backend, values in results.items():
        for key, value in values.items():
            np.testing.assert_allclose(
                value, reference[key], rtol=1e-5, atol=1e-5, err_msg=(backend, key)
            )


_DATA_PARALLEL = """
    import json, os, sys
    import numpy as np
    import keras
    sys.path.insert(0, ".")
    from tests.test_distillation import conv_net, data, numpy_sp
    from keras_simloss import Distiller

    devices = keras.distribution.list_devices("cpu")
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
    x, y = data(n=64)
    results = {"devices": len(devices)}
    for gram_batch in ("replica", "global"):
        keras.utils.set_random_seed(0)
        distiller = Distiller(conv_net(16, "teacher"), conv_net(4, "student"),
                              [("block", "block")], gram_batch=gram_batch)
        distiller.compile(optimizer=keras.optimizers.Adam(1e-2), jit_compile=True,
                          loss=keras.losses.SparseCategoricalCrossentropy(
                              from_logits=True))
        history = distiller.fit(x, y, epochs=3, batch_size=16, verbose=0)
        evaluated = distiller.evaluate(x[:16], y[:16], batch_size=16, verbose=0,
                                       return_dict=True)
        t = keras.Model(distiller.teacher.inputs,
                        distiller.teacher.get_layer("block").output).predict(
                            x[:16], verbose=0)
        s = keras.Model(distiller.student.inputs,
                        distiller.student.get_layer("block").output).predict(
                            x[:16], verbose=0)
        results[gram_batch] = {
            "losses": history.history["loss"],
            "evaluated_sp": evaluated["sp_loss"],
            "local_sp": (numpy_sp(t[:8], s[:8]) + numpy_sp(t[8:], s[8:])) / 2,
            "global_sp": numpy_sp(t, s),
        }
    # A plain model compiled with SimLoss (sparse rows) under the same layout.
    from keras_simloss import SimLoss, similarity
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten(),
                              keras.layers.Dense(5)])
    model.compile(optimizer=keras.optimizers.Adam(1e-2), jit_compile=True,
                  loss=SimLoss(similarity.top_k(similarity.ordinal(5, 0.5), 2),
                               from_logits=True))
    results["simloss"] = model.fit(x, y, epochs=3, batch_size=16,
                                   verbose=0).history["loss"]
    print(json.dumps(results))
"""


@pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution runs on JAX")
def test_data_parallel_on_two_jax_host_devices():
    env = dict(
        os.environ,
        KERAS_BACKEND="jax",
        TF_CPP_MIN_LOG_LEVEL="3",
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
    )
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_DATA_PARALLEL)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert results["devices"] == 2
    for losses in (
        results["replica"]["losses"],
        results["global"]["losses"],
        results["simloss"],
    ):
        assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    replica, global_ = results["replica"], results["global"]
    # As under tf.distribute: "replica" = the mean over the per-device
    # halves of the batch; "global" = the whole batch.
    assert replica["evaluated_sp"] == pytest.approx(replica["local_sp"], rel=1e-4)
    assert global_["evaluated_sp"] == pytest.approx(global_["global_sp"], rel=1e-4)
    assert global_["global_sp"] != pytest.approx(global_["local_sp"], rel=1e-3)


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
