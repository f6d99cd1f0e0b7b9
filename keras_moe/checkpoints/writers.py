"""Writes dense keras_moe models as checkpoints of their original formats.

A dense model pretrained here stands in for a user's existing checkpoint, so
it is written in a format the readers of `keras_moe.checkpoints` take, the
one its family is usually published in:

* `ViT` -> a Hugging Face `save_pretrained` directory: `config.json` and
  `model.safetensors` (torch layouts: `Linear.weight` <[out, in]>,
  `Conv2d.weight` <[D, C, P, P]>), read back by
  `keras_moe.checkpoints.vit.read_vit_hf_safetensors`;
* `T5` -> an original (Mesh TensorFlow) checkpoint,
  `model.ckpt-<step>.{index,data-00000-of-00001}` plus a `checkpoint` file,
  read back by `keras_moe.checkpoints.t5.read_t5_mtf_checkpoint`.

The names come from the readers' own name maps (`vit.hf_name`,
`t5.mtf_name`), so that what is written is what is read.

`read_checkpoint(directory)` reads both. Only dense models can be written
(MoE weights have no place in these formats; save those as `.keras`), and a
ViT must use a class token (`pooling="token"`), as Hugging Face's does.
What the formats do not record (dropout rates) is not written.

The directory is written atomically: the files go to a hidden temporary
directory beside it, renamed into place when complete.

Shape letters: D model dimension, C channels, P patch size.

Example:

    model = ViT.from_architecture("vit_tiny")
    write_dense_checkpoint(model, "/tmp/dense_vit")
    same = keras_moe.checkpoints.read_checkpoint("/tmp/dense_vit")
"""

import json
import os

import numpy as np
import tensorflow as tf

from keras_moe.checkpoints import t5
from keras_moe.checkpoints import vit
from keras_moe.models.moe_blocks import moe_layers
from keras_moe.models.t5 import T5
from keras_moe.models.vit import ViT
from keras_moe.utils.files import atomic_directory


def _check_dense(model):
    moe = [layer.path for layer in moe_layers(model)]
    if moe:
        raise ValueError(
            f"only dense models can be written as dense checkpoints; "
            f"{type(model).__name__} has MoE layers {moe[:4]} (save it as "
            "a .keras file instead)"
        )


def vit_hf_arrays(model):
    """(config.json dict, {HF name: array}) of a dense `ViT`.

    The inverse of `keras_moe.checkpoints.vit.read_vit_hf_safetensors`'s
    mapping (`vit.hf_name`), in the layout
    `ViTForImageClassification.save_pretrained` writes.
    """
    if model.pooling != "token":
        raise ValueError(
            "A Hugging Face ViT checkpoint needs a class token; the model "
            f"has pooling={model.pooling!r}"
        )
    if model.activation not in vit.HF_ACTIVATIONS:
        raise ValueError(
            f"activation {model.activation!r} has no Hugging Face ViT "
            f"name; supported: {sorted(vit.HF_ACTIVATIONS)}"
        )
    arrays = {}
    for name, variable in model.canonical_variables().items():
        value = np.asarray(variable.numpy(), dtype=np.float32)
        hf_name, axes = vit.hf_name(name)
        if axes is not None:
            value = value.transpose(axes)  # to torch's layout
        arrays[hf_name] = np.ascontiguousarray(value)
    kwargs = {key: getattr(model, key) for key in vit.HF_CONFIG_KEYS}
    # An int for square images; [height, width] otherwise (the transformers
    # config takes either).
    height, width = model.image_hw
    kwargs["image_size"] = height if height == width else [height, width]
    config = {
        "model_type": "vit",
        "architectures": [
            "ViTForImageClassification" if model.num_classes else "ViTModel"
        ],
        **{name: kwargs[key] for key, name in vit.HF_CONFIG_KEYS.items()},
        # The first of the names the reader takes.
        "hidden_act": vit.HF_ACTIVATIONS[model.activation][0],
        "qkv_bias": True,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
    }
    if model.num_classes:
        config["id2label"] = {str(i): str(i) for i in range(model.num_classes)}
        config["label2id"] = {str(i): i for i in range(model.num_classes)}
    return config, arrays


def _write_vit(model, directory):
    from safetensors.numpy import save_file

    config, arrays = vit_hf_arrays(model)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    save_file(
        arrays,
        os.path.join(directory, "model.safetensors"),
        metadata={"format": "pt"},
    )


def write_dense_checkpoint(model, directory, overwrite=False):
    """Writes a dense `ViT` or `T5` to `directory` (see the module doc).

    Args:
        model: a dense keras_moe `ViT` (class token) or `T5`.
        directory: the checkpoint directory to create.
        overwrite: replace an existing directory.

    Returns:
        `directory`.

    Raises:
        ValueError: a model of another class, with MoE layers, or that the
            format cannot hold; `directory` exists (without `overwrite`) or
            is a file.
    """
    if not isinstance(model, (ViT, T5)):
        raise ValueError(
            "write_dense_checkpoint takes a keras_moe ViT or T5; received "
            f"{type(model).__name__}"
        )
    _check_dense(model)
    directory = os.path.abspath(os.fspath(directory))
    if os.path.isfile(directory):
        raise ValueError(f"checkpoint directory {directory} is a file")
    if os.path.exists(directory) and not overwrite:
        raise ValueError(
            f"checkpoint directory {directory} exists; pass overwrite=True "
            "to replace it"
        )
    with atomic_directory(directory, overwrite=overwrite) as temp:
        if isinstance(model, ViT):
            _write_vit(model, temp)
        else:
            write_mtf_checkpoint(model, temp, optimizer_slots=False)
    return directory


# ---------------------------------------------------------------------------
# Mesh TensorFlow (original T5) checkpoints.


def mtf_arrays(model, optimizer_slots=True, seed=0):
    """A `T5`'s weights under the names of the released MTF checkpoints.

    The inverse of `keras_moe.checkpoints.t5.read_t5_mtf_checkpoint`'s name
    mapping (`t5.mtf_name`):
    `encoder/block_000/layer_001/DenseReluDense/wi/kernel` and so on, with
    `layer_norm` (v1.0) or `rms_norm` (v1.1) norms and the relative
    attention bias transposed to MTF's [heads, buckets].

    Args:
        model: a dense `keras_moe.models.t5.T5`.
        optimizer_slots: also write what a training checkpoint holds next to
            the weights: Adafactor's factored second moments (`_slot_vr`,
            `_slot_vc` of every matrix, `_slot_v` of every vector), random,
            and `global_step`.
        seed: of the slot values.

    Returns:
        dict MTF name -> C-contiguous NumPy array.
    """
    variables = model.canonical_variables()
    v1_1 = "lm_head/kernel" in variables
    out = {}
    for name, variable in variables.items():
        array = variable.numpy()
        mtf_name, transpose = t5.mtf_name(name, v1_1)
        out[mtf_name] = np.ascontiguousarray(array.T if transpose else array)
    if optimizer_slots:
        rng = np.random.default_rng(seed)
        for name, array in list(out.items()):
            if array.ndim == 2:
                out[f"{name}_slot_vr"] = rng.random(array.shape[:1], "float32")
                out[f"{name}_slot_vc"] = rng.random(array.shape[1:], "float32")
            else:
                out[f"{name}_slot_v"] = rng.random(array.shape, "float32")
        out["global_step"] = np.int64(1_000_000)
    return out


def write_mtf_checkpoint(model, directory, step=1_000_000, **options):
    """Writes `model` as a Mesh TensorFlow checkpoint; returns its prefix.

    Writes `model.ckpt-{step}.index`, its data file and a `checkpoint` file
    naming it, as the released T5 checkpoints are laid out.

    Args:
        model: a dense `T5`.
        directory: created if missing.
        step: the step in the file name.
        **options: `mtf_arrays` options.
    """
    arrays = mtf_arrays(model, **options)
    os.makedirs(directory, exist_ok=True)
    prefix = os.path.join(directory, f"model.ckpt-{step}")
    names = sorted(arrays)
    tf.raw_ops.SaveV2(
        prefix=prefix,
        tensor_names=names,
        shape_and_slices=[""] * len(names),
        tensors=[arrays[n] for n in names],
    )
    with open(os.path.join(directory, "checkpoint"), "w") as f:
        f.write(f'model_checkpoint_path: "model.ckpt-{step}"\n')
    return prefix
