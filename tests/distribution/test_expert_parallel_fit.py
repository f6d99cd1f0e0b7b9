"""Keras `fit` / `evaluate` over an expert-parallel trainer: losses,
routing metrics and callbacks, on one device and (slow, in a subprocess)
on 8 virtual CPU devices."""

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

# Float32 sums in another order (DTensor's step vs Keras'), over a few
# Adam steps. The routing metrics `_dropped` and `_max_load` are ratios of
# token counts, exact once the routing decisions agree; `_confidence` is a
# mean of float32 probabilities, like the loss.
TOLERANCE = 1e-5
ROUTING = ("moe_dropped", "moe_confidence", "moe_max_load")


def _model(**moe_kwargs):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4, 8))
    hidden = MoeLayer(
        4,
        16,
        dispatcher="einsum",
        router_kernel_initializer=keras.initializers.RandomNormal(stddev=1.0),
        name="moe",
        **moe_kwargs,
    )(inputs)
    outputs = keras.layers.Dense(3)(keras.layers.Flatten()(hidden))
    return keras.Model(inputs, outputs)


def _loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _trainer(**moe_kwargs):
    return ExpertParallelTrainer(
        _model(**moe_kwargs),
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
    assert sorted(history.history) == sorted(
        [name for key in ("loss", *ROUTING) for name in (key, f"val_{key}")]
    )
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


def test_routing_metrics_equal_those_of_plain_fit():
    """On a one-device mesh, `fit` logs the MoE layer's routing metrics
    (train and validation) with the values of plain Keras `model.fit` of
    the same model, data and initial weights."""
    x, y = _data(0, count=16)
    x_val, y_val = _data(1)
    # Small capacities, so that tokens are dropped in both modes.
    capacities = dict(
        train_capacity_factor=0.5,
        eval_capacity_factor=1.0,
        min_expert_capacity=1,
    )
    fit_args = dict(
        batch_size=4,
        epochs=2,
        shuffle=False,
        validation_data=(x_val, y_val),
        verbose=0,
    )
    trainer = _trainer(**capacities)
    ours = ExpertParallelModel(trainer).fit(x, y, **fit_args).history
    plain = _model(**capacities)
    plain.compile(
        optimizer=keras.optimizers.Adam(0.01), loss=_loss(), jit_compile=False
    )
    theirs = plain.fit(x, y, **fit_args).history
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        np.testing.assert_allclose(
            ours[key], theirs[key], atol=TOLERANCE, err_msg=key
        )
    assert min(ours["moe_dropped"] + ours["val_moe_dropped"]) > 0.1
    # The layer's trackers hold the last evaluation's statistics, as
    # after Keras' own `fit`.
    layer = trainer.model.get_layer("moe")
    assert layer.routing_stats()["dropped"] == pytest.approx(
        ours["val_moe_dropped"][-1], abs=TOLERANCE
    )


def test_trainer_steps_update_the_routing_trackers():
    """`train_step` and `test_step` add each step's statistics to the MoE
    layer's trackers: after two steps they hold the mean of what each
    batch gives alone."""
    x, y = _data(0)
    trainer = _trainer(train_capacity_factor=0.5, min_expert_capacity=1)
    layer = trainer.model.get_layer("moe")
    per_batch = []
    for i in (0, 4):
        for metric in trainer.layer_metrics:
            metric.reset_state()
        trainer.test_step(x[i : i + 4], y[i : i + 4])
        per_batch.append(layer.routing_stats())
    for metric in trainer.layer_metrics:
        metric.reset_state()
    for i in (0, 4):
        trainer.test_step(x[i : i + 4], y[i : i + 4])
    both = layer.routing_stats()
    for name in ("dropped", "confidence", "expert_usage"):
        np.testing.assert_allclose(
            both[name],
            np.mean([stats[name] for stats in per_batch], axis=0),
            atol=1e-6,
        )
    assert layer.dropped_tracker.count.numpy() == 2
    trainer.train_step(x[:4], y[:4])
    assert layer.dropped_tracker.count.numpy() == 3


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
    `test_step` loss, and trains to the same weights; its routing metrics
    are those of plain `fit` on one device, except the token-choice
    layer's `max_load`, which is the mean of the 4 expert-axis columns'
    shares (see `_ep_fit.per_column_max_load`)."""
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
    history, one_device = report["history"], report["one_device"]
    assert sorted(history) == sorted(one_device)
    # "moe": token choice (K=2), "moe_2": expert choice. Routing groups are
    # sequences, so every device routes its examples as one device does.
    # A device's share of dropped tokens and its mean confidence are over
    # its own tokens, the same number on every device: their mean is the
    # one-device value. Expert shares are over a device's filled slots:
    # expert choice fills E*C per group everywhere (exact), token choice
    # fills as many as the device's tokens kept (per-column value).
    exact = ["loss", "moe_dropped", "moe_confidence"]
    exact += ["moe_2_dropped", "moe_2_confidence", "moe_2_max_load"]
    for key in exact + [f"val_{key}" for key in exact]:
        np.testing.assert_allclose(
            history[key], one_device[key], atol=TOLERANCE, err_msg=key
        )
    train, val = report["per_column_max_load"]
    np.testing.assert_allclose(history["moe_max_load"], train, atol=TOLERANCE)
    np.testing.assert_allclose(history["val_moe_max_load"], val, atol=1e-5)
    # Both are close to the one-device shares (measured: 3e-4 to 1.2e-3).
    for key in ("moe_max_load", "val_moe_max_load"):
        np.testing.assert_allclose(history[key], one_device[key], atol=5e-3)


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
