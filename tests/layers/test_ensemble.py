"""E^3 layers against a NumPy statement of ensemble routing, and contracts.

The NumPy statement routes each ensemble member on its own, the way the
paper describes E^3: member m's rows of the tiled batch, member m's columns
of the router kernel (an E/M-way softmax), member m's experts, and the
routing of `reference_routing` (written independently of the library).
"""

import math
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_moe.layers import losses
from keras_moe.layers.ensemble import SWITCH_LOSS_WEIGHTS
from keras_moe.layers.ensemble import EnsembleAverage
from keras_moe.layers.ensemble import EnsembleExpertsChooseRouter
from keras_moe.layers.ensemble import EnsembleMoeLayer
from keras_moe.layers.ensemble import EnsembleTile
from keras_moe.layers.ensemble import EnsembleTokensChooseRouter
from keras_moe.layers.ensemble import block_diagonal
from keras_moe.layers.ensemble import match_member_rows
from keras_moe.layers.moe import MoeLayer
from tests.layer_test_case import run_layer_test
from tests.layers.reference_moe import route

try:
    from tests.layers import reference_routing as ref
except ImportError:
    import reference_routing as ref


def _np(x):
    return keras.ops.convert_to_numpy(x)


def _softmax(x):
    z = np.exp(x - x.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def _np_member_groups(tokens, group_size):
    """One member's <[n, D]> tokens -> groups <[G, S, D]>, mask <[G, S]>."""
    pad = (-len(tokens)) % group_size
    padded = np.concatenate([tokens, np.zeros((pad, tokens.shape[1]))])
    mask = np.arange(len(padded)) < len(tokens)
    return (
        padded.reshape(-1, group_size, tokens.shape[1]),
        mask.reshape(-1, group_size),
    )


def _np_ensemble(layer, x, training, noise=None):
    """NumPy E^3 layer (relu experts). Returns (outputs, gates, combine).

    gates and combine are <float64>[M*B, T, E]: the block-diagonal router
    probabilities and the per-expert combine weights of every token.
    `noise`, if given, is the standard normal draw <[M*G, S, E/M]> of the
    router (member-major groups): member m's logits get
    `layer.noise_std * noise[m*G:(m+1)*G]` before the softmax (noisy top-K).
    """
    members = layer.ensemble_size
    per_member = layer.num_experts // members
    kernel = _np(layer.router.kernel).astype(np.float64)
    wi = _np(layer.experts.input_kernels[0]).astype(np.float64)
    wo = _np(layer.experts.wo).astype(np.float64)
    rows, seq, dim = x.shape
    batch = rows // members
    if layer.group_size is None:
        group_size = seq
    else:
        assert layer.group_size % members == 0
        group_size = layer.group_size // members
    factor = (
        layer.train_capacity_factor if training else layer.eval_capacity_factor
    )
    capacity = ref.expert_capacity(
        group_size,
        per_member,
        factor,
        layer.num_selected_experts,
        layer.min_expert_capacity,
        layer.router_type,
    )
    outputs = np.zeros(x.shape)
    gates = np.zeros((rows, seq, layer.num_experts))
    combine = np.zeros((rows, seq, layer.num_experts))
    for m in range(members):
        experts = slice(m * per_member, (m + 1) * per_member)
        tokens = x[m * batch : (m + 1) * batch].reshape(-1, dim)
        groups, mask = _np_member_groups(tokens, group_size)
        logits = groups @ kernel[:, experts]  # (G, S, E/M)
        if noise is not None:
            num_groups = len(groups)
            member_noise = noise[m * num_groups : (m + 1) * num_groups]
            logits = logits + layer.noise_std * member_noise
        probs = _softmax(logits)
        routed = route(layer, probs, capacity, token_mask=mask)
        # Every expert of the member on every token; combine picks.
        hidden = np.maximum(np.einsum("gsd,edh->gseh", groups, wi[experts]), 0)
        expert_out = np.einsum("gseh,ehd->gsed", hidden, wo[experts])
        out = np.einsum("gsec,gsed->gsd", routed.combine, expert_out)
        n = len(tokens)
        shape = (batch, seq)
        outputs[m * batch : (m + 1) * batch] = out.reshape(-1, dim)[:n].reshape(
            *shape, dim
        )
        member_rows = slice(m * batch, (m + 1) * batch)
        gates[member_rows, :, experts] = probs.reshape(-1, per_member)[
            :n
        ].reshape(*shape, per_member)
        combine[member_rows, :, experts] = (
            routed.combine.sum(-1)
            .reshape(-1, per_member)[:n]
            .reshape(*shape, per_member)
        )
    return outputs, gates, combine


_CASES = [
    {"num_selected_experts": 1},
    {"num_selected_experts": 2, "train_capacity_factor": 0.5},
    {"num_selected_experts": 2, "batch_priority": True},
    {"router": "experts_choose", "train_capacity_factor": 1.0},
    {
        "router": "experts_choose",
        "normalize_combine_weights": True,
        "group_size": 8,
    },
    {"num_selected_experts": 1, "group_size": 6, "min_expert_capacity": 1},
]


def _layer(members=2, **kwargs):
    kwargs.setdefault(
        "router_kernel_initializer", keras.initializers.RandomNormal(stddev=1.0)
    )
    # Noise-free unless a test asks for it (the default is vmoe's noise).
    kwargs.setdefault("noise_std", 0.0)
    return EnsembleMoeLayer(
        num_experts=8, hidden_dim=12, ensemble_size=members, **kwargs
    )


@pytest.mark.parametrize("kwargs", _CASES)
@pytest.mark.parametrize("dispatcher", ["einsum", "indices"])
def test_matches_numpy_member_by_member(kwargs, dispatcher):
    # 2 members x 3 examples x 5 tokens: with group_size the 15 tokens of a
    # member do not fill whole groups, so each member is padded on its own.
    x = np.random.default_rng(0).normal(size=(6, 5, 8)).astype("float32")
    layer = _layer(dispatcher=dispatcher, **kwargs)
    y = _np(layer(x, training=True))
    expected, gates, combine = _np_ensemble(layer, x.astype(np.float64), True)
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)
    weights = layer.routing_weights(x, training=True)
    np.testing.assert_allclose(
        _np(weights["router_probs"]), gates, rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        _np(weights["combine_weights"]), combine, rtol=1e-5, atol=1e-6
    )


def test_gates_are_block_diagonal_and_each_block_sums_to_one():
    members, per_member, batch = 4, 2, 3
    x = np.random.default_rng(1).normal(size=(members * batch, 7, 8))
    x = x.astype("float32")
    layer = EnsembleMoeLayer(
        num_experts=members * per_member,
        hidden_dim=8,
        ensemble_size=members,
        num_selected_experts=2,
        router_kernel_initializer=keras.initializers.RandomNormal(stddev=1.0),
    )
    weights = layer.routing_weights(x)
    gates = _np(weights["router_probs"])
    combine = _np(weights["combine_weights"])
    kernel = _np(layer.router.kernel)
    # NumPy statement: row r belongs to member r // B; its gates are the
    # softmax over the member's columns, zero on every other column.
    for row in range(members * batch):
        m = row // batch
        block = slice(m * per_member, (m + 1) * per_member)
        outside = np.ones(members * per_member, bool)
        outside[block] = False
        expected = _softmax(x[row].astype(np.float64) @ kernel[:, block])
        np.testing.assert_allclose(gates[row][:, block], expected, rtol=1e-5)
        np.testing.assert_allclose(gates[row][:, block].sum(-1), 1.0, 1e-6)
        assert np.all(gates[row][:, outside] == 0.0)
        assert np.all(combine[row][:, outside] == 0.0)
    # K = E/M = 2 with no drops: each token uses both experts of its block.
    assert np.all(combine.sum(-1) > 0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_selected_experts": 2},
        {"num_selected_experts": 1, "group_size": 8, "batch_priority": True},
        {"router": "experts_choose", "normalize_combine_weights": True},
    ],
)
@pytest.mark.parametrize("training", [False, True])
def test_one_member_is_the_plain_moe_layer(kwargs, training):
    x = np.random.default_rng(2).normal(size=(3, 10, 8)).astype("float32")
    common = dict(
        num_experts=4,
        hidden_dim=12,
        noise_std=0.5,
        seed=7,
        router_z_loss_weight=1e-3,
        load_balancing_loss_weight=1e-2,
        importance_loss_weight=0.1,
        load_loss_weight=0.2,
        router_kernel_initializer=keras.initializers.RandomNormal(stddev=1.0),
        **kwargs,
    )
    ensemble = EnsembleMoeLayer(ensemble_size=1, **common)
    plain = MoeLayer(**common)
    ensemble.build(x.shape)
    plain.build(x.shape)
    for source, target in zip(ensemble.weights, plain.weights):
        target.assign(source)
    np.testing.assert_array_equal(
        _np(ensemble(x, training=training)), _np(plain(x, training=training))
    )
    np.testing.assert_array_equal(
        [float(v) for v in ensemble.losses], [float(v) for v in plain.losses]
    )
    stats, plain_stats = ensemble.routing_stats(), plain.routing_stats()
    np.testing.assert_array_equal(
        stats["expert_usage"], plain_stats["expert_usage"]
    )


def test_aux_losses_are_the_mean_of_each_members_losses():
    members, batch = 2, 2
    x = np.random.default_rng(3).normal(size=(members * batch, 16, 8))
    x = x.astype("float32")
    layer = _layer(
        num_selected_experts=2,
        router_z_loss_weight=1.0,
        load_balancing_loss_weight=1.0,
        importance_loss_weight=1.0,
        load_loss_weight=1.0,  # not added: no noise, no load loss
    )
    layer(x, training=True)
    kernel = _np(layer.router.kernel)
    per_member = {"z": [], "balance": [], "importance": []}
    for m in range(members):
        logits = x[m * batch : (m + 1) * batch] @ kernel[:, 4 * m : 4 * m + 4]
        probs = _softmax(logits.astype(np.float64)).astype("float32")
        top2 = np.argsort(-probs, axis=-1)[..., :2].astype("int32")
        per_member["z"].append(float(losses.router_z_loss(logits)))
        per_member["balance"].append(
            float(losses.load_balancing_loss(probs, top2))
        )
        per_member["importance"].append(float(losses.importance_loss(probs)))
    expected = [np.mean(per_member[k]) for k in ("z", "balance", "importance")]
    np.testing.assert_allclose(
        [float(v) for v in layer.losses], expected, rtol=1e-5
    )


def _fixed_normal(monkeypatch, draw):
    """Makes the router's `keras.random.normal` return `draw` (its shape
    checked), so that a noisy call sees a known noise; counts the calls."""
    calls = []

    def normal(shape, *args, **kwargs):
        assert tuple(int(d) for d in shape) == draw.shape, shape
        calls.append(tuple(shape))
        return keras.ops.convert_to_tensor(draw, "float32")

    monkeypatch.setattr(keras.random, "normal", normal)
    return calls


def test_defaults_are_vmoes_noisy_top_k_and_importance_load_losses():
    layer = EnsembleMoeLayer(num_experts=8, hidden_dim=4, ensemble_size=2)
    # vmoe: noise_std 1.0 divided by the E/M = 4 experts of a member.
    assert layer.noise_std == 0.25
    assert layer.loss_weights == {
        "router_z_loss": 0.0,
        "load_balancing_loss": 0.0,
        "importance_loss": 0.005,
        "load_loss": 0.005,
    }
    assert EnsembleMoeLayer(12, 4, ensemble_size=4).noise_std == 1.0 / 3
    # The Switch recipe, still available.
    switch = EnsembleMoeLayer(
        8, 4, ensemble_size=2, noise_std=0.0, **SWITCH_LOSS_WEIGHTS
    )
    assert switch.noise_std == 0.0
    assert switch.loss_weights == MoeLayer(8, 4).loss_weights
    restored = EnsembleMoeLayer.from_config(layer.get_config())
    assert restored.noise_std == 0.25
    assert restored.loss_weights == layer.loss_weights
    with pytest.raises(ValueError, match="noise_std must be >= 0"):
        EnsembleMoeLayer(8, 4, ensemble_size=2, noise_std=-0.1)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_selected_experts": 2},
        {"num_selected_experts": 1, "train_capacity_factor": 0.5},
    ],
)
def test_noisy_top_k_routing_matches_numpy_member_by_member(
    kwargs, monkeypatch
):
    """Training routes on the noisy logits of each member (std 1/(E/M));
    evaluation on the clean ones."""
    members, batch, seq = 2, 3, 5
    rng = np.random.default_rng(11)
    x = rng.normal(size=(members * batch, seq, 8)).astype("float32")
    # One group per member sequence: M*G = M*B groups of S = T tokens.
    draw = rng.normal(size=(members * batch, seq, 4)).astype("float32")
    layer = _layer(noise_std=None, dispatcher="indices", **kwargs)
    assert layer.noise_std == 0.25
    layer.build(x.shape)
    calls = _fixed_normal(monkeypatch, draw)
    y = _np(layer(x, training=True))
    expected, gates, combine = _np_ensemble(
        layer, x.astype(np.float64), True, noise=draw.astype(np.float64)
    )
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)
    weights = layer.routing_weights(x, training=True)
    np.testing.assert_allclose(
        _np(weights["router_probs"]), gates, rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        _np(weights["combine_weights"]), combine, rtol=1e-5, atol=1e-6
    )
    # The noise changes the routing of some tokens (else the test is moot).
    _, _, clean_combine = _np_ensemble(layer, x.astype(np.float64), True)
    assert np.any((combine > 0) != (clean_combine > 0))
    assert len(calls) == 2
    # No noise outside training.
    y_eval = _np(layer(x, training=False))
    assert len(calls) == 2
    expected_eval, _, _ = _np_ensemble(layer, x.astype(np.float64), False)
    np.testing.assert_allclose(y_eval, expected_eval, rtol=1e-4, atol=1e-5)


def _np_cv_squared(totals):
    """Squared coefficient of variation over the last axis (ddof=0)."""
    return totals.var(axis=-1) / totals.mean(axis=-1) ** 2


def test_importance_and_load_losses_match_numpy_member_by_member(
    monkeypatch,
):
    """V-MoE's losses (Riquelme et al. 2021, A.2), per member and group:
    importance of the clean softmax; load from the probability that a new
    noise draw keeps each expert above the token's K-th noisy logit."""
    members, batch, seq, k = 2, 3, 6, 2
    rng = np.random.default_rng(12)
    x = rng.normal(size=(members * batch, seq, 8)).astype("float32")
    draw = rng.normal(size=(members * batch, seq, 4)).astype("float32")
    layer = _layer(noise_std=None, num_selected_experts=k)
    layer.build(x.shape)
    _fixed_normal(monkeypatch, draw)
    layer(x, training=True)
    kernel = _np(layer.router.kernel).astype(np.float64)
    std = 0.25
    importance, load = [], []
    for m in range(members):
        rows = slice(m * batch, (m + 1) * batch)
        # (B, T, E/M): B groups of one sequence each.
        logits = x[rows].astype(np.float64) @ kernel[:, 4 * m : 4 * m + 4]
        noisy = logits + std * draw[rows]
        importance.append(_np_cv_squared(_softmax(logits).sum(axis=1)))
        threshold = np.sort(noisy, axis=-1)[..., -k]  # K-th largest, (B, T)
        p_above = np.vectorize(lambda z: 0.5 * math.erfc(z / math.sqrt(2)))(
            (threshold[..., None] - logits) / std
        )
        load.append(_np_cv_squared(p_above.sum(axis=1)))
    # Mean over each member's groups, then over members.
    expected = [
        0.005 * np.mean(importance),
        0.005 * np.mean(load),
    ]
    got = [float(v) for v in layer.losses]
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    # Per member, the two members' losses differ: each has its own.
    assert not np.allclose(np.mean(load[0]), np.mean(load[1]))
    # Evaluation adds the importance loss only (no noise, no load loss).
    layer(x, training=False)
    assert len(layer.losses) == 1
    np.testing.assert_allclose(float(layer.losses[0]), expected[0], rtol=1e-4)


def test_routing_stats_count_all_experts():
    x = np.random.default_rng(4).normal(size=(4, 16, 8)).astype("float32")
    layer = _layer(num_selected_experts=1, eval_capacity_factor=None)
    layer(x)
    _, _, combine = _np_ensemble(layer, x.astype(np.float64), False)
    counts = (combine > 0).sum(axis=(0, 1))  # tokens per expert, (E,)
    stats = layer.routing_stats()
    assert stats["expert_usage"].shape == (8,)
    np.testing.assert_allclose(
        stats["expert_usage"], counts / counts.sum(), rtol=1e-6
    )
    assert stats["dropped"] == 0.0


def test_capacity_matches_the_plain_formula_over_all_members():
    # vmoe: S tokens of all members per group, K * S * factor / E slots.
    layer = EnsembleMoeLayer(
        8,
        8,
        ensemble_size=2,
        num_selected_experts=2,
        group_size=64,
        train_capacity_factor=1.25,
        min_expert_capacity=1,
    )
    assert layer.capacity(64 // 2, training=True) == math.ceil(
        2 * 64 * 1.25 / 8
    )


def test_jit_compiled_layer_matches_numpy():
    x = np.random.default_rng(5).normal(size=(4, 6, 8)).astype("float32")
    layer = _layer(num_selected_experts=2, jit_compile=True)
    y = _np(layer(x, training=False))
    expected, _, _ = _np_ensemble(layer, x.astype(np.float64), False)
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)


def test_routers_alone_route_member_major_groups():
    x = np.random.default_rng(6).normal(size=(4, 6, 8)).astype("float32")
    init = keras.initializers.RandomNormal(stddev=1.0, seed=3)
    for router in (
        EnsembleTokensChooseRouter(
            8, ensemble_size=2, num_selected_experts=2, kernel_initializer=init
        ),
        EnsembleExpertsChooseRouter(
            8, ensemble_size=2, kernel_initializer=init
        ),
    ):
        out = router.route(x, expert_capacity=3)
        kernel = _np(router.kernel)
        # Groups 0, 1 are member 0's (experts 0-3), groups 2, 3 member 1's.
        expected = np.concatenate(
            [_softmax(x[:2] @ kernel[:, :4]), _softmax(x[2:] @ kernel[:, 4:])]
        )
        np.testing.assert_allclose(_np(out.router_probs), expected, rtol=1e-5)
        clone = type(router).from_config(router.get_config())
        assert clone.get_config() == router.get_config()
        assert router.get_config()["ensemble_size"] == 2
    full = _np(block_diagonal(out.router_probs, 2))
    assert full.shape == (4, 6, 8)
    assert np.all(full[:2, :, 4:] == 0) and np.all(full[2:, :, :4] == 0)


def test_layer_contract(tmp_path):
    layer = run_layer_test(
        EnsembleMoeLayer,
        {
            "num_experts": 4,
            "hidden_dim": 16,
            "ensemble_size": 2,
            "num_selected_experts": 2,
        },
        (4, 6, 8),
        expected_num_trainable_weights=3,
        float32_weights=("router/kernel",),
        tmp_path=tmp_path,
    )
    # One router, the ensemble one, under the plain layer's name.
    assert [w.path.split("/", 1)[1] for w in layer.weights] == [
        "router/kernel",
        "experts/wi",
        "experts/wo",
    ]
    assert isinstance(layer.router, EnsembleTokensChooseRouter)
    assert sum(isinstance(s, keras.Layer) for s in layer._layers) == 2


def test_keras_round_trip_in_a_tiled_model(tmp_path):
    inputs = keras.Input((6, 8))
    tiled = EnsembleTile(2)(inputs)
    hidden = _layer(num_selected_experts=2)(tiled)
    pooled = keras.layers.GlobalAveragePooling1D()(hidden)
    logits = keras.layers.Dense(3)(pooled)
    outputs = EnsembleAverage(2, mode="logits")(logits)
    model = keras.Model(inputs, outputs)
    x = np.random.default_rng(7).normal(size=(5, 6, 8)).astype("float32")
    assert tuple(model(x).shape) == (5, 3)
    path = str(tmp_path / "e3.keras")
    model.save(path)
    restored = keras.models.load_model(path)
    np.testing.assert_array_equal(_np(model(x)), _np(restored(x)))
    assert isinstance(restored.layers[2], EnsembleMoeLayer)
    assert restored.layers[2].get_config() == model.layers[2].get_config()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"ensemble_size": 3}, "num_experts must be a multiple of"),
        ({"ensemble_size": 0}, "ensemble_size must be an int >= 1"),
        ({"ensemble_size": -2}, "ensemble_size must be an int >= 1"),
        ({"ensemble_size": 1.5}, "ensemble_size must be an int >= 1"),
        ({"ensemble_size": True}, "ensemble_size must be an int >= 1"),
        ({"ensemble_size": 2, "group_size": 9}, "multiple of ensemble_size"),
        (
            {"ensemble_size": 4, "num_selected_experts": 3},
            "at most the experts of one member",
        ),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EnsembleMoeLayer(num_experts=8, hidden_dim=4, **kwargs)
    if "group_size" not in kwargs:
        router_kwargs = {
            k: v for k, v in kwargs.items() if k != "num_selected_experts"
        }
        with pytest.raises(ValueError, match=match.split(" of")[0]):
            EnsembleTokensChooseRouter(
                8,
                num_selected_experts=kwargs.get("num_selected_experts", 1),
                **router_kwargs,
            )


def test_a_batch_that_is_not_member_tiled_is_refused():
    layer = _layer()
    with pytest.raises(ValueError, match="5 rows is not a multiple of 2"):
        layer(np.zeros((5, 6, 8), "float32"))
    with pytest.raises(ValueError, match="token_mask must have the shape"):
        layer(np.zeros((4, 6, 8), "float32"), token_mask=np.ones((4, 3), bool))
    # Rank-2 tokens <[M*B, D]> with a group size: rows must split too.
    with pytest.raises(ValueError, match="7 rows is not a multiple of 2"):
        _layer(group_size=4)(np.zeros((7, 8), "float32"))
    # Unknown batch size in a graph: the check runs with the step.
    graph_call = tf.function(
        layer, input_signature=[tf.TensorSpec((None, 6, 8), tf.float32)]
    )
    graph_call(tf.zeros((4, 6, 8)))
    with pytest.raises(tf.errors.InvalidArgumentError, match="member-tiled"):
        graph_call(tf.zeros((3, 6, 8)))
    router = EnsembleTokensChooseRouter(8, ensemble_size=2)
    with pytest.raises(ValueError, match="3 groups, not a multiple of 2"):
        router.route(np.zeros((3, 6, 8), "float32"), expert_capacity=2)


def test_tile_and_average_match_numpy():
    rng = np.random.default_rng(8)
    x = rng.normal(size=(3, 4)).astype("float32")
    tiled = _np(EnsembleTile(3)(x))
    np.testing.assert_array_equal(tiled, np.concatenate([x, x, x]))
    assert tuple(EnsembleTile(3).compute_output_shape((None, 4))) == (None, 4)
    assert tuple(EnsembleTile(3).compute_output_shape((2, 4))) == (6, 4)
    labels = np.array([2, 0], "int32")
    np.testing.assert_array_equal(_np(EnsembleTile(2)(labels)), [2, 0, 2, 0])

    members, batch, classes = 3, 2, 4
    logits = rng.normal(size=(members * batch, classes)).astype("float32")
    probs = _softmax(logits.astype(np.float64))
    # member m's prediction for example b is row m*B + b.
    mean_probs = probs.reshape(members, batch, classes).mean(axis=0)
    np.testing.assert_allclose(
        _np(EnsembleAverage(members)(probs.astype("float32"))),
        mean_probs,
        rtol=1e-6,
    )
    log_probs = np.log(probs).astype("float32")
    np.testing.assert_allclose(
        _np(EnsembleAverage(members, mode="log_probabilities")(log_probs)),
        np.log(mean_probs),
        rtol=1e-5,
    )
    from_logits = _np(EnsembleAverage(members, mode="logits")(logits))
    np.testing.assert_allclose(from_logits, np.log(mean_probs), rtol=1e-5)
    np.testing.assert_allclose(
        _softmax(from_logits.astype(np.float64)), mean_probs, rtol=1e-5
    )
    assert tuple(EnsembleAverage(3).compute_output_shape((6, 4))) == (2, 4)


def test_match_member_rows_repeats_targets_at_run_time():
    y = np.array([1, 2], "int32")
    tiled = match_member_rows(y, tf.zeros((6, 5)))
    np.testing.assert_array_equal(_np(tiled), [1, 2, 1, 2, 1, 2])
    np.testing.assert_array_equal(
        _np(match_member_rows(y, tf.zeros((2, 5)))), y
    )
    assert match_member_rows(None, tf.zeros((6, 5))) is None


@pytest.mark.parametrize(
    "layer_cls,kwargs,input_shape,output_shape",
    [
        (EnsembleTile, {"ensemble_size": 2}, (3, 4), (6, 4)),
        (EnsembleAverage, {"ensemble_size": 2}, (4, 4), (2, 4)),
    ],
)
def test_tile_and_average_config_and_mixed_precision(
    layer_cls, kwargs, input_shape, output_shape
):
    x = np.random.default_rng(9).uniform(size=input_shape).astype("float32")
    layer = layer_cls(**kwargs)
    config = layer.get_config()
    assert layer_cls.from_config(config).get_config() == config
    assert tuple(layer(x).shape) == output_shape
    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        y = layer_cls(**kwargs)(x)
        assert keras.backend.standardize_dtype(y.dtype) == "bfloat16"
    finally:
        keras.config.set_dtype_policy(policy)


@pytest.mark.parametrize(
    "mode", ["probabilities", "log_probabilities", "logits"]
)
def test_tile_and_average_symbolic_fit_and_round_trip(mode, tmp_path):
    """The rest of the layer contract, for layers that change the batch size
    (run_layer_test wants outputs shaped like the inputs): a symbolic model
    that tiles and averages back, one fit step, a .keras round trip."""
    x = np.random.default_rng(10).uniform(size=(3, 4)).astype("float32")
    inputs = keras.Input((4,))
    tiled = EnsembleTile(2)(keras.layers.Dense(4)(inputs))
    scores = keras.layers.Dense(5, activation="softmax")(tiled)
    if mode == "log_probabilities":
        scores = keras.ops.log(scores)
    outputs = EnsembleAverage(2, mode=mode)(scores)
    model = keras.Model(inputs, outputs)
    assert tuple(model.output.shape) == (None, 5)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    before = [_np(w) for w in model.trainable_weights]
    model.fit(x, np.ones((3, 5), "float32"), batch_size=3, verbose=0)
    after = [_np(w) for w in model.trainable_weights]
    assert all(not np.allclose(a, b) for a, b in zip(before, after))
    path = str(tmp_path / "model.keras")
    model.save(path)
    restored = keras.models.load_model(path)
    np.testing.assert_array_equal(_np(model(x)), _np(restored(x)))
    kinds = [type(layer) for layer in restored.layers]
    assert EnsembleTile in kinds and EnsembleAverage in kinds


def test_tile_and_average_bad_arguments():
    for bad in (0, -1, 2.0, None):
        with pytest.raises(ValueError, match="ensemble_size must be an int"):
            EnsembleTile(bad)
        with pytest.raises(ValueError, match="ensemble_size must be an int"):
            EnsembleAverage(bad)
    with pytest.raises(ValueError, match="mode must be one of"):
        EnsembleAverage(2, mode="mean")
    with pytest.raises(ValueError, match="3 rows is not a multiple of 2"):
        EnsembleAverage(2)(np.full((3, 2), 0.5, "float32"))


def test_the_moe_steps_are_moe_layers_own():
    """E^3 changes the router, the member count and the input check only:
    grouping, routing, dispatch, experts and combine are MoeLayer's."""
    for name in (
        "call",
        "build",
        "_group",
        "_ungroup",
        "_route_and_dispatch",
        "_combine",
        "_moe",
        "_stats",
        "capacity",
        "experts_per_router",
    ):
        assert name not in vars(EnsembleMoeLayer), name
    # Ensemble routers are called like any Keras layer and built by Keras.
    router = EnsembleExpertsChooseRouter(8, ensemble_size=2)
    assert not router.built
    router(np.zeros((4, 6, 8), "float32"), expert_capacity=2)
    assert router.built and tuple(router.kernel.shape) == (8, 8)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))
