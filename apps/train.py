r"""Continues training a keras_moe model (e.g. an upcycled one).

With `model.fit` under a tf.distribute strategy (`--strategy`, `--tpu`), or
on an expert-parallel DTensor mesh (`--mesh=batch:2,expert:4`). Writes to
`--output_dir`: `model.keras` (the trained model), `logs/` (TensorBoard:
losses, metrics and per-MoE-layer routing statistics), `backup/`
(checkpoints every `--save_every_steps` steps) and `history.json`. Run the
same command again after a crash: training resumes from the newest
checkpoint, at the same step and with the same data.

Usage:

  python -m apps.train --model=/tmp/moe_vit.keras --dataset=digits \
      --epochs=5 --batch_size=32 --output_dir=/tmp/train_vit

  # Data parallel over 4 CPU devices (on GPUs: drop --cpu_devices):
  python -m apps.train --model=/tmp/moe_vit.keras --dataset=digits \
      --strategy=mirrored --cpu_devices=4 --output_dir=/tmp/train_mirrored

  # On a Cloud TPU VM (the TPU of this machine):
  python -m apps.train --model=/tmp/moe_vit.keras --dataset=digits \
      --strategy=tpu --tpu=local --output_dir=/tmp/train_tpu

  # Expert parallel: experts sharded over 4 devices, batch over 2:
  python -m apps.train --model=/tmp/moe_vit.keras --dataset=digits \
      --mesh=batch:2,expert:4 --cpu_devices=8 --output_dir=/tmp/train_ep

  tensorboard --logdir=/tmp/train_vit/logs
"""

import json

from absl import flags

from . import flags_util

STRATEGIES = ("auto", "tpu", "mirrored", "multi_worker", "one_device")

_MODEL = flags.DEFINE_string(
    "model", None, "The model: a .keras file or a dense checkpoint."
)
_DATASET = flags.DEFINE_string(
    "dataset",
    None,
    "Training data: an image dataset (digits, composed_digits, or one "
    "prepared in --tfds_data_dir) for a ViT, number_words for a T5.",
)
_TFDS_DATA_DIR = flags.DEFINE_string(
    "tfds_data_dir",
    None,
    "TFDS data directory (default: $KERAS_MOE_DATA_DIR or "
    "~/.cache/keras_moe/tensorflow_datasets).",
)
_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", None, "Directory for the model, logs and checkpoints."
)
_STRATEGY = flags.DEFINE_enum(
    "strategy",
    "auto",
    list(STRATEGIES),
    "tf.distribute strategy; auto: TPU if --tpu/TPU_NAME or TPU devices, "
    "multi_worker if TF_CONFIG names several workers, mirrored if several "
    "GPUs, else one_device.",
)
_TPU = flags.DEFINE_string(
    "tpu", None, "TPU name or grpc://host:port address (tpu strategy)."
)
_MESH = flags.DEFINE_string(
    "mesh",
    None,
    "Expert-parallel DTensor mesh, e.g. batch:2,expert:4 (its size must "
    "equal the number of devices); replaces --strategy.",
)
_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices",
    None,
    "Split the CPU into this many logical devices (to try mirrored or mesh "
    "training on one machine).",
    lower_bound=1,
)
_EPOCHS = flags.DEFINE_integer("epochs", 1, "Training epochs.", lower_bound=1)
_STEPS_PER_EPOCH = flags.DEFINE_integer(
    "steps_per_epoch",
    None,
    "Steps per epoch (default: one pass over the train split).",
    lower_bound=1,
)
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size",
    32,
    "Global batch size (a multiple of the number of replicas).",
    lower_bound=1,
)
_LEARNING_RATE = flags.DEFINE_float(
    "learning_rate", 1e-4, "Adam learning rate.", lower_bound=0.0
)
_SAVE_EVERY_STEPS = flags.DEFINE_integer(
    "save_every_steps", 100, "Checkpoint interval in steps.", lower_bound=1
)
_INPUT_LENGTH = flags.DEFINE_integer(
    "input_length", 16, "T5: encoder length T.", lower_bound=1
)
_TARGET_LENGTH = flags.DEFINE_integer(
    "target_length", 16, "T5: decoder length U.", lower_bound=1
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the data order.")

flags.mark_flags_as_required(["model", "dataset", "output_dir"])
flags_util.register_existing_path("model")
flags_util.register_output_dir("output_dir")
flags_util.register_mesh("mesh", "cpu_devices")
flags_util.register_dataset()


@flags.multi_flags_validator(
    ["mesh", "strategy", "tpu"],
    message="--mesh replaces --strategy and --tpu; pass one or the other",
)
def _mesh_or_strategy(values):
    return values["mesh"] is None or (
        values["strategy"] == "auto" and values["tpu"] is None
    )


@flags.multi_flags_validator(
    ["tpu", "strategy"],
    message="--tpu applies to --strategy=tpu or auto",
)
def _tpu_needs_tpu_strategy(values):
    return values["tpu"] is None or values["strategy"] in ("tpu", "auto")


def _split_cpu(count):
    """Makes `count` logical CPU devices (before TensorFlow uses any)."""
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * count
    )
    return [f"/cpu:{i}" for i in range(count)]


def main(argv):
    del argv
    devices = None
    if _CPU_DEVICES.value:
        devices = _split_cpu(_CPU_DEVICES.value)
    # TensorFlow loads after the flags parse.
    from keras_moe.training import fit

    results = fit.train(
        _MODEL.value,
        _DATASET.value,
        _OUTPUT_DIR.value,
        data_dir=_TFDS_DATA_DIR.value,
        strategy=_STRATEGY.value,
        tpu=_TPU.value,
        devices=devices if _STRATEGY.value == "mirrored" else None,
        mesh=_MESH.value,
        epochs=_EPOCHS.value,
        steps_per_epoch=_STEPS_PER_EPOCH.value,
        batch_size=_BATCH_SIZE.value,
        learning_rate=_LEARNING_RATE.value,
        save_every_steps=_SAVE_EVERY_STEPS.value,
        seed=_SEED.value,
        input_length=_INPUT_LENGTH.value,
        target_length=_TARGET_LENGTH.value,
    )
    print(json.dumps(results, sort_keys=True), flush=True)


def cli():
    """The `keras-moe-train` console script."""
    flags_util.run(main)


if __name__ == "__main__":
    cli()
