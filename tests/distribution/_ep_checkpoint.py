"""Sharded checkpoints of the expert-parallel trainer on 8 virtual CPUs.

Run by tests/distribution/test_expert_parallel_checkpoint.py in a
subprocess (TensorFlow's devices can only be split before it starts):

    python tests/distribution/_ep_checkpoint.py mesh --out DIR

trains 2 Adam steps on `batch:2,expert:4`, saves, takes a third step,
restores the checkpoint onto `batch:1,expert:8` and onto one device
(`batch:1,expert:1`, CPU:0) and takes the third step there too. Writes
`DIR/results.npz` (every state variable at the save, after restoring on
each mesh and after each third step; the step losses) and
`DIR/summary.json` (steps, layouts, timings, and for the checkpoints
written on 2x4, 1x8 and 1x1: the size of each data file and which files hold
the bytes of each expert shard of the expert kernels and their Adam
slots, and which hold a whole kernel). Then it does what the train mode
does, uninterrupted, with `DIR/reference` and `DIR/reference.npz`.

    python tests/distribution/_ep_checkpoint.py train --backup DIR \\
        --out FILE [--hang_in_save STEP]

`train_resumable` on `batch:2,expert:4`: 6 steps over a fixed sequence of
batches, a checkpoint every 2 steps (newest 2 kept). Prints `start N`
(the step it resumed at), `step N` after each step, `done N`; writes every
state variable and the step to FILE. `--hang_in_save STEP` stops inside
the save of STEP, after the checkpoint files are written and before the
directory is renamed into place, printing `hanging <temporary dir>`.
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import tensorflow as tf

_CPU = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    _CPU, [tf.config.LogicalDeviceConfiguration()] * 8
)

sys.path.insert(
    0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
)

import keras  # noqa: E402
from ep_models import one_moe_layer_model  # noqa: E402
from tensorflow.experimental import dtensor  # noqa: E402

from keras_moe.distribution import mesh as mesh_lib  # noqa: E402
from keras_moe.distribution.checkpointing import train_resumable  # noqa: E402
from keras_moe.distribution.expert_parallel import (  # noqa: E402
    ExpertParallelTrainer,
)

NUM_EXPERTS = 8
BATCH = 16
TOTAL_STEPS = 6
EVERY = 2


def make_model(seed=0):
    return one_moe_layer_model(NUM_EXPERTS, seed)


def make_trainer(mesh, seed=0):
    return ExpertParallelTrainer(
        make_model(seed),
        mesh,
        optimizer=keras.optimizers.Adam(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )


def batches(count):
    rng = np.random.default_rng(7)
    return [
        (
            rng.normal(size=(BATCH, 6, 8)).astype("float32"),
            rng.integers(0, 3, size=(BATCH,)).astype("int32"),
        )
        for _ in range(count)
    ]


def whole(value):
    layout = dtensor.fetch_layout(value)
    replicated = mesh_lib.replicated_layout(layout.mesh, value.shape.rank)
    return dtensor.unpack(dtensor.relayout(value, replicated))[0].numpy()


def state(trainer):
    """{name: whole value} of every state variable, and the step."""
    values = {"step": np.array(trainer.step)}
    for prefix, dvariables in trainer._state_variables().items():
        for i, dvariable in enumerate(dvariables):
            values[f"{prefix}/{i}"] = whole(dvariable.read_value())
    return values


def expert_kernels(trainer):
    """[(name, whole value)] of the expert kernels <[E, D, H]>, <[E, H, D]>
    and of their Adam slots."""
    found = []
    variables = trainer.model.trainable_variables
    for i, variable in enumerate(variables):
        if variable.path.endswith(("experts/wi", "experts/wo")):
            found.append((variable.path, whole(trainer._trainable[i])))
            for name, slot in trainer._optimizer.slots[i].items():
                found.append(
                    (f"{variable.path}/{name}", whole(slot.read_value()))
                )
    return found


def shard_files(trainer, path):
    """Where the bytes of each expert shard of each kernel are in the data
    files of the checkpoint at `path`, and the files' sizes."""
    data_files = sorted(
        name for name in os.listdir(path) if name.startswith("state.data-")
    )
    contents = {}
    for name in data_files:
        with open(os.path.join(path, name), "rb") as file:
            contents[name] = file.read()
    shards = trainer.mesh.dim_size(mesh_lib.EXPERT_AXIS)
    kernels = {}
    for name, value in expert_kernels(trainer):
        pieces = np.split(value, shards, axis=0)
        kernels[name] = {
            "shard_files": [
                [f for f in data_files if piece.tobytes() in contents[f]]
                for piece in pieces
            ],
            "whole_in": [
                f for f in data_files if value.tobytes() in contents[f]
            ],
        }
    reader = tf.train.load_checkpoint(os.path.join(path, "state"))
    return {
        "data_files": {name: len(contents[name]) for name in data_files},
        "kernels": kernels,
        # What the files must hold when every value is written once.
        "value_bytes": sum(v.nbytes for v in state(trainer).values())
        - np.array(trainer.step).nbytes,
        "object_graph_bytes": len(
            reader.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH")
        ),
    }


def layouts(trainer):
    return [
        dtensor.fetch_layout(v.read_value()).sharding_specs
        for v in trainer._trainable
    ]


def run_mesh(out):
    os.makedirs(out, exist_ok=True)
    data = batches(3)
    results, summary = {}, {"timings_s": {}}
    trainer = make_trainer("batch:2,expert:4")
    losses = [trainer.train_step(*batch) for batch in data[:2]]
    path = os.path.join(out, "ckpt_2x4")
    start = time.perf_counter()
    assert trainer.save(path) == path
    summary["timings_s"]["save_2x4"] = time.perf_counter() - start
    summary["files_2x4"] = shard_files(trainer, path)
    summary["listing_2x4"] = sorted(os.listdir(path))
    with open(os.path.join(path, "meta.json")) as file:
        summary["meta"] = json.load(file)
    for name, value in state(trainer).items():
        results[f"saved/{name}"] = value
    losses.append(trainer.train_step(*data[2]))
    results["original/losses"] = np.array(losses)
    for name, value in state(trainer).items():
        results[f"original/{name}"] = value
    summary["layouts_2x4"] = layouts(trainer)

    for label, mesh in (
        ("1x8", "batch:1,expert:8"),
        ("1x1", mesh_lib.make_mesh(1, 1, devices=["CPU:0"])),
    ):
        start = time.perf_counter()
        # Another seed: every value must come from the checkpoint.
        resumed = ExpertParallelTrainer.restore(path, make_model(seed=5), mesh)
        summary["timings_s"][f"restore_{label}"] = time.perf_counter() - start
        summary[f"layouts_{label}"] = layouts(resumed)
        for name, value in state(resumed).items():
            results[f"restored_{label}/{name}"] = value
        results[f"restored_{label}/loss"] = np.array(
            resumed.train_step(*data[2])
        )
        for name, value in state(resumed).items():
            results[f"next_{label}/{name}"] = value
        # Saved again: on 1x8 eight shards; on one device the kernels
        # are whole (the control that shows whole kernels are found).
        resaved = os.path.join(out, f"ckpt_{label}")
        resumed.save(resaved)
        summary[f"files_{label}"] = shard_files(resumed, resaved)
    np.savez(os.path.join(out, "results.npz"), **results)
    with open(os.path.join(out, "summary.json"), "w") as file:
        json.dump(summary, file, indent=1)


class _Printer(keras.callbacks.Callback):
    def __init__(self, trainer):
        super().__init__()
        self.trainer = trainer

    def on_train_begin(self, logs=None):
        print(f"start {self.trainer.step}", flush=True)

    def on_train_batch_end(self, batch, logs=None):
        print(f"step {self.trainer.step}", flush=True)


def _hang_in_save(step):
    write = tf.train.Checkpoint.write

    def hanging_write(self, prefix, options=None):
        written = write(self, prefix, options)
        if int(whole(self.optimizer[0].read_value())) == step:
            print(f"hanging {os.path.dirname(prefix)}", flush=True)
            time.sleep(600)
        return written

    tf.train.Checkpoint.write = hanging_write


def run_train(backup, out):
    trainer = make_trainer("batch:2,expert:4")
    dataset = tf.data.Dataset.from_tensor_slices(
        tuple(np.stack(part) for part in zip(*batches(TOTAL_STEPS)))
    )
    train_resumable(
        trainer,
        dataset,
        TOTAL_STEPS,
        backup,
        EVERY,
        callbacks=[_Printer(trainer)],
    )
    np.savez(out, **state(trainer))
    print(f"done {trainer.step}", flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["mesh", "train"])
    parser.add_argument("--out", required=True)
    parser.add_argument("--backup")
    parser.add_argument("--hang_in_save", type=int, default=0)
    args = parser.parse_args()
    if args.mode == "mesh":
        run_mesh(args.out)
        # The uninterrupted run the train mode's runs are compared with.
        run_train(
            os.path.join(args.out, "reference"),
            os.path.join(args.out, "reference.npz"),
        )
    else:
        if args.hang_in_save:
            _hang_in_save(args.hang_in_save)
        run_train(args.backup, args.out)


if __name__ == "__main__":
    main()
