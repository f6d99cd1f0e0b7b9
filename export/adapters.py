"""Serving adapters: what a SavedModel of each model class exports.

The export code (`export.saved_model`) knows no model type. It looks the
model's class up in a registry of adapters; an adapter builds that model's
serving functions:

* named signatures, each a traced `tf.function` returning a dict of named
  outputs; `serving_default` and `serving_xla` are required;
* `xla_function()`: the computation `serving_xla` calls, a
  `tf.function(jit_compile=True)` with static shapes. It is exported under
  the alias `tpu_func` (`tf.saved_model.SaveOptions(function_aliases=...)`),
  which TPU inference converters use to find the function to compile for the
  TPU; the signature around it keeps the pre- and post-processing on CPU;
* `resources()`: trackables the functions use besides the model (a
  tokenizer), saved with it.

Where a model's MoE blocks are is not the adapter's business: the exporter
rebuilds the model with another eval capacity factor through
`keras_moe.models.with_eval_capacity_factor`, which reads the `MOE_STACKS`
the model class declares.

A new model type (E^3, a vision-language model) plugs in with a subclass and
one decorator; nothing else in export/ changes:

    @register_adapter(EnsembleViT)
    class EnsembleViTAdapter(VitAdapter):
        def signature_docs(self):
            docs = super().signature_docs()
            docs["serving_default"] += " Averages the ensemble members."
            return docs

Lookup follows the model class's MRO, so a subclass of a registered model
class gets its parent's adapter unless it registers its own.

Model calls run inside `keras.StatelessScope()`: the routing statistics and
auxiliary losses a `MoeLayer` records in `call` are dropped, so a serving
graph reads variables and never assigns them (concurrent requests share no
mutable state).
"""

import dataclasses

import keras
import tensorflow as tf

from keras_moe.utils.checks import check_int

_ADAPTERS = {}

IMAGE_DTYPES = ("uint8", "float32")


@dataclasses.dataclass(frozen=True)
class ServingOptions:
    """Export-time choices of the serving signatures.

    Each adapter reads the fields of its model type and ignores the others.

    Attributes:
        top_k: image classifiers: classes returned in `top_k_class_ids`
            (capped at the number of classes).
        image_dtype: image classifiers: dtype of `serving_default` and
            `serving_xla` images, "float32" (already normalised, as the
            Keras model takes them) or "uint8" (pixels 0..255).
        image_mean, image_std: image classifiers: uint8 and encoded images
            are scaled to [0, 1], then normalised per channel as
            `(x - mean) / std` (one value, or one per channel). Float
            images are not normalised.
        max_length: text models: L, length of the generated sequences
            (start id included, as `T5.generate`).
        max_input_length: text models: longest tokenised input of the text
            signature (longer inputs are truncated, end-of-sequence id kept),
            and the input length of `serving_xla`.
        sentencepiece_model: text models: serialized SentencePiece model
            (bytes) for the text signature; None exports no text signature.
        xla_batch_size: the fixed batch size of `serving_xla`.
        num_beams: text models: > 1 adds a `generate_beam_search`
            signature (beam search with that many beams; the beam count
            shapes the traced program, so it is fixed at export).
        length_penalty: text models: the beam search's length penalty
            (Hugging Face's convention, see `T5.generate`).
    """

    top_k: int = 5
    image_dtype: str = "float32"
    image_mean: tuple = (0.0,)
    image_std: tuple = (1.0,)
    max_length: int = 32
    max_input_length: int = 512
    sentencepiece_model: bytes | None = None
    xla_batch_size: int = 8
    num_beams: int = 1
    length_penalty: float = 1.0

    def __post_init__(self):
        for name in ("top_k", "max_length", "xla_batch_size", "num_beams"):
            check_int(name, getattr(self, name), 1)
        if isinstance(self.length_penalty, bool) or not isinstance(
            self.length_penalty, (int, float)
        ):
            raise ValueError(
                "length_penalty must be a number; received "
                f"{self.length_penalty!r}"
            )
        check_int("max_input_length", self.max_input_length, 2)
        if self.image_dtype not in IMAGE_DTYPES:
            raise ValueError(
                f"image_dtype must be one of {IMAGE_DTYPES}; received "
                f"{self.image_dtype!r}"
            )
        for name in ("image_mean", "image_std"):
            value = tuple(float(v) for v in getattr(self, name))
            if not value:
                raise ValueError(f"{name} must not be empty")
            object.__setattr__(self, name, value)
        if not all(std > 0 for std in self.image_std):
            raise ValueError(
                f"image_std values must be > 0; received {self.image_std}"
            )
        if self.sentencepiece_model is not None and not isinstance(
            self.sentencepiece_model, bytes
        ):
            raise ValueError(
                "sentencepiece_model must be the serialized model (bytes); "
                f"received {type(self.sentencepiece_model).__name__}"
            )

    def describe(self):
        """The options as JSON-friendly values (the model as its size)."""
        values = dataclasses.asdict(self)
        model = values.pop("sentencepiece_model")
        values["sentencepiece_model_bytes"] = (
            None if model is None else len(model)
        )
        return values


class ServingAdapter:
    """Builds the serving functions of one model class.

    Subclasses implement `_build_signatures`, `_build_xla_function` and
    `example_inputs`, and may override `resources`.
    Functions are built (and traced) once, on first use.

    Args:
        model: the Keras model to serve (built).
        options: a `ServingOptions`.
    """

    def __init__(self, model, options):
        self.model = model
        self.options = options
        self._signatures = None
        self._xla_function = None

    def signatures(self):
        """{signature name: traced tf.function}, `serving_default` first."""
        if self._signatures is None:
            signatures = self._build_signatures()
            missing = {"serving_default", "serving_xla"} - set(signatures)
            if missing:
                raise ValueError(
                    f"{type(self).__name__} built no {sorted(missing)} "
                    "signature"
                )
            self._signatures = dict(signatures)
        return self._signatures

    def xla_function(self):
        """The jit-compiled, static-shape function `serving_xla` calls."""
        if self._xla_function is None:
            self._xla_function = self._build_xla_function()
        return self._xla_function

    def resources(self):
        """Trackables besides the model that the functions use."""
        return []

    def signature_docs(self):
        """{signature name: one paragraph on inputs, outputs, semantics}."""
        return {}

    def example_inputs(self, signature_name, batch_size=1, seed=0):
        """Valid inputs of a signature: {input name: NumPy array}."""
        raise NotImplementedError

    def benchmark_case(self, batch_size, seed=0):
        """(Keras callable, signature name, inputs) doing the same work.

        `callable(**inputs)` runs the in-process Keras model; the signature
        is the exported function doing that work on the same inputs.
        """
        raise NotImplementedError

    def _build_signatures(self):
        raise NotImplementedError

    def _build_xla_function(self):
        raise NotImplementedError

    def call_model(self, fn, *args):
        """Runs `fn(*args)` (a model computation) without state updates."""
        with keras.StatelessScope():
            return fn(*args)

    @staticmethod
    def function(fn, input_signature, jit_compile=False):
        """`tf.function` of `fn`, traced once now so errors show at export."""
        function = tf.function(
            fn,
            input_signature=input_signature,
            jit_compile=jit_compile,
            autograph=False,
        )
        function.get_concrete_function()
        return function


def register_adapter(model_class):
    """Class decorator: registers a `ServingAdapter` for `model_class`.

    Registering again for the same class replaces the adapter (see the
    module docstring for an example).
    """

    def decorator(adapter_class):
        if not (
            isinstance(adapter_class, type)
            and issubclass(adapter_class, ServingAdapter)
        ):
            raise TypeError(
                "register_adapter decorates ServingAdapter subclasses; "
                f"received {adapter_class!r}"
            )
        _ADAPTERS[model_class] = adapter_class
        return adapter_class

    return decorator


def registered_model_classes():
    """Names of the model classes with an adapter, sorted."""
    return sorted(klass.__name__ for klass in _ADAPTERS)


def adapter_class(model):
    """The adapter class registered for `model`'s class (MRO order)."""
    for klass in type(model).__mro__:
        if klass in _ADAPTERS:
            return _ADAPTERS[klass]
    raise ValueError(
        f"No serving adapter for model class {type(model).__name__!r}; "
        f"registered: {registered_model_classes()}. Register one with "
        "export.adapters.register_adapter."
    )


def make_adapter(model, options=None):
    """An adapter instance for `model` with `options` (default options)."""
    return adapter_class(model)(model, options or ServingOptions())
