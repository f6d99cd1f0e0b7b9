"""Mesh checks that need several devices (8 virtual CPUs).

Run by tests/distribution/test_expert_parallel.py in a subprocess:

    python tests/distribution/_ep_bad_inputs.py

Prints one JSON line: the ValueError messages of a mesh whose expert axis
does not divide a MoE layer's experts, of a batch that does not split over
the batch axis (and the trainer's step count after it), and of a spec
whose size is not the device count; the default devices.
"""

import json
import os
import sys

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

from keras_moe.distribution import mesh as mesh_lib  # noqa: E402
from keras_moe.distribution.expert_parallel import (  # noqa: E402
    ExpertParallelTrainer,
)
from keras_moe.layers.moe import MoeLayer  # noqa: E402


def model(num_experts):
    inputs = keras.Input((6, 8))
    hidden = MoeLayer(num_experts, 16, name="moe")(inputs)
    outputs = keras.layers.Dense(3)(keras.layers.Flatten()(hidden))
    return keras.Model(inputs, outputs, name="model")


def message(function):
    try:
        function()
    except ValueError as error:
        return str(error)
    return None


def main():
    loss = "sparse_categorical_crossentropy"
    report = {
        "expert_axis": message(
            lambda: ExpertParallelTrainer(model(6), "batch:2,expert:4", loss=loss)
        ),
        "spec": message(lambda: mesh_lib.parse_mesh_spec("batch:3,expert:2")),
        "default_devices": mesh_lib.default_devices(),
    }
    trainer = ExpertParallelTrainer(model(8), "batch:4,expert:2", loss=loss)
    x = np.zeros((6, 6, 8), "float32")
    y = np.zeros((6,), "int32")
    report["batch_axis"] = message(lambda: trainer.train_step(x, y))
    report["steps_after_bad_batch"] = trainer.step
    print(json.dumps(report))


if __name__ == "__main__":
    main()
