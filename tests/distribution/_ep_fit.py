"""Keras `fit` over a GShard trainer on 8 virtual CPU devices.

Run by tests/distribution/test_expert_parallel_fit.py in a subprocess:

    python tests/distribution/_ep_fit.py

Trains the model of `_ep_gshard.py` on batch:2,expert:4 for 2 epochs of
2 batches of 16 with `ExpertParallelModel.fit` (validation data, History)
and, for comparison, with `train_step` / `test_step` by hand. Prints one
JSON line: the History, the hand-computed epoch means, the largest
weight difference between the two runs.
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
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras  # noqa: E402
from _ep_gshard import LOSS  # noqa: E402
from _ep_gshard import make_model  # noqa: E402

from keras_moe.distribution.expert_parallel import (  # noqa: E402
    ExpertParallelTrainer,
)
from keras_moe.distribution.expert_parallel_fit import (  # noqa: E402
    ExpertParallelModel,
)


def trainer():
    return ExpertParallelTrainer(
        make_model(),
        "batch:2,expert:4",
        optimizer=keras.optimizers.Adam(0.01),
        loss=LOSS,
    )


def main():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(32, 6, 8)).astype("float32")
    y = rng.integers(0, 3, size=(32,)).astype("int32")
    x_val = rng.normal(size=(16, 6, 8)).astype("float32")
    y_val = rng.integers(0, 3, size=(16,)).astype("int32")
    fitted = trainer()
    history = ExpertParallelModel(fitted).fit(
        x,
        y,
        batch_size=16,
        epochs=2,
        shuffle=False,
        validation_data=(x_val, y_val),
        verbose=0,
    )
    by_hand = trainer()
    loss, val_loss = [], []
    for _ in range(2):
        steps = [
            by_hand.train_step(x[i : i + 16], y[i : i + 16]) for i in (0, 16)
        ]
        loss.append(float(np.mean(steps)))
        val_loss.append(by_hand.test_step(x_val, y_val))
    by_hand.sync_to_model()
    error = max(
        float(np.abs(a.numpy() - b.numpy()).max())
        for a, b in zip(
            fitted.model.trainable_variables,
            by_hand.model.trainable_variables,
        )
    )
    print(
        json.dumps(
            {
                "history": history.history,
                "loss": loss,
                "val_loss": val_loss,
                "steps": fitted.step,
                "max_weight_error": error,
            }
        )
    )


if __name__ == "__main__":
    main()
