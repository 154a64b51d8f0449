"""Argmax vs median vs mean read-outs of one trained age model (paired runs).

Trains the age-estimation example's model on its default generated data
(`examples/age_estimation.py`: 30 ordinal classes, 3,000 60x60 images, the
CNN of Niu et al., Adam, at most 12 epochs, early stopping on validation MAE)
once per (reduction factor r, seed), then reads the same test predictions
three ways with `keras_simloss.decode_ordinal`. Each run gives a pair
(MAE of argmax, MAE of median) from one model, so the two read-outs are
compared with a two-sided Wilcoxon signed-rank test over runs, per r and
pooled over all runs. r = 0 is plain cross entropy.

    nice -n 10 python benchmarks/decoding_readouts.py --grid 0 0.3 0.6 --runs 4
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

import keras_simloss  # noqa: E402
from keras_simloss import similarity  # noqa: E402

READOUTS = ("argmax", "median", "mean")


def train_and_read(splits, test_labels, class_values, channels, r, seed, args):
    """One seeded training run; test MAE / MSE of each read-out."""
    num_classes = len(class_values)
    keras.utils.set_random_seed(seed)
    model = age_estimation.niu_cnn(num_classes, args.image_size, channels)
    model.compile(
        optimizer=keras.optimizers.Adam(args.learning_rate),
        loss=keras_simloss.SimLoss(
            similarity.ordinal(num_classes, r), from_logits=True
        ),
        metrics=[keras_simloss.ClassMeanAbsoluteError(class_values, name="mae")],
        jit_compile=True,
    )
    model.fit(
        splits["train"],
        validation_data=splits["val"],
        epochs=args.epochs,
        callbacks=[
            keras.callbacks.EarlyStopping(
                monitor="val_mae",
                mode="min",
                patience=args.patience,
                restore_best_weights=True,
            )
        ],
        shuffle=False,
        verbose=0,
    )
    logits = model.predict(splits["test"], verbose=0)
    truth = class_values[test_labels].astype(np.float64)
    record = {"r": r, "seed": seed}
    for method in READOUTS:
        value = keras.ops.convert_to_numpy(
            keras_simloss.decode_ordinal(
                logits, method, class_values=class_values, from_logits=True
            )
        ).astype(np.float64)
        record[f"mae_{method}"] = float(np.mean(np.abs(value - truth)))
        record[f"mse_{method}"] = float(np.mean((value - truth) ** 2))
    return record


def wilcoxon(first, second):
    """Two-sided Wilcoxon signed-rank p-value of paired samples, or NaN."""
    from scipy.stats import wilcoxon as test

    differences = np.asarray(second) - np.asarray(first)
    if len(differences) < 2 or not np.any(differences):
        return float("nan")
    return float(test(differences).pvalue)


def table(records, grid):
    header = (
        "| r | runs | MAE argmax | MAE median | MAE mean | median - argmax "
        "(median better in) | p (argmax vs median) | MSE argmax | MSE mean |"
    )
    lines = [header, "|" + "---|" * 9]
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
            f"{delta.mean():+.3f} ({int(np.sum(delta < 0))}/{len(runs)}) | "
            f"{'-' if np.isnan(p) else f'{p:.3f}'} | {cell('mse_argmax', 2)} | "
            f"{cell('mse_mean', 2)} |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", type=float, nargs="+", default=[0.0, 0.3, 0.6])
    parser.add_argument("--runs", type=int, default=4, help="seeds per r")
    parser.add_argument("--first-seed", type=int, default=0)
    args = parser.parse_args(argv)
    # The example's defaults: its data, model size and training schedule.
    _, example_args = age_estimation.parse_args([])
    splits, test_labels, class_values, channels, description = age_estimation.load_data(
        example_args
    )
    print(
        f"Data: {description}, {len(class_values)} classes, "
        f"{len(test_labels)} test images; backend {keras.backend.backend()}"
    )
    records = []
    start = time.perf_counter()
    for seed in range(args.first_seed, args.first_seed + args.runs):
        for r in args.grid:
            began = time.perf_counter()
            record = train_and_read(
                splits, test_labels, class_values, channels, r, seed, example_args
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
