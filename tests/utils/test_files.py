"""Atomic writes of keras_moe.utils.files: contents, file modes, what an
error leaves behind, and the directory variant's replace semantics."""

import contextlib
import json
import os
import socket
import stat
import subprocess
import sys

import pytest

from keras_moe.utils import files


@contextlib.contextmanager
def _umask(mask):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def _dead_pid():
    """The pid of a process that has exited (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_writers_write_and_return_the_path(tmp_path):
    assert files.write_bytes(tmp_path / "a.bin", b"\x00\x01") == os.fspath(
        tmp_path / "a.bin"
    )
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    files.write_text(tmp_path / "sub" / "b.txt", "héllo\n")  # makes sub/
    assert (tmp_path / "sub" / "b.txt").read_text(encoding="utf-8") == (
        "héllo\n"
    )
    files.write_json(tmp_path / "c.json", {"b": 1, "a": [0.5]})
    text = (tmp_path / "c.json").read_text()
    assert text.endswith("\n") and text.index('"a"') < text.index('"b"')
    assert json.loads(text) == {"a": [0.5], "b": 1}
    assert sorted(os.listdir(tmp_path)) == ["a.bin", "c.json", "sub"]


def test_write_json_writes_numpy_numbers_as_floats(tmp_path):
    np = pytest.importorskip("numpy")
    files.write_json(tmp_path / "n.json", {"x": np.float32(0.5)})
    assert json.loads((tmp_path / "n.json").read_text()) == {"x": 0.5}


def test_new_files_get_the_mode_open_gives_under_umask_022(tmp_path):
    with _umask(0o022):
        files.write_text(tmp_path / "a.txt", "x")
        with open(tmp_path / "plain.txt", "w") as f:
            f.write("x")
    assert _mode(tmp_path / "a.txt") == 0o644
    assert _mode(tmp_path / "a.txt") == _mode(tmp_path / "plain.txt")
    with _umask(0o077):
        files.write_text(tmp_path / "private.txt", "x")
    assert _mode(tmp_path / "private.txt") == 0o600


def test_a_failing_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "results.csv"
    files.write_text(path, "old\n")
    with pytest.raises(RuntimeError, match="interrupted"):
        with files.atomic_path(path) as temp:
            assert os.path.dirname(temp) == os.fspath(tmp_path)
            assert os.path.basename(temp).startswith(files.TEMP_PREFIX)
            with open(temp, "w") as f:
                f.write("half")
            raise RuntimeError("interrupted")
    assert path.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["results.csv"]


def test_atomic_path_keeps_the_extension_unless_told(tmp_path):
    with files.atomic_path(tmp_path / "model.keras") as temp:
        assert temp.endswith(".keras")
        open(temp, "w").close()
    with files.atomic_path(
        tmp_path / "c.weights.h5", suffix=".weights.h5"
    ) as t:
        assert t.endswith(".weights.h5")
        open(t, "w").close()
    assert sorted(os.listdir(tmp_path)) == ["c.weights.h5", "model.keras"]


def test_fsync_path_takes_files_and_directories(tmp_path):
    files.write_text(tmp_path / "a.txt", "x")
    files.fsync_path(tmp_path / "a.txt")
    files.fsync_path(tmp_path)


# --------------------------------------------------------------------------
# atomic_directory.


def _write_dir(path, text, overwrite=False):
    with files.atomic_directory(path, overwrite=overwrite) as temp:
        assert os.listdir(temp) == []
        with open(os.path.join(temp, "a.txt"), "w") as f:
            f.write(text)
        os.mkdir(os.path.join(temp, "sub"))
        with open(os.path.join(temp, "sub", "b.txt"), "w") as f:
            f.write(text)


def test_atomic_directory_writes_a_readable_directory(tmp_path):
    target = tmp_path / "parent" / "ckpt"  # the parent is made too
    with _umask(0o022):
        _write_dir(target, "one")
    assert (target / "a.txt").read_text() == "one"
    assert (target / "sub" / "b.txt").read_text() == "one"
    # os.mkdir's mode, not mkdtemp's 0700.
    assert _mode(target) == 0o755
    assert os.listdir(tmp_path / "parent") == ["ckpt"]


def test_atomic_directory_refuses_an_existing_target_without_overwrite(
    tmp_path,
):
    target = tmp_path / "ckpt"
    _write_dir(target, "one")
    ran = []
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        with files.atomic_directory(target):
            ran.append(True)
    assert not ran  # refused before any work
    assert (target / "a.txt").read_text() == "one"
    assert os.listdir(tmp_path) == ["ckpt"]


def test_atomic_directory_overwrite_replaces_the_whole_directory(tmp_path):
    target = tmp_path / "ckpt"
    _write_dir(target, "one")
    (target / "extra.txt").write_text("old only")
    _write_dir(target, "two", overwrite=True)
    assert sorted(os.listdir(target)) == ["a.txt", "sub"]
    assert (target / "a.txt").read_text() == "two"
    assert os.listdir(tmp_path) == ["ckpt"]  # the old one is gone too


def test_atomic_directory_error_leaves_the_old_one_and_no_hidden_dir(
    tmp_path,
):
    target = tmp_path / "ckpt"
    _write_dir(target, "one")
    with pytest.raises(RuntimeError, match="disk full"):
        with files.atomic_directory(target, overwrite=True) as temp:
            with open(os.path.join(temp, "a.txt"), "w") as f:
                f.write("half")
            raise RuntimeError("disk full")
    assert (target / "a.txt").read_text() == "one"
    assert os.listdir(tmp_path) == ["ckpt"]
    with pytest.raises(RuntimeError):
        with files.atomic_directory(tmp_path / "new"):
            raise RuntimeError("before anything was written")
    assert os.listdir(tmp_path) == ["ckpt"]


def test_atomic_directory_rechecks_the_target_before_the_rename(tmp_path):
    target = tmp_path / "ckpt"
    with pytest.raises(FileExistsError):
        with files.atomic_directory(target):
            target.mkdir()  # another writer got there first
            (target / "theirs.txt").write_text("x")
    assert os.listdir(target) == ["theirs.txt"]
    assert os.listdir(tmp_path) == ["ckpt"]


def test_atomic_directory_refuses_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    for overwrite in (False, True):
        with pytest.raises(NotADirectoryError, match="not a directory"):
            with files.atomic_directory(tmp_path / "file", overwrite):
                pass
    assert (tmp_path / "file").read_text() == "x"


def test_atomic_directory_removes_dead_writers_leftovers_only(tmp_path):
    host = socket.gethostname()
    dead, alive = _dead_pid(), os.getpid()
    stale = [
        tmp_path / f".ckpt.tmp-{host}-{dead}-0000",
        tmp_path / f".ckpt.old-{host}-{dead}-0001",
    ]
    kept = [
        tmp_path / f".ckpt.tmp-{host}-{alive}-0002",  # a live writer's
        tmp_path / f".ckpt.tmp-otherhost-{dead}-0003",  # another host's
        tmp_path / f".other.tmp-{host}-{dead}-0004",  # another target's
    ]
    for directory in stale + kept:
        directory.mkdir()
        (directory / "x").write_text("x")
    _write_dir(tmp_path / "ckpt", "one")
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["ckpt"] + [directory.name for directory in kept]
    )


def test_paths_with_a_scheme_go_through_gfile():
    # TensorFlow's in-memory file system stands in for gs:// and s3://.
    import keras
    import tensorflow as tf

    base = "ram://keras_moe_files_test/out"
    assert files.is_url(base) and not files.is_url("/tmp/x")
    assert files.join(base, "a", "b.json") == base + "/a/b.json"
    assert files.absolute(base) == base
    files.makedirs(base + "/logs")
    assert tf.io.gfile.isdir(base + "/logs")
    files.write_json(base + "/a/b.json", {"x": 1})
    assert json.loads(files.read_text(base + "/a/b.json")) == {"x": 1}
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3)])
    path = files.save_keras(model, base + "/model.keras")
    assert path == base + "/model.keras"
    loaded = keras.saving.load_model(path)
    assert loaded.layers[0].units == 3
    with files.atomic_directory(base + "/dir") as temp:
        assert not files.is_url(temp)  # staged on local disk
        os.makedirs(os.path.join(temp, "sub"))
        for name in ("sub/big.bin", "saved_model.pb"):
            with open(os.path.join(temp, name), "wb") as f:
                f.write(b"x" * (10 if name.endswith(".pb") else 100))
    assert files.exists(base + "/dir/sub/big.bin")
    assert files.exists(base + "/dir/saved_model.pb")
    with pytest.raises(FileExistsError):
        with files.atomic_directory(base + "/dir"):
            pass
    with files.atomic_directory(base + "/dir", overwrite=True) as temp:
        with open(os.path.join(temp, "only.txt"), "w") as f:
            f.write("new")
    assert tf.io.gfile.listdir(base + "/dir") == ["only.txt"]
    # A failing block leaves the target as it was.
    with pytest.raises(RuntimeError):
        with files.atomic_directory(base + "/dir", overwrite=True):
            raise RuntimeError("disk full")
    assert files.read_text(base + "/dir/only.txt") == "new"
    files.remove_tree("ram://keras_moe_files_test")
    assert not files.exists(base)


def test_upload_order_puts_saved_model_pb_last(tmp_path):
    for name, size in (("saved_model.pb", 500), ("a.txt", 1), ("v/d", 50)):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x" * size)
    order = [name for name, _ in files._upload_order(str(tmp_path))]
    assert order == ["v/d", "a.txt", "saved_model.pb"]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))
