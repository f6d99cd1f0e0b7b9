"""PaLI-X-style vision-language model: a ViT image encoder feeding a T5.

Shape letters: B batch, M images per example, Hi, Wi, C image height,
width and channels, N visual tokens per image (the ViT's patches), Dv ViT
width, D T5 width (`model_dim`), T prompt length (placeholders included),
S encoder length, U decoder length, V vocabulary, L generation length.

The architecture of PaLI-X (Chen et al., 2023) at small scale:

    images <[B, M, Hi, Wi, C]>
      -> keras_moe ViT, no head (optionally frozen): final-norm tokens,
         class token dropped                         -> <[B, M, N, Dv]>
      -> projection Dense(D)                         -> <[B, M, N, D]>
    prompt_token_ids <int>[B, T]
      -> T5 shared embedding                         -> <[B, T, D]>
    visual and prompt tokens packed (layout below)   -> <[B, S, D]>, mask
      -> T5 encoder; T5 decoder on decoder_token_ids -> logits <[B, U, V]>

Layout of the encoder input:

* `image_token_id=None` (default): the visual tokens of images 0..M-1,
  then the prompt: `[image 0 | image 1 | ... | prompt]`, S = M*N + T.
* `image_token_id=k`: the i-th occurrence of id k in a prompt is replaced
  by the N visual tokens of image i, so images and text interleave
  ("<img> or <img>: which is larger?"), S = T + M*(N - 1). Images without
  a placeholder are not used; a placeholder past the example's images
  takes no position. `generate` and eager calls raise a ValueError when a
  prompt holds a different number of placeholders than its example has
  images.

Images whose `image_mask` entry is False (an example with fewer images than
the batch's M, or a text-only example) and prompt padding (id 0) take no
position: the real tokens of each example are packed, in order, to the
front of the S positions, and the rest is padding, masked out of the
encoder self-attention, the decoder cross-attention and MoE routing. A
text-only example (every image masked) is therefore encoded exactly as the
T5 alone encodes its prompt. The T5's relative-position bias sees the
packed positions; the ViT's own position embedding places the patches of
an image.

The MoE blocks of the three stacks are the constructor's
`vision_moe_blocks` (ViT blocks), `encoder_moe_blocks` and
`decoder_moe_blocks` (T5 blocks), declared in the class's `MOE_STACKS`;
`keras_moe.upcycle` fills them.

Token id 0 is padding and the decoder start token; id 1 is end of sequence.
"""

import keras
import tensorflow as tf
from keras import ops

from keras_moe.models.presets import PresetMixin
from keras_moe.models.t5 import EOS_ID
from keras_moe.models.t5 import PAD_ID
from keras_moe.models.t5 import T5
from keras_moe.models.t5 import decode
from keras_moe.models.t5 import decoding_options
from keras_moe.models.t5 import t5_config
from keras_moe.models.t5_layers import plain_config
from keras_moe.models.vit import ViT
from keras_moe.models.vit import vit_config
from keras_moe.utils.checks import check_int

# Keys the model sets itself in its ViT and T5 configs (the sub-models'
# MoE blocks are this model's arguments).
_VISION_RESERVED = (
    "num_classes",
    *(stack.moe_key for stack in ViT.MOE_STACKS),
    "ensemble_size",
    "name",
    "dtype",
    "trainable",
)
_TEXT_RESERVED = (
    *(stack.moe_key for stack in T5.MOE_STACKS),
    "name",
    "dtype",
    "trainable",
)
_INPUT_KEYS = (
    "images",
    "prompt_token_ids",
    "decoder_token_ids",
    "image_mask",
    "decoder_padding_mask",
)


def _sub_config(name, value, reserved):
    """A plain copy of a ViT or T5 kwargs dict, without reserved keys."""
    if not isinstance(value, dict):
        raise ValueError(
            f"{name} must be a dict of constructor kwargs; received "
            f"{type(value).__name__}"
        )
    taken = sorted(set(value) & set(reserved))
    if taken:
        raise ValueError(
            f"{name} must not set {taken}: the model sets them (MoE blocks "
            "are the vision_moe_blocks, encoder_moe_blocks and "
            "decoder_moe_blocks arguments)"
        )
    return plain_config(value)


def _strip(config, reserved):
    """A model's `get_config()` without the keys in `reserved`."""
    return {k: v for k, v in config.items() if k not in reserved}


def pack_tokens(text, text_mask, is_image, visual, image_mask):
    """Replaces image placeholders by visual tokens and packs real tokens.

    Placeholder i of an example (counting its placeholders from 0) becomes
    the N rows of `visual[:, i]` when `i < M` and `image_mask[:, i]`, and
    takes no position otherwise; a text token takes one position when
    `text_mask` holds, none otherwise. The positions taken are packed in
    order to the front of the output; the rest is zeros, masked.

    Args:
        text: <[B, T, D]> token embeddings (placeholder rows are ignored).
        text_mask: <bool>[B, T] real text tokens.
        is_image: <bool>[B, T] placeholder positions.
        visual: <[B, M, N, D]> visual tokens, M and N static.
        image_mask: <bool>[B, M] real images.

    Returns:
        (<[B, S, D]> packed tokens, <bool>[B, S] their mask), with
        S = T + M * (N - 1) (the longest packing: every placeholder with
        an image of its own).
    """
    num_images, num_tokens = visual.shape[1], visual.shape[2]
    dim = visual.shape[3]
    batch, length = ops.shape(text)[0], ops.shape(text)[1]
    is_image = ops.cast(is_image, "bool")
    image_mask = ops.cast(image_mask, "bool")
    flags = ops.cast(is_image, "int32")
    # Index of each placeholder among its example's placeholders.
    image_index = ops.cumsum(flags, axis=1) - flags  # (B, T)
    slot = ops.minimum(image_index, num_images - 1)
    has_image = ops.logical_and(
        ops.take_along_axis(image_mask, slot, axis=1),
        image_index < num_images,
    )
    sizes = ops.where(
        is_image,
        ops.cast(has_image, "int32") * num_tokens,
        ops.cast(ops.cast(text_mask, "bool"), "int32"),
    )
    ends = ops.cumsum(sizes, axis=1)  # (B, T)
    starts = ends - sizes
    out_length = length + num_images * (num_tokens - 1)
    positions = ops.arange(out_length, dtype="int32")
    # Output position p comes from the first token that ends after p:
    # (B, 1, T) <= (1, S, 1) -> (B, S, T) -> (B, S).
    source = ops.sum(
        ops.cast(ends[:, None, :] <= positions[None, :, None], "int32"),
        axis=-1,
    )
    mask = source < length
    source = ops.minimum(source, length - 1)
    offset = positions[None, :] - ops.take_along_axis(starts, source, axis=1)
    from_image = ops.take_along_axis(is_image, source, axis=1)
    row = ops.take_along_axis(slot, source, axis=1) * num_tokens + ops.clip(
        offset, 0, num_tokens - 1
    )
    # (B, M, N, D) -> (B, M*N, D)
    visual = ops.reshape(visual, (batch, num_images * num_tokens, dim))
    image_rows = ops.take_along_axis(visual, row[:, :, None], axis=1)
    text_rows = ops.take_along_axis(text, source[:, :, None], axis=1)
    packed = ops.where(from_image[:, :, None], image_rows, text_rows)
    packed = packed * ops.cast(mask, packed.dtype)[:, :, None]
    return packed, mask


@keras.saving.register_keras_serializable(package="keras_moe")
class VisionLanguageModel(PresetMixin, keras.Model):
    """ViT image encoder, projection and T5 encoder-decoder (see module).

    Call with a dict: `images` <float>[B, Hi, Wi, C] (one image per
    example) or <float>[B, M, Hi, Wi, C], normalised as the ViT takes them;
    `prompt_token_ids` <int>[B, T] (0 = padding; with `image_token_id`,
    placeholders where images go); `decoder_token_ids` <int>[B, U] (the
    targets shifted right, starting with the decoder start id 0); and
    optionally `image_mask` <bool>[B, M] (default: every image is real)
    and `decoder_padding_mask` <bool>[B, U]. Returns <float32>[B, U, V]
    logits.

    Several images per example: with `image_token_id=k`, a prompt holds
    one id k per real image of its example, and the i-th k (counting from
    the prompt's start) is replaced by the N visual tokens of image i
    (`images[:, i]`), so `[k, k, 5, 6, 1]` with two images encodes as
    `[image 0 (N rows) | image 1 (N rows) | 5 | 6 | 1]` and `[5, k, 6, k,
    1]` as `[5 | image 0 | 6 | image 1 | 1]`. Examples with fewer images
    than the batch's M mask the unused slots (`image_mask` False) and hold
    fewer placeholders. Eager calls, `embed_inputs`, `encode` and
    `generate` raise a ValueError naming the example and both counts when
    a prompt's placeholders and its real images differ in number.
    `with_image_size` makes a copy for another image size (PaLI-X's
    higher-resolution stage).

    Sub-models: `vision_encoder` (a `ViT` without head), `projection` (a
    `Dense` <[Dv, D]> with bias) and `language_model` (a `T5`).
    `canonical_variables()` names the ViT's weights `vision/...` (its
    `encoder/` prefix dropped: `vision/block_0/mlp/wi`), the projection's
    `projection/kernel` and `projection/bias`, and the T5's by their own
    names. `save_to_preset` writes the model, weights included, and
    `VisionLanguageModel.from_preset` loads it back.

    Args:
        vision_config: `ViT` kwargs (image_size, patch_size, model_dim,
            ...), without num_classes (the encoder has no head),
            encoder_moe_blocks and ensemble_size.
        text_config: `T5` kwargs, without encoder_moe_blocks and
            decoder_moe_blocks.
        image_token_id: None for the prefix layout, or the placeholder id
            (in [2, vocab_size)) whose occurrences images replace.
        max_prompt_length: the longest `prompt_token_ids` (placeholders
            included) the model takes.
        freeze_vision: the ViT's weights are not trained.
        vision_moe_blocks: None or {ViT block index: MoeLayer kwargs}.
        encoder_moe_blocks, decoder_moe_blocks: None or {T5 block index:
            MoeLayer kwargs}.
        **kwargs: passed to `keras.Model` (name, dtype).

    Example:

    >>> model = VisionLanguageModel.from_architectures("vit_tiny", "t5_tiny")
    >>> logits = model({
    ...     "images": keras.ops.zeros((2, 32, 32, 3)),
    ...     "prompt_token_ids": keras.ops.array([[5, 6, 1], [7, 1, 0]]),
    ...     "decoder_token_ids": keras.ops.array([[0, 9], [0, 4]]),
    ... })
    >>> tuple(logits.shape)
    (2, 2, 128)
    >>> tuple(model.generate(
    ...     keras.ops.zeros((2, 32, 32, 3)),
    ...     keras.ops.array([[5, 6, 1], [7, 1, 0]]), max_length=4).shape)
    (2, 4)
    """

    # The ViT's stack, then the T5's (see `MoeStack`): their MoE blocks are
    # this model's arguments, their block counts in the sub-configs.
    MOE_STACKS = (
        ViT.MOE_STACKS[0].within(
            "vision_encoder",
            "vision_config",
            name="vision",
            moe_key="vision_moe_blocks",
        ),
        *(
            stack.within("language_model", "text_config")
            for stack in T5.MOE_STACKS
        ),
    )

    def __init__(
        self,
        vision_config,
        text_config,
        image_token_id=None,
        max_prompt_length=64,
        freeze_vision=False,
        vision_moe_blocks=None,
        encoder_moe_blocks=None,
        decoder_moe_blocks=None,
        **kwargs,
    ):
        vision_config = _sub_config(
            "vision_config", vision_config, _VISION_RESERVED
        )
        text_config = _sub_config("text_config", text_config, _TEXT_RESERVED)
        if image_token_id is not None:
            check_int("image_token_id", image_token_id, minimum=EOS_ID + 1)
        check_int("max_prompt_length", max_prompt_length)
        if not isinstance(freeze_vision, bool):
            raise ValueError(
                f"freeze_vision must be a bool; received {freeze_vision!r}"
            )
        kwargs.setdefault("name", "vision_language_model")
        super().__init__(**kwargs)
        self.vision_config = vision_config
        self.text_config = text_config
        self.image_token_id = image_token_id
        self.max_prompt_length = max_prompt_length
        self.freeze_vision = freeze_vision

        self.vision_encoder = ViT(
            **vision_config,
            num_classes=0,
            encoder_moe_blocks=vision_moe_blocks,
            dtype=self.dtype_policy,
            name="vision_encoder",
        )
        self.language_model = T5(
            **text_config,
            encoder_moe_blocks=encoder_moe_blocks,
            decoder_moe_blocks=decoder_moe_blocks,
            dtype=self.dtype_policy,
            name="language_model",
        )
        vocab_size = self.language_model.vocab_size
        if image_token_id is not None and image_token_id >= vocab_size:
            raise ValueError(
                f"image_token_id must be in [{EOS_ID + 1}, {vocab_size}) "
                f"(vocab_size); received {image_token_id}"
            )
        self.projection = keras.layers.Dense(
            self.language_model.model_dim,
            dtype=self.dtype_policy,
            name="projection",
        )
        self.vision_encoder.trainable = not freeze_vision
        self._generate_function = None
        self.build()

    def build(self, input_shape=None):
        del input_shape  # The shapes follow from the config.
        self.projection.build((None, None, self.vision_encoder.model_dim))
        self.built = True

    @property
    def num_image_tokens(self):
        """N, the visual tokens of one image."""
        return self.vision_encoder.num_patches

    @property
    def image_shape(self):
        """(Hi, Wi, C) of the images the vision encoder takes."""
        return (*self.vision_encoder.image_hw, self.vision_encoder.num_channels)

    @classmethod
    def from_architectures(cls, vision_name, text_name, **kwargs):
        """A randomly initialised model from a ViT and a T5 architecture
        name (see `vit_config` and `t5_config`); `from_preset` loads a
        saved one, weights included.

        Example:

        >>> VisionLanguageModel.from_architectures(
        ...     "vit_tiny", "t5_tiny").num_image_tokens
        16
        """
        vision = _strip(vit_config(vision_name), _VISION_RESERVED)
        return cls(vision, t5_config(text_name), **kwargs)

    @classmethod
    def from_models(cls, vit, t5, **kwargs):
        """A model whose ViT and T5 are copies of `vit` and `t5`.

        Every weight of `vit` but its head, and every weight of `t5`, is
        copied exactly (MoE blocks included: their kwargs become
        `vision_moe_blocks`, `encoder_moe_blocks` and
        `decoder_moe_blocks`); the projection is freshly initialised.

        Args:
            vit: a keras_moe `ViT` (ensemble_size 1).
            t5: a keras_moe `T5`.
            **kwargs: other constructor arguments (image_token_id,
                max_prompt_length, freeze_vision, name, dtype).
        """
        if not isinstance(vit, ViT):
            raise ValueError(
                f"vit must be a keras_moe ViT; received {type(vit).__name__}"
            )
        if not isinstance(t5, T5):
            raise ValueError(
                f"t5 must be a keras_moe T5; received {type(t5).__name__}"
            )
        if vit.ensemble_size != 1:
            raise ValueError(
                "The vision encoder cannot be an E^3 ensemble; received a ViT "
                f"with ensemble_size={vit.ensemble_size}"
            )
        taken = sorted({s.moe_key for s in cls.MOE_STACKS} & set(kwargs))
        if taken:
            raise ValueError(
                f"from_models takes the MoE blocks from the models; do not "
                f"pass {taken}"
            )
        vit_kwargs = vit.get_config()
        t5_kwargs = t5.get_config()
        model = cls(
            _strip(vit_kwargs, _VISION_RESERVED),
            _strip(t5_kwargs, _TEXT_RESERVED),
            vision_moe_blocks=vit_kwargs["encoder_moe_blocks"],
            encoder_moe_blocks=t5_kwargs["encoder_moe_blocks"],
            decoder_moe_blocks=t5_kwargs["decoder_moe_blocks"],
            **kwargs,
        )
        sources = vit.canonical_variables()
        for (
            name,
            variable,
        ) in model.vision_encoder.canonical_variables().items():
            variable.assign(sources[name])
        sources = t5.canonical_variables()
        for (
            name,
            variable,
        ) in model.language_model.canonical_variables().items():
            variable.assign(sources[name])
        return model

    @classmethod
    def with_image_size(cls, model, image_size, freeze_vision=None):
        """A copy of `model` whose ViT takes images of `image_size`.

        The second stage of PaLI-X's recipe: the same model at a higher
        resolution, more visual tokens per image. The ViT is
        `ViT.with_image_size` of `model.vision_encoder` (its position
        embedding resampled to the new patch grid by
        `interpolate_position_embedding`, every other weight copied); the
        projection and the T5 are copied unchanged.

        Args:
            model: a `VisionLanguageModel`.
            image_size: int or (height, width), multiples of the patch size.
            freeze_vision: None keeps `model.freeze_vision`; a bool sets it.

        Example:

        >>> model = VisionLanguageModel.from_architectures(
        ...     "vit_tiny", "t5_tiny")
        >>> VisionLanguageModel.with_image_size(model, 64).num_image_tokens
        64
        """
        if not isinstance(model, VisionLanguageModel):
            raise ValueError(
                "model must be a VisionLanguageModel; received "
                f"{type(model).__name__}"
            )
        vit = ViT.with_image_size(model.vision_encoder, image_size)
        config = model.get_config()
        config["vision_config"] = _strip(vit.get_config(), _VISION_RESERVED)
        if freeze_vision is not None:
            config["freeze_vision"] = freeze_vision
        new = cls.from_config(config)
        for target, source in (
            (new.vision_encoder, vit),
            (new.language_model, model.language_model),
        ):
            sources = source.canonical_variables()
            for name, variable in target.canonical_variables().items():
                variable.assign(sources[name])
        new.projection.kernel.assign(model.projection.kernel)
        new.projection.bias.assign(model.projection.bias)
        return new

    # ------------------------------------------------------------- inputs

    def _check_images(self, images):
        """<[B, Hi, Wi, C]> or <[B, M, Hi, Wi, C]> -> <[B, M, Hi, Wi, C]>."""
        images = ops.convert_to_tensor(images)
        shape = tuple(images.shape)
        want = self.image_shape
        if len(shape) == 4:
            images = images[:, None]
        if len(images.shape) != 5 or any(
            got is not None and got != expected
            for got, expected in zip(images.shape[2:], want)
        ):
            raise ValueError(
                "images must have shape [B, {0}, {1}, {2}] or [B, M, {0}, "
                "{1}, {2}] (the vision encoder's image size); received "
                "{3}".format(*want, shape)
            )
        if images.shape[1] == 0:
            raise ValueError(
                "images must hold at least one image per example (M >= 1); "
                "for text-only examples pass an image_mask of False"
            )
        return images

    def _check_prompt(self, prompt_token_ids):
        ids = ops.convert_to_tensor(prompt_token_ids)
        if len(ids.shape) != 2:
            raise ValueError(
                "prompt_token_ids must have rank 2 <[batch, length]>; "
                f"received shape {tuple(ids.shape)}"
            )
        dtype = keras.backend.standardize_dtype(ids.dtype)
        if "int" not in dtype:
            raise ValueError(
                f"prompt_token_ids must be integer token ids; received {dtype}"
            )
        length = ids.shape[1]
        if length is not None and length > self.max_prompt_length:
            raise ValueError(
                f"The prompt has {length} tokens; this model takes at most "
                f"max_prompt_length={self.max_prompt_length}"
            )
        return ops.cast(ids, "int32")

    def _check_inputs(self, images, prompt_token_ids, image_mask):
        """Validated (images <[B, M, ...]>, ids <int32>, mask <bool>[B, M])."""
        images = self._check_images(images)
        ids = self._check_prompt(prompt_token_ids)
        batches = {images.shape[0], ids.shape[0]} - {None}
        if len(batches) > 1:
            raise ValueError(
                f"images ({images.shape[0]}) and prompt_token_ids "
                f"({ids.shape[0]}) have different batch sizes"
            )
        num_images = images.shape[1]
        if image_mask is None:
            image_mask = ops.ones(ops.shape(images)[:2], dtype="bool")
        image_mask = ops.convert_to_tensor(image_mask)
        if len(image_mask.shape) != 2 or image_mask.shape[1] not in (
            None,
            num_images,
        ):
            raise ValueError(
                f"image_mask must have shape [B, M] = [B, {num_images}]; "
                f"received {tuple(image_mask.shape)}"
            )
        image_mask = ops.cast(image_mask, "bool")
        if self.image_token_id is not None and tf.executing_eagerly():
            self._check_placeholders(ids, image_mask)
        return images, ids, image_mask

    def _check_placeholders(self, ids, image_mask):
        """Placeholders per prompt must equal real images per example."""
        placeholders = ops.convert_to_numpy(
            ops.sum(ops.cast(ids == self.image_token_id, "int32"), axis=1)
        )
        images = ops.convert_to_numpy(
            ops.sum(ops.cast(image_mask, "int32"), axis=1)
        )
        bad = [
            (i, int(p), int(n))
            for i, (p, n) in enumerate(zip(placeholders, images))
            if p != n
        ]
        if bad:
            example, found, real = bad[0]
            raise ValueError(
                f"Each prompt must hold one image_token_id="
                f"{self.image_token_id} per real image: example {example} "
                f"has {found} placeholder(s) and {real} image(s); (example, "
                f"placeholders, images): {bad[:5]}"
            )

    def _inputs(self, inputs):
        if not isinstance(inputs, dict):
            raise ValueError(
                "VisionLanguageModel expects a dict with 'images', "
                "'prompt_token_ids' and 'decoder_token_ids'; received "
                f"{type(inputs).__name__}"
            )
        required = {"images", "prompt_token_ids", "decoder_token_ids"}
        unknown = sorted(set(inputs) - set(_INPUT_KEYS))
        missing = sorted(required - set(inputs))
        if unknown or missing:
            raise ValueError(
                f"VisionLanguageModel inputs: missing {missing}, unknown "
                f"{unknown}; expected keys {list(_INPUT_KEYS)}"
            )
        return inputs

    # ------------------------------------------------------------ encoder

    def visual_tokens(self, images, training=False):
        """Images <[B, M, Hi, Wi, C]> (or <[B, Hi, Wi, C]>, M = 1) ->
        projected visual tokens <[B, M, N, D]>."""
        images = self._check_images(images)
        batch, count = ops.shape(images)[0], ops.shape(images)[1]
        # (B, M, Hi, Wi, C) -> (B*M, Hi, Wi, C)
        flat = ops.reshape(images, (-1, *self.image_shape))
        tokens = self.vision_encoder.encode(
            flat, training=training and not self.freeze_vision
        )
        if self.vision_encoder.pooling == "token":
            tokens = tokens[:, 1:]  # the class token is not a patch
        tokens = self.projection(tokens)
        # (B*M, N, D) -> (B, M, N, D)
        return ops.reshape(
            tokens,
            (
                batch,
                count,
                self.num_image_tokens,
                self.language_model.model_dim,
            ),
        )

    def _embed(self, images, ids, image_mask, training=False):
        visual = self.visual_tokens(images, training=training)
        text = self.language_model.shared(ids)
        text_mask = ids != PAD_ID
        if self.image_token_id is None:
            # Prefix layout: M placeholder rows before the prompt.
            num_images = visual.shape[1]
            batch = ops.shape(ids)[0]
            text = ops.concatenate(
                [
                    ops.zeros((batch, num_images, text.shape[-1]), text.dtype),
                    text,
                ],
                axis=1,
            )
            is_image = ops.concatenate(
                [
                    ops.ones((batch, num_images), "bool"),
                    ops.zeros(ops.shape(ids), "bool"),
                ],
                axis=1,
            )
            text_mask = ops.concatenate(
                [is_image[:, :num_images], text_mask], 1
            )
        else:
            is_image = ids == self.image_token_id
        return pack_tokens(
            text, text_mask, is_image, ops.cast(visual, text.dtype), image_mask
        )

    def embed_inputs(self, images, prompt_token_ids, image_mask=None):
        """The T5 encoder's input: (<[B, S, D]> tokens, <bool>[B, S] mask).

        See the module docstring for the layout.
        """
        images, ids, image_mask = self._check_inputs(
            images, prompt_token_ids, image_mask
        )
        return self._embed(images, ids, image_mask)

    def _encode(self, images, ids, image_mask, training=False):
        tokens, mask = self._embed(images, ids, image_mask, training=training)
        encoded = self.language_model.encoder(
            tokens, padding_mask=mask, training=training
        )
        return encoded, mask

    def encode(self, images, prompt_token_ids, image_mask=None):
        """T5 encoder outputs <[B, S, D]> and their mask <bool>[B, S]."""
        images, ids, image_mask = self._check_inputs(
            images, prompt_token_ids, image_mask
        )
        return self._encode(images, ids, image_mask)

    # --------------------------------------------------------------- call

    def call(self, inputs, training=False):
        inputs = self._inputs(inputs)
        images, ids, image_mask = self._check_inputs(
            inputs["images"],
            inputs["prompt_token_ids"],
            inputs.get("image_mask"),
        )
        decoder_ids = ops.convert_to_tensor(inputs["decoder_token_ids"])
        dtype = keras.backend.standardize_dtype(decoder_ids.dtype)
        if len(decoder_ids.shape) != 2 or "int" not in dtype:
            raise ValueError(
                "decoder_token_ids must be integer token ids of rank 2 "
                f"<[batch, length]>; received {dtype} of shape "
                f"{tuple(decoder_ids.shape)}"
            )
        decoder_mask = inputs.get("decoder_padding_mask")
        if decoder_mask is None:
            decoder_mask = ops.ones(ops.shape(decoder_ids), dtype="bool")
        encoded, encoder_mask = self._encode(
            images, ids, image_mask, training=training
        )
        lm = self.language_model
        hidden = lm.decoder(
            lm.shared(decoder_ids),
            padding_mask=ops.cast(decoder_mask, "bool"),
            context=encoded,
            context_padding_mask=encoder_mask,
            training=training,
        )
        return lm.logits(hidden)

    # --------------------------------------------------------- generation

    def generate(
        self,
        images,
        prompt_token_ids,
        max_length,
        image_mask=None,
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
        """Greedy decoding, beam search or sampling with the T5's caches.

        As `T5.generate`: every sequence starts with the decoder start id 0
        and grows until `max_length` tokens (start included) or until every
        sequence has ended (end-of-sequence id 1); positions after a
        sequence's end are 0. Greedy by default; beam search with
        `num_beams` > 1; sampling with `do_sample=True` (the options as in
        `T5.generate`). One `tf.function` (traced once per input shape,
        `max_length`, `num_beams`, `early_stopping` and `do_sample`): the
        encoder runs once, the cross-attention keys and values are computed
        once (for beam search, once per beam).

        Args:
            images: <float>[B, Hi, Wi, C] or <float>[B, M, Hi, Wi, C].
            prompt_token_ids: <int>[B, T].
            max_length: L >= 1.
            image_mask: <bool>[B, M]; default all True.
            num_beams, length_penalty, early_stopping: beam search, see
                `T5.generate`.
            do_sample, top_k, top_p, temperature, seed: sampling, see
                `T5.generate`.

        Returns:
            <int32>[B, L] token ids, column 0 the start id.

        Example:

        >>> model = VisionLanguageModel.from_architectures(
        ...     "vit_tiny", "t5_tiny")
        >>> images = keras.ops.zeros((1, 32, 32, 3))
        >>> prompt = keras.ops.array([[5, 6, 1]])
        >>> tuple(model.generate(images, prompt, 5, num_beams=3).shape)
        (1, 5)
        >>> tuple(model.generate(
        ...     images, prompt, 5, do_sample=True, top_p=0.9, seed=0).shape)
        (1, 5)
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
        images, ids, image_mask = self._check_inputs(
            images, prompt_token_ids, image_mask
        )
        if self._generate_function is None:
            self._generate_function = tf.function(self._search)
        tokens = self._generate_function(
            images, ids, image_mask, max_length, decoding.function_arguments()
        )
        # MoE layers called inside the traced loop leave graph tensors as
        # their auxiliary losses; they mean nothing outside it.
        self._clear_losses()
        return tokens

    def _search(self, images, ids, image_mask, max_length, decoding):
        encoded, encoder_mask = self._encode(images, ids, image_mask)
        return decode(
            self.language_model, encoded, encoder_mask, max_length, decoding
        )

    # ------------------------------------------------------------ weights

    def canonical_variables(self):
        """Canonical name -> variable (see the class docstring)."""
        names = {}
        for name, variable in self.vision_encoder.canonical_variables().items():
            name = name.removeprefix("encoder/")
            names[f"vision/{name}"] = variable
        names["projection/kernel"] = self.projection.kernel
        names["projection/bias"] = self.projection.bias
        names.update(self.language_model.canonical_variables())
        return names

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "vision_config": plain_config(self.vision_config),
                "text_config": plain_config(self.text_config),
                "image_token_id": self.image_token_id,
                "max_prompt_length": self.max_prompt_length,
                "freeze_vision": self.freeze_vision,
                "vision_moe_blocks": plain_config(
                    self.vision_encoder.encoder_moe_blocks
                )
                or None,
                "encoder_moe_blocks": plain_config(
                    self.language_model.encoder_moe_blocks
                ),
                "decoder_moe_blocks": plain_config(
                    self.language_model.decoder_moe_blocks
                ),
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        return cls(**config)
