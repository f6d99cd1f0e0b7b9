"""Sharded checkpoints of the expert-parallel trainer, and resuming.

The multi-device tests run `_ep_checkpoint.py` in subprocesses with 8
virtual CPU devices:

* a checkpoint saved on `batch:2,expert:4` holds each expert shard of the
  expert kernels (and of their Adam slots) in its own data file, no file
  holds a whole kernel; it restores on `batch:1,expert:8` and on one
  device with every value equal to the saved one, and the next step there
  equals the original trainer's next step;
* `train_resumable` killed with SIGKILL in the middle of training, inside
  the save of step 4 (its files written, the directory not yet renamed),
  leaves the checkpoint of step 2 and a hidden directory; restarted with
  the same command it resumes at step 2 and ends with the state of a run
  never killed (the mesh run's, in the same subprocess).

One-device checks (a 1 x 1 mesh on CPU:0) run here.
"""

import doctest
import json
import os
import signal
import subprocess
import sys
import threading

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_moe.distribution import checkpointing
from keras_moe.distribution import expert_parallel
from keras_moe.distribution.checkpointing import CheckpointEvery
from keras_moe.distribution.checkpointing import list_checkpoints
from keras_moe.distribution.checkpointing import train_resumable
from keras_moe.distribution.expert_parallel import ExpertParallelTrainer
from keras_moe.distribution.expert_parallel_fit import ExpertParallelModel
from keras_moe.distribution.mesh import make_mesh
from keras_moe.layers.moe import MoeLayer

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(os.path.dirname(_HERE))
_SCRIPT = os.path.join(_HERE, "_ep_checkpoint.py")
_TIMEOUT_S = 600
TOTAL_STEPS = 6  # _ep_checkpoint.py: 6 steps, a checkpoint every 2
TOLERANCE = 1e-6


def _env():
    return dict(
        os.environ,
        PYTHONPATH=_ROOT,
        TF_CPP_MIN_LOG_LEVEL="2",
        KERAS_BACKEND="tensorflow",
    )


def _run(*args):
    result = subprocess.run(
        [sys.executable, _SCRIPT, *args],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr[-6000:]
    return result.stdout.split("\n")


def _run_until_killed(args, line):
    """Runs the script, SIGKILLs it once it prints a line starting with
    `line`; returns the lines printed up to that one."""
    proc = subprocess.Popen(
        [sys.executable, _SCRIPT, *args],
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
            if printed.startswith(line):
                os.kill(proc.pid, signal.SIGKILL)
                break
    finally:
        watchdog.cancel()
        proc.stdout.close()
        proc.wait()
    assert seen and seen[-1].startswith(line), f"never printed {line!r}: {seen}"
    assert proc.returncode == -signal.SIGKILL
    return seen


# Sharded save, restore onto other meshes ----------------------------------


@pytest.fixture(scope="module")
def mesh_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("mesh")
    lines = _run("mesh", "--out", str(out))
    # The uninterrupted run of `train`, in the same process.
    assert "start 0" in lines and f"done {TOTAL_STEPS}" in lines
    assert _steps_run(lines) == list(range(1, TOTAL_STEPS + 1))
    assert _listing(out / "reference") == ([TOTAL_STEPS - 2, TOTAL_STEPS], [])
    with open(out / "summary.json") as file:
        summary = json.load(file)
    return out, summary, dict(np.load(out / "results.npz"))


def _assert_sharded(files, shards):
    """Each expert shard of every kernel and slot in its own data file,
    and every value written once (a replicated one by one device)."""
    assert len(files["data_files"]) >= shards
    # The object graph, a string, is stored with a length and a checksum.
    extra = sum(files["data_files"].values()) - files["value_bytes"]
    assert 0 <= extra - files["object_graph_bytes"] <= 16
    assert len(files["kernels"]) == 6  # wi, wo and the m, v of each
    for name, where in files["kernels"].items():
        assert all(len(found) == 1 for found in where["shard_files"]), name
        assert len({found[0] for found in where["shard_files"]}) == shards
        assert where["whole_in"] == [], name


@pytest.mark.slow
def test_each_device_writes_its_own_expert_shards(mesh_run):
    out, summary, _ = mesh_run
    assert summary["listing_2x4"][:1] == ["meta.json"]
    assert summary["listing_2x4"][-1] == "state.index"
    assert sorted(os.listdir(out)) == [
        "ckpt_1x1",
        "ckpt_1x8",
        "ckpt_2x4",
        "reference",
        "reference.npz",
        "results.npz",
        "summary.json",
    ]  # no temporary directory left
    _assert_sharded(summary["files_2x4"], shards=4)
    _assert_sharded(summary["files_1x8"], shards=8)
    # Control: on one device each kernel is whole, and found whole.
    for name, where in summary["files_1x1"]["kernels"].items():
        assert len(where["whole_in"]) == 1, name
        assert where["shard_files"] == [where["whole_in"]], name
    meta = summary["meta"]
    assert meta["format"] == expert_parallel.CHECKPOINT_FORMAT
    assert meta["step"] == 2
    assert meta["mesh"] == {"batch": 2, "expert": 4}
    assert meta["optimizer"]["class_name"] == "Adam"


@pytest.mark.slow
@pytest.mark.parametrize("label", ["1x8", "1x1"])
def test_restore_onto_another_mesh_continues_identically(mesh_run, label):
    _, summary, results = mesh_run
    saved = sorted(
        k[len("saved/") :] for k in results if k.startswith("saved/")
    )
    # 5 weights, 1 seed state, Adam's iterations and 2 slots per weight.
    assert len(saved) == 1 + 5 + 1 + 11
    assert int(results["saved/step"]) == 2
    for name in saved:
        np.testing.assert_array_equal(
            results[f"restored_{label}/{name}"],
            results[f"saved/{name}"],
            err_msg=name,
        )
    # The expert kernels are sharded on the new mesh's expert axis.
    assert summary[f"layouts_{label}"] == summary["layouts_2x4"]
    assert summary["layouts_2x4"][1][0] == "expert"
    # The next step equals the original trainer's next step.
    np.testing.assert_allclose(
        results[f"restored_{label}/loss"],
        results["original/losses"][2],
        rtol=TOLERANCE,
    )
    for name in saved:
        np.testing.assert_allclose(
            results[f"next_{label}/{name}"],
            results[f"original/{name}"],
            rtol=TOLERANCE,
            atol=TOLERANCE,
            err_msg=name,
        )
    assert int(results[f"next_{label}/step"]) == 3


# Killed and restarted ------------------------------------------------------


def _listing(backup):
    """Complete checkpoints' steps and the hidden (temporary) entries."""
    names = sorted(os.listdir(backup))
    hidden = [name for name in names if name.startswith(".")]
    steps = [step for step, _ in list_checkpoints(str(backup))]
    assert len(steps) + len(hidden) == len(names), names
    return steps, hidden


def _steps_run(lines):
    return [int(line.split()[1]) for line in lines if line.startswith("step ")]


@pytest.mark.slow
def test_killed_mid_training_then_restarted_ends_like_an_uninterrupted_run(
    tmp_path, mesh_run
):
    backup, out = tmp_path / "backup", tmp_path / "final.npz"
    args = ["train", "--backup", str(backup), "--out", str(out)]
    # Killed inside the save of step 4: its files are written in a hidden
    # directory that was never renamed.
    lines = _run_until_killed([*args, "--hang_in_save", "4"], "hanging")
    assert "start 0" in lines and _steps_run(lines) == [1, 2, 3]
    steps, hidden = _listing(backup)
    assert steps == [2] and len(hidden) == 1
    assert hidden[0].startswith(".ckpt-000000004.tmp-")
    assert "state.index" in os.listdir(backup / hidden[0])
    assert not out.exists()
    # The same command again: resumes at step 2 (the first 2 batches
    # skipped), runs the rest, removes the dead save's directory.
    lines = _run(*args)
    assert "start 2" in lines and f"done {TOTAL_STEPS}" in lines
    assert _steps_run(lines) == list(range(3, TOTAL_STEPS + 1))
    assert _listing(backup) == ([TOTAL_STEPS - 2, TOTAL_STEPS], [])
    expected = np.load(mesh_run[0] / "reference.npz")
    got = np.load(out)
    assert sorted(got.files) == sorted(expected.files)
    assert int(got["step"]) == TOTAL_STEPS
    for name in expected.files:
        np.testing.assert_allclose(
            got[name], expected[name], rtol=1e-6, atol=1e-7, err_msg=name
        )


# One device ----------------------------------------------------------------

_LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _model(num_experts=4, seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4, 8))
    hidden = MoeLayer(
        num_experts,
        16,
        dispatcher="einsum",
        router_kernel_initializer=keras.initializers.RandomNormal(stddev=1.0),
    )(inputs)
    outputs = keras.layers.Dense(3)(keras.layers.Flatten()(hidden))
    return keras.Model(inputs, outputs)


def _trainer(optimizer="adam", **kwargs):
    return ExpertParallelTrainer(
        _model(**kwargs),
        make_mesh(1, 1, devices=["CPU:0"]),
        optimizer=optimizer,
        loss=_LOSS,
    )


def _data(steps=6, seed=1):
    rng = np.random.default_rng(seed)
    return [
        (
            rng.normal(size=(4, 4, 8)).astype("float32"),
            rng.integers(0, 3, size=(4,)).astype("int32"),
        )
        for _ in range(steps)
    ]


def _state(trainer):
    return [
        expert_parallel._to_numpy(v.read_value())
        for variables in trainer._state_variables().values()
        for v in variables
    ]


def test_npz_checkpoints_of_the_earlier_format_still_load(tmp_path):
    """A file written as the earlier `save` wrote it (built here with
    NumPy) loads into a trainer: values, step."""
    trainer = _trainer()
    trainer.fit(_data(steps=2))
    _, meta = trainer._state()
    meta["format"] = "keras_moe.expert_parallel.v1"
    arrays = {
        f"{prefix}/{i:05d}": expert_parallel._to_numpy(v.read_value())
        for prefix, variables in trainer._state_variables().items()
        for i, v in enumerate(variables)
    }
    arrays["meta.json"] = np.frombuffer(
        json.dumps(meta).encode("utf-8"), dtype=np.uint8
    )
    path = tmp_path / "old.npz"
    with open(path, "wb") as file:
        np.savez(file, **arrays)
    resumed = ExpertParallelTrainer.restore(
        str(path), _model(seed=5), make_mesh(1, 1, devices=["CPU:0"])
    )
    assert resumed.step == 2
    for a, b in zip(_state(resumed), _state(trainer)):
        np.testing.assert_array_equal(a, b)
    # It is not overwritten by a directory.
    with pytest.raises(ValueError, match="it exists and is a file"):
        resumed.save(str(path))


def test_save_replaces_a_checkpoint_and_respects_the_umask(tmp_path):
    trainer = _trainer()
    path = str(tmp_path / "ckpt")
    trainer.save(path)
    trainer.fit(_data(steps=1))
    previous = os.umask(0o027)
    try:
        trainer.save(path)
    finally:
        os.umask(previous)
    assert os.listdir(tmp_path) == ["ckpt"]
    assert os.stat(path).st_mode & 0o777 == 0o750
    for name in os.listdir(path):
        assert os.stat(os.path.join(path, name)).st_mode & 0o777 == 0o640
    with open(os.path.join(path, "meta.json")) as file:
        assert json.load(file)["step"] == 1
    fresh = _trainer(seed=3)
    fresh.load(path)
    for a, b in zip(_state(fresh), _state(trainer)):
        np.testing.assert_array_equal(a, b)


def test_bad_checkpoint_directories(tmp_path):
    trainer = _trainer()
    for bad in (None, "", 3):
        with pytest.raises(ValueError, match="must be a non-empty path"):
            trainer.save(bad)
        with pytest.raises(ValueError, match="must be a non-empty path"):
            trainer.load(bad)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="has no meta.json"):
        trainer.load(str(empty))
    path = str(tmp_path / "ckpt")
    trainer.save(path)
    meta_path = os.path.join(path, "meta.json")
    with open(meta_path) as file:
        meta = json.load(file)
    with open(meta_path, "w") as file:
        json.dump(dict(meta, format="other"), file)
    with pytest.raises(ValueError, match="has format 'other'; expected"):
        trainer.load(path)
    with open(meta_path, "w") as file:
        file.write("{not json")
    with pytest.raises(ValueError, match="is not an expert-parallel"):
        trainer.load(path)
    with open(meta_path, "w") as file:
        json.dump(meta, file)
    os.remove(os.path.join(path, "state.index"))
    with pytest.raises(ValueError, match="not a complete expert-parallel"):
        ExpertParallelTrainer.restore(path, _model(), "batch:1,expert:1")
    path = str(tmp_path / "ckpt2")
    trainer.save(path)
    with pytest.raises(
        ValueError, match="holds 5 trainable variables, the model has 7"
    ):
        # One more weight: a Dense with a bias after the MoE layer.
        inputs = keras.Input((4, 8))
        hidden = MoeLayer(4, 16)(inputs)
        hidden = keras.layers.Dense(8)(hidden)
        outputs = keras.layers.Dense(3)(keras.layers.Flatten()(hidden))
        ExpertParallelTrainer(
            keras.Model(inputs, outputs),
            make_mesh(1, 1, devices=["CPU:0"]),
            loss=_LOSS,
        ).load(path)
    with pytest.raises(ValueError, match="optimizer variables"):
        _trainer(optimizer="sgd").load(path)


def test_fit_resumable_after_a_crash_matches_an_uninterrupted_run(tmp_path):
    """Stopped by an exception after step 4 (saved at 3), a new trainer
    resumes at 3, skipping batches of a plain list, and ends with the
    state of a run never stopped."""
    data = _data(steps=6)
    expected = _trainer()
    expected.fit(data)

    class Crash(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 3:
                raise RuntimeError("crash")

    directory = str(tmp_path / "backup")
    with pytest.raises(RuntimeError, match="crash"):
        train_resumable(_trainer(), data, 6, directory, 3, callbacks=[Crash()])
    assert [step for step, _ in list_checkpoints(directory)] == [3]
    trainer = _trainer(seed=4)
    losses = train_resumable(trainer, data, 6, directory, 3)
    assert len(losses) == 3 and trainer.step == 6
    for a, b in zip(_state(trainer), _state(expected)):
        np.testing.assert_allclose(a, b, rtol=TOLERANCE, atol=TOLERANCE)
    # The Keras model holds the same weights.
    for a, b in zip(trainer.model.weights, expected.model.weights):
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(a),
            keras.ops.convert_to_numpy(b),
            rtol=TOLERANCE,
            atol=TOLERANCE,
        )
    assert [step for step, _ in list_checkpoints(directory)] == [3, 6]
    # Already at step 6: nothing to run. Past it: refused.
    assert train_resumable(_trainer(), data, 6, directory, 3) == []
    with pytest.raises(ValueError, match="at step 6, past steps=5"):
        train_resumable(_trainer(), data, 5, directory, 3)


def test_checkpoint_every_under_keras_fit(tmp_path):
    """With `ExpertParallelModel.fit`: saved at steps 3 and 6 and at the
    end (7), the newest two kept; the last holds the trained state."""
    trainer = _trainer()
    x = np.concatenate([x for x, _ in _data(steps=7)])
    y = np.concatenate([y for _, y in _data(steps=7)])
    directory = str(tmp_path / "backup")
    ExpertParallelModel(trainer).fit(
        x,
        y,
        batch_size=4,
        epochs=1,
        shuffle=False,
        verbose=0,
        callbacks=[CheckpointEvery(trainer, directory, 3)],
    )
    saved = list_checkpoints(directory)
    assert [step for step, _ in saved] == [6, 7]
    fresh = _trainer(seed=2)
    fresh.load(saved[-1][1])
    assert fresh.step == 7
    for a, b in zip(_state(fresh), _state(trainer)):
        np.testing.assert_array_equal(a, b)


def test_pruning_removes_leftovers_of_older_saves_only(tmp_path):
    """Hidden directories of killed saves (one process's, and the shared
    one several processes write) go once their step is older than every
    checkpoint kept; a newer one (a save in progress) and other entries
    stay."""
    directory = tmp_path / "backup"
    directory.mkdir()
    old = [
        ".ckpt-000000001.tmp-host-99-ab12cd34",
        ".ckpt-000000002.tmp-clients-2",
    ]
    kept = [".ckpt-000000009.tmp-clients-9", ".notes", "ckpt-latest"]
    for name in old + kept:
        (directory / name).mkdir()
    trainer = _trainer()
    saver = CheckpointEvery(trainer, str(directory), 1, max_to_keep=2)
    trainer.fit(_data(steps=3), callbacks=[saver])
    # Steps 2 and 3 kept: only the leftover of step 1 is older than both.
    assert sorted(os.listdir(directory)) == sorted(
        ["ckpt-000000002", "ckpt-000000003", old[1]] + kept
    )
    trainer.fit(_data(steps=1), callbacks=[saver])
    assert sorted(os.listdir(directory)) == sorted(
        ["ckpt-000000003", "ckpt-000000004"] + kept
    )


def test_list_checkpoints_ignores_other_entries(tmp_path):
    for name in (
        "ckpt-000000002",
        "ckpt-000000010",
        ".ckpt-000000012.tmp-host-99-ab12cd34",
        "ckpt-latest",
        "ckpt-12",
    ):
        (tmp_path / name).mkdir()
    (tmp_path / "notes.txt").write_text("")
    assert [s for s, _ in list_checkpoints(str(tmp_path))] == [2, 10]
    assert list_checkpoints(str(tmp_path / "missing")) == []


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"trainer": "trainer"}, "must be an ExpertParallelTrainer"),
        ({"every_steps": 0}, "every_steps must be >= 1"),
        ({"every_steps": True}, "every_steps must be an int"),
        ({"max_to_keep": 0}, "max_to_keep must be >= 1"),
        ({"max_to_keep": 1.5}, "max_to_keep must be an int"),
        ({"directory": ""}, "directory must be a non-empty path"),
        ({"directory": None}, "directory must be a non-empty path"),
        ({"directory": "FILE"}, "exists and is a file"),
    ],
)
def test_checkpoint_every_rejects_bad_arguments(tmp_path, kwargs, match):
    (tmp_path / "a_file").write_text("")
    args = dict(
        trainer=_trainer(),
        directory=str(tmp_path / "backup"),
        every_steps=2,
        max_to_keep=2,
    )
    args.update(kwargs)
    if args["directory"] == "FILE":
        args["directory"] = str(tmp_path / "a_file")
    with pytest.raises(ValueError, match=match):
        CheckpointEvery(**args)
    with pytest.raises(ValueError, match=match):
        train_resumable(dataset=_data(), steps=2, **args)
    assert not (tmp_path / "backup").exists()  # nothing written


def test_fit_resumable_rejects_bad_steps(tmp_path):
    for steps, match in ((-1, "steps must be >= 0"), (2.0, "must be an int")):
        with pytest.raises(ValueError, match=match):
            train_resumable(_trainer(), _data(), steps, str(tmp_path), 2)


def test_docstring_example_runs():
    result = doctest.testmod(
        checkpointing,
        extraglobs={"keras": keras, "np": np, "tf": tf},
        optionflags=doctest.ELLIPSIS,
    )
    assert result.attempted >= 10 and result.failed == 0


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))
