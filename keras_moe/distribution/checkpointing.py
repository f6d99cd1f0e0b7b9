"""Periodic checkpoints of an expert-parallel trainer, and resuming.

`CheckpointEvery` is a Keras callback for `ExpertParallelTrainer.fit`
(or `ExpertParallelModel.fit`) that saves the trainer every N steps to
`<directory>/ckpt-<step, 9 digits>`, a checkpoint directory of
`ExpertParallelTrainer.save` (each device writes its own shards; the
directory appears complete or not at all), keeping the newest few.

`train_resumable` is the loop that survives being killed: it loads the
newest checkpoint of the directory into the trainer, skips the batches
already trained on (step t always trains on batch t of `dataset`), and
trains the rest with a `CheckpointEvery`. Run the same command again
after a crash, even a SIGKILL, and it ends with the weights of a run that
was never interrupted, provided `dataset` yields the same batches in the
same order every time it is iterated (no unseeded shuffling). A
checkpoint may be restored onto another mesh: pass a trainer on that
mesh.

Both work on several processes (a multi-client mesh): every process
passes the same `directory` on a file system they all share and a
`dataset` of its own rows of each global batch
(`ExpertParallelTrainer.local_batch_rows`). All processes write each
checkpoint; process 0 alone removes old checkpoints and the hidden
leftovers of killed saves, and a barrier follows, so every process sees
the same checkpoints.

Example (one device; on 8 devices use a mesh such as "batch:2,expert:4"):

>>> import tempfile
>>> from keras_moe.distribution.expert_parallel import ExpertParallelTrainer
>>> from keras_moe.distribution.mesh import make_mesh
>>> from keras_moe.layers.moe import MoeLayer
>>> def trainer():
...     keras.utils.set_random_seed(0)
...     inputs = keras.Input((4, 8))
...     hidden = MoeLayer(num_experts=2, hidden_dim=16)(inputs)
...     outputs = keras.layers.Dense(3)(keras.layers.Flatten()(hidden))
...     return ExpertParallelTrainer(
...         keras.Model(inputs, outputs),
...         make_mesh(batch=1, expert=1, devices=["CPU:0"]),
...         optimizer="adam",
...         loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
...     )
>>> x = np.random.default_rng(0).normal(size=(16, 4, 8)).astype("float32")
>>> dataset = tf.data.Dataset.from_tensor_slices((x, np.arange(16) % 3))
>>> directory = tempfile.mkdtemp()
>>> losses = train_resumable(trainer(), dataset.batch(4), 3, directory, 2)
>>> [step for step, _ in list_checkpoints(directory)]
[2, 3]
>>> len(losses)
3
>>> resumed = trainer()  # as a new process would build it
>>> len(train_resumable(resumed, dataset.batch(4), 4, directory, 2))
1
>>> resumed.step
4
>>> [step for step, _ in list_checkpoints(directory)]
[3, 4]
"""

import itertools
import os
import re

import keras
import tensorflow as tf
from tensorflow.experimental import dtensor

from keras_moe.distribution.expert_parallel import ExpertParallelTrainer
from keras_moe.utils import files

_NAME = re.compile(r"^ckpt-(\d{9})$")
# The hidden directories a save writes beside `ckpt-<step>` before its
# rename (`files.atomic_directory`, `ExpertParallelTrainer.save`).
_HIDDEN = re.compile(r"^\.ckpt-(\d{9})\.")


def checkpoint_path(directory, step):
    """The path of the checkpoint of `step` in `directory`."""
    return files.join(directory, f"ckpt-{step:09d}")


def list_checkpoints(directory):
    """[(step, path)] of the checkpoints in `directory`, oldest first.

    Only complete checkpoints are listed: `ExpertParallelTrainer.save`
    writes under a hidden name and renames, so a save that was killed
    leaves no `ckpt-*` entry. A missing directory has none.
    """
    gfile = tf.io.gfile
    if not gfile.isdir(directory):
        return []
    found = []
    for name in gfile.listdir(directory):
        match = _NAME.match(name.rstrip("/"))
        if match:
            step = int(match.group(1))
            found.append((step, checkpoint_path(directory, step)))
    return sorted(found)


def restore_latest(trainer, directory):
    """Loads the newest checkpoint of `directory` into `trainer`.

    Returns:
        The step restored (`trainer.step`), or None when `directory` holds
        no checkpoint (the trainer is left as it was).
    """
    saved = list_checkpoints(directory)
    if not saved:
        return None
    trainer.load(saved[-1][1])
    trainer.sync_to_model()
    return trainer.step


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int; received {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; received {value}")


def _check_directory(directory):
    if not isinstance(directory, (str, os.PathLike)) or not os.fspath(
        directory
    ):
        raise ValueError(
            f"directory must be a non-empty path; received {directory!r}"
        )
    if tf.io.gfile.exists(directory) and not tf.io.gfile.isdir(directory):
        raise ValueError(
            f"directory {os.fspath(directory)!r} exists and is a file; "
            "expected a directory of checkpoints"
        )


class CheckpointEvery(keras.callbacks.Callback):
    """Saves `trainer` to `<directory>/ckpt-<step>` every `every_steps`.

    A checkpoint is written when the trainer's step (counted from the
    start of training, restores included) is a multiple of `every_steps`,
    and once more at the end of training if the last step was not saved;
    then all but the newest `max_to_keep` checkpoints are removed.

    Args:
        trainer: the `ExpertParallelTrainer` being trained.
        directory: where the checkpoints go (created if missing; a
            `gs://` path works through `tf.io.gfile`).
        every_steps: steps between checkpoints, >= 1.
        max_to_keep: checkpoints kept, >= 1.
    """

    def __init__(self, trainer, directory, every_steps, max_to_keep=2):
        super().__init__()
        if not isinstance(trainer, ExpertParallelTrainer):
            raise ValueError(
                "trainer must be an ExpertParallelTrainer; received "
                f"{type(trainer).__name__}"
            )
        _check_directory(directory)
        _check_int("every_steps", every_steps, 1)
        _check_int("max_to_keep", max_to_keep, 1)
        self.trainer = trainer
        self.directory = os.fspath(directory)
        self.every_steps = every_steps
        self.max_to_keep = max_to_keep

    def _saved_steps(self):
        return [step for step, _ in list_checkpoints(self.directory)]

    def save(self):
        """Saves the trainer's current step now, prunes; returns the path.

        On several processes every process must call it (the callback's
        hooks do, in each); process 0 alone prunes, then all wait for it.
        """
        step = self.trainer.step
        path = self.trainer.save(checkpoint_path(self.directory, step))
        if dtensor.client_id() == 0:
            self._prune()
        if dtensor.num_clients() > 1:
            dtensor.barrier(self.trainer.mesh, "keras_moe-checkpoint-pruned")
        return path

    def _prune(self):
        """Removes all but the newest `max_to_keep` checkpoints, and the
        hidden directories of saves older than the oldest one kept (left
        by a process killed while saving)."""
        saved = list_checkpoints(self.directory)
        for _, old in saved[: -self.max_to_keep]:
            files.remove_tree(old)
        if not saved:
            return
        oldest_kept = saved[-self.max_to_keep :][0][0]
        for name in tf.io.gfile.listdir(self.directory):
            match = _HIDDEN.match(name.rstrip("/"))
            if match and int(match.group(1)) < oldest_kept:
                files.remove_tree(files.join(self.directory, name))

    def on_train_batch_end(self, batch, logs=None):
        if self.trainer.step % self.every_steps == 0:
            self.save()

    def on_train_end(self, logs=None):
        saved = self._saved_steps()
        if not saved or saved[-1] != self.trainer.step:
            self.save()


def train_resumable(
    trainer,
    dataset,
    steps,
    directory,
    every_steps,
    max_to_keep=2,
    callbacks=None,
):
    """Trains `trainer` to `steps` steps, resuming from `directory`.

    The newest checkpoint in `directory` (if any) is loaded into
    `trainer`; the first `trainer.step` batches of `dataset` are skipped
    (they were trained on before the checkpoint); the steps left are run
    by `trainer.fit` with a `CheckpointEvery(trainer, directory,
    every_steps, max_to_keep)` first among the callbacks.

    Args:
        trainer: an `ExpertParallelTrainer` built as for the first run,
            on any mesh.
        dataset: the batches of the whole run, the same in every run: a
            `tf.data.Dataset` (skipped with `Dataset.skip`) or any
            iterable of `(x, y)` / `(x, y, sample_weight)` batches
            (skipped by iterating past them). On several processes, each
            process's own rows of every global batch
            (`trainer.local_batch_rows`).
        steps: the step count to reach (not the steps still to run).
        directory: the checkpoint directory (on several processes, the
            same path on a file system they all share).
        every_steps: steps between checkpoints.
        max_to_keep: checkpoints kept.
        callbacks: other Keras callbacks for `trainer.fit`.

    Returns:
        The losses of the steps run by this call (none when the
        checkpoint is already at `steps`).
    """
    _check_int("steps", steps, 0)
    saver = CheckpointEvery(trainer, directory, every_steps, max_to_keep)
    restore_latest(trainer, directory)
    done = trainer.step
    if done > steps:
        raise ValueError(
            f"the newest checkpoint in {saver.directory!r} is at step "
            f"{done}, past steps={steps}"
        )
    if done == steps:
        return []
    if isinstance(dataset, tf.data.Dataset):
        remaining = dataset.skip(done)
    else:
        remaining = itertools.islice(dataset, done, None)
    return trainer.fit(
        remaining,
        steps=steps - done,
        callbacks=[saver] + list(callbacks or []),
    )
