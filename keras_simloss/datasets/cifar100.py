"""CIFAR-100 class names, its two-level hierarchy and the SimLoss paper's subset.

Label order is the canonical one used by `keras.datasets.cifar100` and
TensorFlow Datasets (`cifar100`, features `label` and `coarse_label`).

The SimLoss paper (Kobs et al., 2020, https://arxiv.org/abs/2003.03182)
drops the 4 classes that have no word2vec vector (aquarium fish, sweet
pepper, keyboard, pickup truck) and re-indexes the 96 others in order:
`PAPER_CLASSES`, `to_paper_labels`.

Example:

>>> FINE_LABEL_NAMES[FINE_TO_COARSE.tolist().index(2)]
'orchid'
>>> COARSE_LABEL_NAMES[FINE_TO_COARSE[FINE_LABEL_NAMES.index("rose")]]
'flowers'
"""

import numpy as np

__all__ = [
    "COARSE_LABEL_NAMES",
    "FINE_LABEL_NAMES",
    "FINE_TO_COARSE",
    "PAPER_CLASSES",
    "PAPER_EXCLUDED_CLASSES",
    "PAPER_FINE_TO_COARSE",
    "PAPER_LABEL_NAMES",
    "to_paper_labels",
]

FINE_LABEL_NAMES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle",
    "bicycle", "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel",
    "can", "castle", "caterpillar", "cattle", "chair", "chimpanzee", "clock",
    "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster",
    "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion",
    "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse",
    "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear",
    "pickup_truck", "pine_tree", "plain", "plate", "poppy", "porcupine",
    "possum", "rabbit", "raccoon", "ray", "road", "rocket", "rose", "sea",
    "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake",
    "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table",
    "tank", "telephone", "television", "tiger", "tractor", "train", "trout",
    "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman",
    "worm",
)  # fmt: skip

# Superclass name -> its five members, in coarse-label order.
_SUPERCLASS_MEMBERS = {
    "aquatic_mammals": ("beaver", "dolphin", "otter", "seal", "whale"),
    "fish": ("aquarium_fish", "flatfish", "ray", "shark", "trout"),
    "flowers": ("orchid", "poppy", "rose", "sunflower", "tulip"),
    "food_containers": ("bottle", "bowl", "can", "cup", "plate"),
    "fruit_and_vegetables": ("apple", "mushroom", "orange", "pear", "sweet_pepper"),
    "household_electrical_devices": (
        "clock",
        "keyboard",
        "lamp",
        "telephone",
        "television",
    ),
    "household_furniture": ("bed", "chair", "couch", "table", "wardrobe"),
    "insects": ("bee", "beetle", "butterfly", "caterpillar", "cockroach"),
    "large_carnivores": ("bear", "leopard", "lion", "tiger", "wolf"),
    "large_man-made_outdoor_things": (
        "bridge",
        "castle",
        "house",
        "road",
        "skyscraper",
    ),
    "large_natural_outdoor_scenes": ("cloud", "forest", "mountain", "plain", "sea"),
    "large_omnivores_and_herbivores": (
        "camel",
        "cattle",
        "chimpanzee",
        "elephant",
        "kangaroo",
    ),
    "medium_mammals": ("fox", "porcupine", "possum", "raccoon", "skunk"),
    "non-insect_invertebrates": ("crab", "lobster", "snail", "spider", "worm"),
    "people": ("baby", "boy", "girl", "man", "woman"),
    "reptiles": ("crocodile", "dinosaur", "lizard", "snake", "turtle"),
    "small_mammals": ("hamster", "mouse", "rabbit", "shrew", "squirrel"),
    "trees": ("maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"),
    "vehicles_1": ("bicycle", "bus", "motorcycle", "pickup_truck", "train"),
    "vehicles_2": ("lawn_mower", "rocket", "streetcar", "tank", "tractor"),
}

COARSE_LABEL_NAMES = tuple(_SUPERCLASS_MEMBERS)

_COARSE_OF_NAME = {
    member: coarse
    for coarse, members in enumerate(_SUPERCLASS_MEMBERS.values())
    for member in members
}

#: int32 array of shape (100,): the coarse label of each fine label.
FINE_TO_COARSE = np.array(
    [_COARSE_OF_NAME[name] for name in FINE_LABEL_NAMES], np.int32
)
FINE_TO_COARSE.setflags(write=False)

#: Fine labels the paper removed (no word2vec vector for their names).
PAPER_EXCLUDED_CLASSES = tuple(
    FINE_LABEL_NAMES.index(name)
    for name in ("aquarium_fish", "keyboard", "pickup_truck", "sweet_pepper")
)

#: The 96 fine labels the paper kept, in canonical order; new label = position.
PAPER_CLASSES = tuple(
    label
    for label in range(len(FINE_LABEL_NAMES))
    if label not in PAPER_EXCLUDED_CLASSES
)
PAPER_LABEL_NAMES = tuple(FINE_LABEL_NAMES[label] for label in PAPER_CLASSES)
PAPER_FINE_TO_COARSE = FINE_TO_COARSE[list(PAPER_CLASSES)]
PAPER_FINE_TO_COARSE.setflags(write=False)

_TO_PAPER = np.full(len(FINE_LABEL_NAMES), -1, np.int32)
_TO_PAPER[list(PAPER_CLASSES)] = np.arange(len(PAPER_CLASSES), dtype=np.int32)


def to_paper_labels(fine_labels):
    """Maps canonical fine labels to the paper's 96-class indices.

    Args:
        fine_labels: integer array-like of fine labels in `[0, 100)`.

    Returns:
        An int32 array of the same shape: the new index, or -1 for the four
        removed classes (filter those examples out).

    Example:

    >>> to_paper_labels([0, 1, 2, 99]).tolist()
    [0, -1, 1, 95]
    """
    labels = np.asarray(fine_labels)
    if not np.issubdtype(labels.dtype, np.integer) or np.any(
        (labels < 0) | (labels >= 100)
    ):
        raise ValueError(
            "Invalid value for argument `fine_labels`. Expected integer "
            f"CIFAR-100 fine labels in [0, 100). Received: {labels.ravel()[:5].tolist()}"
        )
    return _TO_PAPER[labels]
