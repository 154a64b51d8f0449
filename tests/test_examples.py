"""The examples end to end on tiny data made here (no download)."""

import importlib.util
import json
import os

import numpy as np
import pytest
import tensorflow as tf

EXAMPLES = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"
)


def load_example(name):
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(EXAMPLES, f"{name}.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_jpeg(path, seed):
    image = np.random.default_rng(seed).integers(
        0, 255, size=(24, 20, 3), dtype=np.uint8
    )
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tf.io.write_file(path, tf.io.encode_jpeg(image))


def _assert_outputs(output_dir, *names):
    for name in ("runs.csv", "results.json", "table.md", *names):
        assert os.path.getsize(os.path.join(output_dir, name)) > 0, name


SMALL_RUN = ["--runs", "1", "--epochs", "1", "--batch-size", "8"]


def test_age_estimation_on_utkface_layout(tmp_path, capsys):
    data_dir = tmp_path / "UTKFace"
    for index in range(18):
        age = 20 + index % 6
        write_jpeg(
            str(data_dir / f"{age}_{index % 2}_0_20170109{index:06d}.jpg.chip.jpg"),
            index,
        )
    write_jpeg(str(data_dir / "not_an_age.jpg"), 99)
    out = tmp_path / "out"
    result = load_example("age_estimation").main(
        ["--dataset", "utkface", "--data-dir", str(data_dir), "--grid", "0", "0.5",
         "--output-dir", str(out), *SMALL_RUN]
    )  # fmt: skip
    assert [r["reduction_factor"] for r in result["records"]] == [0.0, 0.5]
    _assert_outputs(out, "predicted_distribution.png")
    saved = json.loads((out / "results.json").read_text())
    # Ages 20..25: six classes, one predicted distribution value per class.
    assert len(saved["mean_predicted_distribution"]["0.0"]) == 6
    printed = capsys.readouterr().out
    assert "Skipped 1 file(s)" in printed and "test MAE" in printed


def test_age_estimation_on_afad_layout(tmp_path):
    data_dir = tmp_path / "AFAD"
    for index in range(12):
        write_jpeg(
            str(
                data_dir
                / str(15 + index % 3)
                / ("111" if index % 2 else "112")
                / f"{index}.jpg"
            ),
            index,
        )
    out = tmp_path / "out"
    result = load_example("age_estimation").main(
        ["--dataset", "afad", "--data-dir", str(data_dir), "--grid", "0.3",
         "--output-dir", str(out), *SMALL_RUN]
    )  # fmt: skip
    assert len(result["records"]) == 1 and np.isfinite(result["records"][0]["test_mae"])
    _assert_outputs(out)


def test_age_estimation_on_generated_data(tmp_path):
    out = tmp_path / "out"
    result = load_example("age_estimation").main(
        ["--synthetic-size", "200", "--num-classes", "5", "--grid", "0", "0.4",
         "--output-dir", str(out), *SMALL_RUN]
    )  # fmt: skip
    assert len(result["summary"]) == 2
    _assert_outputs(out, "predicted_distribution.png")


@pytest.mark.parametrize(
    "layout, message",
    [
        ("empty", "No usable image"),
        ("flat-afad", "No usable image"),
        ("missing", "not a folder"),
    ],
)
def test_age_estimation_bad_folders_get_a_clear_message(
    tmp_path, capsys, layout, message
):
    data_dir = tmp_path / "data"
    if layout != "missing":
        data_dir.mkdir()
    if layout == "flat-afad":
        write_jpeg(str(data_dir / "0001.jpg"), 0)  # images not under AGE/GENDER/
    with pytest.raises(SystemExit) as exit_info:
        load_example("age_estimation").main(
            ["--dataset", "afad", "--data-dir", str(data_dir), *SMALL_RUN]
        )
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def _write_vectors(path, names, dim=6):
    rng = np.random.default_rng(0)
    with open(path, "w") as handle:
        handle.write(f"{len(names)} {dim}\n")
        for name in names:
            handle.write(
                name + " " + " ".join(f"{v:.4f}" for v in rng.normal(size=dim)) + "\n"
            )


def test_cifar100_with_mock_tfds_and_word_vectors(tmp_path):
    import tensorflow_datasets as tfds

    from keras_simloss.datasets import cifar100

    vectors = tmp_path / "vectors.txt"
    _write_vectors(vectors, cifar100.PAPER_LABEL_NAMES)
    out = tmp_path / "out"
    with tfds.testing.mock_data(num_examples=300):
        result = load_example("cifar100").main(
            ["--dataset", "cifar100", "--vectors-file", str(vectors), "--grid", "0.99", "0.5",
             "--train-per-class", "2", "--val-per-class", "1", "--output-dir", str(out), *SMALL_RUN]
        )  # fmt: skip
    assert [r["lower_bound"] for r in result["records"]] == [0.99, 0.5]
    for record in result["records"]:
        assert 0.0 <= record["test_accuracy"] <= record["test_sa"] <= 1.0
    _assert_outputs(out, "metrics.png")


def test_cifar100_on_generated_data_with_hierarchy(tmp_path):
    out = tmp_path / "out"
    result = load_example("cifar100").main(
        [
            "--synthetic-size",
            "400",
            "--grid",
            "0.0",
            "--output-dir",
            str(out),
            *SMALL_RUN,
        ]
    )
    assert len(result["records"]) == 1
    _assert_outputs(out, "metrics.png")


def test_cifar100_vector_file_lacking_names_gets_a_clear_message(tmp_path, capsys):
    vectors = tmp_path / "vectors.txt"
    _write_vectors(vectors, ["apple", "baby", "bear"])
    with pytest.raises(SystemExit):
        load_example("cifar100").main(["--vectors-file", str(vectors), *SMALL_RUN])
    err = capsys.readouterr().err
    assert "20 of 20 class names have no vector" in err


def test_distill_cifar10_with_mock_tfds_and_simloss(tmp_path):
    import tensorflow_datasets as tfds

    out = tmp_path / "out"
    with tfds.testing.mock_data(num_examples=64):
        result = load_example("distill_cifar10").main(
            ["--dataset", "cifar10", "--teacher-epochs", "1", "--methods", "student alone", "KD+SP",
             "--student-loss", "simloss", "--output-dir", str(out), *SMALL_RUN]
        )  # fmt: skip
    assert [r["method"] for r in result["records"]] == ["student alone", "KD+SP"]
    assert all(0.0 <= r["test_error"] <= 1.0 for r in result["records"])
    _assert_outputs(out)


def test_distill_rejects_bad_depth(capsys):
    with pytest.raises(SystemExit):
        load_example("distill_cifar10").main(["--student-depth", "12"])
    assert "6n + 4" in capsys.readouterr().err
