"""The MoE layers on Keras' other backends.

Routing, the auxiliary losses, `MoeLayer` (with its `keras.ops` einsum
dispatcher) and `keras_moe.upcycle` run on any Keras backend. The checks in
this module use only `keras.ops` and NumPy, so they hold on every backend:
the suite runs them on TensorFlow, and `test_checks_pass_under_torch` runs
this module again in a process whose `KERAS_BACKEND` is torch. What exists
only on TensorFlow (the index and dropless dispatchers, XLA functions,
tf.distribute, DTensor, SavedModel export) is refused there with a
ValueError naming the backend.
"""

import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
from keras import ops

import keras_moe
from keras_moe.layers import MoeLayer
from keras_moe.layers import losses
from keras_moe.layers import routing
from keras_moe.layers.ensemble import EnsembleMoeLayer
from tests.layers import reference_routing as ref
from tests.layers.reference_losses import np_importance
from tests.layers.reference_losses import np_load
from tests.layers.reference_losses import np_load_balancing
from tests.layers.reference_losses import np_z_loss
from tests.layers.reference_moe import np_moe
from tests.tiny_models import images
from tests.tiny_models import tiny_vit

BACKEND = keras.backend.backend()
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))


def _probs(seed, shape):
    logits = np.random.default_rng(seed).normal(size=shape) * 2.0
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    return (probs / probs.sum(-1, keepdims=True)).astype("float32")


def _arrays(instructions):
    return (
        ops.convert_to_numpy(instructions.combine_array()),
        ops.convert_to_numpy(instructions.dispatch_array()),
    )


@pytest.mark.parametrize(
    "k, capacity, batch_priority, normalize",
    [(1, 3, False, False), (2, 3, True, False), (2, 2, False, True)],
)
def test_tokens_choose_matches_the_reference(
    k, capacity, batch_priority, normalize
):
    probs = _probs(0, (2, 10, 4))
    combine, dispatch = _arrays(
        routing.tokens_choose(
            ops.convert_to_tensor(probs),
            k,
            capacity,
            batch_priority=batch_priority,
            normalize_combine_weights=normalize,
        )
    )
    expected = ref.tokens_choose(
        probs, k, capacity, batch_priority=batch_priority, normalize=normalize
    )
    assert expected.num_dropped > 0  # capacity is tight: drops are exercised
    np.testing.assert_array_equal(dispatch, expected.dispatch)
    np.testing.assert_allclose(combine, expected.combine, atol=1e-6)


def test_experts_choose_matches_the_reference():
    probs = _probs(1, (2, 10, 4))
    combine, dispatch = _arrays(
        routing.experts_choose(ops.convert_to_tensor(probs), 3)
    )
    expected = ref.experts_choose(probs, 3)
    np.testing.assert_array_equal(dispatch, expected.dispatch)
    np.testing.assert_allclose(combine, expected.combine, atol=1e-6)


def test_auxiliary_losses_match_numpy():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(2, 12, 4)).astype("float32")
    probs = _probs(3, (2, 12, 4))
    indices = np.argsort(-probs, axis=-1, kind="stable")[..., :2]
    noisy = (logits + rng.normal(size=logits.shape) * 0.5).astype("float32")

    def value(x):
        return float(ops.convert_to_numpy(x))

    np.testing.assert_allclose(
        value(
            losses.load_balancing_loss(
                ops.convert_to_tensor(probs),
                ops.convert_to_tensor(indices.astype("int32")),
            )
        ),
        np_load_balancing(probs, indices),
        rtol=1e-5,
    )
    np.testing.assert_allclose(
        value(losses.router_z_loss(ops.convert_to_tensor(logits))),
        np_z_loss(logits),
        rtol=1e-5,
    )
    np.testing.assert_allclose(
        value(losses.importance_loss(ops.convert_to_tensor(probs))),
        np_importance(probs),
        rtol=1e-5,
    )
    np.testing.assert_allclose(
        value(
            losses.load_loss(
                ops.convert_to_tensor(logits),
                ops.convert_to_tensor(noisy),
                0.5,
                2,
            )
        ),
        np_load(logits, noisy, 0.5, 2),
        rtol=1e-4,
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_selected_experts": 2, "train_capacity_factor": 0.5},
        {"num_selected_experts": 1, "batch_priority": True},
        {"router": "experts_choose", "train_capacity_factor": 1.0},
    ],
)
def test_moe_layer_matches_numpy(kwargs):
    x = np.random.default_rng(4).normal(size=(3, 16, 8)).astype("float32")
    layer = MoeLayer(
        num_experts=4,
        hidden_dim=12,
        router_kernel_initializer=keras.initializers.RandomNormal(stddev=1.0),
        **kwargs,
    )
    y = ops.convert_to_numpy(layer(x, training=True))
    expected, _ = np_moe(layer, x.astype(np.float64), training=True)
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)
    # z-loss, and load balancing where tokens choose.
    expected_losses = 1 if kwargs.get("router") == "experts_choose" else 2
    assert len(layer.losses) == expected_losses
    assert all(np.isfinite(ops.convert_to_numpy(v)) for v in layer.losses)


def test_fit_trains_the_router_and_the_experts():
    inputs = keras.Input((10, 8))
    hidden = MoeLayer(num_experts=4, hidden_dim=16, name="moe")(inputs)
    outputs = keras.layers.Dense(3)(
        keras.layers.GlobalAveragePooling1D()(hidden)
    )
    model = keras.Model(inputs, outputs)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    moe = model.get_layer("moe")
    before = [ops.convert_to_numpy(w).copy() for w in moe.weights]
    rng = np.random.default_rng(5)
    x = rng.normal(size=(16, 10, 8)).astype("float32")
    y = rng.integers(0, 3, size=16)
    history = model.fit(x, y, batch_size=8, epochs=3, verbose=0).history
    after = [ops.convert_to_numpy(w) for w in moe.weights]
    assert all(not np.allclose(b, a) for b, a in zip(before, after))
    assert history["loss"][-1] < history["loss"][0]
    # The routing metrics reach fit's logs under the layer's name.
    assert {"moe_dropped", "moe_confidence", "moe_max_load"} <= set(history)


def test_upcycling_preserves_the_dense_function():
    dense = tiny_vit()
    x = images(4)
    moe = keras_moe.upcycle(
        dense,
        num_experts=4,
        encoder_router="tokens_choose",
        num_selected_experts=4,
        normalize_combine_weights=True,
        train_capacity_factor=None,
        eval_capacity_factor=None,
    )
    assert len(keras_moe.moe_layers(moe)) == 1
    np.testing.assert_allclose(
        ops.convert_to_numpy(moe(x)),
        ops.convert_to_numpy(dense(x)),
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.skipif(
    BACKEND == "tensorflow", reason="the refusals are for other backends"
)
@pytest.mark.parametrize(
    "kwargs",
    [
        {"dispatcher": "indices"},
        {"dispatcher": "dropless"},
        {"jit_compile": True},
    ],
)
def test_tensorflow_only_options_are_refused(kwargs):
    with pytest.raises(ValueError, match=f"TensorFlow backend.*{BACKEND}"):
        MoeLayer(num_experts=4, hidden_dim=8, **kwargs)


@pytest.mark.skipif(
    BACKEND == "tensorflow", reason="the refusals are for other backends"
)
def test_e3_is_refused():
    with pytest.raises(ValueError, match=f"E\\^3.*TensorFlow.*{BACKEND}"):
        EnsembleMoeLayer(num_experts=4, ensemble_size=2, hidden_dim=8)


@pytest.mark.skipif(
    BACKEND != "tensorflow", reason="starts the torch run from TensorFlow"
)
def test_checks_pass_under_torch():
    env = dict(os.environ, KERAS_BACKEND="torch", TF_CPP_MIN_LOG_LEVEL="2")
    process = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-p"]
        + ["no:cacheprovider", "-W", "ignore::UserWarning"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    summary = process.stdout.strip().splitlines()[-1]
    assert process.returncode == 0, process.stdout[-4000:]
    # Every check ran under torch; only this launcher skipped itself.
    passed = int(re.search(r"(\d+) passed", summary)[1])
    assert re.search(r"\b1 skipped", summary), summary
    assert passed == 14, summary


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))
