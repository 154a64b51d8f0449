"""Step time of similarity-preserving distillation: Keras's Distiller vs ours.

The same SP job (same teacher, student, layer pair, batch, optimizer, XLA on)
runs side by side in one process as:

  (a) `keras.distillation.Distiller` with `keras_simloss.SimilarityPreserving`;
  (b) `keras_simloss.Distiller`;
  (c) the floor: a plain student train step plus one teacher forward pass
      (the teacher's output is folded into the loss times 0, so XLA keeps it).

It also times F, one extra student forward pass in training mode. Keras's
Distiller runs the student twice per step (once for the predictions, once in
its feature extractor), so the best (b) can do against (a) is c / (c + F).
The variants take turns round after round; each reports the median over
rounds of its mean step time.

    python benchmarks/distillation_step_time.py [--batch-size 64] [--rounds 7]
    KERAS_BACKEND=jax python benchmarks/distillation_step_time.py

Runs on TensorFlow and JAX (XLA on both: `jit_compile=True`).
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_simloss import Distiller, SimilarityPreserving  # noqa: E402

GAMMA = 3000.0


def conv_net(widths, name, num_classes=10):
    """A small residual-free CNN; the last conv block is named 'features'."""
    inputs = keras.Input((32, 32, 3))
    x = inputs
    for index, width in enumerate(widths):
        x = keras.layers.Conv2D(width, 3, padding="same", use_bias=False)(x)
        x = keras.layers.BatchNormalization()(x)
        last = index == len(widths) - 1
        x = keras.layers.ReLU(name="features" if last else None)(x)
        if not last:
            x = keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(num_classes)(x), name=name)


class Floor(keras.Model):
    """A student train step plus a teacher forward pass, nothing else.

    Keras's own train step on every backend: `call` runs the student and
    `compute_loss` adds the teacher's forward pass.
    """

    def __init__(self, teacher, student):
        super().__init__()
        self.teacher = teacher
        self.student = student
        self.teacher.trainable = False
        self.built = True

    def call(self, inputs, training=None):
        return self.student(inputs, training=training)

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        loss = super().compute_loss(x, y, y_pred, sample_weight, training)
        teacher_logits = keras.ops.stop_gradient(self.teacher(x, training=False))
        # Keeps the teacher's forward pass alive under XLA at no cost.
        return loss + 0.0 * keras.ops.sum(teacher_logits)


def compiled_forward(student):
    """One student forward pass in training mode, XLA-compiled."""
    if keras.config.backend() == "jax":
        import jax

        trainable = [v.value for v in student.trainable_variables]
        non_trainable = [v.value for v in student.non_trainable_variables]
        step = jax.jit(
            lambda x: student.stateless_call(
                trainable, non_trainable, x, training=True
            )[0]
        )
        return step
    import tensorflow as tf

    return tf.function(lambda x: student(x, training=True), jit_compile=True)


def make_models(args):
    keras.utils.set_random_seed(0)
    teacher = conv_net([64, 128, 256], "teacher")
    student = conv_net([16, 32, 64], "student")
    return teacher, student


def compiled_variants(args):
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    variants = {}

    teacher, student = make_models(args)
    keras_distiller = keras.distillation.Distiller(
        teacher,
        student,
        distillation_losses=[SimilarityPreserving("features", "features")],
        distillation_loss_weights=[GAMMA],
        student_loss_weight=0.5,
    )
    keras_distiller.compile(optimizer="sgd", loss=loss, jit_compile=True)
    variants["(a) keras Distiller + SP"] = keras_distiller

    teacher, student = make_models(args)
    ours = Distiller(
        teacher, student, layer_pairs=[("features", "features")], gamma=GAMMA
    )
    ours.compile(optimizer="sgd", loss=loss, jit_compile=True)
    variants["(b) keras_simloss Distiller"] = ours

    teacher, student = make_models(args)
    floor = Floor(teacher, student)
    floor.compile(optimizer="sgd", loss=loss, jit_compile=True)
    variants["(c) floor"] = floor

    _, student = make_models(args)
    return variants, compiled_forward(student)


def time_train_steps(model, x, y, steps):
    start = time.perf_counter()
    for _ in range(steps):
        logs = model.train_on_batch(x, y, return_dict=True)
    float(np.asarray(logs["loss"]))
    return (time.perf_counter() - start) / steps


def time_forward(forward, x, steps):
    start = time.perf_counter()
    for _ in range(steps):
        out = forward(x)
    keras.ops.convert_to_numpy(out)
    return (time.perf_counter() - start) / steps


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="steps per round")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.batch_size, 32, 32, 3)).astype(np.float32)
    y = rng.integers(0, 10, size=args.batch_size)
    variants, forward = compiled_variants(args)
    for model in variants.values():  # compile and warm up
        for _ in range(2):
            model.train_on_batch(x, y)
    forward(x)
    forward(x)

    times = {name: [] for name in [*variants, "F"]}
    for round_index in range(args.rounds):
        names = list(variants) if round_index % 2 == 0 else list(variants)[::-1]
        for name in names:
            times[name].append(time_train_steps(variants[name], x, y, args.steps))
        times["F"].append(time_forward(forward, x, args.steps))
    median = {name: statistics.median(values) for name, values in times.items()}
    a, b, c = (median[name] for name in variants)
    f = median["F"]

    print(
        f"keras {keras.__version__}, backend {keras.config.backend()}, "
        f"batch {args.batch_size}, "
        f"32x32x3 inputs, XLA on, {args.rounds} rounds x {args.steps} steps (median)"
    )
    for name in variants:
        print(f"  {name:<30}{median[name] * 1e3:9.2f} ms/step")
    print(f"  {'F: one student forward':<30}{f * 1e3:9.2f} ms")
    print(
        f"(b)/(a) = {b / a:.3f}   ideal c/(c+F) = {c / (c + f):.3f}   gap = {b / a - c / (c + f):+.3f}"
    )
    print(f"(b)/(c) = {b / c:.3f}")


if __name__ == "__main__":
    main()
