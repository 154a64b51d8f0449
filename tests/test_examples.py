"""The examples and the README's snippets, end to end on tiny data made here.

TensorFlow only: the examples' input pipelines use `tf.data` (the library
itself is tested on every backend in the other test files).
"""

import json
import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest

if keras.backend.backend() != "tensorflow":
    pytest.skip(
        "the examples and README snippets use tf.data and are run on the "
        "TensorFlow backend only",
        allow_module_level=True,
    )

import tensorflow as tf  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")

from tests.testing import load_example, readme_snippets  # noqa: E402


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
    assert "Skipped 1 file(s)" in printed and "MAE, median" in printed
    record = result["records"][0]
    # Read-outs of the same predictions: argmax, median and mean.
    for key in ("test_mae", "test_mae_median", "test_mae_mean", "test_mse_mean"):
        assert np.isfinite(record[key]), key


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
        ("flat-afad", "AGE/GENDER/IMAGE.jpg, e.g. 15/111/0001.jpg"),
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


def test_distill_cifar10_with_mock_tfds(tmp_path):
    import tensorflow_datasets as tfds

    out = tmp_path / "out"
    with tfds.testing.mock_data(num_examples=64):
        result = load_example("distill_cifar10").main(
            ["--dataset", "cifar10", "--teacher-epochs", "1", "--labelled-fraction", "1",
             "--methods", "student alone", "KD+SP", "--output-dir", str(out), *SMALL_RUN]
        )  # fmt: skip
    assert [r["method"] for r in result["records"]] == ["student alone", "KD+SP"]
    assert all(0.0 <= r["test_error"] <= 1.0 for r in result["records"])
    _assert_outputs(out)


def test_distill_on_digits_with_gamma_sweep_and_loss_parts(tmp_path, capsys):
    out = tmp_path / "out"
    result = load_example("distill_cifar10").main(
        ["--teacher-epochs", "1", "--runs", "2", "--methods", "student alone", "SP",
         "--gamma-sweep", "30", "--loss-parts", "--epochs", "2", "--output-dir", str(out)]
    )  # fmt: skip
    methods = [r["method"] for r in result["records"]]
    assert methods == ["student alone", "SP, gamma=3000", "SP, gamma=30"] * 2
    # 5 % of each digit's ~120 training images keep their label.
    assert all(50 <= r["labelled"] <= 70 for r in result["records"])
    printed = capsys.readouterr().out
    assert "Loss terms of SP, gamma=30, seed 0" in printed and "gamma SP" in printed
    table = result["table"].splitlines()
    headers = [cell.strip() for cell in table[0].split("|")[1:-1]]
    assert headers == ["method", "test error %", "p vs student alone", "better runs"]
    assert max(map(len, table)) <= 100
    _assert_outputs(out)


def test_labelled_subset_keeps_a_fraction_of_each_class():
    module = load_example("distill_cifar10")
    labels = np.repeat(np.arange(4), 20)
    kept = module.labelled_subset(labels, 0.1, seed=3)
    assert np.array_equal(np.bincount(kept[kept >= 0]), [2, 2, 2, 2])
    assert np.array_equal(kept[kept >= 0], labels[kept >= 0])
    assert np.all((kept == -1) | (kept == labels))
    assert not np.array_equal(kept, module.labelled_subset(labels, 0.1, seed=4))
    assert np.array_equal(module.labelled_subset(labels, 1.0, seed=3), labels)


def test_distill_rejects_bad_depth(capsys):
    with pytest.raises(SystemExit):
        load_example("distill_cifar10").main(["--student-depth", "12"])
    assert "6n + 4" in capsys.readouterr().err


@pytest.mark.parametrize(
    "name", ["age_estimation", "cifar100", "distill_cifar10", "quickstart"]
)
def test_help_shows_every_default(name, capsys):
    with pytest.raises(SystemExit):
        load_example(name).main(["--help"])
    printed = capsys.readouterr().out
    options = set(re.findall(r"^  (--[a-z-]+)", printed, re.MULTILINE))
    defaults = re.findall(r"\(default:\s[^)]*\)", printed)
    # Every option states its default (the regex skips "-h, --help").
    assert len(defaults) == len(options) >= 6, (options, defaults)


@pytest.mark.large
def test_output_is_only_the_examples_own(tmp_path):
    """No TensorFlow start-up lines, no retracing warnings, tables in 100 columns.

    Six models in one process: enough for TensorFlow to warn about
    retracing if each run traced new functions for evaluation.
    """
    env = {**os.environ, "KERAS_BACKEND": "tensorflow"}
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    completed = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, "age_estimation.py"),
         "--synthetic-size", "200", "--num-classes", "5", "--grid", "0", "0.3", "0.6",
         "--runs", "2", "--epochs", "2", "--batch-size", "32",
         "--output-dir", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    assert completed.stderr == ""
    out = completed.stdout
    assert "WARNING" not in out and "retracing" not in out
    assert out.count("Data: ") == 1
    assert re.search(r"\[6/6\] r=0\.6, seed 1: .*elapsed, ~0 s left", out)
    table = [line for line in out.splitlines() if line.startswith("|")]
    assert len(table) == 5 and max(map(len, table)) <= 100


# The README's Python snippets, each run as written in a fresh namespace, in
# a folder holding stand-ins for the files they name.


def _write_stand_ins(folder):
    from gensim.models import KeyedVectors

    from keras_simloss.datasets import cifar100

    # A tiny word2vec binary file under the Google News vectors' name.
    names = list(cifar100.PAPER_LABEL_NAMES)
    vectors = KeyedVectors(vector_size=8)
    vectors.add_vectors(names, np.random.default_rng(0).normal(size=(len(names), 8)))
    vectors.save_word2vec_format(
        str(folder / "GoogleNews-vectors-negative300.bin"), binary=True
    )
    np.save(
        folder / "class_vectors.npy", np.random.default_rng(1).normal(size=(500, 16))
    )
    teacher = keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            keras.layers.Conv2D(16, 3, activation="relu"),
            keras.layers.Conv2D(32, 3, strides=2, activation="relu", name="group3"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(10),
        ]
    )
    teacher.save(folder / "teacher.keras")
    ages = keras.Sequential(
        [
            keras.Input((60, 60, 3)),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(90),
        ]
    )
    ages.save(folder / "age.keras")


def test_readme_has_snippets():
    assert len(readme_snippets()) >= 4


@pytest.mark.parametrize(
    "index", range(len(readme_snippets())), ids=lambda i: f"snippet{i + 1}"
)
def test_readme_snippet_runs_as_written(index, tmp_path, monkeypatch):
    _write_stand_ins(tmp_path)
    monkeypatch.chdir(tmp_path)
    code = readme_snippets()[index]
    keras.utils.clear_session()
    exec(
        compile(code, f"README.md snippet {index + 1}", "exec"), {"__name__": "readme"}
    )
