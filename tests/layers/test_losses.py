"""Tests for keras_moe.layers.losses.

Each loss is checked four ways: against a value worked out by hand (the
arithmetic is in the comments), against a NumPy statement of its equation on
random inputs, against closed forms, and inside tf.function(jit_compile=True)
on computed inputs. Every bad input a user can pass has a test that passes it.
"""

import math
import re
import sys

import numpy as np
import pytest
import tensorflow as tf

from keras_moe.layers import losses
from tests.layers.reference_losses import np_importance
from tests.layers.reference_losses import np_load
from tests.layers.reference_losses import np_load_balancing
from tests.layers.reference_losses import np_z_loss

# Standard normal tail used by the hand-worked load-loss examples.
PHI_1 = 0.8413447460685429  # Phi(1)
SF_1 = 1.0 - PHI_1  # 1 - Phi(1) = 0.15865525...


def _value(x):
    return float(np.asarray(x))


def _random_probs(rng, shape):
    logits = rng.normal(size=shape) * 2.0
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    return (probs / probs.sum(-1, keepdims=True)).astype(np.float32)


def _top_k_indices(probs, k):
    # Stable descending order: ties go to the lower expert id.
    return np.argsort(-probs, axis=-1, kind="stable")[..., :k].astype(np.int32)


# ---------------------------------------------------------------------------
# load_balancing_loss: Switch Transformer eq. (4).
# ---------------------------------------------------------------------------


def test_load_balancing_hand_worked_top1():
    # G=1, S=4, E=2, K=1.
    probs = [[[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.8, 0.2]]]
    indices = [[[0], [0], [1], [0]]]
    # f = [3/4, 1/4] (tokens 0, 1, 3 chose expert 0; token 2 chose expert 1)
    # P = [(0.9+0.6+0.3+0.8)/4, (0.1+0.4+0.7+0.2)/4] = [0.65, 0.35]
    # loss = E * sum_e f*P = 2 * (0.75*0.65 + 0.25*0.35)
    #      = 2 * (0.4875 + 0.0875) = 1.15
    assert _value(losses.load_balancing_loss(probs, indices)) == pytest.approx(
        1.15, abs=1e-6
    )


def test_load_balancing_hand_worked_top2_and_group_mean():
    # G=2, S=2, E=3, K=2.
    probs = [
        [[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]],
        [[1 / 3, 1 / 3, 1 / 3], [1 / 3, 1 / 3, 1 / 3]],
    ]
    indices = [[[0, 1], [1, 2]], [[0, 1], [2, 0]]]
    # Group 0: mask rows [1,1,0] and [0,1,1] -> f = [0.5, 1.0, 0.5]
    #          P = [0.3, 0.45, 0.25]
    #          3 * (0.5*0.3 + 1.0*0.45 + 0.5*0.25) = 3 * 0.725 = 2.175
    # Group 1: mask rows [1,1,0] and [1,0,1] -> f = [1.0, 0.5, 0.5]
    #          P = [1/3, 1/3, 1/3] -> 3 * (2.0 / 3) = 2.0
    # mean over groups = (2.175 + 2.0) / 2 = 2.0875
    assert _value(losses.load_balancing_loss(probs, indices)) == pytest.approx(
        2.0875, abs=1e-6
    )


def test_load_balancing_negative_index_selects_no_expert():
    # G=1, S=2, E=2; token 1 is padding (index -1).
    probs = [[[0.8, 0.2], [0.5, 0.5]]]
    indices = [[[0], [-1]]]
    # f = [1/2, 0] (the padding token still counts in S); P = [0.65, 0.35]
    # loss = 2 * (0.5 * 0.65) = 0.65
    assert _value(losses.load_balancing_loss(probs, indices)) == pytest.approx(
        0.65, abs=1e-6
    )


@pytest.mark.parametrize(
    "shape, k",
    [((1, 4, 2), 1), ((2, 8, 4), 1), ((3, 16, 6), 2), ((2, 5, 8), 8)],
)
def test_load_balancing_matches_numpy(shape, k):
    rng = np.random.default_rng(sum(shape) + k)
    probs = _random_probs(rng, shape)
    indices = _top_k_indices(probs, k)
    got = _value(losses.load_balancing_loss(probs, indices))
    assert got == pytest.approx(np_load_balancing(probs, indices), rel=1e-5)


@pytest.mark.parametrize("num_selected", [1, 2, 3])
def test_load_balancing_uniform_routing_closed_form(num_selected):
    # Uniform probabilities and every expert chosen equally often: each
    # f[g, e] = K / E and P[g, e] = 1 / E, so the loss is E * E * K / E^2 = K
    # (1.0 for top-1 routing).
    num_groups, num_tokens, num_experts = 2, 6, 3
    probs = np.full((num_groups, num_tokens, num_experts), 1.0 / num_experts)
    tokens = np.arange(num_tokens)[:, None]
    rounds = np.arange(num_selected)[None, :]
    indices = np.broadcast_to(
        (tokens + rounds) % num_experts,
        (num_groups, num_tokens, num_selected),
    ).astype(np.int32)
    got = _value(losses.load_balancing_loss(probs, indices))
    assert got == pytest.approx(float(num_selected), abs=1e-6)


def test_load_balancing_collapsed_routing_closed_form():
    # All tokens on expert 0 with probability 1: f = P = [1, 0, 0, 0] and the
    # loss reaches its maximum E = 4.
    probs = np.zeros((1, 5, 4), np.float32)
    probs[..., 0] = 1.0
    indices = np.zeros((1, 5, 1), np.int32)
    got = _value(losses.load_balancing_loss(probs, indices))
    assert got == pytest.approx(4.0)


# ---------------------------------------------------------------------------
# router_z_loss: ST-MoE eq. (5).
# ---------------------------------------------------------------------------


def test_z_loss_hand_worked():
    # G=1, S=2, E=2.
    logits = [[[0.0, 0.0], [math.log(3.0), 0.0]]]
    # token 0: logsumexp = log(1 + 1) = log 2
    # token 1: logsumexp = log(3 + 1) = 2 log 2
    # loss = ((log 2)^2 + 4 (log 2)^2) / 2 = 2.5 * 0.480453 = 1.2011325
    got = _value(losses.router_z_loss(logits))
    assert got == pytest.approx(2.5 * math.log(2.0) ** 2, rel=1e-6)
    assert got == pytest.approx(1.2011325, rel=1e-6)


def test_z_loss_hand_worked_mean_over_groups_and_tokens():
    # G=2, S=1, E=1: logsumexp of one logit is the logit itself.
    # loss = (2^2 + (-3)^2) / 2 = 6.5
    got = _value(losses.router_z_loss([[[2.0]], [[-3.0]]]))
    assert got == pytest.approx(6.5)


@pytest.mark.parametrize("shape", [(1, 4, 2), (2, 8, 4), (3, 7, 16)])
def test_z_loss_matches_numpy(shape):
    rng = np.random.default_rng(sum(shape))
    logits = (rng.normal(size=shape) * 3.0).astype(np.float32)
    got = _value(losses.router_z_loss(logits))
    assert got == pytest.approx(np_z_loss(logits), rel=1e-5)


@pytest.mark.parametrize("num_experts", [1, 2, 8, 32])
def test_z_loss_zero_logits_is_log_e_squared(num_experts):
    got = _value(losses.router_z_loss(np.zeros((2, 3, num_experts))))
    assert got == pytest.approx(math.log(num_experts) ** 2, abs=1e-6)


def test_z_loss_is_stable_for_large_logits():
    # logsumexp([1000, 1000]) = 1000 + log 2; a naive exp would overflow.
    got = _value(losses.router_z_loss([[[1000.0, 1000.0]]]))
    assert got == pytest.approx((1000.0 + math.log(2.0)) ** 2, rel=1e-6)


# ---------------------------------------------------------------------------
# importance_loss: V-MoE appendix A.2.
# ---------------------------------------------------------------------------


def test_importance_hand_worked():
    # G=1, S=4, E=2.
    probs = [[[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.8, 0.2]]]
    # importance = [0.9+0.6+0.3+0.8, 0.1+0.4+0.7+0.2] = [2.6, 1.4]
    # mean = 2.0; population var = (0.6^2 + 0.6^2) / 2 = 0.36
    # loss = (std / mean)^2 = 0.36 / 2.0^2 = 0.09
    assert _value(losses.importance_loss(probs)) == pytest.approx(0.09)


def test_importance_hand_worked_per_group_versus_pooled():
    # G=2, S=4, E=2; group 1 mirrors group 0.
    probs = [
        [[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.8, 0.2]],
        [[0.1, 0.9], [0.4, 0.6], [0.7, 0.3], [0.2, 0.8]],
    ]
    # per group: importance [2.6, 1.4] and [1.4, 2.6], each 0.09 (above);
    #            mean over groups = 0.09.
    # pooled:    importance = [4.0, 4.0], std 0, loss 0.
    assert _value(losses.importance_loss(probs)) == pytest.approx(0.09)
    assert _value(
        losses.importance_loss(probs, per_group=False)
    ) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("per_group", [True, False])
@pytest.mark.parametrize(
    "shape", [(7, 4), (1, 4, 2), (2, 8, 4), (3, 5, 6), (2, 3, 4, 5)]
)
def test_importance_matches_numpy(shape, per_group):
    rng = np.random.default_rng(sum(shape))
    probs = _random_probs(rng, shape)
    got = _value(losses.importance_loss(probs, per_group=per_group))
    want = np_importance(probs, per_group)
    assert got == pytest.approx(want, rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("per_group", [True, False])
def test_importance_uniform_routing_is_zero(per_group):
    probs = np.full((2, 5, 4), 0.25, np.float32)
    got = _value(losses.importance_loss(probs, per_group=per_group))
    assert got == pytest.approx(0.0, abs=1e-7)


def test_importance_collapsed_routing_closed_form():
    # One expert takes everything: importance = [S, 0, ..., 0], whose
    # squared coefficient of variation is E - 1.
    probs = np.zeros((1, 6, 5), np.float32)
    probs[..., 2] = 1.0
    assert _value(losses.importance_loss(probs)) == pytest.approx(4.0)


# ---------------------------------------------------------------------------
# load_loss: V-MoE appendix A.2.
# ---------------------------------------------------------------------------


def test_load_loss_hand_worked_top1():
    # S=2, E=2, K=1, noise_std=1.
    logits = [[1.0, 0.0], [0.0, 0.0]]
    noisy = [[1.0, -0.5], [-1.0, 1.0]]
    # token 0: threshold = largest noisy logit = 1.0
    #          needed = (1 - [1, 0]) / 1 = [0, 1] -> p = [0.5, 1 - Phi(1)]
    # token 1: threshold = 1.0, needed = [1, 1] -> p = [1 - Phi(1)] * 2
    # load = [0.5 + 0.1586553, 2 * 0.1586553] = [0.6586553, 0.3173105]
    # For two experts (std / mean)^2 = ((a - b) / (a + b))^2
    #      = (0.3413447 / 0.9759658)^2 = 0.3497508^2 = 0.1223256
    want = ((0.5 - SF_1) / (0.5 + 3 * SF_1)) ** 2
    got = _value(losses.load_loss(logits, noisy, 1.0, 1))
    assert want == pytest.approx(0.1223256, rel=1e-6)
    assert got == pytest.approx(want, rel=1e-5)


def test_load_loss_hand_worked_top2_threshold_is_kth_noisy_logit():
    # S=1, E=3, K=2, noise_std=0.5. Experts 0 and 1 are in the top 2; all
    # three experts share the threshold = 2nd largest noisy logit = 0.5.
    logits = [[1.0, 0.5, 0.0]]
    noisy = [[1.2, 0.5, 0.1]]
    # needed = (0.5 - [1.0, 0.5, 0.0]) / 0.5 = [-1, 0, 1]
    # p = 1 - Phi(needed) = [Phi(1), 0.5, 1 - Phi(1)]
    #   = [0.8413447, 0.5, 0.1586553]; mean = 0.5
    # var = (0.3413447^2 + 0 + 0.3413447^2) / 3 = 0.0776775
    # loss = 0.0776775 / 0.5^2 = 0.3107100
    want = (2 * (PHI_1 - 0.5) ** 2 / 3) / 0.25
    got = _value(losses.load_loss(logits, noisy, 0.5, 2))
    assert want == pytest.approx(0.31071, rel=1e-5)
    assert got == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("per_group", [True, False])
@pytest.mark.parametrize(
    "shape, k, noise_std",
    [
        ((6, 4), 1, 0.25),
        ((1, 4, 2), 1, 1.0),
        ((2, 8, 4), 2, 0.25),
        ((3, 5, 6), 3, 1 / 6),
        ((2, 3, 4, 5), 2, 0.2),
        ((2, 6, 3), 3, 0.5),
    ],
)
def test_load_loss_matches_numpy(shape, k, noise_std, per_group):
    rng = np.random.default_rng(sum(shape) + k)
    logits = rng.normal(size=shape).astype(np.float32)
    noise = (noise_std * rng.normal(size=shape)).astype(np.float32)
    noisy = logits + noise
    got = _value(
        losses.load_loss(logits, noisy, noise_std, k, per_group=per_group)
    )
    want = np_load(logits, noisy, noise_std, k, per_group)
    assert got == pytest.approx(want, rel=1e-4, abs=1e-7)


def test_load_loss_equal_logits_is_zero():
    # Equal clean logits within each token: every expert is the same distance
    # from the token's threshold, so the load is uniform and the loss is 0.
    rng = np.random.default_rng(0)
    logits = np.repeat(rng.normal(size=(2, 5, 1)), 4, axis=-1)
    noisy = logits + 0.25 * rng.normal(size=logits.shape)
    got = _value(losses.load_loss(logits, noisy, 0.25, 2))
    assert got == pytest.approx(0.0, abs=1e-7)


def test_load_loss_accepts_a_noise_std_tensor():
    logits = [[1.0, 0.5, 0.0]]
    noisy = [[1.2, 0.5, 0.1]]
    want = _value(losses.load_loss(logits, noisy, 0.5, 2))
    got = _value(losses.load_loss(logits, noisy, tf.constant(0.5), 2))
    assert got == pytest.approx(want)


# ---------------------------------------------------------------------------
# All losses: float32 scalars, XLA on computed inputs, gradients.
# ---------------------------------------------------------------------------

NUM_EXPERTS = 4
NUM_SELECTED = 2
NOISE_STD = 1.0 / NUM_EXPERTS


def _all_losses(x, kernel, noise):
    """Computes every loss from router inputs: nothing here is a constant."""
    logits = tf.einsum("gsd,de->gse", x, kernel)
    probs = tf.nn.softmax(logits, axis=-1)
    _, indices = tf.math.top_k(probs, k=NUM_SELECTED)
    noisy = logits + NOISE_STD * noise
    return {
        "load_balancing": losses.load_balancing_loss(probs, indices),
        "z": losses.router_z_loss(logits),
        "importance": losses.importance_loss(probs),
        "importance_pooled": losses.importance_loss(probs, per_group=False),
        "load": losses.load_loss(logits, noisy, NOISE_STD, NUM_SELECTED),
        "load_pooled": losses.load_loss(
            logits, noisy, NOISE_STD, NUM_SELECTED, per_group=False
        ),
    }


def _router_inputs(seed=0, shape=(3, 16, 8)):
    rng = np.random.default_rng(seed)
    x = tf.constant(rng.normal(size=shape), tf.float32)
    kernel = tf.constant(
        rng.normal(size=(shape[-1], NUM_EXPERTS)) * 0.5, tf.float32
    )
    noise = tf.constant(
        rng.normal(size=shape[:-1] + (NUM_EXPERTS,)), tf.float32
    )
    return x, kernel, noise


def test_every_loss_is_a_float32_scalar():
    for name, value in _all_losses(*_router_inputs()).items():
        assert value.dtype == tf.float32, name
        assert tuple(value.shape) == (), name


def test_every_loss_under_xla_matches_eager():
    x, kernel, noise = _router_inputs()
    eager = _all_losses(x, kernel, noise)
    xla = tf.function(_all_losses, jit_compile=True)(x, kernel, noise)
    for name in eager:
        assert _value(xla[name]) == pytest.approx(
            _value(eager[name]), rel=1e-5, abs=1e-7
        ), name


def test_every_loss_under_xla_with_unknown_group_and_token_axes():
    x, kernel, noise = _router_inputs(seed=1, shape=(2, 12, 8))
    eager = _all_losses(x, kernel, noise)
    fn = tf.function(
        _all_losses,
        jit_compile=True,
        input_signature=[
            tf.TensorSpec([None, None, 8], tf.float32),
            tf.TensorSpec([8, NUM_EXPERTS], tf.float32),
            tf.TensorSpec([None, None, NUM_EXPERTS], tf.float32),
        ],
    )
    xla = fn(x, kernel, noise)
    for name in eager:
        assert _value(xla[name]) == pytest.approx(
            _value(eager[name]), rel=1e-5, abs=1e-7
        ), name


def test_every_loss_has_finite_nonzero_gradients_under_xla():
    x, kernel, noise = _router_inputs(seed=2)
    names = sorted(_all_losses(x, kernel, noise))

    @tf.function(jit_compile=True)
    def grads(kernel):
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(kernel)
            values = _all_losses(x, kernel, noise)
        return [tape.gradient(values[name], kernel) for name in names]

    for name, grad in zip(names, grads(kernel)):
        grad = np.asarray(grad)
        assert np.all(np.isfinite(grad)), name
        assert np.abs(grad).max() > 0.0, name


def test_low_precision_inputs_are_computed_in_float32():
    probs16 = tf.constant([[[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.8, 0.2]]])
    probs16 = tf.cast(probs16, tf.float16)
    indices = tf.constant([[[0], [0], [1], [0]]])
    logits16 = tf.cast(tf.constant([[[1.0, 0.5, 0.0]]]), tf.bfloat16)
    values = [
        losses.load_balancing_loss(probs16, indices),
        losses.router_z_loss(logits16),
        losses.importance_loss(probs16),
        losses.load_loss(logits16, logits16 + 0.25, 0.5, 2),
    ]
    for value in values:
        assert value.dtype == tf.float32
    assert _value(values[0]) == pytest.approx(1.15, abs=1e-3)
    assert _value(values[2]) == pytest.approx(0.09, abs=1e-3)


# ---------------------------------------------------------------------------
# Bad inputs.
# ---------------------------------------------------------------------------

PROBS = np.full((1, 4, 2), 0.5, np.float32)
INDICES = np.zeros((1, 4, 1), np.int32)
LOGITS = np.zeros((1, 4, 2), np.float32)


@pytest.mark.parametrize(
    "probs, indices, message",
    [
        (PROBS[0], INDICES, "router_probs must be [G, S, E] (rank 3)"),
        (PROBS, INDICES[0], "expert_indices must be [G, S, K] (rank 3)"),
        (PROBS, INDICES.astype(np.float32), "must be an integer tensor"),
        (
            PROBS,
            np.zeros((1, 4, 3), np.int32),
            "last axis K = 3; expected 1 <= K <= E = 2",
        ),
        (
            PROBS,
            np.zeros((1, 4, 0), np.int32),
            "last axis K = 0; expected 1 <= K <= E = 2",
        ),
        (PROBS, np.zeros((1, 3, 1), np.int32), "must agree on axis 1 (S)"),
        (PROBS, np.zeros((2, 4, 1), np.int32), "must agree on axis 0 (G)"),
    ],
)
def test_load_balancing_bad_inputs(probs, indices, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        losses.load_balancing_loss(probs, indices)


@pytest.mark.parametrize("shape", [(4, 2), (1, 1, 4, 2)])
def test_z_loss_bad_rank(shape):
    with pytest.raises(
        ValueError, match=re.escape("router_logits must be [G, S, E] (rank 3)")
    ):
        losses.router_z_loss(np.zeros(shape, np.float32))


def test_importance_bad_rank():
    with pytest.raises(ValueError, match=re.escape("(rank >= 2); got rank 1")):
        losses.importance_loss(np.full((4,), 0.25, np.float32))


@pytest.mark.parametrize(
    "noisy, noise_std, k, message",
    [
        (LOGITS[0], 0.5, 1, "must have the shape of router_logits"),
        (np.zeros((1, 4, 3)), 0.5, 1, "must have the shape of router_logits"),
        (LOGITS, 0.0, 1, "noise_std must be a finite scalar > 0; got 0.0"),
        (LOGITS, -1.0, 1, "noise_std must be a finite scalar > 0; got -1.0"),
        (LOGITS, float("nan"), 1, "noise_std must be a finite scalar > 0"),
        (LOGITS, tf.constant(-0.5), 1, "noise_std must be a finite scalar > 0"),
        (LOGITS, [0.5, 0.5], 1, "noise_std must be a finite scalar > 0"),
        (LOGITS, 0.5, 3, "1 <= K <= E = 2; got 3"),
        (LOGITS, 0.5, 0, "1 <= K <= E = 2; got 0"),
        (LOGITS, 0.5, 1.5, "1 <= K <= E = 2; got 1.5"),
        (LOGITS, 0.5, True, "1 <= K <= E = 2; got True"),
    ],
)
def test_load_loss_bad_inputs(noisy, noise_std, k, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        losses.load_loss(LOGITS, noisy, noise_std, k)


def test_load_loss_bad_rank():
    with pytest.raises(ValueError, match=re.escape("(rank >= 2); got rank 1")):
        losses.load_loss(np.zeros(4), np.zeros(4), 0.5, 1)


@pytest.mark.parametrize(
    "call",
    [
        lambda t: losses.load_balancing_loss(
            t, tf.zeros(tf.shape(t)[:-1], tf.int32)[..., None]
        ),
        losses.importance_loss,
        lambda t: losses.load_loss(t, t, 0.5, 1),
    ],
    ids=["load_balancing", "importance", "load"],
)
def test_unknown_number_of_experts_is_rejected_when_traced(call):
    fn = tf.function(
        call, input_signature=[tf.TensorSpec([None, None, None], tf.float32)]
    )
    with pytest.raises(ValueError, match="statically known number of experts"):
        fn.get_concrete_function()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))
