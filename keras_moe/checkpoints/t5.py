"""Readers that turn T5 checkpoints into `keras_moe.models.t5.T5` models.

Each reader infers the architecture from the checkpoint (vocabulary, model
dimension, heads and head size, MLP width, encoder and decoder depth, number
of relative-position buckets, gated `wi_0`/`wi_1` MLP (v1.1) or single `wi`
(v1.0), separate `lm_head` or output tied to the token embedding), converts
names and layouts to the canonical names of `T5.canonical_variables()`,
builds a `T5` and loads it with `keras_moe.checkpoints.common.assign_weights`:
strict and all-or-nothing, so a checkpoint that does not fit raises
`CheckpointMismatchError` (a `ValueError`) listing every missing, unexpected
and mismatched name. Every other problem (an unreadable or truncated file,
a checkpoint of another model, a config that disagrees) is a `ValueError`
whose message names the file, the weight or the setting at fault.

| reader                          | source                                  |
|---------------------------------|-----------------------------------------|
| `read_t5_mtf_checkpoint`        | original T5 (Mesh TensorFlow) checkpoint |
| `read_t5_hf_safetensors`        | Hugging Face `save_pretrained` directory |
| `read_t5_model_garden_checkpoint` | TF Model Garden `T5Transformer`        |
| `read_t5_keras_hub`             | keras-hub `.weights.h5` or preset dir   |
| `convert_t5_keras_hub_backbone` | a keras-hub `T5Backbone` object         |
| `read_t5_checkpoint`            | any of the above, by sniffing the path  |

Layouts (canonical kernels are `x @ W`, `[in, out]`; H heads, B buckets):

- Mesh TensorFlow: `encoder/block_000/layer_000/SelfAttention/q` and the
  `DenseReluDense/wi/kernel` kernels are already `[in, out]`;
  `relative_attention_bias` is `[H, B]` and is transposed. Norms are
  `layer_norm/scale` (v1.0) or `rms_norm/scale` (v1.1, mT5); the output
  projection of v1.1 is `decoder/logits/kernel` `[D, V]`. Adafactor slots
  (`*_slot_vc`, `*_slot_vr`, `*_slot_v`) and `global_step` are skipped.
- Hugging Face: torch `Linear` weights are `[out, in]` and are transposed;
  `relative_attention_bias.weight` is already `[B, H]`. Whether the decoder
  output is scaled by `model_dim ** -0.5` (tied, v1.0) comes from
  `config.json` (`scale_decoder_outputs` in transformers 5, else
  `tie_word_embeddings`); an unscaled model without `lm_head.weight` (what
  transformers 5 writes for v1.1 configs) gets `lm_head = shared.T`.
- Model Garden (`official.nlp.modeling.models.t5`), saved with
  `tf.train.Checkpoint(model=t5)` or
  `tf.train.Checkpoint(**t5.checkpoint_items)`: keys such as
  `model/encoder/encoder_layers/0/self_attention/self_attention/q/w/...`
  (any prefix); every layout already matches. The checkpoint does not record
  `ffn_activations`: one `wi` is read as `("relu",)`, two as
  `("gelu", "linear")`, i.e. `"gated_gelu"`; `rescale_query` and
  `layer_sharing` must be off (their defaults).
- keras-hub `T5Backbone`: Dense kernels are `[in, out]`; the relative bias
  is `[32, H]`. `.weights.h5` files are read with h5py, without keras_hub.

The `config` argument of every reader is None, an architecture name (see
`keras_moe.models.t5.t5_config`) or a dict of `T5` keyword arguments.
Settings the checkpoint determines must agree with it (pass what you expect
to load and a disagreement is an error that names it); the others
(`dropout_rate`, and where the source does not record them
`layer_norm_epsilon`, `relative_attention_max_distance` and the activation
within the gating the weights show) are taken from it.

Files are opened and read by `keras_moe.checkpoints.io`; this module holds
the T5 name maps (`mtf_name` gives the writers the inverse of the Mesh
TensorFlow one) and the T5 logic.

Memory: tensors are read lazily (`io.LazyTensor`), each when
`assign_weights` assigns it, after every name and shape has been checked,
so loading holds the model and one source tensor at a time. A read that
fails half way (a truncated data file) raises a `ValueError` and the
half-loaded model is never returned.

Measured with `benchmarks/upcycle.py` (docs/BENCHMARKS.md; 2 CPU cores,
TensorFlow 2.20, float32, each measurement in a fresh process) on a random
T5-small-sized checkpoint in Mesh TensorFlow format (60.5M parameters, a
231 MiB data file): `read_t5_mtf_checkpoint` takes 1.8 s, of which 0.3 s is
the reader's own (the rest builds the model), and grows peak RSS by 453 MiB,
1.96x the checkpoint (building the model alone: 257 MiB, 1.11x).

Example:

>>> model = read_t5_hf_safetensors("/path/to/t5-small")  # doctest: +SKIP
>>> model = read_t5_mtf_checkpoint(
...     "/path/to/t5_small/model.ckpt-1000000", config="t5_small"
... )  # doctest: +SKIP
"""

import functools
import os
import re

import numpy as np

from keras_moe.checkpoints import io
from keras_moe.checkpoints.common import assign_weights
from keras_moe.checkpoints.common import config_kwargs
from keras_moe.layers.mlp import get_activation
from keras_moe.models.t5 import T5
from keras_moe.models.t5 import t5_config

_EMBEDDING = "shared/embedding"
_LM_HEAD = "lm_head/kernel"


# --------------------------------------------------------------------------
# The name map of Mesh TensorFlow and Hugging Face blocks, declared once:
# the readers below go from source names to canonical ones with it, and
# `mtf_name` (for `keras_moe.checkpoints.writers`) back.

# Sub-layer index -> role, in the order MTF and Hugging Face number them.
_ROLES = {
    "encoder": ("self_attention", "mlp"),
    "decoder": ("self_attention", "cross_attention", "mlp"),
}
# Attention module -> role.
_ATTENTION_ROLES = {
    "SelfAttention": "self_attention",
    "EncDecAttention": "cross_attention",
}
# Attention projection -> canonical projection.
_PROJECTIONS = {"q": "query", "k": "key", "v": "value", "o": "output"}
_MLP_WEIGHTS = ("wi", "wi_0", "wi_1", "wo")
# MTF names outside the blocks -> canonical names.
_MTF_FIXED = {"shared/embedding": _EMBEDDING, "decoder/logits/kernel": _LM_HEAD}
# MTF norm names (in a block, after a stack) by whether the model is v1.1:
# T5 v1.0 has layer norms, v1.1 and mT5 RMS norms. Both are scale-only.
_MTF_NORMS = {
    False: ("layer_norm", "final_layer_norm"),
    True: ("rms_norm", "rms_norm"),
}
# Final norm names read besides those written (some exports use it).
_MTF_FINAL_NORMS = ("final_layer_norm", "rms_norm", "final_rms_norm")

_ATTENTION_MODULES = {role: kind for kind, role in _ATTENTION_ROLES.items()}
_SOURCE_PROJECTIONS = {name: letter for letter, name in _PROJECTIONS.items()}
_MTF_FIXED_NAMES = {canonical: name for name, canonical in _MTF_FIXED.items()}
_MTF_BLOCK = re.compile(r"^(encoder|decoder)/block_(\d+)/layer_(\d+)/(.+)$")
_MTF_FINAL_NORM = re.compile(
    rf"^(encoder|decoder)/({'|'.join(_MTF_FINAL_NORMS)})/scale$"
)
_MTF_BLOCK_NORMS = tuple(f"{norms[0]}/scale" for norms in _MTF_NORMS.values())
_CANONICAL_BLOCK = re.compile(
    r"^(?P<stack>encoder|decoder)/block_(?P<block>\d+)/"
    r"(?P<role>self_attention|cross_attention|mlp)"
    r"(?P<norm>_norm/scale)?(?:/(?P<weight>[^/]+))?$"
)


def mtf_name(canonical, v1_1):
    """The Mesh TensorFlow name of a canonical T5 weight.

    The inverse of the mapping `read_t5_mtf_checkpoint` reads with, from the
    same tables.

    Args:
        canonical: a name of `T5.canonical_variables()` of a dense `T5`.
        v1_1: whether to name norms as T5 v1.1 does (`rms_norm`) rather
            than v1.0 (`layer_norm`, `final_layer_norm`).

    Returns:
        (MTF name, whether the array is transposed in MTF's layout).

    Raises:
        ValueError: a weight the format has no place for (an MoE weight).
    """
    if canonical in _MTF_FIXED_NAMES:
        return _MTF_FIXED_NAMES[canonical], False
    norm, final_norm = _MTF_NORMS[bool(v1_1)]
    for stack in _ROLES:
        if canonical == f"{stack}/final_norm/scale":
            return f"{stack}/{final_norm}/scale", False
    match = _CANONICAL_BLOCK.match(canonical)
    if match is None or match["role"] not in _ROLES[match["stack"]]:
        raise ValueError(f"no Mesh TensorFlow name for T5 weight {canonical!r}")
    stack, role, weight = match["stack"], match["role"], match["weight"]
    layer = (
        f"{stack}/block_{int(match['block']):03d}/"
        f"layer_{_ROLES[stack].index(role):03d}"
    )
    if match["norm"]:
        if weight is None:
            return f"{layer}/{norm}/scale", False
    elif role == "mlp":
        if weight in _MLP_WEIGHTS:
            return f"{layer}/DenseReluDense/{weight}/kernel", False
    elif weight in _SOURCE_PROJECTIONS:
        module = _ATTENTION_MODULES[role]
        return f"{layer}/{module}/{_SOURCE_PROJECTIONS[weight]}", False
    elif weight == "relative_attention_bias" and role == "self_attention":
        # keras_moe stores [buckets, heads], MTF [heads, buckets].
        return f"{layer}/{_ATTENTION_MODULES[role]}/{weight}", True
    raise ValueError(f"no Mesh TensorFlow name for T5 weight {canonical!r}")


def _mtf_canonical_name(name):
    """(canonical name, transpose) of a Mesh TensorFlow name, or None."""
    if name in _MTF_FIXED:
        return _MTF_FIXED[name], False
    match = _MTF_FINAL_NORM.match(name)
    if match:
        return f"{match[1]}/final_norm/scale", False
    match = _MTF_BLOCK.match(name)
    if not match:
        return None
    stack, block, sublayer, rest = (
        match[1],
        int(match[2]),
        int(match[3]),
        match[4],
    )
    parts = rest.split("/")
    if rest in _MTF_BLOCK_NORMS:
        parts = ["norm"]
    elif (
        len(parts) == 3
        and parts[0] == "DenseReluDense"
        and parts[2] == "kernel"
    ):
        parts = ["DenseReluDense", parts[1]]
    elif len(parts) != 2:
        return None
    target = _block_weight(stack, block, sublayer, parts)
    if target is None:
        return None
    # MTF stores the bias [heads, buckets]; keras_moe's is [buckets, heads].
    return target, target.endswith("relative_attention_bias")


def _block_weight(stack, block, sublayer, parts):
    """Canonical name of weight `parts` of sub-layer `sublayer` of a block.

    `parts` is `["norm"]`, `["DenseReluDense", wi|wi_0|wi_1|wo]` or
    `[SelfAttention|EncDecAttention, q|k|v|o|relative_attention_bias]`, as in
    the Mesh TensorFlow and Hugging Face layouts, which number sub-layers
    alike. Returns None for a weight that has no place there.
    """
    roles = _ROLES[stack]
    if sublayer >= len(roles):
        return None
    role = roles[sublayer]
    prefix = f"{stack}/block_{block}/"
    if parts == ["norm"]:
        return f"{prefix}{role}_norm/scale"
    kind, weight = parts
    if role == "mlp":
        if kind == "DenseReluDense" and weight in _MLP_WEIGHTS:
            return f"{prefix}mlp/{weight}"
        return None
    if _ATTENTION_ROLES.get(kind) != role:
        return None
    if weight in _PROJECTIONS:
        return f"{prefix}{role}/{_PROJECTIONS[weight]}"
    if weight == "relative_attention_bias" and role == "self_attention":
        return f"{prefix}self_attention/relative_attention_bias"
    return None


# --------------------------------------------------------------------------
# Public readers.


def read_t5_mtf_checkpoint(path, config=None):
    """Reads an original T5 (Mesh TensorFlow) checkpoint into a `T5`.

    Args:
        path: a checkpoint prefix (`.../model.ckpt-1000000`), its `.index`
            file, or a directory holding a `checkpoint` file or one
            checkpoint.
        config: None, an architecture name or a dict of `T5` kwargs; see the
            module docstring. Without it, `wi` means `"relu"` and `wi_0`/`wi_1`
            `"gated_gelu"`.

    Returns:
        A built `T5` holding the checkpoint's weights.

    Raises:
        ValueError: the path holds no readable checkpoint, a data shard is
            missing or truncated, the checkpoint is not a T5 or disagrees
            with `config`; `CheckpointMismatchError` (a `ValueError`) when
            names or shapes do not fit.
    """
    prefix, reader = io.open_tf_checkpoint(
        path, "T5 Mesh TensorFlow checkpoint"
    )
    source = f"T5 Mesh TensorFlow checkpoint {prefix}"
    arrays, unknown = {}, {}
    shapes = reader.get_variable_to_shape_map()
    for name in sorted(shapes):
        if _is_mtf_optimizer_state(name):
            continue
        lazy = io.LazyTensor(
            shapes[name],
            functools.partial(reader.get_tensor, name),
            io.where(name, source),
        )
        target = _mtf_canonical_name(name)
        if target is None:
            unknown[name] = lazy
            continue
        canonical, transpose = target
        io.put(arrays, canonical, lazy.T if transpose else lazy, name, source)
    facts, gated = _infer_dims(arrays, source, shapes)
    kwargs = _t5_kwargs(
        source,
        facts,
        gated,
        config,
        defaults={"activation": "gated_gelu" if gated else "relu"},
    )
    return _build(kwargs, {**arrays, **unknown}, source)


def read_t5_hf_safetensors(path, config=None):
    """Reads a Hugging Face T5 `save_pretrained` directory into a `T5`.

    Reads `model.safetensors` (or the shards of
    `model.safetensors.index.json`) with the `safetensors` package and
    NumPy, and `config.json` when present; transformers is not needed.

    Args:
        path: the directory, or one `.safetensors` file (a `config.json`
            beside it is used).
        config: None, an architecture name or a dict of `T5` kwargs; see the
            module docstring.

    Returns:
        A built `T5` holding the checkpoint's weights.

    Raises:
        ValueError: no safetensors file, a truncated or unreadable file, a
            `config.json` of another model or one that disagrees with the
            weights or with `config`; `CheckpointMismatchError` when names
            or shapes do not fit.
    """
    checkpoint = io.hf_checkpoint(path, ("t5", "mt5"), "T5")
    source = f"Hugging Face T5 checkpoint {checkpoint.path}"
    with io.open_safetensors(
        checkpoint.files, checkpoint.weight_map
    ) as tensors:
        arrays, unknown, tied_copies = {}, {}, []
        for name in sorted(tensors):
            lazy = tensors[name]
            if name in _HF_IGNORED:
                continue
            if name in _HF_TIED_COPIES:
                tied_copies.append(name)
                continue
            target = _hf_canonical_name(name)
            if target is None:
                unknown[name] = lazy
                continue
            canonical, transpose = target
            io.put(
                arrays, canonical, lazy.T if transpose else lazy, name, source
            )
        for name in tied_copies:
            _check_tied_copy(
                arrays, tensors[name], name, "shared.weight", source
            )
        hf_facts, defaults, scale = _hf_config_facts(checkpoint.config, source)
        if scale is None:
            # No config.json. An lm_head of its own means v1.1; otherwise a
            # gated MLP means transformers 5's tied but unscaled v1.1, and a
            # plain one T5 v1.0 (tied and scaled).
            separate = _LM_HEAD in arrays and not _same(
                arrays[_LM_HEAD].T, arrays.get(_EMBEDDING)
            )
            gated = "encoder/block_0/mlp/wi_0" in arrays
            scale = not separate and not gated
        if scale and _LM_HEAD in arrays:
            _check_tied_copy(
                arrays,
                arrays.pop(_LM_HEAD).T,
                "lm_head.weight",
                "shared.weight",
                source,
            )
        if not scale and _LM_HEAD not in arrays and _EMBEDDING in arrays:
            # transformers 5 ties lm_head to shared.weight for every config
            # and only stops scaling: the same matrix, unscaled.
            arrays[_LM_HEAD] = arrays[_EMBEDDING].T
        facts, gated = _infer_dims(arrays, source, tensors)
        _check_agree(facts, hf_facts, "the weights", "config.json", source)
        kwargs = _t5_kwargs(
            source,
            {**hf_facts, **facts},
            gated,
            config,
            defaults={"activation": "gated_gelu" if gated else "relu"}
            | defaults,
        )
        return _build(kwargs, {**arrays, **unknown}, source)


def read_t5_model_garden_checkpoint(path, config=None):
    """Reads a TF Model Garden T5 (`T5Transformer`) checkpoint into a `T5`.

    The checkpoint is read by name with `tf.train.load_checkpoint`; neither
    `official` nor `tf_keras` is imported.

    Args:
        path: a checkpoint prefix, its `.index` file or a directory.
        config: None, an architecture name or a dict of `T5` kwargs; see the
            module docstring (the activation, `layer_norm_epsilon` and
            `relative_attention_max_distance` are not in the checkpoint).

    Returns:
        A built `T5` holding the checkpoint's weights.

    Raises:
        ValueError: unreadable or truncated checkpoint, not a Model Garden
            T5, separate encoder and decoder embeddings or per-layer
            relative biases that differ (keras_moe's T5 shares both), or a
            disagreement with `config`; `CheckpointMismatchError` when names
            or shapes do not fit.
    """
    prefix, reader = io.open_tf_checkpoint(path, "Model Garden T5 checkpoint")
    source = f"Model Garden T5 checkpoint {prefix}"
    variables = io.tf_object_variables(reader)
    root = _model_garden_root(variables, source)
    arrays, unknown = {}, {}
    embeddings, relative = {}, {"encoder": {}, "decoder": {}}
    mlp_inputs = {}
    for name in sorted(variables):
        if not name.startswith(root):
            continue
        relative_name = name[len(root) :]
        if not root and relative_name.split("/")[0] in _TRAINER_OBJECTS:
            continue
        key, shape = variables[name]
        lazy = io.LazyTensor(
            shape,
            functools.partial(reader.get_tensor, key),
            io.where(key, source),
        )
        kind, target = _model_garden_canonical_name(relative_name)
        if kind == "embedding":
            embeddings[relative_name] = lazy
        elif kind == "relative":
            stack, layer = target
            relative[stack][layer] = (relative_name, lazy)
        elif kind == "mlp_input":
            block_prefix, index = target
            mlp_inputs.setdefault(block_prefix, {})[index] = (
                relative_name,
                lazy,
            )
        elif kind == "weight":
            io.put(arrays, target, lazy, relative_name, source)
        else:
            unknown[key] = lazy
    _put_shared(arrays, embeddings, source)
    for stack, per_layer in relative.items():
        _put_shared_relative_bias(arrays, stack, per_layer, source)
    for block_prefix, inputs in mlp_inputs.items():
        names = (
            ["wi"]
            if len(inputs) == 1
            else [f"wi_{i}" for i in range(len(inputs))]
        )
        for canonical, index in zip(names, sorted(inputs)):
            relative_name, lazy = inputs[index]
            io.put(
                arrays,
                f"{block_prefix}mlp/{canonical}",
                lazy,
                relative_name,
                source,
            )
    facts, gated = _infer_dims(arrays, source, variables)
    kwargs = _t5_kwargs(
        source,
        facts,
        gated,
        config,
        defaults={"activation": "gated_gelu" if gated else "relu"},
    )
    return _build(kwargs, {**arrays, **unknown}, source)


def convert_t5_keras_hub_backbone(backbone, config=None):
    """Converts a keras-hub `T5Backbone` (or a task holding one) to a `T5`.

    Args:
        backbone: a `keras_hub.models.T5Backbone`, or a model whose
            `backbone` attribute is one (e.g. `T5Seq2SeqLM`).
        config: None, an architecture name or a dict of `T5` kwargs; see the
            module docstring. keras-hub's T5 v1.1 presets use exact GELU in a
            gated MLP, which keras_moe does not have: pass
            `config={"activation": "gated_gelu"}` to accept its tanh
            approximation (what the original checkpoints were trained with).

    Returns:
        A built `T5` holding copies of the backbone's weights.

    Raises:
        ValueError: not a T5 backbone, an activation keras_moe cannot
            represent, or a disagreement with `config`;
            `CheckpointMismatchError` when names or shapes do not fit.
    """
    if not _looks_like_keras_hub_t5(backbone) and _looks_like_keras_hub_t5(
        getattr(backbone, "backbone", None)
    ):
        backbone = backbone.backbone
    if not _looks_like_keras_hub_t5(backbone):
        raise ValueError(
            "convert_t5_keras_hub_backbone expects a keras_hub T5Backbone "
            f"(or a task with one as `.backbone`); received "
            f"{type(backbone).__name__}."
        )
    source = f"keras-hub {type(backbone).__name__} {backbone.name!r}"
    consumed = set()

    def array(variable):
        consumed.add(id(variable))
        return io.variable_tensor(variable, source)

    def getter(layer):
        def get(path):
            obj = layer
            for attribute in path.split("/"):
                obj = getattr(obj, attribute, None)
                if obj is None:
                    return None
            return array(obj)

        return get

    arrays = {_EMBEDDING: array(backbone.token_embedding.embeddings)}
    if not backbone.token_embedding.tie_weights:
        arrays[_LM_HEAD] = array(backbone.token_embedding.reverse_embeddings)
    stacks = {
        "encoder": backbone.encoder_transformer_layers,
        "decoder": backbone.decoder_transformer_layers,
    }
    for stack, layers in stacks.items():
        for i, layer in enumerate(layers):
            arrays.update(
                _keras_hub_block(getter(layer), stack, i, _KH_OBJECTS)
            )
    arrays["encoder/final_norm/scale"] = array(
        backbone.encoder_layer_norm.weight
    )
    arrays["decoder/final_norm/scale"] = array(
        backbone.decoder_layer_norm.weight
    )
    unknown = {
        weight.path: array(weight)
        for weight in backbone.weights
        if id(weight) not in consumed
    }
    keras_hub_config = backbone.get_config()
    return _keras_hub_build(arrays, unknown, keras_hub_config, config, source)


def read_t5_keras_hub(path, config=None):
    """Reads keras-hub T5Backbone weights (`.weights.h5` or preset dir).

    The weights file is read with h5py, without importing keras_hub, and the
    architecture is inferred from its shapes. A preset directory (from
    `save_to_preset`) also gives the activation and `layer_norm_epsilon`
    through its `config.json`; a bare `.weights.h5` does not record the
    activation, so `config` must give it.

    Args:
        path: a `.weights.h5` file of a `T5Backbone`, or a preset directory
            holding `config.json` and `model.weights.h5`.
        config: None, an architecture name or a dict of `T5` kwargs; see the
            module docstring and `convert_t5_keras_hub_backbone`.

    Returns:
        A built `T5` holding the file's weights.

    Raises:
        ValueError: no such file, a truncated or unreadable file, a preset of
            another model, a missing activation, or a disagreement with
            `config`; `CheckpointMismatchError` when names or shapes do not
            fit.
    """
    if io.checkpoint_format(path) == "keras_hub_object":
        raise ValueError(
            "read_t5_keras_hub reads files; pass keras-hub objects to "
            f"convert_t5_keras_hub_backbone (received {type(path).__name__})."
        )
    path = os.fspath(path)
    keras_hub_config = None
    if os.path.isdir(path):
        keras_hub_config = io.keras_hub_config(
            os.path.join(path, "config.json"), "T5Backbone"
        )
        weights_path = os.path.join(path, io.KERAS_HUB_WEIGHTS)
    else:
        weights_path = path
    source = f"keras-hub T5Backbone weights {weights_path}"
    with io.open_h5(weights_path, source) as datasets:
        arrays, unknown = _keras_hub_h5_arrays(datasets, source)
        return _keras_hub_build(
            arrays, unknown, keras_hub_config, config, source
        )


def read_t5_checkpoint(path, config=None):
    """Reads a T5 checkpoint of any supported format, chosen from the path.

    A keras-hub backbone object goes to `convert_t5_keras_hub_backbone`; a
    `.safetensors` file or a directory with `model.safetensors[.index.json]`
    to `read_t5_hf_safetensors`; a `.weights.h5` file or a directory with
    `model.weights.h5` (a keras-hub preset) to `read_t5_keras_hub`; a
    TensorFlow checkpoint to `read_t5_mtf_checkpoint` when it holds
    `shared/embedding`, else to `read_t5_model_garden_checkpoint`.

    Args:
        path: see the readers above.
        config: passed to the reader.

    Returns:
        A built `T5`.
    """
    kind = io.checkpoint_format(path)
    if kind == "keras_hub_object":
        return convert_t5_keras_hub_backbone(path, config)
    if kind == "hf":
        return read_t5_hf_safetensors(path, config)
    if kind == "keras_hub":
        return read_t5_keras_hub(path, config)
    _, reader = io.open_tf_checkpoint(path, "T5 checkpoint")
    if _EMBEDDING in reader.get_variable_to_shape_map():
        return read_t5_mtf_checkpoint(path, config)
    return read_t5_model_garden_checkpoint(path, config)


# --------------------------------------------------------------------------
# Shared by the readers: inference and config merging.


def _same(a, b):
    return (
        a is not None
        and b is not None
        and a.shape == b.shape
        and np.array_equal(np.asarray(a), np.asarray(b))
    )


def _check_tied_copy(arrays, copy, copy_name, of_name, source):
    """A tied duplicate must equal the weight it duplicates."""
    original = arrays.get(_EMBEDDING)
    if original is None:
        return
    if not _same(copy, original):
        raise ValueError(
            f"{source}: {copy_name} should be tied to {of_name} but differs "
            f"from it (shapes {copy.shape} and {original.shape}); keras_moe's "
            "T5 has one token embedding."
        )


def _infer_dims(arrays, source, source_names):
    """(T5 kwargs the canonical arrays fix, whether the MLP is gated)."""

    def shape(name, what):
        if name not in arrays:
            sample = ", ".join(sorted(map(str, source_names))[:8]) or "nothing"
            if not any(k.startswith(("encoder/", "decoder/")) for k in arrays):
                raise ValueError(
                    f"{source} does not look like a T5 checkpoint: it has "
                    f"no {what}; it holds {sample}"
                    f"{' ...' if len(source_names) > 8 else ''}."
                )
            raise ValueError(
                f"{source} is not a complete T5 checkpoint: it has no {what} "
                f"({name!r} in keras_moe's names)."
            )
        return arrays[name].shape

    vocab_size, model_dim = shape(_EMBEDDING, "token embedding")
    num_buckets, num_heads = shape(
        "encoder/block_0/self_attention/relative_attention_bias",
        "encoder relative attention bias",
    )
    inner_dim = shape("encoder/block_0/self_attention/query", "query kernel")[1]
    if inner_dim % num_heads:
        raise ValueError(
            f"{source}: the query kernel's width {inner_dim} is not a multiple "
            f"of the {num_heads} heads of the relative attention bias."
        )
    gated = "encoder/block_0/mlp/wi_0" in arrays
    wi = "encoder/block_0/mlp/wi_0" if gated else "encoder/block_0/mlp/wi"
    hidden_dim = shape(wi, "MLP input kernel")[1]
    facts = {
        "vocab_size": vocab_size,
        "model_dim": model_dim,
        "num_heads": num_heads,
        "head_dim": inner_dim // num_heads,
        "hidden_dim": hidden_dim,
        "num_encoder_layers": _num_blocks(arrays, "encoder"),
        "num_decoder_layers": _num_blocks(arrays, "decoder"),
        "relative_attention_num_buckets": num_buckets,
        "tie_embeddings": _LM_HEAD not in arrays,
    }
    return facts, gated


def _num_blocks(arrays, stack):
    """1 + the highest block index: gaps show up as missing names later."""
    pattern = re.compile(rf"^{stack}/block_(\d+)/")
    indices = [int(m[1]) for m in map(pattern.match, arrays) if m]
    return max(indices) + 1 if indices else 0


def _check_agree(facts, recorded, facts_from, recorded_in, source):
    conflicts = [
        f"{key}: {facts_from} say {facts[key]!r}, {recorded_in} says "
        f"{recorded[key]!r}"
        for key in sorted(recorded)
        if key in facts and recorded[key] != facts[key]
    ]
    if conflicts:
        raise ValueError(
            f"{source} disagrees with itself: " + "; ".join(conflicts)
        )


def _t5_kwargs(
    source, facts, gated, config, defaults=None, activation_note=None
):
    """Merges what the checkpoint fixes with the caller's `config`.

    Args:
        source: for messages.
        facts: T5 kwargs the checkpoint fixes; `config` must agree.
        gated: whether the checkpoint's MLP is gated (`wi_0`/`wi_1`).
        config: None, an architecture name or a dict of T5 kwargs.
        defaults: T5 kwargs the checkpoint suggests; `config` may replace.
        activation_note: why no activation is known, when neither `facts`
            nor `defaults` give one.
    """
    config = config_kwargs(config, T5, t5_config)
    conflicts = [
        f"{key}: the checkpoint has {facts[key]!r}, config says "
        f"{config[key]!r}"
        for key in sorted(facts)
        if key in config and config[key] != facts[key]
    ]
    if conflicts:
        raise ValueError(
            f"{source} does not match the expected config: "
            + "; ".join(conflicts)
        )
    kwargs = {**(defaults or {}), **config, **facts}
    if "activation" not in kwargs:
        raise ValueError(f"{source}: {activation_note}")
    if get_activation(kwargs["activation"])[1] != gated:
        weights = "wi_0 and wi_1 (gated)" if gated else "a single wi"
        raise ValueError(
            f"{source}: the MLP has {weights}, which activation "
            f"{kwargs['activation']!r} does not fit."
        )
    return kwargs


def _build(kwargs, arrays, source):
    model = T5(**kwargs)
    assign_weights(model, arrays, source)
    return model


# --------------------------------------------------------------------------
# TensorFlow checkpoints (Mesh TensorFlow and Model Garden).


def _is_mtf_optimizer_state(name):
    last = name.rsplit("/", 1)[-1]
    parts = name.split("/")
    return (
        "_slot_" in last
        or last == "global_step"
        or any(p in ("adam_m", "adam_v") for p in parts)
    )


# Objects a trainer saves next to the model in a root-level checkpoint.
_TRAINER_OBJECTS = frozenset(
    {"optimizer", "save_counter", "global_step", "step"}
)
_MG_EMBEDDINGS = frozenset(
    {
        "shared_embedding/embeddings",
        "encoder/input_embed/embeddings",
        "encoder/word_embed/embeddings",
        "decoder/target_embed/embeddings",
    }
)
_MG_RELATIVE = re.compile(
    r"^(encoder|decoder)/relative_embeddings?(?:/(\d+))?/"
    r"relative_attention_bias/embeddings$"
)
_MG_BLOCK = re.compile(r"^(encoder|decoder)/\1_layers/(\d+)/(.+)$")
_MG_ATTENTION = re.compile(r"^(self|cross)_attention/\1_attention/([qkvo])/w$")
_MG_WEIGHTS = {
    "self_attention/layer_norm/weight": "self_attention_norm/scale",
    "cross_attention/layer_norm/weight": "cross_attention_norm/scale",
    "ffn_layer_norm/weight": "mlp_norm/scale",
    "ffn/wo/w": "mlp/wo",
}


def _model_garden_root(variables, source):
    """The object path of the T5Transformer: '' or e.g. 'model/'."""
    roots = set()
    for name in variables:
        match = re.match(r"^(.*?)encoder/encoder_layers/\d+/", name)
        if match:
            roots.add(match[1])
    if not roots:
        sample = ", ".join(sorted(variables)[:8]) or "no model variables"
        raise ValueError(
            f"{source} does not look like a Model Garden T5 checkpoint: no "
            f"'encoder/encoder_layers/<i>/...' variables; it holds {sample}."
        )
    if len(roots) > 1:
        raise ValueError(f"{source} holds several T5 models: {sorted(roots)}.")
    return roots.pop()


def _model_garden_canonical_name(name):
    """(kind, target) for a Model Garden object path below the model."""
    if name in _MG_EMBEDDINGS:
        return "embedding", None
    match = _MG_RELATIVE.match(name)
    if match:
        return "relative", (match[1], int(match[2] or 0))
    if name in ("encoder/output_norm/weight", "decoder/output_norm/weight"):
        return "weight", f"{name.split('/')[0]}/final_norm/scale"
    if name == "decoder/logits_dense/w":
        return "weight", _LM_HEAD
    match = _MG_BLOCK.match(name)
    if not match:
        return None, None
    stack, block, rest = match[1], int(match[2]), match[3]
    prefix = f"{stack}/block_{block}/"
    if rest.startswith("cross_attention") and stack == "encoder":
        return None, None
    if rest in _MG_WEIGHTS:
        return "weight", prefix + _MG_WEIGHTS[rest]
    attention = _MG_ATTENTION.match(rest)
    if attention:
        role = f"{attention[1]}_attention"
        return "weight", f"{prefix}{role}/{_PROJECTIONS[attention[2]]}"
    mlp_input = re.match(r"^ffn/wi/(\d+)/w$", rest)
    if mlp_input:
        return "mlp_input", (prefix, int(mlp_input[1]))
    return None, None


def _put_shared(arrays, embeddings, source):
    """One token embedding: Model Garden may save it under several paths."""
    if not embeddings:
        return
    names = sorted(embeddings)
    first = embeddings[names[0]]
    for name in names[1:]:
        other = embeddings[name]
        if not _same(other, first):
            raise ValueError(
                f"{source} has separate token embeddings {names[0]!r} "
                f"{first.shape} and {name!r} {other.shape} (built with "
                "shared_embedding=False); keras_moe's T5 shares one between "
                "encoder and decoder."
            )
    arrays[_EMBEDDING] = first


def _put_shared_relative_bias(arrays, stack, per_layer, source):
    """One relative bias per stack: per-layer biases must all be equal."""
    if not per_layer:
        return
    layers = sorted(per_layer)
    first_name, first = per_layer[layers[0]]
    for layer in layers[1:]:
        name, other = per_layer[layer]
        if not _same(other, first):
            raise ValueError(
                f"{source} has a relative attention bias per {stack} layer "
                f"({first_name!r} differs from {name!r}; built with "
                "use_shared_relative_position_bias=False); keras_moe's T5 "
                "shares one per stack."
            )
    arrays[f"{stack}/block_0/self_attention/relative_attention_bias"] = first


# --------------------------------------------------------------------------
# Hugging Face safetensors.

_HF_IGNORED = frozenset(
    # Hugging Face itself drops it on load (_keys_to_ignore_on_load_unexpected).
    {"decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"}
)
_HF_TIED_COPIES = frozenset(
    {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}
)
_HF_BLOCK = re.compile(
    r"^(encoder|decoder)\.block\.(\d+)\.layer\.(\d+)\.(.+)\.weight$"
)
_HF_ACTIVATIONS = {
    "relu": "relu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "silu": "silu",
    "swish": "silu",
    "gated-gelu": "gated_gelu",
    "gated-gelu_new": "gated_gelu",
    "gated-gelu_pytorch_tanh": "gated_gelu",
    "gated-silu": "gated_silu",
    "gated-swish": "gated_silu",
    "gated-relu": "gated_relu",
}


def _hf_canonical_name(name):
    """(canonical name, transpose) of a Hugging Face T5 name, or None."""
    if name == "shared.weight":
        return _EMBEDDING, False
    if name == "lm_head.weight":
        return _LM_HEAD, True
    match = re.match(r"^(encoder|decoder)\.final_layer_norm\.weight$", name)
    if match:
        return f"{match[1]}/final_norm/scale", False
    match = _HF_BLOCK.match(name)
    if not match:
        return None
    stack, block, sublayer, rest = (
        match[1],
        int(match[2]),
        int(match[3]),
        match[4],
    )
    parts = ["norm"] if rest == "layer_norm" else rest.split(".")
    if len(parts) not in (1, 2) or (len(parts) == 1 and parts != ["norm"]):
        return None
    target = _block_weight(stack, block, sublayer, parts)
    if target is None:
        return None
    # torch Linear weights are [out, in]; the relative bias is an Embedding.
    transpose = parts != ["norm"] and not target.endswith(
        "relative_attention_bias"
    )
    return target, transpose


def _hf_config_facts(hf_config, source):
    """(facts, defaults, scale) from config.json; scale None when unknown."""
    if hf_config is None:
        return {}, {}, None
    facts, defaults = {}, {}
    renames = {
        "vocab_size": "vocab_size",
        "d_model": "model_dim",
        "num_heads": "num_heads",
        "d_kv": "head_dim",
        "d_ff": "hidden_dim",
        "num_layers": "num_encoder_layers",
        "relative_attention_num_buckets": "relative_attention_num_buckets",
        "relative_attention_max_distance": "relative_attention_max_distance",
        "layer_norm_epsilon": "layer_norm_epsilon",
    }
    for key, name in renames.items():
        if hf_config.get(key) is not None:
            facts[name] = hf_config[key]
    facts["num_decoder_layers"] = hf_config.get(
        "num_decoder_layers"
    ) or facts.get("num_encoder_layers")
    if facts["num_decoder_layers"] is None:
        del facts["num_decoder_layers"]
    projection = hf_config.get("feed_forward_proj")
    if projection is not None:
        if projection not in _HF_ACTIVATIONS:
            raise ValueError(
                f"{source}: feed_forward_proj {projection!r} has no keras_moe "
                f"activation (supported: {sorted(_HF_ACTIVATIONS)})."
            )
        facts["activation"] = _HF_ACTIVATIONS[projection]
    if hf_config.get("dropout_rate") is not None:
        defaults["dropout_rate"] = hf_config["dropout_rate"]
    if "scale_decoder_outputs" in hf_config:
        scale = bool(hf_config["scale_decoder_outputs"])
    else:
        scale = bool(hf_config.get("tie_word_embeddings", True))
    return facts, defaults, scale


# --------------------------------------------------------------------------
# keras-hub T5Backbone.

# Canonical sub-name -> keras-hub attribute path inside a T5TransformerLayer.
_KH_ATTENTION = {
    "query": "query_projector",
    "key": "key_projector",
    "value": "value_projector",
    "output": "output_projector",
}
_KH_NORMS = {
    "self_attention_norm/scale": "self_attention_layer_norm",
    "cross_attention_norm/scale": "cross_attention_layer_norm",
    "mlp_norm/scale": "layer_norm",
}
# How each kind of keras-hub path ends: on the layer objects, and in .h5.
_KH_OBJECTS = {
    "dense": "/kernel",
    "norm": "/weight",
    "bias": "/relative_attention_bias",
}
_KH_H5 = {"dense": "/vars/0", "norm": "/vars/0", "bias": "/vars/0"}
_KH_ACTIVATIONS = {
    (False, "relu"): "relu",
    (False, "gelu"): "gelu",
    (False, "gelu_approximate"): "gelu_tanh",
    (False, "silu"): "silu",
    (False, "swish"): "silu",
    (True, "gelu_approximate"): "gated_gelu",
    (True, "relu"): "gated_relu",
    (True, "silu"): "gated_silu",
    (True, "swish"): "gated_silu",
}


def _looks_like_keras_hub_t5(obj):
    return all(
        hasattr(obj, attribute)
        for attribute in (
            "token_embedding",
            "encoder_transformer_layers",
            "decoder_transformer_layers",
            "encoder_layer_norm",
            "decoder_layer_norm",
        )
    )


def _keras_hub_block(get, stack, i, endings):
    """Canonical name -> array of one T5TransformerLayer, via `get(path)`."""
    prefix = f"{stack}/block_{i}/"
    paths = {}
    roles = (
        ("self_attention", "cross_attention")
        if stack == "decoder"
        else ("self_attention",)
    )
    for role in roles:
        for canonical, attribute in _KH_ATTENTION.items():
            paths[f"{prefix}{role}/{canonical}"] = (
                f"{role}/{attribute}" + endings["dense"]
            )
    for canonical, attribute in _KH_NORMS.items():
        if canonical.startswith("cross") and stack == "encoder":
            continue
        paths[prefix + canonical] = attribute + endings["norm"]
    if i == 0:
        paths[prefix + "self_attention/relative_attention_bias"] = (
            "self_attention" + endings["bias"]
        )
    gated = get("gate_projector" + endings["dense"]) is not None
    mlp = (
        {"wi_0": "input_projector", "wi_1": "gate_projector"}
        if gated
        else {"wi": "input_projector"}
    )
    mlp["wo"] = "output_projector"
    for canonical, attribute in mlp.items():
        paths[f"{prefix}mlp/{canonical}"] = attribute + endings["dense"]
    arrays = {}
    for canonical, path in paths.items():
        value = get(path)
        if value is not None:
            arrays[canonical] = value
    return arrays


def _keras_hub_h5_arrays(datasets, source):
    """(canonical arrays, unexpected arrays) of a T5Backbone .weights.h5.

    Keras names the groups of a functional model's layers after their
    classes in `model.layers` order: `reversible_embedding`,
    `t5_transformer_layer[_N]` (encoder layers, then decoder layers, which
    have `cross_attention`) and `t5_layer_norm` (encoder output norm) then
    `t5_layer_norm_1` (decoder output norm).

    Args:
        datasets: dataset path -> `LazyTensor`, from `io.open_h5`.
        source: the file, for errors.
    """
    if not any(
        name.startswith("layers/t5_transformer_layer") for name in datasets
    ):
        sample = ", ".join(sorted(datasets)[:8]) or "no weights"
        raise ValueError(
            f"{source} does not look like T5Backbone weights: no "
            f"'layers/t5_transformer_layer' group; it holds {sample}."
        )
    consumed = set()

    def lazy(name):
        if name in datasets:
            consumed.add(name)
        return datasets.get(name)

    # The groups under layers/, one per layer.
    groups = {
        name.split("/")[1]
        for name in datasets
        if name.startswith("layers/") and name.count("/") > 1
    }

    def numbered(base):
        found = []
        for key in groups:
            match = re.fullmatch(rf"{base}(?:_(\d+))?", key)
            if match:
                found.append((int(match[1] or 0), key))
        return [key for _, key in sorted(found)]

    layers = numbered("t5_transformer_layer")
    decoder_flags = [
        any(
            name.startswith(f"layers/{key}/cross_attention/")
            for name in datasets
        )
        for key in layers
    ]
    if decoder_flags != sorted(decoder_flags):
        raise ValueError(
            f"{source}: encoder and decoder layers are interleaved "
            f"({layers}); this is not a T5Backbone weights file."
        )
    arrays = {}
    embedding = lazy("layers/reversible_embedding/vars/0")
    if embedding is not None:
        arrays[_EMBEDDING] = embedding
    reverse = lazy("layers/reversible_embedding/vars/1")
    if reverse is not None:
        arrays[_LM_HEAD] = reverse
    counts = {"encoder": 0, "decoder": 0}
    for key, is_decoder in zip(layers, decoder_flags):
        stack = "decoder" if is_decoder else "encoder"
        base = f"layers/{key}/"
        arrays.update(
            _keras_hub_block(
                lambda path, base=base: lazy(base + path),
                stack,
                counts[stack],
                _KH_H5,
            )
        )
        counts[stack] += 1
    norms = numbered("t5_layer_norm")
    for stack, key in zip(("encoder", "decoder"), norms):
        value = lazy(f"layers/{key}/vars/0")
        if value is not None:
            arrays[f"{stack}/final_norm/scale"] = value
    unknown = {name: lazy(name) for name in sorted(set(datasets) - consumed)}
    return arrays, unknown


def _keras_hub_activation_name(serialized):
    """'relu', 'gelu', 'gelu_approximate', ... from a serialised activation."""
    if isinstance(serialized, dict):
        inner = serialized.get("config")
        serialized = (
            inner if isinstance(inner, str) else serialized.get("class_name")
        )
    if not isinstance(serialized, str):
        return None
    return serialized.split(">")[-1]


def _keras_hub_build(arrays, unknown, keras_hub_config, config, source):
    facts, gated = _infer_dims(arrays, source, list(arrays) + list(unknown))
    # keras-hub hard-codes the bucketing distance.
    facts["relative_attention_max_distance"] = 128
    defaults, note = {}, None
    if keras_hub_config is None:
        note = (
            "a bare .weights.h5 does not record the activation; pass it in "
            "config (e.g. config={'activation': 'gated_gelu'}) or read the "
            "preset directory"
        )
    else:
        recorded = {
            "vocab_size": keras_hub_config.get("vocabulary_size"),
            "model_dim": keras_hub_config.get("hidden_dim"),
            "hidden_dim": keras_hub_config.get("intermediate_dim"),
            "num_heads": keras_hub_config.get("num_heads"),
            "num_encoder_layers": keras_hub_config.get("num_layers"),
            "num_decoder_layers": keras_hub_config.get("num_layers"),
            "tie_embeddings": keras_hub_config.get("tie_embedding_weights"),
        }
        if keras_hub_config.get("key_value_dim") is not None:
            recorded["head_dim"] = keras_hub_config["key_value_dim"]
        recorded = {k: v for k, v in recorded.items() if v is not None}
        _check_agree(facts, recorded, "the weights", "its config", source)
        if keras_hub_config.get("layer_norm_epsilon") is not None:
            facts["layer_norm_epsilon"] = keras_hub_config["layer_norm_epsilon"]
        if keras_hub_config.get("dropout") is not None:
            defaults["dropout_rate"] = keras_hub_config["dropout"]
        if (
            "use_gated_activation" in keras_hub_config
            and bool(keras_hub_config["use_gated_activation"]) != gated
        ):
            raise ValueError(
                f"{source} disagrees with itself: use_gated_activation is "
                f"{keras_hub_config['use_gated_activation']} but the weights "
                f"{'have' if gated else 'lack'} gate_projector."
            )
        name = _keras_hub_activation_name(keras_hub_config.get("activation"))
        activation = _KH_ACTIVATIONS.get((gated, name))
        if activation is not None:
            facts["activation"] = activation
        elif gated and name == "gelu":
            note = (
                "the backbone gates an exact (erf) GELU, which keras_moe's T5 "
                "does not have; pass config={'activation': 'gated_gelu'} to "
                "use the tanh approximation the T5 v1.1 weights were trained "
                "with (outputs then differ from keras-hub's by about 1e-3)"
            )
        else:
            note = (
                f"keras-hub activation {name!r} "
                f"{'with' if gated else 'without'} gating has no keras_moe "
                "equivalent"
            )
    kwargs = _t5_kwargs(
        source, facts, gated, config, defaults=defaults, activation_note=note
    )
    return _build(kwargs, {**arrays, **unknown}, source)
