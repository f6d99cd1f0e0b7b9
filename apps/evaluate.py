r"""Evaluates a keras_moe model on a held-out split.

Classifiers (ViT): accuracy, negative log-likelihood, expected calibration
error (15 bins) and Brier score of the softmax
(`keras_moe.evaluation.metrics`). T5: loss (cross-entropy per target token),
token accuracy and exact match of greedy generation. `--eval_capacity_factor`
rebuilds every MoE block with another evaluation capacity factor first (`none`:
no token dropped).

Usage:

  python -m apps.evaluate --model=/tmp/train_vit/model.keras \
      --dataset=digits --eval_capacity_factor=none

  python -m apps.evaluate --model=/tmp/dense_t5 --dataset=number_words \
      --split=test --max_examples=500

Prints the metrics as one JSON line (and writes them to --output if set).
"""

import json
import os

from absl import flags

from . import flags_util

_MODEL = flags.DEFINE_string(
    "model", None, "The model: a .keras file or a dense checkpoint."
)
_DATASET = flags.DEFINE_string(
    "dataset",
    None,
    "Dataset: an image dataset (digits, composed_digits, or one prepared "
    "in --tfds_data_dir) for a ViT, number_words for a T5.",
)
_TFDS_DATA_DIR = flags.DEFINE_string(
    "tfds_data_dir",
    None,
    "TFDS data directory (default: $KERAS_MOE_DATA_DIR or "
    "~/.cache/keras_moe/tensorflow_datasets).",
)
_SPLIT = flags.DEFINE_string("split", "test", "Split to score.")
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", 64, "Evaluation batch size.", lower_bound=1
)
_EVAL_CAPACITY_FACTOR = flags.DEFINE_string(
    "eval_capacity_factor",
    "keep",
    "Capacity factor of every MoE block: 'keep' (the model's own), 'none' "
    "(no token dropped) or a number > 0.",
)
_MAX_EXAMPLES = flags.DEFINE_integer(
    "max_examples", None, "Score only the first N examples.", lower_bound=1
)
_INPUT_LENGTH = flags.DEFINE_integer(
    "input_length", 16, "T5: encoder length T.", lower_bound=1
)
_TARGET_LENGTH = flags.DEFINE_integer(
    "target_length", 16, "T5: decoder length U.", lower_bound=1
)
_OUTPUT = flags.DEFINE_string(
    "output", None, "Also write the metrics to this JSON file."
)

flags.mark_flags_as_required(["model", "dataset"])
flags_util.register_existing_path("model")
flags_util.register_optional_float("eval_capacity_factor", allow_keep=True)
flags_util.register_dataset()


@flags.validator("output", message="--output must not be a directory")
def _output_not_a_directory(value):
    return value is None or not os.path.isdir(value)


def main(argv):
    del argv
    # TensorFlow loads after the flags parse.
    from keras_moe.evaluation import scoring
    from keras_moe.utils import files

    results = scoring.evaluate(
        _MODEL.value,
        _DATASET.value,
        data_dir=_TFDS_DATA_DIR.value,
        split=_SPLIT.value,
        batch_size=_BATCH_SIZE.value,
        eval_capacity_factor=flags_util.optional_float(
            _EVAL_CAPACITY_FACTOR.value, "eval_capacity_factor", True
        ),
        max_examples=_MAX_EXAMPLES.value,
        input_length=_INPUT_LENGTH.value,
        target_length=_TARGET_LENGTH.value,
    )
    line = json.dumps(results, sort_keys=True)
    if _OUTPUT.value:
        files.write_json(_OUTPUT.value, results)
    print(line, flush=True)


def cli():
    """The `keras-moe-evaluate` console script."""
    flags_util.run(main)


if __name__ == "__main__":
    cli()
