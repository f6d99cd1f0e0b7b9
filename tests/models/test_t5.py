"""T5 against Hugging Face's PyTorch T5, plus generation, saving, architectures.

The reference checks build tiny random `T5ForConditionalGeneration` models
(transformers and torch are test-only dependencies, skipped when absent),
copy their weights into keras_moe's T5 through a name mapping written here,
independently of any keras_moe checkpoint reader, and compare logits and
greedy generations.
"""

import os
import re
import sys

import keras
import numpy as np
import pytest

from keras_moe.checkpoints.common import CheckpointMismatchError
from keras_moe.checkpoints.common import assign_weights
from keras_moe.layers.mlp import Mlp
from keras_moe.layers.moe import MoeLayer
from keras_moe.models import t5 as t5_lib
from keras_moe.models.t5 import T5
from keras_moe.models.t5_layers import RelativeAttention
from keras_moe.models.t5_layers import RMSNorm
from keras_moe.models.t5_layers import T5Block
from keras_moe.models.t5_layers import T5Stack
from keras_moe.models.t5_layers import relative_position_bucket
from tests import tiny_models
from tests.layer_test_case import run_layer_test

# Tiny configurations, both ways: the first name is Hugging Face's, the
# second keras_moe's. Sequences longer than max_distance reach every bucket.
_TINY = dict(
    vocab_size=(48, "vocab_size"),
    d_model=(16, "model_dim"),
    num_heads=(2, "num_heads"),
    d_kv=(6, "head_dim"),
    d_ff=(24, "hidden_dim"),
    num_layers=(2, "num_encoder_layers"),
    num_decoder_layers=(3, "num_decoder_layers"),
    relative_attention_num_buckets=(8, "relative_attention_num_buckets"),
    relative_attention_max_distance=(12, "relative_attention_max_distance"),
)
_VERSIONS = {
    "v1_0": {"hf": ("relu", True), "keras": ("relu", True)},
    "v1_1": {"hf": ("gated-gelu", False), "keras": ("gated_gelu", False)},
}
_HF_SUBLAYERS = {
    "encoder": ("self_attention", "mlp"),
    "decoder": ("self_attention", "cross_attention", "mlp"),
}
_HF_LEAVES = {
    "q": "query",
    "k": "key",
    "v": "value",
    "o": "output",
    "wi": "wi",
    "wi_0": "wi_0",
    "wi_1": "wi_1",
    "wo": "wo",
}


def _np(x):
    if isinstance(x, keras.Variable):
        return x.numpy()
    return keras.ops.convert_to_numpy(x)


def hf_to_canonical(state_dict, tie_embeddings):
    """Hugging Face T5 state dict -> {canonical name: array}.

    torch Linear weights are [out, in]; canonical kernels are `x @ W`
    [in, out], so every projection is transposed.
    """
    arrays = {}
    for name, tensor in state_dict.items():
        value = tensor.detach().cpu().numpy()
        if name in (
            "encoder.embed_tokens.weight",
            "decoder.embed_tokens.weight",
        ):
            continue  # The same tensor as shared.weight.
        if name == "shared.weight":
            arrays["shared/embedding"] = value
            continue
        if name == "lm_head.weight":
            if not tie_embeddings:
                arrays["lm_head/kernel"] = value.T
            continue
        match = re.fullmatch(
            r"(encoder|decoder)\.final_layer_norm\.weight", name
        )
        if match:
            arrays[f"{match[1]}/final_norm/scale"] = value
            continue
        match = re.fullmatch(
            r"(encoder|decoder)\.block\.(\d+)\.layer\.(\d+)\.(.+)\.weight", name
        )
        if not match:
            raise KeyError(f"unmapped Hugging Face weight {name}")
        stack, block, sublayer, rest = match.groups()
        kind = _HF_SUBLAYERS[stack][int(sublayer)]
        prefix = f"{stack}/block_{block}"
        if rest == "layer_norm":
            arrays[f"{prefix}/{kind}_norm/scale"] = value
        elif rest.endswith("relative_attention_bias"):
            arrays[f"{prefix}/{kind}/relative_attention_bias"] = value
        else:
            leaf = _HF_LEAVES[rest.split(".")[-1]]
            arrays[f"{prefix}/{kind}/{leaf}"] = value.T
    return arrays


def _hf_model(version, seed=0):
    feed_forward_proj, tie = _VERSIONS[version]["hf"]
    return tiny_models.random_hf_t5(
        {hf: value for hf, (value, _) in _TINY.items()},
        feed_forward_proj,
        tie,
        seed,
    )


def _keras_model(version, **kwargs):
    activation, tie = _VERSIONS[version]["keras"]
    return T5(
        **{ours: value for value, ours in _TINY.values()},
        activation=activation,
        tie_embeddings=tie,
        **kwargs,
    )


def _converted(version, seed=0):
    hf = _hf_model(version, seed)
    model = _keras_model(version)
    tie = _VERSIONS[version]["keras"][1]
    assign_weights(model, hf_to_canonical(hf.state_dict(), tie), "HF T5")
    return hf, model


def _batch(seed=0, encoder_length=20, decoder_length=12, vocab_size=48):
    """Token ids with right and left encoder padding, right decoder padding."""
    rng = np.random.default_rng(seed)
    encoder = rng.integers(2, vocab_size, size=(3, encoder_length))
    encoder[0, -1] = 1
    encoder[1, 13:] = 0  # right padding
    encoder[1, 12] = 1
    encoder[2, :5] = 0  # left padding
    decoder = rng.integers(2, vocab_size, size=(3, decoder_length))
    decoder[:, 0] = 0  # decoder start
    decoder_mask = np.ones_like(decoder, dtype=bool)
    decoder_mask[1, 7:] = False
    decoder[1, 7:] = 0
    return encoder.astype("int32"), decoder.astype("int32"), decoder_mask


# --- Building blocks ------------------------------------------------------


@pytest.mark.parametrize(
    "bidirectional,num_buckets,max_distance",
    [(True, 32, 128), (False, 32, 128), (True, 8, 12), (False, 8, 12)],
)
def test_relative_position_bucket_matches_hf(
    bidirectional, num_buckets, max_distance
):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers.models.t5.modeling_t5 import T5Attention

    positions = np.arange(-400, 401)
    expected = T5Attention._relative_position_bucket(
        torch.tensor(positions),
        bidirectional=bidirectional,
        num_buckets=num_buckets,
        max_distance=max_distance,
    ).numpy()
    got = _np(
        relative_position_bucket(
            positions,
            bidirectional=bidirectional,
            num_buckets=num_buckets,
            max_distance=max_distance,
        )
    )
    np.testing.assert_array_equal(got, expected)
    assert got.min() == 0 and got.max() == num_buckets - 1


def test_rms_norm_matches_numpy():
    x = np.random.default_rng(0).normal(size=(2, 3, 8)).astype("float32")
    norm = RMSNorm(epsilon=1e-6)
    norm.build(x.shape)
    scale = np.linspace(0.5, 2.0, 8).astype("float32")
    norm.scale.assign(scale)
    expected = x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-6) * scale
    np.testing.assert_allclose(_np(norm(x)), expected, rtol=1e-5, atol=1e-6)


def test_attention_cache_update_matches_full_attention():
    """Writing keys/values one position at a time equals full attention."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 8)).astype("float32")
    attention = RelativeAttention(
        num_heads=2,
        head_dim=3,
        use_relative_attention_bias=True,
        bidirectional=False,
    )
    attention.build(x.shape)
    causal = np.where(np.tril(np.ones((5, 5), bool)), 0.0, -1e9)
    bias = _np(attention.position_bias(5, 5)) + causal
    full = _np(attention(x, attention_bias=bias))
    cache = np.zeros((2, 2, 5, 2, 3), "float32")
    for step in range(5):
        step_bias = _np(attention.position_bias(1, 5, step)) + causal[step]
        out, cache = attention(
            x[:, step : step + 1],
            attention_bias=step_bias,
            cache=cache,
            cache_index=step,
        )
        np.testing.assert_allclose(
            _np(out)[:, 0], full[:, step], rtol=1e-5, atol=1e-6
        )


@pytest.mark.parametrize(
    "layer_cls,kwargs,num_weights",
    [
        (RMSNorm, {"epsilon": 1e-5}, 1),
        (
            RelativeAttention,
            {
                "num_heads": 2,
                "head_dim": 3,
                "use_relative_attention_bias": True,
            },
            5,
        ),
        (
            T5Block,
            {"num_heads": 2, "head_dim": 3, "hidden_dim": 12},
            1 + 4 + 1 + 2,
        ),
        (
            T5Stack,
            {
                "num_layers": 2,
                "num_heads": 2,
                "head_dim": 3,
                "hidden_dim": 12,
                "activation": "gated_gelu",
            },
            (1 + 5 + 1 + 3) + (1 + 4 + 1 + 3) + 1,
        ),
    ],
)
def test_layer_contract(layer_cls, kwargs, num_weights, tmp_path):
    run_layer_test(
        layer_cls,
        kwargs,
        input_shape=(2, 5, 8),
        expected_num_trainable_weights=num_weights,
        tmp_path=tmp_path,
    )


# --- Numbers against Hugging Face -----------------------------------------


@pytest.mark.parametrize("version", ["v1_0", "v1_1"])
def test_logits_match_hugging_face(version):
    torch = pytest.importorskip("torch")
    hf, model = _converted(version)
    encoder, decoder, decoder_mask = _batch()
    with torch.no_grad():
        expected = hf(
            input_ids=torch.tensor(encoder, dtype=torch.long),
            attention_mask=torch.tensor(encoder != 0, dtype=torch.long),
            decoder_input_ids=torch.tensor(decoder, dtype=torch.long),
            decoder_attention_mask=torch.tensor(decoder_mask, dtype=torch.long),
        ).logits.numpy()
    logits = model(
        {
            "encoder_token_ids": encoder,
            "decoder_token_ids": decoder,
            "decoder_padding_mask": decoder_mask,
        }
    )
    assert keras.backend.standardize_dtype(logits.dtype) == "float32"
    difference = np.abs(_np(logits) - expected).max()
    print(f"{version}: max abs logit difference {difference:.3g}")
    assert np.abs(expected).max() > 1.0  # the comparison is not trivial
    assert difference < 1e-4


def test_v1_0_logits_use_scaled_tied_embeddings():
    """Cross-check of the two heads without torch: tied logits are the
    decoder output times D**-0.5 times the embeddings."""
    model = _keras_model("v1_0")
    encoder, decoder, _ = _batch()
    encoded = model.encode(encoder)
    hidden = model.decoder(
        model.shared(decoder),
        context=encoded,
        context_padding_mask=encoder != 0,
    )
    expected = (_np(hidden) * 16**-0.5) @ _np(model.shared.embeddings).T
    logits = model({"encoder_token_ids": encoder, "decoder_token_ids": decoder})
    np.testing.assert_allclose(_np(logits), expected, rtol=1e-5, atol=1e-5)


def _hf_generate(hf, encoder, max_length):
    torch = pytest.importorskip("torch")
    with torch.no_grad():
        out = hf.generate(
            input_ids=torch.tensor(encoder, dtype=torch.long),
            attention_mask=torch.tensor(encoder != 0, dtype=torch.long),
            do_sample=False,
            num_beams=1,
            max_length=max_length,
            decoder_start_token_id=0,
            eos_token_id=1,
            pad_token_id=0,
            # Hugging Face sizes its cache by the encoder's layer count,
            # which differs from the decoder's here.
            use_cache=False,
        ).numpy()
    # Hugging Face stops when every sequence has ended; pad to max_length.
    return np.pad(out, ((0, 0), (0, max_length - out.shape[1])))


# (version, seed, factor on the end-of-sequence output row): chosen so that
# some sequences end early and others run to max_length, and one generates
# the padding id 0 as an ordinary token before carrying on.
_GENERATION_CASES = [("v1_0", 5, 2.0), ("v1_1", 3, 1.0), ("v1_1", 8, 1.0)]


@pytest.mark.parametrize("version,seed,eos_factor", _GENERATION_CASES)
def test_greedy_generation_matches_hugging_face(version, seed, eos_factor):
    torch = pytest.importorskip("torch")
    hf = _hf_model(version, seed)
    tie = _VERSIONS[version]["keras"][1]
    with torch.no_grad():
        (hf.shared if tie else hf.lm_head).weight[1] *= eos_factor
    model = _keras_model(version)
    assign_weights(model, hf_to_canonical(hf.state_dict(), tie), "HF T5")
    encoder, _, _ = _batch(seed=seed)
    max_length = 12
    expected = _hf_generate(hf, encoder, max_length)
    assert len(np.unique(expected)) >= 3  # not a degenerate model
    tokens = _np(model.generate(encoder, max_length))
    np.testing.assert_array_equal(tokens, expected)
    assert tokens.shape == (3, max_length)
    assert (tokens[:, 0] == 0).all()
    _check_end_of_sequence_padding(tokens)


def _check_end_of_sequence_padding(tokens):
    for row in tokens:
        ends = np.flatnonzero(row[1:] == 1)
        if ends.size:
            assert (row[ends[0] + 2 :] == 0).all()


# --- Generation without torch -----------------------------------------------


def _uncached_greedy(model, encoder, max_length):
    """Greedy decoding by re-running the full model on the whole prefix."""
    batch = encoder.shape[0]
    tokens = np.zeros((batch, max_length), "int32")
    finished = np.zeros(batch, bool)
    for step in range(max_length - 1):
        logits = _np(
            model(
                {
                    "encoder_token_ids": encoder,
                    "decoder_token_ids": tokens[:, : step + 1],
                }
            )
        )
        next_token = np.where(finished, 0, logits[:, -1].argmax(-1))
        tokens[:, step + 1] = next_token
        finished |= next_token == 1
        if finished.all():
            break
    return tokens


@pytest.mark.parametrize("version", ["v1_0", "v1_1"])
def test_cached_generation_equals_uncached_argmax(version):
    keras.utils.set_random_seed(3)
    model = _keras_model(version)
    # A large end-of-sequence logit for some inputs, so that both the
    # stopping rule and the padding after it are exercised.
    if version == "v1_1":
        kernel = _np(model.lm_head.kernel)
        kernel[:, 1] *= 4.0
        model.lm_head.kernel.assign(kernel)
    encoder, _, _ = _batch(seed=3)
    tokens = _np(model.generate(encoder, 12))
    np.testing.assert_array_equal(tokens, _uncached_greedy(model, encoder, 12))
    _check_end_of_sequence_padding(tokens)


def test_generate_lengths_and_retracing():
    model = T5.from_architecture("t5_tiny")
    encoder, _, _ = _batch(vocab_size=128)
    assert _np(model.generate(encoder, 1)).tolist() == [[0]] * 3
    short = _np(model.generate(encoder, 4))
    long = _np(model.generate(encoder, 9))
    assert short.shape == (3, 4) and long.shape == (3, 9)
    # Greedy decoding is a prefix property unless a sequence ended.
    np.testing.assert_array_equal(long[:, :4], short)


# --- Saving, architectures, MoE blocks ------------------------------------


@pytest.mark.parametrize("version", ["v1_0", "v1_1"])
def test_keras_round_trip(version, tmp_path):
    model = _keras_model(version)
    encoder, decoder, decoder_mask = _batch()
    inputs = {
        "encoder_token_ids": encoder,
        "decoder_token_ids": decoder,
        "decoder_padding_mask": decoder_mask,
    }
    path = os.path.join(str(tmp_path), "t5.keras")
    model.save(path)
    restored = keras.models.load_model(path)
    assert isinstance(restored, T5)
    assert restored.get_config() == model.get_config()
    np.testing.assert_array_equal(_np(restored(inputs)), _np(model(inputs)))
    np.testing.assert_array_equal(
        _np(restored.generate(encoder, 6)), _np(model.generate(encoder, 6))
    )


def test_config_round_trip():
    model = T5.from_architecture(
        "t5_v1_1_tiny", decoder_moe_blocks={1: {"num_experts": 2}}
    )
    config = model.get_config()
    clone = T5.from_config(config)
    assert clone.get_config() == config
    assert sorted(clone.canonical_variables()) == sorted(
        model.canonical_variables()
    )


def _count(config):
    """Parameters of a T5 config, by formula (checked on the small ones)."""
    d, f = config["model_dim"], config["hidden_dim"]
    inner = config["num_heads"] * config["head_dim"]
    mlp = (3 if config["activation"].startswith("gated") else 2) * d * f
    attention = 4 * d * inner
    bias = config["relative_attention_num_buckets"] * config["num_heads"]
    embeddings = config["vocab_size"] * d
    encoder = config["num_encoder_layers"] * (attention + mlp + 2 * d)
    decoder = config["num_decoder_layers"] * (2 * attention + mlp + 3 * d)
    heads = 1 if config["tie_embeddings"] else 2
    return heads * embeddings + encoder + decoder + 2 * (bias + d)


# Parameter counts of the released checkpoints (Hugging Face
# `num_parameters()` of google-t5/t5-* and google/t5-v1_1-*).
_PUBLISHED = {
    "t5_small": 60_506_624,
    "t5_base": 222_903_552,
    "t5_large": 737_668_096,
    "t5_v1_1_small": 76_961_152,
    "t5_v1_1_base": 247_577_856,
    "t5_v1_1_large": 783_150_080,
}


@pytest.mark.parametrize("name", sorted(_PUBLISHED))
def test_architecture_configs_have_published_sizes(name):
    assert _count(t5_lib.t5_config(name)) == _PUBLISHED[name]


@pytest.mark.parametrize(
    "name", ["t5_small", "t5_v1_1_small", "t5_tiny", "t5_v1_1_tiny"]
)
def test_architecture_parameter_counts(name):
    model = T5.from_architecture(name)
    assert model.count_params() == _count(t5_lib.t5_config(name))
    if name in _PUBLISHED:
        assert model.count_params() == _PUBLISHED[name]
    config = t5_lib.t5_config(name)
    assert (model.lm_head is None) == config["tie_embeddings"]


@pytest.mark.parametrize("version", ["v1_0", "v1_1"])
def test_canonical_variables(version):
    model = _keras_model(version)
    variables = model.canonical_variables()
    assert len(variables) == len(model.weights)
    assert {id(v) for v in variables.values()} == {id(w) for w in model.weights}
    shapes = {name: tuple(v.shape) for name, v in variables.items()}
    assert shapes["shared/embedding"] == (48, 16)
    assert shapes["encoder/block_1/self_attention/query"] == (16, 12)
    assert shapes["decoder/block_2/cross_attention/output"] == (12, 16)
    assert shapes["decoder/block_0/self_attention/relative_attention_bias"] == (
        8,
        2,
    )
    assert (
        "decoder/block_1/self_attention/relative_attention_bias" not in shapes
    )
    assert "decoder/block_0/cross_attention/relative_attention_bias" not in (
        shapes
    )
    assert shapes["decoder/block_2/cross_attention_norm/scale"] == (16,)
    assert shapes["encoder/final_norm/scale"] == (16,)
    if version == "v1_0":
        assert shapes["encoder/block_0/mlp/wi"] == (16, 24)
        assert "lm_head/kernel" not in shapes
    else:
        assert shapes["encoder/block_0/mlp/wi_1"] == (16, 24)
        assert shapes["lm_head/kernel"] == (16, 48)


def test_assign_weights_rejects_a_mismatched_checkpoint():
    model = _keras_model("v1_0")
    arrays = {n: _np(v) for n, v in model.canonical_variables().items()}
    arrays["lm_head/kernel"] = np.zeros((16, 48))
    with pytest.raises(CheckpointMismatchError, match="lm_head/kernel"):
        assign_weights(model, arrays)


def test_moe_decoder_block(tmp_path):
    model = T5.from_architecture(
        "t5_v1_1_tiny",
        decoder_moe_blocks={1: {"num_experts": 4, "num_selected_experts": 2}},
    )
    blocks = model.decoder.blocks
    assert isinstance(blocks[1].mlp, MoeLayer)
    assert isinstance(blocks[0].mlp, Mlp)
    assert blocks[1].mlp.hidden_dim == 64
    assert blocks[1].mlp.activation == "gated_gelu"
    names = model.canonical_variables()
    assert tuple(names["decoder/block_1/mlp/router/kernel"].shape) == (32, 4)
    assert tuple(names["decoder/block_1/mlp/experts/wi_0"].shape) == (4, 32, 64)
    assert "decoder/block_1/mlp/wi_0" not in names

    encoder, decoder, decoder_mask = _batch(vocab_size=128)
    inputs = {
        "encoder_token_ids": encoder,
        "decoder_token_ids": decoder,
        "decoder_padding_mask": decoder_mask,
    }
    logits = _np(model(inputs))
    assert logits.shape == (3, 12, 128) and np.isfinite(logits).all()
    assert len(model.losses) >= 1
    assert all(np.isfinite(_np(loss)) for loss in model.losses)
    tokens = _np(model.generate(encoder, 5))
    assert tokens.shape == (3, 5)
    assert all(not hasattr(loss, "graph") for loss in model.losses)

    # One training step, with the auxiliary losses in the objective.
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    router = _np(names["decoder/block_1/mlp/router/kernel"])
    labels = np.roll(decoder, -1, axis=1)
    model.fit(inputs, labels, batch_size=3, epochs=1, verbose=0)
    assert not np.allclose(
        router, _np(names["decoder/block_1/mlp/router/kernel"])
    )

    # .keras round trip (the block indices come back as JSON strings).
    path = os.path.join(str(tmp_path), "moe.keras")
    model.save(path)
    restored = keras.models.load_model(path)
    assert isinstance(restored.decoder.blocks[1].mlp, MoeLayer)
    np.testing.assert_allclose(
        _np(restored(inputs)), _np(model(inputs)), rtol=1e-6, atol=1e-6
    )


def test_moe_block_indices_accept_strings():
    model = T5.from_architecture(
        "t5_tiny",
        encoder_moe_blocks={"0": {"num_experts": 2}},
        decoder_moe_blocks={"1": {"num_experts": 2, "hidden_dim": 16}},
    )
    assert model.get_config()["encoder_moe_blocks"] == {0: {"num_experts": 2}}
    assert isinstance(model.encoder.blocks[0].mlp, MoeLayer)
    assert model.decoder.blocks[1].mlp.hidden_dim == 16
    encoder, decoder, _ = _batch(vocab_size=128)
    model({"encoder_token_ids": encoder, "decoder_token_ids": decoder})
    assert len(model.losses) >= 2


def test_mixed_precision_logits_are_float32():
    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        model = T5.from_architecture("t5_v1_1_tiny")
    finally:
        keras.config.set_dtype_policy(policy)
    encoder, decoder, _ = _batch(vocab_size=128)
    logits = model({"encoder_token_ids": encoder, "decoder_token_ids": decoder})
    assert keras.backend.standardize_dtype(logits.dtype) == "float32"
    assert all(w.dtype == "float32" for w in model.weights)
    assert np.isfinite(_np(logits)).all()
    assert _np(model.generate(encoder, 4)).shape == (3, 4)


# --- Errors -----------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"num_heads": 0}, "num_heads must be >= 1"),
        ({"head_dim": 2.5}, "head_dim must be an int"),
        ({"activation": "swish"}, "activation must be one of"),
        ({"tie_embeddings": "yes"}, "tie_embeddings must be a bool"),
        ({"dropout_rate": 1.0}, "dropout_rate"),
        ({"relative_attention_num_buckets": 2}, "num_buckets must be >= 4"),
        ({"relative_attention_max_distance": 4}, "max_distance must be >= 5"),
        ({"decoder_moe_blocks": {2: {"num_experts": 2}}}, r"outside \[0, 2\)"),
        ({"encoder_moe_blocks": {0: 4}}, "dict of MoeLayer kwargs"),
        ({"encoder_moe_blocks": [0]}, "encoder_moe_blocks must be None"),
    ],
)
def test_bad_kwargs_raise(overrides, match):
    with pytest.raises(ValueError, match=match):
        T5.from_architecture("t5_tiny", **overrides)


def test_unknown_architecture_raises():
    with pytest.raises(ValueError, match="Unknown T5 architecture 't5_huge'"):
        T5.from_architecture("t5_huge")
    with pytest.raises(ValueError, match="available"):
        t5_lib.t5_config("vit_b16")


def test_bad_inputs_raise():
    model = T5.from_architecture("t5_tiny")
    ids = np.array([[3, 4, 1]], "int32")
    with pytest.raises(ValueError, match="encoder_token_ids must have rank 2"):
        model({"encoder_token_ids": ids[0], "decoder_token_ids": ids})
    with pytest.raises(ValueError, match="decoder_token_ids must have rank 2"):
        model({"encoder_token_ids": ids, "decoder_token_ids": ids[0]})
    with pytest.raises(ValueError, match="integer token ids"):
        model(
            {
                "encoder_token_ids": ids.astype("float32"),
                "decoder_token_ids": ids,
            }
        )
    with pytest.raises(ValueError, match="missing"):
        model({"encoder_token_ids": ids})
    with pytest.raises(ValueError, match="expects a dict"):
        model(ids)
    with pytest.raises(ValueError, match="encoder_token_ids must have rank 2"):
        model.generate(ids[0], 4)
    with pytest.raises(ValueError, match="max_length must be >= 1"):
        model.generate(ids, 0)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))
