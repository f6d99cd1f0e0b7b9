"""Serving signatures of image classifiers (`keras_moe.models.ViT`).

Shape letters: B batch, H and W image height and width (the model's
`image_hw`), C channels, K `top_k`, N classes.

Signatures (inputs and outputs by name):

    serving_default          images <image_dtype>[B, h, w, C]
    predict_images_uint8     images <uint8>[B, h, w, C]
    predict_images_float32   images <float32>[B, h, w, C]
    predict_image_bytes      image_bytes <string>[B]  (encoded JPEG or PNG)
    serving_xla              images <image_dtype>[xla_batch_size, H, W, C]

        -> probabilities        <float32>[B, N]  softmax of the logits
           top_k_class_ids      <int32>[B, K]    classes by probability
           top_k_probabilities  <float32>[B, K]

Preprocessing, in the graph: uint8 pixels (and decoded image bytes) are
scaled to [0, 1] and normalised with the export's `image_mean` and
`image_std`; float32 images are taken as the Keras model takes them (already
normalised). Images whose size is not H x W are resized to it with
`tf.image.resize` (bilinear, half-pixel centres, no antialiasing); the
documented size, stored in the export metadata, needs no resize. Encoded
images may differ in size within a batch; image arrays cannot.

Capacity: a MoE block's eval capacity factor is fixed at export. With no
capacity limit (the default, `eval_capacity_factor=None`) no token is ever
dropped and each image's outputs are independent of the other images in the
batch. With a finite factor an expert takes at most C tokens of a group: a
token past capacity skips that expert (only the residual carries it), and
when `group_size` makes groups span several images, an image's outputs
depend on the batch it is served in (TF Serving's request batching
included).
"""

import numpy as np
import tensorflow as tf

from keras_moe.models.vit import ViT

from . import signature_names as names
from .adapters import ServingAdapter
from .adapters import register_adapter

_OUTPUT_DOC = (
    "Returns probabilities <float32>[B, N], top_k_class_ids <int32>[B, K] "
    "and top_k_probabilities <float32>[B, K]."
)


@register_adapter(ViT)
class VitAdapter(ServingAdapter):
    """Image-classifier signatures for `ViT` (see the module docstring)."""

    def __init__(self, model, options):
        super().__init__(model, options)
        if not model.num_classes:
            raise ValueError(
                "Only ViT classifiers can be exported for serving; this "
                "model has num_classes=0 (no head)"
            )
        self.height, self.width = model.image_hw
        self.channels = model.num_channels
        self.top_k = min(options.top_k, model.num_classes)
        self.mean = _per_channel(
            options.image_mean, "image_mean", self.channels
        )
        self.std = _per_channel(options.image_std, "image_std", self.channels)

    def _spec(self, dtype, batch=None, height=None, width=None):
        return tf.TensorSpec(
            (batch, height, width, self.channels), dtype, name=names.IMAGES
        )

    def _normalise_pixels(self, images):
        """uint8 pixels <[..., C]> -> normalised float32."""
        scaled = tf.cast(images, tf.float32) / 255.0
        return (scaled - tf.constant(self.mean)) / tf.constant(self.std)

    def _resize(self, images):
        """<float32>[B, h, w, C] -> <float32>[B, H, W, C]."""
        size = (self.height, self.width)
        static = tuple(images.shape[1:3])
        if None not in static:
            return images if static == size else tf.image.resize(images, size)
        same = tf.reduce_all(tf.equal(tf.shape(images)[1:3], size))
        images = tf.cond(
            same, lambda: images, lambda: tf.image.resize(images, size)
        )
        return tf.ensure_shape(images, (None, *size, self.channels))

    def _prepare(self, images):
        """Images of either dtype -> model inputs <float32>[B, H, W, C]."""
        if images.dtype == tf.uint8:
            images = self._normalise_pixels(images)
        return self._resize(tf.cast(images, tf.float32))

    def _decode(self, image_bytes):
        """<string>[B] encoded images -> model inputs <float32>[B, H, W, C]."""

        def decode_one(data):
            image = tf.io.decode_image(
                data, channels=self.channels, expand_animations=False
            )
            image = tf.ensure_shape(image, (None, None, self.channels))
            return self._resize(self._normalise_pixels(image)[None])[0]

        return tf.map_fn(
            decode_one,
            image_bytes,
            fn_output_signature=tf.TensorSpec(
                (self.height, self.width, self.channels), tf.float32
            ),
        )

    def _classify(self, images):
        """Model inputs <float32>[B, H, W, C] -> the named outputs."""
        logits = self.call_model(self.model, images)
        probabilities = tf.nn.softmax(tf.cast(logits, tf.float32), axis=-1)
        top_probabilities, top_ids = tf.math.top_k(probabilities, self.top_k)
        return {
            names.PROBABILITIES: probabilities,
            names.TOP_K_CLASS_IDS: tf.cast(top_ids, tf.int32),
            names.TOP_K_PROBABILITIES: top_probabilities,
        }

    def _build_xla_function(self):
        def tpu_func(images):
            return self._classify(images)

        return self.function(
            tpu_func,
            [
                self._spec(
                    tf.float32,
                    self.options.xla_batch_size,
                    self.height,
                    self.width,
                )
            ],
            jit_compile=True,
        )

    def _build_signatures(self):
        def predict_images(images):
            return self._classify(self._prepare(images))

        def predict_image_bytes(image_bytes):
            return self._classify(self._decode(image_bytes))

        xla_function = self.xla_function()

        def serving_xla(images):
            return xla_function(self._prepare(images))

        by_dtype = {
            dtype: self.function(predict_images, [self._spec(dtype)])
            for dtype in (tf.uint8, tf.float32)
        }
        default_dtype = tf.as_dtype(self.options.image_dtype)
        return {
            names.SERVING_DEFAULT: by_dtype[default_dtype],
            names.PREDICT_IMAGES_UINT8: by_dtype[tf.uint8],
            names.PREDICT_IMAGES_FLOAT32: by_dtype[tf.float32],
            names.PREDICT_IMAGE_BYTES: self.function(
                predict_image_bytes,
                [tf.TensorSpec((None,), tf.string, name=names.IMAGE_BYTES)],
            ),
            names.SERVING_XLA: self.function(
                serving_xla,
                [
                    self._spec(
                        default_dtype,
                        self.options.xla_batch_size,
                        self.height,
                        self.width,
                    )
                ],
            ),
        }

    def signature_docs(self):
        size = f"{self.height} x {self.width} x {self.channels}"
        images = (
            f"images [B, h, w, {self.channels}]; the model's size is {size}, "
            "other sizes are resized in the graph (bilinear). "
        )
        pixels = (
            "uint8 pixels are scaled to [0, 1] and normalised with mean "
            f"{list(self.mean)} and std {list(self.std)}. "
        )
        return {
            names.SERVING_DEFAULT: (
                f"{self.options.image_dtype} {images}"
                + (pixels if self.options.image_dtype == "uint8" else "")
                + _OUTPUT_DOC
            ),
            names.PREDICT_IMAGES_UINT8: f"uint8 {images}{pixels}{_OUTPUT_DOC}",
            names.PREDICT_IMAGES_FLOAT32: (
                f"float32 {images}Already normalised. {_OUTPUT_DOC}"
            ),
            names.PREDICT_IMAGE_BYTES: (
                "image_bytes <string>[B]: encoded JPEG or PNG images of any "
                f"size, decoded to {self.channels} channels, resized to "
                f"{size}; {pixels}{_OUTPUT_DOC}"
            ),
            names.SERVING_XLA: (
                f"{self.options.image_dtype} images "
                f"[{self.options.xla_batch_size}, {size.replace(' x ', ', ')}]"
                " (fixed shape); calls the XLA-compiled function aliased "
                f"{names.TPU_FUNCTION_ALIAS!r}. {_OUTPUT_DOC}"
            ),
        }

    def benchmark_case(self, batch_size, seed=0):
        signature = names.PREDICT_IMAGES_FLOAT32
        inputs = self.example_inputs(signature, batch_size, seed)

        def keras_call(images):
            return self.model(images, training=False)

        return keras_call, signature, inputs

    def example_inputs(self, signature_name, batch_size=1, seed=0):
        if signature_name not in self.signature_docs():
            raise ValueError(
                f"Unknown signature {signature_name!r}; this export has "
                f"{sorted(self.signatures())}"
            )
        rng = np.random.default_rng(seed)
        if signature_name == names.SERVING_XLA:
            batch_size = self.options.xla_batch_size
        shape = (batch_size, self.height, self.width, self.channels)
        pixels = rng.integers(0, 256, shape, dtype=np.uint8)
        if signature_name == names.PREDICT_IMAGE_BYTES:
            encoded = [tf.io.encode_png(image).numpy() for image in pixels]
            return {names.IMAGE_BYTES: np.array(encoded, dtype=object)}
        dtype = {
            names.PREDICT_IMAGES_UINT8: "uint8",
            names.PREDICT_IMAGES_FLOAT32: "float32",
        }.get(signature_name, self.options.image_dtype)
        if dtype == "uint8":
            return {names.IMAGES: pixels}
        return {names.IMAGES: pixels.astype("float32") / 255.0}


def _per_channel(values, name, channels):
    """One value or one per channel -> a tuple of C floats."""
    values = tuple(values)
    if len(values) == 1:
        values = values * channels
    if len(values) != channels:
        raise ValueError(
            f"{name} needs 1 or {channels} values (one per channel); "
            f"received {len(values)}"
        )
    return tuple(float(v) for v in values)
