"""Helpers shared by the examples: result tables, significance tests, files.

Optional dependencies (scipy for the Wilcoxon test, matplotlib for plots)
are imported lazily; without them the examples still train and print their
tables, and say what they skipped.
"""

import argparse
import csv
import json
import os
import sys
import time

import numpy as np


def quiet_tensorflow():
    """Imports TensorFlow without its start-up log lines.

    TensorFlow 2.21 writes a few C++ log lines (oneDNN, CUDA drivers) to
    standard error while it loads, and `TF_CPP_MIN_LOG_LEVEL` does not stop
    them (they come before its logging starts). Standard error is pointed at
    /dev/null for the import only; Python errors still show. Call before
    importing Keras.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if "tensorflow" in sys.modules:
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        import tensorflow  # noqa: F401
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)


def summarize(records, group_key, metrics):
    """Mean and standard deviation of `metrics` per value of `group_key`.

    Args:
        records: list of dicts, one per run.
        group_key: the grid parameter, e.g. `"reduction_factor"`.
        metrics: names of the numeric fields to summarise.

    Returns:
        A list of dicts (one per group, in first-seen order) with `group_key`,
        `runs`, and `<metric>_mean` / `<metric>_std` for each metric.
    """
    groups = {}
    for record in records:
        groups.setdefault(record[group_key], []).append(record)
    rows = []
    for value, runs in groups.items():
        row = {group_key: value, "runs": len(runs)}
        for metric in metrics:
            values = np.array([run[metric] for run in runs], dtype=np.float64)
            row[f"{metric}_mean"] = float(values.mean())
            row[f"{metric}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        rows.append(row)
    return rows


def wilcoxon_p_values(records, group_key, baseline, metric, seed_key="seed"):
    """Two-sided Wilcoxon signed-rank p-value of each group vs the baseline.

    Runs are paired by `seed_key`. Returns `{group: p}` (NaN where fewer than
    two pairs or all differences are zero), or `None` when scipy is missing.
    """
    try:
        from scipy.stats import wilcoxon
    except ImportError:
        return None
    by_group = {}
    for record in records:
        by_group.setdefault(record[group_key], {})[record[seed_key]] = record[metric]
    base = by_group.get(baseline, {})
    p_values = {}
    for group, runs in by_group.items():
        seeds = sorted(set(runs) & set(base))
        differences = [runs[s] - base[s] for s in seeds]
        if group == baseline or len(seeds) < 2 or not np.any(differences):
            p_values[group] = float("nan")
        else:
            p_values[group] = float(wilcoxon(differences).pvalue)
    return p_values


def paired_differences(records, group_key, baseline, metric, seed_key="seed"):
    """`metric` of each group minus the baseline's, paired by `seed_key`.

    Returns `{group: array of differences in seed order}` for the groups
    other than `baseline` (seeds the baseline lacks are left out).
    """
    by_group = {}
    for record in records:
        by_group.setdefault(record[group_key], {})[record[seed_key]] = record[metric]
    base = by_group.get(baseline, {})
    return {
        group: np.array(
            [runs[s] - base[s] for s in sorted(set(runs) & set(base))],
            dtype=np.float64,
        )
        for group, runs in by_group.items()
        if group != baseline
    }


def paired_p_values(records, group_key, metric, other):
    """Two-sided Wilcoxon p-value of `metric` vs `other` within each group.

    For two read-outs of the same runs (e.g. median vs argmax MAE). Returns
    `{group: p}` (NaN where fewer than two runs or all differences are
    zero), or `None` when scipy is missing.
    """
    try:
        from scipy.stats import wilcoxon
    except ImportError:
        return None
    by_group = {}
    for record in records:
        by_group.setdefault(record[group_key], []).append(
            record[metric] - record[other]
        )
    return {
        group: float(wilcoxon(d).pvalue) if len(d) > 1 and np.any(d) else float("nan")
        for group, d in by_group.items()
    }


def markdown_table(headers, body):
    """A Markdown table whose columns are padded to line up in a terminal."""
    cells = [list(map(str, headers))] + [list(map(str, row)) for row in body]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), rule] + [line(row) for row in cells[1:]])


def format_p(p):
    """A p-value as printed in the tables: 3 decimals, "-" when undefined."""
    return "-" if p is None or np.isnan(p) else f"{p:.3f}"


def format_table(
    rows, group_key, columns, extra_columns=(), group_label=None, labels=None
):
    """A Markdown table of `mean ± std` columns, then p-values or other text.

    Args:
        rows: output of `summarize`.
        group_key: the grid parameter (first column).
        columns: list of `(metric, header, scale, digits)`.
        extra_columns: list of `(header, {group: value})`; a float value is
            a p-value (see `format_p`), a string is shown as it is.
        group_label: header of the first column. Defaults to `group_key`.
        labels: optional `{group: text}` for the first column.
    """
    headers = [group_label or group_key] + [header for _, header, _, _ in columns]
    headers += [header for header, _ in extra_columns]
    body = []
    for row in rows:
        group = row[group_key]
        cells = [(labels or {}).get(group, str(group))]
        for metric, _, scale, digits in columns:
            mean = row[f"{metric}_mean"] * scale
            std = row[f"{metric}_std"] * scale
            cells.append(f"{mean:.{digits}f} ± {std:.{digits}f}")
        for _, values in extra_columns:
            value = values.get(group)
            cells.append(value if isinstance(value, str) else format_p(value))
        body.append(cells)
    return markdown_table(headers, body)


def format_duration(seconds):
    """`42 s` or `3 min 05 s`."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    return f"{seconds // 60} min {seconds % 60:02d} s"


class Progress:
    """Prints one line per finished unit of work with elapsed and remaining time.

    The remaining time assumes the units left take as long on average as
    those done.
    """

    def __init__(self, total):
        self.total = total
        self.done = 0
        self.start = time.perf_counter()

    def step(self, message):
        self.done += 1
        elapsed = time.perf_counter() - self.start
        left = elapsed / self.done * (self.total - self.done)
        width = len(str(self.total))
        print(
            f"[{self.done:>{width}}/{self.total}] {message}  "
            f"({format_duration(elapsed)} elapsed, ~{format_duration(left)} left)",
            flush=True,
        )


def epoch_progress(label, epochs, every_seconds=10.0):
    """A Keras callback printing one progress line at most every few seconds.

    For long single fits (a teacher): the epoch, the training loss and the
    time left, so that the user sees it move without a line per step.
    """
    import keras

    class EpochProgress(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.start = self.last = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            now = time.perf_counter()
            if now - self.last < every_seconds and epoch + 1 < epochs:
                return
            self.last = now
            elapsed = now - self.start
            left = elapsed / (epoch + 1) * (epochs - epoch - 1)
            loss = (logs or {}).get("loss")
            print(
                f"{label}: epoch {epoch + 1}/{epochs}"
                + (f", loss {loss:.4f}" if loss is not None else "")
                + f"  ({format_duration(elapsed)} elapsed, ~{format_duration(left)} left)",
                flush=True,
            )

    return EpochProgress()


def save_results(output_dir, records, table, extra=None):
    """Writes `runs.csv`, `results.json` and `table.md` into `output_dir`."""
    os.makedirs(output_dir, exist_ok=True)
    fields = sorted({key for record in records for key in record})
    with open(os.path.join(output_dir, "runs.csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(records)
    with open(os.path.join(output_dir, "results.json"), "w") as handle:
        json.dump({"runs": records, **(extra or {})}, handle, indent=2, default=float)
    with open(os.path.join(output_dir, "table.md"), "w") as handle:
        handle.write(table + "\n")


class _HelpFormatter(
    argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter
):
    """Shows every default and keeps the docstring's line breaks."""


def argument_parser(doc):
    """An `argparse` parser whose help is an example's module docstring.

    Every argument needs a `help` text: argparse shows the default only
    next to one.
    """
    return argparse.ArgumentParser(
        description=doc.splitlines()[0],
        formatter_class=_HelpFormatter,
        epilog=doc.split("\n", 2)[2],
    )


def pyplot():
    """matplotlib's pyplot on the Agg backend, or `None` when not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def load_tfds_arrays(name, split, data_dir=None, chunk=4096):
    """A whole TFDS split as a dict of NumPy arrays ("image", "label", ...).

    Reads in chunks rather than with `batch_size=-1` (which aborts the
    process under `tfds.testing.mock_data` with TensorFlow 2.21) and
    concatenates them.
    """
    import tensorflow_datasets as tfds

    parts = {}
    dataset = tfds.load(name, split=split, data_dir=data_dir).batch(chunk)
    for batch in tfds.as_numpy(dataset):
        for key, value in batch.items():
            parts.setdefault(key, []).append(value)
    if not parts:
        raise ValueError(
            f"The {name!r} split {split!r} in {data_dir!r} holds no examples."
        )
    return {key: np.concatenate(values) for key, values in parts.items()}


def predict_logits(model, data, batch_size=512):
    """`model`'s outputs on `data` (an array or batches of `(x, y)`) as NumPy.

    Calls the model eagerly. `model.predict` would trace a new `tf.function`
    for every new model (and again for a smaller last batch), and a run that
    builds one model per seed makes TensorFlow warn about retracing.
    """
    import keras

    if isinstance(data, np.ndarray):
        batches = (data[i : i + batch_size] for i in range(0, len(data), batch_size))
    else:
        batches = (x for x, _ in data)
    return np.concatenate(
        [keras.ops.convert_to_numpy(model(x, training=False)) for x in batches]
    )
