"""MoeLayer: numbers against NumPy, the upcycling property, the contract."""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_moe import upcycling
from keras_moe.layers import losses
from keras_moe.layers.mlp import Mlp
from keras_moe.layers.moe import MoeLayer
from keras_moe.layers.routers import TokensChooseRouter
from keras_moe.models.vit import ViT
from tests.layer_test_case import run_layer_test
from tests.layers.reference_moe import np_moe

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))


def _np(x):
    return keras.ops.convert_to_numpy(x)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_selected_experts": 1},
        {"num_selected_experts": 2, "train_capacity_factor": 0.5},
        {"num_selected_experts": 2, "batch_priority": True},
        {"router": "experts_choose", "train_capacity_factor": 1.0},
        {"router": "experts_choose", "normalize_combine_weights": True},
    ],
)
@pytest.mark.parametrize("dispatcher", ["einsum", "indices"])
@pytest.mark.parametrize("jit_compile", [False, True])
def test_matches_numpy(kwargs, dispatcher, jit_compile):
    x = np.random.default_rng(0).normal(size=(3, 16, 8)).astype("float32")
    layer = MoeLayer(
        num_experts=4,
        hidden_dim=12,
        dispatcher=dispatcher,
        jit_compile=jit_compile,
        router_kernel_initializer=keras.initializers.RandomNormal(stddev=1.0),
        **kwargs,
    )
    y = _np(layer(x, training=True))
    expected, routed = np_moe(layer, x.astype(np.float64), training=True)
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)
    if kwargs.get("train_capacity_factor") == 0.5:
        assert routed.num_dropped > 0  # the case exercises overflow
    # The statistics agree with the reference routing.
    coverage = routed.dispatch.sum(axis=(2, 3))
    stats = layer.routing_stats()
    np.testing.assert_allclose(
        stats["dropped"], np.mean(coverage == 0), atol=1e-6
    )


@pytest.mark.parametrize(
    "router,k",
    [("tokens_choose", 1), ("tokens_choose", 2), ("experts_choose", 1)],
)
@pytest.mark.parametrize("activation", ["relu", "gated_gelu"])
@pytest.mark.parametrize("use_bias", [False, True])
def test_identical_experts_reproduce_the_dense_mlp(
    router, k, activation, use_bias
):
    """With copies of one MLP, normalised weights and no drops, MoE == MLP."""
    x = np.random.default_rng(1).normal(size=(2, 10, 8)).astype("float32")
    mlp = Mlp(
        16, activation=activation, use_bias=use_bias, bias_initializer="uniform"
    )
    dense = _np(mlp(x))
    layer = MoeLayer(
        num_experts=4,
        hidden_dim=16,
        router=router,
        num_selected_experts=k,
        activation=activation,
        use_bias=use_bias,
        normalize_combine_weights=True,
        eval_capacity_factor=None,
        router_kernel_initializer=keras.initializers.RandomNormal(stddev=1.0),
    )
    layer.build(x.shape)
    for expert_w, dense_w in zip(layer.experts.weights, mlp.weights):
        expert_w.assign(np.broadcast_to(_np(dense_w), expert_w.shape))
    np.testing.assert_allclose(_np(layer(x)), dense, rtol=1e-5, atol=1e-5)
    assert layer.routing_stats()["dropped"] == 0.0


def test_aux_losses_are_added_with_their_weights():
    x = np.random.default_rng(2).normal(size=(2, 16, 8)).astype("float32")
    layer = MoeLayer(
        4,
        8,
        num_selected_experts=2,
        router_z_loss_weight=0.1,
        load_balancing_loss_weight=0.2,
        importance_loss_weight=0.3,
    )
    layer(x, training=True)
    logits = x @ _np(layer.router.kernel)
    probs = _np(keras.ops.softmax(logits))
    top2 = np.argsort(-probs, axis=-1)[..., :2].astype("int32")
    expected = [
        0.1 * float(losses.router_z_loss(logits)),
        0.2 * float(losses.load_balancing_loss(probs, top2)),
        0.3 * float(losses.importance_loss(probs)),
    ]
    np.testing.assert_allclose(
        [float(v) for v in layer.losses], expected, rtol=1e-5
    )


def test_group_size_pads_and_padding_takes_no_capacity():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(40, 8)).astype("float32")  # 40 tokens, groups of 16
    layer = MoeLayer(4, 8, group_size=16, eval_capacity_factor=1.0)
    y = _np(layer(x))
    assert y.shape == (40, 8)
    # The first two groups are full: same as routing them alone.
    np.testing.assert_allclose(y[:32], _np(layer(x[:32])), rtol=1e-6, atol=1e-6)
    # The last group holds 8 real tokens and 8 padding tokens; padding with
    # an explicit mask over real-looking tokens gives the same result.
    last = np.concatenate([x[32:], rng.normal(size=(8, 8)).astype("float32")])
    mask = np.arange(16) < 8
    np.testing.assert_allclose(
        y[32:], _np(layer(last, token_mask=mask))[:8], rtol=1e-6, atol=1e-6
    )


def test_capacity_factors_for_train_and_eval():
    layer = MoeLayer(
        8,
        8,
        num_selected_experts=2,
        train_capacity_factor=1.25,
        eval_capacity_factor=None,
        min_expert_capacity=1,
    )
    assert layer.capacity(64, training=True) == 20
    assert layer.capacity(64, training=False) == 64


def test_layer_contract(tmp_path):
    run_layer_test(
        MoeLayer,
        {"num_experts": 4, "hidden_dim": 16, "num_selected_experts": 2},
        (4, 6, 8),
        expected_num_trainable_weights=3,
        tmp_path=tmp_path,
    )


def test_mixed_precision_keeps_the_router_in_float32():
    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        layer = MoeLayer(4, 16, router="experts_choose")
        y = layer(np.ones((2, 8, 8), "float32"), training=True)
        assert keras.backend.standardize_dtype(y.dtype) == "bfloat16"
        assert layer.router.compute_dtype == "float32"
        assert layer.router.kernel.dtype == "float32"
        assert layer.experts.compute_dtype == "bfloat16"
        probs = layer.router.route(
            keras.ops.ones((2, 8, 8), "bfloat16"), expert_capacity=4
        ).router_probs
        assert keras.backend.standardize_dtype(probs.dtype) == "float32"
    finally:
        keras.config.set_dtype_policy(policy)


def test_keras_round_trip_gives_identical_outputs(tmp_path):
    inputs = keras.Input((6, 8))
    hidden = MoeLayer(4, 16, num_selected_experts=2, batch_priority=True)(
        inputs
    )
    model = keras.Model(
        inputs, MoeLayer(4, 16, router="experts_choose")(hidden)
    )
    path = str(tmp_path / "moe.keras")
    model.save(path)
    restored = keras.models.load_model(path)
    x = np.random.default_rng(4).normal(size=(3, 6, 8)).astype("float32")
    np.testing.assert_array_equal(_np(model(x)), _np(restored(x)))
    assert restored.layers[1].get_config() == model.layers[1].get_config()


def test_jit_compiled_train_step_on_one_device():
    inputs = keras.Input((8, 8))
    outputs = MoeLayer(4, 16, num_selected_experts=2, jit_compile=True)(inputs)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer="adam", loss="mse", jit_compile=True)
    x = np.random.default_rng(5).normal(size=(16, 8, 8)).astype("float32")
    history = model.fit(x, x, batch_size=8, epochs=3, verbose=0)
    logged = history.history
    assert logged["loss"][-1] < logged["loss"][0]
    assert "moe_layer" in " ".join(logged)  # routing statistics are logged
    dropped = [v for k, v in logged.items() if k.endswith("_dropped")][0]
    assert all(0.0 <= v <= 1.0 for v in dropped)
    # Inside the XLA step the layer's own compiled functions are skipped
    # (nested, they would recompile on every step).
    layer = model.layers[1]
    assert layer._compiled_dispatch.experimental_get_tracing_count() == 0


def test_layer_xla_functions_trace_once_per_mode():
    layer = MoeLayer(4, 16, num_selected_experts=2, jit_compile=True)
    inputs = keras.Input((8, 8))
    model = keras.Model(inputs, layer(inputs))
    model.compile(optimizer="sgd", loss="mse")
    x = np.random.default_rng(6).normal(size=(32, 8, 8)).astype("float32")
    model.fit(x, x, batch_size=8, epochs=2, verbose=0)
    model.evaluate(x, x, batch_size=8, verbose=0)
    # One trace for training=True, one for training=False.
    assert layer._compiled_dispatch.experimental_get_tracing_count() == 2


_MIRRORED_SCRIPT = textwrap.dedent("""
    import json
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 4
    )
    import keras
    from keras_moe.layers.moe import MoeLayer

    def train(strategy):
        with strategy.scope():
            keras.utils.set_random_seed(0)
            inputs = keras.Input((8, 8))
            moe = MoeLayer(4, 16, num_selected_experts=2, jit_compile=True)
            x = moe(inputs)
            outputs = keras.layers.Dense(1)(keras.layers.Flatten()(x))
            model = keras.Model(inputs, outputs)
            model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
        rng = np.random.default_rng(0)
        x = rng.normal(size=(64, 8, 8)).astype("float32")
        y = rng.normal(size=(64, 1)).astype("float32")
        history = model.fit(x, y, batch_size=16, epochs=2, shuffle=False,
                            verbose=0)
        return history.history

    mirrored = tf.distribute.MirroredStrategy(
        [f"/cpu:{i}" for i in range(4)]
    )
    assert mirrored.num_replicas_in_sync == 4
    print(json.dumps({
        "mirrored": train(mirrored),
        "single": train(tf.distribute.OneDeviceStrategy("/cpu:0")),
    }))
    """)


def test_fit_under_mirrored_strategy_matches_one_device():
    env = dict(os.environ, PYTHONPATH=_ROOT, TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run(
        [sys.executable, "-c", _MIRRORED_SCRIPT],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    import json

    logs = json.loads(result.stdout.strip().splitlines()[-1])
    mirrored, single = logs["mirrored"], logs["single"]
    # Same global batch, same routing groups (one per sequence): the same
    # training trajectory up to float summation order.
    np.testing.assert_allclose(mirrored["loss"], single["loss"], rtol=1e-4)
    assert set(k for k in mirrored if k.endswith("_dropped"))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (
            {"num_experts": 0, "hidden_dim": 4},
            "num_experts must be an int >= 1",
        ),
        (
            {"num_experts": 2, "hidden_dim": 4, "num_selected_experts": 3},
            "num_selected_experts must be at most num_experts",
        ),
        (
            {"num_experts": 2, "hidden_dim": 4, "train_capacity_factor": 0.0},
            "capacity_factor must be > 0",
        ),
        (
            {"num_experts": 2, "hidden_dim": 4, "eval_capacity_factor": -1.0},
            "capacity_factor must be > 0",
        ),
        ({"num_experts": 2, "hidden_dim": 4, "group_size": 0}, "group_size"),
        (
            {"num_experts": 2, "hidden_dim": 4, "router": "soft"},
            "router must be",
        ),
        (
            {"num_experts": 2, "hidden_dim": 4, "dispatcher": "scatter"},
            "dispatcher must be one of",
        ),
        (
            {
                "num_experts": 2,
                "hidden_dim": 4,
                "router": "experts_choose",
                "num_selected_experts": 2,
            },
            "token choice only",
        ),
        (
            {
                "num_experts": 2,
                "hidden_dim": 4,
                "load_balancing_loss_weight": -1,
            },
            "load_balancing_loss_weight must be >= 0",
        ),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoeLayer(**kwargs)


def test_bad_inputs():
    with pytest.raises(ValueError, match="rank >= 2"):
        MoeLayer(2, 4)(np.zeros((8,), "float32"))
    with pytest.raises(ValueError, match="pass group_size"):
        MoeLayer(2, 4)(np.zeros((8, 4), "float32"))
    layer = MoeLayer(2, 4)
    with pytest.raises(ValueError, match="token_mask must have the shape"):
        layer(np.zeros((2, 8, 4), "float32"), token_mask=np.ones((2, 4), bool))
    x = np.zeros((2, 8, 4), "float32")
    x[1, 3, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        layer(x)


def test_nan_logits_fail_the_step_in_graph_mode_with_check_numerics():
    layer = MoeLayer(2, 4, check_numerics=True)
    x = np.zeros((2, 8, 4), "float32")
    layer(x)
    x[0, 0, 0] = np.nan
    with pytest.raises(tf.errors.InvalidArgumentError, match="non-finite"):
        tf.function(layer)(x)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_sublayers_are_made_in_build_and_called_through_keras(
    jit_compile, monkeypatch
):
    layer = MoeLayer(4, 16, num_selected_experts=2, jit_compile=jit_compile)
    assert not hasattr(layer, "router") and not hasattr(layer, "experts")
    called = []
    keras_call = keras.layers.Layer.__call__

    def spy(self, *args, **kwargs):
        called.append(self)
        return keras_call(self, *args, **kwargs)

    monkeypatch.setattr(keras.layers.Layer, "__call__", spy)
    layer(np.ones((2, 8, 8), "float32"), training=True)
    # Built by MoeLayer.build (Keras' build wrapper), before their calls.
    assert layer.router.built and layer.experts.built
    assert [layer.router.name, layer.experts.name] == ["router", "experts"]
    assert layer.router.dtype_policy.name == "float32"
    assert layer.experts.dtype_policy.name == layer.dtype_policy.name
    assert any(c is layer.router for c in called)
    assert any(c is layer.experts for c in called)
    # The auxiliary losses are the MoE layer's, weighted; not the router's.
    assert layer.router.losses == [] and len(layer.losses) == 2


def test_router_alone_is_built_by_its_first_call():
    x = np.random.default_rng(7).normal(size=(2, 8, 16)).astype("float32")
    router = TokensChooseRouter(4, num_selected_experts=2)
    assert not router.built
    out = router(x, expert_capacity=4)
    assert router.built
    assert [tuple(w.shape) for w in router.weights] == [(16, 4)]
    assert router.weights[0] is router.kernel
    # `route` is the same call, with the capacity allowed positionally.
    again = router.route(x, 4)
    np.testing.assert_array_equal(
        _np(again.router_probs), _np(out.router_probs)
    )
    np.testing.assert_array_equal(
        _np(again.instructions.token_index), _np(out.instructions.token_index)
    )


def test_mixed_precision_router_reads_its_kernel_in_float32():
    """The float32 router is not autocast to the MoE layer's bfloat16."""
    x = np.random.default_rng(8).normal(size=(2, 8, 8)).astype("float32")
    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        layer = MoeLayer(
            4,
            16,
            router_z_loss_weight=1.0,
            load_balancing_loss_weight=0.0,
            router_kernel_initializer=keras.initializers.RandomNormal(
                stddev=1.0, seed=2
            ),
        )
        layer(x)
        # The layer casts its inputs to bfloat16; the router then computes
        # in float32 with its float32 kernel.
        tokens = _np(keras.ops.cast(keras.ops.cast(x, "bfloat16"), "float32"))
        logits = tokens @ _np(layer.router.kernel)
        expected = float(losses.router_z_loss(logits))
        rounded = tokens @ _np(
            keras.ops.cast(
                keras.ops.cast(layer.router.kernel.value, "bfloat16"),
                "float32",
            )
        )
        assert abs(float(losses.router_z_loss(rounded)) - expected) > (
            1e-4 * expected
        )  # the case tells a float32 kernel from a bfloat16 one
        np.testing.assert_allclose(float(layer.losses[0]), expected, rtol=1e-5)
    finally:
        keras.config.set_dtype_policy(policy)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"hidden_dim": 0}, "hidden_dim must be an int >= 1"),
        ({"jitter_noise": 1.5}, "jitter_noise must be in"),
        ({"noise_std": -1.0}, "noise_std must be >= 0"),
        ({"activation": "swish_glu"}, "activation must be one of"),
        ({"dropout_rate": 2.0}, "dropout_rate must be in"),
    ],
)
def test_sublayer_arguments_are_checked_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoeLayer(**{"num_experts": 2, "hidden_dim": 4, **kwargs})


def test_weight_paths():
    layer = MoeLayer(
        4, 16, activation="gated_gelu", use_bias=True, name="moe_paths"
    )
    layer.build((2, 6, 8))
    assert [w.path for w in layer.weights] == [
        "moe_paths/router/kernel",
        "moe_paths/experts/wi_0",
        "moe_paths/experts/wi_1",
        "moe_paths/experts/wo",
        "moe_paths/experts/bi_0",
        "moe_paths/experts/bi_1",
        "moe_paths/experts/bo",
    ]


# Weight paths of upcycled ViTs: `keras_moe.upcycling` matches them by
# regex, and .keras files and checkpoints name the weights by them.
_UPCYCLED_VIT_WEIGHTS = [
    "vit/class_token",
    "vit/position_embedding",
    "vit/patch_embedding/kernel",
    "vit/patch_embedding/bias",
    "vit/block_0/attention_norm/gamma",
    "vit/block_0/attention_norm/beta",
    "vit/block_0/attention/query/kernel",
    "vit/block_0/attention/query/bias",
    "vit/block_0/attention/key/kernel",
    "vit/block_0/attention/key/bias",
    "vit/block_0/attention/value/kernel",
    "vit/block_0/attention/value/bias",
    "vit/block_0/attention/output/kernel",
    "vit/block_0/attention/output/bias",
    "vit/block_0/mlp_norm/gamma",
    "vit/block_0/mlp_norm/beta",
    "vit/block_0/mlp/wi",
    "vit/block_0/mlp/wo",
    "vit/block_0/mlp/bi",
    "vit/block_0/mlp/bo",
    "vit/block_1/attention_norm/gamma",
    "vit/block_1/attention_norm/beta",
    "vit/block_1/attention/query/kernel",
    "vit/block_1/attention/query/bias",
    "vit/block_1/attention/key/kernel",
    "vit/block_1/attention/key/bias",
    "vit/block_1/attention/value/kernel",
    "vit/block_1/attention/value/bias",
    "vit/block_1/attention/output/kernel",
    "vit/block_1/attention/output/bias",
    "vit/block_1/mlp_norm/gamma",
    "vit/block_1/mlp_norm/beta",
    "vit/block_1/mlp/router/kernel",
    "vit/block_1/mlp/experts/wi",
    "vit/block_1/mlp/experts/wo",
    "vit/block_1/mlp/experts/bi",
    "vit/block_1/mlp/experts/bo",
    "vit/final_norm/gamma",
    "vit/final_norm/beta",
    "vit/head/kernel",
    "vit/head/bias",
]


@pytest.mark.parametrize("ensemble_size", [1, 2])
def test_upcycled_vit_weight_paths(ensemble_size):
    vit = ViT.from_architecture("vit_tiny", num_layers=2)
    moe = upcycling.upcycle(
        vit,
        num_experts=4,
        encoder_router="tokens_choose",
        ensemble_size=ensemble_size,
    )
    assert [w.path for w in moe.weights] == _UPCYCLED_VIT_WEIGHTS


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))
