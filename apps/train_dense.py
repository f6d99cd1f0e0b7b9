r"""Pretrains a dense ViT or T5 and writes it as a checkpoint.

The checkpoint stands in for a user's existing dense checkpoint: a ViT is
written in Hugging Face format (`config.json` + `model.safetensors`), a T5
in the original Mesh TensorFlow format, both read back by
`keras_moe.checkpoints.read_checkpoint` (and so by `apps.upcycle`).

Usage:

  # A ViT on the embedded handwritten digits:
  python -m apps.train_dense --architecture=vit --dataset=digits \
      --epochs=20 --output_dir=/tmp/dense_vit

  # A T5 on number-to-words translation:
  python -m apps.train_dense --architecture=t5 --dataset=number_words \
      --epochs=2 --batch_size=64 --eval_examples=500 \
      --output_dir=/tmp/dense_t5

Prints the checkpoint path and the held-out metrics as one JSON line.
"""

import json

from absl import flags

from . import flags_util

_ARCHITECTURE = flags.DEFINE_enum(
    "architecture", None, ["vit", "t5"], "Model family to pretrain."
)
_DATASET = flags.DEFINE_string(
    "dataset",
    None,
    "Dataset name: an image dataset (digits, composed_digits or one "
    "prepared in --tfds_data_dir) for a ViT, number_words for a T5. "
    "Default: digits (vit), number_words (t5).",
)
_TFDS_DATA_DIR = flags.DEFINE_string(
    "tfds_data_dir",
    None,
    "TFDS data directory (default: $KERAS_MOE_DATA_DIR or "
    "~/.cache/keras_moe/tensorflow_datasets).",
)
_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", None, "Checkpoint directory to write."
)
_OVERWRITE = flags.DEFINE_boolean(
    "overwrite", False, "Replace an existing --output_dir."
)
_EPOCHS = flags.DEFINE_integer("epochs", 10, "Training epochs.", lower_bound=1)
_STEPS_PER_EPOCH = flags.DEFINE_integer(
    "steps_per_epoch",
    None,
    "Steps per epoch (default: one pass over the train split).",
    lower_bound=1,
)
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", 32, "Batch size.", lower_bound=1
)
_LEARNING_RATE = flags.DEFINE_float(
    "learning_rate", 1e-3, "Adam learning rate.", lower_bound=0.0
)
_MODEL_DIM = flags.DEFINE_integer(
    "model_dim", None, "D (default: ViT 64, T5 32).", lower_bound=1
)
_NUM_HEADS = flags.DEFINE_integer(
    "num_heads", None, "Attention heads (default: 4).", lower_bound=1
)
_HIDDEN_DIM = flags.DEFINE_integer(
    "hidden_dim",
    None,
    "MLP hidden size (default: ViT 128, T5 64).",
    lower_bound=1,
)
_NUM_LAYERS = flags.DEFINE_integer(
    "num_layers",
    None,
    "Blocks (T5: per stack; default: ViT 4, T5 2).",
    lower_bound=1,
)
_PATCH_SIZE = flags.DEFINE_integer(
    "patch_size", 2, "ViT patch size.", lower_bound=1
)
_EVAL_EXAMPLES = flags.DEFINE_integer(
    "eval_examples",
    None,
    "Test examples scored after training (default: the whole test split).",
    lower_bound=1,
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the weights and data order.")

flags.mark_flags_as_required(["architecture", "output_dir"])
flags_util.register_output_dir("output_dir")
flags_util.register_dataset()


@flags.multi_flags_validator(
    ["output_dir", "overwrite"],
    message="--output_dir exists; pass --overwrite to replace it",
)
def _new_output(values):
    import os

    return values["overwrite"] or not (
        values["output_dir"] and os.path.exists(values["output_dir"])
    )


def main(argv):
    del argv
    # TensorFlow loads after the flags parse.
    from keras_moe.data import specs
    from keras_moe.training import fit

    size = {
        key: flag.value
        for key, flag in (
            ("model_dim", _MODEL_DIM),
            ("num_heads", _NUM_HEADS),
            ("hidden_dim", _HIDDEN_DIM),
            ("num_layers", _NUM_LAYERS),
        )
        if flag.value is not None
    }
    if _ARCHITECTURE.value == "vit":
        size["patch_size"] = _PATCH_SIZE.value
    results = fit.pretrain_dense(
        _ARCHITECTURE.value,
        _DATASET.value or specs.DEFAULT_DATASETS[_ARCHITECTURE.value],
        _OUTPUT_DIR.value,
        data_dir=_TFDS_DATA_DIR.value,
        size=size,
        epochs=_EPOCHS.value,
        steps_per_epoch=_STEPS_PER_EPOCH.value,
        batch_size=_BATCH_SIZE.value,
        learning_rate=_LEARNING_RATE.value,
        seed=_SEED.value,
        overwrite=_OVERWRITE.value,
        eval_examples=_EVAL_EXAMPLES.value,
    )
    print(json.dumps(results, sort_keys=True), flush=True)


def cli():
    """The `keras-moe-train-dense` console script."""
    flags_util.run(main)


if __name__ == "__main__":
    cli()
