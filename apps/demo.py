r"""Trains a dense and two MoE digit classifiers on real handwritten digits.

Usage:

  python -m apps.demo --epochs=20 --num_experts=8

Prints one JSON line per model: parameters, held-out accuracy, training time
and, for MoE models, the routing statistics of the evaluation pass.
"""

import json

from absl import app
from absl import flags

_EPOCHS = flags.DEFINE_integer("epochs", 20, "Training epochs per model.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Batch size.")
_NUM_EXPERTS = flags.DEFINE_integer("num_experts", 8, "Experts (E).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the split and the models.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if _EPOCHS.value < 1 or _BATCH_SIZE.value < 1 or _NUM_EXPERTS.value < 2:
        raise app.UsageError(
            "--epochs and --batch_size must be >= 1 and --num_experts >= 2; "
            f"received {_EPOCHS.value}, {_BATCH_SIZE.value}, "
            f"{_NUM_EXPERTS.value}"
        )
    from keras_moe import demo  # TensorFlow loads after flags are parsed.

    for row in demo.run(
        epochs=_EPOCHS.value,
        batch_size=_BATCH_SIZE.value,
        num_experts=_NUM_EXPERTS.value,
        seed=_SEED.value,
    ):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    app.run(main)
