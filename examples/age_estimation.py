"""Age estimation with SimLoss: the SimLoss paper's UTKFace / AFAD experiment.

Protocol (Kobs et al., 2020, Sec. 4.1): ages as ordered classes, images
resized to 60x60 with standardised colour channels, random 60/20/20 split,
the CNN of Niu et al. (2016), Adam (lr 1e-3), early stopping on validation
MAE, a grid over the reduction factor r of the ordinal similarity
S[i, j] = r ** |i - j| (r = 0 is plain cross entropy), repeated seeded runs,
and a two-sided Wilcoxon signed-rank test of each r against r = 0 (paired
by seed). Besides the paper's argmax read-out it reports the median
read-out of the same predictions (keras_simloss.decode_ordinal), which
minimises the expected absolute error.

Outputs (in --output-dir): runs.csv, results.json, table.md (the paper's
Table 1 layout) and predicted_distribution.png (its Figure 2).

By default it runs on a generated ordinal image task (a disk whose radius
grows with the class, noisy labels; no download), with 32x32 images instead
of 60x60 (the network's last convolution shrinks to match) and 6 runs per r
instead of 10, in about three minutes on 2 CPU cores. Real data, the paper's
settings:

    python examples/age_estimation.py --dataset utkface --data-dir UTKFace/ \\
        --grid 0 0.1 0.2 0.3 0.4 0.5 0.6 0.7 0.8 0.9 --runs 10 --epochs 200 \\
        --patience 10 --batch-size 1024 --image-size 60 --jit-compile
    python examples/age_estimation.py --dataset afad --data-dir AFAD-Full/ ...

UTKFace is one folder of AGE_GENDER_RACE_DATETIME.jpg files; AFAD is
AGE/GENDER/IMAGE.jpg.
"""

import os
import sys
import textwrap

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import experiment_utils  # noqa: E402

experiment_utils.quiet_tensorflow()

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_simloss  # noqa: E402
from keras_simloss import decode_ordinal, similarity  # noqa: E402
from keras_simloss.datasets import faces, synthetic  # noqa: E402


def niu_cnn(num_classes, image_size=60, channels=3):
    """The CNN of Niu et al. (2016) used by the SimLoss paper; outputs logits.

    At the paper's 60x60 the last 11x11 convolution covers the whole 11x11
    map left by the layers before it; at other sizes its kernel is that
    map's size too (4x4 at 32x32).
    """
    last = ((image_size - 4) // 2 - 6) // 2
    if last < 1:
        raise ValueError(
            "Invalid value for argument `image_size`. Expected at least 20. "
            f"Received: image_size={image_size}"
        )
    return keras.Sequential(
        [
            keras.Input((image_size, image_size, channels)),
            keras.layers.Conv2D(20, 5, activation="relu"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Conv2D(40, 7, activation="relu"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Conv2D(80, last, activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(120, activation="relu"),
            keras.layers.Dense(num_classes),
        ],
        name="niu_cnn",
    )


def run_once(splits, labels, class_values, channels, reduction_factor, seed, args):
    """Trains one model with SimLoss(r) and returns its test (and val) record."""
    num_classes = len(class_values)
    keras.utils.clear_session()  # one model per run: drop the last one's state
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
        ],
        jit_compile=args.jit_compile,
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
        logits = experiment_utils.predict_logits(model, splits[split])
        record.update(scores(logits, labels[split], class_values, split))
        if split == "test":
            distribution = keras.ops.convert_to_numpy(keras.ops.softmax(logits))
    return record, distribution.mean(axis=0)


def scores(logits, labels, class_values, split):
    """Accuracy, and MAE / MSE of the argmax, median and mean read-outs.

    The median read-out (the first class whose cumulative probability
    reaches 0.5) minimises the expected absolute error, the mean read-out
    the expected squared error; argmax is the paper's.
    """
    true_values = class_values[labels]
    result = {f"{split}_accuracy": float(np.mean(logits.argmax(-1) == labels))}
    for method in ("argmax", "median", "mean"):
        predicted = keras.ops.convert_to_numpy(
            decode_ordinal(logits, method, class_values, from_logits=True)
        )
        suffix = "" if method == "argmax" else f"_{method}"
        error = predicted.astype(np.float64) - true_values
        result[f"{split}_mae{suffix}"] = float(np.mean(np.abs(error)))
        result[f"{split}_mse{suffix}"] = float(np.mean(np.square(error)))
    return result


# Everything below is the experiment harness: data, grid, table, plot.


def _in_memory(x, y, batch_size, shuffle_seed=None):
    import tensorflow as tf

    dataset = tf.data.Dataset.from_tensor_slices((x, y))
    if shuffle_seed is not None:
        dataset = dataset.shuffle(len(y), seed=shuffle_seed)
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def load_data(args):
    """Datasets per split, val/test labels, class values, channels, description."""
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
        description = (
            f"generated ordinal images ({len(labels)} images, "
            f"{args.image_size}x{args.image_size}, {args.num_classes} classes)"
        )
        return (
            splits,
            {"val": labels[val], "test": labels[test]},
            class_values,
            1,
            description,
        )

    files = (faces.utkface_files if args.dataset == "utkface" else faces.afad_files)(
        args.data_dir
    )
    if files.skipped:
        print(
            f"Skipped {len(files.skipped)} file(s) without a usable age, "
            f"e.g. {files.skipped[0]!r}"
        )
    labels = files.labels()
    num_classes = int(files.ages.max()) - files.min_age + 1
    if num_classes < 2:
        raise ValueError(
            f"Found a single age ({files.min_age}) in {args.data_dir!r}; "
            "need at least two."
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
    description = (
        f"{args.dataset} ({len(labels)} images, {args.image_size}x"
        f"{args.image_size}, {num_classes} classes: ages {files.min_age}-"
        f"{int(files.ages.max())})"
    )
    return (
        splits,
        {"val": labels[val], "test": labels[test]},
        class_values,
        3,
        description,
    )


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
    add = parser.add_argument
    add(
        "--dataset",
        choices=["synthetic", "utkface", "afad"],
        default="synthetic",
        help="data set",
    )
    add("--data-dir", help="folder of the real data set (utkface, afad)")
    add(
        "--grid",
        type=float,
        nargs="+",
        default=[0.0, 0.3, 0.6],
        help="reduction factors r (the first is the baseline of the tests)",
    )
    add(
        "--runs",
        type=int,
        default=6,
        help="seeded runs per r (>= 6 for a two-sided p < 0.05; the paper: 10)",
    )
    add("--epochs", type=int, default=15, help="maximum epochs per run")
    add("--patience", type=int, default=4, help="early stopping patience (val MAE)")
    add("--batch-size", type=int, default=128, help="batch size (the paper: 1024)")
    add("--learning-rate", type=float, default=1e-3, help="Adam learning rate")
    add(
        "--image-size",
        type=int,
        default=32,
        help="image side in pixels (the paper: 60)",
    )
    add("--split-seed", type=int, default=0, help="seed of the 60/20/20 split")
    add("--num-classes", type=int, default=30, help="classes (synthetic data only)")
    add("--synthetic-size", type=int, default=3000, help="images (synthetic data only)")
    add(
        "--jit-compile",
        action="store_true",
        help="XLA (pays off on real data; on the defaults compiling costs more)",
    )
    add(
        "--output-dir",
        default=os.path.join("outputs", "age_estimation"),
        help="where to write the results",
    )
    add("--verbose", action="store_true", help="Keras's line per epoch")
    args = parser.parse_args(argv)  # fmt: skip
    if args.dataset != "synthetic" and not args.data_dir:
        parser.error(f"--dataset {args.dataset} needs --data-dir")
    for r in args.grid:
        if not 0.0 <= r < 1.0:
            parser.error(f"every --grid value must be in [0, 1); received {r}")
    if args.runs < 1 or args.epochs < 1:
        parser.error("--runs and --epochs must be at least 1")
    if args.image_size < 20:
        parser.error(f"--image-size must be at least 20; received {args.image_size}")
    return parser, args


# The printed table: (metric, header, scale, digits); the same labels as the
# README's table.
COLUMNS = [
    ("test_accuracy", "Acc %", 100, 2),
    ("test_mae", "MAE", 1, 3),
    ("test_mse", "MSE", 1, 2),
    ("test_mae_median", "MAE, median", 1, 3),
]


def main(argv=None):
    parser, args = parse_args(argv)
    try:
        splits, labels, class_values, channels, description = load_data(args)
    except (ValueError, OSError) as error:
        parser.error(str(error))
    print(
        f"Data: {description}; grid r = {args.grid}, "
        f"{args.runs} seeded run(s) each, at most {args.epochs} epochs.",
        flush=True,
    )

    progress = experiment_utils.Progress(len(args.grid) * args.runs)
    records, distributions = [], {}
    for seed in range(args.runs):  # seed-major: a stopped run still has pairs
        for reduction_factor in args.grid:
            record, distribution = run_once(
                splits, labels, class_values, channels, reduction_factor, seed, args
            )
            records.append(record)
            distributions.setdefault(reduction_factor, []).append(distribution)
            progress.step(
                f"r={reduction_factor}, seed {seed}: {record['epochs']} epochs, "
                f"test Acc {record['test_accuracy']:.2%}, MAE {record['test_mae']:.3f}"
                f" (median read-out {record['test_mae_median']:.3f})"
            )
    distributions = {r: np.mean(d, axis=0) for r, d in distributions.items()}

    metrics = [
        f"{split}_{m}{suffix}"
        for split in ("val", "test")
        for m in ("accuracy", "mae", "mse")
        for suffix in (("",) if m == "accuracy" else ("", "_median", "_mean"))
    ]
    rows = experiment_utils.summarize(records, "reduction_factor", metrics)
    baseline = args.grid[0]
    p_mae = experiment_utils.wilcoxon_p_values(
        records, "reduction_factor", baseline, "test_mae"
    )
    p_median = experiment_utils.paired_p_values(
        records, "reduction_factor", "test_mae_median", "test_mae"
    )
    extra = []
    if p_mae is not None:
        extra = [("p (MAE)", p_mae), ("p (median)", p_median)]
    table = experiment_utils.format_table(
        rows,
        "reduction_factor",
        COLUMNS,
        extra,
        group_label="r",
    )
    notes = (
        f"Test set, mean ± std over {args.runs} seeded runs; r = 0 is plain cross "
        "entropy. MAE and MSE of the argmax read-out (the paper's); MAE, median: "
        "the median read-out of the same predictions. Two-sided Wilcoxon "
        f"signed-rank tests: p (MAE): MAE vs r = {baseline}, paired by seed; "
        "p (median): median vs argmax MAE, paired by run."
    )
    print(f"\n{description}\n{table}\n{textwrap.fill(notes, 100)}")
    if p_mae is None:
        print("scipy is not installed: skipped the Wilcoxon test (pip install scipy).")
    elif args.runs < 6:
        print(
            f"Note: with {args.runs} paired runs a two-sided Wilcoxon test cannot "
            "reach p < 0.05 (the paper used 10 runs)."
        )
    os.makedirs(args.output_dir, exist_ok=True)
    plot = plot_distributions(
        os.path.join(args.output_dir, "predicted_distribution.png"),
        distributions,
        class_values,
        labels["test"],
    )
    experiment_utils.save_results(
        args.output_dir,
        records,
        f"{table}\n\n{notes}",
        extra={
            "dataset": description,
            "summary": rows,
            "wilcoxon_test_mae": p_mae,
            "wilcoxon_median_vs_argmax_mae": p_median,
            "mean_predicted_distribution": {
                str(r): d.tolist() for r, d in distributions.items()
            },
        },
    )
    print(f"Results in {args.output_dir}" + (f" (plot: {plot})" if plot else ""))
    return {"records": records, "summary": rows, "p_values": p_mae, "table": table}


if __name__ == "__main__":
    main()
