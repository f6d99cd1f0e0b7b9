"""Sparse upcycling: turn a dense keras_moe T5, ViT or VLM into an MoE model.

Follows "Sparse Upcycling: Training Mixture-of-Experts from Dense
Checkpoints" (Komatsuzaki et al., 2022). The chosen MLP blocks become
`MoeLayer`s whose E experts start as copies of the dense MLP; the router is
freshly initialised; every other weight is copied unchanged.

Defaults are the paper's recipe:

* every other MLP block (the odd-indexed ones, counting from 0) in every
  stack (ViT encoder; T5 encoder and decoder; all three in a
  `keras_moe.models.vlm.VisionLanguageModel`, whose ViT stack is named
  "vision");
* expert-choice routing with capacity factor 2 in encoders and ViT;
  token-choice top-2 in decoders, because expert choice lets a decoder
  token's routing depend on later tokens;
* combine weights renormalised in vision stacks, not in language stacks;
* a router initialised from Normal(0, 0.02).

`ensemble_size=M > 1` makes an E^3 ViT ("Sparse MoEs meet Efficient
Ensembles", Allingham et al., 2021): the same MoE blocks, with the E experts
split into M groups of E/M routed per ensemble member (see
`keras_moe.layers.ensemble`). Every expert still starts as a copy of the
dense MLP, so every member starts as the dense model (exactly so with token
choice, normalised weights and no drops); members part ways through their
own router columns and, with `expert_noise`, their own expert copies. The
paper's E^3 routes by token choice: pass `encoder_router="tokens_choose"`
and `num_selected_experts` K (at most E/M).

Shape letters: E experts, M ensemble members, D model dimension, H MLP
hidden dimension.
"""

import dataclasses
import os
import re
import zlib

import keras
import numpy as np
import tensorflow as tf

from keras_moe.checkpoints import load_model
from keras_moe.checkpoints import read_checkpoint
from keras_moe.layers import routing
from keras_moe.layers.ensemble import check_ensemble_size
from keras_moe.layers.experts import weights_to_be_overwritten
from keras_moe.models import flops
from keras_moe.models.moe_blocks import VISION
from keras_moe.models.moe_blocks import moe_layers
from keras_moe.upcycling.optimizer_state import upcycle_optimizer  # noqa: F401
from keras_moe.utils.checks import check_positive_int
from keras_moe.utils.files import save_keras

# Modality of a model mixing vision and language stacks (`architecture`).
VISION_LANGUAGE = "vision_language"


def architecture(model):
    """(modality, stacks) of a keras_moe model, or raises a ValueError.

    The stacks are the `keras_moe.models.MoeStack`s its class declares in
    `MOE_STACKS`; the modality is theirs ("vision", "language"), or
    "vision_language" when they differ.

    Example:

    >>> from keras_moe.models import T5
    >>> modality, stacks = architecture(T5.from_architecture("t5_tiny"))
    >>> modality, [stack.name for stack in stacks]
    ('language', ['encoder', 'decoder'])
    """
    stacks = getattr(type(model), "MOE_STACKS", None)
    if not stacks or not hasattr(model, "canonical_variables"):
        raise ValueError(
            "upcycle needs a keras_moe model with MLP blocks it knows (a "
            "class declaring MOE_STACKS: ViT, T5, VisionLanguageModel); "
            f"received {type(model).__name__}. Convert other formats with "
            "keras_moe.checkpoints first."
        )
    modalities = {stack.modality for stack in stacks}
    modality = modalities.pop() if len(modalities) == 1 else VISION_LANGUAGE
    return modality, stacks


def select_blocks(blocks, num_layers, last_n=None):
    """Block indices chosen by `blocks` in a stack of `num_layers` blocks.

    Args:
        blocks: "every_other" (odd indices), "all", "last_n" (with
            `last_n`), "none", or an iterable of indices.
        num_layers: number of blocks in the stack.
        last_n: for "last_n", how many of the last blocks.
    """
    if isinstance(blocks, str):
        if blocks == "every_other":
            return list(range(1, num_layers, 2))
        if blocks == "all":
            return list(range(num_layers))
        if blocks == "none":
            return []
        if blocks == "last_n":
            if isinstance(last_n, bool) or not isinstance(last_n, int):
                raise ValueError(
                    f"blocks='last_n' needs an int last_n; received {last_n!r}"
                )
            if not 1 <= last_n <= num_layers:
                raise ValueError(
                    f"last_n must be in [1, {num_layers}]; received {last_n}"
                )
            return list(range(num_layers - last_n, num_layers))
        raise ValueError(
            "blocks must be 'every_other', 'all', 'last_n', 'none' or a list "
            f"of block indices; received {blocks!r}"
        )
    indices = sorted(set(int(i) for i in blocks))
    bad = [i for i in indices if not 0 <= i < num_layers]
    if bad:
        raise ValueError(
            f"block indices {bad} are out of range for a stack of "
            f"{num_layers} blocks (valid: 0..{num_layers - 1})"
        )
    return indices


def upcycle(
    model,
    num_experts=32,
    *,
    blocks="every_other",
    last_n=None,
    encoder_router=routing.EXPERTS_CHOOSE,
    decoder_router=routing.TOKENS_CHOOSE,
    num_selected_experts=2,
    train_capacity_factor=2.0,
    eval_capacity_factor=2.0,
    normalize_combine_weights=None,
    router_kernel_initializer=None,
    expert_noise=0.0,
    expert_noise_type="multiplicative",
    reinit_fraction=0.0,
    group_size=None,
    moe_kwargs=None,
    allow_expert_choice_in_decoder=False,
    ensemble_size=1,
    seed=0,
):
    """Returns a new MoE model whose experts start as copies of `model`'s MLPs.

    The input model is left untouched.

    Args:
        model: a dense (or partly MoE) keras_moe `ViT`, `T5` or
            `VisionLanguageModel`.
        num_experts: E.
        blocks: which MLP blocks become MoE blocks: "every_other" (the paper),
            "all", "last_n" (with `last_n`), "none", a list of indices, or a
            dict {stack name: any of those} ("encoder", "decoder", and
            "vision" for a VisionLanguageModel's ViT; a stack the dict does
            not name gets "every_other").
        last_n: the n of `blocks="last_n"`.
        encoder_router: router of encoder stacks (ViTs' too).
        decoder_router: router of decoder stacks.
        num_selected_experts: K of token-choice stacks.
        train_capacity_factor, eval_capacity_factor: of every MoE block
            (None: no token dropped).
        normalize_combine_weights: None picks the paper's choice per stack
            (True for ViT stacks, False for T5 stacks).
        router_kernel_initializer: None for Normal(0, 0.02) seeded by `seed`.
        expert_noise: std of the noise added to each expert's copied weights
            to break their symmetry; 0 keeps exact copies.
        expert_noise_type: "multiplicative" (w * (1 + eps)) or "additive"
            (w + eps * std(w)).
        reinit_fraction: Drop-Upcycling (Nakamura et al., 2025): in each
            expert, this fraction of the hidden units (columns of the input
            kernels, rows of the output kernel) is re-drawn from a normal
            with the dense weight's mean and std.
        group_size: MoeLayer group size (None: one group per sequence).
        moe_kwargs: other MoeLayer kwargs applied to every MoE block (loss
            weights, noise, dispatcher...).
        allow_expert_choice_in_decoder: expert choice in a causal decoder is
            refused unless this is True.
        ensemble_size: M > 1 makes an E^3 model (ViT only): `num_experts`
            must be a multiple of M and, with token choice,
            `num_selected_experts` at most E/M. 1 (default) keeps the
            model's own ensemble size (1 for a dense model).
        seed: seed of router initialisation, expert noise and re-draws.

    Returns:
        A new keras model of the same class; for a keras-hub input, of the
        keras_moe class it converts to (`T5`, `ViT`).
    """
    model = _as_keras_moe_model(model)
    _, stacks = architecture(model)
    check_positive_int("num_experts", num_experts)
    config = model.get_config()
    ensemble_size = _ensemble_size(model, config, ensemble_size, num_experts)
    if expert_noise_type not in ("multiplicative", "additive"):
        raise ValueError(
            "expert_noise_type must be 'multiplicative' or 'additive'; "
            f"received {expert_noise_type!r}"
        )
    if not expert_noise >= 0:
        raise ValueError(
            f"expert_noise must be >= 0; received {expert_noise!r}"
        )
    if not 0.0 <= reinit_fraction <= 1.0:
        raise ValueError(
            f"reinit_fraction must be in [0, 1]; received {reinit_fraction!r}"
        )
    if router_kernel_initializer is None:
        router_kernel_initializer = keras.initializers.RandomNormal(
            stddev=0.02, seed=seed
        )
    stack_blocks = blocks if isinstance(blocks, dict) else {}
    unknown = set(stack_blocks) - {s.name for s in stacks}
    if unknown:
        raise ValueError(
            f"blocks names unknown stacks {sorted(unknown)}; this model has "
            f"{[s.name for s in stacks]}"
        )
    converted = {}
    for stack in stacks:
        router = decoder_router if stack.causal else encoder_router
        if router not in routing.ROUTER_TYPES:
            raise ValueError(
                f"router of the {stack.name} must be one of "
                f"{routing.ROUTER_TYPES}; received {router!r}"
            )
        if (
            stack.causal
            and router == routing.EXPERTS_CHOOSE
            and not allow_expert_choice_in_decoder
        ):
            raise ValueError(
                f"expert choice routing was asked for the {stack.name}, a "
                "causal decoder: an expert picks its tokens by looking at "
                "the whole sequence, so a token's output would depend on "
                "later tokens. Use decoder_router='tokens_choose', or pass "
                "allow_expert_choice_in_decoder=True to force it."
            )
        num_layers = stack.num_layers(config)
        chosen = select_blocks(
            (
                stack_blocks.get(stack.name, "every_other")
                if isinstance(blocks, dict)
                else blocks
            ),
            num_layers,
            last_n,
        )
        existing = {
            int(k): v for k, v in (config.get(stack.moe_key) or {}).items()
        }
        already = sorted(set(chosen) & set(existing))
        if already:
            raise ValueError(
                f"{stack.name} blocks {already} are already MoE blocks"
            )
        layer_kwargs = {
            "num_experts": num_experts,
            "router": router,
            "train_capacity_factor": train_capacity_factor,
            "eval_capacity_factor": eval_capacity_factor,
            "normalize_combine_weights": (
                stack.modality == VISION
                if normalize_combine_weights is None
                else normalize_combine_weights
            ),
            "router_kernel_initializer": keras.initializers.serialize(
                keras.initializers.get(router_kernel_initializer)
            ),
            "group_size": group_size,
            "seed": seed,
        }
        if router == routing.TOKENS_CHOOSE:
            layer_kwargs["num_selected_experts"] = num_selected_experts
        layer_kwargs.update(moe_kwargs or {})
        if ensemble_size > 1:
            _check_ensemble_block(layer_kwargs, num_experts, ensemble_size)
        for index in chosen:
            existing[index] = dict(layer_kwargs)
        config[stack.moe_key] = existing or None
        converted[stack.name] = chosen
    if not any(converted.values()):
        raise ValueError(
            f"blocks={blocks!r} selects no MLP block to upcycle in "
            f"{type(model).__name__}"
        )

    if ensemble_size > 1:
        config["ensemble_size"] = ensemble_size
    with weights_to_be_overwritten():
        moe_model = type(model).from_config(config)
    _copy_weights(
        model,
        moe_model,
        num_experts,
        expert_noise,
        expert_noise_type,
        reinit_fraction,
        seed,
    )
    moe_model.upcycled_blocks = converted
    return moe_model


# keras-hub classes `upcycle` converts through keras_moe.checkpoints (the
# readers accept the backbones and the task models holding one).
KERAS_HUB_CLASSES = (
    "T5Backbone",
    "T5Seq2SeqLM",
    "ViTBackbone",
    "ViTImageClassifier",
)


def _as_keras_moe_model(model):
    """`model` itself, or the keras_moe model a keras-hub T5/ViT backbone or
    task model converts to (`keras_moe.checkpoints.read_checkpoint`)."""
    if getattr(type(model), "MOE_STACKS", None):
        return model
    if not type(model).__module__.startswith("keras_hub"):
        return model  # `architecture` says what is wrong with it
    names = {cls.__name__ for cls in type(model).__mro__}
    if not names & set(KERAS_HUB_CLASSES):
        raise ValueError(
            f"upcycle converts keras-hub {', '.join(KERAS_HUB_CLASSES)} "
            f"models; received a keras-hub {type(model).__name__}"
        )
    try:
        return read_checkpoint(model)
    except ValueError as error:
        raise ValueError(
            f"upcycle cannot convert the keras-hub {type(model).__name__}: "
            f"{error} (convert it with keras_moe.checkpoints."
            "convert_t5_keras_hub_backbone / convert_vit_keras_hub_backbone "
            "and a config=, then upcycle the result)"
        ) from error


def _ensemble_size(model, config, ensemble_size, num_experts):
    """The M of the upcycled model, validated."""
    check_ensemble_size(ensemble_size)
    current = config.get("ensemble_size", 1)
    if ensemble_size == 1:
        return current
    if "ensemble_size" not in config:
        raise ValueError(
            f"ensemble_size={ensemble_size} (E^3) needs a model with an "
            f"ensemble_size argument (ViT); received {type(model).__name__}"
        )
    if current not in (1, ensemble_size):
        raise ValueError(
            f"the model is already an ensemble of {current} members; "
            f"received ensemble_size={ensemble_size}"
        )
    check_ensemble_size(ensemble_size, num_experts)
    return ensemble_size


def _check_ensemble_block(layer_kwargs, num_experts, ensemble_size):
    """Fails early on MoE kwargs an E^3 block cannot take."""
    per_member = num_experts // ensemble_size
    k = layer_kwargs.get("num_selected_experts", 1)
    if layer_kwargs["router"] == routing.TOKENS_CHOOSE and k > per_member:
        raise ValueError(
            f"num_selected_experts={k} exceeds the experts of one ensemble "
            f"member, num_experts / ensemble_size = {per_member}"
        )
    group_size = layer_kwargs.get("group_size")
    if group_size is not None and group_size % ensemble_size:
        raise ValueError(
            "group_size counts the tokens of all ensemble members and must "
            f"be a multiple of ensemble_size; received group_size="
            f"{group_size}, ensemble_size={ensemble_size}"
        )


_EXPERT_NAME = re.compile(r"^(?P<block>.*/mlp)/experts/(?P<weight>[^/]+)$")
_ROUTER_NAME = re.compile(r"^.*/mlp/router/kernel$")


def _copy_weights(dense, moe, num_experts, noise, noise_type, reinit, seed):
    """Copies dense weights into `moe`; tiles MLP weights into experts."""
    source = dense.canonical_variables()
    target = moe.canonical_variables()
    missing = []
    for name, variable in target.items():
        if name in source:
            variable.assign(source[name])
            continue
        match = _EXPERT_NAME.match(name)
        dense_name = match and f"{match['block']}/{match['weight']}"
        if match and dense_name in source:
            if noise == 0 and reinit == 0:
                # Broadcast in TensorFlow: assigning a NumPy broadcast view
                # would first materialise a contiguous copy of it.
                variable.assign(
                    tf.broadcast_to(source[dense_name], variable.shape)
                )
                continue
            dense_w = keras.ops.convert_to_numpy(source[dense_name])
            variable.assign(
                tile_expert_weight(
                    dense_w,
                    match["weight"],
                    num_experts,
                    noise=noise,
                    noise_type=noise_type,
                    reinit_fraction=reinit,
                    seed=(seed, zlib.crc32(match["block"].encode())),
                )
            )
            continue
        if _ROUTER_NAME.match(name):
            continue  # freshly initialised
        missing.append(name)
    if missing:
        raise ValueError(
            f"upcycle found no dense weight for {missing[:10]} in "
            f"{type(dense).__name__}"
        )


def tile_expert_weight(
    dense_w,
    weight_name,
    num_experts,
    noise=0.0,
    noise_type="multiplicative",
    reinit_fraction=0.0,
    seed=(0, 0),
):
    """<[...]> dense MLP weight -> <[E, ...]> expert weights.

    `weight_name` is the Mlp weight name ("wi", "wi_0", "wi_1", "bi", ...,
    "wo", "bo"): it says which axis holds the hidden units for
    `reinit_fraction`. `seed` (a tuple) fixes the re-drawn units per block,
    so that all weights of one expert re-draw the same hidden units.
    """
    experts = np.broadcast_to(dense_w, (num_experts,) + dense_w.shape)
    if noise == 0 and reinit_fraction == 0:
        return experts
    experts = experts.copy()
    rng = np.random.default_rng([*seed, zlib.crc32(weight_name.encode())])
    if noise > 0:
        eps = rng.normal(0.0, noise, size=experts.shape).astype(dense_w.dtype)
        if noise_type == "multiplicative":
            experts *= 1.0 + eps
        else:
            experts += eps * dense_w.std()
    if reinit_fraction > 0 and weight_name != "bo":
        # Hidden units: the last axis of wi*/bi*, the first axis of wo.
        hidden_axis = 0 if weight_name == "wo" else dense_w.ndim - 1
        hidden = dense_w.shape[hidden_axis]
        count = int(round(reinit_fraction * hidden))
        mean, std = float(dense_w.mean()), float(dense_w.std())
        for e in range(num_experts):
            units = np.random.default_rng([*seed, e]).permutation(hidden)
            index = [slice(None)] * dense_w.ndim
            index[hidden_axis] = units[:count]
            shape = experts[e][tuple(index)].shape
            experts[e][tuple(index)] = rng.normal(mean, std, size=shape)
    return experts


@dataclasses.dataclass
class UpcycleSummary:
    """What `upcycle` changed, with parameter and FLOP counts per token.

    Active parameters count, in each MoE block, the router plus the experts
    a token uses on average: K for token choice (with no drops), the
    capacity factor for expert choice (E * C / S slots per token). FLOPs per
    token are 2 x the active weight-matrix parameters (the matmuls); lookups
    into embedding tables and the attention-score terms that grow with the
    sequence length are left out. FLOPs per prediction are the whole forward
    pass of one example at the eval capacity, attention included
    (`keras_moe.models.flops.flops_per_prediction`: one image for a ViT, an
    example of 512 input and 114 target tokens for a T5); None for models that
    counter does not cover (the vision-language model).
    """

    blocks: dict
    params_before: int
    params_after: int
    active_params_before: int
    active_params_after: int
    flops_per_token_before: int
    flops_per_token_after: int
    flops_per_prediction_before: int | None = None
    flops_per_prediction_after: int | None = None

    def __str__(self):
        rows = [
            ("MoE blocks", str(self.blocks), ""),
            ("parameters", f"{self.params_before:,}", f"{self.params_after:,}"),
            (
                "active parameters / token",
                f"{self.active_params_before:,}",
                f"{self.active_params_after:,}",
            ),
            (
                "FLOPs / token (matmuls)",
                f"{self.flops_per_token_before:,}",
                f"{self.flops_per_token_after:,}",
            ),
        ]
        if self.flops_per_prediction_after is not None:
            rows.append(
                (
                    "FLOPs / prediction",
                    f"{self.flops_per_prediction_before:,}",
                    f"{self.flops_per_prediction_after:,}",
                )
            )
        lines = [f"{'':28}{'dense':>16}{'upcycled':>16}"]
        for label, before, after in rows:
            if not after:
                lines.append(f"{label:28}{before}")
            else:
                lines.append(f"{label:28}{before:>16}{after:>16}")
        return "\n".join(lines)


def summarize(dense_model, moe_model):
    """An `UpcycleSummary` comparing a dense model and its upcycled version."""
    before = _count(dense_model)
    after = _count(moe_model)
    blocks = getattr(moe_model, "upcycled_blocks", None) or {}
    return UpcycleSummary(
        blocks=blocks,
        params_before=before[0],
        params_after=after[0],
        active_params_before=before[1],
        active_params_after=after[1],
        flops_per_token_before=2 * before[2],
        flops_per_token_after=2 * after[2],
        flops_per_prediction_before=_flops_per_prediction(flops, dense_model),
        flops_per_prediction_after=_flops_per_prediction(flops, moe_model),
    )


def _flops_per_prediction(flops, model):
    """`flops.flops_per_prediction(model)`, or None where the counter does
    not cover the model's class."""
    if not flops.supports(model):
        return None
    return flops.flops_per_prediction(model)


_TABLES = ("shared/embedding", "position_embedding", "class_token")


def _count(model):
    """(total params, active params per token, active matmul params)."""
    total = active = matmul = 0
    expert_ids = {}
    for layer in moe_layers(model):
        if layer.router_type == routing.TOKENS_CHOOSE:
            per_token = layer.num_selected_experts
        else:
            factor = layer.train_capacity_factor
            per_token = layer.num_experts if factor is None else factor
        for w in layer.experts.weights:
            expert_ids[id(w)] = per_token / layer.num_experts
    for name, variable in model.canonical_variables().items():
        size = int(np.prod(variable.shape))
        total += size
        share = expert_ids.get(id(variable), 1.0)
        active += size * share
        is_table = name.endswith(_TABLES)
        # Expert weights carry a leading E axis: <[E, H]> is a bias.
        ndim = len(variable.shape) - (id(variable) in expert_ids)
        if ndim >= 2 and not is_table:
            matmul += size * share
    return total, int(round(active)), int(round(matmul))


def upcycle_checkpoint(path, num_experts=32, architecture=None, **options):
    """Reads a dense checkpoint of any supported format and upcycles it.

    Args:
        path: a T5 or ViT checkpoint (see `keras_moe.checkpoints`).
        num_experts: E.
        architecture: "t5", "vit" or None to detect.
        **options: `upcycle` options.

    Returns:
        (dense model, upcycled model).
    """
    dense = read_checkpoint(path, architecture=architecture)
    return dense, upcycle(dense, num_experts, **options)


def upcycle_to_file(checkpoint, output, architecture=None, **options):
    """Reads a dense checkpoint, upcycles it, saves the `.keras` file.

    Args:
        checkpoint: a `.keras` file or any checkpoint `read_checkpoint`
            reads.
        output: the `.keras` file to write (atomically).
        architecture: "vit", "t5" or None to detect.
        **options: `keras_moe.upcycle` arguments (num_experts, blocks, ...).

    Returns:
        The `keras_moe.upcycling.UpcycleSummary` of the dense and the
        upcycled model.
    """
    if not os.fspath(output).endswith(".keras"):
        raise ValueError(f"output must be a .keras file; received {output!r}")
    dense = load_model(checkpoint, architecture)
    moe = upcycle(dense, **options)
    save_keras(moe, output)
    return summarize(dense, moe)
