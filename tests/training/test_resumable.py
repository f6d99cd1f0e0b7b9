"""Crash-safe training: `fit_resumable` killed with SIGKILL, then restarted.

The end-to-end tests run tests/distribution/_train_resumable.py (a tiny MoE
model with dropout and router jitter noise, 3 epochs of 7 steps, a
checkpoint every 4 steps, data reshuffled on every pass) in subprocesses:

* killed mid-epoch (after step 10: newest checkpoint at step 8, one step
  into epoch 1), then restarted with the same command line, it resumes at
  that checkpoint and ends with the weights of a run that was never
  killed;
* killed inside a save (the temporary file written, not yet renamed), it
  leaves the previous checkpoints intact and the next run resumes from
  them.

Tolerance for the final weights: exact up to float32 rounding (rtol 1e-6,
atol 1e-7): the resumed run replays the same float32 operations on the
same data with the same random draws, on one device.

After every kill and every finish the backup directory is listed: only
complete checkpoints (HDF5 files that open and name their own step), plus,
after a kill inside a save only, that save's temporary file.
"""

import doctest
import os
import re
import signal
import subprocess
import sys
import threading

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_moe.data.shuffle import reproducible_shuffle
from keras_moe.training import resumable as fault_tolerance
from keras_moe.training.resumable import TEMP_PREFIX
from keras_moe.training.resumable import fit_resumable
from keras_moe.training.resumable import list_checkpoints
from keras_moe.training.resumable import restore_checkpoint
from keras_moe.training.resumable import save_checkpoint

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(os.path.dirname(_HERE))
_SCRIPT = os.path.join(_HERE, "_train_resumable.py")
_TIMEOUT_S = 600
TOTAL_STEPS = 21  # 3 epochs of 7 steps (_train_resumable.py)
_CHECKPOINT_NAME = re.compile(r"^ckpt-(\d{9})\.weights\.h5$")


def _command(backup_dir, out, *extra):
    return [
        sys.executable,
        _SCRIPT,
        "--backup_dir",
        str(backup_dir),
        "--out",
        str(out),
        *extra,
    ]


def _env():
    return dict(
        os.environ,
        PYTHONPATH=_ROOT,
        TF_CPP_MIN_LOG_LEVEL="2",
        KERAS_BACKEND="tensorflow",
    )


def _run(command):
    result = subprocess.run(
        command, capture_output=True, text=True, env=_env(), timeout=_TIMEOUT_S
    )
    assert result.returncode == 0, result.stderr[-6000:]
    return result.stdout.split("\n")


def _run_until_killed(command, line):
    """Starts `command`, SIGKILLs it once it prints `line`; returns stdout
    lines up to that one."""
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=_env(),
    )
    watchdog = threading.Timer(_TIMEOUT_S, proc.kill)
    watchdog.start()
    seen = []
    try:
        for printed in proc.stdout:
            seen.append(printed.strip())
            if printed.strip().startswith(line):
                os.kill(proc.pid, signal.SIGKILL)
                break
    finally:
        watchdog.cancel()
        proc.stdout.close()
        proc.wait()
    assert seen and seen[-1].startswith(line), f"never printed {line!r}: {seen}"
    assert proc.returncode == -signal.SIGKILL
    return seen


def _complete_checkpoints(backup_dir, allow_temp=False):
    """Steps of the checkpoints in `backup_dir`, checking every file.

    Fails on any file that is not a complete checkpoint, except (with
    `allow_temp`) one temporary file of an interrupted save.
    """
    steps, temps = [], []
    for name in sorted(os.listdir(backup_dir)):
        path = os.path.join(backup_dir, name)
        match = _CHECKPOINT_NAME.match(name)
        if match is None:
            assert allow_temp and name.startswith(TEMP_PREFIX), name
            temps.append(name)
            continue
        # A truncated HDF5 file does not open; a complete one names its own
        # step and holds the model's and the optimizer's variables.
        with h5py.File(path, "r") as f:
            assert int(f.attrs["keras_moe_step"]) == int(match.group(1))
            assert "layers" in f and "optimizer" in f
        steps.append(int(match.group(1)))
    assert len(temps) <= 1, temps
    return steps


def _assert_same_weights(path, expected):
    got = np.load(path)
    assert len(got.files) == len(expected.files)
    for name in expected.files:
        np.testing.assert_allclose(
            got[name], expected[name], rtol=1e-6, atol=1e-7, err_msg=name
        )


class _Uninterrupted:
    """A run that is never killed, started at once, awaited when needed."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.proc = subprocess.Popen(
            _command(tmp / "backup", tmp / "final.npz"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        self._weights = None

    def weights(self):
        if self._weights is None:
            stdout, stderr = self.proc.communicate(timeout=_TIMEOUT_S)
            assert self.proc.returncode == 0, stderr[-6000:]
            lines = stdout.split("\n")
            assert "start 0" in lines and f"done {TOTAL_STEPS}" in lines
            # The newest two checkpoints stay, the last one after the last
            # step.
            assert _complete_checkpoints(self.tmp / "backup") == [
                20,
                TOTAL_STEPS,
            ]
            self._weights = np.load(self.tmp / "final.npz")
        return self._weights


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run = _Uninterrupted(tmp_path_factory.mktemp("uninterrupted"))
    yield run
    if run.proc.poll() is None:
        run.proc.kill()
        run.proc.communicate()


def _steps_run(lines):
    return [int(line.split()[1]) for line in lines if line.startswith("step ")]


@pytest.mark.slow
def test_killed_mid_epoch_then_restarted_ends_like_an_uninterrupted_run(
    tmp_path, uninterrupted
):
    backup_dir, out = tmp_path / "backup", tmp_path / "final.npz"
    # A pause after each step lets the kill land before the next save (at
    # step 12); on a busy machine it may land later, which the checks below
    # allow.
    command = _command(backup_dir, out, "--step_delay", "0.2")
    _run_until_killed(command, "step 10")
    steps = _complete_checkpoints(backup_dir)
    newest = steps[-1]
    assert steps == [newest - 4, newest] and newest < TOTAL_STEPS
    assert newest % 7 != 0  # mid-epoch: 8 is one step into epoch 1
    assert not out.exists()

    lines = _run(command)  # the very same command
    # It resumed at the checkpoint (not from scratch), ran the steps left.
    assert f"start {newest}" in lines
    assert _steps_run(lines) == list(range(newest + 1, TOTAL_STEPS + 1))
    assert f"done {TOTAL_STEPS}" in lines
    _assert_same_weights(out, uninterrupted.weights())
    assert _complete_checkpoints(backup_dir) == [20, TOTAL_STEPS]


@pytest.mark.slow
def test_killed_inside_a_save_keeps_the_previous_checkpoints(
    tmp_path, uninterrupted
):
    backup_dir, out = tmp_path / "backup", tmp_path / "final.npz"
    command = _command(backup_dir, out)
    lines = _run_until_killed([*command, "--hang_in_save", "12"], "hanging")
    temp = lines[-1].split(" ", 1)[1]
    assert os.path.basename(temp).startswith(TEMP_PREFIX)
    # The interrupted save is only a temporary file; no ckpt-*12 exists.
    assert _complete_checkpoints(backup_dir, allow_temp=True) == [4, 8]
    assert os.path.exists(temp)

    lines = _run(command)
    assert "start 8" in lines
    _assert_same_weights(out, uninterrupted.weights())
    # The restart removed the leftover temporary file.
    assert _complete_checkpoints(backup_dir) == [20, TOTAL_STEPS]


# In-process tests of the pieces.


def _tiny_model(dropout=0.0):
    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(4),
            keras.layers.Dropout(dropout, seed=2),
            keras.layers.Dense(1),
        ]
    )
    model.compile(optimizer=keras.optimizers.Adam(0.1), loss="mse")
    return model


def _tiny_data(n=8, batch=2):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(n, 3)).astype("float32")
    y = rng.normal(size=(n, 1)).astype("float32")
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)


def test_save_and_restore_round_trip(tmp_path):
    model = _tiny_model(dropout=0.5)
    model.fit(_tiny_data(), epochs=1, shuffle=False, verbose=0)
    path = save_checkpoint(model, str(tmp_path), step=3)
    assert os.path.basename(path) == "ckpt-000000003.weights.h5"
    assert os.listdir(tmp_path) == ["ckpt-000000003.weights.h5"]

    restored = _tiny_model(dropout=0.5)
    assert restore_checkpoint(restored, str(tmp_path)) == 3
    for a, b in zip(model.weights, restored.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    # Adam's moments and iteration count, and the dropout seed state.
    for a, b in zip(model.optimizer.variables, restored.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert int(restored.optimizer.iterations.numpy()) == 4
    seeds = fault_tolerance._seed_states(model)
    assert len(seeds) == 1
    np.testing.assert_array_equal(
        seeds[0].numpy(), fault_tolerance._seed_states(restored)[0].numpy()
    )


def test_restore_without_checkpoint_returns_0_and_leaves_the_model(tmp_path):
    model = _tiny_model()
    before = [w.numpy() for w in model.weights]
    assert restore_checkpoint(model, str(tmp_path / "missing")) == 0
    for a, b in zip(before, model.weights):
        np.testing.assert_array_equal(a, b.numpy())


def test_restore_into_another_architecture_fails(tmp_path):
    save_checkpoint(_tiny_model(), str(tmp_path), step=1)
    other = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    other.compile(optimizer="adam", loss="mse")
    with pytest.raises(ValueError):
        restore_checkpoint(other, str(tmp_path))
    # Same layers, another optimizer: Keras would only warn and skip it.
    sgd = _tiny_model()
    sgd.compile(optimizer=keras.optimizers.SGD(momentum=0.9), loss="mse")
    with pytest.raises(ValueError, match="does not fit the model and optim"):
        restore_checkpoint(sgd, str(tmp_path))


def test_listing_ignores_temporary_and_foreign_files(tmp_path):
    for name in (
        "ckpt-000000002.weights.h5",
        "ckpt-000000010.weights.h5",
        f"{TEMP_PREFIX}123-ckpt-000000012.weights.h5",
        "ckpt-latest.weights.h5",
        "notes.txt",
    ):
        (tmp_path / name).write_bytes(b"")
    assert [step for step, _ in list_checkpoints(str(tmp_path))] == [2, 10]


def test_old_checkpoints_are_pruned_and_temps_cleaned(tmp_path):
    model = _tiny_model()
    stale = tmp_path / f"{TEMP_PREFIX}99-ckpt-000000007.weights.h5"
    for step in (1, 2, 3):
        save_checkpoint(model, str(tmp_path), step=step, max_to_keep=2)
    stale.write_bytes(b"half a file")
    assert [s for s, _ in list_checkpoints(str(tmp_path))] == [2, 3]
    assert restore_checkpoint(model, str(tmp_path)) == 3
    assert sorted(os.listdir(tmp_path)) == [
        "ckpt-000000002.weights.h5",
        "ckpt-000000003.weights.h5",
    ]


def test_fit_resumable_equals_fit_and_saves_on_schedule(tmp_path):
    """Uninterrupted, it is `fit` on the repeated stream."""
    data = _tiny_data(n=6)  # 3 batches, while an epoch has 4 steps
    expected = _tiny_model()
    expected.fit(
        data.repeat(), epochs=2, steps_per_epoch=4, shuffle=False, verbose=0
    )
    model = _tiny_model()
    history = fit_resumable(
        model,
        data,
        epochs=2,
        steps_per_epoch=4,
        backup_dir=str(tmp_path),
        save_every_steps=3,
        verbose=0,
    )
    assert history.epoch == [0, 1] and len(history.history["loss"]) == 2
    for a, b in zip(expected.weights, model.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6)
    # Saved after steps 3 and 6 and after the last, the newest two kept.
    assert [s for s, _ in list_checkpoints(str(tmp_path))] == [6, 8]
    # Run again: already at the last step, it trains nothing.
    again = _tiny_model()
    history = fit_resumable(
        again,
        data,
        epochs=2,
        steps_per_epoch=4,
        backup_dir=str(tmp_path),
        save_every_steps=3,
        verbose=0,
    )
    assert history.history == {} and history.epoch == []
    for a, b in zip(model.weights, again.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_resume_mid_epoch_in_process(tmp_path):
    """An exception at step 5 (one into epoch 1), then a new model resumes
    from the checkpoint of step 5 and matches an uninterrupted run."""
    data = _tiny_data(n=8)
    kwargs = dict(epochs=3, steps_per_epoch=4, save_every_steps=5, verbose=0)
    expected = _tiny_model(dropout=0.3)
    fit_resumable(expected, data, backup_dir=str(tmp_path / "a"), **kwargs)

    class Crash(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if int(self.model.optimizer.iterations.numpy()) == 6:
                raise RuntimeError("crash")

    with pytest.raises(RuntimeError, match="crash"):
        fit_resumable(
            _tiny_model(dropout=0.3),
            data,
            backup_dir=str(tmp_path / "b"),
            callbacks=[Crash()],
            **kwargs,
        )
    assert [s for s, _ in list_checkpoints(str(tmp_path / "b"))] == [5]
    model = _tiny_model(dropout=0.3)
    history = fit_resumable(
        model, data, backup_dir=str(tmp_path / "b"), **kwargs
    )
    # The rest of epoch 1, then epoch 2.
    assert history.epoch == [1, 2]
    assert int(model.optimizer.iterations.numpy()) == 12
    for a, b in zip(expected.weights, model.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-7)


def test_reproducible_shuffle():
    examples = tf.data.Dataset.range(6)
    stream = reproducible_shuffle(examples, buffer_size=6, seed=3)
    first = [int(x) for x in stream.take(18)]
    # Every iteration gives the same stream, and skipping lands inside it.
    assert first == [int(x) for x in stream.take(18)]
    assert first[7:] == [int(x) for x in stream.skip(7).take(11)]
    passes = [first[i : i + 6] for i in range(0, 18, 6)]
    assert all(sorted(p) == list(range(6)) for p in passes)
    assert len({tuple(p) for p in passes}) == 3  # each pass its own order
    other = reproducible_shuffle(examples, buffer_size=6, seed=4)
    assert [int(x) for x in other.take(18)] != first
    finite = reproducible_shuffle(examples, buffer_size=6, seed=3, passes=2)
    assert [int(x) for x in finite] == first[:12]
    # (_train_resumable.py runs it under a global seed of 0, where
    # Dataset.shuffle fails on seed tensors.)
    nested = tf.data.Dataset.from_tensor_slices(
        ({"a": np.arange(6)}, -np.arange(6))
    )
    pairs = [
        (int(x["a"]), int(y))
        for x, y in reproducible_shuffle(nested, 6, seed=3).take(6)
    ]
    assert [a for a, _ in pairs] == first[:6] and all(a == -b for a, b in pairs)
    with pytest.raises(ValueError, match="datasets of dense tensors"):
        reproducible_shuffle(
            tf.data.Dataset.from_tensor_slices(
                tf.ragged.constant([[1], [2, 3]])
            ),
            2,
            seed=0,
        )
    with pytest.raises(ValueError, match="buffer_size must be >= 1"):
        reproducible_shuffle(examples, 0, seed=0)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"epochs": 0}, "epochs must be >= 1"),
        ({"epochs": 1.5}, "epochs must be an int"),
        ({"steps_per_epoch": 0}, "steps_per_epoch must be >= 1"),
        ({"save_every_steps": True}, "save_every_steps must be an int"),
        ({"max_to_keep": 0}, "max_to_keep must be >= 1"),
        ({"backup_dir": ""}, "backup_dir must be a non-empty path"),
        ({"backup_dir": "gs://bucket/run"}, "must be a local directory"),
        ({"dataset": np.zeros((4, 3))}, "must be a tf.data.Dataset"),
        ({"shuffle": True}, r"sets \['shuffle'\] itself"),
        ({"batch_size": 4}, r"sets \['batch_size'\] itself"),
    ],
)
def test_fit_resumable_rejects_bad_arguments(tmp_path, kwargs, match):
    args = dict(
        model=_tiny_model(),
        dataset=_tiny_data(),
        epochs=1,
        steps_per_epoch=2,
        backup_dir=str(tmp_path / "backup"),
        save_every_steps=1,
    )
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        fit_resumable(**args)
    assert not (tmp_path / "backup").exists()  # nothing written


def test_fit_resumable_rejects_bad_models_and_data(tmp_path):
    common = dict(epochs=1, steps_per_epoch=2, save_every_steps=1, verbose=0)
    backup_dir = str(tmp_path / "backup")
    uncompiled = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    with pytest.raises(ValueError, match="has no optimizer"):
        fit_resumable(uncompiled, _tiny_data(), backup_dir=backup_dir, **common)
    with pytest.raises(ValueError, match="must be a keras.Model"):
        fit_resumable("model", _tiny_data(), backup_dir=backup_dir, **common)
    with pytest.raises(ValueError, match="dataset is empty"):
        fit_resumable(
            _tiny_model(), _tiny_data().take(0), backup_dir=backup_dir, **common
        )
    model = _tiny_model()
    model.compile(optimizer="sgd", loss="mse", steps_per_execution=2)
    with pytest.raises(ValueError, match="multiple of the model's steps_per"):
        fit_resumable(
            model,
            _tiny_data(),
            epochs=1,
            steps_per_epoch=4,
            save_every_steps=3,
            backup_dir=backup_dir,
        )
    file_path = tmp_path / "a_file"
    file_path.write_text("")
    with pytest.raises(ValueError, match="exists and is a file"):
        fit_resumable(
            _tiny_model(), _tiny_data(), backup_dir=str(file_path), **common
        )
    assert not os.path.exists(backup_dir)


def test_docstring_examples_run():
    result = doctest.testmod(fault_tolerance, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 10 and result.failed == 0


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))
