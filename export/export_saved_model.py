r"""Exports a keras_moe model (.keras file) as a SavedModel for TF Serving.

Writes `<export_base>/<model_name>/<version>/` atomically (see
`export.saved_model`), then `<export_base>/models.config` (every model under
the base) and `<export_base>/batching_parameters.txt`. Signatures depend on
the model type: `export.vit_serving`, `export.t5_serving`.

Usage:

    # An (upcycled) ViT; MoE blocks drop no token at serving time:
    python -m export.export_saved_model --model=/tmp/vit_moe.keras \
        --export_base=/tmp/models --version=1 --image_dtype=uint8

    # T5 with a text signature (the server needs the tf-text ops for it),
    # generating 32 tokens, then timing it against the Keras model:
    python -m export.export_saved_model --model=/tmp/t5.keras \
        --export_base=/tmp/models --version=1 --max_length=33 \
        --sentencepiece_model=/tmp/spm.model --benchmark

    # Serve it:
    tensorflow_model_server --rest_api_port=8501 \
        --model_config_file=/tmp/models/models.config --enable_batching \
        --batching_parameters_file=/tmp/models/batching_parameters.txt
"""

import json
import pathlib

import tensorflow as tf
from absl import app
from absl import flags
from absl import logging

from . import latency
from . import saved_model
from . import serving_config
from .adapters import ServingOptions

_MODEL = flags.DEFINE_string(
    "model", None, "Path of the keras_moe model, a .keras file."
)
_EXPORT_BASE = flags.DEFINE_string(
    "export_base", None, "Directory holding <model_name>/<version>/."
)
_MODEL_NAME = flags.DEFINE_string(
    "model_name", None, "Served model name; default: the .keras file's stem."
)
_VERSION = flags.DEFINE_integer(
    "version", None, "Version number; default: the Unix time.", lower_bound=0
)
_OVERWRITE = flags.DEFINE_boolean(
    "overwrite", False, "Replace an existing version directory."
)
_EVAL_CAPACITY_FACTOR = flags.DEFINE_string(
    "eval_capacity_factor",
    "none",
    "Serving capacity factor of every MoE block: 'none' (no token dropped), "
    "a number > 0, or 'keep' (the model's own).",
)
_TOP_K = flags.DEFINE_integer("top_k", 5, "Image classifiers: top-k classes.")
_NUM_BEAMS = flags.DEFINE_integer(
    "num_beams",
    1,
    "Text models: > 1 adds a generate_beam_search signature with that many "
    "beams.",
)
_LENGTH_PENALTY = flags.DEFINE_float(
    "length_penalty", 1.0, "Text models: the beam search's length penalty."
)
_IMAGE_DTYPE = flags.DEFINE_enum(
    "image_dtype",
    "float32",
    ["float32", "uint8"],
    "Image classifiers: dtype of serving_default and serving_xla images.",
)
_IMAGE_MEAN = flags.DEFINE_list(
    "image_mean",
    ["0.0"],
    "Image classifiers: per-channel mean of uint8 "
    "and encoded images scaled to [0, 1] (one value or one per channel).",
)
_IMAGE_STD = flags.DEFINE_list(
    "image_std", ["1.0"], "Image classifiers: per-channel std (as the mean)."
)
_MAX_LENGTH = flags.DEFINE_integer(
    "max_length", 32, "Text models: generated length, start id included."
)
_MAX_INPUT_LENGTH = flags.DEFINE_integer(
    "max_input_length",
    512,
    "Text models: longest tokenised text input; serving_xla's input length.",
)
_SENTENCEPIECE_MODEL = flags.DEFINE_string(
    "sentencepiece_model",
    None,
    "Text models: SentencePiece model file; adds the generate_text signature.",
)
_XLA_BATCH_SIZE = flags.DEFINE_integer(
    "xla_batch_size", 8, "Fixed batch size of serving_xla."
)
_NO_WARMUP = flags.DEFINE_boolean(
    "no_warmup", False, "Write no TF Serving warmup request."
)
_SERVING_BASE_PATH = flags.DEFINE_string(
    "serving_base_path",
    None,
    "Where the server sees --export_base (e.g. /models in a container); "
    "default: its absolute local path.",
)
_MAX_BATCH_SIZE = flags.DEFINE_integer(
    "max_batch_size",
    None,
    "Server-side batching: largest batch. Default: --xla_batch_size, the "
    "only size serving_xla takes (every merged batch is padded to it).",
)
_BATCH_TIMEOUT_MICROS = flags.DEFINE_integer(
    "batch_timeout_micros", 1000, "Server-side batching: longest wait."
)
_BENCHMARK = flags.DEFINE_boolean(
    "benchmark",
    False,
    "After exporting, time the loaded SavedModel against the Keras model "
    "(JSON line on stdout).",
)
_BENCHMARK_BATCH_SIZE = flags.DEFINE_integer(
    "benchmark_batch_size", 32, "Examples per benchmark call."
)
_BENCHMARK_REPEATS = flags.DEFINE_integer(
    "benchmark_repeats", 10, "Timed benchmark calls per side."
)

flags.mark_flags_as_required(["model", "export_base"])


def parse_capacity_factor(text):
    """'none' -> None, 'keep' -> saved_model.KEEP, a number -> float."""
    value = text.strip().lower()
    if value == "none":
        return saved_model.NO_DROP
    if value == "keep":
        return saved_model.KEEP
    try:
        factor = float(value)
    except ValueError:
        factor = 0.0
    if not factor > 0:
        raise app.UsageError(
            "--eval_capacity_factor must be 'none', 'keep' or a number > 0; "
            f"received {text!r}"
        )
    return factor


def _floats(values, name):
    try:
        return tuple(float(v) for v in values)
    except ValueError:
        raise app.UsageError(
            f"--{name} must be numbers; received {values}"
        ) from None


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    model_path = pathlib.PurePosixPath(_MODEL.value)  # for its stem only
    sentencepiece_model = None
    if _SENTENCEPIECE_MODEL.value:
        with tf.io.gfile.GFile(_SENTENCEPIECE_MODEL.value, "rb") as f:
            sentencepiece_model = f.read()
    options = ServingOptions(
        top_k=_TOP_K.value,
        num_beams=_NUM_BEAMS.value,
        length_penalty=_LENGTH_PENALTY.value,
        image_dtype=_IMAGE_DTYPE.value,
        image_mean=_floats(_IMAGE_MEAN.value, "image_mean"),
        image_std=_floats(_IMAGE_STD.value, "image_std"),
        max_length=_MAX_LENGTH.value,
        max_input_length=_MAX_INPUT_LENGTH.value,
        sentencepiece_model=sentencepiece_model,
        xla_batch_size=_XLA_BATCH_SIZE.value,
    )
    factor = parse_capacity_factor(_EVAL_CAPACITY_FACTOR.value)
    # Checked before anything is written: a batching setting that
    # serving_xla cannot take must not leave a version behind.
    serving_config.batching_parameters(
        max_batch_size=_MAX_BATCH_SIZE.value,
        batch_timeout_micros=_BATCH_TIMEOUT_MICROS.value,
        xla_batch_size=options.xla_batch_size,
    )
    model = saved_model.load_model(_MODEL.value)
    try:
        result = saved_model.export_saved_model(
            model,
            _EXPORT_BASE.value,
            _MODEL_NAME.value or model_path.stem,
            version=_VERSION.value,
            options=options,
            eval_capacity_factor=factor,
            overwrite=_OVERWRITE.value,
            warmup=not _NO_WARMUP.value,
        )
    except saved_model.VersionExistsError as e:
        raise app.UsageError(f"{e} (--overwrite)") from None
    logging.info("Exported %s", result.path)
    for name, doc in result.signatures.items():
        logging.info("  %s: %s", name, doc)
    config = serving_config.write_model_config(
        _EXPORT_BASE.value, _SERVING_BASE_PATH.value
    )
    batching = serving_config.write_batching_parameters(
        _EXPORT_BASE.value,
        max_batch_size=_MAX_BATCH_SIZE.value,
        batch_timeout_micros=_BATCH_TIMEOUT_MICROS.value,
    )
    logging.info("Wrote %s and %s", config, batching)
    if _BENCHMARK.value:
        figures = latency.measure_latency(
            result.adapter,
            result.path,
            batch_size=_BENCHMARK_BATCH_SIZE.value,
            repeats=_BENCHMARK_REPEATS.value,
        )
        print(json.dumps(figures), flush=True)


def cli():
    """The `keras-moe-export` console script."""
    app.run(main)


if __name__ == "__main__":
    cli()
