"""Tests of data parallelism: tf.distribute (one and several workers),
keras.distribution on JAX, and loss values across backends, each in
subprocesses."""

import importlib.util
import inspect
import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from tests.distillation.test_layers import REPO_ROOT, conv_net
from tests.testing import BACKEND

tensorflow_only = pytest.mark.skipif(
    BACKEND != "tensorflow", reason="tf.distribute runs on the TensorFlow backend"
)


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
    from tests.distillation.test_layers import conv_net, data
    from tests.distillation.test_sp import numpy_sp
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


@pytest.mark.large
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
    from tests.distillation.test_layers import conv_net, data
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


@pytest.mark.large
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


@tensorflow_only
@pytest.mark.parametrize("method", ["_maybe_symbolic_build", "_symbolic_build"])
def test_private_keras_build_api_is_unchanged(method):
    # The multi-worker workaround (`Distiller._maybe_symbolic_build` and
    # `_backend.build_from_local_batch`) overrides `_maybe_symbolic_build` and
    # calls `_symbolic_build`; if Keras renames them or changes their
    # parameters this fails, instead of the workaround silently not running.
    function = getattr(keras.Model, method, None)
    assert function is not None, f"keras.Model.{method} is gone"
    assert tuple(inspect.signature(function).parameters) == (
        "self",
        "iterator",
        "data_batch",
    )


# Backends ---------------------------------------------------------------------

_LOSS_VALUES = """
    import json, sys
    import numpy as np
    import keras
    sys.path.insert(0, ".")
    from tests.distillation.test_layers import conv_net, data
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


def _json_of_script(script, env, *args):
    """Runs `script` in a child Python from the repository root; returns the
    JSON object its last output line holds (fails with its stderr)."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# The backends this test needs besides TensorFlow, when they are missing:
# `pip install ".[test]"` installs neither (see README, Development).
_MISSING_BACKENDS = [
    name for name in ("jax", "torch") if importlib.util.find_spec(name) is None
]


@pytest.mark.large
@pytest.mark.skipif(
    BACKEND != "tensorflow", reason="runs every backend itself, once per suite"
)
@pytest.mark.skipif(
    bool(_MISSING_BACKENDS),
    reason=f"compares TensorFlow with JAX and PyTorch; not installed: "
    f"{', '.join(_MISSING_BACKENDS)} (pip install '.[jax]' torch)",
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
        results[backend] = _json_of_script(_LOSS_VALUES, env, path)
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
    from tests.distillation.test_layers import conv_net, data
    from tests.distillation.test_sp import numpy_sp
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


@pytest.mark.large
@pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution runs on JAX")
def test_data_parallel_on_two_jax_host_devices():
    env = dict(
        os.environ,
        KERAS_BACKEND="jax",
        TF_CPP_MIN_LOG_LEVEL="3",
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
    )
    results = _json_of_script(_DATA_PARALLEL, env)
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
