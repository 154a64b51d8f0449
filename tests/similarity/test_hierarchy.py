"""`from_hierarchy` (`similarity/hierarchy.py`)."""

import numpy as np
import pytest
from keras import ops

from keras_simloss import similarity
from keras_simloss.datasets import cifar100
from tests.similarity.cases import hierarchy_reference


def test_hierarchy_config_is_linear_in_classes():
    sim = similarity.from_hierarchy(cifar100.FINE_TO_COARSE, 0.5)
    config = sim.get_config()
    assert len(config["ancestors"][0]) == 100 and config["similarities"] == [0.5]


def test_cifar100_hierarchy_puts_rose_near_tulip_not_truck():
    names = cifar100.FINE_LABEL_NAMES
    s = np.asarray(similarity.from_hierarchy(cifar100.FINE_TO_COARSE, 0.5))
    assert s[names.index("rose"), names.index("tulip")] == 0.5
    assert s[names.index("rose"), names.index("pickup_truck")] == 0.0


@pytest.mark.parametrize("dense_table", [True, False], ids=["table", "on-the-fly"])
def test_64_bit_ids_stay_distinct_on_every_path(dense_table):
    # 2**32 and 0 are different superclasses; a cast to int32 would merge
    # them (2**32 wraps to 0), so one similarity would give two answers.
    ids = np.array([0, 2**32, 1, 0])
    sim = similarity.from_hierarchy(ids, 0.5)
    if not dense_table:
        sim.dense_table_max_classes = 1
    assert sim.uses_dense_table is dense_table
    expected = hierarchy_reference(ids, [0.5])  # only classes 0 and 3 share
    labels = np.arange(4, dtype="int32")
    np.testing.assert_array_equal(ops.convert_to_numpy(sim.rows(labels)), expected)
    classes = np.array([1, 0, 3, 0], dtype="int32")
    np.testing.assert_array_equal(
        ops.convert_to_numpy(sim.pairs(labels, classes)), expected[labels, classes]
    )
    assert sim.get_config()["ancestors"] == [ids.tolist()]  # the ids as given
