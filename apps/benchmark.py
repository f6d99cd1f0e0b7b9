r"""Times MoeLayer against an equal-FLOPs dense FFN, Model Garden and Mixtral.

One JSON line per configuration on stdout (a training step's forward and
backward pass, or an evaluation forward pass: median wall time of
`--repeats` interleaved rounds after `--warmup` untimed calls, and the
step's peak TF-allocator memory), then one JSON line per ratio. Logs go to
stderr. What is timed and how memory is measured is documented in
`benchmarks/moe_layer.py`.

Configurations (select with `--configs`, fnmatch patterns or kinds `moe`,
`dense`, `model_garden`, `mixtral`):

    dense_k{K}                 Dense(K*H, relu) -> Dense(D), the FLOPs baseline
    moe_tc_e{E}_k{K}_{disp}    keras_moe MoeLayer, tokens_choose, top-K
    moe_tc_e{E}_k{K}_dropless_s{S}  the same, dropless, at group size S
                               (--dropless_group_sizes); E of
                               --scaling_experts add dropless rows only
    moe_ec_e{E}_{disp}         keras_moe MoeLayer, experts_choose
    mg_ec_e{E}                 Model Garden (tf_keras) MoeLayer, experts choose
    mixtral_e{E}_k2            keras-hub MixtralSparseMoeBlock (all experts run)
    eval_dense_k{K}            forward pass of dense_k{K}
    eval_moe_tc_e{E}_k{K}_{disp}  forward pass, training=False,
                               eval_capacity_factor=None (--eval_dispatchers)

Ratio lines: `moe_tc_*/dense_k{K}`, `eval_moe_tc_*/eval_dense_k{K}`,
`mg_ec_e{E}/moe_ec_e{E}_{disp}` and `mixtral_e{E}_k2/moe_tc_e{E}_k2_{disp}`.

Usage:

    # Default shapes: 8192 tokens in groups of 4096, D=256, H=1024, E in
    # {8, 32}, K in {1, 2}, einsum, indices and dropless dispatch, dropless
    # also at groups of 512 and at E=16 and 64, no-drop evaluation with
    # "auto" and "indices", 10 rounds.
    python -m apps.benchmark

    # A smoke run on tiny shapes (seconds of compute, plus tracing):
    python -m apps.benchmark --quick

    # Expert-parallel training on 8 virtual CPU devices: step time and
    # peak per-device memory of the GShard and replicated layouts on the
    # meshes 1x8 and 2x4 against data parallelism (8x1); see
    # benchmarks/expert_parallel.py and docs/EXPERT_PARALLEL.md:
    python -m apps.benchmark --expert_parallel [--quick]

    # Whole-step XLA, E=32 only, MoeLayer against Model Garden, with a
    # process-level memory cross-check, saved to a file:
    python -m apps.benchmark --jit_compile --num_experts=32 \
        --configs=moe_ec_*,model_garden --isolate_memory \
        --output=/tmp/bench.jsonl
"""

import dataclasses
import json
import re

from absl import app
from absl import flags
from absl import logging

from benchmarks import expert_parallel as expert_parallel_benchmark
from benchmarks import moe_layer as benchmarks

_CONFIGS = flags.DEFINE_list(
    "configs",
    [],
    "Comma list of fnmatch patterns over configuration names, or kinds "
    f"({', '.join(benchmarks.KINDS)}). Empty: all.",
)
_REPEATS = flags.DEFINE_integer(
    "repeats", 10, "Timed rounds (median reported).", lower_bound=1
)
_WARMUP = flags.DEFINE_integer(
    "warmup", 2, "Untimed calls per configuration first.", lower_bound=1
)
_TOKENS = flags.DEFINE_integer("tokens", 8192, "T, tokens in the batch.")
_GROUP_SIZE = flags.DEFINE_integer(
    "group_size", 4096, "S, tokens per routing group; must divide --tokens."
)
_MODEL_DIM = flags.DEFINE_integer("model_dim", 256, "D.")
_HIDDEN_DIM = flags.DEFINE_integer(
    "hidden_dim", 1024, "H, hidden size of one expert."
)
_NUM_EXPERTS = flags.DEFINE_list("num_experts", ["8", "32"], "E values.")
_NUM_SELECTED = flags.DEFINE_list(
    "num_selected", ["1", "2"], "K values (token choice; dense is K*H)."
)
_CAPACITY_FACTOR = flags.DEFINE_float(
    "capacity_factor", 1.25, "Train capacity factor of the MoE layers."
)
_DISPATCHERS = flags.DEFINE_list(
    "dispatchers",
    ["einsum", "indices", "dropless"],
    "MoeLayer dispatchers to time.",
)
_DROPLESS_GROUP_SIZES = flags.DEFINE_list(
    "dropless_group_sizes",
    ["512"],
    "More group sizes S for the dropless rows (each must divide --tokens).",
)
_SCALING_EXPERTS = flags.DEFINE_list(
    "scaling_experts",
    ["16", "64"],
    "More E values for dropless rows only: cost as E grows at fixed "
    "active FLOPs.",
)
_EVAL_DISPATCHERS = flags.DEFINE_list(
    "eval_dispatchers",
    ["auto", "indices"],
    "Dispatchers of the no-drop evaluation rows (forward pass, "
    "eval_capacity_factor=None). Empty: none.",
)
_JIT_COMPILE = flags.DEFINE_boolean(
    "jit_compile", False, "XLA-compile each whole training step."
)
_MOE_JIT_COMPILE = flags.DEFINE_enum(
    "moe_jit_compile",
    "default",
    ["default", "true", "false"],
    "MoeLayer(jit_compile=...). 'default': the layer's default, but false "
    "under --jit_compile (a nested XLA function makes TF specialise the "
    "whole-step program on its input values; see benchmarks/moe_layer.py).",
)
_DEVICE = flags.DEFINE_string(
    "device", None, "TF device, e.g. CPU:0 or GPU:0. Default: GPU:0 if any."
)
_ISOLATE_MEMORY = flags.DEFINE_boolean(
    "isolate_memory",
    False,
    "CPU only: also report each configuration's peak RSS growth, measured "
    "in a fresh subprocess per configuration.",
)
_OUTPUT = flags.DEFINE_string(
    "output", None, "Also write the JSON lines to this file."
)
_EXPERT_PARALLEL = flags.DEFINE_boolean(
    "expert_parallel",
    False,
    "Instead of the layer benchmark: expert-parallel training steps on 8 "
    "virtual CPU devices (benchmarks/expert_parallel.py), with --repeats "
    "(default there: 5), --warmup and --quick.",
)
_QUICK = flags.DEFINE_boolean(
    "quick",
    False,
    "A smoke test: tiny shapes (T=128, S=64, D=16, H=32; --tokens, "
    "--group_size, --model_dim and --hidden_dim are ignored) and, unless "
    "given, --repeats=1 --warmup=1 --num_experts=8 "
    "--dropless_group_sizes=32 --scaling_experts=16.",
)


def _ints(flag):
    try:
        return [int(v) for v in flag.value]
    except ValueError as e:
        raise app.UsageError(f"--{flag.name}: {e}") from e


def _expert_parallel():
    ep = expert_parallel_benchmark
    shapes = ep.QUICK_SHAPES if _QUICK.value else ep.DEFAULT_SHAPES
    repeats = _REPEATS.value if _REPEATS.present else (1 if _QUICK.value else 5)
    warmup = _WARMUP.value if _WARMUP.present else (1 if _QUICK.value else 2)
    try:
        ep.check_arguments(shapes, repeats, warmup)
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    records, ratios = ep.run_expert_parallel_benchmark(shapes, repeats, warmup)
    _write([json.dumps(r) for r in records + ratios])


def _write(lines):
    print("\n".join(lines), flush=True)
    if _OUTPUT.value:
        with open(_OUTPUT.value, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _EXPERT_PARALLEL.value:
        _expert_parallel()
        return
    repeats, warmup = _REPEATS.value, _WARMUP.value
    try:
        if _QUICK.value:
            shapes = dataclasses.replace(
                benchmarks.QUICK_SHAPES, capacity_factor=_CAPACITY_FACTOR.value
            )
            repeats = repeats if _REPEATS.present else 1
            warmup = warmup if _WARMUP.present else 1
            # Each MoeLayer configuration costs seconds of XLA compilation.
            num_experts = _ints(_NUM_EXPERTS) if _NUM_EXPERTS.present else [8]
            group_sizes = (
                _ints(_DROPLESS_GROUP_SIZES)
                if _DROPLESS_GROUP_SIZES.present
                else [32]
            )
            scaling = (
                _ints(_SCALING_EXPERTS) if _SCALING_EXPERTS.present else [16]
            )
        else:
            num_experts = _ints(_NUM_EXPERTS)
            group_sizes = _ints(_DROPLESS_GROUP_SIZES)
            scaling = _ints(_SCALING_EXPERTS)
            shapes = benchmarks.Shapes(
                tokens=_TOKENS.value,
                group_size=_GROUP_SIZE.value,
                model_dim=_MODEL_DIM.value,
                hidden_dim=_HIDDEN_DIM.value,
                capacity_factor=_CAPACITY_FACTOR.value,
            )
        configs = benchmarks.filter_configs(
            benchmarks.make_configs(
                num_experts,
                _ints(_NUM_SELECTED),
                _DISPATCHERS.value,
                group_sizes=group_sizes,
                eval_dispatchers=_EVAL_DISPATCHERS.value,
                scaling_experts=scaling,
            ),
            _CONFIGS.value,
        )
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    device = _DEVICE.value or benchmarks.default_device()
    if not re.fullmatch(r"(CPU|GPU):\d+", device):
        raise app.UsageError(f"--device must be like CPU:0 or GPU:0: {device}")
    if _ISOLATE_MEMORY.value and not device.startswith("CPU"):
        raise app.UsageError("--isolate_memory is for CPU devices only")
    moe_jit = {"default": None, "true": True, "false": False}
    logging.info(
        "%d configurations on %s: %s",
        len(configs),
        device,
        ", ".join(c.name for c in configs),
    )

    try:
        records, ratios = benchmarks.run_benchmark(
            configs,
            shapes,
            repeats=repeats,
            warmup=warmup,
            jit_compile=_JIT_COMPILE.value,
            moe_jit_compile=moe_jit[_MOE_JIT_COMPILE.value],
            device=device,
            isolate_memory=_ISOLATE_MEMORY.value,
        )
    except ValueError as e:
        if "must divide" in str(e):
            raise app.UsageError(str(e)) from e
        raise
    _write([json.dumps(r) for r in records + ratios])


if __name__ == "__main__":
    app.run(main)
