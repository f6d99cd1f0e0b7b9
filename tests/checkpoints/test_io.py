"""Tests of keras_moe.checkpoints.io, the file handling the readers share.

Files are written here by their own libraries (safetensors, h5py,
TensorFlow): bfloat16 tensors must come back exactly through ml_dtypes,
every tensor must be read only when asked for, and a missing, truncated or
corrupt file must raise a ValueError that names it.
"""

import json
import os
import sys

import h5py
import ml_dtypes
import numpy as np
import pytest
import tensorflow as tf
from safetensors.numpy import save_file

from keras_moe.checkpoints import io
from keras_moe.checkpoints.common import CheckpointMismatchError


def _truncate(path):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)


def test_lazy_tensor_reads_when_asked_and_checks_its_shape():
    calls = []

    def load():
        calls.append(1)
        return np.arange(24, dtype="float32").reshape(2, 3, 4)

    lazy = io.LazyTensor((2, 3, 4), load, "x.bin (tensor 'w')")
    derived = lazy.transpose(2, 0, 1).reshape(4, -1).T
    assert derived.shape == (6, 4) and lazy.T.shape == (4, 3, 2)
    assert calls == []  # shapes come from the header alone
    expected = np.arange(24, dtype="float32").reshape(2, 3, 4)
    expected = expected.transpose(2, 0, 1).reshape(4, -1).T
    np.testing.assert_array_equal(np.asarray(derived), expected)
    assert calls == [1]
    assert np.asarray(lazy.reshape(1, 2, 3, 4), dtype="float64").dtype == (
        np.float64
    )
    with pytest.raises(ValueError, match="cannot be reshaped"):
        lazy.reshape(5, -1)
    wrong = io.LazyTensor(
        (3, 2), lambda: np.zeros((2, 3)), "x.bin (tensor 'w')"
    )
    with pytest.raises(ValueError, match=r"'w'.*its header says \(3, 2\)"):
        np.asarray(wrong.T)

    def broken():
        raise OSError("disk on fire")

    with pytest.raises(ValueError, match=r"Cannot read x.bin \(tensor 'w'\)"):
        np.asarray(io.LazyTensor((1,), broken, "x.bin (tensor 'w')").T)


def test_put_refuses_a_second_weight_for_one_name():
    arrays = {}
    io.put(arrays, "head/kernel", 1, "a", "checkpoint c")
    with pytest.raises(CheckpointMismatchError, match="second is 'b'"):
        io.put(arrays, "head/kernel", 2, "b", "checkpoint c")


def test_safetensors_bfloat16_comes_back_exactly(tmp_path):
    rng = np.random.default_rng(0)
    values = rng.normal(size=(3, 5)).astype(ml_dtypes.bfloat16)
    other = rng.normal(size=(4,)).astype("float32")
    path = str(tmp_path / "model.safetensors")
    save_file({"w": values, "b": other}, path)
    checkpoint = io.hf_checkpoint(str(tmp_path), ("vit",), "ViT")
    assert checkpoint.files == [path] and checkpoint.config is None
    with io.open_safetensors(checkpoint.files) as tensors:
        assert tensors["w"].shape == (3, 5)
        read = np.asarray(tensors["w"])
        assert read.dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(read, values)
        # Widened on assignment as any other dtype: exactly.
        np.testing.assert_array_equal(
            np.asarray(tensors["w"].T, dtype="float32"),
            values.astype("float32").T,
        )
        np.testing.assert_array_equal(np.asarray(tensors["b"]), other)


def test_safetensors_shards_and_config(tmp_path):
    save_file(
        {"a": np.ones((2,), "float32")}, str(tmp_path / "one.safetensors")
    )
    save_file(
        {"b": np.zeros((3,), "float32")}, str(tmp_path / "two.safetensors")
    )
    index = {"weight_map": {"a": "one.safetensors", "b": "two.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit"}))
    checkpoint = io.hf_checkpoint(tmp_path, ("vit",), "ViT")
    assert checkpoint.config == {"model_type": "vit"}
    with io.open_safetensors(
        checkpoint.files, checkpoint.weight_map
    ) as tensors:
        assert sorted(tensors) == ["a", "b"]
    with pytest.raises(ValueError, match="describes a 'vit' model, not T5"):
        io.hf_checkpoint(tmp_path, ("t5",), "T5")
    index["weight_map"]["c"] = "two.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    checkpoint = io.hf_checkpoint(tmp_path, ("vit",), "ViT")
    with pytest.raises(ValueError, match=r"no shard holds: \['c'\]"):
        with io.open_safetensors(checkpoint.files, checkpoint.weight_map):
            pass
    index["weight_map"]["c"] = "three.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="lacks shards.*three.safetensors"):
        io.hf_checkpoint(tmp_path, ("vit",), "ViT")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_safetensors_damaged_file_is_named(tmp_path, damage):
    path = str(tmp_path / "model.safetensors")
    save_file({"w": np.ones((64, 64), "float32")}, path)
    if damage == "truncate":
        _truncate(path)
    else:
        with open(path, "wb") as f:
            f.write(
                b"not a safetensors file at all" if damage == "garbage" else b""
            )
    with pytest.raises(ValueError, match=f"{path} is truncated or corrupt"):
        with io.open_safetensors([path]):
            pass


def test_hf_checkpoint_missing_files(tmp_path):
    with pytest.raises(ValueError, match="No model.safetensors"):
        io.hf_checkpoint(tmp_path, ("vit",), "ViT")
    with pytest.raises(ValueError, match="No Hugging Face checkpoint"):
        io.hf_checkpoint(tmp_path / "nothing", ("vit",), "ViT")


def test_h5_reads_lazily_and_names_damaged_files(tmp_path):
    path = str(tmp_path / "model.weights.h5")
    with h5py.File(path, "w") as f:
        f["layers/dense/vars/0"] = np.arange(6, dtype="float32").reshape(2, 3)
        f["optimizer/vars/0"] = np.zeros(3, "float32")
    with io.open_h5(path) as datasets:
        assert list(datasets) == ["layers/dense/vars/0"]  # no optimizer
        np.testing.assert_array_equal(
            np.asarray(datasets["layers/dense/vars/0"].T),
            np.arange(6, dtype="float32").reshape(2, 3).T,
        )
    _truncate(path)
    with pytest.raises(ValueError, match=f"Cannot read {path} .truncated"):
        with io.open_h5(path):
            pass
    with pytest.raises(ValueError, match="No weights file at"):
        with io.open_h5(str(tmp_path / "nothing.weights.h5")):
            pass


def test_keras_hub_config(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(
        json.dumps({"class_name": "ViTBackbone", "config": {"a": 1}})
    )
    assert io.keras_hub_config(str(path), "ViTBackbone") == {"a": 1}
    with pytest.raises(ValueError, match="'ViTBackbone', not a keras-hub T5"):
        io.keras_hub_config(str(path), "T5Backbone")
    path.write_text("{")
    with pytest.raises(ValueError, match=f"Cannot read {path}"):
        io.keras_hub_config(str(path), "ViTBackbone")
    with pytest.raises(ValueError, match="not a keras-hub preset"):
        io.keras_hub_config(str(tmp_path / "task.json"), "ViTBackbone")


def test_tf_checkpoint_names_and_errors(tmp_path):
    module = tf.Module()
    module.dense = tf.Module()
    module.dense.kernel = tf.Variable(
        np.ones((2, 3), "float32"), name="dense/kernel"
    )
    prefix = tf.train.Checkpoint(model=module).save(str(tmp_path / "ckpt"))
    found, reader = io.open_tf_checkpoint(str(tmp_path), "test checkpoint")
    assert found == prefix
    assert io.open_tf_checkpoint(prefix + ".index")[0] == prefix
    objects = io.tf_object_variables(reader)
    key, shape = objects["model/dense/kernel"]
    assert shape == [2, 3]
    assert io.tf_variable_names(reader, prefix) == {"dense/kernel": key}
    with pytest.raises(
        ValueError,
        match="Cannot read test checkpoint .*No TensorFlow checkpoint",
    ):
        io.open_tf_checkpoint(str(tmp_path / "nothing"), "test checkpoint")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no tf.train checkpoint"):
        io.open_tf_checkpoint(str(empty))
    for data in tmp_path.glob("ckpt-1.data-*"):
        os.remove(data)
    with pytest.raises(ValueError, match="no data file"):
        io.open_tf_checkpoint(prefix)


def test_checkpoint_format(tmp_path):
    assert io.checkpoint_format(object()) == "keras_hub_object"
    assert io.checkpoint_format("x/model.safetensors") == "hf"
    assert io.checkpoint_format("x/model.weights.h5") == "keras_hub"
    assert io.checkpoint_format(str(tmp_path)) == "tf"
    (tmp_path / "model.weights.h5").write_bytes(b"")
    assert io.checkpoint_format(tmp_path) == "keras_hub"
    (tmp_path / "model.safetensors.index.json").write_text("{}")
    assert io.checkpoint_format(tmp_path) == "hf"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))
