import builtins

import numpy as np
import pytest

from keras_simloss import similarity
from keras_simloss.datasets import cifar100, load_word_vectors


def test_cifar100_names_are_canonical():
    # The canonical CIFAR-100 label orders are alphabetical.
    assert len(set(cifar100.FINE_LABEL_NAMES)) == 100
    assert list(cifar100.FINE_LABEL_NAMES) == sorted(cifar100.FINE_LABEL_NAMES)
    assert len(cifar100.COARSE_LABEL_NAMES) == 20
    assert list(cifar100.COARSE_LABEL_NAMES) == sorted(cifar100.COARSE_LABEL_NAMES)
    assert np.bincount(cifar100.FINE_TO_COARSE).tolist() == [5] * 20


@pytest.mark.parametrize(
    "fine, coarse",
    [
        ("apple", "fruit_and_vegetables"),
        ("aquarium_fish", "fish"),
        ("rose", "flowers"),
        ("pickup_truck", "vehicles_1"),
        ("tractor", "vehicles_2"),
        ("worm", "non-insect_invertebrates"),
    ],
)
def test_cifar100_fine_to_coarse(fine, coarse):
    label = cifar100.FINE_LABEL_NAMES.index(fine)
    assert cifar100.COARSE_LABEL_NAMES[cifar100.FINE_TO_COARSE[label]] == coarse


def test_paper_subset():
    # SPEC: fine labels 1, 39, 58, 83 are removed; 96 remain, in order.
    assert sorted(cifar100.PAPER_EXCLUDED_CLASSES) == [1, 39, 58, 83]
    assert len(cifar100.PAPER_CLASSES) == 96
    assert cifar100.PAPER_LABEL_NAMES[:3] == ("apple", "baby", "bear")
    mapped = cifar100.to_paper_labels(np.arange(100))
    assert mapped[[1, 39, 58, 83]].tolist() == [-1] * 4
    assert mapped[mapped >= 0].tolist() == list(range(96))
    assert cifar100.PAPER_FINE_TO_COARSE.shape == (96,)
    with pytest.raises(ValueError, match="fine_labels"):
        cifar100.to_paper_labels([100])


VECTORS = {
    "rose": [1.0, 0.1, 0.0],
    "tulip": [0.9, 0.2, 0.0],
    "truck": [0.0, 0.0, 1.0],
    "maple": [0.1, 1.0, 0.0],
    "tree": [0.3, 0.9, 0.1],
}


def _write_text(path, header=True):
    with open(path, "w", encoding="utf-8") as handle:
        if header:
            handle.write(f"{len(VECTORS)} 3\n")
        for word, vector in VECTORS.items():
            handle.write(word + " " + " ".join(str(v) for v in vector) + "\n")
    return path


def _write_binary(path):
    from gensim.models import KeyedVectors

    table = KeyedVectors(vector_size=3)
    table.add_vectors(list(VECTORS), np.array(list(VECTORS.values()), np.float32))
    table.save_word2vec_format(str(path), binary=True)
    return path


@pytest.mark.parametrize("kind", ["word2vec-text", "glove-text", "word2vec-binary"])
def test_load_word_vectors_reads_every_format(tmp_path, kind):
    path = {
        "word2vec-text": lambda: _write_text(tmp_path / "vectors.txt"),
        "glove-text": lambda: _write_text(tmp_path / "glove.txt", header=False),
        "word2vec-binary": lambda: _write_binary(tmp_path / "vectors.bin"),
    }[kind]()
    result = load_word_vectors(path, ["Rose", "truck", "tulip", "unicorn"])
    assert result.names == ("Rose", "truck", "tulip")
    assert result.indices == (0, 1, 2)
    assert result.missing == ("unicorn",)
    np.testing.assert_allclose(
        result.vectors, [VECTORS["rose"], VECTORS["truck"], VECTORS["tulip"]], rtol=1e-6
    )
    sim = np.asarray(similarity.from_embeddings(result.vectors))
    assert sim[0, 2] > 0.9 and sim[0, 1] < 0.1  # rose ~ tulip, rose !~ truck


def test_combine_words_averages_parts(tmp_path):
    path = _write_text(tmp_path / "vectors.txt")
    assert load_word_vectors(path, ["maple_tree", "rose"]).missing == ("maple_tree",)
    result = load_word_vectors(path, ["maple_tree", "rose"], combine_words=True)
    np.testing.assert_allclose(
        result.vectors[0],
        np.mean([VECTORS["maple"], VECTORS["tree"]], axis=0),
        rtol=1e-6,
    )


def test_missing_names_raise_with_their_list(tmp_path):
    path = _write_text(tmp_path / "vectors.txt")
    with pytest.raises(
        ValueError, match=r"2 of 3 class names have no vector.*unicorn, dragon"
    ):
        load_word_vectors(path, ["rose", "unicorn", "dragon"], on_missing="raise")


def test_bad_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="path"):
        load_word_vectors(tmp_path / "nope.txt", ["rose"])
    path = _write_text(tmp_path / "vectors.txt")
    with pytest.raises(ValueError, match="on_missing"):
        load_word_vectors(path, ["rose"], on_missing="ignore")
    with pytest.raises(ValueError, match="class_names"):
        load_word_vectors(path, [])
    broken = tmp_path / "broken.bin"
    broken.write_bytes(b"3 300\nrose \x00\x01")
    with pytest.raises(ValueError, match="Could not read"):
        load_word_vectors(broken, ["rose"])


def test_missing_gensim_gives_an_install_hint(tmp_path, monkeypatch):
    path = _write_text(tmp_path / "vectors.txt")
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("gensim"):
            raise ImportError("No module named 'gensim'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=r"keras-simloss\[vectors\]"):
        load_word_vectors(path, ["rose"])


def _touch_images(folder, names):
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")


def test_afad_loader_on_a_utkface_folder_names_both_layouts(tmp_path):
    from keras_simloss.datasets import faces

    _touch_images(tmp_path, [f"{20 + i}_0_1_2017011600000{i}.jpg" for i in range(3)])
    with pytest.raises(ValueError) as info:
        faces.afad_files(tmp_path)
    message = str(info.value)
    assert "AGE/GENDER/IMAGE.jpg" in message
    assert "Found 3 other image file(s), e.g. '20_0_1_20170116000000.jpg'" in message


def test_utkface_loader_on_an_afad_folder_mentions_the_subfolders(tmp_path):
    from keras_simloss.datasets import faces

    _touch_images(tmp_path, ["15/111/0001.jpg", "16/112/0002.jpg"])
    with pytest.raises(ValueError) as info:
        faces.utkface_files(tmp_path)
    message = str(info.value)
    assert "AGE_GENDER_RACE_DATETIME.jpg" in message
    assert "2 subfolder(s), e.g. '15'" in message and "AGE/GENDER/IMAGE.jpg" in message


def test_word_vector_edge_inputs(tmp_path):
    path = _write_text(tmp_path / "vectors.txt")
    # One string is not a list of names (it would be read letter by letter).
    with pytest.raises(TypeError, match=r"class_names.*not one string.*'cat'"):
        load_word_vectors(path, "cat")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"`path`.*which is empty"):
        load_word_vectors(empty, ["rose"])


def test_face_helpers_reject_empty_and_mismatched_inputs():
    from keras_simloss.datasets import faces

    for bad in (-5, 0, 2, 2.5, True):
        with pytest.raises(ValueError, match=r"num_examples"):
            faces.split_indices(bad)
    assert [len(part) for part in faces.split_indices(10)] == [6, 2, 2]
    with pytest.raises(ValueError, match=r"at least one image path"):
        faces.channel_statistics([])
    with pytest.raises(ValueError, match=r"3 paths and 2 labels"):
        faces.image_dataset(["a.jpg", "b.jpg", "c.jpg"], [0, 1])
