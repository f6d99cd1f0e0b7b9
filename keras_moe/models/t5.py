"""T5 encoder-decoder (v1.0 and v1.1 / UL2) with replaceable MLP blocks.

Shape letters: B batch, T encoder length, U decoder length, D model
dimension (`model_dim`, T5's `d_model`), N heads, Dh head dimension
(`head_dim`, `d_kv`), F MLP hidden dimension (`hidden_dim`, `d_ff`), V
vocabulary, L generation length (`max_length`).

Architecture (Raffel et al. 2020, as in Mesh TensorFlow and t5x):

* pre-norm blocks with RMS norm (`RMSNorm`), no biases anywhere;
* attention logits without `1 / sqrt(Dh)` scaling, plus a relative-position
  bias (bidirectional buckets in the encoder, causal in the decoder) whose
  table belongs to block 0 of each stack and is shared by all its blocks;
  cross-attention has no position bias;
* v1.0: ReLU MLP, embeddings tied to the output projection with logits
  `(h * D**-0.5) @ E.T`; v1.1: gated-GELU MLP and a separate `lm_head`
  without scaling.

Every block's MLP is its layer attribute `mlp`: an `Mlp`, or a `MoeLayer`
for the block indices listed in `encoder_moe_blocks` / `decoder_moe_blocks`.
A MoE block gets the sequence's padding mask as `token_mask`, so padding
takes no expert capacity, and its auxiliary losses appear in `model.losses`.

Token id 0 is padding and the decoder start token; id 1 is end of sequence.
"""

import copy

import keras
import tensorflow as tf
from keras import ops

from keras_moe.layers.mlp import ACTIVATIONS
from keras_moe.layers.moe import MoeLayer
from keras_moe.models.moe_blocks import LANGUAGE
from keras_moe.models.moe_blocks import MoeStack
from keras_moe.models.t5_layers import T5Stack
from keras_moe.models.t5_layers import moe_blocks_config
from keras_moe.models.t5_layers import plain_config
from keras_moe.utils.checks import check_int

PAD_ID = 0
DECODER_START_ID = 0
EOS_ID = 1

_DEFAULTS = {
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "dropout_rate": 0.0,
    "layer_norm_epsilon": 1e-6,
}


def _preset(
    model_dim, num_heads, hidden_dim, num_layers, v1_1, head_dim=64, **kwargs
):
    return {
        "vocab_size": 32128,
        "model_dim": model_dim,
        "num_heads": num_heads,
        "head_dim": head_dim,
        "hidden_dim": hidden_dim,
        "num_encoder_layers": num_layers,
        "num_decoder_layers": num_layers,
        "activation": "gated_gelu" if v1_1 else "relu",
        "tie_embeddings": not v1_1,
        **_DEFAULTS,
        **kwargs,
    }


_TINY = dict(
    vocab_size=128,
    model_dim=32,
    num_heads=4,
    head_dim=8,
    hidden_dim=64,
    num_layers=2,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=16,
)
# Sizes of the released checkpoints (google-research/text-to-text-transfer-
# transformer gin configs); the tiny ones are for tests.
PRESETS = {
    "t5_small": _preset(512, 8, 2048, 6, v1_1=False),
    "t5_base": _preset(768, 12, 3072, 12, v1_1=False),
    "t5_large": _preset(1024, 16, 4096, 24, v1_1=False),
    "t5_v1_1_small": _preset(512, 6, 1024, 8, v1_1=True),
    "t5_v1_1_base": _preset(768, 12, 2048, 12, v1_1=True),
    "t5_v1_1_large": _preset(1024, 16, 2816, 24, v1_1=True),
    "t5_tiny": _preset(v1_1=False, **_TINY),
    "t5_v1_1_tiny": _preset(v1_1=True, **_TINY),
}


def t5_config(name):
    """The `T5` keyword arguments of preset `name` (a fresh dict).

    Example:

    >>> t5_config("t5_small")["model_dim"]
    512
    """
    if name not in PRESETS:
        raise ValueError(
            f"Unknown T5 preset {name!r}; available: {sorted(PRESETS)}"
        )
    return copy.deepcopy(PRESETS[name])


def _check_token_ids(name, token_ids):
    if len(token_ids.shape) != 2:
        raise ValueError(
            f"{name} must have rank 2 <[batch, length]>; received shape "
            f"{tuple(token_ids.shape)}"
        )
    dtype = keras.backend.standardize_dtype(token_ids.dtype)
    if "int" not in dtype:
        raise ValueError(f"{name} must be integer token ids; received {dtype}")


def _mlp_weights(mlp, prefix):
    """Canonical name -> variable for a block's `mlp` (dense or MoE)."""
    if isinstance(mlp, MoeLayer):
        names = {f"{prefix}/router/kernel": mlp.router.kernel}
        for weight in mlp.experts.weights:
            names[f"{prefix}/experts/{weight.name}"] = weight
        return names
    return {f"{prefix}/{weight.name}": weight for weight in mlp.weights}


@keras.saving.register_keras_serializable(package="keras_moe")
class T5(keras.Model):
    """T5 encoder-decoder returning next-token logits.

    Call with a dict: `encoder_token_ids` <int>[B, T], `decoder_token_ids`
    <int>[B, U] (the targets shifted right, starting with the decoder start
    id 0), and optionally `encoder_padding_mask` <bool>[B, T] (default:
    `encoder_token_ids != 0`) and `decoder_padding_mask` <bool>[B, U]
    (default: none; the start id is the padding id, and the causal mask
    already hides right padding from real positions). Returns
    <float32>[B, U, V] logits.

    Variables by their canonical (checkpoint) names: `canonical_variables()`.

    Args:
        vocab_size: V.
        model_dim: D (`d_model`).
        num_heads: N.
        head_dim: Dh (`d_kv`); N * Dh need not equal D.
        hidden_dim: F (`d_ff`).
        num_encoder_layers, num_decoder_layers: blocks per stack.
        relative_attention_num_buckets: rows of the relative-position bias
            tables (>= 4).
        relative_attention_max_distance: distance from which relative
            positions share a bucket (> num_buckets / 2).
        activation: MLP activation, "relu" (v1.0) or "gated_gelu" (v1.1), or
            another name from `keras_moe.layers.mlp`.
        tie_embeddings: v1.0 logits `(h * D**-0.5) @ embeddings.T` (True),
            or v1.1 logits from a separate `lm_head` <[D, V]> (False).
        dropout_rate: dropout rate when training.
        layer_norm_epsilon: of the RMS norms.
        encoder_moe_blocks, decoder_moe_blocks: None or {block index:
            MoeLayer kwargs}; those blocks get a `MoeLayer` as `mlp`.
        **kwargs: passed to `keras.Model` (name, dtype).

    Example:

    >>> model = T5.from_preset("t5_tiny")
    >>> logits = model({
    ...     "encoder_token_ids": keras.ops.array([[5, 6, 7, 1]]),
    ...     "decoder_token_ids": keras.ops.array([[0, 9]]),
    ... })
    >>> tuple(logits.shape)
    (1, 2, 128)
    >>> tuple(model.generate(keras.ops.array([[5, 6, 7, 1]]), 4).shape)
    (1, 4)
    """

    # The stacks whose MLP blocks can be MoE blocks (see `MoeStack`).
    MOE_STACKS = (
        MoeStack(
            "encoder",
            "encoder_moe_blocks",
            "num_encoder_layers",
            blocks="encoder.blocks",
            modality=LANGUAGE,
        ),
        MoeStack(
            "decoder",
            "decoder_moe_blocks",
            "num_decoder_layers",
            blocks="decoder.blocks",
            modality=LANGUAGE,
            causal=True,
        ),
    )

    def __init__(
        self,
        vocab_size,
        model_dim,
        num_heads,
        head_dim,
        hidden_dim,
        num_encoder_layers,
        num_decoder_layers,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        activation="relu",
        tie_embeddings=True,
        dropout_rate=0.0,
        layer_norm_epsilon=1e-6,
        encoder_moe_blocks=None,
        decoder_moe_blocks=None,
        **kwargs,
    ):
        for name, value in (
            ("vocab_size", vocab_size),
            ("model_dim", model_dim),
            ("num_heads", num_heads),
            ("head_dim", head_dim),
            ("hidden_dim", hidden_dim),
            ("num_encoder_layers", num_encoder_layers),
            ("num_decoder_layers", num_decoder_layers),
        ):
            check_int(name, value)
        check_int(
            "relative_attention_num_buckets",
            relative_attention_num_buckets,
            minimum=4,
        )
        check_int(
            "relative_attention_max_distance",
            relative_attention_max_distance,
            minimum=relative_attention_num_buckets // 2 + 1,
        )
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {ACTIVATIONS}; received "
                f"{activation!r}"
            )
        if not isinstance(tie_embeddings, bool):
            raise ValueError(
                f"tie_embeddings must be a bool; received {tie_embeddings!r}"
            )
        if not 0.0 <= dropout_rate < 1.0:
            raise ValueError(
                f"dropout_rate must be in [0, 1); received {dropout_rate!r}"
            )
        if not layer_norm_epsilon > 0:
            raise ValueError(
                f"layer_norm_epsilon must be > 0; received "
                f"{layer_norm_epsilon!r}"
            )
        encoder_moe_blocks = moe_blocks_config(
            "encoder_moe_blocks", encoder_moe_blocks, num_encoder_layers
        )
        decoder_moe_blocks = moe_blocks_config(
            "decoder_moe_blocks", decoder_moe_blocks, num_decoder_layers
        )
        super().__init__(**kwargs)
        self.vocab_size = vocab_size
        self.model_dim = model_dim
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.hidden_dim = hidden_dim
        self.num_encoder_layers = num_encoder_layers
        self.num_decoder_layers = num_decoder_layers
        self.relative_attention_num_buckets = relative_attention_num_buckets
        self.relative_attention_max_distance = relative_attention_max_distance
        self.activation = activation
        self.tie_embeddings = tie_embeddings
        self.dropout_rate = float(dropout_rate)
        self.layer_norm_epsilon = float(layer_norm_epsilon)
        self.encoder_moe_blocks = encoder_moe_blocks
        self.decoder_moe_blocks = decoder_moe_blocks

        self.shared = keras.layers.Embedding(
            vocab_size,
            model_dim,
            embeddings_initializer=keras.initializers.RandomNormal(stddev=1.0),
            dtype=self.dtype_policy,
            name="shared",
        )
        stack_kwargs = dict(
            num_heads=num_heads,
            head_dim=head_dim,
            hidden_dim=hidden_dim,
            activation=activation,
            relative_attention_num_buckets=relative_attention_num_buckets,
            relative_attention_max_distance=relative_attention_max_distance,
            dropout_rate=dropout_rate,
            layer_norm_epsilon=layer_norm_epsilon,
            dtype=self.dtype_policy,
        )
        self.encoder = T5Stack(
            num_layers=num_encoder_layers,
            is_decoder=False,
            moe_blocks=encoder_moe_blocks,
            name="encoder",
            **stack_kwargs,
        )
        self.decoder = T5Stack(
            num_layers=num_decoder_layers,
            is_decoder=True,
            moe_blocks=decoder_moe_blocks,
            name="decoder",
            **stack_kwargs,
        )
        self.lm_head = None
        if not tie_embeddings:
            self.lm_head = keras.layers.Dense(
                vocab_size,
                use_bias=False,
                kernel_initializer=keras.initializers.VarianceScaling(
                    1.0, "fan_in", "normal"
                ),
                dtype=self.dtype_policy,
                name="lm_head",
            )
        self._generate_function = None
        self.build()

    def build(self, input_shape=None):
        del input_shape  # The shapes follow from the config.
        hidden_shape = (None, None, self.model_dim)
        self.shared.build((None, None))
        self.encoder.build(hidden_shape)
        self.decoder.build(hidden_shape)
        if self.lm_head is not None:
            self.lm_head.build(hidden_shape)

    @classmethod
    def from_preset(cls, name, **overrides):
        """A randomly initialised T5 of preset `name`, kwargs overridden.

        Example:

        >>> T5.from_preset("t5_tiny", num_decoder_layers=1).num_decoder_layers
        1
        """
        return cls(**{**t5_config(name), **overrides})

    def _inputs(self, inputs):
        if not isinstance(inputs, dict):
            raise ValueError(
                "T5 expects a dict with 'encoder_token_ids' and "
                f"'decoder_token_ids'; received {type(inputs).__name__}"
            )
        known = {
            "encoder_token_ids",
            "decoder_token_ids",
            "encoder_padding_mask",
            "decoder_padding_mask",
        }
        unknown = sorted(set(inputs) - known)
        missing = sorted(
            {"encoder_token_ids", "decoder_token_ids"} - set(inputs)
        )
        if unknown or missing:
            raise ValueError(
                f"T5 inputs: missing {missing}, unknown {unknown}; expected "
                f"keys {sorted(known)}"
            )
        encoder_ids = inputs["encoder_token_ids"]
        decoder_ids = inputs["decoder_token_ids"]
        _check_token_ids("encoder_token_ids", encoder_ids)
        _check_token_ids("decoder_token_ids", decoder_ids)
        encoder_mask = inputs.get("encoder_padding_mask")
        if encoder_mask is None:
            encoder_mask = encoder_ids != PAD_ID
        decoder_mask = inputs.get("decoder_padding_mask")
        if decoder_mask is None:
            decoder_mask = ops.ones(ops.shape(decoder_ids), dtype="bool")
        for name, mask, ids in (
            ("encoder_padding_mask", encoder_mask, encoder_ids),
            ("decoder_padding_mask", decoder_mask, decoder_ids),
        ):
            if len(mask.shape) != 2:
                raise ValueError(
                    f"{name} must have the shape of the token ids "
                    f"{tuple(ids.shape)}; received {tuple(mask.shape)}"
                )
        return (
            encoder_ids,
            decoder_ids,
            ops.cast(encoder_mask, "bool"),
            ops.cast(decoder_mask, "bool"),
        )

    def encode(self, encoder_token_ids, encoder_padding_mask=None):
        """Encoder outputs <[B, T, D]> (after the final norm)."""
        encoder_token_ids = ops.convert_to_tensor(encoder_token_ids)
        _check_token_ids("encoder_token_ids", encoder_token_ids)
        if encoder_padding_mask is None:
            encoder_padding_mask = encoder_token_ids != PAD_ID
        return self.encoder(
            self.shared(encoder_token_ids),
            padding_mask=ops.cast(encoder_padding_mask, "bool"),
        )

    def call(self, inputs, training=False):
        encoder_ids, decoder_ids, encoder_mask, decoder_mask = self._inputs(
            inputs
        )
        encoded = self.encoder(
            self.shared(encoder_ids),
            padding_mask=encoder_mask,
            training=training,
        )
        hidden = self.decoder(
            self.shared(decoder_ids),
            padding_mask=decoder_mask,
            context=encoded,
            context_padding_mask=encoder_mask,
            training=training,
        )
        return self.logits(hidden)

    def logits(self, hidden):
        """Decoder outputs <[B, U, D]> -> <float32>[B, U, V] logits."""
        if self.tie_embeddings:
            embeddings = ops.cast(self.shared.embeddings, hidden.dtype)
            logits = ops.matmul(
                hidden * (self.model_dim**-0.5), ops.transpose(embeddings)
            )
        else:
            logits = self.lm_head(hidden)
        return ops.cast(logits, "float32")

    def generate(
        self, encoder_token_ids, max_length, encoder_padding_mask=None
    ):
        """Greedy decoding with a key/value cache.

        Starts every sequence with the decoder start id 0 and appends the
        argmax token until `max_length` tokens (start included, as
        `max_length` in Hugging Face's `generate`) or until every sequence
        has produced the end-of-sequence id 1; positions after a
        sequence's end are 0. Runs as one `tf.function` with a
        `tf.while_loop` (traced once per input shape and `max_length`):
        the self-attention caches hold `max_length` positions, the
        cross-attention keys and values are computed once.

        Args:
            encoder_token_ids: <int>[B, T].
            max_length: L >= 1, the length of the returned sequences.
            encoder_padding_mask: <bool>[B, T]; default `ids != 0`.

        Returns:
            <int32>[B, L] token ids, column 0 the start id.
        """
        check_int("max_length", max_length)
        encoder_token_ids = ops.convert_to_tensor(encoder_token_ids)
        _check_token_ids("encoder_token_ids", encoder_token_ids)
        encoder_token_ids = ops.cast(encoder_token_ids, "int32")
        if encoder_padding_mask is None:
            encoder_padding_mask = encoder_token_ids != PAD_ID
        encoder_padding_mask = ops.cast(encoder_padding_mask, "bool")
        if tuple(encoder_padding_mask.shape) != tuple(encoder_token_ids.shape):
            raise ValueError(
                "encoder_padding_mask must have the shape of "
                f"encoder_token_ids {tuple(encoder_token_ids.shape)}; "
                f"received {tuple(encoder_padding_mask.shape)}"
            )
        if self._generate_function is None:
            self._generate_function = tf.function(self._greedy_search)
        tokens = self._generate_function(
            encoder_token_ids, encoder_padding_mask, max_length
        )
        # MoE layers called inside the traced loop leave graph tensors as
        # their auxiliary losses; they mean nothing outside it.
        self._clear_losses()
        return tokens

    def _greedy_search(self, encoder_ids, encoder_mask, max_length):
        encoded = self.encoder(
            self.shared(encoder_ids), padding_mask=encoder_mask
        )
        return greedy_decode(self, encoded, encoder_mask, max_length)

    def canonical_variables(self):
        """Canonical name -> variable (see the module and MODELS.md)."""
        names = {"shared/embedding": self.shared.embeddings}
        for stack_name, stack in (
            ("encoder", self.encoder),
            ("decoder", self.decoder),
        ):
            for index, block in enumerate(stack.blocks):
                prefix = f"{stack_name}/block_{index}"
                attentions = ["self_attention"]
                if stack.is_decoder:
                    attentions.append("cross_attention")
                for attention_name in attentions:
                    attention = getattr(block, attention_name)
                    norm = getattr(block, f"{attention_name}_norm")
                    base = f"{prefix}/{attention_name}"
                    names[f"{base}/query"] = attention.query
                    names[f"{base}/key"] = attention.key
                    names[f"{base}/value"] = attention.value
                    names[f"{base}/output"] = attention.output_kernel
                    if attention.use_relative_attention_bias:
                        names[f"{base}/relative_attention_bias"] = (
                            attention.relative_attention_bias
                        )
                    names[f"{base}_norm/scale"] = norm.scale
                names[f"{prefix}/mlp_norm/scale"] = block.mlp_norm.scale
                names.update(_mlp_weights(block.mlp, f"{prefix}/mlp"))
            names[f"{stack_name}/final_norm/scale"] = stack.final_norm.scale
        if self.lm_head is not None:
            names["lm_head/kernel"] = self.lm_head.kernel
        return names

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "vocab_size": self.vocab_size,
                "model_dim": self.model_dim,
                "num_heads": self.num_heads,
                "head_dim": self.head_dim,
                "hidden_dim": self.hidden_dim,
                "num_encoder_layers": self.num_encoder_layers,
                "num_decoder_layers": self.num_decoder_layers,
                "relative_attention_num_buckets": (
                    self.relative_attention_num_buckets
                ),
                "relative_attention_max_distance": (
                    self.relative_attention_max_distance
                ),
                "activation": self.activation,
                "tie_embeddings": self.tie_embeddings,
                "dropout_rate": self.dropout_rate,
                "layer_norm_epsilon": self.layer_norm_epsilon,
                "encoder_moe_blocks": plain_config(self.encoder_moe_blocks),
                "decoder_moe_blocks": plain_config(self.decoder_moe_blocks),
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def greedy_decode(language_model, encoded, encoder_mask, max_length):
    """Greedy decoding of a `T5` decoder from given encoder outputs.

    The loop of `T5.generate` after its encoder, and of
    `VisionLanguageModel.generate` after its ViT and T5 encoder: the
    decoder runs one token at a time on its self-attention caches
    <[B, 2, L, N, Dh]> (one per block), with the cross-attention keys and
    values of `encoded` computed once, inside a `tf.while_loop` that stops
    when every sequence has produced the end-of-sequence id. `generate`
    runs it in a `tf.function`; eagerly it runs as a Python loop.

    Args:
        language_model: a `T5`.
        encoded: <[B, S, D]> encoder outputs.
        encoder_mask: <bool>[B, S] real encoder positions.
        max_length: L, the length of the returned sequences.

    Returns:
        <int32>[B, L] token ids, column 0 the start id, 0 after the end.

    Example:

    >>> model = T5.from_preset("t5_tiny")
    >>> ids = keras.ops.array([[5, 6, 7, 1]])
    >>> tokens = greedy_decode(model, model.encode(ids), ids != 0, 4)
    >>> tuple(tokens.shape)
    (1, 4)
    """
    lm = language_model
    batch = ops.shape(encoded)[0]
    cross_caches = tuple(
        block.cross_attention.key_value(encoded) for block in lm.decoder.blocks
    )
    self_caches = tuple(
        ops.zeros(
            (batch, 2, max_length, lm.num_heads, lm.head_dim),
            dtype=encoded.dtype,
        )
        for _ in lm.decoder.blocks
    )
    tokens = ops.full((batch, max_length), DECODER_START_ID, "int32")
    finished = ops.zeros((batch,), dtype="bool")
    positions = ops.arange(max_length, dtype="int32")[None, :]

    def condition(index, tokens, finished, caches):
        return ops.logical_and(
            index < max_length - 1, ops.logical_not(ops.all(finished))
        )

    def body(index, tokens, finished, caches):
        current = ops.take(tokens, ops.reshape(index, (1,)), axis=1)
        hidden, caches = lm.decoder(
            lm.shared(current),
            context=encoded,
            context_padding_mask=encoder_mask,
            self_attention_caches=caches,
            cross_attention_caches=cross_caches,
            cache_index=index,
        )
        logits = lm.logits(hidden)[:, 0]
        next_token = ops.cast(ops.argmax(logits, axis=-1), "int32")
        next_token = ops.where(finished, PAD_ID, next_token)
        tokens = ops.where(positions == index + 1, next_token[:, None], tokens)
        finished = ops.logical_or(finished, next_token == EOS_ID)
        return index + 1, tokens, finished, tuple(caches)

    _, tokens, _, _ = tf.while_loop(
        condition,
        body,
        (ops.convert_to_tensor(0, "int32"), tokens, finished, self_caches),
    )
    return tokens
