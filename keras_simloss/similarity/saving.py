"""Saving a similarity: constructor arguments in the config, data in the archive.

A similarity's config holds its constructor arguments (`_arguments`). Array
arguments listed in `_array_arguments` with more than `config_max_entries`
numbers in all (an embedding table, neighbour lists, a hand-made matrix) are
kept out of the config, which then holds only their shapes and a content
hash (a few hundred bytes whatever `C`); they are written as binary arrays
into the `.keras` archive by `save_own_variables`, which Keras calls through
`SimLoss` (and `MistakeSeverity`).

`from_config` of such a config gives a similarity whose arrays are still
missing ("pending"). `load_own_variables` (called by
`keras.models.load_model`) supplies them; within one process, so does any
live similarity with the same arrays, matched by the content hash, on first
use, so that a `MistakeSeverity` sharing the loss's similarity is restored
with it (Keras saves no state of compiled metrics). Every live similarity
with its arrays counts (an original, its copies, a loaded model), so the
death of one never strands a config made from another.

A legacy `.h5` file has no place for such arrays: `get_config` refuses to
write it rather than save a model that loads without its similarity.
"""

import hashlib
import weakref

import numpy as np

from keras_simloss import _backend

# The config key that marks arrays stored in the archive; its value is their
# content hash.
_ARCHIVE_KEY = "arrays_in_archive"

# Similarities whose arrays are at hand: content hash -> every live one
# (weakly held). A single entry per hash would be taken over by a copy, e.g.
# the one `copy.deepcopy` of a loss loads, and vanish when that copy dies.
_WITH_ARRAYS = {}


def _register(fingerprint, similarity):
    holders = _WITH_ARRAYS.get(fingerprint)
    if holders is None:
        # Forget the hashes whose similarities are all gone (a few strings).
        for stale in [key for key, live in _WITH_ARRAYS.items() if not live]:
            del _WITH_ARRAYS[stale]
        holders = _WITH_ARRAYS[fingerprint] = weakref.WeakSet()
    holders.add(similarity)


def _holder(fingerprint):
    """A live similarity whose arrays have `fingerprint`, or `None`."""
    for similarity in list(_WITH_ARRAYS.get(fingerprint, ())):
        if not similarity._arrays_pending:
            return similarity
    return None


class ArraySaving:
    """Config and archive handling for a similarity (see the module).

    A subclass defines `_arguments()` (the constructor arguments, arrays as
    NumPy arrays) and `_array_arguments` (the names of the array arguments
    that may go into the archive), and its `__init__` validates the
    arguments again when a pending similarity is completed.
    """

    # Array state with more numbers than this is saved as binary arrays in
    # the `.keras` archive rather than as JSON numbers in the config.
    config_max_entries = 256

    # The array arguments of the constructor that go into the archive when
    # large. Arrays not listed (e.g. hierarchy ids, `O(C)` integers that a
    # metric must be able to load without a loss) always stay in the config.
    _array_arguments = ()

    def _arguments(self):
        """The constructor arguments (arrays as NumPy arrays)."""
        raise NotImplementedError

    def get_config(self):
        """The constructor arguments; large arrays as placeholders (above)."""
        arguments = self._arguments()
        arrays = self._archived_arrays(arguments)
        config = {}
        for name, value in arguments.items():
            if name in arrays:
                config[name] = {"shape": list(value.shape), "dtype": str(value.dtype)}
            elif isinstance(value, np.ndarray):
                config[name] = value.tolist()
            else:
                config[name] = value
        if arrays:
            if _backend.saving_legacy_h5():
                sizes = ", ".join(
                    f"`{name}` of shape {tuple(array.shape)}"
                    for name, array in arrays.items()
                )
                raise ValueError(
                    f"Cannot save this {type(self).__name__} in the legacy "
                    f"`.h5` format: its arrays ({sizes}) are saved only in a "
                    "`.keras` archive, and an `.h5` file would load without "
                    "them. Expected `model.save(path)` with a path ending in "
                    "`.keras`. Received: a legacy `.h5` save that includes "
                    "the compiled loss and metrics. To keep `.h5`, pass "
                    "`include_optimizer=False` (no compile config; compile "
                    "again after loading) or save the weights alone with "
                    "`model.save_weights(...)`."
                )
            config[_ARCHIVE_KEY] = self._fingerprint(arrays)
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        fingerprint = config.pop(_ARCHIVE_KEY, None)
        if fingerprint is None:
            return cls(**config)  # everything in the config (or an old config)
        # The arrays are in a `.keras` archive: `load_own_variables` fills in.
        similarity = cls.__new__(cls)
        similarity._pending = (config, fingerprint)
        similarity.num_classes = config[cls._array_arguments[0]]["shape"][0]
        # The scalar arguments are known already (e.g. `keep_rows`, which a
        # class default would otherwise answer); `__init__` validates them
        # with the arrays.
        for name, value in config.items():
            if name not in cls._array_arguments:
                setattr(similarity, name, value)
        return similarity

    def save_own_variables(self, store):
        """Writes the arrays that the config leaves out into a Keras store.

        Called by `SimLoss.save_own_variables` (and `MistakeSeverity`'s) when
        Keras saves a `.keras` file; `store` takes NumPy arrays by name.
        """
        if not self._array_arguments:
            return  # the config holds everything
        for name, array in self._archived_arrays(self._arguments()).items():
            store[name] = array

    def load_own_variables(self, store):
        """Reads the arrays that the config left out from a Keras store.

        Does nothing when the config held everything (small state, or a
        config saved before arrays went into the archive).
        """
        pending = self.__dict__.get("_pending")
        if pending is None:
            return
        config, fingerprint = pending
        arrays = {}
        for name in self._array_arguments:
            if not isinstance(config.get(name), dict):
                continue
            if name not in store:
                # Keras retries a loss that failed to load from its other
                # path (`_compile_loss/_user_loss`, an empty store) and shows
                # only the last error: repeat the first diagnosis.
                diagnosis = self.__dict__.get("_load_failure")
                if diagnosis is not None:
                    raise ValueError(diagnosis)
                raise ValueError(
                    f"The saved state of this {type(self).__name__} has no "
                    f"array `{name}`: the `.keras` archive does not match its "
                    f"config. Received arrays: {sorted(store.keys())}"
                )
            arrays[name] = np.asarray(store[name])
        received = self._fingerprint(arrays)
        if received != fingerprint:
            self._load_failure = (
                f"The arrays saved for this {type(self).__name__} do not match "
                "the content hash in its config: the `.keras` archive is "
                "damaged or mixes two saves. Expected arrays with hash "
                f"{fingerprint}. Received: arrays "
                f"{', '.join(f'`{name}`' for name in sorted(arrays))} with "
                f"hash {received}."
            )
            raise ValueError(self._load_failure)
        self._fill(arrays)

    @property
    def _arrays_pending(self):
        """Whether this similarity still waits for its archived arrays."""
        return "_pending" in self.__dict__

    def _archived_arrays(self, arguments):
        """The array arguments that go into the archive: all, when large."""
        arrays = {name: arguments[name] for name in self._array_arguments}
        if sum(array.size for array in arrays.values()) > self.config_max_entries:
            return arrays
        return {}

    def _fingerprint(self, arrays):
        """A content hash of `arrays` (this similarity's own ones are hashed
        once, and it is registered under the hash)."""
        own = not self._arrays_pending
        if own and "_own_fingerprint" in self.__dict__:
            return self._own_fingerprint  # the arrays never change
        digest = hashlib.blake2b(type(self).__name__.encode(), digest_size=16)
        for name in sorted(arrays):
            array = np.ascontiguousarray(arrays[name])
            digest.update(f"{name}:{array.dtype.str}:{array.shape}".encode())
            digest.update(memoryview(array).cast("B"))
        fingerprint = digest.hexdigest()
        if own:
            self._own_fingerprint = fingerprint
            _register(fingerprint, self)
        return fingerprint

    def _fill(self, arrays):
        """Completes a similarity made by `from_config` with its arrays."""
        config, fingerprint = self.__dict__.pop("_pending")
        self.__dict__.pop("_load_failure", None)
        self.__init__(**{**config, **arrays})  # validates them, as on creation
        _register(fingerprint, self)

    def __getstate__(self):
        # A copy (or pickle) leaves out the cached backend tensors: they may
        # be TensorFlow variables, and the copy makes its own on first use,
        # independent of the original's.
        state = dict(self.__dict__)
        state.pop("_tensors", None)
        state.pop("_reading", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if not self._arrays_pending and self._array_arguments:
            # A copy holds the arrays too: registered under their hash now,
            # so that it stands in for the original once that is gone.
            arrays = self._archived_arrays(self._arguments())
            if arrays:
                self._fingerprint(arrays)

    def __getattr__(self, name):
        # Only reached when an attribute is missing: the arrays of a
        # similarity made from a config whose arrays are in an archive.
        pending = self.__dict__.get("_pending")
        if pending is None or name.startswith("__"):
            raise AttributeError(
                f"{type(self).__name__!r} object has no attribute {name!r}"
            )
        config, fingerprint = pending
        twin = _holder(fingerprint)
        if twin is None:
            raise ValueError(
                f"This {type(self).__name__} was made from a config whose "
                "arrays are stored in a `.keras` archive, and they were never "
                "loaded. Load the model with `keras.models.load_model(path)` "
                "(its SimLoss restores them; a metric restores them only when "
                "it shares the loss's similarity, since Keras saves no state "
                "of compiled metrics), or build the similarity again."
            )
        self._fill({name: getattr(twin, name) for name in self._array_arguments})
        return getattr(self, name)


class SimilarityHolder:
    """Mixin of the Keras objects (losses, metrics, layers) that hold a
    similarity in `self.similarity`: rebuilt from its config, its large
    arrays (if any) saved into and restored from the `.keras` archive."""

    @classmethod
    def from_config(cls, config):
        from keras_simloss.similarity.matrix import get

        config = dict(config)
        config["similarity"] = get(config["similarity"])
        return cls(**config)

    def save_own_variables(self, store):
        """Saves the similarity's large arrays (if any) into the `.keras` file."""
        self.similarity.save_own_variables(store)

    def load_own_variables(self, store):
        """Restores the similarity's large arrays from the `.keras` file."""
        self.similarity.load_own_variables(store)
