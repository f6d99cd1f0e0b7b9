"""Atomic file writes: a reader never sees half a file.

Every writer goes through `atomic_path`: the content is written to a
temporary file in the target's directory, flushed to disk, given the mode a
plain `open()` would give it (0666 less the process umask; `mkstemp` alone
makes 0600 files that TensorBoard, a serving container or a colleague
running as another user cannot read), then renamed over the target. On any
error the temporary file is removed and the target is left as it was.

`atomic_directory` does the same for a directory of files (a checkpoint, a
SavedModel version): written to a hidden directory beside the target,
renamed into place when complete, an existing target moved aside first
when it is replaced.
"""

import contextlib
import json
import os
import secrets
import shutil
import socket
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


def _hidden_prefix(name, kind):
    """Prefix of the hidden directories beside `name`: kind "tmp" (being
    written) or "old" (being replaced). The host and the writer's pid
    follow, so that a later writer can tell a dead writer's leftovers from
    a live one's."""
    return f".{name}.{kind}-{socket.gethostname()}-"


def _hidden_dir(parent, name, kind):
    prefix = _hidden_prefix(name, kind)
    return os.path.join(parent, f"{prefix}{os.getpid()}-{secrets.token_hex(4)}")


def _process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, run by another user
        return True
    return True


def _remove_stale_hidden_dirs(parent, name):
    """Removes hidden directories of `name` left by dead processes on this
    host (a writer killed mid-write). Another host's cannot be judged: its
    pids mean nothing here."""
    for kind in ("tmp", "old"):
        prefix = _hidden_prefix(name, kind)
        for entry in os.listdir(parent):
            if not entry.startswith(prefix):
                continue
            pid = entry[len(prefix) :].split("-", 1)[0]
            if pid.isdigit() and not _process_alive(int(pid)):
                shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _fsync_tree(directory):
    """Flushes every file and directory under `directory` to disk."""
    for root, _, files in os.walk(directory):
        for name in files:
            fsync_path(os.path.join(root, name))
        fsync_path(root)


@contextlib.contextmanager
def atomic_directory(path, overwrite=False):
    """Yields a new, empty hidden directory renamed to `path` on success.

    The block fills the directory by any means; when it returns, the
    directory's files are flushed to disk and it is renamed to `path` (its
    parent directory flushed too), so a reader sees either no `path`, the
    old one, or the complete new one. Replacing an existing `path`
    (`overwrite=True`) renames the old one aside first and removes it
    after: for a moment there is no `path`. When the block raises, the
    hidden directory is removed and `path` is untouched.

    The hidden directories are `.<name>.tmp-<host>-<pid>-<random>` (and
    `.old-` for a replaced one) beside `path`; a writer killed before the
    rename leaves one, which the next `atomic_directory` of the same `path`
    removes once that process is gone.

    Args:
        path: the directory to create; its parent is created if missing.
        overwrite: replace an existing `path`.

    Yields:
        The hidden directory's path (created, with the mode `os.mkdir`
        gives: 0777 less the umask).

    Raises:
        FileExistsError: `path` exists and `overwrite` is False; checked
            before the block runs and again before the rename (another
            writer may have made it meanwhile).
        NotADirectoryError: `path` exists and is not a directory.

    Example:

    >>> import tempfile, os
    >>> target = os.path.join(tempfile.mkdtemp(), "checkpoint")
    >>> with atomic_directory(target) as temp:
    ...     with open(os.path.join(temp, "a.txt"), "w") as f:
    ...         _ = f.write("hello")
    >>> os.listdir(target)
    ['a.txt']
    """
    path = os.path.abspath(os.fspath(path))
    parent, name = os.path.split(path)
    _check_directory_target(path, overwrite)
    os.makedirs(parent, exist_ok=True)
    _remove_stale_hidden_dirs(parent, name)
    temp = _hidden_dir(parent, name, "tmp")
    # os.mkdir, not tempfile.mkdtemp: mkdtemp's 0700 would survive the
    # rename and lock out readers running as another user.
    os.mkdir(temp)
    try:
        yield temp
        _fsync_tree(temp)
        _check_directory_target(path, overwrite)
        old = None
        if os.path.lexists(path):
            old = _hidden_dir(parent, name, "old")
            os.rename(path, old)
        try:
            os.rename(temp, path)
        except BaseException:
            if old is not None:  # put the old one back
                os.rename(old, path)
            raise
        fsync_path(parent)  # the renames themselves reach the disk
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if os.path.lexists(temp):
            shutil.rmtree(temp, ignore_errors=True)


def _check_directory_target(path, overwrite):
    if os.path.lexists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"{path} exists and is not a directory")
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(
            f"{path} exists; pass overwrite=True to replace it"
        )
