"""CIFAR-100 with SimLoss: the SimLoss paper's image-classification experiment.

Protocol (Kobs et al., 2020, Sec. 4.2): the 96 CIFAR-100 classes that have a
word2vec vector (fine labels re-indexed in order), 450 training / 50
validation images per class from the training set and the 100 test images
per class, global standardisation, LeNet, Adam (lr 1e-3), early stopping on
validation accuracy, and a grid over the lower bound l of Eq. 3 (l = 0.99 is
close to plain cross entropy). The class similarity comes from a word-vector
file of the class names (--vectors-file, word2vec text/binary or GloVe) or,
with no file, from the CIFAR-100 superclass hierarchy. Reports Accuracy,
Superclass Accuracy (SA) and Failed Superclass Accuracy (FSA).

Outputs (in --output-dir): runs.csv, results.json, table.md, metrics.png.

By default it runs on a generated image task with a class hierarchy (no
download; 6 runs per l, about three minutes on 2 CPU cores). Real data
through TensorFlow Datasets, the paper's settings (the Google News word2vec
file: GoogleNews-vectors-negative300.bin.gz from
https://code.google.com/archive/p/word2vec/, unpacked):

    python examples/cifar100.py --dataset cifar100 \\
        --vectors-file GoogleNews-vectors-negative300.bin \\
        --grid 0.99 0 0.1 0.2 0.3 0.4 0.5 0.6 0.7 0.8 0.9 --runs 10 \\
        --epochs 500 --patience 20 --batch-size 1024 --jit-compile
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
from keras_simloss import similarity  # noqa: E402
from keras_simloss.datasets import cifar100, load_word_vectors, synthetic  # noqa: E402


def lenet(num_classes, input_shape):
    """LeNet as in the paper: conv 5x5x6, pool, conv 5x5x16, pool, fc 120, 84, C."""
    return keras.Sequential(
        [
            keras.Input(input_shape),
            keras.layers.Conv2D(6, 5, activation="relu"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Conv2D(16, 5, activation="relu"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Flatten(),
            keras.layers.Dense(120, activation="relu"),
            keras.layers.Dense(84, activation="relu"),
            keras.layers.Dense(num_classes),
        ],
        name="lenet",
    )


def per_class_split(labels, first, second, seed=0):
    """Indices of up to `first` then `second` examples of every class."""
    rng = np.random.default_rng(seed)
    head, tail = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        head.append(members[:first])
        tail.append(members[first : first + second])
    return np.sort(np.concatenate(head)), np.sort(np.concatenate(tail))


def load_cifar100(args):
    """The paper's 96-class CIFAR-100 as NumPy arrays, via TensorFlow Datasets."""
    arrays = {}
    for split in ("train", "test"):
        data = experiment_utils.load_tfds_arrays("cifar100", split, args.data_dir)
        keep = cifar100.to_paper_labels(data["label"])
        mask = keep >= 0
        arrays[split] = (data["image"][mask].astype(np.float32), keep[mask])
    x, y = arrays["train"]
    train, val = per_class_split(
        y, args.train_per_class, args.val_per_class, seed=args.split_seed
    )
    return (
        {
            "train": (x[train], y[train]),
            "val": (x[val], y[val]),
            "test": arrays["test"],
        },
        cifar100.PAPER_LABEL_NAMES,
        np.asarray(cifar100.PAPER_FINE_TO_COARSE),
    )


def load_synthetic(args):
    x, y, superclass_of = synthetic.hierarchical_images(
        args.synthetic_size,
        num_superclasses=5,
        classes_per_superclass=4,
        noise=args.synthetic_noise,
        seed=12345,
    )
    train, rest = per_class_split(
        y, int(0.6 * args.synthetic_size / 20), args.synthetic_size
    )
    half = len(rest) // 2
    names = tuple(f"class_{i}" for i in range(len(superclass_of)))
    return (
        {
            "train": (x[train], y[train]),
            "val": (x[rest[:half]], y[rest[:half]]),
            "test": (x[rest[half:]], y[rest[half:]]),
        },
        names,
        superclass_of,
    )


def base_similarity(args, names, superclass_of):
    """Similarities in [0, 1] before the lower bound: word vectors or hierarchy."""
    if args.vectors_file:
        found = load_word_vectors(
            args.vectors_file, names, combine_words=args.combine_words
        )
        if found.missing:
            raise ValueError(
                f"{len(found.missing)} of {len(names)} class names have no vector in "
                f"{args.vectors_file!r}: {', '.join(found.missing[:10])}"
                f"{' ...' if len(found.missing) > 10 else ''}. The SimLoss paper "
                "dropped such classes; use a file that covers these names, or "
                "--combine-words to average the words of multi-word names."
            )
        return "word vectors", lambda bound: similarity.from_embeddings(
            found.vectors, bound
        )
    matrix = np.asarray(
        similarity.from_hierarchy(superclass_of, args.superclass_similarity)
    )
    return (
        f"superclass hierarchy (similarity {args.superclass_similarity})",
        lambda bound: similarity.lower_bound(matrix, bound),
    )


def run_once(data, superclass_of, make_similarity, bound, seed, args):
    (x_train, y_train), validation, test = data["train"], data["val"], data["test"]
    num_classes = len(superclass_of)
    keras.utils.clear_session()  # one model per run: drop the last one's state
    keras.utils.set_random_seed(seed)
    model = lenet(num_classes, x_train.shape[1:])
    model.compile(
        optimizer=keras.optimizers.Adam(args.learning_rate),
        loss=keras_simloss.SimLoss(make_similarity(bound), from_logits=True),
        metrics=[
            keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
            keras_simloss.SuperclassAccuracy(superclass_of, name="sa"),
            keras_simloss.FailedSuperclassAccuracy(superclass_of, name="fsa"),
        ],
        jit_compile=args.jit_compile,
    )
    stopper = keras.callbacks.EarlyStopping(
        monitor="val_accuracy",
        mode="max",
        patience=args.patience,
        restore_best_weights=True,
    )
    history = model.fit(
        x_train,
        y_train,
        batch_size=args.batch_size,
        epochs=args.epochs,
        validation_data=validation,
        callbacks=[stopper],
        verbose=2 if args.verbose else 0,
    )
    record = {
        "lower_bound": bound,
        "seed": seed,
        "epochs": len(history.history["loss"]),
    }
    for split, (x, y) in (("val", validation), ("test", test)):
        predicted = experiment_utils.predict_logits(model, x).argmax(axis=-1)
        record.update(scores(predicted, y, superclass_of, split))
    return record


def scores(predicted, labels, superclass_of, split):
    """Accuracy, superclass accuracy (SA) and SA over the mistakes (FSA, 0/0 = 0)."""
    correct = int(np.sum(predicted == labels))
    same_superclass = int(np.sum(superclass_of[predicted] == superclass_of[labels]))
    mistakes = len(labels) - correct
    return {
        f"{split}_accuracy": correct / len(labels),
        f"{split}_sa": same_superclass / len(labels),
        f"{split}_fsa": (same_superclass - correct) / mistakes if mistakes else 0.0,
    }


# Everything below is the experiment harness: grid, table, plot.


def plot_metrics(path, rows):
    plt = experiment_utils.pyplot()
    if plt is None:
        print("matplotlib is not installed: skipped the plot (pip install matplotlib).")
        return None
    bounds = [row["lower_bound"] for row in rows]
    figure, axis = plt.subplots(figsize=(7, 4))
    for metric, label in (
        ("test_accuracy", "Accuracy"),
        ("test_sa", "SA"),
        ("test_fsa", "FSA"),
    ):
        means = np.array([row[f"{metric}_mean"] for row in rows]) * 100
        stds = np.array([row[f"{metric}_std"] for row in rows]) * 100
        axis.errorbar(bounds, means, yerr=stds, marker="o", capsize=3, label=label)
    axis.set_xlabel("lower bound l")
    axis.set_ylabel("test %")
    axis.set_title(
        "SimLoss on CIFAR-100-style data: accuracy, SA and FSA per lower bound"
    )
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
        choices=["synthetic", "cifar100"],
        default="synthetic",
        help="data set (cifar100 needs tensorflow-datasets)",
    )
    add(
        "--data-dir", help="TensorFlow Datasets folder (cifar100; None: TFDS's default)"
    )
    add(
        "--vectors-file",
        help="word2vec/GloVe file of the class names (None: hierarchy)",
    )
    add(
        "--combine-words",
        action="store_true",
        help="average the words of multi-word class names",
    )
    add(
        "--superclass-similarity",
        type=float,
        default=0.3,
        help="similarity of classes in one superclass (no --vectors-file)",
    )
    add(
        "--grid",
        type=float,
        nargs="+",
        default=[0.99, 0.2, 0.0],
        help="lower bounds l (the first is the baseline of the tests)",
    )
    add(
        "--runs",
        type=int,
        default=6,
        help="seeded runs per l (>= 6 for a two-sided p < 0.05; the paper: 10)",
    )
    add("--epochs", type=int, default=15, help="maximum epochs per run")
    add(
        "--patience", type=int, default=5, help="early stopping patience (val accuracy)"
    )
    add("--batch-size", type=int, default=128, help="batch size (the paper: 1024)")
    add("--learning-rate", type=float, default=1e-3, help="Adam learning rate")
    add("--train-per-class", type=int, default=450, help="training images per class")
    add("--val-per-class", type=int, default=50, help="validation images per class")
    add("--split-seed", type=int, default=0, help="seed of the train/val split")
    add("--synthetic-size", type=int, default=4000, help="images (synthetic data only)")
    add(
        "--synthetic-noise",
        type=float,
        default=2.5,
        help="pixel noise (synthetic data only)",
    )
    add(
        "--jit-compile",
        action="store_true",
        help="XLA (pays off on real data; on the defaults compiling costs more)",
    )
    add(
        "--output-dir",
        default=os.path.join("outputs", "cifar100"),
        help="where to write the results",
    )
    add("--verbose", action="store_true", help="Keras's line per epoch")
    args = parser.parse_args(argv)  # fmt: skip
    for bound in args.grid:
        if not 0.0 <= bound < 1.0:
            parser.error(f"every --grid value must be in [0, 1); received {bound}")
    if args.vectors_file and not os.path.isfile(args.vectors_file):
        parser.error(f"--vectors-file {args.vectors_file!r} does not exist")
    if args.runs < 1 or args.epochs < 1:
        parser.error("--runs and --epochs must be at least 1")
    return parser, args


# The printed table: (metric, header, scale, digits); the same labels as the
# README's table.
COLUMNS = [
    ("test_accuracy", "Acc %", 100, 2),
    ("test_sa", "SA %", 100, 2),
    ("test_fsa", "FSA %", 100, 2),
]


def main(argv=None):
    parser, args = parse_args(argv)
    try:
        data, names, superclass_of = (
            load_synthetic(args) if args.dataset == "synthetic" else load_cifar100(args)
        )
        source, make_similarity = base_similarity(args, names, superclass_of)
    except (ValueError, OSError) as error:
        parser.error(str(error))
    # Global standardisation with training statistics.
    mean, std = data["train"][0].mean(), data["train"][0].std()
    data = {split: ((x - mean) / std, y) for split, (x, y) in data.items()}
    print(
        f"Data: {args.dataset}, {len(names)} classes, "
        f"{len(data['train'][1])}/{len(data['val'][1])}/{len(data['test'][1])} "
        f"train/val/test; similarity from {source}; grid l = {args.grid}"
    )

    progress = experiment_utils.Progress(len(args.grid) * args.runs)
    records = []
    for seed in range(args.runs):  # seed-major: a stopped run still has pairs
        for bound in args.grid:
            record = run_once(data, superclass_of, make_similarity, bound, seed, args)
            records.append(record)
            progress.step(
                f"l={bound}, seed {seed}: {record['epochs']} epochs, test Acc "
                f"{record['test_accuracy']:.2%}, SA {record['test_sa']:.2%}, "
                f"FSA {record['test_fsa']:.2%}"
            )

    metrics = [
        f"{split}_{m}" for split in ("val", "test") for m in ("accuracy", "sa", "fsa")
    ]
    rows = experiment_utils.summarize(records, "lower_bound", metrics)
    baseline = args.grid[0]
    p_values = {
        metric: experiment_utils.wilcoxon_p_values(
            records, "lower_bound", baseline, f"test_{metric}"
        )
        for metric in ("accuracy", "fsa")
    }
    extra = []
    if p_values["accuracy"] is not None:
        extra = [("p, Acc", p_values["accuracy"]), ("p, FSA", p_values["fsa"])]
    table = experiment_utils.format_table(
        rows,
        "lower_bound",
        COLUMNS,
        extra,
        group_label="l",
    )
    notes = (
        f"Test set, mean ± std over {args.runs} seeded runs; l = 0.99 is (close "
        "to) plain cross entropy. SA: superclass "
        "accuracy; FSA: SA over the mistakes only. p: two-sided Wilcoxon "
        f"signed-rank test vs l = {baseline}, paired by seed."
    )
    print(f"\nSimilarity from {source}\n{table}\n{textwrap.fill(notes, 100)}")
    if p_values["accuracy"] is None:
        print("scipy is not installed: skipped the Wilcoxon test (pip install scipy).")
    os.makedirs(args.output_dir, exist_ok=True)
    plot = plot_metrics(os.path.join(args.output_dir, "metrics.png"), rows)
    experiment_utils.save_results(
        args.output_dir,
        records,
        f"{table}\n\n{notes}",
        extra={
            "similarity": source,
            "summary": rows,
            "wilcoxon_test": p_values,
        },
    )
    print(f"Results in {args.output_dir}" + (f" (plot: {plot})" if plot else ""))
    return {"records": records, "summary": rows, "table": table}


if __name__ == "__main__":
    main()
