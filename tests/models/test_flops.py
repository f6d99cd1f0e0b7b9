"""FLOPs counter: hand counts for tiny ViTs (dense, MoE, E^3) and T5s, and
TensorFlow's own per-op FLOPs statistics of the traced forward graph.

The hand counts below are written out term by term from the shapes (2 FLOPs
per multiply-add); nothing is computed with keras_moe.models.flops' helpers.
"""

import sys

import keras
import pytest
import tensorflow as tf

from keras_moe.models import flops
from keras_moe.models.t5 import T5
from keras_moe.models.vit import ViT

# 8x8 RGB images, 4x4 patches: N=4 patches, T=5 tokens; D=8, H=16, 5 classes.
VIT = dict(
    image_size=8,
    patch_size=4,
    num_channels=3,
    model_dim=8,
    num_heads=2,
    hidden_dim=16,
    num_layers=2,
    num_classes=5,
)
# Per block, T=5, D=8, H=16:
PATCH = 2 * 4 * (4 * 4 * 3) * 8  # 2 * N * P*P*Ci * D = 3072
PROJECTIONS = 4 * 2 * 5 * 8 * 8  # q, k, v, o: 2560
SCORES = 2 * 5 * 5 * 8  # Q K^T: 400
VALUES = 2 * 5 * 5 * 8  # P V: 400
MLP = 2 * 5 * 8 * 16 + 2 * 5 * 16 * 8  # 2560
PER_SLOT = 2 * 8 * 16 + 2 * 16 * 8  # one expert on one slot: 512
HEAD = 2 * 8 * 5  # 80
MOE = dict(
    num_experts=4,
    router="tokens_choose",
    num_selected_experts=2,
    train_capacity_factor=1.0,
    eval_capacity_factor=2.0,
    min_expert_capacity=1,
)

# TensorFlow ops whose FLOPs are the matmuls and convolutions counted here.
MATMUL_OPS = ("MatMul", "BatchMatMul", "BatchMatMulV2", "Conv2D", "Einsum")


def test_dense_vit_hand_count():
    model = ViT(**VIT)
    expected = {
        "patch_embedding": PATCH,
        "encoder/attention_projections": 2 * PROJECTIONS,
        "encoder/attention_scores": 2 * SCORES,
        "encoder/attention_values": 2 * VALUES,
        "encoder/mlp": 2 * MLP,
        "head": HEAD,
    }
    assert flops.flops_breakdown(model) == expected
    assert flops.forward_flops(model) == 14992 == sum(expected.values())
    assert flops.flops_per_prediction(model) == 14992
    # No MoE block: training changes nothing; a step is 3 forward passes.
    assert flops.training_step_flops(model) == 3 * 14992


def test_moe_vit_hand_count_counts_capacity_slots():
    model = ViT(**VIT, encoder_moe_blocks={1: MOE})
    # Block 1: router 2*T*D*E = 320. Token choice K=2, S=5, E=4:
    # eval C = ceil(2*5*2.0/4) = 5 (capped at S=5), 4*5 = 20 slots;
    # train C = ceil(2*5*1.0/4) = 3, 12 slots: every slot is computed.
    common = PATCH + 2 * (PROJECTIONS + SCORES + VALUES) + MLP + HEAD
    eval_expected = common + 320 + 20 * PER_SLOT
    train_expected = common + 320 + 12 * PER_SLOT
    breakdown = flops.flops_breakdown(model)
    assert breakdown["encoder/router"] == 320
    assert breakdown["encoder/experts"] == 20 * PER_SLOT == 10240
    assert breakdown["encoder/mlp"] == MLP
    assert flops.forward_flops(model) == eval_expected == 22992
    assert flops.forward_flops(model, training=True) == train_expected
    assert flops.training_step_flops(model) == 3 * train_expected == 56688

    # Expert choice: C = ceil(S * 1.0 / E) = 2, E*C = 8 slots.
    choice = dict(
        num_experts=4,
        router="experts_choose",
        eval_capacity_factor=1.0,
        min_expert_capacity=1,
    )
    model = ViT(**VIT, encoder_moe_blocks={1: choice})
    assert flops.flops_breakdown(model)["encoder/experts"] == 8 * PER_SLOT

    # group_size=4 packs tokens across images: 5/4 groups per image, each
    # with E*C = 4 * ceil(1*4*1.0/4) = 4 slots: 5 slots per image.
    grouped = dict(MOE, num_selected_experts=1, group_size=4)
    grouped["eval_capacity_factor"] = 1.0
    model = ViT(**VIT, encoder_moe_blocks={1: grouped})
    assert flops.flops_breakdown(model)["encoder/experts"] == 5 * PER_SLOT


def test_dropless_layers_count_the_routed_tokens_only():
    # Dropless dispatch runs each of the T=5 tokens through its K=2
    # experts: 10 rows, whatever the capacity factors say.
    dropless = dict(MOE, dispatcher="dropless")
    model = ViT(**VIT, encoder_moe_blocks={1: dropless})
    for training in (False, True):
        breakdown = flops.flops_breakdown(model, training=training)
        assert breakdown["encoder/experts"] == 10 * PER_SLOT, training
    # "auto" is dropless where the mode's capacity factor is None only.
    auto = dict(MOE, eval_capacity_factor=None)
    model = ViT(**VIT, encoder_moe_blocks={1: auto})
    assert flops.flops_breakdown(model)["encoder/experts"] == 10 * PER_SLOT
    train = flops.flops_breakdown(model, training=True)
    assert train["encoder/experts"] == 12 * PER_SLOT


def test_e3_vit_counts_every_member_after_the_tiling():
    moe = dict(MOE, num_selected_experts=1)
    model = ViT(**VIT, encoder_moe_blocks={1: moe}, ensemble_size=2)
    # Tiled at block 1 (the first MoE block): block 1's attention, the MoE
    # block and the head run for M=2 members. Each member routes its T=5
    # tokens among E/M=2 experts: router 2*5*8*2 = 160 per member, C =
    # ceil(1*5*2.0/2) = 5, 2*5 = 10 slots per member.
    expected = {
        "patch_embedding": PATCH,
        "encoder/attention_projections": PROJECTIONS + 2 * PROJECTIONS,
        "encoder/attention_scores": SCORES + 2 * SCORES,
        "encoder/attention_values": VALUES + 2 * VALUES,
        "encoder/mlp": MLP,
        "encoder/router": 2 * 160,
        "encoder/experts": 2 * 10 * PER_SLOT,
        "head": 2 * HEAD,
    }
    assert flops.flops_breakdown(model) == expected
    assert flops.flops_per_prediction(model) == 26432


T5_SIZES = dict(
    vocab_size=20,
    model_dim=8,
    num_heads=2,
    head_dim=3,  # inner dimension N*Dh = 6, not D
    hidden_dim=16,
    num_encoder_layers=1,
    num_decoder_layers=1,
    relative_attention_num_buckets=4,
    relative_attention_max_distance=8,
)


def test_dense_t5_hand_count():
    model = T5(**T5_SIZES)
    # T=7 encoder tokens, U=4 decoder tokens, D=8, inner 6, F=16, V=20.
    expected = {
        "encoder/attention_projections": 4 * 2 * 7 * 8 * 6,  # 2688
        "encoder/attention_scores": 2 * 7 * 7 * 6,  # 588
        "encoder/attention_values": 2 * 7 * 7 * 6,
        "encoder/mlp": 2 * 2 * 7 * 8 * 16,  # 3584
        "decoder/attention_projections": 4 * 2 * 4 * 8 * 6,  # 1536
        "decoder/attention_scores": 2 * 4 * 4 * 6,  # full U x U: 192
        "decoder/attention_values": 2 * 4 * 4 * 6,
        # q and output on U=4 tokens, k and v on the T=7 encoder outputs.
        "decoder/cross_attention_projections": 2 * 2 * 4 * 8 * 6
        + 2 * 2 * 7 * 8 * 6,  # 2112
        "decoder/cross_attention_scores": 2 * 4 * 7 * 6,  # 336
        "decoder/cross_attention_values": 2 * 4 * 7 * 6,
        "decoder/mlp": 2 * 2 * 4 * 8 * 16,  # 2048
        "logits": 2 * 4 * 8 * 20,  # 1280
    }
    breakdown = flops.flops_breakdown(model, input_length=7, target_length=4)
    assert breakdown == expected
    assert flops.forward_flops(model, 7, 4) == 15480

    # v1.1: gated MLP (three kernels), untied lm_head of the same size.
    gated = T5(**T5_SIZES, activation="gated_gelu", tie_embeddings=False)
    breakdown = flops.flops_breakdown(gated, 7, 4)
    assert breakdown["encoder/mlp"] == 3 * 2 * 7 * 8 * 16
    assert breakdown["decoder/mlp"] == 3 * 2 * 4 * 8 * 16
    assert breakdown["logits"] == 1280

    # Default lengths: the T5 paper's 512 inputs and 114 targets.
    assert flops.forward_flops(model) == flops.forward_flops(model, 512, 114)


def test_moe_t5_hand_count():
    model = T5(
        **T5_SIZES,
        encoder_moe_blocks={
            0: dict(
                num_experts=2,
                router="experts_choose",
                eval_capacity_factor=2.0,
                min_expert_capacity=1,
            )
        },
        decoder_moe_blocks={
            0: dict(
                num_experts=2,
                num_selected_experts=1,
                eval_capacity_factor=1.0,
                min_expert_capacity=1,
            )
        },
    )
    breakdown = flops.flops_breakdown(model, 7, 4)
    # Encoder: S=T=7, expert choice C = ceil(7*2.0/2) = 7, 2*7 = 14 slots.
    assert breakdown["encoder/router"] == 2 * 7 * 8 * 2
    assert breakdown["encoder/experts"] == 14 * PER_SLOT
    # Decoder: S=U=4, token choice K=1, C = ceil(4*1.0/2) = 2, 4 slots.
    assert breakdown["decoder/router"] == 2 * 4 * 8 * 2
    assert breakdown["decoder/experts"] == 4 * PER_SLOT
    assert "encoder/mlp" not in breakdown and "decoder/mlp" not in breakdown


def _tf_graph_flops(function, *specs):
    """{op type: FLOPs} of the traced graph, from TensorFlow's profiler
    (its FLOPs statistics registry), per op type."""
    graph = tf.function(function).get_concrete_function(*specs).graph
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    profile = tf.compat.v1.profiler.profile(
        graph=graph, cmd="op", options=options
    )
    # The "op" view is a chain of op types, each node's own float_ops.
    per_type, nodes = {}, list(profile.children)
    while nodes:
        node = nodes.pop()
        per_type[node.name] = node.float_ops
        nodes.extend(node.children)
    assert sum(per_type.values()) == profile.total_float_ops
    return per_type


def _matmul_flops(per_type):
    return sum(v for k, v in per_type.items() if k in MATMUL_OPS)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"encoder_moe_blocks": {1: MOE}},
        {
            "encoder_moe_blocks": {1: dict(MOE, num_selected_experts=1)},
            "ensemble_size": 2,
        },
    ],
    ids=["dense", "moe", "e3"],
)
def test_vit_matmuls_match_tensorflow_statistics(kwargs):
    """TensorFlow's matmul and convolution FLOPs of a traced batch of 3
    equal 3 x the count: the MoE experts run on E*C slots per group."""
    model = ViT(**VIT, **kwargs)
    per_type = _tf_graph_flops(
        lambda x: model(x, training=False), tf.TensorSpec((3, 8, 8, 3))
    )
    assert _matmul_flops(per_type) == 3 * flops.forward_flops(model)


def test_t5_matmuls_match_tensorflow_statistics():
    model = T5(**T5_SIZES)
    per_type = _tf_graph_flops(
        lambda e, d: model({"encoder_token_ids": e, "decoder_token_ids": d}),
        tf.TensorSpec((2, 7), tf.int32),
        tf.TensorSpec((2, 4), tf.int32),
    )
    assert _matmul_flops(per_type) == 2 * flops.forward_flops(model, 7, 4)


def test_all_tensorflow_float_ops_are_within_five_percent():
    """At a less toy size (D=64, H=256, 65 tokens) what the count neglects
    (biases, norms, softmax, activations, residuals) is under 5% of all the
    float operations TensorFlow's statistics count."""
    model = ViT(
        image_size=32,
        patch_size=4,
        num_channels=3,
        model_dim=64,
        num_heads=4,
        hidden_dim=256,
        num_layers=2,
        num_classes=10,
    )
    per_type = _tf_graph_flops(
        lambda x: model(x, training=False), tf.TensorSpec((1, 32, 32, 3))
    )
    count = flops.forward_flops(model)
    assert _matmul_flops(per_type) == count
    assert count <= sum(per_type.values()) <= 1.05 * count


def test_bad_input():
    vit = ViT(**VIT)
    with pytest.raises(ValueError, match="token count follows from its image"):
        flops.forward_flops(vit, input_length=5)
    with pytest.raises(ValueError, match="training must be a bool"):
        flops.forward_flops(vit, training="yes")
    t5 = T5(**T5_SIZES)
    with pytest.raises(ValueError, match="input_length must be an int >= 1"):
        flops.forward_flops(t5, input_length=0)
    with pytest.raises(ValueError, match="target_length must be an int >= 1"):
        flops.forward_flops(t5, 7, 2.5)
    with pytest.raises(ValueError, match="counts keras_moe ViT and T5"):
        flops.forward_flops(keras.Sequential())


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))
