r"""Runs one of the reproduction experiments of `keras_moe.experiments`.

Each experiment trains and evaluates its models once per seed and writes
`results.csv`, `results.md` and PNG plots into `--output_dir` (default
`results/<experiment>`), printing its progress.

Usage:

    # E^3 on the digits (dense ViT, V-MoE K=1/K=2, E^3, deep ensemble):
    python -m apps.reproduce --experiment=e3

    # A smoke run (CI size, under a minute), one seed:
    python -m apps.reproduce --experiment=e3 --small --seeds=0 \
        --output_dir=/tmp/e3_small

    # Upcycling a ViT, with ablations (options the experiment supports):
    python -m apps.reproduce --experiment=upcycle_vit --num_experts=8 \
        --capacity_factor=2 --moe_blocks=last_n:2 --budgets=0.1,0.5,1.0

Flags `--num_experts`, `--capacity_factor`, `--router`, `--moe_blocks`,
`--expert_noise`, `--reinit_fraction`, `--reuse_optimizer_state`,
`--optimizer_state`, `--normalize_combine_weights` and `--budgets` are
passed to the experiment only when
given on the command line; an experiment that does not support one of them
stops with an error naming it. Every flag is checked before any work starts.
"""

import os

from absl import app
from absl import flags

from keras_moe import experiments

_EXPERIMENT = flags.DEFINE_enum(
    "experiment",
    None,
    experiments.names(),
    "Experiment to run (a name registered in keras_moe.experiments).",
)
_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir",
    None,
    "Directory for results.csv, results.md and the plots "
    "(default: results/<experiment>).",
)
_SEEDS = flags.DEFINE_list(
    "seeds", ["0", "1", "2"], "Comma-separated integer seeds, one run each."
)
_SMALL = flags.DEFINE_boolean(
    "small", False, "Smoke-test size (continuous integration)."
)
_NUM_EXPERTS = flags.DEFINE_integer(
    "num_experts", None, "Ablation: E, experts per MoE block.", lower_bound=1
)
_CAPACITY_FACTOR = flags.DEFINE_float(
    "capacity_factor", None, "Ablation: capacity factor of the MoE blocks."
)
_ROUTER = flags.DEFINE_enum(
    "router",
    None,
    ["experts_choose", "tokens_choose"],
    "Ablation: router of the MoE blocks.",
)
_MOE_BLOCKS = flags.DEFINE_string(
    "moe_blocks",
    None,
    "Ablation: which MLP blocks become MoE blocks: every_other, all or "
    "last_n:<n>.",
)
_EXPERT_NOISE = flags.DEFINE_float(
    "expert_noise", None, "Ablation: std of the noise on copied experts."
)
_REINIT_FRACTION = flags.DEFINE_float(
    "reinit_fraction",
    None,
    "Ablation: fraction of each expert's hidden units re-drawn.",
)
_REUSE_OPTIMIZER_STATE = flags.DEFINE_boolean(
    "reuse_optimizer_state",
    None,
    "Ablation: continue the dense optimizer's state after upcycling.",
)
_OPTIMIZER_STATE = flags.DEFINE_enum(
    "optimizer_state",
    None,
    ["rescale", "copy", "reset"],
    "Ablation: how a reused dense optimizer state starts the upcycled model "
    "(keras_moe.upcycle_optimizer's state).",
)
_NORMALIZE_COMBINE_WEIGHTS = flags.DEFINE_boolean(
    "normalize_combine_weights",
    None,
    "Ablation: renormalise each token's combine weights over its experts "
    "in every MoE block (default: the paper's choice, vision only).",
)
_BUDGETS = flags.DEFINE_list(
    "budgets",
    None,
    "Ablation: comma-separated extra-training budgets, as fractions "
    "(e.g. 0.1,0.25,0.5,1.0).",
)

_OPTION_FLAGS = {
    "num_experts": _NUM_EXPERTS,
    "capacity_factor": _CAPACITY_FACTOR,
    "router": _ROUTER,
    "moe_blocks": _MOE_BLOCKS,
    "expert_noise": _EXPERT_NOISE,
    "reinit_fraction": _REINIT_FRACTION,
    "reuse_optimizer_state": _REUSE_OPTIMIZER_STATE,
    "optimizer_state": _OPTIMIZER_STATE,
    "normalize_combine_weights": _NORMALIZE_COMBINE_WEIGHTS,
    "budgets": _BUDGETS,
}
flags.mark_flag_as_required("experiment")


def options_from_flags():
    """{option name: value} of the ablation flags given on the command line,
    with their values checked."""
    options = {
        name: holder.value
        for name, holder in _OPTION_FLAGS.items()
        if holder.present
    }
    try:
        return experiments.check_option_values(options)
    except ValueError as e:
        # Name the flag as the user typed it.
        raise ValueError(f"--{e}") from None


def output_dir_for(experiment, output_dir):
    """The output directory, checked: it must not be an existing file."""
    path = output_dir or os.path.join("results", experiment)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(
            f"--output_dir={path!r} is an existing file, not a directory"
        )
    return path


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    name = _EXPERIMENT.value
    try:
        try:
            seeds = experiments.parse_seeds(_SEEDS.value)
        except ValueError as e:
            raise ValueError(f"--{e}") from None
        options = options_from_flags()
        output_dir = output_dir_for(name, _OUTPUT_DIR.value)
        module = experiments.get(name)
        experiments.check_module_options(module, options)
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    print(
        f"Running experiment {name} (seeds {list(seeds)}, "
        f"small={_SMALL.value}, options {options}) -> {output_dir}",
        flush=True,
    )
    result = module.run(
        output_dir, seeds=seeds, small=_SMALL.value, options=options or None
    )
    written = ", ".join(result.get("files", [])) or output_dir
    print(f"Wrote {written}", flush=True)


def cli():
    """The `keras-moe-reproduce` console script."""
    app.run(main)


if __name__ == "__main__":
    cli()
