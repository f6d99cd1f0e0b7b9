"""A small training run with `fit_resumable`, to be killed and restarted.

Run by tests/training/test_resumable.py:

    python tests/training/_train_resumable.py --backup_dir DIR --out OUT

trains a tiny MoE model (with dropout and router jitter noise, so that the
random seed states matter) for 3 epochs of 7 steps, saving every 4 steps,
and writes the final weights to OUT (.npz). Run again after a kill, it
resumes from the newest checkpoint. It prints one line per event, flushed:

    start <global step restored>    when training starts
    step <global step>       after each training step
    done <optimizer iterations>

`--step_delay` sleeps after each step, so that a kill sent after a "step"
line lands before the next checkpoint. `--hang_in_save N` stops inside the
save of step N, after the temporary file is written and before it is
renamed, and prints "hanging <temporary file>": the test kills it there.
"""

import argparse
import contextlib
import os
import sys
import time

import numpy as np

EPOCHS = 3
STEPS_PER_EPOCH = 7
SAVE_EVERY_STEPS = 4
BATCH = 4


def _model():
    import keras

    from keras_moe.layers.moe import MoeLayer

    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 8))
    x = keras.layers.Dense(8)(inputs)
    x = MoeLayer(
        num_experts=4,
        hidden_dim=16,
        num_selected_experts=2,
        jitter_noise=0.1,
        seed=3,
    )(x)
    x = keras.layers.Dropout(0.2, seed=4)(keras.layers.Flatten()(x))
    model = keras.Model(inputs, keras.layers.Dense(1)(x))
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    return model


def _dataset():
    import tensorflow as tf

    from keras_moe.data.shuffle import reproducible_shuffle

    rng = np.random.default_rng(0)
    # 40 examples: 10 batches, so epochs (7 steps) and passes over the data
    # do not line up; reshuffled on every pass.
    x = rng.normal(size=(40, 6, 8)).astype("float32")
    y = rng.normal(size=(40, 1)).astype("float32")
    examples = tf.data.Dataset.from_tensor_slices((x, y))
    stream = reproducible_shuffle(examples, buffer_size=40, seed=7)
    return stream.batch(BATCH, drop_remainder=True)


def main(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--backup_dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--step_delay", type=float, default=0.0)
    parser.add_argument("--hang_in_save", type=int, default=None)
    args = parser.parse_args(argv)

    import keras

    from keras_moe.training import resumable as fault_tolerance

    if args.hang_in_save is not None:
        atomic_path = fault_tolerance.atomic_path
        name = os.path.basename(
            fault_tolerance.checkpoint_path("", args.hang_in_save)
        )

        @contextlib.contextmanager
        def hanging_atomic_path(path, **kwargs):
            with atomic_path(path, **kwargs) as temp:
                yield temp
                # The temporary file is complete; the rename comes next.
                if os.path.basename(path) == name:
                    print(f"hanging {temp}", flush=True)
                    time.sleep(600)

        fault_tolerance.atomic_path = hanging_atomic_path

    model = _model()

    class Report(keras.callbacks.Callback):
        """Prints the global step (after the checkpoint of that step)."""

        step = None

        def on_train_begin(self, logs=None):
            if self.step is None:  # the first of fit_resumable's fit calls
                self.step = int(self.model.optimizer.iterations.numpy())
                print(f"start {self.step}", flush=True)

        def on_train_batch_end(self, batch, logs=None):
            self.step += 1
            print(f"step {self.step}", flush=True)
            time.sleep(args.step_delay)

    fault_tolerance.fit_resumable(
        model,
        _dataset(),
        epochs=EPOCHS,
        steps_per_epoch=STEPS_PER_EPOCH,
        backup_dir=args.backup_dir,
        save_every_steps=SAVE_EVERY_STEPS,
        callbacks=[Report()],
        verbose=0,
    )
    np.savez(args.out, *model.get_weights())
    print(f"done {int(model.optimizer.iterations.numpy())}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
