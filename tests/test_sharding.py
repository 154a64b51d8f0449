"""Class-sharded training (`keras_simloss.sharding`) on simulated JAX devices.

The multi-device checks run `tests/sharded_run.py` in a subprocess (JAX fixes
its device count when it starts) and compare each sharded step with the same
step on one device without a distribution.
"""

import functools
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_simloss as ks
from tests.testing import BACKEND, readme_snippets

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE_COUNTS = (4, 8)
KINDS = ("ordinal", "embeddings", "sparse", "hierarchy", "matrix", "hubs")
# Both losses on 4 devices; SimLoss alone on 8 (the same code, more shards).
LOSSES = {4: ("simloss", "soft_labels"), 8: ("simloss",)}

jax_only = pytest.mark.skipif(
    BACKEND != "jax", reason="keras.distribution.ModelParallel runs on JAX"
)


def _python(arguments, cwd=REPO_ROOT):
    """Runs `python *arguments` with this checkout importable; its stdout."""
    completed = subprocess.run(
        [sys.executable, *arguments],
        capture_output=True,
        text=True,
        timeout=480,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=REPO_ROOT),
        cwd=cwd,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed.stdout


@functools.cache
def _sharded_run(devices):
    script = os.path.join(REPO_ROOT, "tests", "sharded_run.py")
    output = _python([script, str(devices), *LOSSES[devices]])
    return json.loads(output.strip().splitlines()[-1])


def _runs(devices):
    results = _sharded_run(devices)
    assert results["devices"] == devices
    assert sorted(results["runs"]) == sorted(
        f"{k}-{loss}" for k in KINDS for loss in LOSSES[devices]
    )
    return results["runs"]


@pytest.mark.large
@jax_only
@pytest.mark.parametrize("devices", DEVICE_COUNTS)
def test_sharded_step_gives_the_one_device_numbers(devices):
    for name, run in _runs(devices).items():
        one, sharded = run["one"], run["sharded"]
        for part in ("logs", "evaluated"):
            assert (
                sorted(sharded[part])
                == sorted(one[part])
                == ["loss", "median_mae", "min_risk_mae", "severity", "top3"]
            ), (name, part)
            for key, value in one[part].items():
                if key == "median_mae":
                    continue  # row by row below
                assert sharded[part][key] == pytest.approx(value, rel=1e-5), (
                    name,
                    part,
                    key,
                )
        # The median read-out: a cumulative sum over 4000 classes in float32
        # (one scan on one device, per-device scans plus offsets when
        # sharded) may cross 0.5 one class off where the float64 sums are
        # within its rounding of 0.5; elsewhere both runs give the float64
        # median.
        for medians in (one["medians"], sharded["medians"]):
            for got, exact, margin in zip(
                medians, one["medians_float64"], one["median_margins"]
            ):
                assert got == exact or (abs(got - exact) == 1 and margin < 1e-5), (
                    name,
                    got,
                    exact,
                    margin,
                )
        # The metric over the same rows differs by at most one class on each
        # near-tie row; before the step (the training logs, weights 0.5 to
        # 2 summing to 16 or more), by at most two rows' worth.
        ties = sum(margin < 1e-5 for margin in one["median_margins"])
        assert ties <= 3, (name, ties)
        assert sharded["evaluated"]["median_mae"] == pytest.approx(
            one["evaluated"]["median_mae"], abs=ties / len(one["medians"]) + 1e-5
        ), name
        assert sharded["logs"]["median_mae"] == pytest.approx(
            one["logs"]["median_mae"], abs=2 * 2.0 / 16
        ), name
        # The step moved the kernel by -gradient (SGD, learning rate 1).
        assert one["gradient_norm"] > 0.1, name
        np.testing.assert_allclose(
            sharded["gradient"], one["gradient"], rtol=1e-5, atol=1e-7, err_msg=name
        )
        assert sharded["gradient_norm"] == pytest.approx(one["gradient_norm"], rel=1e-5)
        assert sharded["min_risk"] == one["min_risk"], name
        # p @ S itself, which min-risk decoding reads, stays class-sharded.
        np.testing.assert_allclose(
            sharded["expected"], one["expected"], rtol=1e-5, atol=1e-7, err_msg=name
        )
        assert sharded["expected_spec"][-1] == "model", name
        assert sharded["reloaded_max_difference"] == 0.0, name


@pytest.mark.large
@jax_only
@pytest.mark.parametrize("devices", DEVICE_COUNTS)
def test_state_is_sharded_and_no_buffer_holds_every_class(devices):
    expected_keys = {
        "ordinal": set(),
        "embeddings": {"unit_vectors"},
        "sparse": {"indices", "values", "incoming", "incoming_weights"},
        "hierarchy": {"ancestors_0", "ancestors_1"},
        "matrix": {"similarity_table"},  # log S: the log of its rows
        "hubs": {"indices", "values"},  # no turned-around lists
    }
    for name, run in _runs(devices).items():
        sharded = run["sharded"]
        kind = name.split("-")[0]
        assert set(sharded["layouts"]) == expected_keys[kind], name
        for key, layout in sharded["layouts"].items():
            assert layout.count("model") == 1, (name, key, layout)
            class_axis = layout.index("model")
            shards, shape = sharded["shards"][key]
            assert shape[class_axis] == 4000, (name, key, shape)
            assert len(shards) == devices
            for shard in shards:
                part = list(shape)
                part[class_axis] //= devices
                assert shard == part, (name, key, shard)
        # Every buffer of the compiled step (forward, backward, metrics,
        # optimizer) has at most C / n of the classes; a dense table's
        # shard, its columns for this device's classes, has all C rows.
        own_shard = [f"4000,{4000 // devices}"] if kind == "matrix" else []
        assert sharded["full_class_buffers"] == own_shard, name


@pytest.mark.large
@jax_only
@pytest.mark.parametrize("devices", DEVICE_COUNTS)
def test_dense_tables_and_hubs_with_few_classes_per_device_match_numpy(devices):
    # p @ S, rows, log rows and pairs against NumPy's rows of S: the dense
    # tables of the structured kinds at C = 3n, and hub lists with more
    # neighbours per class than a device has classes.
    results = _sharded_run(devices)["small_blocks"]
    assert sorted(results) == ["embeddings", "hierarchy", "hubs", "matrix", "ordinal"]
    assert results["hubs"]["pushes"] is True
    for name, result in results.items():
        assert result["difference"] < 1e-6, (name, result)
        assert result["same_zeros"], name
        assert result["host_tables"] is False, name


@pytest.mark.large
@jax_only
def test_sharded_top_k_equals_top_k_on_tied_rows():
    assert _sharded_run(4)["top_k"] == {"1": True, "7": True, "1003": True}


@pytest.mark.large
@jax_only
@pytest.mark.parametrize("devices", DEVICE_COUNTS)
def test_top_k_on_device_splits_rows_over_devices_with_the_same_lists(devices):
    # Blocks of 250 rows, padded to 252 (4 devices) or 256 (8 devices).
    assert _sharded_run(devices)["top_k_on_devices"] == {
        "devices": devices,
        "block_devices": devices,
        "block_rows": 252 if devices == 4 else 256,
        "equal": True,
    }


@pytest.mark.large
@jax_only
def test_bad_layouts_are_refused_naming_both_sides():
    messages = _sharded_run(4)["errors"]
    expected = {
        "indivisible": ["size 4", "num_classes=4002", "4002 % 4 = 2"],
        "batch_axis": ["axis='batch'", "batch_dim_name='batch'"],
        "unknown_axis": ["['batch', 'model']", "axis='classes'"],
        "other_axis": ["'model'", "'logits/kernel'", "(None, 'batch')"],
        "not_sharded": ["'model'", "'logits/kernel'", "(None, None)"],
        "twice": ["already sharded"],
        "no_distribution": ["keras.distribution.distribution()=None"],
    }
    assert sorted(messages) == sorted(expected)
    for case, parts in expected.items():
        assert messages[case] is not None, f"{case}: no error"
        for part in parts:
            assert part in messages[case], (case, messages[case])


@pytest.mark.skipif(BACKEND == "jax", reason="the JAX backend has ModelParallel")
def test_other_backends_are_told_that_model_parallelism_needs_jax():
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(4)(inputs))
    with pytest.raises(ValueError, match=f"keras.config.backend\\(\\)='{BACKEND}'"):
        ks.sharding.shard_classes(model, ks.similarity.ordinal(4, 0.5))


def test_top_k_of_an_unsharded_similarity_is_top_k():
    values = np.random.default_rng(0).integers(0, 3, size=(5, 12)).astype("float32")
    got = ks.sharding.top_k(values, 4, ks.similarity.ordinal(12, 0.5))
    expected = keras.ops.top_k(values, 4, sorted=True)
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(expected[1]))


def test_class_layout_map_shards_kernel_and_bias():
    mesh = keras.distribution.DeviceMesh((1,), ["model"], ["cpu:0"])
    layout_map = ks.sharding.class_layout_map(mesh, "logits")
    assert layout_map["logits/kernel"].axes == (None, "model")
    assert layout_map["logits/bias"].axes == ("model",)
    with pytest.raises(ValueError, match=r"\['model'\]. Received: axis='classes'"):
        ks.sharding.class_layout_map(mesh, "logits", axis="classes")


def test_shard_classes_needs_a_similarity():
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(4)(inputs))
    with pytest.raises(TypeError, match="Received: str"):
        ks.sharding.shard_classes(model, "ordinal")


@pytest.mark.large
@jax_only
def test_readme_sharding_script_runs_as_written(tmp_path):
    (script,) = readme_snippets(scripts=True)
    output = _python(["-c", script], cwd=tmp_path)
    assert "{'unit_vectors': ('model', None)}" in output
    assert "mistake_severity_at_5" in output
