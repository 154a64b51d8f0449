"""Generated data sets with the structure SimLoss exploits; no download.

- `ordinal_images`: images whose class is an ordered quantity (like an age):
  a bright disk whose radius grows with the class, on a noisy background.
  Neighbouring classes look alike, far classes do not.
- `hierarchical_images`: images whose classes come in superclasses: the
  superclass sets a coarse pattern (orientation of stripes), the class within
  it a finer detail (stripe frequency), so classes of one superclass are easy
  to confuse with each other and hard to confuse with the rest.
"""

import numpy as np

__all__ = ["hierarchical_images", "ordinal_images"]


def _check(num_samples, num_classes, image_size):
    for name, value, low in (
        ("num_samples", num_samples, 1),
        ("num_classes", num_classes, 2),
        ("image_size", image_size, 8),
    ):
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, np.integer))
            or value < low
        ):
            raise ValueError(
                f"Invalid value for argument `{name}`. Expected an int >= {low}. "
                f"Received: {name}={value!r}"
            )


def ordinal_images(
    num_samples, num_classes=30, image_size=32, noise=0.35, label_noise=1.5, seed=0
):
    """Images of a disk whose radius encodes an ordered class.

    Like apparent age, the recorded label is noisy: it is the class drawn in
    the image moved by a rounded normal offset of `label_noise` classes (kept
    in range), so neighbouring labels are genuinely ambiguous.

    Args:
        num_samples: number of images.
        num_classes: number of ordered classes. Defaults to `30`.
        image_size: height and width. Defaults to `32`.
        noise: standard deviation of the pixel noise and of the radius jitter
            (in units of one class step). Defaults to `0.35`.
        label_noise: standard deviation, in classes, of the offset between
            the drawn class and the recorded label. Defaults to `1.5`.
        seed: random seed. Defaults to `0`.

    Returns:
        `(images, labels)`: float32 `(num_samples, image_size, image_size, 1)`
        and int32 `(num_samples,)`.

    Example:

    >>> x, y = ordinal_images(4, num_classes=5, image_size=16)
    >>> x.shape, y.shape
    ((4, 16, 16, 1), (4,))
    """
    _check(num_samples, num_classes, image_size)
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, size=num_samples).astype(np.int32)
    step = 0.4 * image_size / num_classes
    # The radius jitters by about a class step, so neighbours overlap.
    radius = (
        0.08 * image_size
        + (labels + rng.normal(scale=noise * 2, size=num_samples)) * step
    )
    centre = image_size / 2 + rng.uniform(-1.5, 1.5, size=(num_samples, 2))
    grid = np.arange(image_size) + 0.5
    dy = grid[None, :, None] - centre[:, 0, None, None]
    dx = grid[None, None, :] - centre[:, 1, None, None]
    distance = np.sqrt(dy**2 + dx**2)
    disk = 1.0 / (1.0 + np.exp((distance - radius[:, None, None]) * 2.0))
    images = disk + rng.normal(scale=noise, size=disk.shape)
    offsets = np.round(rng.normal(scale=label_noise, size=num_samples)).astype(np.int32)
    recorded = np.clip(labels + offsets, 0, num_classes - 1).astype(np.int32)
    return images[..., None].astype(np.float32), recorded


def hierarchical_images(
    num_samples,
    num_superclasses=4,
    classes_per_superclass=5,
    image_size=32,
    noise=0.6,
    seed=0,
):
    """Striped images: superclass = stripe orientation, class = frequency.

    Args:
        num_samples: number of images.
        num_superclasses: number of superclasses. Defaults to `4`.
        classes_per_superclass: classes in each superclass. Defaults to `5`.
        image_size: height and width. Defaults to `32`.
        noise: standard deviation of the pixel noise. Defaults to `0.6`.
        seed: random seed. Defaults to `0`.

    Returns:
        `(images, labels, superclass_of)`: float32 images
        `(num_samples, image_size, image_size, 3)`, int32 labels
        `(num_samples,)` and the int32 superclass of each class.

    Example:

    >>> x, y, parents = hierarchical_images(6, 2, 3, image_size=16)
    >>> x.shape, parents.tolist()
    ((6, 16, 16, 3), [0, 0, 0, 1, 1, 1])
    """
    num_classes = num_superclasses * classes_per_superclass
    _check(num_samples, num_classes, image_size)
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, size=num_samples).astype(np.int32)
    superclass_of = np.repeat(
        np.arange(num_superclasses), classes_per_superclass
    ).astype(np.int32)
    angle = np.pi * superclass_of[labels] / num_superclasses
    angle = angle + rng.normal(scale=0.08, size=num_samples)
    frequency = 1.5 + (labels % classes_per_superclass) * 0.6
    frequency = frequency + rng.normal(scale=0.15, size=num_samples)
    phase = rng.uniform(0, 2 * np.pi, size=num_samples)
    grid = (np.arange(image_size) + 0.5) / image_size
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    along = np.cos(angle)[:, None, None] * xx + np.sin(angle)[:, None, None] * yy
    stripes = np.sin(
        2 * np.pi * frequency[:, None, None] * along + phase[:, None, None]
    )
    # The colour hints at the superclass too, as real superclasses share looks.
    tint = np.stack([np.cos(angle), np.sin(angle), np.cos(angle + 1.0)], axis=-1)[
        :, None, None, :
    ]
    images = stripes[..., None] * (0.6 + 0.4 * tint)
    images = images + rng.normal(scale=noise, size=images.shape)
    return images.astype(np.float32), labels, superclass_of
