"""The einsum and indices dispatchers agree, in outputs and in gradients."""

import sys

import numpy as np
import pytest
import tensorflow as tf

from keras_moe.layers import dispatch
from keras_moe.layers import routing

_CASES = [
    ("tokens_choose", {"num_selected_experts": 1, "expert_capacity": 2}),
    ("tokens_choose", {"num_selected_experts": 2, "expert_capacity": 3}),
    (
        "tokens_choose",
        {
            "num_selected_experts": 2,
            "expert_capacity": 4,
            "batch_priority": True,
            "normalize_combine_weights": True,
        },
    ),
    ("experts_choose", {"expert_capacity": 4}),
    (
        "experts_choose",
        {"expert_capacity": 12, "normalize_combine_weights": True},
    ),
]


def _route(kind, probs, kwargs):
    fn = (
        routing.tokens_choose
        if kind == "tokens_choose"
        else routing.experts_choose
    )
    return fn(probs, **kwargs)


def _np_dispatch_combine(instructions, x, expert_fn):
    """Loops over slots: the plainest statement of dispatch and combine."""
    token_index = np.asarray(instructions.token_index)
    mask = np.asarray(instructions.dispatch_mask)
    weights = np.asarray(instructions.combine_weights)
    g_, e_, c_ = token_index.shape
    out = np.zeros_like(x)
    for g in range(g_):
        for e in range(e_):
            for c in range(c_):
                if mask[g, e, c]:
                    s = token_index[g, e, c]
                    out[g, s] += weights[g, e, c] * expert_fn(e, x[g, s])
    return out


@pytest.mark.parametrize("kind,kwargs", _CASES)
@pytest.mark.parametrize("jit", [False, True])
def test_dispatchers_agree(kind, kwargs, jit):
    rng = np.random.default_rng(3)
    g, s, e, d = 3, 12, 4, 5
    logits = tf.Variable(rng.normal(size=(g, s, e)).astype("float32"))
    x = tf.Variable(rng.normal(size=(g, s, d)).astype("float32"))
    scale = tf.constant(rng.normal(size=(e, 1, 1, d)).astype("float32"))

    def run(name):
        def step():
            with tf.GradientTape() as tape:
                instructions = _route(kind, tf.nn.softmax(logits), kwargs)
                d_ = dispatch.get_dispatcher(name)(instructions)
                slots = d_.dispatch(x)  # (G, E, C, D)
                # A per-expert nonlinear map: (G, E, C, D) -> (E, G, C, D)
                expert_out = tf.tanh(tf.transpose(slots, (1, 0, 2, 3)) * scale)
                y = d_.combine(tf.transpose(expert_out, (1, 0, 2, 3)))
                loss = tf.reduce_sum(y * y)
            return y, tape.gradient(loss, [x, logits])

        return tf.function(step, jit_compile=True)() if jit else step()

    y_e, grads_e = run("einsum")
    y_i, grads_i = run("indices")
    np.testing.assert_allclose(y_e, y_i, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_e, grads_i):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert np.abs(np.asarray(grads_i[1])).sum() > 0  # router gets gradient

    instructions = _route(kind, tf.nn.softmax(logits), kwargs)
    expected = _np_dispatch_combine(
        instructions,
        x.numpy(),
        lambda i, row: np.tanh(row * scale.numpy()[i, 0, 0]),
    )
    np.testing.assert_allclose(y_i, expected, rtol=1e-5, atol=1e-6)


def test_unknown_dispatcher():
    with pytest.raises(ValueError, match="dispatcher must be one of"):
        dispatch.get_dispatcher("scatter")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))
