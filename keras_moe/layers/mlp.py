"""The dense transformer MLP block and the activations shared with experts.

Shape letters: D model dimension, H hidden dimension.

Activation names:

* `"relu"`: T5 v1.0.
* `"gelu"`: exact (erf) GELU, as in ViT.
* `"gelu_tanh"`: tanh-approximated GELU.
* `"silu"`.
* `"gated_gelu"`: T5 v1.1 / UL2: `gelu_tanh(x W_0) * (x W_1)`.
* `"gated_silu"`, `"gated_relu"`: the same gate with another activation.
"""

import keras
from keras import ops

_BASE_ACTIVATIONS = {
    "relu": ops.relu,
    "gelu": lambda x: ops.gelu(x, approximate=False),
    "gelu_tanh": lambda x: ops.gelu(x, approximate=True),
    "silu": ops.silu,
}
_GATED = {
    "gated_gelu": "gelu_tanh",
    "gated_silu": "silu",
    "gated_relu": "relu",
}
ACTIVATIONS = tuple(_BASE_ACTIVATIONS) + tuple(_GATED)


def get_activation(name):
    """Returns `(fn, gated)` for an activation name listed in this module."""
    if name in _BASE_ACTIVATIONS:
        return _BASE_ACTIVATIONS[name], False
    if name in _GATED:
        return _BASE_ACTIVATIONS[_GATED[name]], True
    raise ValueError(
        f"activation must be one of {ACTIVATIONS}; received {name!r}"
    )


@keras.saving.register_keras_serializable(package="keras_moe")
class Mlp(keras.layers.Layer):
    """Transformer MLP: `act(x W_i + b_i) W_o + b_o`, optionally gated.

    The block every keras_moe model uses between attention layers, and the
    block that upcycling copies into each expert. Weights: `wi` <[D, H]>
    (`wi_0` and `wi_1` when gated: `act(x wi_0) * (x wi_1)`), `wo` <[H, D]>,
    and with `use_bias` the biases `bi` <[H]> (`bi_0`, `bi_1`) and `bo`
    <[D]>.

    Args:
        hidden_dim: H.
        activation: a name from this module's docstring.
        use_bias: whether the two projections have biases (ViT: yes, T5: no).
        kernel_initializer: initializer of the kernels.
        bias_initializer: initializer of the biases.
        dropout_rate: dropout on the hidden activations during training.
        **kwargs: passed to `keras.layers.Layer`.

    Example:

    >>> mlp = Mlp(hidden_dim=32, activation="gated_gelu")
    >>> tuple(mlp(keras.ops.ones((2, 5, 8))).shape)
    (2, 5, 8)
    """

    def __init__(
        self,
        hidden_dim,
        activation="relu",
        use_bias=False,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        dropout_rate=0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if isinstance(hidden_dim, bool) or not isinstance(hidden_dim, int):
            raise ValueError(
                f"hidden_dim must be an int; received {hidden_dim!r}"
            )
        if hidden_dim < 1:
            raise ValueError(f"hidden_dim must be >= 1; received {hidden_dim}")
        self._activation_fn, self.gated = get_activation(activation)
        self.hidden_dim = hidden_dim
        self.activation = activation
        self.use_bias = bool(use_bias)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.dropout_rate = float(dropout_rate)
        self.dropout = keras.layers.Dropout(
            self.dropout_rate, dtype=self.dtype_policy, name="dropout"
        )

    def build(self, input_shape):
        model_dim = input_shape[-1]
        if model_dim is None:
            raise ValueError(
                f"The last dimension must be known; received {input_shape}"
            )
        names = ["wi_0", "wi_1"] if self.gated else ["wi"]
        self.input_kernels = [
            self.add_weight(
                name=name,
                shape=(model_dim, self.hidden_dim),
                initializer=self.kernel_initializer,
            )
            for name in names
        ]
        self.wo = self.add_weight(
            name="wo",
            shape=(self.hidden_dim, model_dim),
            initializer=self.kernel_initializer,
        )
        self.input_biases = []
        if self.use_bias:
            self.input_biases = [
                self.add_weight(
                    name=name.replace("wi", "bi"),
                    shape=(self.hidden_dim,),
                    initializer=self.bias_initializer,
                )
                for name in names
            ]
            self.bo = self.add_weight(
                name="bo", shape=(model_dim,), initializer=self.bias_initializer
            )

    def call(self, inputs, training=False):
        hidden = [ops.matmul(inputs, kernel) for kernel in self.input_kernels]
        if self.use_bias:
            hidden = [h + b for h, b in zip(hidden, self.input_biases)]
        x = self._activation_fn(hidden[0])
        if self.gated:
            x = x * hidden[1]
        x = self.dropout(x, training=training)
        x = ops.matmul(x, self.wo)
        if self.use_bias:
            x = x + self.bo
        return x

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "hidden_dim": self.hidden_dim,
                "activation": self.activation,
                "use_bias": self.use_bias,
                "kernel_initializer": keras.initializers.serialize(
                    self.kernel_initializer
                ),
                "bias_initializer": keras.initializers.serialize(
                    self.bias_initializer
                ),
                "dropout_rate": self.dropout_rate,
            }
        )
        return config
