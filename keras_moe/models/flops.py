"""Forward FLOPs of keras_moe models, per example, by component.

Shape letters: T tokens of an image or encoder input, U decoder (target)
tokens, N patches, P patch size, Ci image channels, D model dimension,
H (F) MLP hidden dimension, h*dk (N*Dh) attention inner dimension, E experts,
K experts per token, M ensemble members, S tokens per routing group, C
expert capacity, V vocabulary.

Conventions:

* One multiply-add is 2 FLOPs: a <[m, k]> x <[k, n]> matmul is `2*m*k*n`.
* Counted: every matmul and einsum of the forward pass. For a `ViT`: the
  patch embedding (a convolution, `2*N*P*P*Ci*D`), the query, key, value
  and output projections (`8*T*D*D` per block), the attention scores
  `Q K^T` and the attention-weighted values (`2*T*T*D` each per block), the
  MLPs (`2*T*D*H` per input kernel, two when the activation is gated, plus
  `2*T*H*D`), the routers (`2*T*D*E`) and the head (`2*D*classes`). For a
  `T5`: the same attention and MLP terms in both stacks (`N*Dh` in place of
  D for the inner dimension; the encoder with T tokens, the decoder with U),
  the decoder's cross-attention (queries and output on U tokens, keys and
  values on the T encoder outputs, scores and values `2*U*T*N*Dh` each),
  and the logits (`2*U*D*V`). Causal masking does not shrink the count:
  the full U x U scores are computed.
* MoE experts are counted per *processed slot*, the compute actually done:
  each expert runs its MLP on all C slots it has in each group, filled or
  not. Expert choice fills E*C slots per group by construction; token
  choice wants K*S of them and drops what does not fit. Either way the
  experts' matmuls run on E*C rows per group, C from the layer's own
  capacity rule (`MoeLayer.capacity`: the eval capacity factor for a
  forward pass, the train factor for a training step). With
  `group_size=None` a sequence is a group (S = T); with a `group_size`,
  tokens are packed into groups across examples and an example is charged
  T/S groups (the amortised rate of a batch whose tokens fill whole
  groups; the padding of a last partial group is not charged). A layer
  that dispatches dropless in that mode (`MoeLayer.dispatches_dropless`:
  `dispatcher="dropless"`, or "auto" with no capacity factor) runs each
  token through exactly its K experts: K*T rows per example.
* E^3 (`ensemble_size=M`): the batch is tiled M times before the first MoE
  block, so everything from that block on (attention, MLPs, MoE blocks,
  final pooling and head) runs M times per example; each member routes its
  T tokens among E/M experts (router `2*T*D*E/M` per member) with the
  layer's per-member capacity. FLOPs per prediction are those of all M
  members: one averaged prediction costs them all.
* Neglected (not matmuls, and at most a few per cent of the total for
  realistic sizes): biases, softmax, normalisation layers, activations,
  residual additions, dropout, position embeddings and their lookups,
  the class token, pooling, the ensemble average, routing itself (top-k,
  sorting, cumulative sums) and the dispatch and combine data movement
  (gathers and segment sums; the one-hot `einsum` dispatcher used on TPU
  would add `2*S*E*C*D` per group for each of dispatch and combine).
* The count is for one forward pass over whole sequences (training, or
  scoring with teacher forcing); incremental decoding with a key/value
  cache does less attention work.
* A training step is counted as 3 forward passes (`training_step_flops`):
  the backward pass of a matmul computes two matmuls of the forward's size
  (gradients with respect to its input and to its weight), the usual
  approximation of Kaplan et al. (2020). It uses the training capacity.

The test checks these counts against hand counts and against TensorFlow's
own per-op FLOPs statistics of the traced graph.
"""

import fractions

from keras_moe.layers.ensemble import EnsembleMoeLayer
from keras_moe.layers.mlp import get_activation
from keras_moe.layers.moe import MoeLayer

# Backward = 2 x forward for matmuls; a training step is 3 forward passes.
TRAINING_STEP_FORWARD_PASSES = 3
# Default T5 lengths when none are given: the T5 paper's span-corruption
# pre-training inputs (512 tokens) and targets (114 tokens).
DEFAULT_T5_LENGTHS = (512, 114)


def _mlp_flops(tokens, model_dim, hidden_dim, activation):
    """FLOPs of a (dense) MLP on `tokens` rows."""
    _, gated = get_activation(activation)
    return 2 * tokens * model_dim * hidden_dim * (2 + int(gated))


def _moe_flops(layer, tokens, model_dim, training, rows=1):
    """(router FLOPs, expert FLOPs) of a MoE block per example.

    Args:
        layer: a `MoeLayer` (or `EnsembleMoeLayer`).
        tokens: tokens of one example in one row (one member's copy).
        model_dim: D.
        training: picks the capacity factor.
        rows: copies of the example the layer sees (M after E^3 tiling).

    Returns:
        Two `fractions.Fraction`s (whole numbers unless a `group_size` does
        not divide the example's tokens).
    """
    members = layer.ensemble_size if isinstance(layer, EnsembleMoeLayer) else 1
    experts = layer.experts_per_router
    if layer.group_size is None:
        group = tokens
    else:
        # An E^3 group_size counts the tokens of all members: S/M each.
        group = layer.group_size // members
    routed_tokens = rows * tokens
    groups = fractions.Fraction(routed_tokens, group)
    per_slot = _mlp_flops(1, model_dim, layer.hidden_dim, layer.activation)
    router = 2 * routed_tokens * model_dim * experts
    if layer.dispatches_dropless(training):
        # Each token runs through exactly its K experts.
        routed = routed_tokens * layer.num_selected_experts
        return fractions.Fraction(router), fractions.Fraction(routed) * per_slot
    capacity = layer.capacity(group, training)
    return fractions.Fraction(router), groups * experts * capacity * per_slot


def _add(counts, name, value):
    if value:
        counts[name] = counts.get(name, 0) + value


def _attention(counts, prefix, queries, keys, model_dim, inner_dim, rows=1):
    """Self-attention (keys is None) or cross-attention FLOPs."""
    cross = keys is not None
    keys = queries if keys is None else keys
    # query and output projections on the queries; key and value on keys.
    projections = 2 * 2 * queries * model_dim * inner_dim
    projections += 2 * 2 * keys * model_dim * inner_dim
    name = f"{prefix}/{'cross_' if cross else ''}attention"
    _add(counts, f"{name}_projections", rows * projections)
    _add(counts, f"{name}_scores", rows * 2 * queries * keys * inner_dim)
    _add(counts, f"{name}_values", rows * 2 * queries * keys * inner_dim)


def _mlp_block(counts, prefix, mlp, tokens, model_dim, training, rows=1):
    """A block's MLP: dense or MoE."""
    if isinstance(mlp, MoeLayer):
        router, experts = _moe_flops(mlp, tokens, model_dim, training, rows)
        _add(counts, f"{prefix}/router", router)
        _add(counts, f"{prefix}/experts", experts)
    else:
        flops = _mlp_flops(tokens, model_dim, mlp.hidden_dim, mlp.activation)
        _add(counts, f"{prefix}/mlp", rows * flops)


def _vit_flops(model, training):
    counts = {}
    d = model.model_dim
    # A P x P x Ci -> D projection of each of the N patches.
    patch_inputs = model.patch_size**2 * model.num_channels
    _add(counts, "patch_embedding", 2 * model.num_patches * patch_inputs * d)
    tokens = model.num_tokens
    first_moe = model.first_moe_block
    rows = 1
    for index, block in enumerate(model.blocks):
        if model.ensemble_size > 1 and index == first_moe:
            rows = model.ensemble_size
        _attention(counts, "encoder", tokens, None, d, d, rows)
        _mlp_block(counts, "encoder", block.mlp, tokens, d, training, rows)
    if model.head is not None:
        _add(counts, "head", rows * 2 * d * model.num_classes)
    return counts


def _t5_flops(model, input_length, target_length, training):
    counts = {}
    d = model.model_dim
    inner = model.num_heads * model.head_dim
    for block in model.encoder.blocks:
        _attention(counts, "encoder", input_length, None, d, inner)
        _mlp_block(counts, "encoder", block.mlp, input_length, d, training)
    for block in model.decoder.blocks:
        _attention(counts, "decoder", target_length, None, d, inner)
        _attention(counts, "decoder", target_length, input_length, d, inner)
        _mlp_block(counts, "decoder", block.mlp, target_length, d, training)
    _add(counts, "logits", 2 * target_length * d * model.vocab_size)
    return counts


def _check_length(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1; received {value!r}")


def supports(model):
    """Whether the counter covers `model` (a keras_moe ViT or T5)."""
    from keras_moe.models.t5 import T5
    from keras_moe.models.vit import ViT

    return isinstance(model, (ViT, T5))


def flops_breakdown(
    model, input_length=None, target_length=None, training=False
):
    """Forward FLOPs per example, by component (see the module docstring).

    Args:
        model: a keras_moe `ViT` (dense, MoE or E^3) or `T5` (dense or MoE).
        input_length: T5 encoder length T (default 512). ViT: must be None,
            its token count follows from its image size.
        target_length: T5 decoder length U (default 114). ViT: None.
        training: count MoE experts at the training capacity factor.

    Returns:
        A dict {component: int FLOPs per example}, components with zero
        FLOPs left out. ViT: "patch_embedding", "encoder/attention_*",
        "encoder/mlp", "encoder/router", "encoder/experts", "head". T5:
        "encoder/...", "decoder/...", "decoder/cross_attention_*",
        "logits". Values are rounded to the nearest integer only when a
        MoE `group_size` does not divide the tokens of an example.

    Example:

    >>> from keras_moe.models.vit import ViT
    >>> model = ViT(image_size=8, patch_size=4, num_channels=1, model_dim=8,
    ...             num_heads=2, hidden_dim=16, num_layers=1, num_classes=3)
    >>> flops_breakdown(model)["encoder/attention_scores"]  # 2 * 5 * 5 * 8
    400
    """
    from keras_moe.models.t5 import T5
    from keras_moe.models.vit import ViT

    if not isinstance(training, bool):
        raise ValueError(f"training must be a bool; received {training!r}")
    if isinstance(model, ViT):
        if input_length is not None or target_length is not None:
            raise ValueError(
                "A ViT's token count follows from its image size: pass no "
                f"input_length/target_length (received {input_length!r}, "
                f"{target_length!r}); use ViT.with_image_size for another "
                "size"
            )
        counts = _vit_flops(model, training)
    elif isinstance(model, T5):
        default_input, default_target = DEFAULT_T5_LENGTHS
        input_length = default_input if input_length is None else input_length
        target_length = (
            default_target if target_length is None else target_length
        )
        _check_length("input_length", input_length)
        _check_length("target_length", target_length)
        counts = _t5_flops(model, input_length, target_length, training)
    else:
        raise ValueError(
            "flops_breakdown counts keras_moe ViT and T5 models; received "
            f"{type(model).__name__}"
        )
    return {name: int(round(value)) for name, value in counts.items()}


def forward_flops(model, input_length=None, target_length=None, training=False):
    """Forward FLOPs of one example: the sum of `flops_breakdown`.

    Args:
        model: a keras_moe `ViT` or `T5`.
        input_length, target_length: T5 sequence lengths (see
            `flops_breakdown`).
        training: count MoE experts at the training capacity factor.

    Returns:
        An int.

    Example:

    >>> from keras_moe.models.vit import ViT
    >>> forward_flops(ViT(image_size=8, patch_size=4, num_channels=1,
    ...                   model_dim=8, num_heads=2, hidden_dim=16,
    ...                   num_layers=1, num_classes=3))
    6992
    """
    return sum(
        flops_breakdown(model, input_length, target_length, training).values()
    )


def training_step_flops(model, input_length=None, target_length=None):
    """FLOPs of one training step per example: 3 forward passes at the
    training capacity (backward = 2 x forward for matmuls).

    Args:
        model: a keras_moe `ViT` or `T5`.
        input_length, target_length: T5 sequence lengths.

    Returns:
        An int.
    """
    return TRAINING_STEP_FORWARD_PASSES * forward_flops(
        model, input_length, target_length, training=True
    )


def flops_per_prediction(model, input_length=None, target_length=None):
    """Inference FLOPs of one prediction (eval capacity).

    For a ViT one prediction is one image's class distribution; for an E^3
    ViT it is the averaged prediction of all M members, so it includes
    their M-fold work from the first MoE block on. For a T5 it is one
    teacher-forced forward pass of an example of `input_length` input and
    `target_length` target tokens (default 512 and 114).

    Args:
        model: a keras_moe `ViT` or `T5`.
        input_length, target_length: T5 sequence lengths.

    Returns:
        An int.
    """
    return forward_flops(model, input_length, target_length, training=False)
