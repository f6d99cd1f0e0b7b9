"""Keras `fit` / `evaluate` over an expert-parallel trainer (one device)."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from keras_moe.distribution.expert_parallel import ExpertParallelTrainer
from keras_moe.distribution.expert_parallel_fit import ExpertParallelModel
from keras_moe.distribution.mesh import make_mesh
from keras_moe.layers.moe import MoeLayer

TOLERANCE = 1e-5


def _model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4, 8))
    hidden = MoeLayer(
        4,
        16,
        dispatcher="einsum",
        router_kernel_initializer=keras.initializers.RandomNormal(stddev=1.0),
    )(inputs)
    outputs = keras.layers.Dense(3)(keras.layers.Flatten()(hidden))
    return keras.Model(inputs, outputs)


def _loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _trainer():
    return ExpertParallelTrainer(
        _model(),
        make_mesh(1, 1, devices=["CPU:0"]),
        optimizer=keras.optimizers.Adam(0.01),
        loss=_loss(),
    )


def _data(seed, count=8):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(count, 4, 8)).astype("float32")
    return x, rng.integers(0, 3, size=(count,)).astype("int32")


def test_fit_logs_the_trainers_losses_and_validation():
    """Epoch `loss` is the mean of the trainer's step losses on the same
    batches; `val_loss` is Keras' own `evaluate` of the synced model."""
    x, y = _data(0)
    x_val, y_val = _data(1)
    model = ExpertParallelModel(_trainer())
    history = model.fit(
        x,
        y,
        batch_size=4,
        epochs=2,
        shuffle=False,
        validation_data=(x_val, y_val),
        verbose=0,
    )
    assert sorted(history.history) == ["loss", "val_loss"]
    by_hand = _trainer()
    losses = [
        by_hand.train_step(x[i : i + 4], y[i : i + 4])
        for _ in range(2)
        for i in (0, 4)
    ]
    np.testing.assert_allclose(
        history.history["loss"],
        [np.mean(losses[:2]), np.mean(losses[2:])],
        atol=TOLERANCE,
    )
    # The wrapped model holds the trained weights: Keras evaluates it to
    # the same validation loss (model loss + MoE auxiliary losses).
    reference = model.inner
    reference.compile(loss=_loss(), jit_compile=False)
    want = reference.evaluate(
        x_val, y_val, batch_size=4, verbose=0, return_dict=True
    )["loss"]
    np.testing.assert_allclose(
        history.history["val_loss"][-1], want, atol=TOLERANCE
    )
    by_hand.sync_to_model()
    for ours, theirs in zip(
        model.inner.trainable_variables, by_hand.model.trainable_variables
    ):
        np.testing.assert_allclose(ours.numpy(), theirs.numpy(), atol=TOLERANCE)


def test_callbacks_checkpoint_stop_early_and_write_tensorboard(tmp_path):
    x, y = _data(0)
    trainer = _trainer()
    model = ExpertParallelModel(trainer)
    weights = str(tmp_path / "epoch_{epoch}.weights.h5")
    history = model.fit(
        x,
        y,
        batch_size=4,
        epochs=5,
        verbose=0,
        callbacks=[
            keras.callbacks.ModelCheckpoint(weights, save_weights_only=True),
            # No epoch improves by 1e9: training stops after the second.
            keras.callbacks.EarlyStopping(monitor="loss", min_delta=1e9),
            keras.callbacks.TensorBoard(str(tmp_path / "logs")),
        ],
    )
    assert len(history.history["loss"]) == 2
    assert trainer.step == 4
    # The checkpoint of the last epoch holds the trainer's weights.
    restored = ExpertParallelModel(_trainer())
    restored.load_weights(str(tmp_path / "epoch_2.weights.h5"))
    for ours, saved in zip(
        model.inner.trainable_variables, restored.inner.trainable_variables
    ):
        np.testing.assert_allclose(ours.numpy(), saved.numpy())
    assert os.listdir(tmp_path / "logs" / "train")


def test_batches_must_split_and_carry_labels():
    x, y = _data(0)
    model = ExpertParallelModel(_trainer())
    with pytest.raises(ValueError, match="trains on \\(x, y\\)"):
        model.fit(x, batch_size=4, epochs=1, verbose=0)
    with pytest.raises(ValueError, match="must be an ExpertParallelTrainer"):
        ExpertParallelModel(_model())


@pytest.mark.slow
def test_fit_on_eight_devices_matches_the_trainers_steps():
    """GShard on batch:2,expert:4 (8 virtual CPUs, in a subprocess):
    `fit` with validation logs the epoch means of `train_step` and the
    `test_step` loss, and trains to the same weights."""
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(
        os.environ,
        PYTHONPATH=os.path.dirname(os.path.dirname(here)),
        TF_CPP_MIN_LOG_LEVEL="2",
    )
    result = subprocess.run(
        [sys.executable, os.path.join(here, "_ep_fit.py")],
        capture_output=True,
        text=True,
        env=env,
        timeout=1200,
    )
    assert result.returncode == 0, result.stderr[-6000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["steps"] == 4
    np.testing.assert_allclose(
        report["history"]["loss"], report["loss"], atol=TOLERANCE
    )
    np.testing.assert_allclose(
        report["history"]["val_loss"], report["val_loss"], atol=TOLERANCE
    )
    assert report["max_weight_error"] < TOLERANCE


def test_docstring_example():
    import doctest

    import numpy

    from keras_moe.distribution import expert_parallel_fit

    result = doctest.testmod(
        expert_parallel_fit,
        extraglobs={"keras": keras, "np": numpy},
        optionflags=doctest.ELLIPSIS,
    )
    assert result.failed == 0 and result.attempted > 0


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))
