"""Crash-safe training: `fit_resumable` checkpoints every N steps and resumes.

A training process may be killed at any moment (preemption, OOM, SIGKILL).
`fit_resumable` trains with `model.fit`, saves a checkpoint every
`save_every_steps` global steps, and, started again with the same arguments,
restores the newest checkpoint and continues at the very step where it was
saved, mid-epoch included, with the data the uninterrupted run would have
seen next. The final weights then equal those of a run that was never
killed (to float tolerance; exactly on one device).

Checkpoints are Keras weight files (`model.save_weights`: the model's
variables and the optimizer's state, iteration count included), plus the
states of the model's random seed generators (dropout, router noise), in
`backup_dir`:

    backup_dir/ckpt-000000120.weights.h5     the state after global step 120

Each is written under a temporary name (`.tmp-...`) in the same directory,
flushed to disk, and renamed into place: a file named `ckpt-*` is always
complete, so a kill during a save leaves the previous checkpoint as the
newest one. A leftover temporary file is removed by the next run. The newest
`max_to_keep` checkpoints are kept; the one after the last step stays, so
running a finished command again restores it and trains nothing.

Why not `keras.callbacks.BackupAndRestore` (Keras 3.15): it overwrites its one
weights file in place, so a kill during a save leaves a corrupt file, and on
restore it keeps the epoch but not the batch, replaying the start of an
interrupted epoch. It also does not restore random seed states.

Data position: global step t trains on element t of `dataset.repeat()`. On
resume at step t the stream restarts at `dataset.repeat().skip(t)`; this
equals the uninterrupted stream when every iteration of the dataset yields
the same elements: no randomness, or randomness that depends on the element
only. `shuffle(..., reshuffle_each_iteration=True)` does not qualify, seed
or no seed: TensorFlow draws a new order for each iterator made from the
same dataset object, and a resumed run makes a different number of them.
Shuffle with `reproducible_shuffle` instead: pass p of
the data is shuffled with a seed derived from (seed, p), a different order
each pass and the same stream on every iteration. Skipping reads the
skipped elements, which costs a pass over them on restart.

Keras runs an epoch from its start, so a resume at step t = e * P + b (P
steps per epoch, 0 < b < P) calls `fit` twice: once for the last P - b steps
of epoch e, then for the following epochs. The returned `History` joins
both; the loss logged for epoch e then averages its last P - b steps only.

Under a multi-worker strategy only the chief writes; every worker restores
from `backup_dir`, which must then be on a file system all workers share.
"""

import os
import sys
import warnings

import h5py
import keras
import numpy as np
import tensorflow as tf

from keras_moe.distribution.strategies import build_for_fit
from keras_moe.distribution.strategies import fit_distributed
from keras_moe.utils.checks import check_int
from keras_moe.utils.files import TEMP_PREFIX
from keras_moe.utils.files import atomic_path
from keras_moe.utils.files import fsync_path

CHECKPOINT_PREFIX = "ckpt-"
CHECKPOINT_SUFFIX = ".weights.h5"
# TEMP_PREFIX (from keras_moe.utils.files) starts the name of a checkpoint
# being written; `restore_checkpoint` removes those a killed save left.
_RNG_GROUP = "keras_moe_seed_generator_states"
# Arguments fit_resumable sets itself: a caller passing them would break the
# step <-> data element correspondence.
_RESERVED_FIT_ARGS = (
    "x",
    "y",
    "batch_size",
    "epochs",
    "initial_epoch",
    "steps_per_epoch",
    "shuffle",
    "validation_split",
)


def checkpoint_path(backup_dir, step):
    """The path of the checkpoint saved after global step `step`."""
    return os.path.join(
        backup_dir, f"{CHECKPOINT_PREFIX}{step:09d}{CHECKPOINT_SUFFIX}"
    )


def list_checkpoints(backup_dir):
    """[(step, path)] of the complete checkpoints in `backup_dir`, oldest
    first; [] if the directory does not exist."""
    if not os.path.isdir(backup_dir):
        return []
    found = []
    for name in os.listdir(backup_dir):
        if name.startswith(CHECKPOINT_PREFIX) and name.endswith(
            CHECKPOINT_SUFFIX
        ):
            digits = name[len(CHECKPOINT_PREFIX) : -len(CHECKPOINT_SUFFIX)]
            if digits.isdigit():
                found.append((int(digits), os.path.join(backup_dir, name)))
    return sorted(found)


def _seed_states(model):
    """The state variables of the model's seed generators, in a fixed order.

    `save_weights` leaves them out; they are what dropout and router noise
    draw from, so a resumed run needs them to draw the same numbers.
    """
    weights = {id(w) for w in model.weights}
    if model.optimizer is not None:
        weights.update(id(v) for v in model.optimizer.variables)
    return [v for v in model.variables if id(v) not in weights]


def _build_optimizer(model):
    """Creates the optimizer's slots (distributed under a strategy)."""
    if not model.optimizer.built:
        with model.distribute_strategy.scope():
            model.optimizer.build(model.trainable_variables)


def save_checkpoint(model, backup_dir, step, max_to_keep=2):
    """Atomically saves the training state after global step `step`.

    Args:
        model: a built, compiled Keras model.
        backup_dir: directory of the checkpoints (created if missing).
        step: the number of training steps done.
        max_to_keep: how many of the newest checkpoints to keep.

    Returns:
        The path of the new checkpoint.
    """
    check_int("step", step, minimum=0)
    check_int("max_to_keep", max_to_keep)
    _build_optimizer(model)  # so that a checkpoint always holds its slots
    final = checkpoint_path(backup_dir, step)
    # `save_weights` takes only names ending in ".weights.h5".
    with atomic_path(final, suffix=CHECKPOINT_SUFFIX) as temp:
        model.save_weights(temp, overwrite=True)
        with h5py.File(temp, "a") as f:
            group = f.create_group(_RNG_GROUP)
            for i, variable in enumerate(_seed_states(model)):
                group.create_dataset(
                    str(i), data=keras.ops.convert_to_numpy(variable.value)
                )
            f.attrs["keras_moe_step"] = step
    fsync_path(backup_dir)  # the rename itself reaches the disk
    for _, old in list_checkpoints(backup_dir)[:-max_to_keep]:
        os.remove(old)
    return final


def restore_checkpoint(model, backup_dir, clean=True):
    """Restores the newest checkpoint of `backup_dir` into `model`.

    Args:
        model: the built, compiled model the checkpoint was saved from (same
            architecture and optimizer).
        backup_dir: directory of the checkpoints.
        clean: remove temporary files left by a process killed while saving
            (pass False on processes that do not write checkpoints).

    Returns:
        The global step of the restored checkpoint, or 0 if there is none
        (the model is then left as it is).
    """
    if clean and os.path.isdir(backup_dir):
        for name in os.listdir(backup_dir):
            if name.startswith(TEMP_PREFIX):
                os.remove(os.path.join(backup_dir, name))
    checkpoints = list_checkpoints(backup_dir)
    if not checkpoints:
        return 0
    step, path = checkpoints[-1]
    states = _seed_states(model)
    with h5py.File(path, "r") as f:
        saved_step = int(f.attrs.get("keras_moe_step", -1))
        group = f.get(_RNG_GROUP)
        count = 0 if group is None else len(group)
        seeds = [np.asarray(group[str(i)]) for i in range(count)]
    if saved_step != step:
        raise ValueError(
            f"{path} was saved after step {saved_step}, not {step}: the "
            "checkpoint files of backup_dir were renamed or mixed up"
        )
    if count != len(states):
        raise ValueError(
            f"{path} holds {count} seed generator states; the model has "
            f"{len(states)}: is it the model that was saved?"
        )
    _build_optimizer(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.load_weights(path)
    # Keras only warns when it skips the variables of an object whose count
    # differs (e.g. an optimizer of another kind): resuming from a partial
    # state would silently train something else.
    skipped = [str(w.message) for w in caught if "Skipping" in str(w.message)]
    if skipped:
        raise ValueError(
            f"{path} does not fit the model and optimizer: {skipped[0]}"
        )
    for variable, value in zip(states, seeds):
        variable.assign(value)
    return step


def is_chief(strategy):
    """Whether this process writes checkpoints under `strategy` (the chief,
    or worker 0 of a cluster without one; every single-worker process)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return True
    task_type = resolver.task_type if resolver is not None else None
    if task_type in (None, "chief"):
        return True
    cluster = resolver.cluster_spec().as_dict()
    return (
        task_type == "worker"
        and resolver.task_id == 0
        and ("chief" not in cluster)
    )


class _StepSaver(keras.callbacks.Callback):
    """Saves a checkpoint when the global step crosses a multiple of
    `save_every_steps`, and after the last step."""

    def __init__(
        self,
        backup_dir,
        save_every_steps,
        steps_per_epoch,
        total_steps,
        max_to_keep,
        writer,
    ):
        super().__init__()
        self.backup_dir = backup_dir
        self.save_every_steps = save_every_steps
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = total_steps
        self.max_to_keep = max_to_keep
        self.writer = writer
        self.first_epoch = 0
        self.first_step = 0
        self.last_saved = 0
        self._epoch_start = 0

    def start_segment(self, first_epoch, first_step):
        """Tells where the next `fit` call starts (epoch, global step)."""
        self.first_epoch = first_epoch
        self.first_step = first_step
        self.last_saved = first_step

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.first_epoch:
            self._epoch_start = self.first_step
        else:
            self._epoch_start = epoch * self.steps_per_epoch

    def on_train_batch_end(self, batch, logs=None):
        # `batch` is the index in this fit call's epoch of the last step run
        # (several steps per call with steps_per_execution > 1).
        step = self._epoch_start + batch + 1
        every = self.save_every_steps
        if step // every > self.last_saved // every or (
            step == self.total_steps and step > self.last_saved
        ):
            if self.writer:
                save_checkpoint(
                    self.model, self.backup_dir, step, self.max_to_keep
                )
            self.last_saved = step


def fit_resumable(
    model,
    dataset,
    epochs,
    steps_per_epoch,
    backup_dir,
    save_every_steps,
    max_to_keep=2,
    callbacks=None,
    verbose="auto",
    **fit_kwargs,
):
    """`model.fit` that checkpoints every `save_every_steps` and resumes.

    Run the same command again after a crash: training continues from the
    newest checkpoint in `backup_dir`, at the same step and with the same
    data, and ends with the weights of an uninterrupted run (see the module
    docstring for the guarantees and their conditions).

    Args:
        model: a built, compiled Keras model (under a strategy: built and
            compiled in its scope).
        dataset: a `tf.data.Dataset` of batches (e.g. from
            `prepare_dataset`) yielding the same elements on every
            iteration (shuffle with `reproducible_shuffle`); it is repeated
            as needed.
        epochs: number of epochs, counted from step 0 (as in `fit`).
        steps_per_epoch: P, steps in an epoch.
        backup_dir: local directory owned by this training run.
        save_every_steps: save after every this many global steps (and
            after the last step).
        max_to_keep: number of newest checkpoints to keep.
        callbacks: Keras callbacks, passed to each `fit` call. One that
            stops training (EarlyStopping) ends this call; calling again
            resumes from the newest checkpoint.
        verbose: as in `fit`.
        **fit_kwargs: other `fit` arguments (validation_data,
            validation_freq, class_weight, ...); not those fixing the data
            stream (x, y, batch_size, epochs, initial_epoch,
            steps_per_epoch, shuffle, validation_split).

    Returns:
        A `keras.callbacks.History` of the epochs run by this call (empty if
        the checkpoint was already at the last step).

    Example:

    >>> import tempfile
    >>> import keras
    >>> import numpy as np
    >>> import tensorflow as tf
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    >>> model.compile(optimizer="adam", loss="mse")
    >>> data = tf.data.Dataset.from_tensor_slices(
    ...     (np.ones((16, 4), "float32"), np.ones((16, 1), "float32"))
    ... ).batch(4)
    >>> backup_dir = tempfile.mkdtemp()
    >>> history = fit_resumable(model, data, epochs=2, steps_per_epoch=4,
    ...                         backup_dir=backup_dir, save_every_steps=3,
    ...                         verbose=0)
    >>> len(history.history["loss"])
    2
    >>> [step for step, _ in list_checkpoints(backup_dir)]
    [6, 8]
    >>> int(model.optimizer.iterations.numpy())
    8
    """
    if not isinstance(model, keras.Model):
        raise ValueError(
            f"model must be a keras.Model; received {type(model).__name__}"
        )
    if getattr(model, "optimizer", None) is None:
        raise ValueError(
            f"model {model.name!r} has no optimizer: compile it before "
            "fit_resumable"
        )
    if not model.built:
        raise ValueError(
            "model must be built before fit_resumable (call it on a batch "
            "or build it): its checkpoint is loaded before training starts"
        )
    if not isinstance(dataset, tf.data.Dataset):
        raise ValueError(
            "dataset must be a tf.data.Dataset (so the data position can be "
            f"restored); received {type(dataset).__name__}"
        )
    check_int("epochs", epochs)
    check_int("steps_per_epoch", steps_per_epoch)
    check_int("save_every_steps", save_every_steps)
    check_int("max_to_keep", max_to_keep)
    if not isinstance(backup_dir, str | os.PathLike) or not str(backup_dir):
        raise ValueError(
            f"backup_dir must be a non-empty path; received {backup_dir!r}"
        )
    backup_dir = os.fspath(backup_dir)
    if "://" in backup_dir:
        raise ValueError(
            "backup_dir must be a local directory (checkpoints are renamed "
            f"into place, which is atomic only there); received {backup_dir!r}"
        )
    if os.path.exists(backup_dir) and not os.path.isdir(backup_dir):
        raise ValueError(f"backup_dir {backup_dir!r} exists and is a file")
    reserved = sorted(set(fit_kwargs) & set(_RESERVED_FIT_ARGS))
    if reserved:
        raise ValueError(
            f"fit_resumable sets {reserved} itself (they fix which data each "
            "step sees); remove them"
        )
    per_call = getattr(model, "steps_per_execution", 1) or 1
    for name, value in (
        ("steps_per_epoch", steps_per_epoch),
        ("save_every_steps", save_every_steps),
    ):
        if value % per_call:
            raise ValueError(
                f"{name}={value} must be a multiple of the model's "
                f"steps_per_execution={per_call}: fit runs steps in groups "
                "of that many, so a checkpoint or an epoch could not end "
                "between them"
            )
    cardinality = int(dataset.cardinality())
    if cardinality == 0:
        raise ValueError("dataset is empty: it yields no batch")

    build_for_fit(model, dataset)  # also builds the optimizer's slots
    writer = is_chief(model.distribute_strategy)
    step = restore_checkpoint(model, backup_dir, clean=writer)
    total = epochs * steps_per_epoch
    history = keras.callbacks.History()
    history.set_model(model)
    history.epoch = []
    if step >= total:
        return history
    stream = dataset.repeat()
    saver = _StepSaver(
        backup_dir,
        save_every_steps,
        steps_per_epoch,
        total,
        max_to_keep,
        writer,
    )
    segments = []
    first_epoch, offset = divmod(step, steps_per_epoch)
    if offset:
        # The rest of the interrupted epoch, then the following epochs.
        segments.append(
            (first_epoch, first_epoch + 1, steps_per_epoch - offset)
        )
        first_epoch += 1
    if first_epoch < epochs:
        segments.append((first_epoch, epochs, steps_per_epoch))
    for initial_epoch, end_epoch, steps in segments:
        saver.start_segment(initial_epoch, step)
        part = fit_distributed(
            model,
            stream.skip(step),
            epochs=end_epoch,
            initial_epoch=initial_epoch,
            steps_per_epoch=steps,
            callbacks=[saver, *(callbacks or [])],
            verbose=progress_verbosity(verbose),
            **fit_kwargs,
        )
        history.epoch.extend(part.epoch)
        for key, values in part.history.items():
            history.history.setdefault(key, []).extend(values)
        step = end_epoch * steps_per_epoch
        if model.stop_training:  # e.g. EarlyStopping
            break
    return history


def progress_verbosity(verbose):
    """`model.fit`'s `verbose`, with "auto" resolved for where the output
    goes: the progress bar (1) on a terminal, one line per epoch (2)
    otherwise, so that a log file gets no carriage returns or ANSI escapes
    of a redrawn bar."""
    if verbose != "auto":
        return verbose
    stream = sys.stdout
    return 1 if hasattr(stream, "isatty") and stream.isatty() else 2
