"""GShard expert parallelism on 8 virtual CPU devices vs one device.

Run by tests/distribution/test_expert_parallel_gshard.py in a subprocess
(devices can only be split before TensorFlow starts):

    python tests/distribution/_ep_gshard.py

A small model (dense projection, self-attention, a token-choice MoE layer
with einsum dispatch, an expert-choice MoE layer with index dispatch and a
head) is trained for 3 steps by `ExpertParallelTrainer(layout="gshard")`
on the meshes batch:1,expert:8, batch:2,expert:4 and batch:8,expert:1, and
by plain Keras (`train_on_batch`) on one device with the same optimizer.

Prints one JSON line with, per run (`<mesh>/<optimizer>`), the losses and
the largest weight difference from the one-device run, how far the kernels
moved, and, per mesh, the per-device shapes and layouts of the values
entering the attention layer, each router and each experts layer in one
forward pass, and whether the values entering attention and the routers,
put back together in device order, equal the one-device model's.
"""

import json
import os
import sys

import numpy as np
import tensorflow as tf

NUM_DEVICES = 8
_CPU = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    _CPU, [tf.config.LogicalDeviceConfiguration()] * NUM_DEVICES
)

from tensorflow.experimental import dtensor  # noqa: E402

sys.path.insert(
    0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
)

import keras  # noqa: E402

from keras_moe.distribution import mesh as mesh_lib  # noqa: E402
from keras_moe.distribution.expert_parallel import (  # noqa: E402
    ExpertParallelTrainer,
)
from keras_moe.layers.moe import MoeLayer  # noqa: E402

LOSS = "sparse_categorical_crossentropy"
BATCH = 16
STEPS = 3
MESHES = {"1x8": (1, 8), "2x4": (2, 4), "8x1": (8, 1)}
OPTIMIZERS = {
    "adam": lambda: keras.optimizers.Adam(0.01),
    "adafactor": lambda: keras.optimizers.Adafactor(0.05),
    "sgd": lambda: keras.optimizers.SGD(0.1),
    "sgd_nesterov": lambda: keras.optimizers.SGD(
        0.1, momentum=0.9, nesterov=True
    ),
    "adamw": lambda: keras.optimizers.AdamW(0.01, weight_decay=0.1),
}
# Every mesh with Adam and Adafactor; every optimizer on batch:2,expert:4.
RUNS = [(mesh, opt) for mesh in MESHES for opt in ("adam", "adafactor")] + [
    ("2x4", opt) for opt in ("sgd", "sgd_nesterov", "adamw")
]


def make_model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 8))
    hidden = keras.layers.Dense(8, name="embed")(inputs)
    attended = keras.layers.MultiHeadAttention(2, 4, name="attention")(
        hidden, hidden
    )
    hidden = keras.layers.Add()([hidden, attended])
    hidden = MoeLayer(
        8,
        16,
        num_selected_experts=2,
        dispatcher="einsum",
        router_kernel_initializer=keras.initializers.RandomNormal(stddev=1.0),
        name="moe",
    )(hidden)
    hidden = MoeLayer(
        8,
        16,
        router="experts_choose",
        dispatcher="indices",
        use_bias=True,
        router_kernel_initializer=keras.initializers.RandomNormal(stddev=1.0),
        name="moe_2",
    )(hidden)
    outputs = keras.layers.Dense(3, activation="softmax", name="head")(
        keras.layers.Flatten()(hidden)
    )
    return keras.Model(inputs, outputs, name="model")


def batches():
    rng = np.random.default_rng(1)
    return [
        (
            rng.normal(size=(BATCH, 6, 8)).astype("float32"),
            rng.integers(0, 3, size=(BATCH,)).astype("int32"),
        )
        for _ in range(STEPS)
    ]


def weights(model):
    return [keras.ops.convert_to_numpy(v) for v in model.trainable_variables]


def reference(optimizer, data):
    model = make_model()
    model.compile(
        optimizer=OPTIMIZERS[optimizer](), loss=LOSS, jit_compile=False
    )
    with tf.device("CPU:0"):
        losses = [
            float(model.train_on_batch(x, y, return_dict=True)["loss"])
            for x, y in data
        ]
    return losses, weights(model)


def _spy(layer, name, captured):
    """Records the first input of `layer.call` under `name`."""
    call = layer.call

    def spied(inputs, *args, **kwargs):
        captured.append((name, inputs))
        return call(inputs, *args, **kwargs)

    layer.call = spied
    return layer


def inputs_seen(trainer, x):
    """Per-device shapes of what enters attention, routers and experts."""
    model = trainer.model
    captured = []
    spied = [_spy(model.get_layer("attention"), "attention", captured)]
    for layer in trainer._moe_layers:
        spied.append(_spy(layer.router, f"{layer.name}/router", captured))
        spied.append(_spy(layer.experts, f"{layer.name}/experts", captured))

    @tf.function
    def forward(trainable, non_trainable, x):
        captured.clear()
        trainer._forward(trainable, non_trainable, x, True)
        return [value for _, value in captured]

    values = forward(
        trainer.trainable_values,
        trainer.non_trainable_values,
        trainer._shard_batch(x),
    )
    names = [name for name, _ in captured]
    for layer in spied:
        del layer.call  # the class's own `call` again
    return {
        name: {
            "specs": dtensor.fetch_layout(value).sharding_specs,
            "shards": [list(s.shape) for s in dtensor.unpack(value)],
            "values": [s.numpy() for s in dtensor.unpack(value)],
        }
        for name, value in zip(names, values)
    }


def one_device_inputs(x):
    """What enters attention and the routers on one device."""
    model = make_model()
    captured = []
    _spy(model.get_layer("attention"), "attention", captured)
    for name in ("moe", "moe_2"):
        _spy(model.get_layer(name).router, f"{name}/router", captured)
    with tf.device("CPU:0"):
        model(x, training=True)
    return {name: keras.ops.convert_to_numpy(v) for name, v in captured}


def main():
    data = batches()
    report = {"runs": {}, "inputs": {}}
    references = {}
    for mesh_name, optimizer in RUNS:
        if optimizer not in references:
            references[optimizer] = reference(optimizer, data)
        ref_losses, ref_weights = references[optimizer]
        initial = weights(make_model())
        trainer = ExpertParallelTrainer(
            make_model(),
            mesh_lib.make_mesh(*MESHES[mesh_name]),
            optimizer=OPTIMIZERS[optimizer](),
            loss=LOSS,
        )
        if optimizer == "adam":
            # Before any step: the one-device model has the same weights.
            seen = inputs_seen(trainer, data[0][0])
            whole = one_device_inputs(data[0][0])
            for name, record in seen.items():
                values = record.pop("values")
                if name in whole:
                    # Device (i, j) holds part i*n + j of the batch.
                    record["matches_one_device"] = bool(
                        np.allclose(
                            np.concatenate(values), whole[name], atol=1e-5
                        )
                    )
            report["inputs"][mesh_name] = seen
        losses = [trainer.train_step(x, y) for x, y in data]
        trainer.sync_to_model()
        got = weights(trainer.model)
        paths = [v.path for v in trainer.model.trainable_variables]
        report["runs"][f"{mesh_name}/{optimizer}"] = {
            "losses": losses,
            "reference_losses": ref_losses,
            "weight_errors": {
                path: float(np.abs(a - b).max())
                for path, a, b in zip(paths, got, ref_weights)
            },
            "weight_changes": {
                path: float(np.abs(a - b).max())
                for path, a, b in zip(paths, ref_weights, initial)
            },
        }
        print(mesh_name, optimizer, file=sys.stderr, flush=True)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
