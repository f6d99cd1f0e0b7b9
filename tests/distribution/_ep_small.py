"""A small MoE model on 8 virtual CPU devices: mesh checks and Adam steps.

Run by tests/distribution/test_expert_parallel.py in a subprocess:

    python tests/distribution/_ep_small.py

Prints one JSON line with

* the ValueError messages of a mesh whose expert axis does not divide a
  MoE layer's experts, of a batch that does not split over the mesh's
  devices (GShard layout; and the trainer's step count after it) or over
  its batch axis (replicated layout), and of a spec whose size is not
  the device count; the default devices;
* the losses and final weights of 3 Adam steps of a model with two MoE
  layers (token and expert choice) on the mesh batch:2,expert:4 and with
  plain Keras on one device.
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
from ep_models import two_moe_layers_model  # noqa: E402

from keras_moe.distribution import mesh as mesh_lib  # noqa: E402
from keras_moe.distribution.expert_parallel import (  # noqa: E402
    ExpertParallelTrainer,
)

LOSS = "sparse_categorical_crossentropy"


def model(num_experts, seed=0):
    return two_moe_layers_model(num_experts, seed)


def message(function):
    try:
        function()
    except ValueError as error:
        return str(error)
    return None


def to_list(values):
    return [np.asarray(v).tolist() for v in values]


def main():
    report = {
        "expert_axis": message(
            lambda: ExpertParallelTrainer(
                model(6), "batch:2,expert:4", loss=LOSS
            )
        ),
        "spec": message(lambda: mesh_lib.parse_mesh_spec("batch:3,expert:2")),
        "default_devices": mesh_lib.default_devices(),
    }
    trainer = ExpertParallelTrainer(model(8), "batch:4,expert:2", loss=LOSS)
    x = np.zeros((6, 6, 8), "float32")
    y = np.zeros((6,), "int32")
    report["batch_axis"] = message(lambda: trainer.train_step(x, y))
    report["steps_after_bad_batch"] = trainer.step
    replicated = ExpertParallelTrainer(
        model(8), "batch:4,expert:2", loss=LOSS, layout="replicated"
    )
    report["batch_axis_replicated"] = message(
        lambda: replicated.train_step(x, y)
    )

    rng = np.random.default_rng(1)
    data = [
        (
            rng.normal(size=(8, 6, 8)).astype("float32"),
            rng.integers(0, 3, size=(8,)).astype("int32"),
        )
        for _ in range(3)
    ]
    reference = model(8)
    reference.compile(
        optimizer=keras.optimizers.Adam(0.01), loss=LOSS, jit_compile=False
    )
    report["reference_losses"] = [
        float(reference.train_on_batch(x, y, return_dict=True)["loss"])
        for x, y in data
    ]
    report["reference_weights"] = to_list(reference.trainable_variables)
    trainer = ExpertParallelTrainer(
        model(8),
        "batch:2,expert:4",
        optimizer=keras.optimizers.Adam(0.01),
        loss=LOSS,
    )
    report["losses"] = trainer.fit(data)
    report["weights"] = to_list(trainer.model.trainable_variables)
    report["paths"] = [v.path for v in reference.trainable_variables]
    print(json.dumps(report))


if __name__ == "__main__":
    main()
