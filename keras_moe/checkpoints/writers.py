"""Writes dense keras_moe models as checkpoints of their original formats.

A dense model pretrained here stands in for a user's existing checkpoint, so
it is written in a format the readers of `keras_moe.checkpoints` take, the
one its family is usually published in:

* `ViT` -> a Hugging Face `save_pretrained` directory: `config.json` and
  `model.safetensors` (torch layouts: `Linear.weight` <[out, in]>,
  `Conv2d.weight` <[D, C, P, P]>), read back by
  `keras_moe.checkpoints.vit.read_hf`;
* `T5` -> an original (Mesh TensorFlow) checkpoint,
  `model.ckpt-<step>.{index,data-00000-of-00001}` plus a `checkpoint` file,
  read back by `keras_moe.checkpoints.t5.read_t5_mtf_checkpoint`.

`read_checkpoint(directory)` reads both. Only dense models can be written
(MoE weights have no place in these formats; save those as `.keras`), and a
ViT must use a class token (`pooling="token"`), as Hugging Face's does.
What the formats do not record (dropout rates) is not written.

The directory is written atomically: the files go to a hidden temporary
directory beside it, renamed into place when complete.

Shape letters: D model dimension, C channels, P patch size.

Example:

    model = ViT.from_preset("vit_tiny")
    write_dense_checkpoint(model, "/tmp/dense_vit")
    same = keras_moe.checkpoints.read_checkpoint("/tmp/dense_vit")
"""

import json
import os
import re
import shutil
import tempfile

import numpy as np
import tensorflow as tf

from keras_moe.layers.moe import MoeLayer
from keras_moe.models.t5 import T5
from keras_moe.models.vit import ViT

_VIT_HF_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_tanh": "gelu_pytorch_tanh",
    "relu": "relu",
    "silu": "silu",
}
_VIT_FIXED = {
    "class_token": "vit.embeddings.cls_token",
    "position_embedding": "vit.embeddings.position_embeddings",
    "patch_embedding/kernel": "vit.embeddings.patch_embeddings.projection."
    "weight",
    "patch_embedding/bias": "vit.embeddings.patch_embeddings.projection.bias",
    "encoder/final_norm/gamma": "vit.layernorm.weight",
    "encoder/final_norm/beta": "vit.layernorm.bias",
    "head/kernel": "classifier.weight",
    "head/bias": "classifier.bias",
}
_VIT_BLOCK = re.compile(r"^encoder/block_(\d+)/(.+)$")
_VIT_BLOCK_PARTS = {
    "attention_norm/gamma": "layernorm_before.weight",
    "attention_norm/beta": "layernorm_before.bias",
    "mlp_norm/gamma": "layernorm_after.weight",
    "mlp_norm/beta": "layernorm_after.bias",
    "attention/query/kernel": "attention.attention.query.weight",
    "attention/query/bias": "attention.attention.query.bias",
    "attention/key/kernel": "attention.attention.key.weight",
    "attention/key/bias": "attention.attention.key.bias",
    "attention/value/kernel": "attention.attention.value.weight",
    "attention/value/bias": "attention.attention.value.bias",
    "attention/output/kernel": "attention.output.dense.weight",
    "attention/output/bias": "attention.output.dense.bias",
    "mlp/wi": "intermediate.dense.weight",
    "mlp/bi": "intermediate.dense.bias",
    "mlp/wo": "output.dense.weight",
    "mlp/bo": "output.dense.bias",
}


def _check_dense(model):
    moe = [
        layer.path
        for layer in model._flatten_layers(include_self=False)
        if isinstance(layer, MoeLayer)
    ]
    if moe:
        raise ValueError(
            f"only dense models can be written as dense checkpoints; "
            f"{type(model).__name__} has MoE layers {moe[:4]} (save it as "
            "a .keras file instead)"
        )


def vit_hf_arrays(model):
    """(config.json dict, {HF name: array}) of a dense `ViT`.

    The inverse of `keras_moe.checkpoints.vit.read_hf`'s mapping, in the
    layout `ViTForImageClassification.save_pretrained` writes.
    """
    if model.pooling != "token":
        raise ValueError(
            "A Hugging Face ViT checkpoint needs a class token; the model "
            f"has pooling={model.pooling!r}"
        )
    if model.activation not in _VIT_HF_ACTIVATIONS:
        raise ValueError(
            f"activation {model.activation!r} has no Hugging Face ViT "
            f"name; supported: {sorted(_VIT_HF_ACTIVATIONS)}"
        )
    arrays = {}
    for name, variable in model.canonical_variables().items():
        value = np.asarray(variable.numpy(), dtype=np.float32)
        if name in _VIT_FIXED:
            hf_name = _VIT_FIXED[name]
        else:
            match = _VIT_BLOCK.match(name)
            part = match and _VIT_BLOCK_PARTS.get(match[2])
            if not part:
                raise ValueError(f"no Hugging Face name for ViT weight {name}")
            hf_name = f"vit.encoder.layer.{match[1]}.{part}"
        if name == "patch_embedding/kernel":
            value = value.transpose(3, 2, 0, 1)  # HWIO -> (D, C, P, P)
        elif hf_name.endswith(".weight") and value.ndim == 2:
            value = value.T  # x @ W -> torch Linear [out, in]
        arrays[hf_name] = np.ascontiguousarray(value)
    config = {
        "model_type": "vit",
        "architectures": [
            "ViTForImageClassification" if model.num_classes else "ViTModel"
        ],
        "hidden_size": model.model_dim,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_heads,
        "intermediate_size": model.hidden_dim,
        "hidden_act": _VIT_HF_ACTIVATIONS[model.activation],
        "layer_norm_eps": model.layer_norm_epsilon,
        # An int for square images; [height, width] otherwise (the
        # transformers config takes either).
        "image_size": (
            model.image_hw[0]
            if model.image_hw[0] == model.image_hw[1]
            else list(model.image_hw)
        ),
        "patch_size": model.patch_size,
        "num_channels": model.num_channels,
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
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    temp = tempfile.mkdtemp(
        dir=parent, prefix=f".{os.path.basename(directory)}.tmp-"
    )
    try:
        if isinstance(model, ViT):
            _write_vit(model, temp)
        else:
            write_mtf_checkpoint(model, temp, optimizer_slots=False)
        if os.path.exists(directory):
            old = tempfile.mkdtemp(
                dir=parent, prefix=f".{os.path.basename(directory)}.old-"
            )
            os.rename(directory, os.path.join(old, "checkpoint"))
            os.rename(temp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(temp, directory)
    finally:
        if os.path.exists(temp):
            shutil.rmtree(temp, ignore_errors=True)
    return directory


# ---------------------------------------------------------------------------
# Mesh TensorFlow (original T5) checkpoints.

# Sub-layers of a block in the order Mesh TensorFlow numbers them.
_ROLES = {
    "encoder": ("self_attention", "mlp"),
    "decoder": ("self_attention", "cross_attention", "mlp"),
}
_ATTENTIONS = {
    "self_attention": "SelfAttention",
    "cross_attention": "EncDecAttention",
}
_PROJECTIONS = {"query": "q", "key": "k", "value": "v", "output": "o"}
_BLOCK_WEIGHT = re.compile(
    r"^(?P<stack>encoder|decoder)/block_(?P<block>\d+)/"
    r"(?P<role>self_attention|cross_attention|mlp)"
    r"(?P<norm>_norm/scale)?(?:/(?P<weight>[^/]+))?$"
)


def mtf_arrays(model, optimizer_slots=True, seed=0):
    """A `T5`'s weights under the names of the released MTF checkpoints.

    The inverse of `keras_moe.checkpoints.t5.read_t5_mtf_checkpoint`'s name
    mapping: `encoder/block_000/layer_001/DenseReluDense/wi/kernel` and so
    on, with `layer_norm` (v1.0) or `rms_norm` (v1.1) norms and the relative
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
    norm = "rms_norm" if v1_1 else "layer_norm"
    out = {}
    for name, variable in variables.items():
        array = variable.numpy()
        mtf_name, array = _mtf_name(name, norm, v1_1, array)
        out[mtf_name] = np.ascontiguousarray(array)
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


def _mtf_name(name, norm, v1_1, array):
    """(MTF name, array in MTF layout) of canonical weight `name`."""
    if name == "shared/embedding":
        return name, array
    if name == "lm_head/kernel":
        return "decoder/logits/kernel", array
    for stack in _ROLES:
        if name == f"{stack}/final_norm/scale":
            final = "rms_norm" if v1_1 else "final_layer_norm"
            return f"{stack}/{final}/scale", array
    match = _BLOCK_WEIGHT.match(name)
    if match is None:
        raise ValueError(f"no Mesh TensorFlow name for T5 weight {name!r}")
    stack, role, weight = match["stack"], match["role"], match["weight"]
    layer = (
        f"{stack}/block_{int(match['block']):03d}/"
        f"layer_{_ROLES[stack].index(role):03d}"
    )
    if match["norm"]:
        return f"{layer}/{norm}/scale", array
    if role == "mlp":
        return f"{layer}/DenseReluDense/{weight}/kernel", array
    if weight == "relative_attention_bias":
        # keras_moe stores [buckets, heads], MTF [heads, buckets].
        return f"{layer}/SelfAttention/{weight}", array.T
    return f"{layer}/{_ATTENTIONS[role]}/{_PROJECTIONS[weight]}", array


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
