"""Sparse upcycling: function preservation, training, optimizer reuse."""

import sys

import keras
import numpy as np
import pytest

from keras_moe import upcycling
from keras_moe.layers.moe import MoeLayer
from keras_moe.models import flops
from keras_moe.models import moe_layers
from keras_moe.models.vit import ViT

_LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
_NO_AUX = {"router_z_loss_weight": 0.0, "load_balancing_loss_weight": 0.0}


def _np(x):
    return keras.ops.convert_to_numpy(x)


@pytest.fixture(scope="module")
def vit():
    """A tiny dense ViT with a trained-looking (non-zero) head."""
    keras.utils.set_random_seed(0)
    model = ViT.from_architecture("vit_tiny", num_layers=4)
    head = model.canonical_variables()["head/kernel"]
    head.assign(np.random.default_rng(0).normal(size=head.shape))
    return model


def _images(model, n=4, seed=0):
    shape = (n, *model.image_hw, model.num_channels)
    return np.random.default_rng(seed).uniform(size=shape).astype("float32")


def test_defaults_follow_the_paper(vit):
    moe = upcycling.upcycle(vit, num_experts=8)
    assert moe.upcycled_blocks == {"encoder": [1, 3]}
    layers = [b.mlp for b in moe.blocks]
    assert [isinstance(layer, MoeLayer) for layer in layers] == [
        False,
        True,
        False,
        True,
    ]
    layer = layers[1]
    assert layer.router_type == "experts_choose"
    assert layer.train_capacity_factor == 2.0
    assert layer.normalize_combine_weights  # vision
    assert layer.num_experts == 8
    assert all(isinstance(b.mlp, keras.Layer) for b in vit.blocks)
    assert not any(isinstance(b.mlp, MoeLayer) for b in vit.blocks)


@pytest.mark.parametrize("k", [1, 2])
def test_token_choice_preserves_the_function(vit, k):
    x = _images(vit)
    moe = upcycling.upcycle(
        vit,
        num_experts=8,
        blocks="all",
        encoder_router="tokens_choose",
        num_selected_experts=k,
        eval_capacity_factor=None,
    )
    np.testing.assert_allclose(_np(moe(x)), _np(vit(x)), atol=1e-5, rtol=0)


def test_expert_choice_reproduces_every_covered_token(vit):
    """Tokens some expert took equal the dense MLP; the others get zeros."""
    moe = upcycling.upcycle(
        vit,
        num_experts=8,
        blocks=[0],
        train_capacity_factor=0.5,
        eval_capacity_factor=0.5,
        moe_kwargs={"min_expert_capacity": 1},
        router_kernel_initializer=keras.initializers.RandomNormal(
            stddev=1.0, seed=1
        ),
    )
    dense_block, moe_block = vit.blocks[0], moe.blocks[0]
    tokens = (
        np.random.default_rng(2)
        .normal(size=(4, vit.num_tokens, vit.model_dim))
        .astype("float32")
    )
    h = _np(dense_block.mlp_norm(tokens))
    dense_out = _np(dense_block.mlp(h))
    moe_out = _np(moe_block.mlp(h))
    routed = moe_block.mlp.router.route(
        h, moe_block.mlp.capacity(h.shape[1], training=False)
    )
    covered = _np(routed.instructions.token_coverage()) > 0
    assert 0 < covered.mean() < 1  # the case has covered and dropped tokens
    np.testing.assert_allclose(moe_out[covered], dense_out[covered], atol=1e-5)
    np.testing.assert_array_equal(moe_out[~covered], 0.0)


def test_options_select_blocks(vit):
    assert upcycling.upcycle(vit, 4, blocks="all").upcycled_blocks == {
        "encoder": [0, 1, 2, 3]
    }
    assert upcycling.upcycle(
        vit, 4, blocks="last_n", last_n=1
    ).upcycled_blocks == {"encoder": [3]}
    assert upcycling.upcycle(vit, 4, blocks=[0, 2]).upcycled_blocks == {
        "encoder": [0, 2]
    }


def test_expert_noise_and_reinit_break_symmetry(vit):
    clean = upcycling.upcycle(vit, 4, blocks=[1])
    noisy = upcycling.upcycle(vit, 4, blocks=[1], expert_noise=0.01)
    dropped = upcycling.upcycle(vit, 4, blocks=[1], reinit_fraction=0.5)
    dense_wi = _np(vit.canonical_variables()["encoder/block_1/mlp/wi"])
    name = "encoder/block_1/mlp/experts/wi"
    clean_wi = _np(clean.canonical_variables()[name])
    noisy_wi = _np(noisy.canonical_variables()[name])
    dropped_wi = _np(dropped.canonical_variables()[name])
    np.testing.assert_array_equal(clean_wi, np.stack([dense_wi] * 4))
    ratio = noisy_wi / dense_wi
    assert 0.005 < np.std(ratio) < 0.02  # multiplicative noise of std 0.01
    assert not np.allclose(noisy_wi[0], noisy_wi[1])
    # Drop-Upcycling: half of each expert's hidden units are re-drawn, the
    # same units across wi and wo, different units for different experts.
    hidden = dense_wi.shape[1]
    kept_cols = [np.all(dropped_wi[e] == dense_wi, axis=0) for e in range(4)]
    assert all(k.sum() == hidden - hidden // 2 for k in kept_cols)
    assert not np.array_equal(kept_cols[0], kept_cols[1])
    dense_wo = _np(vit.canonical_variables()["encoder/block_1/mlp/wo"])
    dropped_wo = _np(
        dropped.canonical_variables()["encoder/block_1/mlp/experts/wo"]
    )
    kept_rows = np.all(dropped_wo[0] == dense_wo, axis=1)
    np.testing.assert_array_equal(kept_rows, kept_cols[0])


def test_trains_saves_and_reports_aux_losses(vit, tmp_path):
    moe = upcycling.upcycle(vit, num_experts=4)
    x = _images(vit, n=16)
    y = np.arange(16) % vit.num_classes
    moe.compile(optimizer=keras.optimizers.Adam(3e-3), loss=_LOSS)
    history = moe.fit(x, y, batch_size=8, epochs=4, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    moe(x, training=True)
    assert len(moe.losses) == 2  # one router z-loss per MoE block
    path = str(tmp_path / "upcycled.keras")
    moe.save(path)
    restored = keras.models.load_model(path)
    np.testing.assert_array_equal(_np(restored(x)), _np(moe(x)))


@pytest.mark.parametrize(
    "kwargs", [{"state": "copy"}, {"expert_gradient_share": 1.0}]
)
def test_optimizer_reuse_continues_the_dense_step(vit, kwargs):
    """Top-1 with a zero router sends every token to expert 0 with weight 1,
    so expert 0 sees exactly the dense MLP's gradients (a share of 1, not
    the 1/E a uniform router gives on average, which the default estimate
    assumes: tests/upcycling/test_optimizer_state.py): with the tiled Adam
    moments and the copied step count, its update equals the dense update,
    and so does every shared weight's. A fresh optimizer would differ."""
    dense = ViT.from_config(vit.get_config())
    dense.set_weights(vit.get_weights())
    x = _images(dense, n=8)
    y = np.arange(8) % dense.num_classes
    dense.compile(optimizer=keras.optimizers.Adam(1e-2), loss=_LOSS)
    dense.fit(x, y, batch_size=8, epochs=2, verbose=0)
    moe = upcycling.upcycle(
        dense,
        num_experts=4,
        encoder_router="tokens_choose",
        num_selected_experts=1,
        train_capacity_factor=None,
        eval_capacity_factor=None,
        router_kernel_initializer="zeros",
        moe_kwargs=_NO_AUX,
    )
    fresh = upcycling.upcycle(
        dense,
        num_experts=4,
        encoder_router="tokens_choose",
        num_selected_experts=1,
        train_capacity_factor=None,
        eval_capacity_factor=None,
        router_kernel_initializer="zeros",
        moe_kwargs=_NO_AUX,
    )
    moe.compile(
        optimizer=upcycling.upcycle_optimizer(
            dense.optimizer, dense, moe, **kwargs
        ),
        loss=_LOSS,
    )
    fresh.compile(optimizer=keras.optimizers.Adam(1e-2), loss=_LOSS)
    assert int(moe.optimizer.iterations) == int(dense.optimizer.iterations)
    for model in (dense, moe, fresh):
        model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    dense_vars = dense.canonical_variables()

    def max_error(model):
        errors = []
        for name, variable in model.canonical_variables().items():
            if name.endswith("attention/key/bias"):
                # Softmax ignores a bias shared by all keys: its gradient is
                # rounding noise, which Adam's normalisation blows up.
                continue
            if name in dense_vars:
                expected = _np(dense_vars[name])
                actual = _np(variable)
            elif "/experts/" in name:
                expected = _np(dense_vars[name.replace("experts/", "")])
                actual = _np(variable)[0]
            else:
                continue
            errors.append(np.abs(expected - actual).max())
        return max(errors)

    assert max_error(moe) < 1e-6
    assert max_error(fresh) > 1e-3  # the check can tell


def test_fit_reports_routing_metrics_per_moe_layer(vit):
    from keras_moe.models.t5 import T5

    moe = upcycling.upcycle(vit, num_experts=4, blocks="all")
    moe.compile(optimizer="adam", loss=_LOSS)
    x = _images(vit, n=8)
    history = moe.fit(x, np.arange(8) % vit.num_classes, verbose=0)
    for index in range(vit.num_layers):
        for name in ("dropped", "confidence", "max_load"):
            assert f"block_{index}_moe_{name}" in history.history
    t5 = upcycling.upcycle(T5.from_architecture("t5_tiny"), num_experts=4)
    names = [m.name for layer in moe_layers(t5) for m in layer.metrics]
    assert "encoder_block_1_moe_dropped" in names
    assert "decoder_block_1_moe_dropped" in names
    assert len(names) == len(set(names))


def test_summary_counts(vit):
    moe = upcycling.upcycle(vit, num_experts=8, blocks=[1])
    summary = upcycling.summarize(vit, moe)
    d, h = vit.model_dim, vit.hidden_dim
    mlp = d * h + h + h * d + d
    assert summary.params_after - summary.params_before == 7 * mlp + d * 8
    # Expert choice with capacity factor 2: two experts per token on average.
    assert summary.active_params_after - summary.active_params_before == (
        mlp + d * 8
    )
    assert summary.flops_per_token_after - summary.flops_per_token_before == (
        # Two experts' matmuls (2 * 2DH) instead of one MLP's (2DH), plus
        # the router's DE; 2 FLOPs per multiply-add.
        2
        * (2 * 2 * d * h - 2 * d * h + d * 8)
    )
    # Whole forward passes, counted (and tested) by keras_moe.models.flops.
    assert summary.flops_per_prediction_before == flops.forward_flops(vit)
    assert summary.flops_per_prediction_after == flops.flops_per_prediction(moe)
    assert summary.flops_per_prediction_after > (
        summary.flops_per_prediction_before
    )
    assert "MoE blocks" in str(summary)
    assert "FLOPs / prediction" in str(summary)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"num_experts": 0}, "num_experts must be an int >= 1"),
        ({"num_experts": 4, "blocks": [7]}, r"block indices \[7\] are out"),
        ({"num_experts": 4, "blocks": "odd"}, "blocks must be"),
        ({"num_experts": 4, "blocks": "last_n"}, "needs an int last_n"),
        ({"num_experts": 4, "blocks": "none"}, "selects no MLP block"),
        ({"num_experts": 4, "encoder_router": "soft"}, "router of the encoder"),
        ({"num_experts": 4, "reinit_fraction": 2.0}, "reinit_fraction"),
        ({"num_experts": 4, "expert_noise_type": "x"}, "expert_noise_type"),
        ({"num_experts": 4, "blocks": {"decoder": [0]}}, "unknown stacks"),
    ],
)
def test_bad_arguments(vit, kwargs, match):
    with pytest.raises(ValueError, match=match):
        upcycling.upcycle(vit, **kwargs)


def test_refuses_models_it_does_not_know():
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    with pytest.raises(ValueError, match="upcycle needs a keras_moe model"):
        upcycling.upcycle(model, 4)


def test_refuses_blocks_that_are_already_moe(vit):
    moe = upcycling.upcycle(vit, 4, blocks=[1])
    with pytest.raises(ValueError, match=r"blocks \[1\] are already MoE"):
        upcycling.upcycle(moe, 4, blocks=[1])


def test_refuses_a_foreign_optimizer(vit):
    moe = upcycling.upcycle(vit, 4)
    with pytest.raises(ValueError, match="no state yet"):
        upcycling.upcycle_optimizer(keras.optimizers.Adam(), vit, moe)
    other = keras.optimizers.Adam()
    other.build([keras.Variable(np.zeros(3))])
    with pytest.raises(ValueError, match="does not track the weights"):
        upcycling.upcycle_optimizer(other, vit, moe)
    with pytest.raises(ValueError, match="must be a Keras 3 optimizer"):
        upcycling.upcycle_optimizer("adam", vit, moe)


@pytest.fixture(scope="module")
def t5():
    from keras_moe.models.t5 import T5

    keras.utils.set_random_seed(1)
    return T5.from_architecture("t5_v1_1_tiny", num_encoder_layers=2)


def _t5_inputs(model, seed=0):
    rng = np.random.default_rng(seed)
    enc = rng.integers(2, model.vocab_size, size=(2, 9)).astype("int32")
    dec = rng.integers(2, model.vocab_size, size=(2, 7)).astype("int32")
    enc_mask = np.ones_like(enc, dtype=bool)
    enc_mask[1, 6:] = False
    enc[1, 6:] = 0
    return {
        "encoder_token_ids": enc,
        "decoder_token_ids": dec,
        "encoder_padding_mask": enc_mask,
        "decoder_padding_mask": np.ones_like(dec, dtype=bool),
    }


def test_t5_defaults_follow_the_paper(t5):
    moe = upcycling.upcycle(t5, num_experts=4)
    assert moe.upcycled_blocks == {
        "encoder": [1],
        "decoder": list(range(1, t5.num_decoder_layers, 2)),
    }
    config = moe.get_config()
    encoder_kwargs = config["encoder_moe_blocks"][1]
    decoder_kwargs = config["decoder_moe_blocks"][1]
    assert encoder_kwargs["router"] == "experts_choose"
    assert decoder_kwargs["router"] == "tokens_choose"
    assert decoder_kwargs["num_selected_experts"] == 2
    assert not decoder_kwargs["normalize_combine_weights"]  # language


def test_t5_token_choice_preserves_the_logits(t5):
    inputs = _t5_inputs(t5)
    moe = upcycling.upcycle(
        t5,
        num_experts=4,
        blocks="all",
        encoder_router="tokens_choose",
        normalize_combine_weights=True,
        eval_capacity_factor=None,
    )
    np.testing.assert_allclose(
        _np(moe(inputs)), _np(t5(inputs)), atol=1e-5, rtol=0
    )


def test_t5_upcycled_trains_and_round_trips(t5, tmp_path):
    moe = upcycling.upcycle(t5, num_experts=4)
    inputs = _t5_inputs(t5)
    labels = np.roll(inputs["decoder_token_ids"], -1, axis=1)
    moe.compile(optimizer=keras.optimizers.Adam(1e-2), loss=_LOSS)
    history = moe.fit(inputs, labels, batch_size=2, epochs=4, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    moe(inputs, training=True)
    assert len(moe.losses) >= 2
    path = str(tmp_path / "t5.keras")
    moe.save(path)
    restored = keras.models.load_model(path)
    np.testing.assert_allclose(
        _np(restored(inputs)), _np(moe(inputs)), atol=1e-6, rtol=0
    )


def test_t5_refuses_expert_choice_in_the_decoder(t5):
    with pytest.raises(ValueError, match="causal decoder"):
        upcycling.upcycle(t5, 4, decoder_router="experts_choose")
    forced = upcycling.upcycle(
        t5,
        4,
        decoder_router="experts_choose",
        allow_expert_choice_in_decoder=True,
    )
    assert forced.get_config()["decoder_moe_blocks"][1]["router"] == (
        "experts_choose"
    )


def test_upcycle_from_a_checkpoint_path(t5, tmp_path):
    """Writes a Hugging Face safetensors directory, upcycles from its path."""
    from safetensors.numpy import save_file

    from keras_moe.checkpoints import read_checkpoint

    vit = ViT.from_architecture("vit_tiny")
    # The Hugging Face layout written by hand from canonical weights.
    w = {n: _np(v) for n, v in vit.canonical_variables().items()}
    hf = {
        "vit.embeddings.patch_embeddings.projection.weight": w[
            "patch_embedding/kernel"
        ].transpose(3, 2, 0, 1),
        "vit.embeddings.patch_embeddings.projection.bias": w[
            "patch_embedding/bias"
        ],
        "vit.embeddings.cls_token": w["class_token"],
        "vit.embeddings.position_embeddings": w["position_embedding"],
        "vit.layernorm.weight": w["encoder/final_norm/gamma"],
        "vit.layernorm.bias": w["encoder/final_norm/beta"],
        "classifier.weight": w["head/kernel"].T,
        "classifier.bias": w["head/bias"],
    }
    for i in range(vit.num_layers):
        p, q = f"encoder/block_{i}", f"vit.encoder.layer.{i}"
        for ours, theirs in (
            ("query", "attention.attention.query"),
            ("key", "attention.attention.key"),
            ("value", "attention.attention.value"),
            ("output", "attention.output.dense"),
        ):
            hf[f"{q}.{theirs}.weight"] = w[f"{p}/attention/{ours}/kernel"].T
            hf[f"{q}.{theirs}.bias"] = w[f"{p}/attention/{ours}/bias"]
        hf[f"{q}.layernorm_before.weight"] = w[f"{p}/attention_norm/gamma"]
        hf[f"{q}.layernorm_before.bias"] = w[f"{p}/attention_norm/beta"]
        hf[f"{q}.layernorm_after.weight"] = w[f"{p}/mlp_norm/gamma"]
        hf[f"{q}.layernorm_after.bias"] = w[f"{p}/mlp_norm/beta"]
        hf[f"{q}.intermediate.dense.weight"] = w[f"{p}/mlp/wi"].T
        hf[f"{q}.intermediate.dense.bias"] = w[f"{p}/mlp/bi"]
        hf[f"{q}.output.dense.weight"] = w[f"{p}/mlp/wo"].T
        hf[f"{q}.output.dense.bias"] = w[f"{p}/mlp/bo"]
    directory = tmp_path / "hf_vit"
    directory.mkdir()
    save_file(
        {k: np.ascontiguousarray(v) for k, v in hf.items()},
        str(directory / "model.safetensors"),
    )
    (directory / "config.json").write_text(
        '{"model_type": "vit", "hidden_size": %d, "num_hidden_layers": %d, '
        '"num_attention_heads": %d, "intermediate_size": %d, '
        '"image_size": %d, "patch_size": %d, "num_channels": 3, '
        '"hidden_act": "gelu", "layer_norm_eps": 1e-06, "qkv_bias": true}'
        % (
            vit.model_dim,
            vit.num_layers,
            vit.num_heads,
            vit.hidden_dim,
            vit.image_hw[0],
            vit.patch_size,
        )
    )
    x = _images(vit)
    np.testing.assert_allclose(
        _np(read_checkpoint(str(directory))(x)), _np(vit(x)), atol=1e-5
    )
    dense, moe = upcycling.upcycle_checkpoint(
        str(directory),
        num_experts=4,
        encoder_router="tokens_choose",
        eval_capacity_factor=None,
    )
    np.testing.assert_allclose(_np(moe(x)), _np(vit(x)), atol=1e-5)
    with pytest.raises(ValueError, match="does not exist"):
        upcycling.upcycle_checkpoint(str(tmp_path / "nope"), num_experts=4)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))
