r"""Trains the small vision-language model as PaLI-X builds it.

Pre-trains a ViT (digit classification) and a T5 (span corruption), reads
both back as checkpoints into a `VisionLanguageModel`, trains it on the
digits task mixture (`keras_moe.data.vlm_tasks`: captions in four
languages, questions about two-digit images, two multi-image tasks
(few-shot captioning, "which image shows 7?"), text-only span corruption)
with the ViT frozen at low resolution (stage 1), then at a higher
resolution with the ViT trained (stage 2); with `--upcycle` the stage-2
model is also upcycled to MoE and trained further beside its dense
continuation. Prints and writes exact match on held-out images, with the
real images and with the images blanked out (zeros). See
`keras_moe/experiments/vlm.py` for what is measured and the files written
to `--output_dir` (results.csv, paired.csv, pretraining.csv, results.md,
exact_match.png, loss.png); `--model_dir` keeps the pre-trained checkpoints
and the trained `.keras` models. The embedded datasets are prepared on
first use in `--data_dir`.

Usage:

    # The committed results (docs/VLM.md; 2 CPU cores: about 20 minutes):
    python -m apps.train_vlm --upcycle --output_dir=docs/results/vlm

    # Three languages, another mixture, models kept:
    python -m apps.train_vlm --languages=en,de,es --caption_rate=0.4 \
        --vqa_rate=0.2 --fewshot_rate=0.2 --which_rate=0.1 \
        --span_corruption_rate=0.1 \
        --model_dir=/tmp/vlm_models

    # Skip the blank-image control:
    python -m apps.train_vlm --noblank_images

    # The CI smoke run (a tiny model, a few steps):
    python -m apps.train_vlm --small --output_dir=/tmp/vlm_small
"""

from absl import app
from absl import flags

from keras_moe.data import vlm_tasks
from keras_moe.experiments import vlm

_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", "results/vlm", "Directory of the result files."
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
_FEWSHOT_RATE = flags.DEFINE_float(
    "fewshot_rate",
    vlm_tasks.DEFAULT_RATES["fewshot"],
    "Sampling rate of multi-image few-shot captioning.",
)
_WHICH_RATE = flags.DEFINE_float(
    "which_rate",
    vlm_tasks.DEFAULT_RATES["which"],
    "Sampling rate of the multi-image 'which image shows N?' task.",
)
_SPAN_RATE = flags.DEFINE_float(
    "span_corruption_rate",
    vlm_tasks.DEFAULT_RATES["span_corruption"],
    "Sampling rate of text-only span corruption.",
)
_STEP_FLAGS = {
    name: flags.DEFINE_integer(
        name,
        None,
        f"{what} (default {getattr(vlm.VlmConfig, name)}; "
        f"{vlm._SMALL[name]} with --small).",
    )
    for name, what in (
        ("vit_pretrain_steps", "Steps of the ViT's pre-training"),
        ("t5_pretrain_steps", "Steps of the T5's pre-training"),
        ("stage1_steps", "Mixture steps with the ViT frozen"),
        ("stage2_steps", "Mixture steps at the higher resolution"),
        ("upcycle_steps", "Steps of the upcycled and continued arms"),
        ("batch_size", "Examples per step"),
    )
}
_LEARNING_RATE = flags.DEFINE_float(
    "learning_rate",
    2e-3,
    "Peak Adam learning rate of pre-training and stage 1.",
)
_STAGE2_LEARNING_RATE = flags.DEFINE_float(
    "stage2_learning_rate", 5e-4, "Peak Adam learning rate of stage 2."
)
_UPCYCLE = flags.DEFINE_boolean(
    "upcycle",
    False,
    "Upcycle the stage-2 model (paper recipe) and train it further, beside "
    "its dense continuation.",
)
_NUM_EXPERTS = flags.DEFINE_integer(
    "num_experts", 8, "Experts per upcycled MLP block (with --upcycle)."
)
_BLANK_IMAGES = flags.DEFINE_boolean(
    "blank_images",
    True,
    "Also score the models with the images replaced by zeros (control).",
)
_SMALL = flags.DEFINE_boolean(
    "small", False, "A tiny model and a few steps, for CI."
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the weights and the data.")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "TFDS data directory (default: keras_moe's)."
)
_VIT_CHECKPOINT = flags.DEFINE_string(
    "vit_checkpoint",
    None,
    "Dense ViT checkpoint to start from instead of pre-training one "
    "(it must take the stage-1 image size, 4x8).",
)
_T5_CHECKPOINT = flags.DEFINE_string(
    "t5_checkpoint",
    None,
    "Dense T5 checkpoint to start from instead of pre-training one.",
)
_MODEL_DIR = flags.DEFINE_string(
    "model_dir",
    None,
    "Where to keep the pre-trained checkpoints and the trained models "
    "(default: not kept).",
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
            "fewshot": _FEWSHOT_RATE.value,
            "which": _WHICH_RATE.value,
            "span_corruption": _SPAN_RATE.value,
        },
        "learning_rate": _LEARNING_RATE.value,
        "stage2_learning_rate": _STAGE2_LEARNING_RATE.value,
        "upcycle": _UPCYCLE.value,
        "num_experts": _NUM_EXPERTS.value,
        "blank_images": _BLANK_IMAGES.value,
        "seed": _SEED.value,
        "data_dir": _DATA_DIR.value,
        "vit_checkpoint": _VIT_CHECKPOINT.value,
        "t5_checkpoint": _T5_CHECKPOINT.value,
        "model_dir": _MODEL_DIR.value,
        "jit_compile": _JIT_COMPILE.value,
    }
    for name, holder in _STEP_FLAGS.items():
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
