"""Class names, hierarchies and loaders for the data sets of the examples."""

from keras_simloss.datasets import cifar100, faces, synthetic
from keras_simloss.datasets.word_vectors import ClassVectors, load_word_vectors

__all__ = ["ClassVectors", "cifar100", "faces", "load_word_vectors", "synthetic"]
