"""Class names, hierarchies and loaders for the data sets of the examples."""

from keras_simloss.datasets import cifar100, faces, synthetic, wordnet
from keras_simloss.datasets.word_vectors import (
    ClassVectors,
    load_glove_6b_50d,
    load_word_vectors,
)
from keras_simloss.datasets.wordnet import (
    WordNetHierarchy,
    cifar100_hierarchy,
    imagenet_hierarchy,
)

__all__ = [
    "ClassVectors",
    "WordNetHierarchy",
    "cifar100",
    "cifar100_hierarchy",
    "faces",
    "imagenet_hierarchy",
    "load_glove_6b_50d",
    "load_word_vectors",
    "synthetic",
    "wordnet",
]
