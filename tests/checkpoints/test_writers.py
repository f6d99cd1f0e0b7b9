"""Tests of keras_moe.checkpoints.writers: written checkpoints read back by
keras_moe.checkpoints give the same model, the files follow the source
formats' layouts (the released T5 checkpoints' names, torch layouts), and
the writers' names are the inverses of the readers' name maps."""

import json
import os
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from safetensors.numpy import load_file

import keras_moe
from keras_moe.checkpoints import read_checkpoint
from keras_moe.checkpoints import t5 as t5_names
from keras_moe.checkpoints import vit as vit_names
from keras_moe.checkpoints.t5 import read_t5_mtf_checkpoint
from keras_moe.checkpoints.writers import write_dense_checkpoint
from keras_moe.checkpoints.writers import write_mtf_checkpoint
from keras_moe.models.t5 import T5
from keras_moe.models.t5 import t5_config
from keras_moe.models.vit import ViT


def _randomize(model, seed=0):
    rng = np.random.default_rng(seed)
    for weight in model.weights:
        noise = rng.normal(scale=0.2, size=weight.shape).astype("float32")
        weight.assign(weight.numpy() + noise)
    return model


@pytest.mark.parametrize("image_size", [8, [8, 16]])
def test_vit_round_trip(image_size, tmp_path):
    model = _randomize(
        ViT(
            image_size=image_size,
            patch_size=4,
            num_channels=1,
            model_dim=16,
            num_heads=2,
            hidden_dim=24,
            num_layers=2,
            num_classes=7,
            activation="gelu_tanh",
            layer_norm_epsilon=1e-5,
        )
    )
    path = write_dense_checkpoint(model, tmp_path / "vit")
    assert sorted(os.listdir(path)) == ["config.json", "model.safetensors"]
    assert os.listdir(tmp_path) == ["vit"]  # no temporary directory left
    config = json.loads((tmp_path / "vit" / "config.json").read_text())
    assert config["hidden_act"] == "gelu_pytorch_tanh"
    assert config["image_size"] == image_size
    tensors = load_file(str(tmp_path / "vit" / "model.safetensors"))
    # torch layouts: Conv2d [D, C, P, P], Linear [out, in].
    assert tensors[
        "vit.embeddings.patch_embeddings.projection.weight"
    ].shape == (16, 1, 4, 4)
    np.testing.assert_array_equal(
        tensors["vit.encoder.layer.1.intermediate.dense.weight"],
        model.canonical_variables()["encoder/block_1/mlp/wi"].numpy().T,
    )
    read = read_checkpoint(path)
    assert read.get_config() == model.get_config()
    height, width = model.image_hw
    images = np.random.default_rng(1).random((3, height, width, 1), "float32")
    np.testing.assert_array_equal(read(images), model(images))


def test_t5_round_trip(tmp_path):
    model = _randomize(
        T5.from_architecture("t5_tiny", relative_attention_max_distance=128)
    )
    path = write_dense_checkpoint(model, tmp_path / "t5")
    assert "checkpoint" in os.listdir(path)  # the original T5 layout
    read = read_checkpoint(path)
    config = model.get_config()
    config["name"] = read.get_config()["name"]
    assert read.get_config() == config
    inputs = {
        "encoder_token_ids": np.array([[5, 6, 7, 1, 0]]),
        "decoder_token_ids": np.array([[0, 9, 3, 2]]),
    }
    np.testing.assert_array_equal(read(inputs), model(inputs))


def test_overwrite_replaces_and_refuses_without_it(tmp_path):
    first = _randomize(ViT.from_architecture("vit_tiny"), seed=1)
    second = _randomize(ViT.from_architecture("vit_tiny"), seed=2)
    write_dense_checkpoint(first, tmp_path / "vit")
    with pytest.raises(ValueError, match="exists; pass overwrite=True"):
        write_dense_checkpoint(second, tmp_path / "vit")
    write_dense_checkpoint(second, tmp_path / "vit", overwrite=True)
    assert os.listdir(tmp_path) == ["vit"]
    images = np.ones((1, 32, 32, 3), "float32")
    np.testing.assert_array_equal(
        read_checkpoint(tmp_path / "vit")(images), second(images)
    )


def test_bad_inputs(tmp_path):
    dense = ViT.from_architecture("vit_tiny")
    with pytest.raises(ValueError, match="has MoE layers"):
        write_dense_checkpoint(
            keras_moe.upcycle(dense, num_experts=2), tmp_path / "moe"
        )
    with pytest.raises(ValueError, match="needs a class token"):
        write_dense_checkpoint(
            ViT.from_architecture("vit_tiny", pooling="gap"), tmp_path / "gap"
        )
    with pytest.raises(ValueError, match="takes a keras_moe ViT or T5"):
        write_dense_checkpoint(
            keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)]),
            tmp_path / "x",
        )
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        write_dense_checkpoint(dense, tmp_path / "file", overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["file"]


@pytest.mark.parametrize("preset", ["t5_tiny", "t5_v1_1_tiny"])
def test_mtf_checkpoint_reads_back_exactly(preset, tmp_path):
    keras.utils.set_random_seed(1)
    model = T5.from_architecture(preset)
    prefix = write_mtf_checkpoint(model, tmp_path)
    listed = dict(tf.train.list_variables(prefix))
    # The released checkpoints' names, Adafactor slots and step included.
    assert listed["global_step"] == []
    assert listed["encoder/block_001/layer_001/DenseReluDense/wo/kernel"] == [
        64,
        32,
    ]
    # Relative bias: [heads, buckets] in MTF.
    name = "decoder/block_000/layer_000/SelfAttention/relative_attention_bias"
    assert listed[name] == [4, 8]
    assert listed[f"{name}_slot_vr"] == [4]
    assert listed[f"{name}_slot_vc"] == [8]
    norm = "rms_norm" if "v1_1" in preset else "layer_norm"
    assert f"decoder/block_001/layer_002/{norm}/scale_slot_v" in listed
    assert ("decoder/logits/kernel" in listed) == ("v1_1" in preset)

    read = read_t5_mtf_checkpoint(tmp_path, config=preset)
    config = read.get_config()
    assert {k: config[k] for k in t5_config(preset)} == t5_config(preset)
    expected = model.canonical_variables()
    got = read.canonical_variables()
    assert set(got) == set(expected)
    for name, variable in expected.items():
        np.testing.assert_array_equal(
            got[name].numpy(), variable.numpy(), err_msg=name
        )


@pytest.mark.parametrize("preset", ["t5_tiny", "t5_v1_1_tiny"])
def test_mtf_names_invert_the_readers_map(preset):
    variables = T5.from_architecture(preset).canonical_variables()
    v1_1 = "lm_head/kernel" in variables
    for name in variables:
        mtf_name, transpose = t5_names.mtf_name(name, v1_1)
        assert t5_names._mtf_canonical_name(mtf_name) == (name, transpose)
    with pytest.raises(ValueError, match="no Mesh TensorFlow name"):
        t5_names.mtf_name("encoder/block_0/mlp/router/kernel", v1_1)


def test_vit_hf_names_invert_the_readers_map():
    variables = ViT.from_architecture("vit_tiny").canonical_variables()
    for name in variables:
        hf_name, axes = vit_names.hf_name(name)
        canonical, back = vit_names._hf_canonical_name(hf_name)
        assert canonical == name
        if axes is None:
            assert back is None
        else:
            order = np.arange(len(axes))
            assert list(order[list(axes)][list(back)]) == list(order)
    with pytest.raises(ValueError, match="no Hugging Face name"):
        vit_names.hf_name("encoder/block_0/mlp/router/kernel")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))
