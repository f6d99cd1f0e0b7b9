"""Expert-parallel training on 8 virtual CPU devices vs one device.

Run by tests/distribution/test_expert_parallel.py in a subprocess (devices
can only be split before TensorFlow starts):

    python tests/distribution/_ep_train.py --out=/tmp/ep [--benchmark=5]

An upcycled `vit_tiny` (one MoE block of 8 experts) is trained for 3 steps
of Adam on the same batches by

* plain Keras on one device (`train_on_batch`): the reference;
* `ExpertParallelTrainer` on meshes batch:2,expert:4 and batch:1,expert:8;
* resumed runs: a checkpoint saved by the (2, 4) trainer after 2 steps is
  loaded by the (1, 8) trainer and restored on a one-device mesh, and each
  takes the third step.

Writes `<out>/results.npz` (losses and final weights of every run, shards,
layouts) and `<out>/summary.json`; with `--benchmark=N` also times N steps
of the (2, 4) and (1, 8) trainers and of the one-device Keras step.
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import tensorflow as tf

NUM_DEVICES = 8
_CPU = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    _CPU, [tf.config.LogicalDeviceConfiguration()] * NUM_DEVICES
)

from tensorflow.experimental import dtensor  # noqa: E402
from tensorflow.python.framework import error_interpolation  # noqa: E402

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
sys.path.insert(0, os.path.abspath(_ROOT))

import keras  # noqa: E402

from keras_moe.distribution import mesh as mesh_lib  # noqa: E402
from keras_moe.distribution.expert_parallel import (  # noqa: E402
    ExpertParallelTrainer,
)
from keras_moe.models.vit import ViT  # noqa: E402
from keras_moe.upcycling import upcycle  # noqa: E402

# A failed DTensor compilation reports the whole MLIR module (megabytes);
# TensorFlow's error interpolation then spends many minutes in a regex
# over it. Parse a prefix so that a failure is reported at once.
_parse_message = error_interpolation.parse_message
error_interpolation.parse_message = lambda m: _parse_message(m[:20000])

NUM_EXPERTS = 8
# Two images per device on 8 devices: with one image (one routing group)
# per device on batch:1,expert:8, DTensor cannot expand a forward-only
# trace (see ExpertParallelTrainer's limits).
BATCH = 16
LEARNING_RATE = 1e-3
STEPS = 3


def make_model():
    keras.utils.set_random_seed(0)
    dense = ViT.from_architecture("vit_tiny")
    # The head starts at zero: randomise it so every weight moves.
    head = dense.head.kernel
    head.assign(np.random.default_rng(1).normal(0, 0.1, head.shape))
    return upcycle(
        dense,
        num_experts=NUM_EXPERTS,
        expert_noise=0.1,
        moe_kwargs={"dispatcher": "einsum"},
    )


def make_optimizer():
    return keras.optimizers.Adam(LEARNING_RATE)


def make_loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def batches():
    rng = np.random.default_rng(2)
    return [
        (
            rng.normal(size=(BATCH, 32, 32, 3)).astype("float32"),
            rng.integers(0, 10, size=(BATCH,)).astype("int32"),
        )
        for _ in range(STEPS)
    ]


def weights(model):
    return [keras.ops.convert_to_numpy(v) for v in model.trainable_variables]


def trainer_weights(trainer):
    trainer.sync_to_model()
    return weights(trainer.model)


def reference(data):
    """Plain Keras on one device: losses, weights after 3 steps."""
    model = make_model()
    model.compile(
        optimizer=make_optimizer(), loss=make_loss(), jit_compile=False
    )
    losses = []
    with tf.device("CPU:0"):
        for x, y in data:
            logs = model.train_on_batch(x, y, return_dict=True)
            losses.append(float(logs["loss"]))
    return model, losses


def expert_rows(trainer, x):
    """The MoE layer's dispatched rows as they enter and leave the experts,
    from a forward pass of the trainer's own `_forward`."""
    captured = []
    for layer in trainer._moe_layers:
        hook = trainer._relayout_rows

        def spy(rows, to, hook=hook):
            rows = hook(rows, to)
            captured.append(rows)
            return rows

        layer.relayout_hook = spy

    @tf.function
    def forward(trainable, non_trainable, x):
        captured.clear()
        # `_forward` installs the trainer's hooks: call the model directly.
        trainer.model.stateless_call(trainable, non_trainable, x, training=True)
        return list(captured)

    try:
        rows = forward(
            trainer.trainable_values,
            trainer.non_trainable_values,
            trainer._shard_batch(x),
        )
    finally:
        for layer in trainer._moe_layers:
            layer.relayout_hook = None
    return [
        {
            "specs": dtensor.fetch_layout(r).sharding_specs,
            "global": list(r.shape),
            "shards": [list(s.shape) for s in dtensor.unpack(r)],
        }
        for r in rows
    ]


def progress(timings, name):
    print(f"{name}: {timings[name]:.1f} s", file=sys.stderr, flush=True)


def time_steps(step, count):
    step()  # traced and compiled
    start = time.perf_counter()
    for _ in range(count):
        step()
    return (time.perf_counter() - start) / count


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--benchmark", type=int, default=0)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    data = batches()
    results, summary, timings = {}, {}, {}

    for i, w in enumerate(weights(make_model())):
        results[f"initial/w{i}"] = w
    start = time.perf_counter()
    ref_model, ref_losses = reference(data)
    results["reference/losses"] = np.array(ref_losses)
    for i, w in enumerate(weights(ref_model)):
        results[f"reference/w{i}"] = w
    timings["reference"] = time.perf_counter() - start
    progress(timings, "reference")

    checkpoint = os.path.join(args.out, "step2.ckpt")
    for name, batch_size, expert_size in (("2x4", 2, 4), ("1x8", 1, 8)):
        start = time.perf_counter()
        mesh = mesh_lib.make_mesh(batch_size, expert_size)
        trainer = ExpertParallelTrainer(
            make_model(), mesh, optimizer=make_optimizer(), loss=make_loss()
        )
        losses = []
        for step, (x, y) in enumerate(data):
            losses.append(trainer.train_step(x, y))
            if name == "2x4" and step == 1:
                trainer.save(checkpoint)
        results[f"{name}/losses"] = np.array(losses)
        for i, w in enumerate(trainer_weights(trainer)):
            results[f"{name}/w{i}"] = w
        timings[name] = time.perf_counter() - start
        progress(timings, name)
        expert_variable = next(
            dv
            for v, dv in zip(
                trainer.model.trainable_variables, trainer._trainable
            )
            if v.path.endswith("experts/wi")
        )
        value = expert_variable.read_value()
        summary[f"{name}/expert_kernel"] = {
            "specs": dtensor.fetch_layout(value).sharding_specs,
            "global": list(value.shape),
            "shards": [list(s.shape) for s in dtensor.unpack(value)],
        }
        summary[f"{name}/expert_rows"] = expert_rows(trainer, data[0][0])
        if name == "1x8":
            # Resume the (2, 4) run's checkpoint on this (1, 8) trainer.
            start = time.perf_counter()
            trainer.load(checkpoint)
            summary["resumed_1x8/step_before"] = trainer.step
            results["resumed_1x8/loss"] = np.array(
                [trainer.train_step(*data[2])]
            )
            for i, w in enumerate(trainer_weights(trainer)):
                results[f"resumed_1x8/w{i}"] = w
            timings["resumed_1x8"] = time.perf_counter() - start
            progress(timings, "resumed_1x8")
        if args.benchmark and name in ("2x4", "1x8"):
            x, y = data[0]
            timings[f"step_{name}"] = time_steps(
                lambda t=trainer, x=x, y=y: t.train_step(x, y),
                args.benchmark,
            )

    start = time.perf_counter()
    one_device = ExpertParallelTrainer.restore(
        checkpoint,
        make_model(),
        mesh_lib.make_mesh(1, 1, devices=["CPU:0"]),
    )
    summary["resumed_1x1/step_before"] = one_device.step
    results["resumed_1x1/loss"] = np.array([one_device.train_step(*data[2])])
    for i, w in enumerate(trainer_weights(one_device)):
        results[f"resumed_1x1/w{i}"] = w
    timings["resumed_1x1"] = time.perf_counter() - start
    progress(timings, "resumed_1x1")
    if args.benchmark:
        x, y = data[0]
        timings["step_1x1"] = time_steps(
            lambda: one_device.train_step(x, y), args.benchmark
        )
        with tf.device("CPU:0"):
            timings["step_keras"] = time_steps(
                lambda: ref_model.train_on_batch(x, y), args.benchmark
            )

    summary["weight_paths"] = [v.path for v in ref_model.trainable_variables]
    summary["timings_s"] = timings
    np.savez(os.path.join(args.out, "results.npz"), **results)
    with open(os.path.join(args.out, "summary.json"), "w") as file:
        json.dump(summary, file, indent=1)
    print(json.dumps({"timings_s": timings}))


if __name__ == "__main__":
    main()
