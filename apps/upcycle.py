r"""Upcycles a dense ViT or T5 checkpoint into an MoE model (.keras file).

Reads the dense model from any format `keras_moe.checkpoints.read_checkpoint`
takes (original T5, Hugging Face safetensors, TF Model Garden, keras-hub)
or a `.keras` file, applies `keras_moe.upcycle` and saves the result. The
defaults are the Sparse Upcycling paper's: every other MLP block, expert
choice with capacity factor 2 in encoders (top-2 token choice in T5's
decoder), combine weights renormalised for vision only.

Usage:

  python -m apps.upcycle --checkpoint=/tmp/dense_vit \
      --output=/tmp/moe_vit.keras --num_experts=8

  # Token-choice top-1 on the last two blocks, E^3 with two members:
  python -m apps.upcycle --checkpoint=/tmp/dense_vit \
      --output=/tmp/e3_vit.keras --num_experts=8 --router=tokens_choose \
      --num_selected_experts=1 --blocks=last_n:2 --ensemble_size=2

Prints the parameter and FLOP summary of the dense and the upcycled model.
"""

from absl import flags

from . import flags_util

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint",
    None,
    "Dense checkpoint (any format read_checkpoint reads) or .keras file.",
)
_ARCHITECTURE = flags.DEFINE_enum(
    "architecture", None, ["vit", "t5"], "Model family; default: detect."
)
_OUTPUT = flags.DEFINE_string("output", None, "The .keras file to write.")
_OVERWRITE = flags.DEFINE_boolean(
    "overwrite", False, "Replace an existing --output file."
)
_NUM_EXPERTS = flags.DEFINE_integer(
    "num_experts", 32, "Experts per MoE block (E).", lower_bound=2
)
_BLOCKS = flags.DEFINE_string(
    "blocks",
    "every_other",
    "MLP blocks to upcycle in every stack: every_other, all, last_n:<n>, "
    "or comma-separated block indices.",
)
_ROUTER = flags.DEFINE_enum(
    "router",
    "experts_choose",
    ["experts_choose", "tokens_choose"],
    "Router of encoder stacks (ViT, T5 encoder).",
)
_DECODER_ROUTER = flags.DEFINE_enum(
    "decoder_router",
    "tokens_choose",
    ["experts_choose", "tokens_choose"],
    "Router of T5's decoder (expert choice leaks future tokens there).",
)
_NUM_SELECTED_EXPERTS = flags.DEFINE_integer(
    "num_selected_experts", 2, "K of token-choice routers.", lower_bound=1
)
_TRAIN_CAPACITY_FACTOR = flags.DEFINE_string(
    "train_capacity_factor",
    "2.0",
    "Capacity factor when training: a number > 0, or 'none' (no drops).",
)
_EVAL_CAPACITY_FACTOR = flags.DEFINE_string(
    "eval_capacity_factor",
    "2.0",
    "Capacity factor at evaluation: a number > 0, or 'none' (no drops).",
)
_NORMALIZE = flags.DEFINE_enum(
    "normalize_combine_weights",
    "auto",
    ["auto", "true", "false"],
    "Renormalise combine weights; auto: true for ViT, false for T5.",
)
_GROUP_SIZE = flags.DEFINE_integer(
    "group_size",
    None,
    "Routing group size S (default: one group per sequence).",
    lower_bound=1,
)
_EXPERT_NOISE = flags.DEFINE_float(
    "expert_noise",
    0.0,
    "Std of multiplicative noise on each expert's copied weights.",
    lower_bound=0.0,
)
_REINIT_FRACTION = flags.DEFINE_float(
    "reinit_fraction",
    0.0,
    "Drop-Upcycling: fraction of each expert's hidden units re-drawn.",
    lower_bound=0.0,
    upper_bound=1.0,
)
_ENSEMBLE_SIZE = flags.DEFINE_integer(
    "ensemble_size",
    1,
    "E^3 ensemble members M (ViT only; num_experts a multiple of M).",
    lower_bound=1,
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the routers and noise.")

flags.mark_flags_as_required(["checkpoint", "output"])
flags_util.register_existing_path("checkpoint")
flags_util.register_output_file("output", ".keras")
flags_util.register_optional_float("train_capacity_factor")
flags_util.register_optional_float("eval_capacity_factor")


def parse_blocks(value):
    """The `blocks` and `last_n` arguments of `upcycle` for --blocks."""
    text = value.strip()
    if text in ("every_other", "all"):
        return text, None
    if text.startswith("last_n:"):
        count = text[len("last_n:") :]
        if count.isdigit() and int(count) >= 1:
            return "last_n", int(count)
    else:
        parts = [p.strip() for p in text.split(",")]
        if parts and all(p.isdigit() for p in parts):
            return [int(p) for p in parts], None
    raise ValueError(
        f"--blocks must be every_other, all, last_n:<n> or comma-separated "
        f"block indices; received {value!r}"
    )


@flags.validator("blocks")
def _check_blocks(value):
    try:
        parse_blocks(value)
    except ValueError as error:
        raise flags.ValidationError(str(error)) from None
    return True


def main(argv):
    del argv
    from keras_moe import upcycling  # TensorFlow loads after the flags parse.

    blocks, last_n = parse_blocks(_BLOCKS.value)
    normalize = {"auto": None, "true": True, "false": False}[_NORMALIZE.value]
    summary = upcycling.upcycle_to_file(
        _CHECKPOINT.value,
        _OUTPUT.value,
        architecture=_ARCHITECTURE.value,
        num_experts=_NUM_EXPERTS.value,
        blocks=blocks,
        last_n=last_n,
        encoder_router=_ROUTER.value,
        decoder_router=_DECODER_ROUTER.value,
        num_selected_experts=_NUM_SELECTED_EXPERTS.value,
        train_capacity_factor=flags_util.optional_float(
            _TRAIN_CAPACITY_FACTOR.value, "train_capacity_factor"
        ),
        eval_capacity_factor=flags_util.optional_float(
            _EVAL_CAPACITY_FACTOR.value, "eval_capacity_factor"
        ),
        normalize_combine_weights=normalize,
        group_size=_GROUP_SIZE.value,
        expert_noise=_EXPERT_NOISE.value,
        reinit_fraction=_REINIT_FRACTION.value,
        ensemble_size=_ENSEMBLE_SIZE.value,
        seed=_SEED.value,
    )
    print(summary, flush=True)
    print(f"wrote {_OUTPUT.value}", flush=True)


def cli():
    """The `keras-moe-upcycle` console script."""
    flags_util.run(main)


if __name__ == "__main__":
    cli()
