"""Readers that bring ViT checkpoints into `keras_moe.models.vit.ViT`.

Shape letters: P patch size, C channels, D model dimension, F MLP hidden
dimension, h heads, dk head dimension (D / h), T tokens, K classes.

Three source formats, one reader each, all returning a built `ViT` whose
configuration is inferred from the checkpoint:

* `read_hf(path)`: a Hugging Face `ViTForImageClassification` (or
  `ViTModel`) directory as `save_pretrained` writes it: `config.json` and
  `model.safetensors` (or sharded, with `model.safetensors.index.json`),
  read with the `safetensors` package; transformers is not needed.
* `read_model_garden(path)`: a TF Model Garden ViT (`official.vision`
  `VisionTransformer`, alone or in a `ClassificationModel`) `tf.train`
  checkpoint, read by variable name with `tf.train.load_checkpoint`;
  neither tf_keras nor `official` is imported. Model Garden's ViT uses the
  tanh GELU, so the model gets `activation="gelu_tanh"`.
* `read_keras_hub(source)`: a keras-hub `ViTBackbone` or
  `ViTImageClassifier` object, a preset directory written by
  `save_to_preset`, or a backbone `.weights.h5` file; files are read with
  h5py, keras_hub is not imported. A backbone has no head: the model gets
  none (`num_classes=0`, the call returns pooled features) unless
  `num_classes` asks for a new, zero-initialised one.

Every reader translates the source's names into the canonical names of
`ViT.canonical_variables()`, checks the source's configuration against
the shapes it read, and assigns with `keras_moe.checkpoints.common.
assign_weights`: a checkpoint of another model, an unreadable or truncated
file, a config that contradicts the weights, or a missing, unexpected or
misshapen weight raises a `ValueError` (`CheckpointMismatchError` for
mismatches) that names the problem, and nothing is assigned.

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

import json
import math
import os
import re
import struct

import numpy as np

from keras_moe.checkpoints.common import CheckpointMismatchError
from keras_moe.checkpoints.common import assign_weights
from keras_moe.models.vit import ViT

_HF_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}
_BLOCK = re.compile(r"encoder/block_(\d+)/")


# --------------------------------------------------------------------------
# Shared: config inference, checks and assignment.


def _listing(items, limit=12):
    items = list(items)
    shown = ", ".join(str(i) for i in items[:limit])
    more = len(items) - limit
    return f"{shown} (and {more} more)" if more > 0 else shown


def _put(arrays, name, value, source_name):
    """arrays[name] = value, refusing a second source for one name."""
    if name in arrays:
        raise CheckpointMismatchError(
            f"{source_name} and another entry both map to the canonical "
            f"weight {name!r}: the checkpoint holds more than one ViT"
        )
    arrays[name] = np.asarray(value)


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


def _build(arrays, source, claims, defaults):
    """Checks every claim about the model, builds it, assigns `arrays`.

    Args:
        arrays: canonical name -> array.
        source: description of the checkpoint, for errors.
        claims: list of (origin, {kwarg: value}): what the source's config
            files, the caller's arguments and shapes outside the canonical
            arrays say. Every kwarg that two origins (the canonical shapes,
            "weights", being one) both state must agree.
        defaults: kwargs used when no origin states them.
    """
    inferred = _infer(arrays, source)
    num_patches = inferred.pop("num_patches")
    claims = [("the weights", inferred)] + [
        (origin, {k: v for k, v in said.items() if v is not None})
        for origin, said in claims
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
                "patches, not a square grid; pass image_size"
            )
        config["image_size"] = side * patch
    if config.get("num_heads") is None:
        problems.append(f"num_heads: {source} does not say; pass num_heads")
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


def _unexpected(names, source, note=""):
    if names:
        raise CheckpointMismatchError(
            f"Cannot read {source} as a ViT: unexpected in the checkpoint: "
            f"{_listing(sorted(names))}{note}"
        )


def _block_indices(raw_indices):
    """Maps source block numbers (None for an unnumbered first block) to
    0..L-1 in their order."""
    order = sorted({-1 if i is None else i for i in raw_indices})
    return {(None if i == -1 else i): rank for rank, i in enumerate(order)}


# --------------------------------------------------------------------------
# Hugging Face safetensors.


def _check_safetensors(path):
    """Validates a safetensors file's header against its size."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError(
                f"{path} is truncated or not a safetensors file: it has "
                f"{size} bytes"
            )
        header_size = struct.unpack("<Q", prefix)[0]
        if header_size > size - 8:
            raise ValueError(
                f"{path} is truncated or not a safetensors file: its header "
                f"claims {header_size} bytes, the file has {size}"
            )
        try:
            header = json.loads(f.read(header_size))
        except ValueError as error:
            raise ValueError(
                f"{path} is not a safetensors file: unreadable header "
                f"({error})"
            ) from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a safetensors file: bad header")
    end = max(
        (
            entry["data_offsets"][1]
            for name, entry in header.items()
            if name != "__metadata__"
        ),
        default=0,
    )
    if 8 + header_size + end > size:
        raise ValueError(
            f"{path} is truncated: its header describes "
            f"{8 + header_size + end} bytes, the file has {size}"
        )


def _load_safetensors(files):
    from safetensors.numpy import load_file

    tensors = {}
    for path in files:
        _check_safetensors(path)
        try:
            loaded = load_file(path)
        except Exception as error:  # the package raises its own types
            raise ValueError(f"Cannot read {path}: {error}") from None
        tensors.update(loaded)
    return tensors


def _hf_files(path):
    """(config path or None, safetensors files) of an HF checkpoint."""
    if os.path.isfile(path):
        directory, files = os.path.dirname(path), [path]
    else:
        directory = path
        index = os.path.join(path, "model.safetensors.index.json")
        single = os.path.join(path, "model.safetensors")
        if os.path.isfile(single):
            files = [single]
        elif os.path.isfile(index):
            try:
                with open(index) as f:
                    shards = sorted(set(json.load(f)["weight_map"].values()))
            except (ValueError, KeyError) as error:
                raise ValueError(f"Cannot read {index}: {error}") from None
            files = [os.path.join(path, shard) for shard in shards]
        else:
            raise ValueError(
                f"{path} holds no model.safetensors or "
                "model.safetensors.index.json"
            )
    config = os.path.join(directory, "config.json")
    return (config if os.path.isfile(config) else None), files


def _hf_name(name):
    """HF parameter name -> (canonical name, conversion) or None.

    Accepts the names `save_pretrained` writes (`encoder.layer.N....`) and
    transformers 5's module names (`layers.N.attention.q_proj...`).
    """
    name = name[len("vit.") :] if name.startswith("vit.") else name
    fixed = {
        "embeddings.cls_token": ("class_token", None),
        "embeddings.position_embeddings": ("position_embedding", None),
        "embeddings.patch_embeddings.projection.weight": (
            "patch_embedding/kernel",
            "conv",
        ),
        "embeddings.patch_embeddings.projection.bias": (
            "patch_embedding/bias",
            None,
        ),
        "layernorm.weight": ("encoder/final_norm/gamma", None),
        "layernorm.bias": ("encoder/final_norm/beta", None),
        "classifier.weight": ("head/kernel", "linear"),
        "classifier.bias": ("head/bias", None),
    }
    if name in fixed:
        return fixed[name]
    match = re.fullmatch(r"(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(\w+)", name)
    if match is None:
        return None
    index, module, kind = match.groups()
    parts = {
        "attention.attention.query": "attention/query",
        "attention.attention.key": "attention/key",
        "attention.attention.value": "attention/value",
        "attention.output.dense": "attention/output",
        "attention.q_proj": "attention/query",
        "attention.k_proj": "attention/key",
        "attention.v_proj": "attention/value",
        "attention.o_proj": "attention/output",
        "intermediate.dense": "mlp/i",
        "output.dense": "mlp/o",
        "mlp.fc1": "mlp/i",
        "mlp.fc2": "mlp/o",
        "layernorm_before": "attention_norm",
        "layernorm_after": "mlp_norm",
    }
    if module not in parts or kind not in ("weight", "bias"):
        return None
    target = parts[module]
    prefix = f"encoder/block_{index}/"
    if target.endswith("norm"):
        suffix = "gamma" if kind == "weight" else "beta"
        return prefix + f"{target}/{suffix}", None
    if target.startswith("mlp/"):
        letter = target[-1]
        suffix = f"w{letter}" if kind == "weight" else f"b{letter}"
        return prefix + f"mlp/{suffix}", "linear" if kind == "weight" else None
    suffix = "kernel" if kind == "weight" else "bias"
    return prefix + f"{target}/{suffix}", "linear" if kind == "weight" else None


def read_hf(path, num_heads=None):
    """Reads a Hugging Face ViT checkpoint into a `ViT`.

    Args:
        path: a directory written by `ViTForImageClassification.
            save_pretrained(..., safe_serialization=True)` (or by
            `ViTModel`: no head), or its `model.safetensors` file.
        num_heads: checked against `config.json`'s `num_attention_heads`;
            required when the directory has no config.json.

    Returns:
        A `ViT` with the checkpoint's weights, `layer_norm_epsilon` and
        activation.

    Raises:
        ValueError: unreadable or truncated files, a config of another
            model type, a config that contradicts the weights, or weights a
            ViT does not have (e.g. `ViTModel`'s pooler).
    """
    config_path, files = _hf_files(path)
    source = f"Hugging Face checkpoint {path}"
    hf = {}
    if config_path is not None:
        try:
            with open(config_path) as f:
                hf = json.load(f)
        except ValueError as error:
            raise ValueError(f"Cannot read {config_path}: {error}") from None
        if hf.get("model_type", "vit") != "vit":
            raise ValueError(
                f"{config_path} describes a {hf['model_type']!r} model "
                f"(architectures {hf.get('architectures')}), not a ViT"
            )
    tensors = _load_safetensors(files)
    arrays, unused = {}, []
    for name, value in tensors.items():
        mapped = _hf_name(name)
        if mapped is None:
            unused.append(name)
            continue
        canonical, conversion = mapped
        if conversion == "linear":
            value = value.T
        elif conversion == "conv":
            value = value.transpose(2, 3, 1, 0)  # (D, C, P, P) -> HWIO
        _put(arrays, canonical, value, name)
    note = ""
    if any(name.startswith(("pooler.", "vit.pooler.")) for name in unused):
        note = " (the ViTModel pooler has no keras_moe equivalent)"
    if arrays and unused:
        _unexpected(unused, source, note)
    if not arrays:
        raise CheckpointMismatchError(
            f"{source} holds no ViT weights; it has "
            f"{_listing(sorted(tensors))}"
        )
    activation = hf.get("hidden_act", "gelu")
    if activation not in _HF_ACTIVATIONS:
        raise ValueError(
            f"{config_path}: hidden_act {activation!r} is not supported; "
            f"supported: {sorted(_HF_ACTIVATIONS)}"
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
    claims = [
        (
            "config.json",
            {
                "model_dim": dim,
                "num_layers": hf.get("num_hidden_layers"),
                "num_heads": heads,
                "hidden_dim": hf.get("intermediate_size"),
                "patch_size": hf.get("patch_size"),
                "num_channels": hf.get("num_channels"),
                "image_size": hf.get("image_size"),
                "pooling": "token",
            },
        ),
        ("the arguments", {"num_heads": num_heads}),
    ]
    if "head/kernel" in arrays and hf.get("id2label") is not None:
        claims.append(
            ("config.json id2label", {"num_classes": len(hf["id2label"])})
        )
    defaults = {
        "layer_norm_epsilon": hf.get("layer_norm_eps", 1e-12),
        "activation": _HF_ACTIVATIONS[activation],
    }
    return _build(arrays, source, claims, defaults)


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
# Checkpoint entries that are not part of a model.
_MG_BOOKKEEPING = ("save_counter", "global_step")


def _mg_variable_names(reader):
    """{variable name: checkpoint key} of a tf.train checkpoint's model
    variables (optimizer state and bookkeeping left out)."""
    keys = reader.get_variable_to_shape_map()
    graph_key = "_CHECKPOINTABLE_OBJECT_GRAPH"
    if graph_key not in keys:  # a name-based (TF1 Saver) checkpoint
        return {k: k for k in keys if k not in _MG_BOOKKEEPING}
    from tensorflow.core.protobuf import trackable_object_graph_pb2

    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(reader.get_tensor(graph_key))
    slots = {
        slot.slot_variable_node_id
        for node in graph.nodes
        for slot in node.slot_variables
    }
    names, seen, queue = {}, {0}, [0]
    while queue:
        node_id = queue.pop(0)
        node = graph.nodes[node_id]
        for attribute in node.attributes:
            if attribute.name == "VARIABLE_VALUE":
                name = attribute.full_name or attribute.checkpoint_key
                names[re.sub(r":\d+$", "", name)] = attribute.checkpoint_key
        for child in node.children:
            # Optimizer state, and variables hung on the root (global step,
            # save counter), are not model weights.
            if child.local_name == "optimizer" or child.node_id in slots:
                continue
            if node_id == 0 and _is_variable(graph.nodes[child.node_id]):
                continue
            if child.node_id not in seen:
                seen.add(child.node_id)
                queue.append(child.node_id)
    return names


def _is_variable(node):
    return any(a.name == "VARIABLE_VALUE" for a in node.attributes)


def _mg_canonical(values, source):
    """Model Garden variable name -> array, to canonical arrays."""
    matched, unused = [], []
    for name, value in values.items():
        for pattern, kind in _MG_RULES:
            match = pattern.search(name)
            if match:
                matched.append((kind, match.groups(), name, value))
                break
        else:
            unused.append(name)
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
            _put(arrays, f"patch_embedding/{field}", value, name)
        elif kind == "cls":
            _put(arrays, "class_token", value, name)
        elif kind == "pos":
            _put(arrays, "position_embedding", value, name)
        elif kind == "final_norm":
            _put(arrays, f"encoder/final_norm/{field}", value, name)
        elif kind == "head":
            _put(arrays, f"head/{field}", value, name)
        else:
            raw = int(groups[0]) if groups[0] is not None else None
            prefix = f"encoder/block_{blocks[raw]}"
            if kind in ("attention_norm", "mlp_norm"):
                _put(arrays, f"{prefix}/{kind}/{field}", value, name)
            elif kind == "attention":
                layer = groups[1]
                if layer == "attention_output":
                    layer = "output"
                    if field == "kernel":  # (h, dk, D) -> (h*dk, D)
                        heads.add(value.shape[0])
                        value = value.reshape(-1, value.shape[-1])
                elif field == "kernel":  # (D, h, dk) -> (D, h*dk)
                    heads.add(value.shape[1])
                    value = value.reshape(value.shape[0], -1)
                else:  # (h, dk) -> (h*dk,)
                    value = value.reshape(-1)
                _put(arrays, f"{prefix}/attention/{layer}/{field}", value, name)
            else:
                letter = "i" if kind == "mlp_in" else "o"
                weight = f"w{letter}" if field == "kernel" else f"b{letter}"
                _put(arrays, f"{prefix}/mlp/{weight}", value, name)
    if not arrays:
        raise CheckpointMismatchError(
            f"{source} holds no Model Garden ViT variables (e.g. "
            "'encoder/posembed_input/pos_embedding'); it has "
            f"{_listing(sorted(values))}"
        )
    if len(heads) > 1:
        raise CheckpointMismatchError(
            f"{source}: attention kernels disagree on the number of heads: "
            f"{sorted(heads)}"
        )
    return arrays, (heads.pop() if heads else None)


def read_model_garden(path, num_heads=None, image_size=None):
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
        num_heads: checked against the heads of the attention kernels
            <[D, h, dk]>, which say it already.
        image_size: needed for non-square patch grids; otherwise checked
            against the position embedding.

    Returns:
        A `ViT` with `activation="gelu_tanh"` and `layer_norm_epsilon=1e-6`,
        as Model Garden's encoder blocks.

    Raises:
        ValueError: an unreadable or truncated checkpoint, one of another
            model, or arguments that contradict it.
    """
    import tensorflow as tf

    source = f"Model Garden checkpoint {path}"
    prefix = path
    if os.path.isdir(path):
        prefix = tf.train.latest_checkpoint(path)
        if prefix is None:
            raise ValueError(f"{path} holds no tf.train checkpoint")
    try:
        reader = tf.train.load_checkpoint(prefix)
        names = _mg_variable_names(reader)
        values = {name: reader.get_tensor(key) for name, key in names.items()}
    except Exception as error:  # TF raises OpError, IndexError, ValueError
        message = getattr(error, "message", None) or str(error)
        raise ValueError(
            f"Cannot read {source} (truncated, corrupt or not a tf.train "
            f"checkpoint): {message.splitlines()[0] if message else error}"
        ) from None
    arrays, heads = _mg_canonical(values, source)
    claims = [
        ("the attention kernels", {"num_heads": heads}),
        ("the arguments", {"num_heads": num_heads, "image_size": image_size}),
    ]
    defaults = {"layer_norm_epsilon": 1e-6, "activation": "gelu_tanh"}
    return _build(arrays, source, claims, defaults)


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
    matched, unused = [], []
    for name, value in values.items():
        for pattern, kind in rules:
            match = pattern.search(name)
            if match:
                matched.append((kind, match.groups(), name, value))
                break
        else:
            unused.append(name)
    heads_found = [name for kind, _, name, _ in matched if kind == "head"]
    if len(heads_found) > 2:
        raise CheckpointMismatchError(
            f"{source} has more than one dense layer after the backbone "
            f"({_listing(heads_found)}): intermediate (pre_logits) layers "
            "are not supported"
        )
    if matched and unused:
        _unexpected(unused, source)
    if not matched:
        raise CheckpointMismatchError(
            f"{source} holds no keras-hub ViT weights; it has "
            f"{_listing(sorted(values))}"
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
            _put(arrays, "class_token", value, name)
        elif kind == "patch":
            _put(arrays, f"patch_embedding/{field}", value, name)
        elif kind == "pos":  # Embedding table (T, D) -> (1, T, D)
            _put(arrays, "position_embedding", value[None], name)
        elif kind == "final_norm":
            norm_field = "gamma" if field == "kernel" else "beta"
            _put(arrays, f"encoder/final_norm/{norm_field}", value, name)
        elif kind == "head":
            _put(arrays, f"head/{field}", value, name)
        else:
            raw = None if groups[0] is None else int(groups[0])
            prefix = f"encoder/block_{blocks[raw]}"
            if kind == "norm":
                norm = "attention_norm" if groups[1] == "1" else "mlp_norm"
                norm_field = "gamma" if field == "kernel" else "beta"
                _put(arrays, f"{prefix}/{norm}/{norm_field}", value, name)
            elif kind == "mlp":
                letter = "i" if groups[1] == "1" else "o"
                weight = f"w{letter}" if field == "kernel" else f"b{letter}"
                _put(arrays, f"{prefix}/mlp/{weight}", value, name)
            else:
                layer = groups[1]
                if layer in ("attention_output", "output"):
                    layer = "output"
                    if field == "kernel":  # (h, dk, D) -> (h*dk, D)
                        heads.add(value.shape[0])
                        value = value.reshape(-1, value.shape[-1])
                elif field == "kernel":  # (D, h, dk) -> (D, h*dk)
                    heads.add(value.shape[1])
                    value = value.reshape(value.shape[0], -1)
                else:  # (h, dk) -> (h*dk,)
                    value = value.reshape(-1)
                _put(arrays, f"{prefix}/attention/{layer}/{field}", value, name)
    if len(heads) > 1:
        raise CheckpointMismatchError(
            f"{source}: attention kernels disagree on the number of heads: "
            f"{sorted(heads)}"
        )
    return arrays, (heads.pop() if heads else None)


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


def _read_h5(path):
    import h5py

    values = {}
    try:
        with h5py.File(path, "r") as f:

            def visit(name, item):
                if isinstance(item, h5py.Dataset):
                    values[name] = np.asarray(item)

            f.visititems(visit)
    except (OSError, KeyError, ValueError) as error:
        raise ValueError(
            f"Cannot read {path} (truncated, corrupt or not an HDF5 weights "
            f"file): {error}"
        ) from None
    # Optimizer state saved with a task is not part of the model.
    return {k: v for k, v in values.items() if not k.startswith("optimizer/")}


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as error:
        raise ValueError(f"Cannot read {path}: {error}") from None


def _is_instance_of(obj, class_name):
    return any(c.__name__ == class_name for c in type(obj).__mro__)


def read_keras_hub(
    source, num_heads=None, num_classes=None, image_size=None, **overrides
):
    """Reads a keras-hub ViT into a `ViT`.

    Args:
        source: a `keras_hub.models.ViTBackbone` or `ViTImageClassifier`
            object; a preset directory written by `save_to_preset`
            (`config.json` + `model.weights.h5`, and `task.json` +
            `task.weights.h5` for a classifier); or a `.weights.h5` file of
            a backbone or classifier (`save_weights`), which carries no
            config: the heads come from the kernel shapes, the image size
            from the position embedding (pass `image_size` for non-square
            grids) and `layer_norm_epsilon` defaults to keras-hub's 1e-6
            (pass it in `overrides` otherwise).
        num_heads: checked against the config and the kernel shapes.
        num_classes: for a backbone (no head): None builds a headless model
            (`num_classes=0`, the call returns pooled features); an int
            builds a zero-initialised head of that size. For a classifier:
            checked against its head.
        image_size: checked against the config and position embedding.
        **overrides: `layer_norm_epsilon=` for a bare weights file.

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
    unknown = set(overrides) - {"layer_norm_epsilon"}
    if unknown:
        raise ValueError(f"Unknown arguments: {sorted(unknown)}")
    backbone_config, task_config, origin = {}, None, "the keras-hub config"
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        name = f"keras-hub weights {path}"
        if os.path.isdir(path):
            name = f"keras-hub preset {path}"
            config_path = os.path.join(path, "config.json")
            if not os.path.isfile(config_path):
                raise ValueError(f"{path} has no config.json: not a preset")
            config = _read_json(config_path)
            if config.get("class_name") != "ViTBackbone":
                raise ValueError(
                    f"{config_path} describes a {config.get('class_name')!r}, "
                    "not a keras-hub ViTBackbone"
                )
            backbone_config, origin = config.get("config", {}), "config.json"
            values = _read_h5(os.path.join(path, "model.weights.h5"))
            task_path = os.path.join(path, "task.json")
            if os.path.isfile(task_path):
                task = _read_json(task_path)
                if task.get("class_name") != "ViTImageClassifier":
                    raise ValueError(
                        f"{task_path} describes a {task.get('class_name')!r}, "
                        "not a keras-hub ViTImageClassifier"
                    )
                task_config = task.get("config", {})
                origin = "config.json / task.json"
                values.update(_read_h5(os.path.join(path, "task.weights.h5")))
        elif os.path.isfile(path):
            values = _read_h5(path)
        else:
            raise ValueError(f"{path} does not exist")
        arrays, heads = _kh_canonical(values, _KH_FILE_RULES, name)
    else:
        if _is_instance_of(source, "ViTImageClassifier"):
            task_config = source.get_config()
            backbone = source.backbone
        elif _is_instance_of(source, "ViTBackbone"):
            backbone = source
        else:
            raise ValueError(
                "Expected a keras_hub ViTBackbone or ViTImageClassifier, a "
                f"preset directory or a .weights.h5 file; received a "
                f"{type(source).__name__}"
            )
        backbone_config = backbone.get_config()
        name = f"keras-hub {type(source).__name__} {source.name!r}"
        values = {
            variable.path: np.asarray(variable.numpy(), np.float32)
            for variable in source.weights
        }
        arrays, heads = _kh_canonical(values, _KH_OBJECT_RULES, name)
    _kh_zero_biases(arrays, backbone_config)
    claims = [
        (origin, _kh_claims(backbone_config, task_config, origin)),
        ("the attention kernels", {"num_heads": heads}),
        (
            "the arguments",
            {
                "num_heads": num_heads,
                "image_size": image_size,
                "layer_norm_epsilon": overrides.get("layer_norm_epsilon"),
            },
        ),
    ]
    if "head/kernel" in arrays:
        claims.append(("the arguments", {"num_classes": num_classes}))
    elif num_classes:
        # A new head, zero-initialised as `ViT` initialises its own.
        dim = arrays["patch_embedding/kernel"].shape[-1]
        arrays["head/kernel"] = np.zeros((dim, num_classes), np.float32)
        arrays["head/bias"] = np.zeros((num_classes,), np.float32)
    defaults = {"layer_norm_epsilon": 1e-6, "activation": "gelu"}
    return _build(arrays, name, claims, defaults)
