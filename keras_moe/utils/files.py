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

Paths with a scheme (`gs://`, `s3://`, `hdfs://`, TensorFlow's in-memory
`ram://`) go through `tf.io.gfile`: the block writes to a local temporary
file or directory, which is then copied to the target. Object stores have
no rename, so the guarantees there are weaker and stated plainly: a single
file is uploaded as one object (readers see the old object or the new
one, never half of it); a directory's files are copied one by one into the
target with the largest file first and `saved_model.pb` (the file
TF Serving and `tf.saved_model.load` look for) last, so a reader may see
the directory incomplete but not a `saved_model.pb` without its
variables. TF Serving skips a version whose load fails and retries it.
"""

import contextlib
import json
import os
import secrets
import shutil
import socket
import tempfile

TEMP_PREFIX = ".tmp-"


def is_url(path):
    """True for a path with a scheme (`gs://...`, `ram://...`): such paths
    go through `tf.io.gfile`, not the local file system."""
    return "://" in os.fspath(path)


def join(*parts):
    """`os.path.join`, with "/" for paths with a scheme (object stores
    reject Windows separators)."""
    parts = [os.fspath(p) for p in parts]
    if is_url(parts[0]):
        return "/".join(
            [parts[0].rstrip("/")] + [p.strip("/") for p in parts[1:]]
        )
    return os.path.join(*parts)


def absolute(path):
    """The absolute form of a local path; a path with a scheme as is."""
    path = os.fspath(path)
    return path if is_url(path) else os.path.abspath(path)


def _gfile():
    # Imported here: local writes need no TensorFlow.
    import tensorflow as tf

    return tf.io.gfile


def exists(path):
    """Whether `path` exists, local or with a scheme."""
    if is_url(path):
        return _gfile().exists(os.fspath(path))
    return os.path.exists(path)


def makedirs(path):
    """Creates a directory and its parents (no error if it exists), local
    or with a scheme; returns the path."""
    if is_url(path):
        _gfile().makedirs(os.fspath(path))
    else:
        os.makedirs(path, exist_ok=True)
    return os.fspath(path)


def read_text(path):
    """The UTF-8 text of a file, local or with a scheme."""
    if is_url(path):
        with _gfile().GFile(os.fspath(path), "rb") as f:
            return f.read().decode("utf-8")
    with open(path, encoding="utf-8") as f:
        return f.read()


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
    if is_url(path):
        with _remote_path(os.fspath(path), suffix) as temp:
            yield temp
        return
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


@contextlib.contextmanager
def _remote_path(path, suffix):
    """`atomic_path` for a path with a scheme: a local temporary file,
    uploaded as one object when the block returns."""
    gfile = _gfile()
    if suffix is None:
        suffix = os.path.splitext(path)[1]
    local = tempfile.mkdtemp(prefix="keras_moe-")
    try:
        temp = os.path.join(local, "file" + suffix)
        yield temp
        gfile.makedirs(path.rsplit("/", 1)[0])
        gfile.copy(temp, path, overwrite=True)
    finally:
        shutil.rmtree(local, ignore_errors=True)


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
    path = absolute(path)
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
    if is_url(path):
        with _remote_directory(os.fspath(path).rstrip("/"), overwrite) as temp:
            yield temp
        return
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


def _upload_order(local):
    """The files under `local` as (relative path, size), largest first and
    any `saved_model.pb` last: see the module docstring."""
    entries = []
    for root, _, names in os.walk(local):
        for name in names:
            full = os.path.join(root, name)
            relative = os.path.relpath(full, local).replace(os.sep, "/")
            entries.append((relative, os.path.getsize(full)))
    return sorted(
        entries,
        key=lambda e: (e[0].endswith("saved_model.pb"), -e[1], e[0]),
    )


def remove_tree(path):
    """Removes a directory tree, local or with a scheme."""
    if is_url(path):
        _remove_remote_tree(os.fspath(path))
    else:
        shutil.rmtree(path)


def _remove_remote_tree(path):
    """Removes a directory tree through tf.io.gfile: files first, then the
    directories (`rmtree` is not implemented alike by every file system;
    object stores have no directories to remove)."""
    import tensorflow as tf

    gfile = _gfile()
    for directory, _, names in gfile.walk(path, topdown=False):
        for name in names:
            try:
                gfile.remove(join(directory, name))
            except tf.errors.NotFoundError:
                pass  # listed twice: ram:// lists by name prefix
        try:
            gfile.remove(directory)
        except tf.errors.OpError:
            pass  # an implicit directory: gone with its last file
    if gfile.exists(path) and gfile.listdir(path):
        raise OSError(f"could not remove {path}")


@contextlib.contextmanager
def _remote_directory(path, overwrite):
    """`atomic_directory` for a path with a scheme: a local temporary
    directory, copied file by file into `path` when the block returns (see
    the module docstring for what a reader may see meanwhile)."""
    gfile = _gfile()
    if gfile.exists(path):
        if not gfile.isdir(path):
            raise NotADirectoryError(f"{path} exists and is not a directory")
        if not overwrite:
            raise FileExistsError(
                f"{path} exists; pass overwrite=True to replace it"
            )
    local = tempfile.mkdtemp(prefix="keras_moe-")
    try:
        yield local
        if gfile.exists(path):
            if not overwrite:
                raise FileExistsError(
                    f"{path} exists; pass overwrite=True to replace it"
                )
            _remove_remote_tree(path)
        gfile.makedirs(path)
        for root, dirs, _ in os.walk(local):
            for name in dirs:
                relative = os.path.relpath(os.path.join(root, name), local)
                gfile.makedirs(join(path, relative.replace(os.sep, "/")))
        for relative, _ in _upload_order(local):
            gfile.copy(
                os.path.join(local, relative),
                join(path, relative),
                overwrite=True,
            )
    finally:
        shutil.rmtree(local, ignore_errors=True)


def _check_directory_target(path, overwrite):
    if os.path.lexists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"{path} exists and is not a directory")
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(
            f"{path} exists; pass overwrite=True to replace it"
        )
