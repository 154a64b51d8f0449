"""Argmax vs median vs mean read-outs of one trained age model (paired runs).

Trains the age-estimation example's model with the example's own defaults
(`examples/age_estimation.py`, its `run_once`: generated data with 30
ordinal classes, the CNN of Niu et al., Adam, early stopping on validation
MAE) once per (reduction factor r, seed); the example reads the same test
predictions three ways with `keras_simloss.decode_ordinal`. Each run gives
a pair (MAE of argmax, MAE of median) from one model, so the two read-outs
are compared with a two-sided Wilcoxon signed-rank test over runs, per r
and pooled over all runs (runs where the two read-outs give the same MAE
are dropped from the test, scipy's default). r = 0 is plain cross entropy.

    nice -n 10 python benchmarks/decoding_readouts.py --grid 0 0.3 0.6 --runs 10
"""

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(_ROOT, "examples"))

import age_estimation  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

READOUTS = ("argmax", "median", "mean")


def train_and_read(splits, labels, class_values, channels, r, seed, args):
    """One seeded training run of the example; test MAE / MSE per read-out."""
    record, _ = age_estimation.run_once(
        splits, labels, class_values, channels, r, seed, args
    )
    result = {"r": r, "seed": seed}
    for method in READOUTS:
        suffix = "" if method == "argmax" else f"_{method}"
        result[f"mae_{method}"] = record[f"test_mae{suffix}"]
        result[f"mse_{method}"] = record[f"test_mse{suffix}"]
    return result


def wilcoxon(first, second):
    """Two-sided Wilcoxon signed-rank p-value of paired samples, or NaN."""
    from scipy.stats import wilcoxon as test

    differences = np.asarray(second) - np.asarray(first)
    if len(differences) < 2 or not np.any(differences):
        return float("nan")
    return float(test(differences).pvalue)


def _format_p(p):
    if np.isnan(p):
        return "-"
    return f"{p:.1e}" if p < 0.001 else f"{p:.3f}"


def table(records, grid):
    header = (
        "| r | runs | MAE argmax | MAE median | MAE mean | median - argmax | "
        "median better / equal / worse | p (argmax vs median) | MSE argmax | "
        "MSE mean |"
    )
    lines = [header, "|" + "---|" * 10]
    groups = [(f"{r}", [x for x in records if x["r"] == r]) for r in grid]
    if len(grid) > 1:
        groups.append(("all", records))
    for label, runs in groups:
        if not runs:
            continue

        def column(key, runs=runs):
            return np.array([run[key] for run in runs])

        def cell(key, digits, column=column):
            values = column(key)
            spread = values.std(ddof=1) if len(values) > 1 else 0.0
            return f"{values.mean():.{digits}f} ± {spread:.{digits}f}"

        delta = column("mae_median") - column("mae_argmax")
        p = wilcoxon(column("mae_argmax"), column("mae_median"))
        lines.append(
            f"| {label} | {len(runs)} | {cell('mae_argmax', 3)} | "
            f"{cell('mae_median', 3)} | {cell('mae_mean', 3)} | "
            f"{delta.mean():+.3f} | {np.sum(delta < 0)} / {np.sum(delta == 0)} / "
            f"{np.sum(delta > 0)} | {_format_p(p)} | {cell('mse_argmax', 2)} | "
            f"{cell('mse_mean', 2)} |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--grid", type=float, nargs="+", default=[0.0, 0.3, 0.6])
    parser.add_argument("--runs", type=int, default=10, help="seeds per r")
    parser.add_argument("--first-seed", type=int, default=0)
    args = parser.parse_args(argv)
    # The example's defaults: its data, model size and training schedule.
    _, example_args = age_estimation.parse_args([])
    splits, labels, class_values, channels, description = age_estimation.load_data(
        example_args
    )
    print(
        f"Data: {description}, {len(labels['test'])} test images; backend "
        f"{keras.backend.backend()}, jit_compile={example_args.jit_compile}"
    )
    records = []
    start = time.perf_counter()
    for seed in range(args.first_seed, args.first_seed + args.runs):
        for r in args.grid:
            began = time.perf_counter()
            record = train_and_read(
                splits, labels, class_values, channels, r, seed, example_args
            )
            records.append(record)
            print(
                f"r={r} seed={seed}: MAE argmax {record['mae_argmax']:.3f}, "
                f"median {record['mae_median']:.3f}, mean {record['mae_mean']:.3f} "
                f"({time.perf_counter() - began:.0f} s)",
                flush=True,
            )
    print(f"\n{len(records)} runs in {time.perf_counter() - start:.0f} s\n")
    print(table(records, args.grid))
    return records


if __name__ == "__main__":
    main()
