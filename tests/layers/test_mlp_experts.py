"""Mlp and Experts against NumPy statements of the MLP."""

import math
import sys

import keras
import numpy as np
import pytest

from keras_moe.layers.experts import Experts
from keras_moe.layers.mlp import Mlp
from keras_moe.layers.mlp import get_activation
from tests.layer_test_case import run_layer_test


def _np_gelu(x, approximate):
    if approximate:
        return (
            0.5
            * x
            * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
        )
    erf = np.vectorize(math.erf)
    return 0.5 * x * (1 + erf(x / math.sqrt(2)))


_NP_ACTIVATIONS = {
    "relu": lambda x: np.maximum(x, 0),
    "gelu": lambda x: _np_gelu(x, False),
    "gelu_tanh": lambda x: _np_gelu(x, True),
    "silu": lambda x: x / (1 + np.exp(-x)),
}


def _np_mlp(x, weights, activation, use_bias):
    """NumPy MLP; weights in the layer's own order."""
    gated = activation.startswith("gated_")
    base = {
        "gated_gelu": "gelu_tanh",
        "gated_silu": "silu",
        "gated_relu": "relu",
    }
    act = _NP_ACTIVATIONS[base.get(activation, activation)]
    n_in = 2 if gated else 1
    kernels, rest = weights[:n_in], weights[n_in:]
    wo = rest[0]
    biases = rest[1 : 1 + n_in] if use_bias else [0.0] * n_in
    bo = rest[-1] if use_bias else 0.0
    h = [x @ k + b for k, b in zip(kernels, biases)]
    a = act(h[0]) * (h[1] if gated else 1.0)
    return a @ wo + bo


@pytest.mark.parametrize(
    "activation",
    ["relu", "gelu", "gelu_tanh", "silu", "gated_gelu", "gated_silu"],
)
@pytest.mark.parametrize("use_bias", [False, True])
def test_mlp_matches_numpy(activation, use_bias):
    layer = Mlp(
        16, activation=activation, use_bias=use_bias, bias_initializer="uniform"
    )
    x = np.random.default_rng(1).normal(size=(2, 5, 8)).astype("float32")
    y = keras.ops.convert_to_numpy(layer(x))
    weights = [keras.ops.convert_to_numpy(w) for w in layer.weights]
    np.testing.assert_allclose(
        y, _np_mlp(x, weights, activation, use_bias), rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("activation", ["relu", "gelu", "gated_gelu"])
@pytest.mark.parametrize("use_bias", [False, True])
def test_experts_are_independent_mlps(activation, use_bias):
    layer = Experts(
        3,
        16,
        activation=activation,
        use_bias=use_bias,
        bias_initializer="uniform",
    )
    x = np.random.default_rng(2).normal(size=(3, 7, 8)).astype("float32")
    y = keras.ops.convert_to_numpy(layer(x))
    weights = [keras.ops.convert_to_numpy(w) for w in layer.weights]
    for e in range(3):
        expected = _np_mlp(x[e], [w[e] for w in weights], activation, use_bias)
        np.testing.assert_allclose(y[e], expected, rtol=1e-4, atol=1e-5)


def test_mlp_layer_contract(tmp_path):
    run_layer_test(
        Mlp,
        {"hidden_dim": 16, "activation": "gated_gelu", "use_bias": True},
        (4, 6, 8),
        expected_num_trainable_weights=6,
        tmp_path=tmp_path,
    )


def test_bad_arguments():
    with pytest.raises(ValueError, match="activation must be one of"):
        get_activation("swishy")
    with pytest.raises(ValueError, match="hidden_dim must be >= 1"):
        Mlp(0)
    with pytest.raises(ValueError, match="num_experts must be an int >= 1"):
        Experts(0, 4)
    with pytest.raises(ValueError, match=r"expects inputs <\[E=3, N, D\]>"):
        Experts(3, 4)(np.zeros((2, 5, 8), "float32"))


def test_weights_to_be_overwritten_skips_only_the_random_draw():
    from keras_moe.layers.experts import weights_to_be_overwritten

    with weights_to_be_overwritten():
        skipped = Experts(2, 4, name="e")
        skipped.build((2, 3, 5))
    drawn = Experts(2, 4, name="e")
    drawn.build((2, 3, 5))
    assert not np.any(_np_weights(skipped))
    assert np.all(np.std(_np_weights(drawn)) > 0)
    assert skipped.get_config() == drawn.get_config()


def _np_weights(layer):
    return np.concatenate(
        [keras.ops.convert_to_numpy(w).ravel() for w in layer.weights]
    )


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))
