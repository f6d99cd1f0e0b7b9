"""Dropless dispatch: routing, dispatcher, experts and MoeLayer.

Every expected number comes from outside the dropless code: the NumPy
routing reference (`reference_routing.py`) with a capacity no expert can
fill, NumPy expert MLPs, or the capacity dispatchers ("einsum", "indices")
run where they drop nothing.

Shape letters: G groups, S tokens per group, E experts, K experts per token,
D model dimension, H hidden dimension, M ensemble members.
"""

import doctest
import json
import os
import subprocess
import sys
import textwrap
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_moe import upcycling
from keras_moe.layers import dispatch
from keras_moe.layers import experts as experts_lib
from keras_moe.layers import routing
from keras_moe.layers.ensemble import EnsembleMoeLayer
from keras_moe.layers.ensemble import EnsembleTile
from keras_moe.layers.experts import Experts
from keras_moe.layers.moe import MoeLayer
from tests.layer_test_case import run_layer_test
from tests.tiny_models import images
from tests.tiny_models import tiny_vit

try:
    from tests.layers import reference_routing as ref
except ImportError:
    import reference_routing as ref

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))


def _np(x):
    return keras.ops.convert_to_numpy(x)


def _probs(seed, shape):
    logits = np.random.default_rng(seed).normal(size=shape)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    return (probs / probs.sum(-1, keepdims=True)).astype("float32")


def _mask(seed, shape):
    mask = np.random.default_rng(seed).uniform(size=shape) < 0.7
    mask[:, 0] = False
    mask[:, 1] = True
    return mask


# Routing.


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("batch_priority", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_routing_is_token_choice_with_capacity_s(
    k, batch_priority, normalize, masked
):
    """Without capacity, each token keeps its top K: the reference at C=S."""
    g, s, e = 3, 12, 4
    probs = _probs(k, (g, s, e))
    mask = _mask(k, (g, s)) if masked else None
    expected = ref.tokens_choose(
        probs,
        k,
        s,
        batch_priority=batch_priority,
        normalize=normalize,
        token_mask=mask,
    )
    assert expected.num_dropped == 0
    routed = routing.tokens_choose_dropless(
        tf.constant(probs),
        k,
        batch_priority=batch_priority,
        normalize_combine_weights=normalize,
        token_mask=None if mask is None else tf.constant(mask),
    )
    np.testing.assert_allclose(
        _np(routed.expert_weights()),
        expected.combine.sum(-1),
        rtol=1e-5,
        atol=1e-6,
    )
    np.testing.assert_array_equal(
        _np(routed.tokens_per_expert()), expected.dispatch.sum(axis=(1, 3))
    )
    np.testing.assert_array_equal(
        _np(routed.token_coverage()), expected.dispatch.sum(axis=(2, 3))
    )
    # The reference serves tokens in this order; BPR only reorders work.
    valid = np.ones((g, s), bool) if mask is None else mask
    order = _np(routed.service_order)
    for group in range(g):
        served = [t for t in order[group] if valid[group, t]]
        assert served == ref.service_order(
            probs[group], batch_priority, valid[group]
        )
    # tokens_choose without a capacity is this routing.
    again = routing.tokens_choose(probs, k, None, batch_priority=batch_priority)
    assert isinstance(again, routing.DroplessRoutingInstructions)


def test_expert_choice_has_no_dropless_form():
    with pytest.raises(ValueError, match="expert choice has no dropless"):
        routing.experts_choose(tf.constant(_probs(0, (1, 8, 4))), None)
    with pytest.raises(ValueError, match="needs token-choice routing"):
        MoeLayer(4, 8, router="experts_choose", dispatcher="dropless")


# Dispatcher: against the capacity dispatchers at C = S.


def _row_experts(group_sizes, num_rows):
    """<int32>[N] expert of each sorted row (E for rows after the groups)."""
    ends = tf.cumsum(group_sizes)
    rows = tf.range(num_rows)[:, None]
    return tf.reduce_sum(tf.cast(rows >= ends[None, :], "int32"), axis=1)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_selected_experts": 1},
        {"num_selected_experts": 2, "batch_priority": True},
        {"num_selected_experts": 3, "normalize_combine_weights": True},
    ],
)
@pytest.mark.parametrize("jit", [False, True])
def test_dispatcher_agrees_with_capacity_dispatchers(kwargs, jit):
    rng = np.random.default_rng(5)
    g, s, e, d = 3, 10, 4, 5
    logits = tf.Variable(rng.normal(size=(g, s, e)).astype("float32"))
    x = tf.Variable(rng.normal(size=(g, s, d)).astype("float32"))
    mask = tf.constant(_mask(2, (g, s)))
    scale = tf.constant(rng.normal(size=(e + 1, d)).astype("float32"))

    def capacity(name):
        with tf.GradientTape() as tape:
            info = routing.tokens_choose(
                tf.nn.softmax(logits),
                expert_capacity=s,
                token_mask=mask,
                **kwargs,
            )
            dispatcher = dispatch.get_dispatcher(name)(info)
            slots = dispatcher.dispatch(x)  # (G, E, C, D)
            out = tf.tanh(slots * scale[None, :e, None, :])
            y = dispatcher.combine(out)
            loss = tf.reduce_sum(y * y)
        return y, tape.gradient(loss, [x, logits])

    def dropless():
        with tf.GradientTape() as tape:
            info = routing.tokens_choose(
                tf.nn.softmax(logits),
                expert_capacity=None,
                token_mask=mask,
                **kwargs,
            )
            dispatcher = dispatch.get_dispatcher("dropless")(info)
            rows = dispatcher.dispatch(x)  # (G*S*K, D)
            experts = _row_experts(dispatcher.group_sizes, tf.shape(rows)[0])
            out = tf.tanh(rows * tf.gather(scale, experts))
            y = dispatcher.combine(out)
            loss = tf.reduce_sum(y * y)
        return y, tape.gradient(loss, [x, logits])

    def run(fn, *args):
        return tf.function(fn, jit_compile=True)(*args) if jit else fn(*args)

    y_d, grads_d = run(dropless)
    for name in ("einsum", "indices"):
        y_c, grads_c = run(capacity, name)
        np.testing.assert_allclose(y_d, y_c, rtol=1e-5, atol=1e-6)
        for a, b in zip(grads_d, grads_c):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert np.abs(_np(grads_d[1])).sum() > 0  # the router gets gradient
    masked = ~_np(mask)
    assert np.all(_np(y_d)[masked] == 0) and np.any(_np(y_d)[~masked] != 0)


def test_dispatcher_sorts_rows_by_expert():
    # Group 0: tokens 0..3 choose experts 1, 0, 1, 2; token 2 is padding.
    info = routing.DroplessRoutingInstructions(
        expert_index=tf.constant([[[1], [0], [1], [2]]], "int32"),
        combine_weights=tf.constant([[[0.5], [1.0], [0.0], [2.0]]]),
        token_mask=tf.constant([[True, True, False, True]]),
        service_order=tf.constant([[0, 1, 2, 3]], "int32"),
        num_experts=3,
    )
    dispatcher = dispatch.DroplessDispatcher(info)
    plan = dispatcher.plan
    np.testing.assert_array_equal(_np(plan.group_sizes), [1, 1, 1])
    # Expert 0: token 1; expert 1: token 0; expert 2: token 3; then padding.
    np.testing.assert_array_equal(_np(plan.row_token), [1, 0, 3, 2])
    np.testing.assert_array_equal(_np(plan.choice_row), [1, 0, 3, 2])
    x = tf.constant([[[1.0], [10.0], [100.0], [1000.0]]])
    np.testing.assert_array_equal(
        _np(dispatcher.dispatch(x))[:, 0], [10, 1, 1000, 100]
    )
    y = dispatcher.combine(tf.constant([[3.0], [4.0], [5.0], [6.0]]))
    np.testing.assert_allclose(_np(y)[0, :, 0], [2.0, 3.0, 0.0, 10.0])


# Experts on ragged rows.


@pytest.mark.parametrize(
    "activation,use_bias", [("relu", False), ("gated_gelu", True)]
)
def test_experts_on_ragged_rows_match_numpy(activation, use_bias):
    experts = Experts(
        3,
        6,
        activation=activation,
        use_bias=use_bias,
        bias_initializer="uniform",
    )
    experts.build((3, None, 4))
    rows = np.random.default_rng(0).normal(size=(9, 4)).astype("float32")
    sizes = [2, 0, 5]  # expert 1 gets nothing; the last 2 rows are spare
    out = _np(experts(rows, group_sizes=tf.constant(sizes, "int32")))
    # The slot path on one expert's rows at a time is the reference.
    expected = np.zeros_like(rows)
    start = 0
    for e, size in enumerate(sizes):
        slots = np.zeros((3, max(size, 1), 4), "float32")
        slots[e, :size] = rows[start : start + size]
        expected[start : start + size] = _np(experts(slots))[e, :size]
        start += size
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    assert np.all(out[7:] == 0)


# MoeLayer.


def _np_moe(layer, x, mask=None):
    """NumPy MoeLayer, relu experts, groups = sequences, no capacity."""
    kernel = _np(layer.router.kernel).astype(np.float64)
    wi = _np(layer.experts.input_kernels[0]).astype(np.float64)
    wo = _np(layer.experts.wo).astype(np.float64)
    probs = np.exp(x @ kernel)
    probs /= probs.sum(-1, keepdims=True)
    routed = ref.tokens_choose(
        probs,
        layer.num_selected_experts,
        x.shape[1],
        batch_priority=layer.batch_priority,
        normalize=layer.normalize_combine_weights,
        token_mask=mask,
    )
    assert routed.num_dropped == 0
    expert_out = np.einsum(
        "gseh,ehd->gsed", np.maximum(np.einsum("gsd,edh->gseh", x, wi), 0), wo
    )
    return np.einsum("gse,gsed->gsd", routed.combine.sum(-1), expert_out)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_selected_experts": 1},
        {"num_selected_experts": 2, "batch_priority": True},
        {"num_selected_experts": 3, "normalize_combine_weights": True},
    ],
)
@pytest.mark.parametrize("jit_compile", [False, True])
def test_layer_matches_numpy_and_ignores_capacity(kwargs, jit_compile):
    x = np.random.default_rng(0).normal(size=(3, 16, 8)).astype("float32")
    mask = _mask(1, (3, 16))
    layer = MoeLayer(
        num_experts=4,
        hidden_dim=12,
        dispatcher="dropless",
        jit_compile=jit_compile,
        # Would drop most tokens with a capacity; dropless has none.
        train_capacity_factor=0.25,
        min_expert_capacity=1,
        router_kernel_initializer=keras.initializers.RandomNormal(stddev=1.0),
        **kwargs,
    )
    y = _np(layer(x, training=True, token_mask=mask))
    expected = _np_moe(layer, x.astype(np.float64), mask)
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)
    assert layer.routing_stats()["dropped"] == 0.0
    # The capacity path at this factor drops: the case is not vacuous.
    capacity = layer.capacity(16, training=True)
    assert capacity * 4 < kwargs["num_selected_experts"] * 16


def _copy_weights(source, target):
    for a, b in zip(source.weights, target.weights):
        b.assign(a)


def _grads(layer, x, training, graph):
    variables = [layer.router.kernel, *layer.experts.trainable_weights]

    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=training)
            loss = tf.reduce_sum(y * y) + tf.add_n(layer.losses)
        return y, tape.gradient(loss, [x, *variables]), layer.losses

    x = tf.constant(x)
    return tf.function(step)(x) if graph else step(x)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_selected_experts": 1, "activation": "gated_gelu"},
        {"num_selected_experts": 2, "batch_priority": True, "use_bias": True},
    ],
)
@pytest.mark.parametrize("graph", [False, True])
def test_outputs_gradients_and_losses_equal_capacity_dispatch(kwargs, graph):
    """Where einsum and indices drop nothing (C = S), dropless agrees."""
    x = np.random.default_rng(2).normal(size=(2, 12, 8)).astype("float32")
    common = dict(
        num_experts=4,
        hidden_dim=8,
        train_capacity_factor=None,
        bias_initializer="uniform",
        router_kernel_initializer=keras.initializers.RandomNormal(stddev=1.0),
        importance_loss_weight=0.1,
        **kwargs,
    )
    dropless = MoeLayer(dispatcher="dropless", **common)
    dropless.build(x.shape)
    y, grads, aux = _grads(dropless, x, True, graph)
    for name in ("einsum", "indices"):
        layer = MoeLayer(dispatcher=name, **common)
        layer.build(x.shape)
        _copy_weights(dropless, layer)
        y_c, grads_c, aux_c = _grads(layer, x, True, graph)
        np.testing.assert_allclose(y, y_c, rtol=1e-5, atol=1e-6)
        for a, b in zip(grads, grads_c):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(
            [float(v) for v in aux], [float(v) for v in aux_c], rtol=1e-6
        )
    assert len(aux) == 3  # z-loss, load balancing, importance
    assert all(np.abs(_np(g)).sum() > 0 for g in grads)


def test_auto_dispatches_no_drop_modes_dropless():
    x = np.random.default_rng(3).normal(size=(2, 16, 8)).astype("float32")
    layer = MoeLayer(
        4,
        8,
        num_selected_experts=2,
        train_capacity_factor=1.0,
        eval_capacity_factor=None,
        jit_compile=True,
        router_kernel_initializer=keras.initializers.RandomNormal(stddev=1.0),
    )
    indices = MoeLayer(
        4,
        8,
        num_selected_experts=2,
        train_capacity_factor=1.0,
        eval_capacity_factor=None,
        dispatcher="indices",
    )
    layer.build(x.shape)
    indices.build(x.shape)
    _copy_weights(layer, indices)
    assert layer.dispatches_dropless(training=False)
    assert not layer.dispatches_dropless(training=True)
    assert not indices.dispatches_dropless(training=False)
    for training in (False, True):
        np.testing.assert_allclose(
            _np(layer(x, training=training)),
            _np(indices(x, training=training)),
            rtol=1e-5,
            atol=1e-6,
        )
    # Evaluation went through the dropless functions, training did not.
    assert (
        layer._compiled_dropless_dispatch.experimental_get_tracing_count() == 1
    )
    assert layer._compiled_dispatch.experimental_get_tracing_count() == 1
    # Inside an XLA function "auto" falls back to capacity dispatch (C = S).
    y_xla = tf.function(lambda t: layer(t), jit_compile=True)(x)
    np.testing.assert_allclose(
        _np(y_xla), _np(indices(x)), rtol=1e-5, atol=1e-6
    )
    assert layer.supports_jit


def test_dropless_refuses_an_xla_step_and_keras_compiles_without_xla():
    layer = MoeLayer(4, 8, dispatcher="dropless")
    assert not layer.supports_jit
    x = np.ones((2, 8, 8), "float32")
    with pytest.raises(ValueError, match="dispatcher='dropless'.*XLA"):
        tf.function(lambda t: layer(t), jit_compile=True)(x)
    experts = Experts(2, 4)
    experts.build((2, None, 8))
    with pytest.raises(ValueError, match="XLA cannot compile"):
        tf.function(
            lambda r: experts(r, group_sizes=tf.constant([1, 1])),
            jit_compile=True,
        )(x[0])
    inputs = keras.Input((8, 8))
    model = keras.Model(inputs, MoeLayer(4, 8, dispatcher="dropless")(inputs))
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        model.compile(optimizer="sgd", loss="mse", jit_compile=True)
    assert model.jit_compile is False
    model.fit(x, x, verbose=0)


def test_dropless_refuses_a_relayout_hook():
    layer = MoeLayer(4, 8, dispatcher="dropless")
    layer.relayout_hook = lambda rows, to: rows
    with pytest.raises(ValueError, match="relayout_hook"):
        layer(np.ones((2, 8, 8), "float32"))
    auto = MoeLayer(4, 8, eval_capacity_factor=None)
    auto.relayout_hook = lambda rows, to: rows
    assert not auto.dispatches_dropless(training=False)


def test_layer_contract(tmp_path):
    """Config, eager, fit, .keras round trip, mixed_bfloat16."""
    run_layer_test(
        MoeLayer,
        {
            "num_experts": 4,
            "hidden_dim": 16,
            "num_selected_experts": 2,
            "dispatcher": "dropless",
        },
        (4, 6, 8),
        expected_num_trainable_weights=3,
        tmp_path=tmp_path,
    )


def test_mixed_bfloat16_is_close_to_float32():
    x = np.random.default_rng(4).normal(size=(2, 16, 8)).astype("float32")
    kwargs = dict(
        num_experts=4,
        hidden_dim=16,
        num_selected_experts=2,
        dispatcher="dropless",
        router_kernel_initializer=keras.initializers.RandomNormal(stddev=1.0),
    )
    reference = MoeLayer(**kwargs)
    expected = _np(reference(x))
    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        layer = MoeLayer(**kwargs)
        layer.build(x.shape)
        _copy_weights(reference, layer)
        with tf.GradientTape() as tape:
            y = layer(x, training=True)
            loss = tf.reduce_sum(tf.cast(y, "float32") ** 2)
        grads = tape.gradient(loss, layer.trainable_weights)
    finally:
        keras.config.set_dtype_policy(policy)
    assert keras.backend.standardize_dtype(y.dtype) == "bfloat16"
    assert layer.router.kernel.dtype == "float32"
    np.testing.assert_allclose(_np(y).astype("float32"), expected, atol=0.1)
    assert all(np.all(np.isfinite(_np(g))) for g in grads)


@pytest.mark.parametrize("router_k", [1, 2])
def test_ensemble_layer_dropless_equals_capacity_dispatch(router_k):
    x = EnsembleTile(2)(
        np.random.default_rng(5).normal(size=(3, 8, 8)).astype("float32")
    )
    common = dict(
        num_experts=8,
        hidden_dim=8,
        ensemble_size=2,
        num_selected_experts=router_k,
        train_capacity_factor=None,
        eval_capacity_factor=None,
        router_kernel_initializer=keras.initializers.RandomNormal(stddev=1.0),
    )
    dropless = EnsembleMoeLayer(dispatcher="dropless", **common)
    indices = EnsembleMoeLayer(dispatcher="indices", **common)
    dropless.build(x.shape)
    indices.build(x.shape)
    _copy_weights(dropless, indices)
    np.testing.assert_allclose(
        _np(dropless(x)), _np(indices(x)), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        dropless.routing_stats()["expert_usage"],
        indices.routing_stats()["expert_usage"],
        rtol=1e-6,
    )
    weights = dropless.routing_weights(x)["combine_weights"]
    np.testing.assert_allclose(
        _np(weights),
        _np(indices.routing_weights(x)["combine_weights"]),
        rtol=1e-6,
        atol=1e-7,
    )


@pytest.mark.parametrize("training", [False, True])
def test_upcycled_vit_preserves_the_dense_function(training):
    """Copies of the dense MLP, renormalised weights: MoE == dense ViT."""
    dense = tiny_vit()
    x = images()
    expected = _np(dense(x, training=training))

    def upcycle(dispatcher, factor):
        return upcycling.upcycle(
            dense,
            num_experts=4,
            blocks="all",
            encoder_router="tokens_choose",
            num_selected_experts=2,
            train_capacity_factor=factor,
            eval_capacity_factor=factor,
            moe_kwargs={"dispatcher": dispatcher, "min_expert_capacity": 1},
            router_kernel_initializer=keras.initializers.RandomNormal(
                stddev=1.0, seed=3
            ),
        )

    # No capacity setting: the default factors (2.0) do not matter.
    moe = upcycle("dropless", 2.0)
    np.testing.assert_allclose(
        _np(moe(x, training=training)), expected, atol=1e-5, rtol=0
    )
    # Nor does a factor that makes capacity dispatch drop tokens.
    tight = upcycle("dropless", 0.25)
    np.testing.assert_allclose(
        _np(tight(x, training=training)), expected, atol=1e-5, rtol=0
    )
    dropping = upcycle("indices", 0.25)
    assert np.abs(_np(dropping(x, training=training)) - expected).max() > 1e-3


_MIRRORED_SCRIPT = textwrap.dedent("""
    import json
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2
    )
    import keras
    from keras_moe.layers.moe import MoeLayer

    def train(strategy):
        with strategy.scope():
            keras.utils.set_random_seed(0)
            inputs = keras.Input((8, 8))
            x = MoeLayer(4, 16, num_selected_experts=2, dispatcher="dropless",
                         jit_compile=True)(inputs)
            outputs = keras.layers.Dense(1)(keras.layers.Flatten()(x))
            model = keras.Model(inputs, outputs)
            model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
        rng = np.random.default_rng(0)
        x = rng.normal(size=(32, 8, 8)).astype("float32")
        y = rng.normal(size=(32, 1)).astype("float32")
        history = model.fit(x, y, batch_size=16, epochs=2, shuffle=False,
                            verbose=0)
        return history.history

    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert mirrored.num_replicas_in_sync == 2
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
    logs = json.loads(result.stdout.strip().splitlines()[-1])
    mirrored, single = logs["mirrored"], logs["single"]
    np.testing.assert_allclose(mirrored["loss"], single["loss"], rtol=1e-4)
    assert mirrored["loss"][-1] < mirrored["loss"][0]
    dropped = [v for k, v in mirrored.items() if k.endswith("_dropped")]
    assert dropped and all(v == [0.0, 0.0] for v in dropped)


@pytest.mark.parametrize("module", [routing, dispatch, experts_lib])
def test_docstring_examples_run(module):
    result = doctest.testmod(module, extraglobs={"keras": keras})
    assert result.attempted >= 1 and result.failed == 0


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))
