"""Serving signatures of encoder-decoder text models (`keras_moe.models.T5`).

Shape letters: B batch, T input length, L `max_length` (generated length,
start id included).

Signatures (inputs and outputs by name):

    serving_default   encoder_token_ids <int32>[B, T]
                      -> output_token_ids <int32>[B, L]
                      (T = max_input_length when an encoder MoE block groups
                      by sequence, `group_size=None`: such a block needs a
                      static sequence length, so ids are 0-padded to it)
    generate_text     text <string>[B] -> output_text <string>[B]
                      (only when a SentencePiece model is given at export)
    serving_xla       encoder_token_ids <int32>[xla_batch_size,
                      max_input_length] -> output_token_ids <int32>[B, L]

Generation is `T5.generate`, in the graph: greedy, with the key/value cache,
in a `tf.while_loop` that stops early once every sequence has produced the
end-of-sequence id 1. Column 0 of the output is the decoder start id 0;
positions after a sequence's end are 0. Input ids 0 are padding (masked in
the encoder); ids must lie in [0, vocab_size) or the signature fails with
`InvalidArgumentError`.

`generate_text` tokenises with `tensorflow_text.SentencepieceTokenizer` (the
model is stored in the graph), truncates to `max_input_length - 1` pieces,
appends the end-of-sequence id, generates, and detokenises the ids between
the start id and the first end-of-sequence id, dropping ids outside the
SentencePiece vocabulary (T5's extra ids and embedding padding). A server
needs the TensorFlow Text ops for this signature: `import tensorflow_text`
before loading in Python; TF Serving binaries are built without them (build
the model server with the tf-text ops linked in, or serve the
`serving_default` signature and tokenise in the client). The other
signatures use core TensorFlow ops only.

Capacity: a MoE block's eval capacity factor is fixed at export. With no
capacity limit (the default, `eval_capacity_factor=None`) no token is
dropped: a sequence's output does not depend on the other sequences of the
batch, nor on right padding of its input ids. With a finite factor the
capacity of an encoder expert is computed from the padded length T, so
padding, and the batch a request is served in when `group_size` makes
groups span sequences, can change the output.

TF Serving's request batching pads variable-length inputs with each
tensor's first element, not with the padding id 0: pad `encoder_token_ids`
to a common length in the client (as `serving_xla` requires anyway), or
leave `pad_variable_length_inputs` off (`export.serving_config`).
"""

import functools

import numpy as np
import tensorflow as tf

from keras_moe.models import moe_layers
from keras_moe.models.t5 import EOS_ID
from keras_moe.models.t5 import PAD_ID
from keras_moe.models.t5 import T5

from . import signature_names as names
from .adapters import ServingAdapter
from .adapters import register_adapter

_SAMPLE_TEXTS = (
    "translate English to German: The house is wonderful.",
    "summarize: a short sentence to serve.",
)


def check_sentencepiece_model(model_proto, vocab_size):
    """Checks a serialized SentencePiece model against T5's conventions.

    Returns:
        The SentencePiece vocabulary size.

    Raises:
        ValueError: if the model does not parse, its padding id is not 0,
            its end-of-sequence id is not 1, or its vocabulary is larger than
            the model's `vocab_size`.
    """
    # The `text` extra: only text signatures need it.
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor()
    try:
        processor.LoadFromSerializedProto(model_proto)
    except (RuntimeError, TypeError, OSError) as e:
        raise ValueError(f"Not a SentencePiece model: {e}") from None
    ids = {"pad_id": processor.pad_id(), "eos_id": processor.eos_id()}
    if ids != {"pad_id": PAD_ID, "eos_id": EOS_ID}:
        raise ValueError(
            f"T5 needs a SentencePiece model with pad_id={PAD_ID} and "
            f"eos_id={EOS_ID} (train with --pad_id=0 --eos_id=1); this "
            f"one has {ids}"
        )
    size = processor.vocab_size()
    if size > vocab_size:
        raise ValueError(
            f"The SentencePiece vocabulary ({size} pieces) is larger than "
            f"the model's vocab_size={vocab_size}"
        )
    return size


@register_adapter(T5)
class T5Adapter(ServingAdapter):
    """Generation signatures for `T5` (see the module docstring)."""

    def __init__(self, model, options):
        super().__init__(model, options)
        self.max_length = options.max_length
        self.input_length = options.max_input_length
        # A MoeLayer grouping by sequence (group_size=None) needs a static
        # sequence length: its groups are the sequences.
        self.encoder_length = None
        if any(
            layer.group_size is None for layer in moe_layers(model, "encoder")
        ):
            self.encoder_length = self.input_length
        self.tokenizer = None
        self.sentencepiece_size = None
        if options.sentencepiece_model is not None:
            self.sentencepiece_size = check_sentencepiece_model(
                options.sentencepiece_model, model.vocab_size
            )
            # Imported here: only this signature needs the tf-text ops.
            import tensorflow_text

            self.tokenizer = tensorflow_text.SentencepieceTokenizer(
                model=options.sentencepiece_model, out_type=tf.int32
            )

    def resources(self):
        return [] if self.tokenizer is None else [self.tokenizer]

    def _ids_spec(self, batch=None, length=None):
        return tf.TensorSpec(
            (batch, length), tf.int32, name=names.ENCODER_TOKEN_IDS
        )

    def _check_ids(self, token_ids):
        """Fails the call (InvalidArgumentError) on ids outside the vocab."""
        message = f"encoder_token_ids must lie in [0, {self.model.vocab_size})"
        checks = [
            tf.debugging.assert_non_negative(token_ids, message=message),
            tf.debugging.assert_less(
                token_ids, self.model.vocab_size, message=message
            ),
        ]
        with tf.control_dependencies(checks):
            return tf.identity(token_ids)

    def _generate(self, token_ids):
        tokens = self.call_model(
            self.model.generate, token_ids, self.max_length
        )
        return {names.OUTPUT_TOKEN_IDS: tf.cast(tokens, tf.int32)}

    def encode_text(self, text):
        """<string>[B] -> <int32>[B, T] ids ending with EOS, 0-padded."""
        pieces = self.tokenizer.tokenize(text)[:, : self.input_length - 1]
        eos = tf.fill(tf.stack([tf.shape(text)[0], 1]), EOS_ID)
        ids = tf.concat([pieces, tf.RaggedTensor.from_tensor(eos)], axis=1)
        return ids.to_tensor(
            default_value=PAD_ID, shape=(None, self.encoder_length)
        )

    def decode_text(self, tokens):
        """<int32>[B, L] generated ids -> <string>[B] text."""
        # Drop the start id; keep what precedes the first EOS.
        ids = tokens[:, 1:]
        before_end = tf.math.cumsum(tf.cast(ids == EOS_ID, tf.int32), 1) == 0
        keep = before_end & (ids != PAD_ID) & (ids < self.sentencepiece_size)
        return self.tokenizer.detokenize(tf.ragged.boolean_mask(ids, keep))

    def _build_xla_function(self):
        def tpu_func(encoder_token_ids):
            return self._generate(encoder_token_ids)

        return self.function(
            tpu_func,
            [self._ids_spec(self.options.xla_batch_size, self.input_length)],
            jit_compile=True,
        )

    def _build_signatures(self):
        def serving_default(encoder_token_ids):
            return self._generate(self._check_ids(encoder_token_ids))

        xla_function = self.xla_function()

        def serving_xla(encoder_token_ids):
            return xla_function(self._check_ids(encoder_token_ids))

        signatures = {
            names.SERVING_DEFAULT: self.function(
                serving_default, [self._ids_spec(length=self.encoder_length)]
            )
        }
        if self.options.num_beams > 1:

            def generate_beam_search(encoder_token_ids):
                tokens = self.call_model(
                    functools.partial(
                        self.model.generate,
                        num_beams=self.options.num_beams,
                        length_penalty=float(self.options.length_penalty),
                    ),
                    self._check_ids(encoder_token_ids),
                    self.max_length,
                )
                return {names.OUTPUT_TOKEN_IDS: tf.cast(tokens, tf.int32)}

            signatures[names.GENERATE_BEAM_SEARCH] = self.function(
                generate_beam_search,
                [self._ids_spec(length=self.encoder_length)],
            )
        if self.tokenizer is not None:

            def generate_text(text):
                tokens = self._generate(self.encode_text(text))
                return {
                    names.OUTPUT_TEXT: self.decode_text(
                        tokens[names.OUTPUT_TOKEN_IDS]
                    )
                }

            signatures[names.GENERATE_TEXT] = self.function(
                generate_text,
                [tf.TensorSpec((None,), tf.string, name=names.TEXT)],
            )
        signatures[names.SERVING_XLA] = self.function(
            serving_xla,
            [self._ids_spec(self.options.xla_batch_size, self.input_length)],
        )
        return signatures

    def signature_docs(self):
        output = (
            f"Returns output_token_ids <int32>[B, {self.max_length}]: greedy "
            "generation with the key/value cache, column 0 the start id 0, "
            "0 after the end-of-sequence id 1."
        )
        length = "T" if self.encoder_length is None else self.encoder_length
        docs = {
            names.SERVING_DEFAULT: (
                f"encoder_token_ids <int32>[B, {length}] in "
                f"[0, {self.model.vocab_size}), 0 = padding. {output}"
            ),
            names.SERVING_XLA: (
                "encoder_token_ids <int32>"
                f"[{self.options.xla_batch_size}, {self.input_length}] "
                "(fixed shape, 0-padded); calls the XLA-compiled function "
                f"aliased {names.TPU_FUNCTION_ALIAS!r}. {output}"
            ),
        }
        if self.options.num_beams > 1:
            docs[names.GENERATE_BEAM_SEARCH] = (
                f"encoder_token_ids as serving_default; beam search with "
                f"{self.options.num_beams} beams and length penalty "
                f"{float(self.options.length_penalty):g} (Hugging Face's "
                "convention): output_token_ids <int32>[B, "
                f"{self.max_length}], the best hypothesis, 0 after the "
                "end-of-sequence id 1."
            )
        if self.tokenizer is not None:
            docs[names.GENERATE_TEXT] = (
                "text <string>[B] -> output_text <string>[B]: SentencePiece "
                f"tokenisation in the graph (at most {self.input_length} "
                "ids with the end-of-sequence id), greedy generation of "
                f"{self.max_length - 1} ids at most, detokenisation. Needs "
                "the TensorFlow Text ops in the server."
            )
        return docs

    def benchmark_case(self, batch_size, seed=0):
        signature = names.SERVING_DEFAULT
        inputs = self.example_inputs(signature, batch_size, seed)

        def keras_call(encoder_token_ids):
            return self.model.generate(encoder_token_ids, self.max_length)

        return keras_call, signature, inputs

    def example_inputs(self, signature_name, batch_size=1, seed=0):
        if signature_name not in self.signature_docs():
            raise ValueError(
                f"Unknown signature {signature_name!r}; this export has "
                f"{sorted(self.signature_docs())}"
            )
        if signature_name == names.GENERATE_TEXT:
            texts = [
                _SAMPLE_TEXTS[i % len(_SAMPLE_TEXTS)] for i in range(batch_size)
            ]
            return {names.TEXT: np.array(texts, dtype=object)}
        length = self.encoder_length or min(16, self.input_length)
        if signature_name == names.SERVING_XLA:
            batch_size, length = self.options.xla_batch_size, self.input_length
        rng = np.random.default_rng(seed)
        ids = rng.integers(
            EOS_ID + 1, self.model.vocab_size, (batch_size, length)
        ).astype("int32")
        ids[:, -1] = EOS_ID
        return {names.ENCODER_TOKEN_IDS: ids}
