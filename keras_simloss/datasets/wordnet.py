"""WordNet 3.0 class hierarchies of CIFAR-100 and ImageNet-1k, for `from_hierarchy`.

The hierarchies ship with the package (`data/wordnet_hierarchies.json`,
written by the dev script `make_wordnet_hierarchies.py` from Princeton
WordNet 3.0, Miller, 1995, https://wordnet.princeton.edu/): no download, no
extra dependency.

Each class is one noun synset; of its hypernym paths to `entity.n.01` the
shortest is kept (ties: the smallest sequence of synset names from the root),
and the kept paths form a tree. Level `d` gives each class its ancestor at
depth `d` (`entity.n.01` at depth 0), or the class itself when it is no
deeper than `d`; levels run from the deepest, `D`, to depth 1, nearest first.
Two classes share level `d` exactly when their lowest common ancestor is at
depth `>= d`: a nearer shared level means a deeper common ancestor.

WordNet's depths are uneven (its people are shallow, its animals deep), so
depth is only a rough measure of closeness across branches.

Example:

>>> tree = cifar100_hierarchy()
>>> tree.ancestors.shape
(16, 100)
>>> tree.synsets[tree.class_names.index("maple_tree")]
'maple.n.02'
>>> tree.lowest_common_ancestor("maple_tree", "oak_tree")
'tree.n.01'
"""

import dataclasses
import functools
import importlib.resources
import json

import numpy as np

from keras_simloss.similarity.hierarchy import from_hierarchy

__all__ = ["WordNetHierarchy", "cifar100_hierarchy", "imagenet_hierarchy"]


@dataclasses.dataclass(frozen=True)
class WordNetHierarchy:
    """A class hierarchy cut from WordNet, as ancestor ids per level.

    Attributes:
        class_names: the classes in label order (CIFAR-100 fine names, or
            ImageNet-1k WordNet ids such as `"n01440764"`).
        synsets: the WordNet synset name of each class (`"maple.n.02"`).
        ancestors: read-only int32 array of shape `(num_levels, C)`: at each
            level, nearest first, the index in `node_names` of each class's
            ancestor. Pass it to `keras_simloss.similarity.from_hierarchy`.
        depths: the depth of each level in WordNet (`entity.n.01` is 0),
            from the deepest down to 1.
        node_names: the synset names of all the tree's nodes.
        wordnet_version: where the hierarchy comes from.
    """

    class_names: tuple
    synsets: tuple
    ancestors: np.ndarray
    depths: tuple
    node_names: tuple
    wordnet_version: str

    def similarity(self, similarities=None):
        """The `HierarchySimilarity` of this tree.

        `S[i, j] = similarities[k]` for the nearest level `k` that classes
        `i != j` share (they share every farther one too), `S[i, i] = 1`.

        Args:
            similarities: one float in `[0, 1)` per level, nearest first,
                non-increasing for a nearer shared level to mean more similar.
                Defaults to `None`: `depth / (max_depth + 1)`, i.e.
                `S[i, j] = depth(lowest common ancestor) / (D + 1)`.

        Returns:
            `keras_simloss.similarity.from_hierarchy(self.ancestors,
            similarities)`.
        """
        if similarities is None:
            similarities = np.asarray(self.depths, np.float64) / (max(self.depths) + 1)
        return from_hierarchy(self.ancestors, similarities)

    def lowest_common_ancestor(self, first, second):
        """The synset name of the deepest node two classes share.

        Args:
            first: a class name (an entry of `class_names`) or label.
            second: a class name or label.

        Returns:
            A synset name, e.g. `"tree.n.01"`; `"entity.n.01"` when the
            classes share no level.
        """
        first, second = (
            self.class_names.index(name) if isinstance(name, str) else int(name)
            for name in (first, second)
        )
        for level in self.ancestors:  # nearest first
            if level[first] == level[second]:
                return self.node_names[level[first]]
        return "entity.n.01"


@functools.lru_cache(maxsize=1)
def _data():
    path = importlib.resources.files("keras_simloss.datasets").joinpath(
        "data", "wordnet_hierarchies.json"
    )
    return json.loads(path.read_text(encoding="utf-8"))


def _hierarchy(key):
    data = _data()
    part = data[key]
    ancestors = np.asarray(part["ancestors"], np.int32)
    ancestors.setflags(write=False)
    return WordNetHierarchy(
        class_names=tuple(part["class_names"]),
        synsets=tuple(part["synsets"]),
        ancestors=ancestors,
        depths=tuple(part["depths"]),
        node_names=tuple(part["node_names"]),
        wordnet_version=data["wordnet"],
    )


def cifar100_hierarchy():
    """The WordNet 3.0 hierarchy of CIFAR-100's 100 fine classes.

    Classes in the label order of `keras_simloss.datasets.cifar100`; the
    synset chosen for each name (e.g. `mouse.n.01`, the rodent;
    `goldfish.n.01` for `aquarium_fish`, which WordNet lacks) is tabled,
    with reasons, in `make_wordnet_hierarchies.CIFAR100_SYNSETS`.

    Returns:
        A `WordNetHierarchy` with `ancestors` of shape `(16, 100)`.
    """
    return _hierarchy("cifar100")


def imagenet_hierarchy():
    """The WordNet 3.0 hierarchy of ImageNet-1k's 1000 classes.

    Classes in the usual label order (the sorted WordNet ids of timm's
    `imagenet_synsets.txt`, `n01440764` first), each the synset its id
    names (`"n"` and its 8-digit noun offset).

    Returns:
        A `WordNetHierarchy` with `ancestors` of shape `(17, 1000)`.
    """
    return _hierarchy("imagenet")
