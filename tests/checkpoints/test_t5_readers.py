"""Tests of the T5 checkpoint readers against implementations nobody here wrote.

Each format is written by its own library (Hugging Face transformers on
PyTorch, TF Model Garden, keras-hub) from a tiny random model, or for Mesh
TensorFlow with the exact variable names of the released T5 checkpoints
(taken from a tiny Hugging Face model, so Hugging Face gives the expected
logits). Each read model must reproduce that library's own forward pass to
1e-4 (max abs logit difference). Every reader is also fed a checkpoint of
another model, a truncated or incomplete file and a config that disagrees.

The sizes are chosen so that mistakes show: H * Dh (12) differs from D (16)
so a missing transpose cannot go unnoticed, the decoder is deeper than the
encoder, norm scales are random, and the sequences are long enough that
`relative_attention_max_distance` (20, not the default 128) changes buckets.
"""

import json
import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import tensorflow as tf

from keras_moe.checkpoints import t5 as readers
from keras_moe.checkpoints.common import CheckpointMismatchError
from keras_moe.models.t5 import T5

ATOL = 1e-4
V, D, DK, H, F = 64, 16, 4, 3, 24
NUM_ENCODER, NUM_DECODER = 2, 3
BUCKETS, MAX_DISTANCE = 8, 20
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))


def _inputs():
    rng = np.random.default_rng(0)
    encoder = rng.integers(2, V, size=(2, 12)).astype("int32")
    encoder[1, 8:] = 0
    decoder = rng.integers(2, V, size=(2, 9)).astype("int32")
    decoder[:, 0] = 0
    decoder_mask = np.ones_like(decoder, dtype=bool)
    decoder_mask[1, 6:] = False
    decoder[~decoder_mask] = 0
    return encoder, encoder != 0, decoder, decoder_mask


ENC, ENC_MASK, DEC, DEC_MASK = _inputs()


def _our_logits(model):
    return np.asarray(
        model(
            {
                "encoder_token_ids": ENC,
                "decoder_token_ids": DEC,
                "encoder_padding_mask": ENC_MASK,
                "decoder_padding_mask": DEC_MASK,
            }
        )
    )


def _assert_close(ours, reference, mask=DEC_MASK):
    """Compares the positions `mask` marks real; returns the max difference."""
    ours, reference = np.asarray(ours), np.asarray(reference)
    assert ours.shape == reference.shape
    difference = float(np.max(np.abs(ours[mask] - reference[mask])))
    print(f"max abs difference {difference:.3g}")
    assert difference <= ATOL, difference
    return difference


def _model_config(model):
    config = model.get_config()
    keys = (
        "vocab_size",
        "model_dim",
        "num_heads",
        "head_dim",
        "hidden_dim",
        "num_encoder_layers",
        "num_decoder_layers",
        "relative_attention_num_buckets",
        "relative_attention_max_distance",
        "activation",
        "tie_embeddings",
    )
    return {key: config[key] for key in keys}


def _expected_config(activation, tie, max_distance=MAX_DISTANCE):
    return {
        "vocab_size": V,
        "model_dim": D,
        "num_heads": H,
        "head_dim": DK,
        "hidden_dim": F,
        "num_encoder_layers": NUM_ENCODER,
        "num_decoder_layers": NUM_DECODER,
        "relative_attention_num_buckets": BUCKETS,
        "relative_attention_max_distance": max_distance,
        "activation": activation,
        "tie_embeddings": tie,
    }


def _save_raw_checkpoint(directory, arrays, step=1000):
    """Writes `arrays` under exactly their names, as Mesh TensorFlow does."""
    os.makedirs(directory, exist_ok=True)
    prefix = os.path.join(directory, f"model.ckpt-{step}")
    names = sorted(arrays)
    tf.raw_ops.SaveV2(
        prefix=prefix,
        tensor_names=names,
        shape_and_slices=[""] * len(names),
        tensors=[arrays[name] for name in names],
    )
    with open(os.path.join(directory, "checkpoint"), "w") as f:
        f.write(f'model_checkpoint_path: "model.ckpt-{step}"\n')
    return prefix


def _truncate(path):
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


# --------------------------------------------------------------------------
# Hugging Face models (PyTorch): the reference for HF and MTF checkpoints.


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """Tiny random HF T5s, their logits and their checkpoints on disk."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from safetensors.numpy import save_file

    def make(seed, **kwargs):
        torch.manual_seed(seed)
        config = transformers.T5Config(
            vocab_size=V,
            d_model=D,
            d_kv=DK,
            num_heads=H,
            d_ff=F,
            num_layers=NUM_ENCODER,
            num_decoder_layers=NUM_DECODER,
            relative_attention_num_buckets=BUCKETS,
            relative_attention_max_distance=MAX_DISTANCE,
            dropout_rate=0.0,
            **kwargs,
        )
        model = transformers.T5ForConditionalGeneration(config).eval()
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "layer_norm" in name:
                    parameter.uniform_(0.5, 1.5)
        return model

    def logits(model):
        with torch.no_grad():
            return model(
                input_ids=torch.tensor(ENC, dtype=torch.long),
                attention_mask=torch.tensor(ENC_MASK, dtype=torch.long),
                decoder_input_ids=torch.tensor(DEC, dtype=torch.long),
                decoder_attention_mask=torch.tensor(DEC_MASK, dtype=torch.long),
            ).logits.numpy()

    def state(model):
        return {
            name: tensor.detach().numpy().copy()
            for name, tensor in model.state_dict().items()
        }

    base = tmp_path_factory.mktemp("hf")
    models = {
        "v1_0": make(0, feed_forward_proj="relu"),
        # transformers 5 ties lm_head to shared.weight even for this config
        # and only drops the output scaling: no lm_head.weight on disk.
        "v1_1_tied": make(
            1, feed_forward_proj="gated-gelu", tie_word_embeddings=False
        ),
        "v1_1": make(
            2, feed_forward_proj="gated-gelu", tie_word_embeddings=False
        ),
    }
    # The released v1.1 checkpoints have their own lm_head.weight.
    with torch.no_grad():
        models["v1_1"].lm_head.weight = torch.nn.Parameter(torch.randn(V, D))
    out = {"logits": {}, "dirs": {}, "state": {}}
    for name, model in models.items():
        out["logits"][name] = logits(model)
        out["state"][name] = state(model)
        directory = str(base / name)
        if name == "v1_1":
            # As a transformers 4 save of a v1.1 model looks on the hub.
            os.makedirs(directory)
            save_file(
                out["state"][name], os.path.join(directory, "model.safetensors")
            )
            config = model.config.to_dict()
            config.pop("scale_decoder_outputs", None)
            config["tie_word_embeddings"] = False
            with open(os.path.join(directory, "config.json"), "w") as f:
                json.dump(config, f)
        else:
            model.save_pretrained(directory, safe_serialization=True)
        out["dirs"][name] = directory
    out["base"] = base
    return out


@pytest.mark.parametrize(
    "name, activation, tie",
    [
        ("v1_0", "relu", True),
        ("v1_1_tied", "gated_gelu", False),
        ("v1_1", "gated_gelu", False),
    ],
)
def test_hf_safetensors_matches_transformers(hf, name, activation, tie):
    model = readers.read_t5_hf_safetensors(hf["dirs"][name])
    assert isinstance(model, T5)
    assert _model_config(model) == _expected_config(activation, tie)
    _assert_close(_our_logits(model), hf["logits"][name])


def test_hf_safetensors_single_file_and_expected_config(hf):
    path = os.path.join(hf["dirs"]["v1_0"], "model.safetensors")
    model = readers.read_t5_hf_safetensors(
        path, config=_expected_config("relu", True)
    )
    _assert_close(_our_logits(model), hf["logits"]["v1_0"])


def test_hf_safetensors_sharded(hf, tmp_path):
    from safetensors.numpy import save_file

    state = hf["state"]["v1_1"]
    names = sorted(state)
    weight_map = {}
    for shard, part in enumerate((names[::2], names[1::2])):
        file = f"model-0000{shard + 1}-of-00002.safetensors"
        save_file({n: state[n] for n in part}, str(tmp_path / file))
        weight_map.update({n: file for n in part})
    with open(tmp_path / "model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    shutil.copy(os.path.join(hf["dirs"]["v1_1"], "config.json"), tmp_path)
    model = readers.read_t5_hf_safetensors(tmp_path)
    _assert_close(_our_logits(model), hf["logits"]["v1_1"])


def test_hf_safetensors_bfloat16(hf, tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    state = {
        name: torch.tensor(array).to(torch.bfloat16)
        for name, array in hf["state"]["v1_0"].items()
    }
    save_file(state, str(tmp_path / "model.safetensors"))
    shutil.copy(os.path.join(hf["dirs"]["v1_0"], "config.json"), tmp_path)
    model = readers.read_t5_hf_safetensors(tmp_path)
    variables = model.canonical_variables()
    for canonical, source in (
        ("shared/embedding", "shared.weight"),
        (
            "encoder/block_1/mlp/wi",
            "encoder.block.1.layer.1.DenseReluDense.wi.weight",
        ),
    ):
        expected = state[source].float().numpy()
        if canonical.endswith("wi"):
            expected = expected.T
        np.testing.assert_array_equal(
            np.asarray(variables[canonical]), expected
        )


def _vit_like_arrays():
    rng = np.random.default_rng(1)
    return {
        "vit.embeddings.patch_embeddings.projection.weight": rng.normal(
            size=(D, 3, 4, 4)
        ).astype("float32"),
        "vit.encoder.layer.0.attention.attention.query.weight": rng.normal(
            size=(D, D)
        ).astype("float32"),
        "classifier.weight": rng.normal(size=(10, D)).astype("float32"),
    }


def test_hf_safetensors_rejects_other_model(tmp_path):
    from safetensors.numpy import save_file

    save_file(_vit_like_arrays(), str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="does not look like a T5"):
        readers.read_t5_hf_safetensors(tmp_path)
    with open(tmp_path / "config.json", "w") as f:
        json.dump({"model_type": "vit", "hidden_size": D}, f)
    with pytest.raises(ValueError, match="'vit' model, not T5"):
        readers.read_t5_hf_safetensors(tmp_path)


def test_hf_safetensors_rejects_truncated_file(hf, tmp_path):
    directory = tmp_path / "cut"
    shutil.copytree(hf["dirs"]["v1_0"], directory)
    _truncate(directory / "model.safetensors")
    with pytest.raises(ValueError, match="Cannot read safetensors file"):
        readers.read_t5_hf_safetensors(directory)


def test_hf_safetensors_rejects_missing_files(tmp_path):
    with pytest.raises(ValueError, match="No model.safetensors"):
        readers.read_t5_hf_safetensors(tmp_path)
    with pytest.raises(ValueError, match="No Hugging Face checkpoint"):
        readers.read_t5_hf_safetensors(tmp_path / "nothing")


def test_hf_safetensors_rejects_config_that_disagrees(hf, tmp_path):
    with pytest.raises(ValueError, match="num_heads: the checkpoint has 3"):
        readers.read_t5_hf_safetensors(
            hf["dirs"]["v1_0"], config={"num_heads": 4}
        )
    with pytest.raises(ValueError, match="model_dim"):
        readers.read_t5_hf_safetensors(hf["dirs"]["v1_0"], config="t5_tiny")
    with pytest.raises(ValueError, match="config has keys T5 does not take"):
        readers.read_t5_hf_safetensors(hf["dirs"]["v1_0"], config={"heads": 3})
    # A config.json that contradicts its own weights.
    directory = tmp_path / "bad_config"
    shutil.copytree(hf["dirs"]["v1_0"], directory)
    with open(directory / "config.json") as f:
        config = json.load(f)
    config["num_heads"] = 4
    with open(directory / "config.json", "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match="disagrees with itself: num_heads"):
        readers.read_t5_hf_safetensors(directory)


def test_hf_safetensors_strict_names(hf, tmp_path):
    from safetensors.numpy import save_file

    state = dict(hf["state"]["v1_0"])
    state["encoder.block.0.layer.1.DenseReluDense.wi.bias"] = np.zeros(
        F, "float32"
    )
    del state["decoder.block.2.layer.1.EncDecAttention.k.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointMismatchError) as error:
        readers.read_t5_hf_safetensors(tmp_path)
    message = str(error.value)
    assert "decoder/block_2/cross_attention/key" in message
    assert "encoder.block.0.layer.1.DenseReluDense.wi.bias" in message


# --------------------------------------------------------------------------
# Mesh TensorFlow checkpoints, named as the released T5 checkpoints are.


def _hf_to_mtf(state, v1_1):
    """HF state dict -> the released T5 checkpoints' names and layouts."""
    norm = "rms_norm" if v1_1 else "layer_norm"
    out = {"shared/embedding": state["shared.weight"]}
    for stack, blocks in (("encoder", NUM_ENCODER), ("decoder", NUM_DECODER)):
        final = "rms_norm" if v1_1 else "final_layer_norm"
        out[f"{stack}/{final}/scale"] = state[
            f"{stack}.final_layer_norm.weight"
        ]
        attentions = ["SelfAttention"]
        if stack == "decoder":
            attentions.append("EncDecAttention")
        for i in range(blocks):
            hf_block, mtf_block = f"{stack}.block.{i}", f"{stack}/block_{i:03d}"
            for j, attention in enumerate(attentions):
                hf_layer = f"{hf_block}.layer.{j}"
                mtf_layer = f"{mtf_block}/layer_{j:03d}"
                for w in "qkvo":
                    out[f"{mtf_layer}/{attention}/{w}"] = state[
                        f"{hf_layer}.{attention}.{w}.weight"
                    ].T
                out[f"{mtf_layer}/{norm}/scale"] = state[
                    f"{hf_layer}.layer_norm.weight"
                ]
                if i == 0 and attention == "SelfAttention":
                    out[
                        f"{mtf_layer}/SelfAttention/relative_attention_bias"
                    ] = state[
                        f"{hf_layer}.SelfAttention.relative_attention_bias.weight"
                    ].T
            j = len(attentions)
            hf_layer, mtf_layer = (
                f"{hf_block}.layer.{j}",
                f"{mtf_block}/layer_{j:03d}",
            )
            for w in ("wi_0", "wi_1", "wo") if v1_1 else ("wi", "wo"):
                out[f"{mtf_layer}/DenseReluDense/{w}/kernel"] = state[
                    f"{hf_layer}.DenseReluDense.{w}.weight"
                ].T
            out[f"{mtf_layer}/{norm}/scale"] = state[
                f"{hf_layer}.layer_norm.weight"
            ]
    if v1_1:
        out["decoder/logits/kernel"] = state["lm_head.weight"].T
    # Adafactor slots and the step counter of a real training checkpoint.
    rng = np.random.default_rng(3)
    for name, array in list(out.items()):
        if array.ndim == 2:
            out[f"{name}_slot_vr"] = rng.random(array.shape[:1], "float32")
            out[f"{name}_slot_vc"] = rng.random(array.shape[1:], "float32")
        else:
            out[f"{name}_slot_v"] = rng.random(array.shape, "float32")
    out["global_step"] = np.int64(1000)
    return {name: np.ascontiguousarray(array) for name, array in out.items()}


@pytest.fixture(scope="module")
def mtf(hf):
    out = {}
    for name, v1_1 in (("v1_0", False), ("v1_1", True)):
        arrays = _hf_to_mtf(hf["state"][name], v1_1)
        directory = str(hf["base"] / f"mtf_{name}")
        prefix = _save_raw_checkpoint(directory, arrays)
        listed = dict(tf.train.list_variables(prefix))
        assert listed == {n: list(a.shape) for n, a in arrays.items()}
        out[name] = directory
    return out


@pytest.mark.parametrize(
    "name, activation, tie",
    [("v1_0", "relu", True), ("v1_1", "gated_gelu", False)],
)
def test_mtf_checkpoint_matches_transformers(hf, mtf, name, activation, tie):
    # The checkpoint does not record the bucketing distance.
    model = readers.read_t5_mtf_checkpoint(
        mtf[name], config={"relative_attention_max_distance": MAX_DISTANCE}
    )
    assert _model_config(model) == _expected_config(activation, tie)
    _assert_close(_our_logits(model), hf["logits"][name])


def test_mtf_checkpoint_by_prefix_and_index(hf, mtf):
    prefix = os.path.join(mtf["v1_0"], "model.ckpt-1000")
    for path in (prefix, prefix + ".index"):
        model = readers.read_t5_mtf_checkpoint(
            path, config=_expected_config("relu", True)
        )
        _assert_close(_our_logits(model), hf["logits"]["v1_0"])


def test_mtf_checkpoint_rejects_other_model(tmp_path):
    rng = np.random.default_rng(2)
    _save_raw_checkpoint(
        tmp_path,
        {
            "embedding/kernel": rng.normal(size=(4, 4, 3, D)).astype("float32"),
            "Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel": rng.normal(
                size=(D, F)
            ).astype("float32"),
            "head/kernel": rng.normal(size=(D, 10)).astype("float32"),
        },
    )
    with pytest.raises(ValueError, match="does not look like a T5 checkpoint"):
        readers.read_t5_mtf_checkpoint(tmp_path)


def test_mtf_checkpoint_rejects_missing_or_truncated_data(mtf, tmp_path):
    missing = tmp_path / "missing"
    shutil.copytree(mtf["v1_0"], missing)
    os.remove(missing / "model.ckpt-1000.data-00000-of-00001")
    with pytest.raises(ValueError, match="no data file"):
        readers.read_t5_mtf_checkpoint(missing)
    truncated = tmp_path / "truncated"
    shutil.copytree(mtf["v1_0"], truncated)
    _truncate(truncated / "model.ckpt-1000.data-00000-of-00001")
    with pytest.raises(ValueError, match="Cannot read"):
        readers.read_t5_mtf_checkpoint(truncated)
    with pytest.raises(ValueError, match="No TensorFlow checkpoint"):
        readers.read_t5_mtf_checkpoint(tmp_path / "nothing")


def test_mtf_checkpoint_rejects_config_that_disagrees(mtf):
    with pytest.raises(ValueError, match="num_heads: the checkpoint has 3"):
        readers.read_t5_mtf_checkpoint(mtf["v1_0"], config={"num_heads": 4})
    with pytest.raises(ValueError, match="single wi"):
        readers.read_t5_mtf_checkpoint(
            mtf["v1_0"], config={"activation": "gated_gelu"}
        )


def test_mtf_checkpoint_rejects_shape_mismatch(hf, tmp_path):
    arrays = _hf_to_mtf(hf["state"]["v1_0"], v1_1=False)
    name = "decoder/block_002/layer_001/EncDecAttention/v"
    arrays[name] = np.zeros((D, 2 * H * DK), "float32")
    _save_raw_checkpoint(tmp_path, arrays)
    with pytest.raises(CheckpointMismatchError, match="cross_attention/value"):
        readers.read_t5_mtf_checkpoint(tmp_path, config={"num_heads": H})


# --------------------------------------------------------------------------
# TF Model Garden (official.nlp.modeling.models.t5).


@pytest.fixture(scope="module")
def model_garden(tmp_path_factory):
    mg = pytest.importorskip("official.nlp.modeling.models.t5")
    base = tmp_path_factory.mktemp("model_garden")

    def make(seed, **kwargs):
        tf.random.set_seed(seed)
        params = mg.T5TransformerParams(
            num_layers=NUM_ENCODER,
            num_decoder_layers=NUM_DECODER,
            d_model=D,
            d_kv=DK,
            num_heads=H,
            d_ff=F,
            vocab_size=V,
            relative_attention_num_buckets=BUCKETS,
            relative_attention_max_distance=MAX_DISTANCE,
            **kwargs,
        )
        model = mg.T5Transformer(params, name="t5")
        rng = np.random.default_rng(seed)
        for variable in model.variables:
            if variable.name.endswith("scale:0"):
                variable.assign(rng.uniform(0.5, 1.5, variable.shape))
        return model

    def logits(model):
        # Model Garden masks the decoder with the *targets*, non-zero where
        # real: the decoder start id 0 would otherwise mask itself.
        return model(
            encoder_input_tokens=tf.constant(ENC),
            decoder_target_tokens=tf.constant(DEC_MASK.astype("int32")),
            decoder_input_tokens=tf.constant(DEC),
            training=False,
        )["logits"].numpy()

    out = {"logits": {}, "dirs": {}}
    v1_1 = make(
        0,
        shared_embedding=True,
        ffn_activations=("gelu", "linear"),
        logits_via_embedding=False,
    )
    out["logits"]["v1_1"] = logits(v1_1)
    tf.train.Checkpoint(model=v1_1).save(str(base / "v1_1" / "ckpt"))
    out["dirs"]["v1_1"] = str(base / "v1_1")
    v1_0 = make(1, shared_embedding=True, logits_via_embedding=True)
    out["logits"]["v1_0"] = logits(v1_0)
    tf.train.Checkpoint(**v1_0.checkpoint_items).save(
        str(base / "v1_0" / "ckpt")
    )
    out["dirs"]["v1_0"] = str(base / "v1_0")
    separate = make(2, shared_embedding=False)
    tf.train.Checkpoint(model=separate).save(str(base / "separate" / "ckpt"))
    out["dirs"]["separate"] = str(base / "separate")
    return out


@pytest.mark.parametrize(
    "name, activation, tie",
    [("v1_0", "relu", True), ("v1_1", "gated_gelu", False)],
)
def test_model_garden_checkpoint_matches_model_garden(
    model_garden, name, activation, tie
):
    model = readers.read_t5_model_garden_checkpoint(
        model_garden["dirs"][name],
        config={"relative_attention_max_distance": MAX_DISTANCE},
    )
    assert _model_config(model) == _expected_config(activation, tie)
    _assert_close(_our_logits(model), model_garden["logits"][name])


def test_model_garden_checkpoint_rejects_separate_embeddings(model_garden):
    with pytest.raises(ValueError, match="separate token embeddings"):
        readers.read_t5_model_garden_checkpoint(
            model_garden["dirs"]["separate"]
        )


def test_model_garden_checkpoint_rejects_other_model(tmp_path):
    checkpoint = tf.train.Checkpoint(
        vit={
            "patch_embedding": tf.Variable(tf.zeros((4, 4, 3, D))),
            "head": tf.Variable(tf.zeros((D, 10))),
        }
    )
    checkpoint.save(str(tmp_path / "ckpt"))
    with pytest.raises(
        ValueError, match="does not look like a Model Garden T5"
    ):
        readers.read_t5_model_garden_checkpoint(tmp_path)


def test_model_garden_checkpoint_rejects_missing_data_and_config(
    model_garden, tmp_path
):
    directory = tmp_path / "missing"
    shutil.copytree(model_garden["dirs"]["v1_1"], directory)
    for data in directory.glob("*.data-*"):
        os.remove(data)
    with pytest.raises(ValueError, match="no data file"):
        readers.read_t5_model_garden_checkpoint(directory)
    with pytest.raises(ValueError, match="head_dim: the checkpoint has 4"):
        readers.read_t5_model_garden_checkpoint(
            model_garden["dirs"]["v1_1"], config={"head_dim": 6}
        )


# --------------------------------------------------------------------------
# keras-hub T5Backbone.


@pytest.fixture(scope="module")
def keras_hub_models(tmp_path_factory):
    keras_hub = pytest.importorskip("keras_hub")
    from keras_hub.src.utils.keras_utils import gelu_approximate

    base = tmp_path_factory.mktemp("keras_hub")

    def make(seed, **kwargs):
        backbone = keras_hub.models.T5Backbone(
            vocabulary_size=V,
            num_layers=NUM_ENCODER,
            num_heads=H,
            hidden_dim=D,
            intermediate_dim=F,
            key_value_dim=DK,
            dropout=0.0,
            **kwargs,
        )
        rng = np.random.default_rng(seed)
        for weight in backbone.weights:
            if weight.path.endswith("/weight"):  # the RMS norm scales
                weight.assign(rng.uniform(0.5, 1.5, weight.shape))
        return backbone

    models = {
        "v1_0": make(
            0,
            activation="relu",
            use_gated_activation=False,
            tie_embedding_weights=True,
        ),
        "v1_1": make(
            1,
            activation=gelu_approximate,
            use_gated_activation=True,
            tie_embedding_weights=False,
        ),
        "exact_gelu": make(
            2,
            activation="gelu",
            use_gated_activation=True,
            tie_embedding_weights=False,
        ),
    }
    out = {"models": models, "outputs": {}, "weights": {}, "presets": {}}
    for name, backbone in models.items():
        outputs = backbone(
            {
                "encoder_token_ids": ENC,
                "encoder_padding_mask": ENC_MASK.astype("int32"),
                "decoder_token_ids": DEC,
                "decoder_padding_mask": DEC_MASK.astype("int32"),
            }
        )
        decoded = np.asarray(outputs["decoder_sequence_output"])
        # T5Seq2SeqLM's head: scaled tied embeddings, or the reverse kernel.
        embedding = backbone.token_embedding
        if embedding.tie_weights:
            logits = decoded * D**-0.5 @ np.asarray(embedding.embeddings).T
        else:
            logits = decoded @ np.asarray(embedding.reverse_embeddings)
        out["outputs"][name] = {
            "encoded": np.asarray(outputs["encoder_sequence_output"]),
            "decoded": decoded,
            "logits": logits,
        }
        weights = str(base / f"{name}.weights.h5")
        with warnings.catch_warnings():
            # Keras' own NumPy conversion when saving, under NumPy 2.
            warnings.filterwarnings("ignore", "__array__ implementation")
            backbone.save_weights(weights)
            backbone.save_to_preset(str(base / f"{name}_preset"))
        out["weights"][name] = weights
        out["presets"][name] = str(base / f"{name}_preset")
    return out


def _compare_with_keras_hub(model, expected):
    encoded = model.encode(ENC, ENC_MASK)
    _assert_close(encoded, expected["encoded"], ENC_MASK)
    decoded = model.decoder(
        model.shared(DEC),
        padding_mask=DEC_MASK,
        context=encoded,
        context_padding_mask=ENC_MASK,
    )
    _assert_close(decoded, expected["decoded"])
    _assert_close(_our_logits(model), expected["logits"])


@pytest.mark.parametrize(
    "name, activation, tie",
    [("v1_0", "relu", True), ("v1_1", "gated_gelu", False)],
)
def test_keras_hub_backbone_matches_keras_hub(
    keras_hub_models, name, activation, tie
):
    expected_config = _expected_config(activation, tie, max_distance=128)
    expected_config["num_decoder_layers"] = NUM_ENCODER
    expected_config["relative_attention_num_buckets"] = 32
    expected = keras_hub_models["outputs"][name]
    converted = readers.convert_t5_keras_hub_backbone(
        keras_hub_models["models"][name]
    )
    assert _model_config(converted) == expected_config
    _compare_with_keras_hub(converted, expected)
    from_preset = readers.read_t5_keras_hub(keras_hub_models["presets"][name])
    assert _model_config(from_preset) == expected_config
    _compare_with_keras_hub(from_preset, expected)
    from_weights = readers.read_t5_keras_hub(
        keras_hub_models["weights"][name], config={"activation": activation}
    )
    assert _model_config(from_weights) == expected_config
    _compare_with_keras_hub(from_weights, expected)


def test_upcycle_takes_a_keras_hub_backbone(keras_hub_models):
    import keras_moe
    from keras_moe.models import T5
    from keras_moe.models import moe_layers

    moe = keras_moe.upcycle(keras_hub_models["models"]["v1_0"], num_experts=4)
    assert isinstance(moe, T5)
    assert {layer.num_experts for layer in moe_layers(moe)} == {4}
    # What the reader cannot convert, upcycle cannot either, and says so.
    with pytest.raises(ValueError, match="upcycle cannot convert"):
        keras_moe.upcycle(keras_hub_models["models"]["exact_gelu"], 4)


def test_keras_hub_exact_gelu_needs_explicit_approximation(keras_hub_models):
    backbone = keras_hub_models["models"]["exact_gelu"]
    with pytest.raises(ValueError, match="exact \\(erf\\) GELU"):
        readers.convert_t5_keras_hub_backbone(backbone)
    with pytest.raises(ValueError, match="exact \\(erf\\) GELU"):
        readers.read_t5_keras_hub(keras_hub_models["presets"]["exact_gelu"])
    model = readers.convert_t5_keras_hub_backbone(
        backbone, config={"activation": "gated_gelu"}
    )
    expected = keras_hub_models["outputs"]["exact_gelu"]["logits"]
    # tanh GELU instead of erf GELU: close, not equal.
    difference = np.max(np.abs(_our_logits(model) - expected)[DEC_MASK])
    assert 0 < difference < 0.05 * np.max(np.abs(expected))


def test_keras_hub_rejects_bad_input(keras_hub_models, tmp_path):
    import keras

    with pytest.raises(ValueError, match="expects a keras_hub T5Backbone"):
        readers.convert_t5_keras_hub_backbone(
            keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        )
    # Weights of another model.
    other = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "__array__ implementation")
        other.save_weights(str(tmp_path / "other.weights.h5"))
    with pytest.raises(ValueError, match="does not look like T5Backbone"):
        readers.read_t5_keras_hub(tmp_path / "other.weights.h5")
    # A truncated weights file.
    truncated = tmp_path / "truncated.weights.h5"
    shutil.copy(keras_hub_models["weights"]["v1_0"], truncated)
    _truncate(truncated)
    with pytest.raises(ValueError, match="Cannot read"):
        readers.read_t5_keras_hub(truncated, config={"activation": "relu"})
    # A bare weights file does not say its activation.
    with pytest.raises(ValueError, match="does not record the activation"):
        readers.read_t5_keras_hub(keras_hub_models["weights"]["v1_0"])
    # A preset of another class.
    preset = tmp_path / "vit_preset"
    shutil.copytree(keras_hub_models["presets"]["v1_0"], preset)
    with open(preset / "config.json") as f:
        config = json.load(f)
    config["class_name"] = "ViTBackbone"
    with open(preset / "config.json", "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match="'ViTBackbone', not a keras-hub"):
        readers.read_t5_keras_hub(preset)
    # A config that disagrees.
    with pytest.raises(ValueError, match="num_heads: the checkpoint has 3"):
        readers.read_t5_keras_hub(
            keras_hub_models["presets"]["v1_0"], config={"num_heads": 2}
        )
    with pytest.raises(ValueError, match="does not fit"):
        readers.read_t5_keras_hub(
            keras_hub_models["weights"]["v1_0"],
            config={"activation": "gated_gelu"},
        )


# --------------------------------------------------------------------------
# Dispatch, and readers that run without the source libraries.


def test_read_t5_checkpoint_dispatches(hf, mtf, model_garden, keras_hub_models):
    expected = {
        hf["dirs"]["v1_0"]: hf["logits"]["v1_0"],
        mtf["v1_0"]: hf["logits"]["v1_0"],
        model_garden["dirs"]["v1_1"]: model_garden["logits"]["v1_1"],
        keras_hub_models["presets"]["v1_1"]: (
            keras_hub_models["outputs"]["v1_1"]["logits"]
        ),
    }
    for path, logits in expected.items():
        config = {}
        if path not in (
            hf["dirs"]["v1_0"],
            keras_hub_models["presets"]["v1_1"],
        ):
            config = {"relative_attention_max_distance": MAX_DISTANCE}
        model = readers.read_t5_checkpoint(path, config=config)
        _assert_close(_our_logits(model), logits)


def test_readers_do_not_import_source_libraries(
    hf, mtf, model_garden, keras_hub_models
):
    sources = ("official", "tf_keras", "keras_hub", "torch", "transformers")
    script = f"""
import sys
from keras_moe.checkpoints import t5
t5.read_t5_hf_safetensors({hf["dirs"]["v1_1"]!r})
t5.read_t5_mtf_checkpoint({mtf["v1_1"]!r})
t5.read_t5_model_garden_checkpoint({model_garden["dirs"]["v1_0"]!r})
t5.read_t5_keras_hub({keras_hub_models["presets"]["v1_1"]!r})
imported = sorted(set({sources!r}) & set(sys.modules))
assert not imported, imported
print("ok")
"""
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))
