"""Helpers shared by the examples: result tables, significance tests, files.

Optional dependencies (scipy for the Wilcoxon test, matplotlib for plots)
are imported lazily; without them the examples still train and print their
tables, and say what they skipped.
"""

import argparse
import csv
import json
import os

import numpy as np


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


def format_table(rows, group_key, columns, p_values=None, p_label="p"):
    """A Markdown table of `mean ± std` columns.

    Args:
        rows: output of `summarize`.
        group_key: the first column.
        columns: list of `(metric, header, scale, digits)`.
        p_values: optional `{group: p}` added as a last column.
    """
    headers = [group_key, "runs"] + [header for _, header, _, _ in columns]
    if p_values is not None:
        headers.append(p_label)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        cells = [str(row[group_key]), str(row["runs"])]
        for metric, _, scale, digits in columns:
            mean = row[f"{metric}_mean"] * scale
            std = row[f"{metric}_std"] * scale
            cells.append(f"{mean:.{digits}f} ± {std:.{digits}f}")
        if p_values is not None:
            p = p_values.get(row[group_key], float("nan"))
            cells.append("-" if np.isnan(p) else f"{p:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


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


def argument_parser(doc):
    """An `argparse` parser whose help is an example's module docstring."""
    return argparse.ArgumentParser(
        description=doc.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
