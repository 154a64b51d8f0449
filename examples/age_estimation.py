"""Age estimation with SimLoss: the SimLoss paper's UTKFace / AFAD experiment.

Protocol (Kobs et al., 2020, Sec. 4.1): ages as ordered classes, images
resized to 60x60 with standardised colour channels, random 60/20/20 split,
the CNN of Niu et al. (2016), Adam (lr 1e-3), early stopping on validation
MAE, a grid over the reduction factor r of the ordinal similarity
S[i, j] = r ** |i - j| (r = 0 is plain cross entropy), repeated seeded runs,
and a Wilcoxon signed-rank test of each r against r = 0.

Outputs (in --output-dir): runs.csv, results.json, table.md (the paper's
Table 1 layout) and predicted_distribution.png (its Figure 2).

By default it runs on a generated ordinal image task (a disk whose radius
grows with the class, noisy labels; no download) small enough for about five
minutes on 2 CPU cores. Real data:

    python examples/age_estimation.py --dataset utkface --data-dir UTKFace/ \\
        --grid 0 0.1 0.2 0.3 0.4 0.5 0.6 0.7 0.8 0.9 --runs 10 --epochs 200 \\
        --patience 10 --batch-size 1024
    python examples/age_estimation.py --dataset afad --data-dir AFAD-Full/ ...
"""

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras  # noqa: E402
import numpy as np  # noqa: E402

import experiment_utils  # noqa: E402
import keras_simloss  # noqa: E402
from keras_simloss import similarity  # noqa: E402
from keras_simloss.datasets import faces, synthetic  # noqa: E402


def niu_cnn(num_classes, image_size=60, channels=3):
    """The CNN of Niu et al. (2016) used by the SimLoss paper; outputs logits."""
    return keras.Sequential(
        [
            keras.Input((image_size, image_size, channels)),
            keras.layers.Conv2D(20, 5, activation="relu"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Conv2D(40, 7, activation="relu"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Conv2D(80, 11, activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(120, activation="relu"),
            keras.layers.Dense(num_classes),
        ],
        name="niu_cnn",
    )


def _in_memory(x, y, batch_size, shuffle_seed=None):
    import tensorflow as tf

    dataset = tf.data.Dataset.from_tensor_slices((x, y))
    if shuffle_seed is not None:
        dataset = dataset.shuffle(len(y), seed=shuffle_seed)
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def load_data(args):
    """Train/validation/test datasets, the number of classes and class values."""
    if args.dataset == "synthetic":
        x, labels = synthetic.ordinal_images(
            args.synthetic_size, args.num_classes, args.image_size, seed=12345
        )
        # Standardise with training-split statistics, as for real images.
        train, val, test = faces.split_indices(len(labels), seed=args.split_seed)
        mean, std = x[train].mean(), x[train].std()
        x = (x - mean) / std
        splits = {
            "train": _in_memory(
                x[train], labels[train], args.batch_size, shuffle_seed=0
            ),
            "val": _in_memory(x[val], labels[val], args.batch_size),
            "test": _in_memory(x[test], labels[test], args.batch_size),
        }
        class_values = np.arange(args.num_classes, dtype=np.float32)
        return splits, labels[test], class_values, 1, "generated ordinal images"

    files = (faces.utkface_files if args.dataset == "utkface" else faces.afad_files)(
        args.data_dir
    )
    if files.skipped:
        print(
            f"Skipped {len(files.skipped)} file(s) without a usable age, e.g. {files.skipped[0]!r}"
        )
    labels = files.labels()
    num_classes = int(files.ages.max()) - files.min_age + 1
    if num_classes < 2:
        raise ValueError(
            f"Found a single age ({files.min_age}) in {args.data_dir!r}; need at least two."
        )
    train, val, test = faces.split_indices(len(labels), seed=args.split_seed)
    paths = np.asarray(files.paths)
    mean, std = faces.channel_statistics(list(paths[train]), args.image_size)
    splits = {
        name: faces.image_dataset(
            list(paths[index]),
            labels[index],
            args.image_size,
            args.batch_size,
            mean,
            std,
            shuffle_seed=0 if name == "train" else None,
        )
        for name, index in (("train", train), ("val", val), ("test", test))
    }
    class_values = np.arange(
        files.min_age, files.min_age + num_classes, dtype=np.float32
    )
    description = f"{args.dataset} ({len(labels)} images, ages {files.min_age}-{int(files.ages.max())})"
    return splits, labels[test], class_values, 3, description


def run_once(splits, class_values, channels, reduction_factor, seed, args):
    num_classes = len(class_values)
    keras.utils.set_random_seed(seed)
    model = niu_cnn(num_classes, args.image_size, channels)
    model.compile(
        optimizer=keras.optimizers.Adam(args.learning_rate),
        loss=keras_simloss.SimLoss(
            similarity.ordinal(num_classes, reduction_factor), from_logits=True
        ),
        metrics=[
            keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
            keras_simloss.ClassMeanAbsoluteError(class_values, name="mae"),
            keras_simloss.ClassMeanSquaredError(class_values, name="mse"),
        ],
        jit_compile=True,
    )
    stopper = keras.callbacks.EarlyStopping(
        monitor="val_mae", mode="min", patience=args.patience, restore_best_weights=True
    )
    history = model.fit(
        splits["train"],
        validation_data=splits["val"],
        epochs=args.epochs,
        callbacks=[stopper],
        shuffle=False,  # the tf.data pipeline shuffles the training split itself
        verbose=2 if args.verbose else 0,
    )
    record = {
        "reduction_factor": reduction_factor,
        "seed": seed,
        "epochs": len(history.history["loss"]),
    }
    for split in ("val", "test"):
        result = model.evaluate(splits[split], verbose=0, return_dict=True)
        for metric in ("accuracy", "mae", "mse"):
            record[f"{split}_{metric}"] = float(result[metric])
    logits = model.predict(splits["test"], verbose=0)
    probabilities = keras.ops.convert_to_numpy(keras.ops.softmax(logits, axis=-1))
    return record, probabilities.mean(axis=0)


def plot_distributions(path, distributions, class_values, test_labels):
    plt = experiment_utils.pyplot()
    if plt is None:
        print("matplotlib is not installed: skipped the plot (pip install matplotlib).")
        return None
    figure, axis = plt.subplots(figsize=(8, 4.5))
    counts = np.bincount(test_labels, minlength=len(class_values)) / len(test_labels)
    axis.bar(class_values, counts, color="0.85", label="true labels (test)")
    for reduction_factor, distribution in distributions.items():
        axis.plot(class_values, distribution, label=f"r = {reduction_factor}")
    axis.set_xlabel("class value (age)")
    axis.set_ylabel("mean predicted probability")
    axis.set_title("Mean predicted distribution over classes (test set)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def parse_args(argv=None):
    parser = experiment_utils.argument_parser(__doc__)
    parser.add_argument(
        "--dataset", choices=["synthetic", "utkface", "afad"], default="synthetic"
    )
    parser.add_argument("--data-dir", help="folder of the real data set")
    parser.add_argument("--grid", type=float, nargs="+", default=[0.0, 0.3, 0.6])
    parser.add_argument("--runs", type=int, default=2, help="seeded runs per r")
    parser.add_argument("--epochs", type=int, default=12, help="maximum epochs per run")
    parser.add_argument(
        "--patience", type=int, default=4, help="early stopping on val MAE"
    )
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--image-size", type=int, default=60)
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument(
        "--num-classes", type=int, default=30, help="synthetic data only"
    )
    parser.add_argument(
        "--synthetic-size", type=int, default=3000, help="synthetic images"
    )
    parser.add_argument(
        "--output-dir", default=os.path.join("outputs", "age_estimation")
    )
    parser.add_argument(
        "--verbose", action="store_true", help="Keras progress per epoch"
    )
    args = parser.parse_args(argv)
    if args.dataset != "synthetic" and not args.data_dir:
        parser.error(f"--dataset {args.dataset} needs --data-dir")
    for r in args.grid:
        if not 0.0 <= r < 1.0:
            parser.error(f"every --grid value must be in [0, 1); received {r}")
    if args.runs < 1 or args.epochs < 1:
        parser.error("--runs and --epochs must be at least 1")
    return parser, args


def main(argv=None):
    parser, args = parse_args(argv)
    try:
        splits, test_labels, class_values, channels, description = load_data(args)
    except (ValueError, OSError) as error:
        parser.error(str(error))
    print(
        f"Data: {description}; {len(class_values)} classes; grid r = {args.grid}; {args.runs} run(s) each"
    )

    records, distributions = [], {}
    for reduction_factor in args.grid:
        runs = []
        for seed in range(args.runs):
            start = time.perf_counter()
            record, distribution = run_once(
                splits, class_values, channels, reduction_factor, seed, args
            )
            records.append(record)
            runs.append(distribution)
            print(
                f"r={reduction_factor} run {seed + 1}/{args.runs}: {record['epochs']} epochs, "
                f"test acc {record['test_accuracy']:.2%}, MAE {record['test_mae']:.3f}, "
                f"MSE {record['test_mse']:.2f} ({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
        distributions[reduction_factor] = np.mean(runs, axis=0)

    metrics = [
        f"{split}_{m}" for split in ("val", "test") for m in ("accuracy", "mae", "mse")
    ]
    rows = experiment_utils.summarize(records, "reduction_factor", metrics)
    columns = [
        ("val_accuracy", "val Acc %", 100, 2),
        ("val_mae", "val MAE", 1, 3),
        ("val_mse", "val MSE", 1, 2),
        ("test_accuracy", "test Acc %", 100, 2),
        ("test_mae", "test MAE", 1, 3),
        ("test_mse", "test MSE", 1, 2),
    ]
    baseline = args.grid[0]
    p_values = experiment_utils.wilcoxon_p_values(
        records, "reduction_factor", baseline, "test_mae"
    )
    table = experiment_utils.format_table(
        rows,
        "reduction_factor",
        columns,
        p_values,
        p_label=f"p (test MAE vs r={baseline})",
    )
    print(f"\n{description}\n{table}")
    if p_values is None:
        print("scipy is not installed: skipped the Wilcoxon test (pip install scipy).")
    elif args.runs < 6:
        print(
            f"Note: with {args.runs} paired runs a two-sided Wilcoxon test cannot reach "
            "p < 0.05 (the paper used 10 runs)."
        )
    os.makedirs(args.output_dir, exist_ok=True)
    plot = plot_distributions(
        os.path.join(args.output_dir, "predicted_distribution.png"),
        distributions,
        class_values,
        test_labels,
    )
    experiment_utils.save_results(
        args.output_dir,
        records,
        table,
        extra={
            "dataset": description,
            "summary": rows,
            "wilcoxon_test_mae": p_values,
            "mean_predicted_distribution": {
                str(r): d.tolist() for r, d in distributions.items()
            },
        },
    )
    print(f"Results in {args.output_dir}" + (f" (plot: {plot})" if plot else ""))
    return {"records": records, "summary": rows, "p_values": p_values, "table": table}


if __name__ == "__main__":
    main()
