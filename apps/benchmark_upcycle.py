r"""Times loading a T5 checkpoint and upcycling it, with peak memory.

Writes a random-weight T5 checkpoint of `--preset` in the original Mesh
TensorFlow format to a temporary directory, then measures, each in a fresh
process of its own (so that its peak RSS is its own):

    build_t5      T5.from_architecture(preset): the model alone
    read_t5_mtf   keras_moe.checkpoints.t5.read_t5_mtf_checkpoint(path,
                  config=preset), compared with build_t5 (reader_extra_*)
    upcycle_t5    keras_moe.upcycle(model, num_experts) with the paper's
                  defaults, against a NumPy baseline that tiles the same
                  dense MLP arrays E times, in the same process; and
                  moe_build_*: building the upcycled model's config alone

One JSON line per measurement on stdout: wall seconds, peak RSS growth in
MiB, sizes in bytes and their ratios. Logs go to stderr. What is measured
and how is documented in `keras_moe/benchmarks_upcycle.py`.

Usage:

    # T5-small (60.5M parameters), 32 experts (a few GiB of memory):
    python -m apps.benchmark_upcycle

    # A smoke run on t5_tiny with 4 experts (seconds per process):
    python -m apps.benchmark_upcycle --quick

    # Another preset and E, saved to a file too:
    python -m apps.benchmark_upcycle --preset=t5_v1_1_small \
        --num_experts=8 --output=/tmp/upcycle.jsonl
"""

import json

from absl import app
from absl import flags
from absl import logging

from benchmarks import upcycle as benchmarks_upcycle
from keras_moe.models.t5 import ARCHITECTURES
from keras_moe.utils import files

_PRESET = flags.DEFINE_enum(
    "preset",
    "t5_small",
    sorted(ARCHITECTURES),
    "T5 preset whose checkpoint is read and upcycled.",
)
_NUM_EXPERTS = flags.DEFINE_integer(
    "num_experts", 32, "E, experts per upcycled MLP block.", lower_bound=1
)
_OUTPUT = flags.DEFINE_string(
    "output", None, "Also write the JSON lines to this file."
)
_QUICK = flags.DEFINE_boolean(
    "quick",
    False,
    "A smoke test: --preset=t5_tiny (the flag is ignored) and, unless "
    "given, --num_experts=4.",
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    preset, num_experts = _PRESET.value, _NUM_EXPERTS.value
    if _QUICK.value:
        preset = "t5_tiny"
        num_experts = num_experts if _NUM_EXPERTS.present else 4
    logging.info("preset %s, %d experts", preset, num_experts)
    try:
        benchmarks_upcycle.check_arguments(preset, num_experts)
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    records = benchmarks_upcycle.run_upcycle_benchmark(preset, num_experts)
    lines = [json.dumps(r) for r in records]
    print("\n".join(lines), flush=True)
    if _OUTPUT.value:
        files.write_text(_OUTPUT.value, "\n".join(lines) + "\n")


if __name__ == "__main__":
    app.run(main)
