"""Serving signatures of vision-language models (`VisionLanguageModel`).

Shape letters: B batch, H, W, C the model's image size (`image_shape`), P
`max_prompt_length`, L `max_length` (generated length, start id included).

Signatures (inputs and outputs by name), one image per example:

    serving_default   images <float32>[B, H, W, C] (normalised as the Keras
                      model takes them), prompt_token_ids <int32>[B, T]
                      -> output_token_ids <int32>[B, L]
                      (T = P when a T5 encoder MoE block groups by
                      sequence, `group_size=None`: such a block needs a
                      static sequence length, so ids are 0-padded to it)
    caption           image_bytes <string>[B] (PNG or JPEG, any size),
                      prompt <string>[B] -> output_text <string>[B]
                      (only when a SentencePiece model is given at export)
    serving_xla       images <float32>[xla_batch_size, H, W, C],
                      prompt_token_ids <int32>[xla_batch_size, P]
                      -> output_token_ids <int32>[xla_batch_size, L]

Generation is `VisionLanguageModel.generate` in the graph: the ViT, the
projection and the T5 encoder run once, then greedy decoding with the key
and value caches in a `tf.while_loop`. Column 0 of the output is the
decoder start id 0; positions after a sequence's end are 0. With the
model's placeholder layout (`image_token_id` set) the prompts given to
`serving_default` hold the placeholder; `caption` puts it before the
prompt.

`caption`, all in the graph: each image is decoded (`tf.io.decode_image`,
to C channels), scaled to [0, 1], fitted into H x W keeping its aspect
ratio (`tf.image.resize_with_pad`: bilinear resize, then zero padding
centred; an image of the model's size is unchanged, an 8 x 8 digit in a
16-wide model is centred between 4-pixel black borders) and normalised
with the export's `image_mean` and `image_std`. The prompt is tokenised
with `tensorflow_text.SentencepieceTokenizer` (the model is stored in the
graph) and gets the end-of-sequence id; a prompt longer than P tokens
fails the request (`InvalidArgumentError` naming P), it is never
truncated. The output is detokenised from the ids between the start id and
the first end-of-sequence id, dropping ids outside the SentencePiece
vocabulary. A server needs the TensorFlow Text ops for this signature
(`import tensorflow_text` before loading in Python; a TF Serving binary
built with them); the other signatures use core TensorFlow ops only.

Capacity: as for T5 (`export.t5_serving`): with the default no-drop
export an example's output does not depend on the rest of the batch or on
padding.
"""

import numpy as np
import tensorflow as tf

from keras_moe.models import moe_layers
from keras_moe.models.t5 import EOS_ID
from keras_moe.models.t5 import PAD_ID
from keras_moe.models.vlm import VisionLanguageModel

from . import signature_names as names
from .adapters import ServingAdapter
from .adapters import register_adapter
from .t5_serving import check_sentencepiece_model
from .vit_serving import _per_channel

CAPTION = "caption"
PROMPT = "prompt"
PROMPT_TOKEN_IDS = "prompt_token_ids"

_SAMPLE_PROMPTS = ("caption in en:", "what is the left digit?")


@register_adapter(VisionLanguageModel)
class VlmAdapter(ServingAdapter):
    """Captioning signatures for `VisionLanguageModel` (see the module)."""

    def __init__(self, model, options):
        super().__init__(model, options)
        self.max_length = options.max_length
        self.height, self.width, self.channels = model.image_shape
        self.prompt_length = model.max_prompt_length
        self.mean = _per_channel(
            options.image_mean, "image_mean", self.channels
        )
        self.std = _per_channel(options.image_std, "image_std", self.channels)
        # A T5 encoder MoeLayer grouping by sequence needs a static
        # sequence length.
        self.static_prompt = any(
            layer.group_size is None for layer in moe_layers(model, "encoder")
        )
        self.tokenizer = None
        self.sentencepiece_size = None
        if options.sentencepiece_model is not None:
            self.sentencepiece_size = check_sentencepiece_model(
                options.sentencepiece_model, model.language_model.vocab_size
            )
            # Imported here: only the caption signature needs tf-text ops.
            import tensorflow_text

            self.tokenizer = tensorflow_text.SentencepieceTokenizer(
                model=options.sentencepiece_model, out_type=tf.int32
            )

    def resources(self):
        return [] if self.tokenizer is None else [self.tokenizer]

    # ------------------------------------------------------------ specs

    def _images_spec(self, batch=None):
        shape = (batch, self.height, self.width, self.channels)
        return tf.TensorSpec(shape, tf.float32, name=names.IMAGES)

    def _ids_spec(self, batch=None, static=False):
        length = self.prompt_length if static else None
        return tf.TensorSpec((batch, length), tf.int32, name=PROMPT_TOKEN_IDS)

    # ------------------------------------------------------------ graph

    def _check_ids(self, token_ids):
        """Fails the call (InvalidArgumentError) on ids outside the vocab
        or prompts longer than P."""
        vocab_size = self.model.language_model.vocab_size
        message = f"prompt_token_ids must lie in [0, {vocab_size})"
        checks = [
            tf.debugging.assert_non_negative(token_ids, message=message),
            tf.debugging.assert_less(token_ids, vocab_size, message=message),
            tf.debugging.assert_less_equal(
                tf.shape(token_ids)[1],
                self.prompt_length,
                message=(
                    "prompt_token_ids may hold at most max_prompt_length="
                    f"{self.prompt_length} ids"
                ),
            ),
        ]
        with tf.control_dependencies(checks):
            return tf.identity(token_ids)

    def _generate(self, images, token_ids):
        tokens = self.call_model(
            self.model.generate, images, token_ids, self.max_length
        )
        return {names.OUTPUT_TOKEN_IDS: tf.cast(tokens, tf.int32)}

    def decode_images(self, image_bytes):
        """<string>[B] encoded images -> model inputs <float32>[B, H, W, C]."""
        mean, std = tf.constant(self.mean), tf.constant(self.std)

        def decode_one(data):
            image = tf.io.decode_image(
                data, channels=self.channels, expand_animations=False
            )
            image = tf.ensure_shape(image, (None, None, self.channels))
            image = tf.cast(image, tf.float32) / 255.0
            image = tf.image.resize_with_pad(image, self.height, self.width)
            return (image - mean) / std

        return tf.map_fn(
            decode_one,
            image_bytes,
            fn_output_signature=tf.TensorSpec(
                (self.height, self.width, self.channels), tf.float32
            ),
        )

    def encode_prompts(self, prompts):
        """<string>[B] -> <int32>[B, P] ids ending with EOS, 0-padded;
        fails the call on a prompt longer than P tokens."""
        pieces = self.tokenizer.tokenize(prompts)
        batch = tf.shape(prompts)[0]
        parts = [
            pieces,
            tf.RaggedTensor.from_tensor(tf.fill([batch, 1], EOS_ID)),
        ]
        if self.model.image_token_id is not None:
            placeholder = tf.fill([batch, 1], self.model.image_token_id)
            parts.insert(0, tf.RaggedTensor.from_tensor(placeholder))
        ids = tf.concat(parts, axis=1)
        check = tf.debugging.assert_less_equal(
            tf.reduce_max(ids.row_lengths()),
            tf.cast(self.prompt_length, tf.int64),
            message=(
                "A prompt is longer than max_prompt_length="
                f"{self.prompt_length} tokens (end-of-sequence id included)"
            ),
        )
        with tf.control_dependencies([check]):
            return ids.to_tensor(
                default_value=PAD_ID, shape=(None, self.prompt_length)
            )

    def decode_text(self, tokens):
        """<int32>[B, L] generated ids -> <string>[B] text."""
        ids = tokens[:, 1:]  # the start id
        before_end = tf.math.cumsum(tf.cast(ids == EOS_ID, tf.int32), 1) == 0
        keep = before_end & (ids != PAD_ID) & (ids < self.sentencepiece_size)
        return self.tokenizer.detokenize(tf.ragged.boolean_mask(ids, keep))

    def _build_xla_function(self):
        def tpu_func(images, prompt_token_ids):
            return self._generate(images, prompt_token_ids)

        batch = self.options.xla_batch_size
        return self.function(
            tpu_func,
            [self._images_spec(batch), self._ids_spec(batch, static=True)],
            jit_compile=True,
        )

    def _build_signatures(self):
        def serving_default(images, prompt_token_ids):
            return self._generate(images, self._check_ids(prompt_token_ids))

        xla_function = self.xla_function()

        def serving_xla(images, prompt_token_ids):
            return xla_function(images, self._check_ids(prompt_token_ids))

        batch = self.options.xla_batch_size
        signatures = {
            names.SERVING_DEFAULT: self.function(
                serving_default,
                [
                    self._images_spec(),
                    self._ids_spec(static=self.static_prompt),
                ],
            )
        }
        if self.tokenizer is not None:

            def caption(image_bytes, prompt):
                outputs = self._generate(
                    self.decode_images(image_bytes),
                    self.encode_prompts(prompt),
                )
                tokens = outputs[names.OUTPUT_TOKEN_IDS]
                return {names.OUTPUT_TEXT: self.decode_text(tokens)}

            signatures[CAPTION] = self.function(
                caption,
                [
                    tf.TensorSpec((None,), tf.string, name=names.IMAGE_BYTES),
                    tf.TensorSpec((None,), tf.string, name=PROMPT),
                ],
            )
        signatures[names.SERVING_XLA] = self.function(
            serving_xla,
            [self._images_spec(batch), self._ids_spec(batch, static=True)],
        )
        return signatures

    # ------------------------------------------------------------- docs

    def signature_docs(self):
        size = f"{self.height} x {self.width} x {self.channels}"
        output = (
            f"Returns output_token_ids <int32>[B, {self.max_length}]: greedy "
            "generation with the key/value cache, column 0 the start id 0, "
            "0 after the end-of-sequence id 1."
        )
        length = self.prompt_length if self.static_prompt else "T"
        placeholder = (
            ""
            if self.model.image_token_id is None
            else f" holding the image placeholder {self.model.image_token_id}"
        )
        docs = {
            names.SERVING_DEFAULT: (
                f"images <float32>[B, {size}] (normalised), prompt_token_ids "
                f"<int32>[B, {length}]{placeholder} (at most "
                f"{self.prompt_length}, 0 = padding). {output}"
            ),
            names.SERVING_XLA: (
                f"images <float32>[{self.options.xla_batch_size}, {size}], "
                f"prompt_token_ids <int32>[{self.options.xla_batch_size}, "
                f"{self.prompt_length}] (fixed shapes, 0-padded); calls the "
                "XLA-compiled function aliased "
                f"{names.TPU_FUNCTION_ALIAS!r}. {output}"
            ),
        }
        if self.tokenizer is not None:
            docs[CAPTION] = (
                "image_bytes <string>[B] (PNG or JPEG, any size: decoded to "
                f"{self.channels} channels, scaled to [0, 1], fitted into "
                f"{size} keeping the aspect ratio with zero padding, "
                f"normalised with mean {list(self.mean)} and std "
                f"{list(self.std)}), prompt <string>[B] (SentencePiece "
                f"tokenisation in the graph; at most {self.prompt_length} "
                "ids with the end-of-sequence id, longer prompts fail) -> "
                f"output_text <string>[B], at most {self.max_length - 1} "
                "generated ids. Needs the TensorFlow Text ops in the server."
            )
        return docs

    def benchmark_case(self, batch_size, seed=0):
        signature = names.SERVING_DEFAULT
        inputs = self.example_inputs(signature, batch_size, seed)

        def keras_call(images, prompt_token_ids):
            return self.model.generate(
                images, prompt_token_ids, self.max_length
            )

        return keras_call, signature, inputs

    def example_inputs(self, signature_name, batch_size=1, seed=0):
        if signature_name not in self.signature_docs():
            raise ValueError(
                f"Unknown signature {signature_name!r}; this export has "
                f"{sorted(self.signature_docs())}"
            )
        rng = np.random.default_rng(seed)
        if signature_name == names.SERVING_XLA:
            batch_size = self.options.xla_batch_size
        shape = (batch_size, self.height, self.width, self.channels)
        pixels = rng.integers(0, 256, shape, dtype=np.uint8)
        if signature_name == CAPTION:
            encoded = [tf.io.encode_png(image).numpy() for image in pixels]
            prompts = [
                _SAMPLE_PROMPTS[i % len(_SAMPLE_PROMPTS)]
                for i in range(batch_size)
            ]
            return {
                names.IMAGE_BYTES: np.array(encoded, dtype=object),
                PROMPT: np.array(prompts, dtype=object),
            }
        length = min(8, self.prompt_length)
        if signature_name == names.SERVING_XLA or self.static_prompt:
            length = self.prompt_length
        vocab_size = self.model.language_model.vocab_size
        ids = rng.integers(EOS_ID + 1, vocab_size, (batch_size, length))
        ids = ids.astype("int32")
        if self.model.image_token_id is not None:
            ids[ids == self.model.image_token_id] = EOS_ID + 1
            ids[:, 0] = self.model.image_token_id
        ids[:, -1] = EOS_ID
        images = (pixels.astype("float32") / 255.0 - self.mean) / self.std
        return {
            names.IMAGES: images.astype("float32"),
            PROMPT_TOKEN_IDS: ids,
        }
