"""GShard expert parallelism: every device holds its own part of the batch.

The eight-device checks run `_ep_gshard.py` in a subprocess with 8 virtual
CPU devices (TensorFlow's devices can only be split before it starts, and
pytest shares one process); the one-device and argument checks run here.
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_moe.distribution import mesh as mesh_lib
from keras_moe.distribution.expert_parallel import DTensorOptimizer
from keras_moe.distribution.expert_parallel import ExpertParallelTrainer
from keras_moe.layers.moe import MoeLayer

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(os.path.dirname(_HERE))
TOLERANCE = 1e-5
LOSS = "sparse_categorical_crossentropy"


@pytest.fixture(scope="module")
def gshard_run():
    env = dict(os.environ, PYTHONPATH=_ROOT, TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run(
        [sys.executable, os.path.join(_HERE, "_ep_gshard.py")],
        capture_output=True,
        text=True,
        env=env,
        timeout=1500,
    )
    assert result.returncode == 0, result.stderr[-6000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


# Meshes, batch rows per device (16 / 8) and experts per device (8 / n).
_MESHES = {"1x8": 8, "2x4": 4, "8x1": 1}


@pytest.mark.slow
@pytest.mark.parametrize("mesh", sorted(_MESHES))
def test_every_device_holds_an_eighth_of_the_tokens(gshard_run, mesh):
    """Per-device shards of the values entering attention, the routers and
    the experts, recorded in one forward pass of the training step."""
    seen = gshard_run["inputs"][mesh]
    expert_size = _MESHES[mesh]
    # 16 sequences of 6 tokens, D = 8: 2 sequences per device.
    assert seen["attention"]["shards"] == [[2, 6, 8]] * 8
    for layer in ("moe", "moe_2"):
        # Groups are sequences: 2 groups of S = 6 tokens per device.
        assert seen[f"{layer}/router"]["shards"] == [[2, 6, 8]] * 8
    for name in ("attention", "moe/router", "moe_2/router"):
        # Put back together in device order, they are the batch.
        assert seen[name]["matches_one_device"], name
    # Experts: E / n experts per device, each with the rows of the n
    # devices of its batch row: 2 groups * C slots from each, where
    # C = max(ceil(2 * 6 * 1.25 / 8), 4) = 4 (token choice) and
    # max(ceil(6 * 1.25 / 8), 4) = 4 (expert choice): min_expert_capacity.
    for layer in ("moe", "moe_2"):
        record = seen[f"{layer}/experts"]
        assert record["specs"] == ["expert", "batch", "unsharded"]
        rows = 2 * 4 * expert_size
        assert record["shards"] == [[8 // expert_size, rows, 8]] * 8


# Attention key biases have an exact gradient of zero (adding a constant
# to all scores of a query does not change its softmax): what they get is
# float noise, which each run scales on its own.
_NOISE_ONLY = "attention/key/bias"
_NOISE_BOUND = {
    # 2 runs * 3 steps * lr (an Adam step is at most about lr).
    "adam": 2 * 3 * 0.01,
    "adamw": 2 * 3 * 0.01,
    # 2 runs * 3 steps * lr * max(1e-3, RMS of a bias near 0), plus 1%.
    "adafactor": 2 * 3 * 0.05 * 1e-3 * 1.01,
    "sgd": TOLERANCE,
    "sgd_nesterov": TOLERANCE,
}

_RUNS = [
    (mesh, optimizer)
    for mesh in sorted(_MESHES)
    for optimizer in ("adam", "adafactor")
] + [("2x4", optimizer) for optimizer in ("sgd", "sgd_nesterov", "adamw")]


@pytest.mark.slow
@pytest.mark.parametrize("mesh,optimizer", _RUNS)
def test_three_steps_match_one_device(gshard_run, mesh, optimizer):
    """Losses and weights after 3 steps equal Keras' own optimizer's on one
    device, and every kernel moved by far more than that difference."""
    run = gshard_run["runs"][f"{mesh}/{optimizer}"]
    np.testing.assert_allclose(
        run["losses"], run["reference_losses"], atol=TOLERANCE
    )
    for path, error in run["weight_errors"].items():
        if path.endswith(_NOISE_ONLY):
            # Adam and Adafactor divide by the root of the squared
            # gradient: a float-noise gradient gives steps of up to the
            # learning rate (Adafactor: times max(1e-3, RMS) = 1e-3 here).
            assert error < _NOISE_BOUND[optimizer], path
        else:
            assert error < TOLERANCE, (path, error)
    # Not vacuous: every kernel moved by at least 100 times its difference
    # from the one-device run (SGD moves the routers by about 1e-5).
    changes = run["weight_changes"]
    for path, change in changes.items():
        if path.endswith(("kernel", "experts/wi", "experts/wo")):
            error = run["weight_errors"][path]
            assert change > 100 * error and change > 0, (path, change)


# One device and arguments ----------------------------------------------------


def _model(num_experts=4, moe=True):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4, 8))
    hidden = inputs
    if moe:
        hidden = MoeLayer(num_experts, 16, dispatcher="einsum")(hidden)
    outputs = keras.layers.Dense(3)(keras.layers.Flatten()(hidden))
    return keras.Model(inputs, outputs)


def _one_device():
    return mesh_lib.make_mesh(1, 1, devices=["CPU:0"])


def test_model_without_moe_layers_is_refused():
    with pytest.raises(ValueError, match="has no MoeLayer"):
        ExpertParallelTrainer(_model(moe=False), _one_device(), loss=LOSS)


def test_unknown_layout_is_refused():
    with pytest.raises(ValueError, match="layout must be one of"):
        ExpertParallelTrainer(
            _model(), _one_device(), loss=LOSS, layout="sharded"
        )


def test_mesh_larger_than_the_devices_is_refused():
    count = len(mesh_lib.default_devices())
    with pytest.raises(
        ValueError,
        match=f"2 \\* 8 = 16 devices but {count} are available",
    ):
        ExpertParallelTrainer(_model(), "batch:2,expert:8", loss=LOSS)


@pytest.mark.parametrize("layout", ["gshard", "replicated"])
def test_one_device_adafactor_matches_keras(layout):
    """Adafactor (factored second moments for kernels, unfactored for
    biases, relative step) on a 1 x 1 mesh vs Keras' own Adafactor."""
    rng = np.random.default_rng(0)
    data = [
        (
            rng.normal(size=(4, 4, 8)).astype("float32"),
            rng.integers(0, 3, size=(4,)).astype("int32"),
        )
        for _ in range(3)
    ]
    reference = _model()
    reference.compile(
        optimizer=keras.optimizers.Adafactor(0.05),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=False,
    )
    want = [
        float(reference.train_on_batch(x, y, return_dict=True)["loss"])
        for x, y in data
    ]
    initial = [v.numpy() for v in _model().trainable_variables]
    trainer = ExpertParallelTrainer(
        _model(),
        _one_device(),
        optimizer=keras.optimizers.Adafactor(0.05),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        layout=layout,
    )
    got = [trainer.train_step(x, y) for x, y in data]
    np.testing.assert_allclose(got, want, atol=TOLERANCE)
    trainer.sync_to_model()
    for ours, theirs, start in zip(
        trainer.model.trainable_variables,
        reference.trainable_variables,
        initial,
    ):
        np.testing.assert_allclose(
            ours.numpy(), theirs.numpy(), atol=TOLERANCE, err_msg=ours.path
        )
        if start.ndim >= 2:
            # Kernels move by far more than the tolerance; zero biases
            # only by about 1e-3 * lr (steps scale with the weight's RMS).
            assert np.abs(theirs.numpy() - start).max() > 100 * TOLERANCE


def test_adafactor_slots_are_factored_and_follow_their_weight():
    optimizer = DTensorOptimizer(keras.optimizers.Adafactor())
    mesh = _one_device()
    kernel = tf.Variable(tf.zeros((4, 3, 5)))
    bias = tf.Variable(tf.zeros((5,)))
    layouts = [
        mesh_lib.expert_weight_layout(mesh, 3),
        mesh_lib.replicated_layout(mesh, 1),
    ]
    specs = optimizer._slot_specs(kernel, layouts[0])
    assert {name: shape for name, (shape, _) in specs.items()} == {
        "r": (4, 3),
        "c": (4, 5),
        "v": (4, 3, 5),
    }
    assert specs["r"][1].sharding_specs == ["expert", "unsharded"]
    assert specs["c"][1].sharding_specs == ["expert", "unsharded"]
    bias_specs = optimizer._slot_specs(bias, layouts[1])
    assert {name: shape for name, (shape, _) in bias_specs.items()} == {
        "r": (),
        "c": (),
        "v": (5,),
    }


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))
