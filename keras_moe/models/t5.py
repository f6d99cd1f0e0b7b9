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
`T5.generate` decodes greedily, by beam search or by sampling, on
key/value caches; the decoding functions, which the vision-language model
shares, close the module.
"""

import collections
import copy
import math
import numbers

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from keras_moe.layers.mlp import ACTIVATIONS
from keras_moe.layers.moe import MoeLayer
from keras_moe.models.moe_blocks import LANGUAGE
from keras_moe.models.moe_blocks import MoeStack
from keras_moe.models.presets import PresetMixin
from keras_moe.models.presets import register_architectures
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


def _architecture(
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
ARCHITECTURES = {
    "t5_small": _architecture(512, 8, 2048, 6, v1_1=False),
    "t5_base": _architecture(768, 12, 3072, 12, v1_1=False),
    "t5_large": _architecture(1024, 16, 4096, 24, v1_1=False),
    "t5_v1_1_small": _architecture(512, 6, 1024, 8, v1_1=True),
    "t5_v1_1_base": _architecture(768, 12, 2048, 12, v1_1=True),
    "t5_v1_1_large": _architecture(1024, 16, 2816, 24, v1_1=True),
    "t5_tiny": _architecture(v1_1=False, **_TINY),
    "t5_v1_1_tiny": _architecture(v1_1=True, **_TINY),
}
register_architectures("T5", ARCHITECTURES)


def t5_config(name):
    """The `T5` keyword arguments of architecture `name` (a fresh dict).

    Example:

    >>> t5_config("t5_small")["model_dim"]
    512
    """
    if name not in ARCHITECTURES:
        raise ValueError(
            f"Unknown T5 architecture {name!r}; available: "
            f"{sorted(ARCHITECTURES)}"
        )
    return copy.deepcopy(ARCHITECTURES[name])


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
class T5(PresetMixin, keras.Model):
    """T5 encoder-decoder returning next-token logits.

    Call with a dict: `encoder_token_ids` <int>[B, T], `decoder_token_ids`
    <int>[B, U] (the targets shifted right, starting with the decoder start
    id 0), and optionally `encoder_padding_mask` <bool>[B, T] (default:
    `encoder_token_ids != 0`) and `decoder_padding_mask` <bool>[B, U]
    (default: none; the start id is the padding id, and the causal mask
    already hides right padding from real positions). Returns
    <float32>[B, U, V] logits.

    Variables by their canonical (checkpoint) names: `canonical_variables()`.
    `T5.from_preset(preset)` loads a model, weights included (a directory
    `save_to_preset` wrote, a keras-hub or Hugging Face directory, a hub
    handle); `T5.from_architecture(name)` builds a randomly initialised one.

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

    >>> model = T5.from_architecture("t5_tiny")
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
    def from_architecture(cls, name, **overrides):
        """A randomly initialised T5 of architecture `name` (see
        `t5_config`), kwargs overridden; `from_preset` loads weights.

        Example:

        >>> T5.from_architecture(
        ...     "t5_tiny", num_decoder_layers=1).num_decoder_layers
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
        self,
        encoder_token_ids,
        max_length,
        encoder_padding_mask=None,
        *,
        num_beams=1,
        length_penalty=1.0,
        early_stopping=False,
        do_sample=False,
        top_k=0,
        top_p=1.0,
        temperature=1.0,
        seed=None,
    ):
        """Greedy decoding, beam search or sampling, with key/value caches.

        Every sequence starts with the decoder start id 0 and grows one
        token at a time until `max_length` tokens (start included, as
        `max_length` in Hugging Face's `generate`) or until every sequence
        has ended; positions after a sequence's end-of-sequence id 1 are 0.
        Runs as one `tf.function` with a `tf.while_loop`, traced once per
        input shape, `max_length`, `num_beams`, `early_stopping` and
        `do_sample` (the other options are tensors of the trace): the
        self-attention caches hold `max_length` positions, the
        cross-attention keys and values are computed once.

        * Greedy (the default): the argmax token at every step.
        * Beam search (`num_beams` > 1): Hugging Face's algorithm, token for
          token (`beam_search_decode`); returns the best finished
          hypothesis, scored by `sum(log p) / length ** length_penalty`.
        * Sampling (`do_sample=True`): a token drawn from the logits divided
          by `temperature`, restricted to the `top_k` most likely tokens
          and to the nucleus of probability `top_p` (`sample_decode`);
          reproducible for a given `seed`.

        Args:
            encoder_token_ids: <int>[B, T].
            max_length: L >= 1, the length of the returned sequences.
            encoder_padding_mask: <bool>[B, T]; default `ids != 0`.
            num_beams: K >= 1 beams; 1 is greedy decoding (or sampling).
            length_penalty: exponent of the hypothesis length (generated
                tokens, end-of-sequence included) that divides a finished
                hypothesis's summed log-probabilities: > 0 favours longer
                sequences, < 0 shorter ones. Beam search only.
            early_stopping: when an example stops taking finished
                hypotheses, as in Hugging Face: True as soon as it has K;
                False (default) once it has K and its best running beam,
                scored at its current length, is below the worst of them
                (a heuristic: with `length_penalty` > 0 a longer beam
                could still win); "never" as False but scoring the running
                beam at length L - 1 when `length_penalty` > 0 (exact).
                The search ends when no example takes any more, or at L
                tokens. Beam search only.
            do_sample: sample instead of taking the argmax.
            top_k: sample among the `top_k` most likely tokens; 0 (default)
                keeps all. Hugging Face's default is 50.
            top_p: sample in the nucleus: the most likely tokens whose
                probabilities, after `temperature` and `top_k`, sum to
                `top_p` in (0, 1]; 1.0 (default) keeps all.
            temperature: > 0, divides the logits before sampling.
            seed: int >= 0 for reproducible sampling (see `sample_decode`);
                None draws one from TensorFlow's global generator.

        Returns:
            <int32>[B, L] token ids, column 0 the start id.

        Raises:
            ValueError: for an option out of range, beam search together
                with sampling, or an option of one strategy passed with
                another (`top_k` without `do_sample`, `length_penalty`
                with one beam).
        """
        check_int("max_length", max_length)
        decoding = decoding_options(
            num_beams=num_beams,
            length_penalty=length_penalty,
            early_stopping=early_stopping,
            do_sample=do_sample,
            top_k=top_k,
            top_p=top_p,
            temperature=temperature,
            seed=seed,
        )
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
            self._generate_function = tf.function(self._search)
        tokens = self._generate_function(
            encoder_token_ids,
            encoder_padding_mask,
            max_length,
            decoding.function_arguments(),
        )
        # MoE layers called inside the traced loop leave graph tensors as
        # their auxiliary losses; they mean nothing outside it.
        self._clear_losses()
        return tokens

    def _search(self, encoder_ids, encoder_mask, max_length, decoding):
        encoded = self.encoder(
            self.shared(encoder_ids), padding_mask=encoder_mask
        )
        return decode(self, encoded, encoder_mask, max_length, decoding)

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


# --- Decoding ---------------------------------------------------------------

# Hugging Face's score for "impossible" in beam search: added to a
# candidate that must not be picked, and the score of an empty slot.
_NO_SCORE = -1.0e9
EARLY_STOPPING = (False, True, "never")


class DecodingOptions(
    collections.namedtuple(
        "DecodingOptions",
        [
            "num_beams",
            "length_penalty",
            "early_stopping",
            "do_sample",
            "top_k",
            "top_p",
            "temperature",
            "seed",
        ],
    )
):
    """Validated `generate` options (see `decoding_options`).

    A named tuple, so that a `tf.function` sees its fields one by one: a
    Python value is part of the trace's key, a tensor an input.
    """

    __slots__ = ()

    @property
    def strategy(self):
        """The decoding: "greedy", "beam_search" or "sample"."""
        if self.num_beams > 1:
            return "beam_search"
        return "sample" if self.do_sample else "greedy"

    def function_arguments(self):
        """The options to pass to a `tf.function`: the numbers that do not
        change shapes or control flow as tensors (new values then reuse
        the trace), and a sampling seed drawn now when none was given."""
        if self.strategy == "beam_search":
            return self._replace(
                length_penalty=tf.constant(self.length_penalty, tf.float32)
            )
        if self.strategy == "greedy":
            return self
        seed = self.seed
        if seed is None:
            seed = tf.random.uniform((), maxval=2**62, dtype=tf.int64)
        return self._replace(
            top_k=tf.constant(self.top_k, tf.int32),
            top_p=tf.constant(self.top_p, tf.float32),
            temperature=tf.constant(self.temperature, tf.float32),
            seed=tf.cast(seed, tf.int64),
        )


def _check_real(name, value, low, high, low_open, text):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number; received {value!r}")
    above = value > low if low_open else value >= low
    if not (above and value <= high and math.isfinite(value)):
        raise ValueError(f"{name} must be {text}; received {value!r}")
    return float(value)


def decoding_options(
    num_beams=1,
    length_penalty=1.0,
    early_stopping=False,
    do_sample=False,
    top_k=0,
    top_p=1.0,
    temperature=1.0,
    seed=None,
):
    """Checks the decoding options of `generate` (see `T5.generate`).

    Returns:
        A `DecodingOptions`.

    Example:

    >>> decoding_options(num_beams=4).strategy
    'beam_search'
    >>> decoding_options(top_k=5)
    Traceback (most recent call last):
    ...
    ValueError: top_k=5 applies only when sampling (do_sample=True)
    """
    check_int("num_beams", num_beams)
    length_penalty = _check_real(
        "length_penalty", length_penalty, -math.inf, math.inf, False, "finite"
    )
    if not any(early_stopping is value for value in EARLY_STOPPING[:2]) and (
        early_stopping != "never"
    ):
        raise ValueError(
            f"early_stopping must be one of {EARLY_STOPPING}; received "
            f"{early_stopping!r}"
        )
    if not isinstance(do_sample, bool):
        raise ValueError(f"do_sample must be a bool; received {do_sample!r}")
    check_int("top_k", top_k, minimum=0)
    top_p = _check_real("top_p", top_p, 0.0, 1.0, True, "in (0, 1]")
    temperature = _check_real(
        "temperature", temperature, 0.0, math.inf, True, "finite and > 0"
    )
    if seed is not None:
        check_int("seed", seed, minimum=0)
        if seed >= 2**63:
            raise ValueError(f"seed must be < 2**63; received {seed}")
    if num_beams > 1 and do_sample:
        raise ValueError(
            f"Beam search (num_beams={num_beams}) cannot be combined with "
            "sampling (do_sample=True): beam sampling is not implemented"
        )
    if num_beams == 1:
        for name, value, default in (
            ("length_penalty", length_penalty, 1.0),
            ("early_stopping", early_stopping, False),
        ):
            if value is not default and value != default:
                raise ValueError(
                    f"{name}={value!r} applies only to beam search "
                    "(num_beams > 1)"
                )
    if not do_sample:
        for name, value, default in (
            ("top_k", top_k, 0),
            ("top_p", top_p, 1.0),
            ("temperature", temperature, 1.0),
            ("seed", seed, None),
        ):
            if value != default:
                raise ValueError(
                    f"{name}={value!r} applies only when sampling "
                    "(do_sample=True)"
                )
    return DecodingOptions(
        num_beams,
        length_penalty,
        early_stopping,
        do_sample,
        top_k,
        top_p,
        temperature,
        seed,
    )


def decode(language_model, encoded, encoder_mask, max_length, decoding):
    """Runs the decoding `decoding` (`DecodingOptions`) asks for.

    `greedy_decode`, `beam_search_decode` or `sample_decode` of a `T5`
    decoder from given encoder outputs: the loop of `T5.generate` and
    `VisionLanguageModel.generate` after their encoders.

    Returns:
        <int32>[B, L] token ids, column 0 the start id, 0 after the end.
    """
    lm, args = language_model, (encoded, encoder_mask, max_length)
    if decoding.strategy == "beam_search":
        return beam_search_decode(
            lm,
            *args,
            num_beams=decoding.num_beams,
            length_penalty=decoding.length_penalty,
            early_stopping=decoding.early_stopping,
        )
    if decoding.strategy == "sample":
        return sample_decode(
            lm,
            *args,
            seed=decoding.seed,
            top_k=decoding.top_k,
            top_p=decoding.top_p,
            temperature=decoding.temperature,
        )
    return greedy_decode(lm, *args)


def _caches(language_model, encoded, batch, max_length):
    """Cross-attention keys and values of `encoded` and empty self-attention
    caches <[batch, 2, L, N, Dh]>, one of each per decoder block."""
    lm = language_model
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
    return cross_caches, self_caches


def _step(language_model, token, encoded, encoder_mask, caches, index):
    """One decoder step: token <int32>[B, 1] at position `index`, caches
    (self-attention caches, cross-attention caches) -> (<float32>[B, V]
    next-token logits, updated self-attention caches)."""
    lm = language_model
    self_caches, cross_caches = caches
    hidden, self_caches = lm.decoder(
        lm.shared(token),
        context=encoded,
        context_padding_mask=encoder_mask,
        self_attention_caches=self_caches,
        cross_attention_caches=cross_caches,
        cache_index=index,
    )
    return lm.logits(hidden)[:, 0], tuple(self_caches)


def _argmax(logits, index):
    del index  # Greedy decoding is the same at every step.
    return ops.cast(ops.argmax(logits, axis=-1), "int32")


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

    >>> model = T5.from_architecture("t5_tiny")
    >>> ids = keras.ops.array([[5, 6, 7, 1]])
    >>> tokens = greedy_decode(model, model.encode(ids), ids != 0, 4)
    >>> tuple(tokens.shape)
    (1, 4)
    """
    return _token_by_token(
        language_model, encoded, encoder_mask, max_length, _argmax
    )


def _token_by_token(language_model, encoded, encoder_mask, max_length, pick):
    """The loop of greedy decoding and sampling: `pick(logits <float32>[B,
    V], index)` -> <int32>[B] chooses the token after position `index`."""
    batch = ops.shape(encoded)[0]
    cross_caches, self_caches = _caches(
        language_model, encoded, batch, max_length
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
        logits, caches = _step(
            language_model,
            current,
            encoded,
            encoder_mask,
            (caches, cross_caches),
            index,
        )
        next_token = pick(logits, index)
        next_token = ops.where(finished, PAD_ID, next_token)
        tokens = ops.where(positions == index + 1, next_token[:, None], tokens)
        finished = ops.logical_or(finished, next_token == EOS_ID)
        return index + 1, tokens, finished, caches

    _, tokens, _, _ = tf.while_loop(
        condition,
        body,
        (ops.convert_to_tensor(0, "int32"), tokens, finished, self_caches),
    )
    return tokens


def sampling_logits(logits, top_k=0, top_p=1.0, temperature=1.0):
    """The logits sampling draws from: scaled, top-k and nucleus filtered.

    In Hugging Face's order: the logits are divided by `temperature`;
    tokens below the `top_k`-th largest logit get -inf (`top_k` 0 keeps
    all); then, of the softmax of what remains, the nucleus is kept: the
    most likely tokens up to and including the first whose cumulative
    probability reaches `top_p` (Holtzman et al. 2020), so the most likely
    token always stays. Tokens tied with the last one kept stay too.

    Args:
        logits: <float32>[B, V].
        top_k: int >= 0 (a Python int or an int32 scalar tensor).
        top_p: in (0, 1]; 1.0 keeps all.
        temperature: > 0.

    Returns:
        <float32>[B, V]: the scaled logits, -inf outside the kept tokens.

    Example:

    >>> logits = keras.ops.log(keras.ops.array([[0.5, 0.3, 0.15, 0.05]]))
    >>> kept = sampling_logits(logits, top_p=0.75)
    >>> keras.ops.convert_to_numpy(keras.ops.isfinite(kept)).tolist()
    [[True, True, False, False]]
    """
    logits = ops.cast(logits, "float32") / ops.cast(temperature, "float32")
    vocab = logits.shape[-1]
    top_k = ops.cast(top_k, "int32")
    top_k = ops.where(top_k > 0, ops.minimum(top_k, vocab), vocab)
    # (B, V), most likely first
    ranked = ops.flip(ops.sort(logits, axis=-1), axis=-1)
    ranks = ops.arange(vocab, dtype="int32")[None, :]
    ranked = ops.where(ranks < top_k, ranked, -math.inf)
    probs = ops.softmax(ranked, axis=-1)
    more_likely = ops.cumsum(probs, axis=-1) - probs
    top_p = ops.cast(top_p, "float32")
    keep = ops.logical_and(
        ranks < top_k,
        ops.logical_or(more_likely < top_p, top_p >= 1.0),
    )
    threshold = ops.min(
        ops.where(keep, ranked, math.inf), axis=-1, keepdims=True
    )
    return ops.where(logits >= threshold, logits, -math.inf)


def sample_decode(
    language_model,
    encoded,
    encoder_mask,
    max_length,
    seed,
    top_k=0,
    top_p=1.0,
    temperature=1.0,
):
    """Sampling from a `T5` decoder, on the loop of `greedy_decode`.

    At each step the next token is drawn from `sampling_logits` with the
    Gumbel-max trick (argmax of logits plus Gumbel noise, which is a draw
    from their softmax): the noise comes from `tf.random.stateless_uniform`
    seeded by (`seed`, step), so a seed gives the same tokens on every run,
    whatever else used the random generators. Compiled by XLA the same
    seed draws other noise (XLA's generator is not TensorFlow's kernel's),
    reproducible in its turn.

    Args:
        language_model: a `T5`.
        encoded: <[B, S, D]> encoder outputs.
        encoder_mask: <bool>[B, S] real encoder positions.
        max_length: L, the length of the returned sequences.
        seed: int or int64 scalar tensor.
        top_k, top_p, temperature: see `sampling_logits`.

    Returns:
        <int32>[B, L] token ids, column 0 the start id, 0 after the end.

    Example:

    >>> model = T5.from_architecture("t5_tiny")
    >>> ids = keras.ops.array([[5, 6, 7, 1]])
    >>> encoded = model.encode(ids)
    >>> first = sample_decode(model, encoded, ids != 0, 6, seed=1, top_k=5)
    >>> again = sample_decode(model, encoded, ids != 0, 6, seed=1, top_k=5)
    >>> bool(keras.ops.all(first == again))
    True
    """
    seed = ops.cast(seed, "int64")
    tiny = float(np.finfo(np.float32).tiny)

    def pick(logits, index):
        logits = sampling_logits(logits, top_k, top_p, temperature)
        uniform = tf.random.stateless_uniform(
            ops.shape(logits),
            seed=ops.stack([seed, ops.cast(index, "int64")]),
            minval=tiny,
            maxval=1.0,
        )
        gumbel = -ops.log(-ops.log(uniform))
        return ops.cast(ops.argmax(logits + gumbel, axis=-1), "int32")

    return _token_by_token(
        language_model, encoded, encoder_mask, max_length, pick
    )


def beam_search_decode(
    language_model,
    encoded,
    encoder_mask,
    max_length,
    num_beams,
    length_penalty=1.0,
    early_stopping=False,
):
    """Beam search of a `T5` decoder, as Hugging Face's `generate`.

    K = `num_beams` hypotheses per example run side by side, folded into
    the batch (<[B*K, ...]>, an example's beams adjacent), on the
    self-attention caches of `greedy_decode`. At each step:

    1. every running beam's score (its summed log-probabilities) plus the
       log-softmax of its next-token logits scores K*V continuations; the
       best 2K are the candidates (2K so that K can go on even if K end);
    2. the best K candidates that have not ended (end-of-sequence, or L
       tokens) run on: the caches are gathered by each one's beam of
       origin;
    3. those of the best K candidates that have ended are finished
       hypotheses, scored `sum(log p) / length ** length_penalty`
       (`length`: generated tokens, the end-of-sequence included, the
       start id not); the K best finished hypotheses so far are kept.

    An example stops taking finished hypotheses once it has K and
    `early_stopping` is True, or once it has K and its best running beam
    cannot beat the worst of them: its score divided by `length **
    length_penalty`, `length` the current one, or L - 1 for
    `early_stopping="never"` and `length_penalty` > 0 (see
    `T5.generate`). The loop stops when no example takes any more, or at
    L tokens, whose candidates all end. Scores and stopping rules are
    those of Hugging Face's vectorised beam search, so that the tokens
    agree with its `generate(num_beams=K, do_sample=False)` (tested
    against transformers 5).

    Args:
        language_model: a `T5`.
        encoded: <[B, S, D]> encoder outputs.
        encoder_mask: <bool>[B, S] real encoder positions.
        max_length: L, the length of the returned sequences.
        num_beams: K >= 1.
        length_penalty: float or float32 scalar tensor.
        early_stopping: False, True or "never" (a Python value).

    Returns:
        <int32>[B, L] the best finished hypothesis of each example, column
        0 the start id, 0 after the end.

    Example:

    >>> model = T5.from_architecture("t5_tiny")
    >>> ids = keras.ops.array([[5, 6, 7, 1]])
    >>> tokens = beam_search_decode(
    ...     model, model.encode(ids), ids != 0, 5, num_beams=3)
    >>> tuple(tokens.shape)
    (1, 5)
    """
    lm = language_model
    beams, vocab = num_beams, lm.vocab_size
    candidates = 2 * beams
    batch = ops.shape(encoded)[0]
    # (B, S, D) -> (B*K, S, D), each example's beams adjacent
    encoded = ops.repeat(encoded, beams, axis=0)
    encoder_mask = ops.repeat(encoder_mask, beams, axis=0)
    cross_caches, self_caches = _caches(lm, encoded, batch * beams, max_length)
    length_penalty = ops.cast(length_penalty, "float64")
    positions = ops.arange(max_length, dtype="int32")

    def penalised(scores, length):
        # As Hugging Face: the penalty in float64, the division in float32.
        length = ops.cast(length, "float64")
        return scores / ops.cast(ops.power(length, length_penalty), "float32")

    def gather(values, index):
        """<[B, X, ...]> values, <int32>[B, Y] index -> <[B, Y, ...]>."""
        for _ in values.shape[2:]:
            index = index[..., None]
        return ops.take_along_axis(values, index, axis=1)

    def condition(index, running, finished, is_open, caches):
        going = ops.logical_and(index < max_length - 1, ops.any(is_open))
        if early_stopping is True:
            going = ops.logical_and(
                going, ops.logical_not(ops.all(finished[2]))
            )
        return going

    def body(index, running, finished, is_open, caches):
        running_tokens, running_scores = running
        finished_tokens, finished_scores, is_finished = finished
        # (B, K, L) -> (B*K, 1), the tokens at position `index`
        current = ops.reshape(
            ops.take(running_tokens, ops.reshape(index, (1,)), axis=2),
            (-1, 1),
        )
        logits, caches = _step(
            lm, current, encoded, encoder_mask, (caches, cross_caches), index
        )
        # (B*K, V) -> (B, K, V) -> (B, K*V)
        scores = ops.reshape(
            ops.log_softmax(logits, axis=-1), (-1, beams, vocab)
        )
        scores = ops.reshape(
            scores + running_scores[:, :, None], (-1, beams * vocab)
        )
        # 1. The 2K best continuations, best first: (B, 2K).
        top_scores, top = ops.top_k(scores, candidates)
        origin = top // vocab
        new_token = ops.cast(top % vocab, "int32")
        tokens = ops.where(
            positions == index + 1,
            new_token[:, :, None],
            gather(running_tokens, origin),
        )
        ended = ops.logical_or(new_token == EOS_ID, index + 2 >= max_length)

        # 2. The best K that go on; caches follow their beams.
        going_scores = top_scores + ops.cast(ended, "float32") * _NO_SCORE
        running_scores, best = ops.top_k(going_scores, beams)
        running_tokens = gather(tokens, best)
        examples = ops.arange(batch, dtype="int32")[:, None]
        parent = gather(origin, best) + examples * beams
        parent = ops.reshape(parent, (-1,))  # (B, K) -> (B*K,)
        caches = tuple(ops.take(cache, parent, axis=0) for cache in caches)

        # 3. Finished hypotheses among the best K candidates.
        takes = is_open
        if early_stopping is True:
            takes = ops.logical_and(
                takes, ops.logical_not(ops.all(is_finished, axis=1))
            )
        new = ops.logical_and(
            ops.logical_and(ended, takes[:, None]),
            (ops.arange(candidates) < beams)[None, :],
        )
        new_scores = ops.where(new, penalised(top_scores, index + 1), _NO_SCORE)
        # Old slots first: a tie keeps them.
        merged_scores = ops.concatenate([finished_scores, new_scores], 1)
        finished_scores, best = ops.top_k(merged_scores, beams)
        finished_tokens = gather(
            ops.concatenate([finished_tokens, tokens], 1), best
        )
        is_finished = gather(ops.concatenate([is_finished, new], 1), best)

        # Could the best running beam still beat the worst finished one?
        length = index + 1
        if early_stopping == "never":
            length = ops.where(length_penalty > 0, max_length - 1, length)
        best_running = penalised(running_scores[:, :1], length)
        worst = ops.where(
            is_finished,
            ops.min(finished_scores, axis=1, keepdims=True),
            _NO_SCORE,
        )
        is_open = ops.logical_and(
            is_open, ops.any(best_running > worst, axis=1)
        )
        return (
            index + 1,
            (running_tokens, running_scores),
            (finished_tokens, finished_scores, is_finished),
            is_open,
            caches,
        )

    start = ops.full((batch, beams, max_length), DECODER_START_ID, "int32")
    running_tokens = ops.where(positions == 0, start, PAD_ID)
    # Only the first beam runs at first, so that the K beams differ.
    first = ops.where(ops.arange(beams) == 0, 0.0, _NO_SCORE)
    running_scores = ops.zeros((batch, beams)) + first[None, :]
    finished = (
        running_tokens,
        ops.full((batch, beams), _NO_SCORE, "float32"),
        ops.zeros((batch, beams), "bool"),
    )
    _, _, finished, _, _ = tf.while_loop(
        condition,
        body,
        (
            ops.convert_to_tensor(0, "int32"),
            (running_tokens, running_scores),
            finished,
            ops.ones((batch,), "bool"),
            self_caches,
        ),
    )
    # The K finished hypotheses are sorted, best first.
    return finished[0][:, 0]
