r"""Trains the small vision-language model on the digits task mixture.

Trains a `VisionLanguageModel` (ViT image encoder, T5 encoder-decoder) on
multilingual digit captioning, questions about two-digit images and
text-only span corruption (`keras_moe.data.vlm_tasks`), then prints and
writes exact match on held-out images, per captioning language, with the
real images and with the images blanked out (zeros). See
`keras_moe/experiments/vlm.py` for what is measured and the files written
to `--output_dir` (results.csv, results.md, exact_match.png, loss.png and
the trained `.keras` models). The embedded datasets are prepared on first
use in `--data_dir`.

Usage:

    # The default run (2 CPU cores: a few minutes):
    python -m apps.train_vlm --output_dir=/tmp/vlm

    # Three languages, another mixture, then upcycled to 8 experts:
    python -m apps.train_vlm --languages=en,de,es --caption_rate=0.6 \
        --vqa_rate=0.3 --span_corruption_rate=0.1 --upcycle --num_experts=8

    # Skip the blank-image ablation:
    python -m apps.train_vlm --noblank_images

    # The CI smoke run (a tiny model, a few steps):
    python -m apps.train_vlm --small --output_dir=/tmp/vlm_small
"""

from absl import app
from absl import flags

from keras_moe.data import vlm_tasks
from keras_moe.experiments import vlm

_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", "results/vlm", "Directory of the results and models."
)
_LANGUAGES = flags.DEFINE_list(
    "languages",
    list(vlm_tasks.LANGUAGES),
    f"Captioning languages, among {','.join(vlm_tasks.LANGUAGES)}.",
)
_CAPTION_RATE = flags.DEFINE_float(
    "caption_rate",
    vlm_tasks.DEFAULT_RATES["caption"],
    "Sampling rate of the captioning task.",
)
_VQA_RATE = flags.DEFINE_float(
    "vqa_rate",
    vlm_tasks.DEFAULT_RATES["vqa"],
    "Sampling rate of the digit question-answering task.",
)
_SPAN_RATE = flags.DEFINE_float(
    "span_corruption_rate",
    vlm_tasks.DEFAULT_RATES["span_corruption"],
    "Sampling rate of text-only span corruption.",
)
_STEPS = flags.DEFINE_integer(
    "steps", None, "Training steps (default 1000; 20 with --small)."
)
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", None, "Examples per step (default 64; 16 with --small)."
)
_LEARNING_RATE = flags.DEFINE_float(
    "learning_rate", 2e-3, "Peak Adam learning rate."
)
_UPCYCLE = flags.DEFINE_boolean(
    "upcycle",
    False,
    "Upcycle the trained model (paper recipe) and train it further.",
)
_NUM_EXPERTS = flags.DEFINE_integer(
    "num_experts", 8, "Experts per upcycled MLP block (with --upcycle)."
)
_UPCYCLE_STEPS = flags.DEFINE_integer(
    "upcycle_steps",
    None,
    "Training steps of the upcycled model (default 300; 10 with --small).",
)
_BLANK_IMAGES = flags.DEFINE_boolean(
    "blank_images",
    True,
    "Also score the model with the images replaced by zeros (ablation).",
)
_SMALL = flags.DEFINE_boolean(
    "small", False, "A tiny model and a few steps, for CI."
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the weights and the data.")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "TFDS data directory (default: keras_moe's)."
)
_VIT_CHECKPOINT = flags.DEFINE_string(
    "vit_checkpoint", None, "Dense ViT checkpoint to start from."
)
_T5_CHECKPOINT = flags.DEFINE_string(
    "t5_checkpoint", None, "Dense T5 checkpoint to start from."
)
_JIT_COMPILE = flags.DEFINE_boolean(
    "jit_compile", False, "XLA-compile the training step."
)


def config_from_flags():
    """The `VlmConfig` of the flags; ValueError for bad values."""
    overrides = {
        "languages": tuple(_LANGUAGES.value),
        "rates": {
            "caption": _CAPTION_RATE.value,
            "vqa": _VQA_RATE.value,
            "span_corruption": _SPAN_RATE.value,
        },
        "learning_rate": _LEARNING_RATE.value,
        "upcycle": _UPCYCLE.value,
        "num_experts": _NUM_EXPERTS.value,
        "blank_images": _BLANK_IMAGES.value,
        "seed": _SEED.value,
        "data_dir": _DATA_DIR.value,
        "vit_checkpoint": _VIT_CHECKPOINT.value,
        "t5_checkpoint": _T5_CHECKPOINT.value,
        "jit_compile": _JIT_COMPILE.value,
    }
    for name, holder in (
        ("steps", _STEPS),
        ("batch_size", _BATCH_SIZE),
        ("upcycle_steps", _UPCYCLE_STEPS),
    ):
        if holder.value is not None:
            overrides[name] = holder.value
    make = vlm.VlmConfig.small if _SMALL.value else vlm.VlmConfig
    return make(**overrides)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        config = config_from_flags()
        vlm.check_output_dir(_OUTPUT_DIR.value)
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    vlm.train_vlm(_OUTPUT_DIR.value, config)


def cli():
    """The `keras-moe-train-vlm` console script."""
    app.run(main)


if __name__ == "__main__":
    cli()
