"""Directory loaders for the age-estimation data sets of the SimLoss paper.

- UTKFace: one folder of files named `age_gender_race_datetime.jpg`
  (the age is the first field); the paper kept ages 1 to 90 (90 classes).
- AFAD: `AGE/GENDER/IMAGE.jpg` (e.g. `15/111/0001.jpg`); ages 15 to 75
  (61 classes).

The loaders only list files and labels (fast, no TensorFlow); `image_dataset`
turns them into a `tf.data` pipeline (decode, resize, standardise, cache,
prefetch). This module's pipeline code is TensorFlow-specific.
"""

import dataclasses
import os

import numpy as np

__all__ = [
    "AgeFiles",
    "afad_files",
    "channel_statistics",
    "image_dataset",
    "split_indices",
    "utkface_files",
]

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclasses.dataclass(frozen=True)
class AgeFiles:
    """Image files with ages, as found in a data-set folder.

    Attributes:
        paths: the image paths.
        ages: int array, the age of each image.
        skipped: files whose name or folder gave no usable age.
    """

    paths: tuple
    ages: np.ndarray
    skipped: tuple

    @property
    def min_age(self):
        return int(self.ages.min())

    def labels(self, min_age=None):
        """Class indices: `age - min_age` (the youngest age is class 0)."""
        return (self.ages - (self.min_age if min_age is None else min_age)).astype(
            np.int32
        )


def _check_dir(data_dir, layout):
    data_dir = os.fspath(data_dir)
    if not os.path.isdir(data_dir):
        raise ValueError(
            f"Invalid value for argument `data_dir`. Expected a folder in the "
            f"{layout} layout. Received: data_dir={data_dir!r}, which is not a folder"
        )
    return data_dir


def _finish(paths, ages, skipped, data_dir, layout, min_age, max_age, hint=""):
    skipped = sorted(skipped)
    if not paths:
        raise ValueError(
            f"No usable image in {data_dir!r}: expected the {layout} layout with "
            f"ages in [{min_age}, {max_age}]. Found {len(skipped)} other image "
            f"file(s){', e.g. ' + repr(skipped[0]) if skipped else ''}{hint}."
        )
    order = np.argsort(paths)
    return AgeFiles(
        paths=tuple(np.asarray(paths)[order]),
        ages=np.asarray(ages, np.int32)[order],
        skipped=tuple(skipped),
    )


def utkface_files(data_dir, min_age=1, max_age=90):
    """Lists UTKFace images: files named `age_gender_race_datetime.jpg`.

    Args:
        data_dir: the folder holding the images (not searched recursively).
        min_age: youngest age kept. Defaults to `1`.
        max_age: oldest age kept. Defaults to `90` (the paper's 90 classes).

    Returns:
        An `AgeFiles`. Files whose name does not start with an integer age,
        and ages outside `[min_age, max_age]`, are listed in `skipped`.
    """
    layout = "UTKFace (AGE_GENDER_RACE_DATETIME.jpg, e.g. 25_0_1_20170116.jpg)"
    data_dir = _check_dir(data_dir, layout)
    paths, ages, skipped, folders = [], [], [], []
    for name in os.listdir(data_dir):
        if os.path.isdir(os.path.join(data_dir, name)):
            folders.append(name)
        if not name.lower().endswith(_IMAGE_SUFFIXES):
            continue
        field = name.split("_", 1)[0]
        if field.isdigit() and min_age <= int(field) <= max_age:
            paths.append(os.path.join(data_dir, name))
            ages.append(int(field))
        else:
            skipped.append(name)
    hint = ""
    if folders:
        # UTKFace images lie directly in the folder; subfolders suggest
        # another layout (AFAD's AGE/GENDER/IMAGE.jpg) or a parent folder.
        hint = (
            f", and {len(folders)} subfolder(s), e.g. {sorted(folders)[0]!r}, "
            "which are not searched (AFAD's layout is AGE/GENDER/IMAGE.jpg)"
        )
    return _finish(paths, ages, skipped, data_dir, layout, min_age, max_age, hint)


def afad_files(data_dir, min_age=15, max_age=75):
    """Lists AFAD images: `AGE/GENDER/IMAGE.jpg`.

    Args:
        data_dir: the root folder holding one folder per age.
        min_age: youngest age kept. Defaults to `15`.
        max_age: oldest age kept. Defaults to `75` (61 classes).

    Returns:
        An `AgeFiles`; images under folders that are not an age in range,
        and images not two folders deep (e.g. UTKFace's, at the top), go to
        `skipped`.
    """
    layout = "AFAD (AGE/GENDER/IMAGE.jpg, e.g. 15/111/0001.jpg)"
    data_dir = _check_dir(data_dir, layout)
    paths, ages, skipped = [], [], []

    def is_image(name):
        return name.lower().endswith(_IMAGE_SUFFIXES)

    for age_name in os.listdir(data_dir):
        age_dir = os.path.join(data_dir, age_name)
        if not os.path.isdir(age_dir):
            if is_image(age_name):  # an image at the top (UTKFace's layout)
                skipped.append(age_name)
            continue
        usable = age_name.isdigit() and min_age <= int(age_name) <= max_age
        for gender_name in os.listdir(age_dir):
            gender_dir = os.path.join(age_dir, gender_name)
            if not os.path.isdir(gender_dir):
                if is_image(gender_name):  # an image one level too high
                    skipped.append(os.path.join(age_name, gender_name))
                continue
            for name in os.listdir(gender_dir):
                if not name.lower().endswith(_IMAGE_SUFFIXES):
                    continue
                path = os.path.join(gender_dir, name)
                if usable:
                    paths.append(path)
                    ages.append(int(age_name))
                else:
                    skipped.append(os.path.relpath(path, data_dir))
    return _finish(paths, ages, skipped, data_dir, layout, min_age, max_age)


def split_indices(num_examples, fractions=(0.6, 0.2, 0.2), seed=0):
    """A random split of `range(num_examples)` (the paper's 60/20/20).

    Returns:
        A tuple of int arrays, one per fraction.
    """
    if (
        isinstance(num_examples, bool)
        or not isinstance(num_examples, (int, np.integer))
        or num_examples < len(fractions)
    ):
        raise ValueError(
            "Invalid value for argument `num_examples`. Expected an int of at "
            f"least one example per split ({len(fractions)}). Received: "
            f"num_examples={num_examples!r}"
        )
    if not np.isclose(sum(fractions), 1.0) or min(fractions) <= 0:
        raise ValueError(
            "Invalid value for argument `fractions`. Expected positive "
            f"fractions summing to 1. Received: fractions={fractions}"
        )
    order = np.random.default_rng(seed).permutation(num_examples)
    bounds = np.round(np.cumsum(fractions)[:-1] * num_examples).astype(int)
    return tuple(np.split(order, bounds))


def image_dataset(
    paths,
    labels,
    image_size=60,
    batch_size=1024,
    mean=None,
    std=None,
    shuffle_seed=None,
    cache=True,
):
    """A `tf.data` pipeline: decode, resize, standardise, cache, prefetch.

    Args:
        paths: image file paths (JPEG or PNG).
        labels: int class labels, one per path.
        image_size: side of the square the images are resized to. Defaults
            to `60` (the paper's age models).
        batch_size: Defaults to `1024` (the paper's).
        mean, std: per-channel statistics for standardisation, shape `(3,)`;
            compute them on the training split with `channel_statistics`.
            Defaults to `None`: no standardisation.
        shuffle_seed: shuffle every epoch with this seed; `None` keeps the
            order.
        cache: cache the decoded images in memory. Defaults to `True`.

    Returns:
        A `tf.data.Dataset` of `(images, labels)` batches.
    """
    import tensorflow as tf

    if len(paths) != len(labels) or not len(paths):
        raise ValueError(
            "Invalid value for arguments `paths` and `labels`. Expected one "
            "label per image path, at least one of each. Received: "
            f"{len(paths)} paths and {len(labels)} labels"
        )

    def load(path, label):
        image = tf.io.decode_image(
            tf.io.read_file(path), channels=3, expand_animations=False
        )
        image = tf.image.resize(image, (image_size, image_size))
        return image, label

    dataset = tf.data.Dataset.from_tensor_slices(
        (list(paths), np.asarray(labels, np.int32))
    )
    dataset = dataset.map(load, num_parallel_calls=tf.data.AUTOTUNE)
    if mean is not None:
        mean = tf.constant(mean, tf.float32)
        std = tf.constant(std, tf.float32)
        dataset = dataset.map(lambda image, label: ((image - mean) / std, label))
    if cache:
        dataset = dataset.cache()
    if shuffle_seed is not None:
        dataset = dataset.shuffle(
            4096, seed=shuffle_seed, reshuffle_each_iteration=True
        )
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def channel_statistics(paths, image_size=60, limit=2000):
    """Per-channel mean and standard deviation of (up to `limit`) images."""
    if not len(paths):
        raise ValueError(
            "Invalid value for argument `paths`. Expected at least one image "
            "path. Received: an empty sequence"
        )
    dataset = image_dataset(
        paths[:limit], np.zeros(len(paths[:limit])), image_size, 256, cache=False
    )
    total = np.zeros(3)
    total_sq = np.zeros(3)
    count = 0
    for images, _ in dataset:
        pixels = images.numpy().reshape(-1, 3).astype(np.float64)
        total += pixels.sum(axis=0)
        total_sq += np.square(pixels).sum(axis=0)
        count += len(pixels)
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 1e-12))
    return mean.astype(np.float32), std.astype(np.float32)
