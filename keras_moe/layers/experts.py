"""Batched experts: E copies of the transformer MLP, run as batched matmuls.

Shape letters: E experts, N tokens per expert (G * C after dispatch),
D model dimension, H hidden dimension.

Weights mirror `Mlp` with a leading expert axis: `wi` <[E, D, H]> (`wi_0`,
`wi_1` when gated), `wo` <[E, H, D]>, biases `bi` <[E, H]>, `bo` <[E, D]>,
so that upcycling tiles a dense MLP into experts weight by weight.

Two input layouts:

* slots <[E, N, D]>: every expert gets N rows (capacity dispatch); one
  batched matmul per kernel.
* ragged rows <[R, D]> with `group_sizes` <int32>[E] (dropless dispatch):
  expert e takes the next `group_sizes[e]` rows. The rows are split by
  those run-time sizes and each expert runs its own matmuls on exactly its
  rows. The split needs the sizes at run time, which XLA cannot compile.
"""

import contextlib
import threading

import keras
import tensorflow as tf
from keras import ops

from keras_moe.layers.mlp import get_activation

_STATE = threading.local()


@contextlib.contextmanager
def weights_to_be_overwritten():
    """Experts built inside this context start from zeros, not random draws.

    For callers that overwrite every expert weight right after building
    (upcycling copies the dense MLP into them): drawing E random kernels only
    to discard them dominated the cost of upcycling. The layers' configs keep
    their real initializers.
    """
    previous = getattr(_STATE, "skip", False)
    _STATE.skip = True
    try:
        yield
    finally:
        _STATE.skip = previous


def _initializer(initializer):
    return "zeros" if getattr(_STATE, "skip", False) else initializer


@keras.saving.register_keras_serializable(package="keras_moe")
class Experts(keras.layers.Layer):
    """E independent MLPs applied to dispatched tokens.

    `experts(slots)` maps <[E, N, D]> slots to <[E, N, D]>;
    `experts(rows, group_sizes=sizes)` maps ragged rows <[R, D]> sorted by
    expert to <[R, D]>: expert e computes the `sizes[e]` rows after the
    `sizes[:e]` rows of the experts before it, and the rows after
    `sum(sizes)` (choices of padding tokens) come out as zeros.

    Args:
        num_experts: E.
        hidden_dim: H of each expert.
        activation: an activation name of `keras_moe.layers.mlp`.
        use_bias: whether the projections have biases.
        kernel_initializer: initializer of the expert kernels.
        bias_initializer: initializer of the biases.
        dropout_rate: dropout on the hidden activations during training.
        **kwargs: passed to `keras.layers.Layer`.

    Example:

    >>> experts = Experts(num_experts=4, hidden_dim=32)
    >>> tuple(experts(keras.ops.ones((4, 10, 8))).shape)
    (4, 10, 8)
    >>> sizes = keras.ops.convert_to_tensor([3, 0, 5, 1], "int32")
    >>> tuple(experts(keras.ops.ones((12, 8)), group_sizes=sizes).shape)
    (12, 8)
    """

    def __init__(
        self,
        num_experts,
        hidden_dim,
        activation="relu",
        use_bias=False,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        dropout_rate=0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        for name, value in (
            ("num_experts", num_experts),
            ("hidden_dim", hidden_dim),
        ):
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or value < 1
            ):
                raise ValueError(
                    f"{name} must be an int >= 1; received {value!r}"
                )
        self._activation_fn, self.gated = get_activation(activation)
        self.num_experts = num_experts
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
        slots = len(input_shape) == 3 and input_shape[0] == self.num_experts
        if not (slots or len(input_shape) == 2):
            raise ValueError(
                f"Experts expects inputs <[E={self.num_experts}, N, D]> "
                "(slots) or <[R, D]> (ragged rows with group_sizes); "
                f"received input_shape={input_shape}"
            )
        model_dim = input_shape[-1]
        e, h = self.num_experts, self.hidden_dim
        names = ["wi_0", "wi_1"] if self.gated else ["wi"]
        self.input_kernels = [
            self.add_weight(
                name=name,
                shape=(e, model_dim, h),
                initializer=_initializer(self.kernel_initializer),
            )
            for name in names
        ]
        self.wo = self.add_weight(
            name="wo",
            shape=(e, h, model_dim),
            initializer=_initializer(self.kernel_initializer),
        )
        self.input_biases = []
        if self.use_bias:
            self.input_biases = [
                self.add_weight(
                    name=name.replace("wi", "bi"),
                    shape=(e, h),
                    initializer=self.bias_initializer,
                )
                for name in names
            ]
            self.bo = self.add_weight(
                name="bo",
                shape=(e, model_dim),
                initializer=self.bias_initializer,
            )

    def call(self, inputs, training=False, group_sizes=None):
        if group_sizes is not None:
            return self._call_ragged(inputs, group_sizes, training)
        # (E, N, D) x (E, D, H) -> (E, N, H): one batched matmul per kernel.
        hidden = [ops.matmul(inputs, kernel) for kernel in self.input_kernels]
        if self.use_bias:
            hidden = [
                h + b[:, None, :] for h, b in zip(hidden, self.input_biases)
            ]
        x = self._activation_fn(hidden[0])
        if self.gated:
            x = x * hidden[1]
        x = self.dropout(x, training=training)
        # (E, N, H) x (E, H, D) -> (E, N, D)
        x = ops.matmul(x, self.wo)
        if self.use_bias:
            x = x + self.bo[:, None, :]
        return x

    def _call_ragged(self, rows, group_sizes, training):
        """Rows <[R, D]> sorted by expert -> <[R, D]>, one MLP per expert."""
        if tf.__internal__.get_enclosing_xla_context() is not None:
            raise ValueError(
                f"Experts {self.name!r}: ragged rows (group_sizes, dropless "
                "dispatch) are split by sizes known only at run time, which "
                "XLA cannot compile; call them outside jit_compile=True "
                "functions"
            )
        if len(rows.shape) != 2 or rows.shape[-1] != self.wo.shape[-1]:
            raise ValueError(
                f"Experts with group_sizes expects rows <[R, D="
                f"{self.wo.shape[-1]}]>; received shape {tuple(rows.shape)}"
            )
        num_experts = self.num_experts
        group_sizes = tf.cast(group_sizes, "int32")
        # The rows after sum(group_sizes) form one more piece, not computed.
        spare = tf.shape(rows)[0] - tf.reduce_sum(group_sizes)
        sizes = tf.concat([group_sizes, spare[None]], axis=0)
        pieces = tf.split(rows, sizes, num=num_experts + 1, axis=0)
        # Unstacked once: a slice `w[e]` per expert would give each slice a
        # dense [E, ...] gradient, E times the memory and time.
        input_kernels = [tf.unstack(k) for k in self.input_kernels]
        output_kernels = tf.unstack(self.wo)
        input_biases = [tf.unstack(b) for b in self.input_biases]
        output_biases = tf.unstack(self.bo) if self.use_bias else None
        outputs = []
        for e in range(num_experts):
            # (R_e, D) x (D, H) -> (R_e, H)
            hidden = [ops.matmul(pieces[e], k[e]) for k in input_kernels]
            if self.use_bias:
                hidden = [h + b[e] for h, b in zip(hidden, input_biases)]
            x = self._activation_fn(hidden[0])
            if self.gated:
                x = x * hidden[1]
            x = self.dropout(x, training=training)
            # (R_e, H) x (H, D) -> (R_e, D)
            x = ops.matmul(x, output_kernels[e])
            if self.use_bias:
                x = x + output_biases[e]
            outputs.append(x)
        outputs.append(tf.zeros_like(pieces[-1]))
        return tf.concat(outputs, axis=0)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_experts": self.num_experts,
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
