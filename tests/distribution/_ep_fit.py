"""Keras `fit` over a GShard trainer on 8 virtual CPU devices.

Run by tests/distribution/test_expert_parallel_fit.py in a subprocess:

    python tests/distribution/_ep_fit.py

Trains the model of `_ep_gshard.py` on batch:2,expert:4 for 2 epochs of
2 batches of 16 with `ExpertParallelModel.fit` (validation data, History)
and, for comparison, with `train_step` / `test_step` by hand and with
plain Keras `model.fit` on one device (same model, initial weights, data
and optimizer). Prints one JSON line: the History, the hand-computed
epoch means, the largest weight difference between the first two runs,
the one-device History (its routing metrics are the reference), and the
token-choice layer's `max_load` worked out per device column (see
`per_column_max_load`).
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
from _ep_gshard import OPTIMIZERS  # noqa: E402
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
        optimizer=OPTIMIZERS["adam"](),
        loss=LOSS,
    )


def one_device_fit(x, y, x_val, y_val):
    """Plain Keras `fit` of the same model on CPU:0; its History."""
    model = make_model()
    model.compile(optimizer=OPTIMIZERS["adam"](), loss=LOSS, jit_compile=False)
    with tf.device("CPU:0"):
        history = model.fit(
            x,
            y,
            batch_size=16,
            epochs=2,
            shuffle=False,
            validation_data=(x_val, y_val),
            verbose=0,
        )
    return history.history


def per_column_max_load(x, y, x_val, y_val):
    """`moe_max_load` as the GShard layout computes it, from one device.

    On batch:2,expert:4 device (i, j) holds rows [2k, 2k + 2) of a batch
    of 16, k = 4i + j. A layer's statistics are reduced over `batch` by
    DTensor, so column j's expert shares are those of parts j and 4 + j
    together; the trainer averages the 4 columns' shares. Here each
    column's two parts go through the one-device model (routing groups
    are sequences, so they route as in the whole batch), trained with
    `train_on_batch` between the steps. Returns ([per epoch], [val]).
    """
    model = make_model()
    model.compile(optimizer=OPTIMIZERS["adam"](), loss=LOSS, jit_compile=False)
    layer = model.get_layer("moe")

    def shares(batch, training):
        columns = []
        for j in range(4):
            rows = np.concatenate(
                [batch[2 * j : 2 * j + 2], batch[8 + 2 * j :][:2]]
            )
            layer.load_tracker.reset_state()
            model(rows, training=training)
            columns.append(
                keras.ops.convert_to_numpy(layer.load_tracker.usage())
            )
        return np.mean(columns, axis=0)

    train, val = [], []
    with tf.device("CPU:0"):
        for _ in range(2):
            steps = []
            for i in (0, 16):
                steps.append(shares(x[i : i + 16], True))
                model.train_on_batch(x[i : i + 16], y[i : i + 16])
            train.append(float(np.max(np.mean(steps, axis=0)) * 8))
            val.append(float(np.max(shares(x_val, False)) * 8))
    return train, val


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
                "one_device": one_device_fit(x, y, x_val, y_val),
                "per_column_max_load": per_column_max_load(x, y, x_val, y_val),
            }
        )
    )


if __name__ == "__main__":
    main()
