"""`from_hierarchy` (`similarity/hierarchy.py`)."""

import numpy as np

from keras_simloss import similarity
from keras_simloss.datasets import cifar100


def test_hierarchy_config_is_linear_in_classes():
    sim = similarity.from_hierarchy(cifar100.FINE_TO_COARSE, 0.5)
    config = sim.get_config()
    assert len(config["ancestors"][0]) == 100 and config["similarities"] == [0.5]


def test_cifar100_hierarchy_puts_rose_near_tulip_not_truck():
    names = cifar100.FINE_LABEL_NAMES
    s = np.asarray(similarity.from_hierarchy(cifar100.FINE_TO_COARSE, 0.5))
    assert s[names.index("rose"), names.index("tulip")] == 0.5
    assert s[names.index("rose"), names.index("pickup_truck")] == 0.0
