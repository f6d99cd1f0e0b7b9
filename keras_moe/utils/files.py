"""Atomic file writes: a reader never sees half a file.

Every writer goes through `atomic_path`: the content is written to a
temporary file in the target's directory, flushed to disk, given the mode a
plain `open()` would give it (0666 less the process umask; `mkstemp` alone
makes 0600 files that TensorBoard, a serving container or a colleague
running as another user cannot read), then renamed over the target. On any
error the temporary file is removed and the target is left as it was.
"""

import contextlib
import json
import os
import tempfile

TEMP_PREFIX = ".tmp-"


def _umask():
    # os.umask can only be read by setting it; set it straight back.
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_path(path):
    """Flushes a file's (or a directory's) data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path, suffix=None):
    """Yields a temporary path next to `path`, renamed to `path` on success.

    The block writes the temporary file by any means (`open`, `model.save`,
    `figure.savefig`); when it returns, the file is fsynced, made readable
    as `open()` would make it, and renamed over `path`. When it raises, the
    temporary file is removed and `path` is untouched.

    Args:
        path: the final file path; its directory is created if missing.
        suffix: the temporary file's suffix (default: `path`'s extension,
            which writers such as `model.save` check).

    Example:

    >>> import tempfile, os
    >>> target = os.path.join(tempfile.mkdtemp(), "a.txt")
    >>> with atomic_path(target) as temp:
    ...     with open(temp, "w") as f:
    ...         _ = f.write("hello")
    >>> open(target).read()
    'hello'
    """
    path = os.path.abspath(os.fspath(path))
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    if suffix is None:
        suffix = os.path.splitext(path)[1]
    handle, temp = tempfile.mkstemp(
        dir=directory, prefix=TEMP_PREFIX, suffix=suffix
    )
    os.close(handle)
    try:
        yield temp
        fsync_path(temp)
        os.chmod(temp, 0o666 & ~_umask())
        os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.remove(temp)


def write_bytes(path, data):
    """Writes `data` (bytes) to `path` atomically; returns the path."""
    with atomic_path(path) as temp:
        with open(temp, "wb") as f:
            f.write(data)
    return os.fspath(path)


def write_text(path, text):
    """Writes `text` to `path` atomically, UTF-8; returns the path."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path, value):
    """Writes `value` as indented, key-sorted JSON to `path` atomically.

    Numbers NumPy returns (float32, int64) are written as floats.
    """
    text = json.dumps(value, indent=2, sort_keys=True, default=float)
    return write_text(path, text + "\n")


def save_keras(model, path):
    """`model.save(path)` through a temporary `.keras` file; returns the
    absolute path."""
    path = os.path.abspath(os.fspath(path))
    with atomic_path(path, suffix=".keras") as temp:
        model.save(temp)
    return path
