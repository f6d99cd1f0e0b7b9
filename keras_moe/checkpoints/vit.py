"""Readers that bring ViT checkpoints into `keras_moe.models.vit.ViT`.

Shape letters: P patch size, C channels, D model dimension, F MLP hidden
dimension, h heads, dk head dimension (D / h), T tokens, K classes.

| reader                             | source                                |
|------------------------------------|---------------------------------------|
| `read_vit_hf_safetensors`          | Hugging Face `save_pretrained` dir    |
| `read_vit_model_garden_checkpoint` | TF Model Garden `VisionTransformer`   |
| `read_vit_keras_hub`               | keras-hub preset dir or `.weights.h5` |
| `convert_vit_keras_hub_backbone`   | a keras-hub `ViTBackbone` object      |
| `read_vit_checkpoint`              | any of the above, by sniffing the path |

* `read_vit_hf_safetensors(path)`: a Hugging Face
  `ViTForImageClassification` (or `ViTModel`) directory as
  `save_pretrained` writes it: `config.json` and `model.safetensors` (or
  sharded, with `model.safetensors.index.json`); transformers is not
  needed.
* `read_vit_model_garden_checkpoint(path)`: a TF Model Garden ViT
  (`official.vision` `VisionTransformer`, alone or in a
  `ClassificationModel`) `tf.train` checkpoint, read by variable name;
  neither tf_keras nor `official` is imported. Model Garden's ViT uses the
  tanh GELU, so the model gets `activation="gelu_tanh"`.
* `read_vit_keras_hub(path)`: a keras-hub preset directory written by
  `save_to_preset`, or a backbone or classifier `.weights.h5` file; and
  `convert_vit_keras_hub_backbone(model)`: a keras-hub `ViTBackbone` or
  `ViTImageClassifier` object. keras_hub is not imported. A backbone has
  no head: the model gets none (`num_classes=0`, the call returns pooled
  features) unless `config` gives `num_classes`, which adds a new,
  zero-initialised one.

The `config` argument of every reader is None, an architecture name (see
`keras_moe.models.vit.vit_config`) or a dict of `ViT` keyword arguments: it
fixes what the format does not record (`num_heads` of a Hugging Face
directory without `config.json`, `image_size` of a non-square patch grid,
`layer_norm_epsilon` of a bare `.weights.h5`). What it says that the
checkpoint also says must agree, and a disagreement is an error naming both.

Every reader translates the source's names into the canonical names of
`ViT.canonical_variables()`, checks the source's configuration against
the shapes it read, and assigns with `keras_moe.checkpoints.common.
assign_weights`: a checkpoint of another model, an unreadable or truncated
file, a config that contradicts the weights, or a missing, unexpected or
misshapen weight raises a `ValueError` (`CheckpointMismatchError` for
mismatches) that names the problem. Files are opened and read by
`keras_moe.checkpoints.io`, lazily: each tensor when it is assigned, after
every name and shape has been checked. This module holds the ViT name maps
(`hf_name` gives the writers the inverse of the Hugging Face one) and the
ViT logic.

Conversions (canonical kernels are `x @ W`):

* PyTorch `Linear.weight` <[out, in]> -> transposed; `Conv2d.weight`
  <[D, C, P, P]> -> <[P, P, C, D]> (HWIO).
* Keras `EinsumDense` attention kernels <[D, h, dk]> / <[h, dk, D]> and
  biases <[h, dk]> -> <[D, D]> and <[D]> (heads concatenated h-major, the
  order in which the model splits them).
* keras-hub's position embedding `Embedding` table <[T, D]> -> <[1, T, D]>.
* Missing attention / MLP / patch biases of sources built without them
  (`qkv_bias=False`, `use_mha_bias=False`, ...) become zeros, which is
  the same function.
"""

import contextlib
import functools
import math
import os
import re

import numpy as np

from keras_moe.checkpoints import io
from keras_moe.checkpoints.common import CheckpointMismatchError
from keras_moe.checkpoints.common import assign_weights
from keras_moe.checkpoints.common import config_kwargs
from keras_moe.checkpoints.common import listing
from keras_moe.models.vit import ViT
from keras_moe.models.vit import vit_config

_BLOCK = re.compile(r"encoder/block_(\d+)/(.+)")


# --------------------------------------------------------------------------
# The Hugging Face name map, declared once: `read_vit_hf_safetensors` reads
# with it and `hf_name` gives `keras_moe.checkpoints.writers` its inverse.

# Layout -> the axes `np.transpose` takes from keras_moe's layout to torch's.
_TORCH_LAYOUTS = {
    "linear": (1, 0),  # x @ W <[in, out]> -> Linear.weight <[out, in]>
    "conv": (3, 2, 0, 1),  # HWIO -> Conv2d.weight <[D, C, P, P]>
}
# Canonical name -> (Hugging Face name, layout). In a
# `ViTForImageClassification` the backbone's names start with "vit.", in a
# `ViTModel` they do not.
_HF_BACKBONE = {
    "class_token": ("embeddings.cls_token", None),
    "position_embedding": ("embeddings.position_embeddings", None),
    "patch_embedding/kernel": (
        "embeddings.patch_embeddings.projection.weight",
        "conv",
    ),
    "patch_embedding/bias": (
        "embeddings.patch_embeddings.projection.bias",
        None,
    ),
    "encoder/final_norm/gamma": ("layernorm.weight", None),
    "encoder/final_norm/beta": ("layernorm.bias", None),
}
_HF_HEAD = {
    "head/kernel": ("classifier.weight", "linear"),
    "head/bias": ("classifier.bias", None),
}
# Name within `encoder/block_N/` -> (name within `encoder.layer.N.`, layout).
_HF_BLOCK = {
    "attention_norm/gamma": ("layernorm_before.weight", None),
    "attention_norm/beta": ("layernorm_before.bias", None),
    "mlp_norm/gamma": ("layernorm_after.weight", None),
    "mlp_norm/beta": ("layernorm_after.bias", None),
    "attention/query/kernel": ("attention.attention.query.weight", "linear"),
    "attention/query/bias": ("attention.attention.query.bias", None),
    "attention/key/kernel": ("attention.attention.key.weight", "linear"),
    "attention/key/bias": ("attention.attention.key.bias", None),
    "attention/value/kernel": ("attention.attention.value.weight", "linear"),
    "attention/value/bias": ("attention.attention.value.bias", None),
    "attention/output/kernel": ("attention.output.dense.weight", "linear"),
    "attention/output/bias": ("attention.output.dense.bias", None),
    "mlp/wi": ("intermediate.dense.weight", "linear"),
    "mlp/bi": ("intermediate.dense.bias", None),
    "mlp/wo": ("output.dense.weight", "linear"),
    "mlp/bo": ("output.dense.bias", None),
}
# transformers 5 names the blocks `layers.N.` and some modules differently;
# they are read as the modules above.
_HF_MODULE_ALIASES = {
    "attention.q_proj": "attention.attention.query",
    "attention.k_proj": "attention.attention.key",
    "attention.v_proj": "attention.attention.value",
    "attention.o_proj": "attention.output.dense",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
}
# keras_moe activation -> Hugging Face `hidden_act` names: the first is the
# one written, all are read.
HF_ACTIVATIONS = {
    "gelu": ("gelu",),
    "gelu_tanh": ("gelu_pytorch_tanh", "gelu_new"),
    "relu": ("relu",),
    "silu": ("silu", "swish"),
}
# ViT kwarg -> Hugging Face `config.json` key.
HF_CONFIG_KEYS = {
    "model_dim": "hidden_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "hidden_dim": "intermediate_size",
    "patch_size": "patch_size",
    "num_channels": "num_channels",
    "image_size": "image_size",
    "layer_norm_epsilon": "layer_norm_eps",
}

_HF_NAMES = {
    name: (canonical, layout)
    for canonical, (name, layout) in {**_HF_BACKBONE, **_HF_HEAD}.items()
}
_HF_BLOCK_NAMES = {
    name: (part, layout) for part, (name, layout) in _HF_BLOCK.items()
}
_HF_ACTIVATION_NAMES = {
    name: activation
    for activation, names in HF_ACTIVATIONS.items()
    for name in names
}
_HF_LAYER = re.compile(r"(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias)")


def hf_name(canonical):
    """The Hugging Face name of a canonical ViT weight.

    The inverse of the mapping `read_vit_hf_safetensors` reads with, from
    the same tables, in the names `ViTForImageClassification` saves.

    Args:
        canonical: a name of `ViT.canonical_variables()` of a dense `ViT`.

    Returns:
        (name, axes): `np.transpose(value, axes)` is the torch layout; axes
        is None where the layouts agree.

    Raises:
        ValueError: a weight the format has no place for (an MoE weight).
    """
    if canonical in _HF_HEAD:
        name, layout = _HF_HEAD[canonical]
    elif canonical in _HF_BACKBONE:
        name, layout = _HF_BACKBONE[canonical]
        name = f"vit.{name}"
    else:
        match = _BLOCK.fullmatch(canonical)
        if match is None or match[2] not in _HF_BLOCK:
            raise ValueError(f"no Hugging Face name for ViT weight {canonical}")
        name, layout = _HF_BLOCK[match[2]]
        name = f"vit.encoder.layer.{match[1]}.{name}"
    return name, _TORCH_LAYOUTS.get(layout)


def _hf_canonical_name(name):
    """(canonical name, axes) of a Hugging Face ViT name, or None.

    `np.transpose(value, axes)` takes the torch layout to keras_moe's; axes
    is None where they agree. Accepts the names `save_pretrained` writes
    (`encoder.layer.N....`) and transformers 5's (`layers.N.attention.
    q_proj...`).
    """
    name = name.removeprefix("vit.")
    mapped = _HF_NAMES.get(name)
    if mapped is None:
        match = _HF_LAYER.fullmatch(name)
        if match is None:
            return None
        index, module, kind = match.groups()
        module = _HF_MODULE_ALIASES.get(module, module)
        part = _HF_BLOCK_NAMES.get(f"{module}.{kind}")
        if part is None:
            return None
        mapped = (f"encoder/block_{index}/{part[0]}", part[1])
    canonical, layout = mapped
    if layout is None:
        return canonical, None
    # The inverse permutation: from torch's layout back to ours.
    return canonical, tuple(int(a) for a in np.argsort(_TORCH_LAYOUTS[layout]))


# --------------------------------------------------------------------------
# Shared by the readers: config inference, checks and assignment.


def _add_zero_biases(arrays, names_and_sizes):
    for name, size in names_and_sizes:
        if name not in arrays:
            arrays[name] = np.zeros((size,), np.float32)


def _infer(arrays, source):
    """Reads the ViT hyper-parameters off the canonical `arrays`' shapes."""
    kernel = arrays.get("patch_embedding/kernel")
    position = arrays.get("position_embedding")
    if kernel is None or position is None:
        missing = [
            name
            for name in ("patch_embedding/kernel", "position_embedding")
            if name not in arrays
        ]
        raise CheckpointMismatchError(
            f"{source} is not a ViT checkpoint: no {' or '.join(missing)} "
            "found"
        )
    if kernel.ndim != 4 or kernel.shape[0] != kernel.shape[1]:
        raise CheckpointMismatchError(
            f"{source}: the patch embedding kernel must be a square conv "
            f"kernel [P, P, C, D]; found shape {kernel.shape}"
        )
    if position.ndim != 3 or position.shape[0] != 1:
        raise CheckpointMismatchError(
            f"{source}: the position embedding must have shape [1, T, D]; "
            f"found {position.shape}"
        )
    blocks = sorted(
        {int(m.group(1)) for m in map(_BLOCK.match, arrays) if m is not None}
    )
    if not blocks or blocks != list(range(len(blocks))):
        raise CheckpointMismatchError(
            f"{source}: the encoder blocks must be numbered 0..L-1; found "
            f"blocks {blocks}"
        )
    wi = arrays.get("encoder/block_0/mlp/wi")
    if wi is None or wi.ndim != 2:
        raise CheckpointMismatchError(
            f"{source}: no MLP input kernel [D, F] found for block 0"
        )
    head = arrays.get("head/kernel")
    pooling = "token" if "class_token" in arrays else "gap"
    return {
        "patch_size": int(kernel.shape[0]),
        "num_channels": int(kernel.shape[2]),
        "model_dim": int(kernel.shape[3]),
        "num_layers": len(blocks),
        "hidden_dim": int(wi.shape[1]),
        "num_classes": 0 if head is None else int(np.shape(head)[-1]),
        "pooling": pooling,
        "num_patches": int(position.shape[1]) - (pooling == "token"),
    }


def _build(arrays, source, claims, defaults, config):
    """Checks every claim about the model, builds it, assigns `arrays`.

    Args:
        arrays: canonical name -> array (or `io.LazyTensor`).
        source: description of the checkpoint, for errors.
        claims: list of (origin, {kwarg: value}): what the source's config
            files and shapes outside the canonical arrays say. Every kwarg
            that two origins (the canonical shapes, "the weights", and the
            caller's `config`, "the arguments", being two) both state must
            agree.
        defaults: kwargs used when no origin states them.
        config: the caller's kwargs (from `config_kwargs`).
    """
    inferred = _infer(arrays, source)
    num_patches = inferred.pop("num_patches")
    claims = [("the weights", inferred)] + [
        (origin, {k: v for k, v in said.items() if v is not None})
        for origin, said in claims + [("the arguments", config)]
    ]
    problems = []
    config = dict(defaults)
    seen = {}
    for origin, said in claims:
        for key, value in said.items():
            if key == "image_size":
                continue
            if key in seen and seen[key][1] != value:
                problems.append(
                    f"{key}: {seen[key][1]!r} in {seen[key][0]}, {value!r} in "
                    f"{origin}"
                )
            seen.setdefault(key, (origin, value))
            config[key] = seen[key][1]
    patch = inferred["patch_size"]
    image_claims = [
        (origin, said["image_size"])
        for origin, said in claims
        if said.get("image_size") is not None
    ]
    for origin, size in image_claims:
        pair = (size, size) if isinstance(size, int) else tuple(size)
        patches = (pair[0] // patch) * (pair[1] // patch)
        if pair[0] % patch or pair[1] % patch or patches != num_patches:
            problems.append(
                f"image_size: {size!r} in {origin}, which with patch_size "
                f"{patch} makes {patches} patches, but the position "
                f"embedding has {num_patches} ({inferred['pooling']!r} "
                "pooling)"
            )
    if image_claims:
        size = image_claims[0][1]
        config["image_size"] = size if isinstance(size, int) else list(size)
    else:
        side = math.isqrt(num_patches)
        if side * side != num_patches:
            problems.append(
                f"image_size: the position embedding has {num_patches} "
                "patches, not a square grid; pass it in config"
            )
        config["image_size"] = side * patch
    if config.get("num_heads") is None:
        problems.append(f"num_heads: {source} does not say; pass it in config")
    elif config["model_dim"] % config["num_heads"]:
        problems.append(
            f"num_heads: {config['num_heads']} does not divide model_dim "
            f"{config['model_dim']}"
        )
    if problems:
        raise CheckpointMismatchError(
            f"Cannot read {source} as a ViT: " + "; ".join(problems)
        )
    model = ViT(**config)
    return assign_weights(model, arrays, source=source)


def _config(config):
    return config_kwargs(config, ViT, vit_config)


def _unexpected(names, source, note=""):
    if names:
        raise CheckpointMismatchError(
            f"Cannot read {source} as a ViT: unexpected in the checkpoint: "
            f"{listing(sorted(names))}{note}"
        )


def _block_indices(raw_indices):
    """Maps source block numbers (None for an unnumbered first block) to
    0..L-1 in their order."""
    order = sorted({-1 if i is None else i for i in raw_indices})
    return {(None if i == -1 else i): rank for rank, i in enumerate(order)}


def _match_rules(values, rules):
    """Sorts source variables by the first of `rules` their name matches.

    Args:
        values: source name -> array.
        rules: list of (compiled pattern, kind).

    Returns:
        ([(kind, match groups, name, array)], [names no rule matches]).
    """
    matched, unused = [], []
    for name, value in values.items():
        for pattern, kind in rules:
            match = pattern.search(name)
            if match:
                matched.append((kind, match.groups(), name, value))
                break
        else:
            unused.append(name)
    return matched, unused


def _einsum_attention(layer, field, value, heads):
    """(canonical layer, value) of a Keras `EinsumDense` attention weight.

    Args:
        layer: "query", "key", "value", or "output" / "attention_output".
        field: "kernel" or "bias".
        value: the source array.
        heads: a set; the heads a kernel shows are added to it.
    """
    if layer in ("attention_output", "output"):
        if field == "kernel":  # (h, dk, D) -> (h*dk, D)
            heads.add(value.shape[0])
            value = value.reshape(-1, value.shape[-1])
        return "output", value
    if field == "kernel":  # (D, h, dk) -> (D, h*dk)
        heads.add(value.shape[1])
        return layer, value.reshape(value.shape[0], -1)
    return layer, value.reshape(-1)  # (h, dk) -> (h*dk,)


def _num_heads(heads, source):
    """The one number of heads the attention kernels show, or None."""
    if len(heads) > 1:
        raise CheckpointMismatchError(
            f"{source}: attention kernels disagree on the number of heads: "
            f"{sorted(heads)}"
        )
    return heads.pop() if heads else None


# --------------------------------------------------------------------------
# Hugging Face safetensors.


def read_vit_hf_safetensors(path, config=None):
    """Reads a Hugging Face ViT checkpoint into a `ViT`.

    Args:
        path: a directory written by `ViTForImageClassification.
            save_pretrained(..., safe_serialization=True)` (or by
            `ViTModel`: no head), or its `model.safetensors` file.
        config: None, an architecture name or a dict of `ViT` kwargs, checked
            against `config.json` and the weights; it must give
            `num_heads` when the directory has no config.json.

    Returns:
        A `ViT` with the checkpoint's weights, `layer_norm_epsilon` and
        activation.

    Raises:
        ValueError: unreadable or truncated files, a config of another
            model type, a config that contradicts the weights, or weights a
            ViT does not have (e.g. `ViTModel`'s pooler).
    """
    config = _config(config)
    checkpoint = io.hf_checkpoint(path, ("vit",), "ViT")
    source = f"Hugging Face checkpoint {path}"
    hf = checkpoint.config or {}
    with io.open_safetensors(
        checkpoint.files, checkpoint.weight_map
    ) as tensors:
        arrays, unused = {}, []
        for name in sorted(tensors):
            mapped = _hf_canonical_name(name)
            if mapped is None:
                unused.append(name)
                continue
            canonical, axes = mapped
            value = tensors[name]
            if axes is not None:
                value = value.transpose(*axes)
            io.put(arrays, canonical, value, name, source)
        note = ""
        if any(name.startswith(("pooler.", "vit.pooler.")) for name in unused):
            note = " (the ViTModel pooler has no keras_moe equivalent)"
        if arrays and unused:
            _unexpected(unused, source, note)
        if not arrays:
            raise CheckpointMismatchError(
                f"{source} holds no ViT weights; it has "
                f"{listing(sorted(tensors))}"
            )
        return _build(
            arrays,
            source,
            _hf_claims(hf, checkpoint.config_path, arrays),
            {"layer_norm_epsilon": 1e-12, "activation": "gelu"},
            config,
        )


def _hf_claims(hf, config_path, arrays):
    """What `config.json` (the dict `hf`) says, as `_build` claims.

    Adds the zero biases of a model saved with `qkv_bias=False`.
    """
    activation = hf.get("hidden_act")
    if activation is not None and activation not in _HF_ACTIVATION_NAMES:
        raise ValueError(
            f"{config_path}: hidden_act {activation!r} is not supported; "
            f"supported: {sorted(_HF_ACTIVATION_NAMES)}"
        )
    dim = hf.get("hidden_size")
    heads = hf.get("num_attention_heads")
    if hf.get("head_dim") is not None and heads and dim:
        if hf["head_dim"] * heads != dim:
            raise ValueError(
                f"{config_path}: head_dim {hf['head_dim']} x "
                f"num_attention_heads {heads} != hidden_size {dim}; keras_moe "
                "ViT needs heads * head_dim == hidden_size"
            )
    if hf.get("qkv_bias") is False and "patch_embedding/kernel" in arrays:
        size = arrays["patch_embedding/kernel"].shape[-1]
        blocks = {int(m.group(1)) for m in map(_BLOCK.match, arrays) if m}
        _add_zero_biases(
            arrays,
            [
                (f"encoder/block_{i}/attention/{p}/bias", size)
                for i in blocks
                for p in ("query", "key", "value")
            ],
        )
    said = {key: hf.get(name) for key, name in HF_CONFIG_KEYS.items()}
    said["pooling"] = "token"
    said["activation"] = _HF_ACTIVATION_NAMES.get(activation)
    claims = [("config.json", said)]
    if "head/kernel" in arrays and hf.get("id2label") is not None:
        claims.append(
            ("config.json id2label", {"num_classes": len(hf["id2label"])})
        )
    return claims


# --------------------------------------------------------------------------
# TF Model Garden tf.train checkpoints.

_MG_BLOCK = r"(?:^|/)transformer_encoder_block(?:_(\d+))?/"
_MG_RULES = [
    (re.compile(r"(?:^|/)conv2d(?:_\d+)?/(kernel|bias)$"), "patch"),
    (re.compile(r"(?:^|/)cls(?:_\d+)?/cls$"), "cls"),
    (re.compile(r"(?:^|/)posembed_input/pos_embedding$"), "pos"),
    (
        re.compile(_MG_BLOCK + r"self_attention_layer_norm/(gamma|beta)$"),
        "attention_norm",
    ),
    (re.compile(_MG_BLOCK + r"output_layer_norm/(gamma|beta)$"), "mlp_norm"),
    (
        re.compile(
            _MG_BLOCK
            + r"self_attention/(query|key|value|attention_output)/"
            + r"(kernel|bias)$"
        ),
        "attention",
    ),
    (re.compile(_MG_BLOCK + r"intermediate/(kernel|bias)$"), "mlp_in"),
    (re.compile(_MG_BLOCK + r"output/(kernel|bias)$"), "mlp_out"),
    (
        re.compile(
            r"(?:^|/)encoder(?:_\d+)?/layer_normalization(?:_\d+)?/"
            r"(gamma|beta)$"
        ),
        "final_norm",
    ),
    (re.compile(r"^dense(?:_\d+)?/(kernel|bias)$"), "head"),
]


def _mg_canonical(values, source):
    """Model Garden variable name -> array, to canonical arrays."""
    matched, unused = _match_rules(values, _MG_RULES)
    note = ""
    if any("pre_logits" in name for name in unused):
        note = " (representation_size / pre_logits layers are not supported)"
    if any("layer_scale" in name for name in unused):
        note += " (layer scale is not supported)"
    if matched and unused:
        _unexpected(unused, source, note)
    blocks = _block_indices(
        int(groups[0]) if groups[0] is not None else None
        for kind, groups, _, _ in matched
        if kind in ("attention_norm", "mlp_norm", "attention")
        or kind.startswith("mlp_")
    )
    arrays, heads = {}, set()
    for kind, groups, name, value in matched:
        field = groups[-1] if groups else None
        if kind == "patch":
            io.put(arrays, f"patch_embedding/{field}", value, name, source)
        elif kind == "cls":
            io.put(arrays, "class_token", value, name, source)
        elif kind == "pos":
            io.put(arrays, "position_embedding", value, name, source)
        elif kind == "final_norm":
            io.put(arrays, f"encoder/final_norm/{field}", value, name, source)
        elif kind == "head":
            io.put(arrays, f"head/{field}", value, name, source)
        else:
            raw = int(groups[0]) if groups[0] is not None else None
            prefix = f"encoder/block_{blocks[raw]}"
            if kind in ("attention_norm", "mlp_norm"):
                io.put(arrays, f"{prefix}/{kind}/{field}", value, name, source)
            elif kind == "attention":
                layer, value = _einsum_attention(groups[1], field, value, heads)
                io.put(
                    arrays,
                    f"{prefix}/attention/{layer}/{field}",
                    value,
                    name,
                    source,
                )
            else:
                letter = "i" if kind == "mlp_in" else "o"
                weight = f"w{letter}" if field == "kernel" else f"b{letter}"
                io.put(arrays, f"{prefix}/mlp/{weight}", value, name, source)
    if not arrays:
        raise CheckpointMismatchError(
            f"{source} holds no Model Garden ViT variables (e.g. "
            "'encoder/posembed_input/pos_embedding'); it has "
            f"{listing(sorted(values))}"
        )
    return arrays, _num_heads(heads, source)


def read_vit_model_garden_checkpoint(path, config=None):
    """Reads a TF Model Garden ViT `tf.train` checkpoint into a `ViT`.

    Works for checkpoints of a `ClassificationModel` around the
    `VisionTransformer` backbone (with head) and of the backbone alone (no
    head: `num_classes=0`), with or without optimizer state. Variables are
    found by the names Model Garden gives them (`conv2d/kernel`,
    `cls/cls`, `encoder/posembed_input/pos_embedding`,
    `encoder/transformer_encoder_block_N/...`, `dense/kernel`), which the
    checkpoint's object graph records.

    Args:
        path: a checkpoint prefix (`.../ckpt-1`) or a directory (its latest
            checkpoint).
        config: None, an architecture name or a dict of `ViT` kwargs. The heads
            are checked against the attention kernels <[D, h, dk]>, which say it
            already; `image_size` is needed for non-square patch grids and
            otherwise checked against the position embedding; the activation and
            `layer_norm_epsilon`, which the checkpoint does not record, are
            taken from it.

    Returns:
        A `ViT`, by default with `activation="gelu_tanh"` and
        `layer_norm_epsilon=1e-6`, as Model Garden's encoder blocks.

    Raises:
        ValueError: an unreadable or truncated checkpoint, one of another
            model, or a config that contradicts it.
    """
    config = _config(config)
    what = "Model Garden checkpoint"
    source = f"{what} {path}"
    prefix, reader = io.open_tf_checkpoint(path, what)
    shapes = reader.get_variable_to_shape_map()
    values = {
        name: io.LazyTensor(
            shapes[key],
            functools.partial(reader.get_tensor, key),
            io.where(key, source),
        )
        for name, key in io.tf_variable_names(reader, prefix, what).items()
        if key in shapes
    }
    arrays, heads = _mg_canonical(values, source)
    claims = [("the attention kernels", {"num_heads": heads})]
    defaults = {"layer_norm_epsilon": 1e-6, "activation": "gelu_tanh"}
    return _build(arrays, source, claims, defaults, config)


# --------------------------------------------------------------------------
# keras-hub.

_KH_OBJECT_RULES = [
    (re.compile(r"(?:^|/)vit_patching_and_embedding/class_token$"), "cls"),
    (
        re.compile(
            r"(?:^|/)vit_patching_and_embedding/patch_embedding/(kernel|bias)$"
        ),
        "patch",
    ),
    (
        re.compile(
            r"(?:^|/)vit_patching_and_embedding/position_embedding/embeddings$"
        ),
        "pos",
    ),
    (
        re.compile(
            r"(?:^|/)vit_encoder/transformer_block_(\d+)/ln_(1|2)/(gamma|beta)$"
        ),
        "norm",
    ),
    (
        re.compile(
            r"(?:^|/)vit_encoder/transformer_block_(\d+)/mha/"
            r"(query|key|value|attention_output)/(kernel|bias)$"
        ),
        "attention",
    ),
    (
        re.compile(
            r"(?:^|/)vit_encoder/transformer_block_(\d+)/mlp/dense_(1|2)/"
            r"(kernel|bias)$"
        ),
        "mlp",
    ),
    (re.compile(r"(?:^|/)vit_encoder/ln/(gamma|beta)$"), "final_norm"),
    (re.compile(r"(?:^|/)predictions/(kernel|bias)$"), "head"),
]
_KH_FILE_RULES = [
    (re.compile(r"(?:^|/)vi_t_patching_and_embedding/vars/0$"), "cls"),
    (
        re.compile(
            r"(?:^|/)vi_t_patching_and_embedding/patch_embedding/vars/(0|1)$"
        ),
        "patch",
    ),
    (
        re.compile(
            r"(?:^|/)vi_t_patching_and_embedding/position_embedding/vars/0$"
        ),
        "pos",
    ),
    (
        re.compile(
            r"(?:^|/)vi_t_encoder/encoder_layers/vi_t_encoder_block(?:_(\d+))?"
            r"/layer_norm_(1|2)/vars/(0|1)$"
        ),
        "norm",
    ),
    (
        re.compile(
            r"(?:^|/)vi_t_encoder/encoder_layers/vi_t_encoder_block(?:_(\d+))?"
            r"/mha/(query|key|value|output)_dense/vars/(0|1)$"
        ),
        "attention",
    ),
    (
        re.compile(
            r"(?:^|/)vi_t_encoder/encoder_layers/vi_t_encoder_block(?:_(\d+))?"
            r"/mlp/dense_(1|2)/vars/(0|1)$"
        ),
        "mlp",
    ),
    (re.compile(r"(?:^|/)vi_t_encoder/layer_norm/vars/(0|1)$"), "final_norm"),
    (re.compile(r"^layers/dense(?:_\d+)?/vars/(0|1)$"), "head"),
]
# Keras saves a layer's variables in creation order: kernel/gamma first.
_KH_FIELDS = {
    "0": "kernel",
    "1": "bias",
    "kernel": "kernel",
    "bias": "bias",
    "gamma": "kernel",
    "beta": "bias",
}


def _kh_canonical(values, rules, source):
    """keras-hub variable path -> array, to canonical arrays and heads."""
    matched, unused = _match_rules(values, rules)
    heads_found = [name for kind, _, name, _ in matched if kind == "head"]
    if len(heads_found) > 2:
        raise CheckpointMismatchError(
            f"{source} has more than one dense layer after the backbone "
            f"({listing(heads_found)}): intermediate (pre_logits) layers "
            "are not supported"
        )
    if matched and unused:
        _unexpected(unused, source)
    if not matched:
        raise CheckpointMismatchError(
            f"{source} holds no keras-hub ViT weights; it has "
            f"{listing(sorted(values))}"
        )
    blocks = _block_indices(
        None if groups[0] is None else int(groups[0])
        for kind, groups, _, _ in matched
        if kind in ("norm", "attention", "mlp")
    )
    arrays, heads = {}, set()
    for kind, groups, name, value in matched:
        field = _KH_FIELDS[groups[-1]] if groups else None
        if kind == "cls":
            io.put(arrays, "class_token", value, name, source)
        elif kind == "patch":
            io.put(arrays, f"patch_embedding/{field}", value, name, source)
        elif kind == "pos":  # Embedding table (T, D) -> (1, T, D)
            io.put(
                arrays,
                "position_embedding",
                value.reshape(1, *value.shape),
                name,
                source,
            )
        elif kind == "final_norm":
            norm_field = "gamma" if field == "kernel" else "beta"
            io.put(
                arrays, f"encoder/final_norm/{norm_field}", value, name, source
            )
        elif kind == "head":
            io.put(arrays, f"head/{field}", value, name, source)
        else:
            raw = None if groups[0] is None else int(groups[0])
            prefix = f"encoder/block_{blocks[raw]}"
            if kind == "norm":
                norm = "attention_norm" if groups[1] == "1" else "mlp_norm"
                norm_field = "gamma" if field == "kernel" else "beta"
                io.put(
                    arrays, f"{prefix}/{norm}/{norm_field}", value, name, source
                )
            elif kind == "mlp":
                letter = "i" if groups[1] == "1" else "o"
                weight = f"w{letter}" if field == "kernel" else f"b{letter}"
                io.put(arrays, f"{prefix}/mlp/{weight}", value, name, source)
            else:
                layer, value = _einsum_attention(groups[1], field, value, heads)
                io.put(
                    arrays,
                    f"{prefix}/attention/{layer}/{field}",
                    value,
                    name,
                    source,
                )
    return arrays, _num_heads(heads, source)


def _kh_zero_biases(arrays, backbone):
    """Zero biases for a backbone built without some of them."""
    kernel = arrays.get("patch_embedding/kernel")
    if kernel is None:
        return
    dim = kernel.shape[-1]
    blocks = {int(m.group(1)) for m in map(_BLOCK.match, arrays) if m}
    needed = []
    if backbone.get("use_patch_bias") is False:
        needed.append(("patch_embedding/bias", dim))
    for i in blocks:
        prefix = f"encoder/block_{i}"
        if backbone.get("use_mha_bias") is False:
            needed += [
                (f"{prefix}/attention/{p}/bias", dim)
                for p in ("query", "key", "value", "output")
            ]
        wi = arrays.get(f"{prefix}/mlp/wi")
        if backbone.get("use_mlp_bias") is False and wi is not None:
            needed += [
                (f"{prefix}/mlp/bi", wi.shape[1]),
                (f"{prefix}/mlp/bo", dim),
            ]
    _add_zero_biases(arrays, needed)


def _kh_claims(backbone, task, origin):
    """Claims of a keras-hub backbone (and task) config."""
    problems = []
    patch = backbone.get("patch_size")
    if isinstance(patch, (list, tuple)):
        if len(set(patch)) != 1:
            problems.append(f"non-square patch_size {patch} is not supported")
        patch = patch[0]
    image_shape = backbone.get("image_shape")
    claims = {
        "model_dim": backbone.get("hidden_dim"),
        "num_layers": backbone.get("num_layers"),
        "num_heads": backbone.get("num_heads"),
        "hidden_dim": backbone.get("mlp_dim"),
        "patch_size": patch,
        "layer_norm_epsilon": backbone.get("layer_norm_epsilon"),
    }
    if image_shape is not None:
        if backbone.get("data_format") == "channels_first":
            channels, height, width = image_shape
        else:
            height, width, channels = image_shape
        claims["image_size"] = height if height == width else [height, width]
        claims["num_channels"] = channels
    pooling = "token" if backbone.get("use_class_token", True) else "gap"
    if task is not None:
        if task.get("intermediate_dim") is not None:
            problems.append(
                "intermediate_dim (a pre_logits layer) is not supported"
            )
        if task.get("pooling", "token") == "gap" and pooling == "token":
            problems.append(
                "pooling='gap' with use_class_token=True (keras-hub averages "
                "the class token with the patches) is not supported"
            )
        if task.get("pooling", "token") == "token" and pooling == "gap":
            problems.append("pooling='token' needs use_class_token=True")
        claims["num_classes"] = task.get("num_classes")
    claims["pooling"] = pooling
    if problems:
        raise ValueError(f"{origin}: " + "; ".join(problems))
    return claims


def _is_instance_of(obj, class_name):
    return any(c.__name__ == class_name for c in type(obj).__mro__)


def read_vit_keras_hub(path, config=None):
    """Reads keras-hub ViT weights (preset directory or `.weights.h5`).

    Files are read with h5py, without importing keras_hub.

    Args:
        path: a preset directory written by `save_to_preset`
            (`config.json` + `model.weights.h5`, and `task.json` +
            `task.weights.h5` for a classifier); or a `.weights.h5` file of
            a backbone or classifier (`save_weights`), which carries no
            config: the heads come from the kernel shapes, the image size
            from the position embedding (`config` must give `image_size`
            for non-square grids) and `layer_norm_epsilon` defaults to
            keras-hub's 1e-6 (`config` may give another).
        config: None, an architecture name or a dict of `ViT` kwargs, checked
            against the preset's config and the weights. For a backbone (no
            head), `num_classes` adds a zero-initialised head of that size.

    Returns:
        A `ViT` (exact GELU, keras-hub's epsilon). keras-hub's classifier
        `activation` (e.g. softmax) is not part of it: the model returns
        logits.

    Raises:
        ValueError: a preset of another model, unreadable or truncated
            files, configurations keras_moe's ViT cannot express
            (pre_logits, gap over the class token, non-square patches) or a
            configuration that contradicts the weights.
    """
    config = _config(config)
    if io.checkpoint_format(path) == "keras_hub_object":
        raise ValueError(
            "read_vit_keras_hub reads files; pass keras-hub objects to "
            f"convert_vit_keras_hub_backbone (received {type(path).__name__})"
        )
    path = os.fspath(path)
    backbone_config, task_config, origin = {}, None, "the keras-hub config"
    name, files = f"keras-hub weights {path}", [path]
    if os.path.isdir(path):
        name = f"keras-hub preset {path}"
        backbone_config = io.keras_hub_config(
            os.path.join(path, "config.json"), "ViTBackbone"
        )
        origin = "config.json"
        files = [os.path.join(path, io.KERAS_HUB_WEIGHTS)]
        task_path = os.path.join(path, "task.json")
        if os.path.isfile(task_path):
            task_config = io.keras_hub_config(task_path, "ViTImageClassifier")
            origin = "config.json / task.json"
            files.append(os.path.join(path, "task.weights.h5"))
    elif not os.path.isfile(path):
        raise ValueError(f"{path} does not exist")
    with contextlib.ExitStack() as stack:
        values = {}
        for file in files:
            values.update(stack.enter_context(io.open_h5(file)))
        arrays, heads = _kh_canonical(values, _KH_FILE_RULES, name)
        return _kh_build(
            arrays, heads, backbone_config, task_config, origin, name, config
        )


def convert_vit_keras_hub_backbone(backbone, config=None):
    """Converts a keras-hub `ViTBackbone` or `ViTImageClassifier` to a `ViT`.

    Args:
        backbone: a `keras_hub.models.ViTBackbone`, or a
            `ViTImageClassifier` (with its head).
        config: None, an architecture name or a dict of `ViT` kwargs, checked
            against the model's config and weights. For a backbone (no
            head), `num_classes` adds a zero-initialised head of that size.

    Returns:
        A `ViT` holding copies of the weights; see `read_vit_keras_hub`.

    Raises:
        ValueError: not a keras-hub ViT, configurations keras_moe's ViT
            cannot express, or a `config` that contradicts the model.
    """
    config = _config(config)
    task_config = None
    if _is_instance_of(backbone, "ViTImageClassifier"):
        task_config = backbone.get_config()
        inner = backbone.backbone
    elif _is_instance_of(backbone, "ViTBackbone"):
        inner = backbone
    else:
        raise ValueError(
            "Expected a keras_hub ViTBackbone or ViTImageClassifier (presets "
            "and .weights.h5 files go to read_vit_keras_hub); received a "
            f"{type(backbone).__name__}"
        )
    name = f"keras-hub {type(backbone).__name__} {backbone.name!r}"
    values = {
        variable.path: io.variable_tensor(variable, name)
        for variable in backbone.weights
    }
    arrays, heads = _kh_canonical(values, _KH_OBJECT_RULES, name)
    return _kh_build(
        arrays,
        heads,
        inner.get_config(),
        task_config,
        "the keras-hub config",
        name,
        config,
    )


def _kh_build(arrays, heads, backbone, task, origin, source, config):
    """Builds the `ViT` of keras-hub canonical `arrays` and configs."""
    _kh_zero_biases(arrays, backbone)
    claims = [
        (origin, _kh_claims(backbone, task, origin)),
        ("the attention kernels", {"num_heads": heads}),
    ]
    if "head/kernel" not in arrays and config.get("num_classes"):
        # A new head, zero-initialised as `ViT` initialises its own.
        classes = config["num_classes"]
        dim = arrays["patch_embedding/kernel"].shape[-1]
        arrays["head/kernel"] = np.zeros((dim, classes), np.float32)
        arrays["head/bias"] = np.zeros((classes,), np.float32)
    defaults = {"layer_norm_epsilon": 1e-6, "activation": "gelu"}
    return _build(arrays, source, claims, defaults, config)


# --------------------------------------------------------------------------
# Any format.


def read_vit_checkpoint(path, config=None):
    """Reads a ViT checkpoint of any supported format, chosen from the path.

    A keras-hub model object goes to `convert_vit_keras_hub_backbone`; a
    `.safetensors` file or a directory with `model.safetensors[.index.json]`
    to `read_vit_hf_safetensors`; a `.weights.h5` file or a directory with
    `model.weights.h5` (a keras-hub preset) to `read_vit_keras_hub`; anything
    else to `read_vit_model_garden_checkpoint`.

    Args:
        path: see the readers above.
        config: passed to the reader.

    Returns:
        A built `ViT`.
    """
    kind = io.checkpoint_format(path)
    if kind == "keras_hub_object":
        return convert_vit_keras_hub_backbone(path, config)
    if kind == "hf":
        return read_vit_hf_safetensors(path, config)
    if kind == "keras_hub":
        return read_vit_keras_hub(path, config)
    return read_vit_model_garden_checkpoint(path, config)
