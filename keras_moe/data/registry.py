"""Preparing and loading the embedded TFDS datasets, offline.

`prepare(name)` builds one of `DATASETS` into a TFDS data directory; it is
idempotent (a prepared version is reused) and atomic (TFDS writes into a
temporary directory renamed on success, and an exclusive file lock keeps
two processes from building the same data directory at once). `load(name,
split)` reads a split as a `tf.data.Dataset` of feature dicts, preparing one
of `DATASETS` first if needed; any other dataset already prepared in the
data directory is read from its files, never downloaded.
"""

import contextlib
import io
import os
import re
import time

import tensorflow_datasets as tfds
from absl import logging

from keras_moe.data.digits import ComposedDigits
from keras_moe.data.digits import Digits
from keras_moe.data.text import NumberWords
from keras_moe.data.text import PydocCorpus

DATA_DIR_ENV = "KERAS_MOE_DATA_DIR"
_BUILDERS = {
    "digits": Digits,
    "composed_digits": ComposedDigits,
    "number_words": NumberWords,
    "pydoc_corpus": PydocCorpus,
}
DATASETS = tuple(_BUILDERS)
# Split names of DATASETS, known before anything is built.
SPLITS = {
    "digits": ("train", "test"),
    "composed_digits": ("train", "test"),
    "number_words": ("train", "validation", "test"),
    "pydoc_corpus": ("train", "validation"),
}
_LOCK_NAME = ".keras_moe_prepare.lock"
_VERSION = re.compile(r"^\d+\.\d+\.\d+$")


def default_data_dir():
    """Returns $KERAS_MOE_DATA_DIR or ~/.cache/keras_moe/tensorflow_datasets."""
    return os.environ.get(DATA_DIR_ENV) or os.path.join(
        os.path.expanduser("~"), ".cache", "keras_moe", "tensorflow_datasets"
    )


def resolve_data_dir(data_dir=None):
    """Returns `data_dir` as an absolute path, `default_data_dir()` if None."""
    return os.path.abspath(os.path.expanduser(data_dir or default_data_dir()))


@contextlib.contextmanager
def data_dir_lock(data_dir):
    """Holds an exclusive lock on `data_dir` (created if missing).

    Args:
        data_dir: a resolved data directory.
    """
    os.makedirs(data_dir, exist_ok=True)
    with open(os.path.join(data_dir, _LOCK_NAME), "a+b") as lock:
        _lock_file(lock, True)
        try:
            yield
        finally:
            _lock_file(lock, False)


def _lock_file(file, acquire):
    """Takes (or releases) an exclusive lock on an open file: `fcntl` on
    POSIX, `msvcrt` on Windows (both block until the lock is free)."""
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        file.seek(0)
        msvcrt.locking(
            file.fileno(), msvcrt.LK_LOCK if acquire else msvcrt.LK_UNLCK, 1
        )
        return
    fcntl.flock(file, fcntl.LOCK_EX if acquire else fcntl.LOCK_UN)


def _check_name(name):
    if not isinstance(name, str) or name not in _BUILDERS:
        raise ValueError(
            f"Unknown dataset {name!r}; keras_moe builds {list(DATASETS)}"
        )


def prepare(name, data_dir=None):
    """Builds one of `DATASETS` into `data_dir`, unless already built.

    Idempotent: a prepared version is reused as is. Atomic: TFDS writes into
    a temporary directory renamed when complete, under an exclusive lock on
    `data_dir` that other processes preparing there wait for. Nothing is
    downloaded. Progress bars go to stderr (`tfds.disable_progress_bar()`
    hides them); TFDS's printed messages go to the log.

    Args:
        name: a name in `DATASETS`.
        data_dir: TFDS data directory; `default_data_dir()` if None.

    Returns:
        The prepared `tfds.core.DatasetBuilder`.

    Example:

    >>> import tempfile
    >>> builder = prepare("digits", tempfile.mkdtemp())
    >>> builder.info.splits["test"].num_examples
    360
    """
    _check_name(name)
    data_dir = resolve_data_dir(data_dir)
    with data_dir_lock(data_dir):
        builder = _BUILDERS[name](data_dir=data_dir)
        if not builder.is_prepared():
            start = time.perf_counter()
            # TFDS prints its messages; send them to the log instead.
            with contextlib.redirect_stdout(io.StringIO()) as printed:
                builder.download_and_prepare(
                    download_config=tfds.download.DownloadConfig(
                        try_download_gcs=False
                    )
                )
            logging.info(
                "Prepared %s in %s (%.1f s): %s",
                name,
                builder.data_dir,
                time.perf_counter() - start,
                " ".join(printed.getvalue().split()),
            )
    return builder


def _prepared_versions(data_dir):
    """Maps each dataset prepared in `data_dir` to its newest version dir.

    Names are `dataset` or `dataset/config`, as in `tfds.load`.
    """
    found = {}
    if not os.path.isdir(data_dir):
        return found
    for root, dirs, files in os.walk(data_dir):
        # Skip hidden directories and TFDS's download cache.
        dirs[:] = [
            d
            for d in dirs
            if not d.startswith(".")
            and not (root == data_dir and d == "downloads")
        ]
        version = os.path.basename(root)
        if "dataset_info.json" not in files or not _VERSION.match(version):
            continue
        name = os.path.relpath(os.path.dirname(root), data_dir)
        key = tuple(int(part) for part in version.split("."))
        if name not in found or key > found[name][0]:
            found[name] = (key, root)
        dirs[:] = []
    return {name: path for name, (_, path) in found.items()}


def available(data_dir=None):
    """Returns the sorted names `load` accepts for `data_dir`.

    Args:
        data_dir: TFDS data directory; `default_data_dir()` if None.

    Returns:
        `DATASETS` and every other dataset prepared in `data_dir`.
    """
    data_dir = resolve_data_dir(data_dir)
    return sorted(set(DATASETS) | set(_prepared_versions(data_dir)))


def check_split(name, split, splits):
    """Checks `split` (TFDS syntax: "train", "train[:10%]", "a+b")."""
    if not isinstance(split, str) or not split:
        raise ValueError(
            f"{name} has splits {sorted(splits)}; received split={split!r}"
        )
    for part in split.split("+"):
        base = part.split("[", 1)[0].strip()
        if base not in splits:
            raise ValueError(
                f"{name} has splits {sorted(splits)}; received "
                f"split={split!r}"
            )


def builder(name, data_dir=None):
    """Returns the prepared builder of `name` in `data_dir`.

    One of `DATASETS` is prepared first if needed; any other name must
    already be prepared in `data_dir`.

    Args:
        name: a name in `DATASETS` or a dataset prepared in `data_dir`.
        data_dir: TFDS data directory; `default_data_dir()` if None.
    """
    data_dir = resolve_data_dir(data_dir)
    if name in _BUILDERS:
        return prepare(name, data_dir)
    prepared = _prepared_versions(data_dir)
    if name not in prepared:
        raise ValueError(
            f"Unknown dataset {name!r}: it is not one of keras_moe's "
            f"{list(DATASETS)} and is not prepared in {data_dir} (nothing "
            f"is downloaded). Available: {available(data_dir)}"
        )
    return tfds.builder_from_directory(prepared[name])


def load(name, split, data_dir=None):
    """Returns a split of a dataset as a `tf.data.Dataset` of feature dicts.

    Files are read in a fixed order (no shuffling), so two reads give the
    same sequence.

    Args:
        name: a name in `DATASETS` (prepared if needed) or another dataset
            already prepared in `data_dir`; see `available()`.
        split: a split name of that dataset, or TFDS split syntax on those
            names ("train[:10%]", "train+validation").
        data_dir: TFDS data directory; `default_data_dir()` if None.

    Example:

    >>> import tempfile
    >>> ds = load("digits", "test", tempfile.mkdtemp())
    >>> sorted(next(iter(ds)))
    ['image', 'index', 'label']
    """
    if not isinstance(name, str):
        raise ValueError(f"Dataset name must be a str; received {name!r}")
    if name in SPLITS:  # Checked before anything is built.
        check_split(name, split, SPLITS[name])
    ds_builder = builder(name, data_dir)
    check_split(name, split, ds_builder.info.splits.keys())
    return ds_builder.as_dataset(split=split, shuffle_files=False)
