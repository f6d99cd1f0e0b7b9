"""Building blocks of the T5 family: RMS norm, relative-position attention,
and the T5 block and stack.

Shape letters: B batch, S query length, K key length, D model dimension,
N attention heads, Dh head dimension (T5's `d_kv`), L cache length.

They follow Mesh TensorFlow's T5 (and so the original checkpoints):

* `RMSNorm` scales by the root mean square, with no mean subtraction and no
  bias, and always computes the statistics in float32.
* `RelativeAttention` has no query/key/value biases, no `1 / sqrt(Dh)`
  scaling (T5 folds it into the query initialisation) and adds a learned
  scalar per head and relative-position bucket to the attention logits.
* `T5Block` is a pre-norm block whose MLP is the replaceable layer attribute
  `mlp` (`Mlp` or `MoeLayer`); `T5Stack` is an encoder or decoder on
  embedded inputs. Only block 0 of a stack owns the relative-position bias
  table; the stack computes the bias once and every block adds the same one.
"""

import copy
import math

import keras
from keras import ops

from keras_moe.layers.mlp import Mlp
from keras_moe.layers.moe import MoeLayer

# Added to the logits of masked positions; the softmax runs in float32, where
# exp(-1e9) is exactly 0, and a fully masked row stays finite (uniform).
MASK_LOGIT = -1e9


def relative_position_bucket(
    relative_position, bidirectional=True, num_buckets=32, max_distance=128
):
    """Maps `key_position - query_position` to T5's relative-position buckets.

    Half of the buckets (per direction when `bidirectional`) hold exact
    distances 0, 1, ...; the other half cover distances up to `max_distance`
    in logarithmically growing bins, and anything farther shares the last
    bucket. Without `bidirectional` (causal decoders) positive offsets, the
    future, all fall in bucket 0. This is the bucketing of Mesh TensorFlow's
    `_relative_position_bucket`, op for op in float32 so that bin edges
    round as they do there.

    Args:
        relative_position: <int>[...] key position minus query position.
        bidirectional: whether keys after the query get their own buckets.
        num_buckets: total number of buckets.
        max_distance: distance from which all offsets share one bucket.

    Returns:
        <int32>[...] bucket indices in `[0, num_buckets)`.

    Example:

    >>> offsets = keras.ops.array([-200, -20, -1, 0, 1, 20, 200])
    >>> keras.ops.convert_to_numpy(relative_position_bucket(offsets)).tolist()
    [15, 10, 1, 0, 17, 26, 31]
    >>> keras.ops.convert_to_numpy(
    ...     relative_position_bucket(offsets, bidirectional=False)).tolist()
    [31, 17, 1, 0, 0, 0, 0]
    """
    position = ops.cast(relative_position, "int32")
    buckets = ops.zeros_like(position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + ops.cast(position > 0, "int32") * num_buckets
        distance = ops.abs(position)
    else:
        distance = -ops.minimum(position, 0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # log(0) would be -inf for the small distances that `where` discards;
    # clamping keeps the unused branch finite.
    scaled = (
        ops.log(ops.cast(ops.maximum(distance, 1), "float32") / max_exact)
        / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    )
    if_large = max_exact + ops.cast(scaled, "int32")
    if_large = ops.minimum(if_large, num_buckets - 1)
    return buckets + ops.where(is_small, distance, if_large)


@keras.saving.register_keras_serializable(package="keras_moe")
class RMSNorm(keras.layers.Layer):
    """T5 layer norm: `x / sqrt(mean(x**2) + epsilon) * scale`.

    No mean subtraction and no bias. The statistics are computed in float32
    whatever the compute dtype; the output is cast back to it. Weight:
    `scale` <[D]>, initialised to ones.

    Args:
        epsilon: added to the mean square.
        **kwargs: passed to `keras.layers.Layer`.

    Example:

    >>> norm = RMSNorm()
    >>> y = norm(keras.ops.array([[3.0, -4.0]]))
    >>> [round(v, 4) for v in keras.ops.convert_to_numpy(y)[0].tolist()]
    [0.8485, -1.1314]
    """

    def __init__(self, epsilon=1e-6, **kwargs):
        super().__init__(**kwargs)
        if not epsilon > 0:
            raise ValueError(f"epsilon must be > 0; received {epsilon!r}")
        self.epsilon = float(epsilon)

    def build(self, input_shape):
        if input_shape[-1] is None:
            raise ValueError(
                f"The last dimension must be known; received {input_shape}"
            )
        self.scale = self.add_weight(
            name="scale", shape=(input_shape[-1],), initializer="ones"
        )

    def call(self, inputs):
        x = ops.cast(inputs, "float32")
        variance = ops.mean(ops.square(x), axis=-1, keepdims=True)
        x = x * ops.rsqrt(variance + self.epsilon)
        return ops.cast(x, self.compute_dtype) * ops.cast(
            self.scale, self.compute_dtype
        )

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"epsilon": self.epsilon})
        return config


@keras.saving.register_keras_serializable(package="keras_moe")
class RelativeAttention(keras.layers.Layer):
    """T5 multi-head attention, with an optional relative-position bias table.

    Weights (as `x @ W`): `query`, `key`, `value` <[D, N*Dh]>, `output`
    <[N*Dh, D]> and, with `use_relative_attention_bias`,
    `relative_attention_bias` <[num_buckets, N]>. The layer adds whatever
    `attention_bias` it is given (relative-position bias plus mask, see
    `position_bias` and `mask_to_bias`) to the logits; logits are not scaled
    by `1 / sqrt(Dh)`. The softmax runs in float32.

    Caching, for incremental decoding:

    * self-attention: pass `cache` <[B, 2, L, N, Dh]> (keys and values of
      all L positions) and `cache_index`, the position of the (single)
      query; the keys and values of `inputs` are written at that position
      and the layer returns `(outputs, updated_cache)`.
    * cross-attention: pass `cache` from `key_value(context)` and no
      `cache_index`: the cached keys and values are used as they are and the
      layer returns `(outputs, cache)`.

    Args:
        num_heads: N.
        head_dim: Dh.
        use_relative_attention_bias: whether this layer owns the bias table.
        bidirectional: bucket keys after the query separately (encoders) or
            not (causal decoders).
        relative_attention_num_buckets: rows of the bias table.
        relative_attention_max_distance: distance from which offsets share a
            bucket.
        dropout_rate: dropout on the attention probabilities when training.
        kernel_initializer: initializer of the key, value and output
            kernels; the query kernel's scale is divided by Dh (Mesh
            TensorFlow folds the attention scaling into it). None: T5's
            fan-in normal initialisation.
        bias_initializer: initializer of the relative-position bias table.
        **kwargs: passed to `keras.layers.Layer`.

    Example:

    >>> attention = RelativeAttention(
    ...     num_heads=2, head_dim=4, use_relative_attention_bias=True)
    >>> x = keras.ops.ones((1, 5, 8))
    >>> attention.build(x.shape)
    >>> bias = attention.position_bias(5, 5)
    >>> tuple(attention(x, attention_bias=bias).shape)
    (1, 5, 8)
    """

    def __init__(
        self,
        num_heads,
        head_dim,
        use_relative_attention_bias=False,
        bidirectional=True,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        dropout_rate=0.0,
        kernel_initializer=None,
        bias_initializer=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        for name, value in (("num_heads", num_heads), ("head_dim", head_dim)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an int; received {value!r}")
            if value < 1:
                raise ValueError(f"{name} must be >= 1; received {value}")
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.use_relative_attention_bias = bool(use_relative_attention_bias)
        self.bidirectional = bool(bidirectional)
        self.relative_attention_num_buckets = relative_attention_num_buckets
        self.relative_attention_max_distance = relative_attention_max_distance
        self.dropout_rate = float(dropout_rate)
        self.kernel_initializer = keras.initializers.get(
            kernel_initializer
            or keras.initializers.VarianceScaling(1.0, "fan_in", "normal")
        )
        self.bias_initializer = keras.initializers.get(
            bias_initializer or keras.initializers.RandomNormal(stddev=1.0)
        )
        self.dropout = keras.layers.Dropout(
            self.dropout_rate, dtype=self.dtype_policy, name="dropout"
        )

    def build(self, input_shape):
        model_dim = input_shape[-1]
        if model_dim is None:
            raise ValueError(
                f"The last dimension must be known; received {input_shape}"
            )
        inner_dim = self.num_heads * self.head_dim
        query_initializer = self.kernel_initializer
        if type(query_initializer) is keras.initializers.VarianceScaling:
            config = query_initializer.get_config()
            config["scale"] = config["scale"] / self.head_dim
            query_initializer = keras.initializers.VarianceScaling(**config)
        self.query = self.add_weight(
            name="query",
            shape=(model_dim, inner_dim),
            initializer=query_initializer,
        )
        self.key, self.value = (
            self.add_weight(
                name=name,
                shape=(model_dim, inner_dim),
                initializer=self.kernel_initializer,
            )
            for name in ("key", "value")
        )
        self.output_kernel = self.add_weight(
            name="output",
            shape=(inner_dim, model_dim),
            initializer=self.kernel_initializer,
        )
        if self.use_relative_attention_bias:
            self.relative_attention_bias = self.add_weight(
                name="relative_attention_bias",
                shape=(self.relative_attention_num_buckets, self.num_heads),
                initializer=self.bias_initializer,
            )

    def _project(self, inputs, kernel):
        """<[B, S, D]> @ kernel -> <[B, S, N, Dh]>."""
        x = ops.matmul(inputs, ops.cast(kernel, self.compute_dtype))
        batch, length = ops.shape(x)[0], ops.shape(x)[1]
        # (B, S, N*Dh) -> (B, S, N, Dh)
        return ops.reshape(x, (batch, length, self.num_heads, self.head_dim))

    def key_value(self, context):
        """Keys and values of `context` <[B, K, D]> as a <[B, 2, K, N, Dh]>
        cross-attention cache."""
        context = ops.cast(context, self.compute_dtype)
        keys = self._project(context, self.key)
        values = self._project(context, self.value)
        return ops.stack([keys, values], axis=1)

    def position_bias(self, query_length, key_length, query_offset=0):
        """Relative-position bias <float32>[1, N, S, K].

        Query i sits at position `query_offset + i` and key j at position j;
        `query_offset` may be a scalar tensor (the decoding step).
        """
        if not self.use_relative_attention_bias:
            raise ValueError(
                f"{self.name!r} has no relative attention bias table "
                "(use_relative_attention_bias=False)"
            )
        query_position = ops.arange(query_length, dtype="int32")[:, None]
        query_position = query_position + ops.cast(query_offset, "int32")
        key_position = ops.arange(key_length, dtype="int32")[None, :]
        buckets = relative_position_bucket(
            key_position - query_position,
            bidirectional=self.bidirectional,
            num_buckets=self.relative_attention_num_buckets,
            max_distance=self.relative_attention_max_distance,
        )
        table = ops.cast(self.relative_attention_bias, "float32")
        values = ops.take(table, buckets, axis=0)  # (S, K, N)
        # (S, K, N) -> (N, S, K) -> (1, N, S, K)
        return ops.expand_dims(ops.transpose(values, (2, 0, 1)), 0)

    def call(
        self,
        inputs,
        context=None,
        attention_bias=None,
        cache=None,
        cache_index=None,
        training=False,
    ):
        query = self._project(inputs, self.query)
        if cache is not None and cache_index is None:
            keys, values = cache[:, 0], cache[:, 1]
        else:
            source = inputs if context is None else context
            keys = self._project(source, self.key)
            values = self._project(source, self.value)
            if cache is not None:
                # Writes position `cache_index` of the cache; `where` keeps
                # the shapes static and needs no scatter kernel.
                length = ops.shape(cache)[2]
                here = ops.arange(length, dtype="int32") == ops.cast(
                    cache_index, "int32"
                )
                here = ops.reshape(here, (1, length, 1, 1))
                keys = ops.where(here, keys, cache[:, 0])
                values = ops.where(here, values, cache[:, 1])
                cache = ops.stack([keys, values], axis=1)
        logits = ops.einsum("bsnh,bknh->bnsk", query, keys)
        logits = ops.cast(logits, "float32")
        if attention_bias is not None:
            logits = logits + ops.cast(attention_bias, "float32")
        # Softmax written out: ops.softmax warns about a length-1 key axis,
        # which is the first decoding step, not a mistake.
        probs = ops.exp(logits - ops.max(logits, axis=-1, keepdims=True))
        probs = probs / ops.sum(probs, axis=-1, keepdims=True)
        probs = self.dropout(
            ops.cast(probs, self.compute_dtype), training=training
        )
        outputs = ops.einsum("bnsk,bknh->bsnh", probs, values)
        batch, length = ops.shape(outputs)[0], ops.shape(outputs)[1]
        # (B, S, N, Dh) -> (B, S, N*Dh)
        outputs = ops.reshape(
            outputs, (batch, length, self.num_heads * self.head_dim)
        )
        outputs = ops.matmul(
            outputs, ops.cast(self.output_kernel, self.compute_dtype)
        )
        if cache is not None:
            return outputs, cache
        return outputs

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_heads": self.num_heads,
                "head_dim": self.head_dim,
                "use_relative_attention_bias": (
                    self.use_relative_attention_bias
                ),
                "bidirectional": self.bidirectional,
                "relative_attention_num_buckets": (
                    self.relative_attention_num_buckets
                ),
                "relative_attention_max_distance": (
                    self.relative_attention_max_distance
                ),
                "dropout_rate": self.dropout_rate,
                "kernel_initializer": keras.initializers.serialize(
                    self.kernel_initializer
                ),
                "bias_initializer": keras.initializers.serialize(
                    self.bias_initializer
                ),
            }
        )
        return config


def mask_to_bias(mask):
    """<bool>[...] keep-mask -> <float32>[...] additive logits bias."""
    return ops.where(ops.cast(mask, "bool"), 0.0, MASK_LOGIT)


def moe_blocks_config(name, value, num_layers):
    """Normalises {block index (int or str): MoeLayer kwargs} to int keys."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(
            f"{name} must be None or a dict {{block index: MoeLayer kwargs}}; "
            f"received {value!r}"
        )
    blocks = {}
    for key, kwargs in value.items():
        if isinstance(key, bool) or not isinstance(key, (int, str)):
            raise ValueError(f"{name}: bad block index {key!r}")
        try:
            index = int(key)
        except ValueError:
            raise ValueError(f"{name}: bad block index {key!r}") from None
        if not 0 <= index < num_layers:
            raise ValueError(
                f"{name}: block index {index} is outside [0, {num_layers})"
            )
        if index in blocks:
            raise ValueError(f"{name}: block index {index} given twice")
        if not isinstance(kwargs, dict):
            raise ValueError(
                f"{name}[{index}] must be a dict of MoeLayer kwargs; "
                f"received {kwargs!r}"
            )
        blocks[index] = plain_config(kwargs)
    return blocks


def plain_config(value):
    """Plain nested dicts and lists. A config taken from a live model holds
    Keras-tracked containers that reference the model; deep-copying those
    would copy the whole model."""
    if isinstance(value, dict):
        return {key: plain_config(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_config(item) for item in value]
    return copy.copy(value)


@keras.saving.register_keras_serializable(package="keras_moe")
class T5Block(keras.layers.Layer):
    """One pre-norm T5 block: self-attention, (cross-attention,) MLP.

    Sublayers: `self_attention_norm`, `self_attention`, in decoders
    `cross_attention_norm` and `cross_attention`, `mlp_norm` and `mlp` (an
    `Mlp`, or a `MoeLayer` built from `moe_kwargs`). Each sublayer's output
    goes through dropout and is added to the residual stream.

    Args:
        num_heads, head_dim: of the attention layers.
        hidden_dim, activation: of the MLP (and defaults of a MoE MLP).
        is_decoder: causal self-attention buckets and a cross-attention.
        use_relative_attention_bias: whether the self-attention owns the
            relative-position bias table (block 0 of a stack).
        relative_attention_num_buckets, relative_attention_max_distance:
            of that table.
        dropout_rate: residual, attention and MLP dropout when training.
        layer_norm_epsilon: of the RMS norms.
        moe_kwargs: None for a dense MLP, else `MoeLayer` kwargs; hidden_dim,
            activation, use_bias=False and dropout_rate default to the dense
            MLP's.
        **kwargs: passed to `keras.layers.Layer`.
    """

    def __init__(
        self,
        num_heads,
        head_dim,
        hidden_dim,
        activation="relu",
        is_decoder=False,
        use_relative_attention_bias=False,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        dropout_rate=0.0,
        layer_norm_epsilon=1e-6,
        moe_kwargs=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.hidden_dim = hidden_dim
        self.activation = activation
        self.is_decoder = bool(is_decoder)
        self.use_relative_attention_bias = bool(use_relative_attention_bias)
        self.relative_attention_num_buckets = relative_attention_num_buckets
        self.relative_attention_max_distance = relative_attention_max_distance
        self.dropout_rate = float(dropout_rate)
        self.layer_norm_epsilon = float(layer_norm_epsilon)
        self.moe_kwargs = plain_config(moe_kwargs)

        def norm(name):
            return RMSNorm(
                epsilon=layer_norm_epsilon, dtype=self.dtype_policy, name=name
            )

        def attention(name, **attention_kwargs):
            return RelativeAttention(
                num_heads=num_heads,
                head_dim=head_dim,
                relative_attention_num_buckets=relative_attention_num_buckets,
                relative_attention_max_distance=(
                    relative_attention_max_distance
                ),
                dropout_rate=dropout_rate,
                dtype=self.dtype_policy,
                name=name,
                **attention_kwargs,
            )

        self.self_attention_norm = norm("self_attention_norm")
        self.self_attention = attention(
            "self_attention",
            use_relative_attention_bias=use_relative_attention_bias,
            bidirectional=not is_decoder,
        )
        if self.is_decoder:
            self.cross_attention_norm = norm("cross_attention_norm")
            self.cross_attention = attention("cross_attention")
        self.mlp_norm = norm("mlp_norm")
        mlp_kwargs = {
            "hidden_dim": hidden_dim,
            "activation": activation,
            "use_bias": False,
            "dropout_rate": dropout_rate,
        }
        if moe_kwargs is None:
            self.mlp = Mlp(
                **mlp_kwargs,
                kernel_initializer=keras.initializers.VarianceScaling(
                    1.0, "fan_in", "normal"
                ),
                dtype=self.dtype_policy,
                name="mlp",
            )
        else:
            self.mlp = MoeLayer(
                **{**mlp_kwargs, **moe_kwargs},
                dtype=self.dtype_policy,
                name="mlp",
            )
        self.dropout = keras.layers.Dropout(
            dropout_rate, dtype=self.dtype_policy, name="dropout"
        )

    @property
    def is_moe(self):
        return isinstance(self.mlp, MoeLayer)

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        for name in ("self_attention", "cross_attention"):
            if name == "cross_attention" and not self.is_decoder:
                continue
            getattr(self, f"{name}_norm").build(input_shape)
            getattr(self, name).build(input_shape)
        self.mlp_norm.build(input_shape)
        # MoeLayer only checks that the group (sequence) axis is known.
        self.mlp.build((None, 1, input_shape[-1]))

    def call(
        self,
        inputs,
        self_attention_bias=None,
        padding_mask=None,
        context=None,
        cross_attention_bias=None,
        self_attention_cache=None,
        cross_attention_cache=None,
        cache_index=None,
        training=False,
    ):
        x = inputs
        h = self.self_attention_norm(x)
        h = self.self_attention(
            h,
            attention_bias=self_attention_bias,
            cache=self_attention_cache,
            cache_index=cache_index,
            training=training,
        )
        if self_attention_cache is not None:
            h, self_attention_cache = h
        x = x + self.dropout(h, training=training)
        if self.is_decoder:
            h = self.cross_attention_norm(x)
            h = self.cross_attention(
                h,
                context=context,
                attention_bias=cross_attention_bias,
                cache=cross_attention_cache,
                training=training,
            )
            if cross_attention_cache is not None:
                h = h[0]
            x = x + self.dropout(h, training=training)
        h = self.mlp_norm(x)
        if self.is_moe:
            if padding_mask is None:
                padding_mask = ops.ones(ops.shape(h)[:-1], dtype="bool")
            h = self.mlp(h, training=training, token_mask=padding_mask)
        else:
            h = self.mlp(h, training=training)
        x = x + self.dropout(h, training=training)
        if self_attention_cache is not None:
            return x, self_attention_cache
        return x

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_heads": self.num_heads,
                "head_dim": self.head_dim,
                "hidden_dim": self.hidden_dim,
                "activation": self.activation,
                "is_decoder": self.is_decoder,
                "use_relative_attention_bias": (
                    self.use_relative_attention_bias
                ),
                "relative_attention_num_buckets": (
                    self.relative_attention_num_buckets
                ),
                "relative_attention_max_distance": (
                    self.relative_attention_max_distance
                ),
                "dropout_rate": self.dropout_rate,
                "layer_norm_epsilon": self.layer_norm_epsilon,
                "moe_kwargs": plain_config(self.moe_kwargs),
            }
        )
        return config


@keras.saving.register_keras_serializable(package="keras_moe")
class T5Stack(keras.layers.Layer):
    """A T5 encoder or decoder on embedded inputs: blocks and a final norm.

    Computes the relative-position bias once, with block 0's table, and the
    masks, and gives every block the same additive attention bias.

    Call arguments:
        inputs: <[B, S, D]> embedded tokens.
        padding_mask: <bool>[B, S] real tokens (None: all real). Masks the
            self-attention keys and the MoE tokens.
        context: <[B, T, D]> encoder outputs (decoder only).
        context_padding_mask: <bool>[B, T] real encoder tokens.
        self_attention_caches, cross_attention_caches, cache_index: one
            cache per block for incremental decoding (see
            `RelativeAttention`); the stack then returns
            `(outputs, self_attention_caches)`.
        training: dropout and MoE training behaviour.

    Args:
        num_layers: number of blocks.
        is_decoder: causal self-attention and cross-attention.
        moe_blocks: None or {block index: MoeLayer kwargs}.
        **block_kwargs: `T5Block` arguments shared by all blocks, and the
            keras.layers.Layer kwargs.
    """

    def __init__(
        self,
        num_layers,
        num_heads,
        head_dim,
        hidden_dim,
        activation="relu",
        is_decoder=False,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        dropout_rate=0.0,
        layer_norm_epsilon=1e-6,
        moe_blocks=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.hidden_dim = hidden_dim
        self.activation = activation
        self.is_decoder = bool(is_decoder)
        self.relative_attention_num_buckets = relative_attention_num_buckets
        self.relative_attention_max_distance = relative_attention_max_distance
        self.dropout_rate = float(dropout_rate)
        self.layer_norm_epsilon = float(layer_norm_epsilon)
        self.moe_blocks = moe_blocks_config(
            "moe_blocks", moe_blocks, num_layers
        )
        moe_blocks = self.moe_blocks or {}
        self.blocks = [
            T5Block(
                num_heads=num_heads,
                head_dim=head_dim,
                hidden_dim=hidden_dim,
                activation=activation,
                is_decoder=is_decoder,
                use_relative_attention_bias=(index == 0),
                relative_attention_num_buckets=relative_attention_num_buckets,
                relative_attention_max_distance=(
                    relative_attention_max_distance
                ),
                dropout_rate=dropout_rate,
                layer_norm_epsilon=layer_norm_epsilon,
                moe_kwargs=moe_blocks.get(index),
                dtype=self.dtype_policy,
                name=f"block_{index}",
            )
            for index in range(num_layers)
        ]
        self.final_norm = RMSNorm(
            epsilon=layer_norm_epsilon,
            dtype=self.dtype_policy,
            name="final_norm",
        )
        self.dropout = keras.layers.Dropout(
            dropout_rate, dtype=self.dtype_policy, name="dropout"
        )

    def build(self, input_shape):
        for block in self.blocks:
            block.build(input_shape)
        self.final_norm.build(input_shape)

    def _self_attention_bias(self, inputs, padding_mask, cache, cache_index):
        """Position bias plus masks, <float32>[B or 1, N, S, K]."""
        query_length = ops.shape(inputs)[1]
        attention = self.blocks[0].self_attention
        if cache is None:
            key_length = query_length
            offset = 0
        else:
            key_length = ops.shape(cache)[2]
            offset = cache_index
        bias = attention.position_bias(query_length, key_length, offset)
        query_position = ops.arange(query_length, dtype="int32")[:, None]
        key_position = ops.arange(key_length, dtype="int32")[None, :]
        if self.is_decoder:
            # (S, K) -> (1, 1, S, K)
            causal = key_position <= query_position + ops.cast(offset, "int32")
            bias = bias + mask_to_bias(causal)[None, None]
        if padding_mask is not None and cache is None:
            # (B, K) -> (B, 1, 1, K)
            bias = bias + mask_to_bias(padding_mask)[:, None, None, :]
        return bias

    def call(
        self,
        inputs,
        padding_mask=None,
        context=None,
        context_padding_mask=None,
        self_attention_caches=None,
        cross_attention_caches=None,
        cache_index=None,
        training=False,
    ):
        if self.is_decoder and context is None and not cross_attention_caches:
            raise ValueError(
                "A decoder stack needs `context` (encoder outputs)"
            )
        caching = self_attention_caches is not None
        if caching and (len(self_attention_caches) != self.num_layers):
            raise ValueError(
                f"Expected {self.num_layers} self-attention caches; received "
                f"{len(self_attention_caches)}"
            )
        if padding_mask is not None:
            padding_mask = ops.cast(padding_mask, "bool")
        self_bias = self._self_attention_bias(
            inputs,
            padding_mask,
            self_attention_caches[0] if caching else None,
            cache_index,
        )
        cross_bias = None
        if self.is_decoder and context_padding_mask is not None:
            cross_bias = mask_to_bias(context_padding_mask)[:, None, None, :]
        x = self.dropout(inputs, training=training)
        new_caches = []
        for index, block in enumerate(self.blocks):
            x = block(
                x,
                self_attention_bias=self_bias,
                padding_mask=padding_mask,
                context=context,
                cross_attention_bias=cross_bias,
                self_attention_cache=(
                    self_attention_caches[index] if caching else None
                ),
                cross_attention_cache=(
                    cross_attention_caches[index]
                    if cross_attention_caches
                    else None
                ),
                cache_index=cache_index,
                training=training,
            )
            if caching:
                x, cache = x
                new_caches.append(cache)
        x = self.dropout(self.final_norm(x), training=training)
        if caching:
            return x, tuple(new_caches)
        return x

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_layers": self.num_layers,
                "num_heads": self.num_heads,
                "head_dim": self.head_dim,
                "hidden_dim": self.hidden_dim,
                "activation": self.activation,
                "is_decoder": self.is_decoder,
                "relative_attention_num_buckets": (
                    self.relative_attention_num_buckets
                ),
                "relative_attention_max_distance": (
                    self.relative_attention_max_distance
                ),
                "dropout_rate": self.dropout_rate,
                "layer_norm_epsilon": self.layer_norm_epsilon,
                "moe_blocks": plain_config(self.moe_blocks),
            }
        )
        return config
