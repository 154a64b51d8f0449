"""Similarity-preserving distillation on CIFAR-10 (Tung & Mori, ICCV 2019).

Trains a WideResNet teacher, then the same WideResNet student four ways:
alone, with Hinton logit distillation (KD), with similarity-preserving
distillation (SP, gamma = 3000 on the output of the last residual group) and
with both (KD+SP), and prints a table of test error % (mean ± std over runs).
`--student-loss simloss` trains every student with SimLoss over a class
hierarchy instead of cross entropy.

Outputs (in --output-dir): runs.csv, results.json, table.md.

By default it runs on a generated 10-class image task (no download) with
small WideResNets (WRN-10-2 teacher, WRN-10-1 student) in about two and a
half minutes on 2 CPU cores. Real data through TensorFlow Datasets, the
paper's setting:

    python examples/distill_cifar10.py --dataset cifar10 --teacher-depth 16 \\
        --teacher-width 2 --student-depth 16 --student-width 1 --epochs 200 \\
        --teacher-epochs 200 --runs 3
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
from keras_simloss import Distiller, similarity  # noqa: E402
from keras_simloss.datasets import synthetic  # noqa: E402

# CIFAR-10 labels: airplane, automobile, bird, cat, deer, dog, frog, horse,
# ship, truck. Vehicles (1) and animals (0), for SimLoss as the student loss.
CIFAR10_SUPERCLASS_OF = np.array([1, 1, 0, 0, 0, 0, 0, 0, 1, 1])

# The distillation terms each method turns on (weights from --alpha, --gamma).
METHODS = {
    "student alone": (),
    "KD": ("alpha",),
    "SP": ("gamma",),
    "KD+SP": ("alpha", "gamma"),
}


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


def load_data(args):
    if args.dataset == "synthetic":
        x, y, superclass_of = synthetic.hierarchical_images(
            args.synthetic_size,
            num_superclasses=5,
            classes_per_superclass=2,
            seed=12345,
        )
        cut = int(0.75 * len(y))
        return (x[:cut], y[:cut]), (x[cut:], y[cut:]), superclass_of
    arrays = {}
    for split in ("train", "test"):
        data = experiment_utils.load_tfds_arrays("cifar10", split, args.data_dir)
        arrays[split] = (
            data["image"].astype(np.float32) / 255.0,
            data["label"].astype(np.int32),
        )
    mean = arrays["train"][0].mean(axis=(0, 1, 2))
    std = arrays["train"][0].std(axis=(0, 1, 2))
    return (
        ((arrays["train"][0] - mean) / std, arrays["train"][1]),
        ((arrays["test"][0] - mean) / std, arrays["test"][1]),
        CIFAR10_SUPERCLASS_OF,
    )


def student_loss(args, superclass_of):
    if args.student_loss == "simloss":
        sim = similarity.from_hierarchy(superclass_of, args.superclass_similarity)
        return keras_simloss.SimLoss(sim, from_logits=True)
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def optimizer(args, num_examples, epochs):
    """SGD with Nesterov momentum and a cosine decay of the rate to zero.

    The decay matters for batch-norm models: without it the weights still
    move fast at the last step, and the moving statistics (an average over
    recent steps) no longer match them at inference time.
    """
    steps = epochs * -(-num_examples // args.batch_size)
    schedule = keras.optimizers.schedules.CosineDecay(args.learning_rate, steps)
    return keras.optimizers.SGD(schedule, momentum=0.9, nesterov=True)


def fit(model, loss, train, epochs, args):
    """Compiles `model` (SGD with cosine decay, XLA) and fits it on `train`."""
    model.compile(
        optimizer=optimizer(args, len(train[1]), epochs),
        loss=loss,
        metrics=["accuracy"],
        jit_compile=True,
    )
    model.fit(
        *train,
        batch_size=args.batch_size,
        epochs=epochs,
        verbose=2 if args.verbose else 0,
    )


def train_teacher(train, test, num_classes, args):
    keras.utils.set_random_seed(1000)
    teacher = wide_resnet(
        args.teacher_depth,
        args.teacher_width,
        num_classes,
        train[0].shape[1:],
        "teacher",
    )
    fit(
        teacher,
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        train,
        args.teacher_epochs,
        args,
    )
    accuracy = teacher.evaluate(*test, batch_size=256, verbose=0, return_dict=True)[
        "accuracy"
    ]
    return teacher, 1.0 - accuracy


def train_student(method, teacher, train, test, superclass_of, seed, args):
    num_classes = len(superclass_of)
    keras.utils.set_random_seed(seed)
    student = wide_resnet(
        args.student_depth,
        args.student_width,
        num_classes,
        train[0].shape[1:],
        "student",
    )
    settings = METHODS[method]
    if settings:
        model = Distiller(
            teacher,
            student,
            layer_pairs=[("group3", "group3")] if "gamma" in settings else [],
            gamma=args.gamma if "gamma" in settings else 0.0,
            alpha=args.alpha if "alpha" in settings else 0.0,
            temperature=args.temperature,
        )
    else:
        model = student
    fit(model, student_loss(args, superclass_of), train, args.epochs, args)
    predictions = student.predict(test[0], batch_size=256, verbose=0).argmax(axis=-1)
    return float(np.mean(predictions != test[1]))


def parse_args(argv=None):
    parser = experiment_utils.argument_parser(__doc__)
    parser.add_argument(
        "--dataset", choices=["synthetic", "cifar10"], default="synthetic"
    )
    parser.add_argument(
        "--data-dir", help="TensorFlow Datasets folder (default: TFDS's)"
    )
    parser.add_argument("--teacher-depth", type=int, default=10)
    parser.add_argument("--teacher-width", type=int, default=2)
    parser.add_argument("--student-depth", type=int, default=10)
    parser.add_argument("--student-width", type=int, default=1)
    parser.add_argument("--teacher-epochs", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=8, help="epochs per student")
    parser.add_argument("--runs", type=int, default=1, help="seeded runs per method")
    parser.add_argument(
        "--methods", nargs="+", choices=list(METHODS), default=list(METHODS)
    )
    parser.add_argument(
        "--student-loss", choices=["crossentropy", "simloss"], default="crossentropy"
    )
    parser.add_argument(
        "--gamma", type=float, default=3000.0, help="SP weight (paper: 3000)"
    )
    parser.add_argument("--alpha", type=float, default=0.9, help="KD weight")
    parser.add_argument("--temperature", type=float, default=4.0, help="KD temperature")
    parser.add_argument("--superclass-similarity", type=float, default=0.3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=0.05)
    parser.add_argument("--synthetic-size", type=int, default=2400)
    parser.add_argument(
        "--output-dir", default=os.path.join("outputs", "distill_cifar10")
    )
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    for name in ("teacher_depth", "student_depth"):
        depth = getattr(args, name)
        if depth < 10 or (depth - 4) % 6:
            parser.error(
                f"--{name.replace('_', '-')} must be 6n + 4 (10, 16, 22, 28, 40, ...); received {depth}"
            )
    return parser, args


def main(argv=None):
    parser, args = parse_args(argv)
    try:
        train, test, superclass_of = load_data(args)
    except (ValueError, OSError) as error:
        parser.error(str(error))
    num_classes = len(superclass_of)
    print(
        f"Data: {args.dataset}, {len(train[1])} train / {len(test[1])} test images, "
        f"{num_classes} classes; teacher WRN-{args.teacher_depth}-{args.teacher_width}, "
        f"student WRN-{args.student_depth}-{args.student_width}, student loss {args.student_loss}"
    )
    start = time.perf_counter()
    teacher, teacher_error = train_teacher(train, test, num_classes, args)
    print(
        f"teacher: test error {teacher_error:.2%} ({time.perf_counter() - start:.0f} s)",
        flush=True,
    )

    records = []
    for method in args.methods:
        for seed in range(args.runs):
            start = time.perf_counter()
            error = train_student(
                method, teacher, train, test, superclass_of, seed, args
            )
            records.append({"method": method, "seed": seed, "test_error": error})
            print(
                f"{method} run {seed + 1}/{args.runs}: test error {error:.2%} ({time.perf_counter() - start:.0f} s)",
                flush=True,
            )

    rows = experiment_utils.summarize(records, "method", ["test_error"])
    table = experiment_utils.format_table(
        rows, "method", [("test_error", "test error %", 100, 2)]
    )
    table += f"\n\nTeacher WRN-{args.teacher_depth}-{args.teacher_width}: test error {teacher_error * 100:.2f} %"
    print("\n" + table)
    experiment_utils.save_results(
        args.output_dir,
        records,
        table,
        extra={"teacher_error": teacher_error, "summary": rows},
    )
    print(f"Results in {args.output_dir}")
    return {"records": records, "summary": rows, "teacher_error": teacher_error}


if __name__ == "__main__":
    main()
