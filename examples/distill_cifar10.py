"""Similarity-preserving distillation (Tung & Mori, ICCV 2019): does the teacher help?

A WideResNet teacher learns from every training label. A smaller
WideResNet student gets the labels of only a few training images
(--labelled-fraction) but sees all of them, and learns four ways, each from
the same seeded labelled subset and initial weights:

- student alone: cross entropy on the labelled images;
- KD: plus Hinton's logit distillation on all images (--alpha);
- SP: plus similarity-preserving distillation on all images: the student's
  batch similarity (Gram) matrices of the last residual group are pulled
  towards the teacher's (--gamma, the paper's 3000);
- KD+SP: both.

Unlabelled images carry the label -1, which the student loss ignores
(`SparseCategoricalCrossentropy(ignore_class=-1)`); the distillation terms
need no labels. The table gives test error % (mean ± std over --runs) and a
two-sided Wilcoxon signed-rank test of each method against the student
alone, paired by seed. --gamma-sweep adds SP rows at other weights;
--loss-parts prints the loss terms over training (seed 0).

Outputs (in --output-dir): runs.csv, results.json, table.md.

Data (--dataset): "digits", scikit-learn's 1,797 real 8x8 handwritten
digits (shipped with scikit-learn, no download; the default, about four
minutes on 2 CPU cores), "synthetic" (generated striped images) or
"cifar10" (TensorFlow Datasets). The paper's CIFAR-10 setting, every label
given to the student:

    python examples/distill_cifar10.py --dataset cifar10 --labelled-fraction 1 \\
        --teacher-depth 16 --teacher-width 2 --student-depth 16 \\
        --student-width 1 --epochs 200 --teacher-epochs 200 --runs 6 --jit-compile
"""

import os
import sys
import textwrap

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import experiment_utils  # noqa: E402

experiment_utils.quiet_tensorflow()

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_simloss import Distiller  # noqa: E402
from keras_simloss.datasets import synthetic  # noqa: E402

# The distillation terms each method turns on (weights from --alpha, --gamma).
METHODS = {
    "student alone": (),
    "KD": ("alpha",),
    "SP": ("gamma",),
    "KD+SP": ("alpha", "gamma"),
}
UNLABELLED = -1


def batch_norm():
    # Momentum 0.9 (PyTorch's 0.1, as in the WRN and SP reference code): with
    # Keras's default 0.99 the moving statistics lag far behind after the
    # few hundred steps of a short run, and inference-mode accuracy suffers.
    return keras.layers.BatchNormalization(momentum=0.9)


def wide_resnet(depth, width, num_classes, input_shape, name):
    """WRN-depth-width (Zagoruyko & Komodakis) with pre-activation blocks.

    The output of the last block of group g is the layer named `group{g}`;
    SP uses `group3`, the last group before global pooling.
    """
    if (depth - 4) % 6 or depth < 10:
        raise ValueError(
            "Invalid value for argument `depth`. Expected depth = 6n + 4 with "
            f"n >= 1 (10, 16, 22, 28, 40, ...). Received: depth={depth}"
        )
    blocks = (depth - 4) // 6
    inputs = keras.Input(input_shape)
    x = keras.layers.Conv2D(16, 3, padding="same", use_bias=False)(inputs)
    for group, channels in enumerate((16 * width, 32 * width, 64 * width), start=1):
        for block in range(blocks):
            stride = 2 if group > 1 and block == 0 else 1
            activated = keras.layers.ReLU()(batch_norm()(x))
            if stride != 1 or x.shape[-1] != channels:
                shortcut = keras.layers.Conv2D(
                    channels, 1, strides=stride, use_bias=False
                )(activated)
            else:
                shortcut = x
            y = keras.layers.Conv2D(
                channels, 3, strides=stride, padding="same", use_bias=False
            )(activated)
            y = keras.layers.ReLU()(batch_norm()(y))
            y = keras.layers.Conv2D(channels, 3, padding="same", use_bias=False)(y)
            last = block == blocks - 1
            x = keras.layers.Add(name=f"group{group}" if last else None)([shortcut, y])
    x = keras.layers.ReLU()(batch_norm()(x))
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(num_classes)(x)
    return keras.Model(inputs, outputs, name=name)


def optimizer(args, num_examples, epochs):
    """SGD with Nesterov momentum and a cosine decay of the rate to zero.

    The decay matters for batch-norm models: without it the weights still
    move fast at the last step, and the moving statistics (an average over
    recent steps) no longer match them at inference time.
    """
    steps = epochs * -(-num_examples // args.batch_size)
    schedule = keras.optimizers.schedules.CosineDecay(args.learning_rate, steps)
    return keras.optimizers.SGD(schedule, momentum=0.9, nesterov=True)


def student_run(method, gamma, teacher, train, test, seed, args):
    """Trains one student from a seeded labelled subset; returns its record."""
    x_train, y_train = train
    keras.utils.clear_session()  # a fresh model per run: drop the last one's state
    keras.utils.set_random_seed(seed)
    labels = labelled_subset(y_train, args.labelled_fraction, seed)
    student = wide_resnet(
        args.student_depth, args.student_width, 10, x_train.shape[1:], "student"
    )
    terms = METHODS[method]
    model = student
    if terms:
        model = Distiller(
            teacher,
            student,
            layer_pairs=[("group3", "group3")] if "gamma" in terms else [],
            gamma=gamma if "gamma" in terms else 0.0,
            alpha=args.alpha if "alpha" in terms else 0.0,
            temperature=args.temperature,
        )
    model.compile(
        optimizer=optimizer(args, len(y_train), args.epochs),
        # Label -1 marks an unlabelled image: no cross-entropy term for it.
        loss=keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, ignore_class=UNLABELLED
        ),
        jit_compile=args.jit_compile,
    )
    history = model.fit(
        x_train,
        labels,
        batch_size=args.batch_size,
        epochs=args.epochs,
        verbose=2 if args.verbose else 0,
    ).history
    predictions = experiment_utils.predict_logits(student, test[0]).argmax(axis=-1)
    return {
        "seed": seed,
        "gamma": gamma if "gamma" in terms else 0.0,
        "labelled": int(np.sum(labels != UNLABELLED)),
        "test_error": float(np.mean(predictions != test[1])),
        "history": history,
    }


# Everything below is the experiment harness: data, teacher, grid, table.


def labelled_subset(labels, fraction, seed):
    """`labels` with all but `fraction` of each class replaced by -1."""
    if fraction >= 1.0:
        return labels
    rng = np.random.default_rng(10_000 + seed)
    kept = np.full_like(labels, UNLABELLED)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        count = max(1, int(round(fraction * len(members))))
        chosen = rng.choice(members, count, replace=False)
        kept[chosen] = label
    return kept


def standardise(train, test):
    mean, std = train[0].mean(), train[0].std()
    return ((train[0] - mean) / std, train[1]), ((test[0] - mean) / std, test[1])


def load_data(args):
    """(train, test) pairs of float32 images and int32 labels, and a description."""
    if args.dataset == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = (digits.images.astype(np.float32) / 16.0)[..., None]
        y = digits.target.astype(np.int32)
        order = np.random.default_rng(0).permutation(len(y))
        test, train = order[: len(y) // 3], order[len(y) // 3 :]
        data = standardise((x[train], y[train]), (x[test], y[test]))
        return data, "scikit-learn digits (real 8x8 handwritten digits)"
    if args.dataset == "synthetic":
        x, y, _ = synthetic.hierarchical_images(
            args.synthetic_size, 5, 2, image_size=16, seed=12345
        )
        cut = int(0.75 * len(y))
        data = standardise((x[:cut], y[:cut]), (x[cut:], y[cut:]))
        return data, "generated striped images (10 classes, 16x16)"
    arrays = {}
    for split in ("train", "test"):
        data = experiment_utils.load_tfds_arrays("cifar10", split, args.data_dir)
        arrays[split] = (
            data["image"].astype(np.float32) / 255.0,
            data["label"].astype(np.int32),
        )
    # Per-channel statistics, as in the WRN reference code.
    mean = arrays["train"][0].mean(axis=(0, 1, 2))
    std = arrays["train"][0].std(axis=(0, 1, 2))
    data = tuple(((x - mean) / std, y) for x, y in (arrays["train"], arrays["test"]))
    return data, "CIFAR-10 (TensorFlow Datasets)"


def train_teacher(train, test, args):
    keras.utils.set_random_seed(1000)
    teacher = wide_resnet(
        args.teacher_depth, args.teacher_width, 10, train[0].shape[1:], "teacher"
    )
    teacher.compile(
        optimizer=optimizer(args, len(train[1]), args.teacher_epochs),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=args.jit_compile,
    )
    teacher.fit(
        *train,
        batch_size=args.batch_size,
        epochs=args.teacher_epochs,
        verbose=2 if args.verbose else 0,
        callbacks=[
            experiment_utils.epoch_progress(
                f"teacher WRN-{args.teacher_depth}-{args.teacher_width}",
                args.teacher_epochs,
            )
        ],
    )
    predictions = experiment_utils.predict_logits(teacher, test[0]).argmax(axis=-1)
    return teacher, float(np.mean(predictions != test[1]))


def print_loss_parts(name, method, gamma, history, args):
    """One run's loss terms per epoch, weighted as they enter the total loss."""
    terms = METHODS[method]
    alpha = args.alpha if "alpha" in terms else 0.0
    columns = [("(1-alpha) CE", "student_loss" if terms else "loss", 1.0 - alpha)]
    if "gamma" in terms:
        columns.append(("gamma SP", "sp_loss", gamma))
    if "alpha" in terms:
        columns.append(("alpha KD", "kd_loss", alpha))
    if terms:
        columns.append(("total", "loss", 1.0))
    epochs = len(history["loss"])
    shown = sorted({0, 1, epochs // 4, epochs // 2, 3 * epochs // 4, epochs - 1})
    shown = [epoch for epoch in shown if epoch < epochs]
    body = [
        [epoch + 1]
        + [f"{history[key][epoch] * weight:.4f}" for _, key, weight in columns]
        for epoch in shown
    ]
    print(f"\nLoss terms of {name}, seed 0 (mean over the epoch's batches):")
    print(experiment_utils.markdown_table(["epoch"] + [c[0] for c in columns], body))


def parse_args(argv=None):
    parser = experiment_utils.argument_parser(__doc__)
    add = parser.add_argument
    add(
        "--dataset",
        choices=["digits", "synthetic", "cifar10"],
        default="digits",
        help="data set (digits needs scikit-learn, cifar10 tensorflow-datasets)",
    )
    add("--data-dir", help="TensorFlow Datasets folder (cifar10; None: TFDS's default)")
    add(
        "--labelled-fraction",
        type=float,
        default=0.05,
        help="fraction of each class's training images whose label the student gets",
    )
    add("--teacher-depth", type=int, default=10, help="teacher WRN depth (6n + 4)")
    add("--teacher-width", type=int, default=2, help="teacher WRN width")
    add("--student-depth", type=int, default=10, help="student WRN depth (6n + 4)")
    add("--student-width", type=int, default=1, help="student WRN width")
    add("--teacher-epochs", type=int, default=20, help="teacher training epochs")
    add("--epochs", type=int, default=20, help="epochs per student")
    add(
        "--runs",
        type=int,
        default=6,
        help="seeded runs per method (>= 6 for a two-sided p < 0.05)",
    )
    add(
        "--methods",
        nargs="+",
        choices=list(METHODS),
        default=list(METHODS),
        help="methods to train",
    )
    add("--gamma", type=float, default=3000.0, help="SP weight (the paper's 3000)")
    add(
        "--gamma-sweep",
        type=float,
        nargs="*",
        default=[],
        help="extra SP rows with these gammas",
    )
    add("--alpha", type=float, default=0.9, help="KD weight")
    add("--temperature", type=float, default=4.0, help="KD temperature")
    add("--batch-size", type=int, default=128, help="batch size (also the Gram size)")
    add("--learning-rate", type=float, default=0.05, help="initial SGD learning rate")
    add("--synthetic-size", type=int, default=2400, help="synthetic images")
    add(
        "--jit-compile",
        action="store_true",
        help="XLA (pays off on long runs; on the defaults compiling costs more)",
    )
    add(
        "--loss-parts",
        action="store_true",
        help="print each method's loss terms over training (seed 0)",
    )
    add(
        "--output-dir",
        default=os.path.join("outputs", "distill_cifar10"),
        help="where to write the results",
    )
    add("--verbose", action="store_true", help="Keras's line per epoch")
    args = parser.parse_args(argv)  # fmt: skip
    for name in ("teacher_depth", "student_depth"):
        depth = getattr(args, name)
        if depth < 10 or (depth - 4) % 6:
            parser.error(
                f"--{name.replace('_', '-')} must be 6n + 4 (10, 16, 22, 28, 40, "
                f"...); received {depth}"
            )
    if not 0.0 < args.labelled_fraction <= 1.0:
        parser.error("--labelled-fraction must be in (0, 1]")
    if args.runs < 1 or args.epochs < 1 or args.teacher_epochs < 1:
        parser.error("--runs, --epochs and --teacher-epochs must be at least 1")
    return parser, args


def main(argv=None):
    parser, args = parse_args(argv)
    try:
        (train, test), description = load_data(args)
    except (ValueError, OSError, ImportError) as error:
        parser.error(str(error))
    grid = [(method, args.gamma) for method in args.methods]
    grid += [("SP", gamma) for gamma in args.gamma_sweep]

    def row_name(method, gamma):
        sweep = args.gamma_sweep and "gamma" in METHODS[method]
        return f"{method}, gamma={gamma:g}" if sweep else method

    labelled = int(np.sum(labelled_subset(train[1], args.labelled_fraction, 0) >= 0))
    print(
        f"Data: {description}; {len(train[1])} train / {len(test[1])} test images.\n"
        f"Teacher WRN-{args.teacher_depth}-{args.teacher_width} learns from all "
        f"{len(train[1])} training labels; student "
        f"WRN-{args.student_depth}-{args.student_width} from {labelled} of them "
        f"(--labelled-fraction {args.labelled_fraction:g}), KD/SP on all images.\n"
        f"{len(grid)} method(s) x {args.runs} seeded runs, {args.epochs} epochs each.",
        flush=True,
    )
    progress = experiment_utils.Progress(len(grid) * args.runs + 1)
    teacher, teacher_error = train_teacher(train, test, args)
    progress.step(f"teacher: test error {teacher_error:.2%}")

    records, histories = [], {}
    for seed in range(args.runs):  # seed-major: a stopped run still has pairs
        for method, gamma in grid:
            name = row_name(method, gamma)
            record = student_run(method, gamma, teacher, train, test, seed, args)
            histories.setdefault(name, record.pop("history"))
            records.append({"method": name, **record})
            progress.step(f"{name}, seed {seed}: test error {record['test_error']:.2%}")

    if args.loss_parts:
        for method, gamma in grid:
            name = row_name(method, gamma)
            print_loss_parts(name, method, gamma, histories[name], args)

    baseline = row_name(*grid[0])
    rows = experiment_utils.summarize(records, "method", ["test_error"])
    p_values = experiment_utils.wilcoxon_p_values(
        records, "method", baseline, "test_error"
    )
    columns = [("test_error", "test error %", 100, 2)]
    extra = [] if p_values is None else [(f"p vs {baseline}", p_values)]
    extra.append(("better runs", better_counts(records, baseline)))
    table = experiment_utils.format_table(rows, "method", columns, extra)
    summary = (
        f"Teacher WRN-{args.teacher_depth}-{args.teacher_width}: test error "
        f"{teacher_error:.2%}. Student WRN-{args.student_depth}-{args.student_width}, "
        f"{labelled} labelled images, {args.runs} paired runs; two-sided Wilcoxon "
        "signed-rank test."
    )
    print(f"\n{description}\n{table}\n{textwrap.fill(summary, 100)}")
    if p_values is None:
        print("scipy is not installed: skipped the Wilcoxon test (pip install scipy).")
    elif args.runs < 6:
        print(
            f"Note: with {args.runs} paired runs a two-sided test cannot reach p < 0.05."
        )
    experiment_utils.save_results(
        args.output_dir,
        records,
        f"{table}\n\n{summary}",
        extra={
            "dataset": description,
            "teacher_error": teacher_error,
            "summary": rows,
            "wilcoxon_test_error": p_values,
            "loss_parts_seed0": histories,
        },
    )
    print(f"Results in {args.output_dir}")
    return {
        "records": records,
        "summary": rows,
        "p_values": p_values,
        "teacher_error": teacher_error,
        "table": table,
    }


def better_counts(records, baseline):
    """`"k/n"`: runs in which the method's test error beat the baseline's."""
    base = {r["seed"]: r["test_error"] for r in records if r["method"] == baseline}
    counts = {}
    for record in records:
        if record["seed"] in base:
            won, total = counts.get(record["method"], (0, 0))
            won += record["test_error"] < base[record["seed"]]
            counts[record["method"]] = (won, total + 1)
    return {m: "-" if m == baseline else f"{w}/{n}" for m, (w, n) in counts.items()}


if __name__ == "__main__":
    main()
