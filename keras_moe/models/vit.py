"""Vision Transformer (ViT) with a replaceable MLP block.

Shape letters: B batch, P patch size, C channels, D model dimension, H
hidden (MLP) dimension, N patches, T tokens (N, plus one with a class
token), E experts, h heads, dk head dimension (D / h).

The architecture of "An Image is Worth 16x16 Words" (Dosovitskiy et al.,
2021) as big_vision, Hugging Face and the TF Model Garden implement it:

    images <[B, H_img, W_img, C]>
      -> patch embedding: conv, kernel = stride = P      -> <[B, N, D]>
      -> [class token prepended]                          -> <[B, T, D]>
      -> + learned position embedding <[1, T, D]>
      -> num_layers pre-norm blocks:
           x = x + Attention(LayerNorm(x))   (biases, 1/sqrt(dk) scaling)
           x = x + Mlp(LayerNorm(x))         (or MoeLayer)
      -> final LayerNorm
      -> class token (pooling="token") or mean of the patch tokens ("gap")
      -> head Dense                                       -> <[B, classes]>

Each block's MLP is its `mlp` attribute: a `keras_moe.layers.Mlp`, or a
`keras_moe.layers.MoeLayer` for the block indices in `encoder_moe_blocks`.
A model is built for one image size; `ViT.with_image_size` makes a copy for
another one, with the position embedding resampled on the patch grid by
`interpolate_position_embedding`.

E^3 ("Sparse MoEs meet Efficient Ensembles", Allingham et al., 2021) with
`ensemble_size=M > 1`: the tokens are tiled M times before the first MoE
block (<[B, T, D]> -> <[M*B, T, D]>, member-major, see
`keras_moe.layers.ensemble`), every MoE block is an `EnsembleMoeLayer` whose
E experts are split into M groups of E/M (member m routes only within group
m), and the head runs once per member:

    training=True : per-member logits            <float32>[M*B, classes]
    training=False: log of the members' averaged <float32>[B, classes]
                    probabilities, log(mean_m softmax(z_m))

The inference output is a valid logit vector whose softmax is the ensemble's
averaged probabilities. `compile(loss=SparseCategoricalCrossentropy(
from_logits=True))` therefore trains each member on the repeated labels
(the paper's per-member cross-entropy: `compute_loss` and `compute_metrics`
repeat targets and sample weights to the M*B rows of a training step) and
evaluates the ensemble's negative log-likelihood. `member_logits(images)`
returns each member's logits <float32>[M, B, classes].
"""

import math

import keras
import numpy as np
from keras import ops

from keras_moe.layers.ensemble import EnsembleAverage
from keras_moe.layers.ensemble import EnsembleMoeLayer
from keras_moe.layers.ensemble import EnsembleTile
from keras_moe.layers.ensemble import check_ensemble_size
from keras_moe.layers.ensemble import match_member_rows
from keras_moe.layers.mlp import Mlp
from keras_moe.layers.mlp import get_activation
from keras_moe.layers.moe import MoeLayer
from keras_moe.models.moe_blocks import VISION
from keras_moe.models.moe_blocks import MoeStack
from keras_moe.models.presets import PresetMixin
from keras_moe.models.presets import register_architectures

POOLINGS = ("token", "gap")

_COMMON = dict(image_size=224, num_channels=3, num_classes=1000)
_SIZES = {
    # name: (model_dim, num_heads, hidden_dim, num_layers)
    "ti": (192, 3, 768, 12),
    "s": (384, 6, 1536, 12),
    "b": (768, 12, 3072, 12),
    "l": (1024, 16, 4096, 24),
}
_ARCHITECTURES = {
    f"vit_{size}{patch}": dict(
        _COMMON,
        patch_size=patch,
        model_dim=dims[0],
        num_heads=dims[1],
        hidden_dim=dims[2],
        num_layers=dims[3],
    )
    for size, dims in _SIZES.items()
    for patch in (16, 32)
}
_ARCHITECTURES["vit_tiny"] = dict(
    image_size=32,
    patch_size=8,
    num_channels=3,
    model_dim=32,
    num_heads=4,
    hidden_dim=64,
    num_layers=2,
    num_classes=10,
)
ARCHITECTURES = tuple(sorted(_ARCHITECTURES))
register_architectures("ViT", ARCHITECTURES)


def vit_config(name):
    """Returns the ViT constructor kwargs of architecture `name` (a new dict).

    Architectures: "vit_ti16", "vit_s16", "vit_b16", "vit_l16", "vit_ti32",
    "vit_s32", "vit_b32", "vit_l32" (224 x 224 images, 1000 classes, as in
    the ViT paper and "How to train your ViT") and "vit_tiny" for tests.

    Example:

    >>> vit_config("vit_b16")["model_dim"]
    768
    """
    if name not in _ARCHITECTURES:
        raise ValueError(
            f"Unknown ViT architecture {name!r}; known: {ARCHITECTURES}"
        )
    return dict(_ARCHITECTURES[name])


def _pair(value, name):
    """int or (int, int) -> (int, int), validated."""
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in pair
    ):
        raise ValueError(
            f"{name} must be an int >= 1 or a pair of them; received "
            f"{value!r}"
        )
    return pair


def _bilinear_axis(array, axis, new_length):
    """Resamples `array` along `axis` with half-pixel-centre bilinear
    interpolation (as `tf.image.resize` and `torch.nn.functional.interpolate
    (align_corners=False)`, without antialiasing); edges are clamped."""
    old_length = array.shape[axis]
    if old_length == new_length:
        return array
    source = (np.arange(new_length) + 0.5) * (old_length / new_length) - 0.5
    source = np.clip(source, 0.0, old_length - 1)
    low = np.floor(source).astype(np.int64)
    high = np.minimum(low + 1, old_length - 1)
    shape = [1] * array.ndim
    shape[axis] = new_length
    weight = (source - low).reshape(shape)
    return (
        np.take(array, low, axis=axis) * (1.0 - weight)
        + np.take(array, high, axis=axis) * weight
    )


def interpolate_position_embedding(
    array, new_grid, old_grid=None, has_class_token=None
):
    """Resamples a ViT position embedding to another patch grid.

    The patch part <[1, gh*gw, D]> is viewed as a <[gh, gw, D]> grid and
    resized bilinearly (half-pixel centres, edges clamped, no antialiasing:
    `tf.image.resize(method="bilinear")`, as the TF Model Garden does); the
    class-token embedding, when there is one, is kept as it is.

    Args:
        array: <[1, T, D]> position embedding (NumPy or tensor).
        new_grid: int or (gh, gw), the patch grid to resample to.
        old_grid: (gh, gw) of `array`; None means a square grid.
        has_class_token: whether position 0 is the class token's. None
            infers it from T: a square T has none, a square T - 1 has one.

    Returns:
        NumPy <[1, gh_new*gw_new (+1), D]> of the input dtype.

    Example:

    >>> embedding = np.zeros((1, 1 + 4 * 4, 8), "float32")
    >>> interpolate_position_embedding(embedding, 6).shape
    (1, 37, 8)
    """
    array = np.asarray(array)
    if array.ndim != 3 or array.shape[0] != 1:
        raise ValueError(
            "The position embedding must have shape [1, T, D]; received "
            f"{array.shape}"
        )
    length = array.shape[1]
    if old_grid is None:
        candidates = []
        for prefix in (
            (0, 1) if has_class_token is None else (int(has_class_token),)
        ):
            side = math.isqrt(length - prefix) if length > prefix else 0
            if side >= 1 and side * side == length - prefix:
                candidates.append((prefix, (side, side)))
        if len(candidates) != 1:
            raise ValueError(
                f"Cannot infer the patch grid of a position embedding of "
                f"length {length} (has_class_token={has_class_token}): pass "
                "old_grid"
            )
        prefix, old_grid = candidates[0]
    else:
        old_grid = _pair(old_grid, "old_grid")
        prefix = length - old_grid[0] * old_grid[1]
        if prefix not in (0, 1) or (
            has_class_token is not None and prefix != int(has_class_token)
        ):
            raise ValueError(
                f"A position embedding of length {length} does not fit grid "
                f"{old_grid} (has_class_token={has_class_token})"
            )
    new_grid = _pair(new_grid, "new_grid")
    dim = array.shape[-1]
    # (1, gh*gw, D) -> (gh, gw, D)
    grid = array[0, prefix:].reshape(*old_grid, dim).astype(np.float64)
    grid = _bilinear_axis(grid, 0, new_grid[0])
    grid = _bilinear_axis(grid, 1, new_grid[1])
    # (gh', gw', D) -> (1, gh'*gw', D)
    patches = grid.reshape(1, -1, dim).astype(array.dtype)
    return np.concatenate([array[:, :prefix], patches], axis=1)


@keras.saving.register_keras_serializable(package="keras_moe")
class ViTAttention(keras.layers.Layer):
    """Multi-head self-attention with biases and 1/sqrt(dk) logit scaling.

    Weights: Dense layers named `query`, `key`, `value`, `output` (attributes
    `query_dense`, ...), each with a
    kernel <[D, D]> (as `x @ W`, heads concatenated h-major) and a bias
    <[D]>. The softmax runs in float32.

    Args:
        num_heads: h; must divide D.
        kernel_initializer: of the four kernels.
        **kwargs: passed to `keras.layers.Layer`.

    Example:

    >>> attention = ViTAttention(num_heads=2)
    >>> tuple(attention(keras.ops.ones((1, 5, 8))).shape)
    (1, 5, 8)
    """

    def __init__(
        self, num_heads, kernel_initializer="glorot_uniform", **kwargs
    ):
        super().__init__(**kwargs)
        if isinstance(num_heads, bool) or not isinstance(num_heads, int):
            raise ValueError(
                f"num_heads must be an int; received {num_heads!r}"
            )
        if num_heads < 1:
            raise ValueError(f"num_heads must be >= 1; received {num_heads}")
        self.num_heads = num_heads
        self.kernel_initializer = keras.initializers.get(kernel_initializer)

    def build(self, input_shape):
        model_dim = input_shape[-1]
        if model_dim is None or model_dim % self.num_heads:
            raise ValueError(
                f"The model dimension ({model_dim}) must be known and "
                f"divisible by num_heads={self.num_heads}"
            )
        self.head_dim = model_dim // self.num_heads
        for name in ("query", "key", "value", "output"):
            dense = keras.layers.Dense(
                model_dim,
                kernel_initializer=keras.initializers.get(
                    keras.initializers.serialize(self.kernel_initializer)
                ),
                dtype=self.dtype_policy,
                name=name,
            )
            dense.build(input_shape)
            # `output` is taken by keras.layers.Layer: attributes get a suffix.
            setattr(self, f"{name}_dense", dense)

    def _heads(self, x):
        # (B, T, D) -> (B, T, h, dk)
        return ops.reshape(x, (-1, x.shape[1], self.num_heads, self.head_dim))

    def call(self, inputs):
        query = self._heads(self.query_dense(inputs))
        query = query * ops.cast(self.head_dim**-0.5, query.dtype)
        key = self._heads(self.key_dense(inputs))
        value = self._heads(self.value_dense(inputs))
        logits = ops.einsum("bqhd,bkhd->bhqk", query, key)
        probs = ops.softmax(ops.cast(logits, "float32"), axis=-1)
        probs = ops.cast(probs, self.compute_dtype)
        outputs = ops.einsum("bhqk,bkhd->bqhd", probs, value)
        # (B, T, h, dk) -> (B, T, D)
        outputs = ops.reshape(outputs, (-1, inputs.shape[1], inputs.shape[2]))
        return self.output_dense(outputs)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_heads": self.num_heads,
                "kernel_initializer": keras.initializers.serialize(
                    self.kernel_initializer
                ),
            }
        )
        return config


@keras.saving.register_keras_serializable(package="keras_moe")
class ViTBlock(keras.layers.Layer):
    """Pre-norm transformer encoder block.

    `x + Attention(LayerNorm(x))`, then `x + mlp(LayerNorm(x))`, where `mlp`
    is an `Mlp(hidden_dim, activation, use_bias=True)` or, when `moe` is a
    dict of `MoeLayer` kwargs, a `MoeLayer` (hidden_dim, activation and
    use_bias default to the dense MLP's); an `EnsembleMoeLayer` when the
    dict has an `ensemble_size` (inputs then hold M*B member-tiled rows).

    Args:
        num_heads: attention heads.
        hidden_dim: H of the MLP.
        activation: MLP activation (see `keras_moe.layers.mlp`).
        layer_norm_epsilon: of both LayerNorms.
        dropout_rate: on the attention and MLP outputs and the MLP hidden
            activations, when training.
        moe: None or a dict of `MoeLayer` kwargs (`EnsembleMoeLayer` kwargs
            with `ensemble_size`).
        **kwargs: passed to `keras.layers.Layer`.

    Example:

    >>> block = ViTBlock(num_heads=2, hidden_dim=16)
    >>> tuple(block(keras.ops.ones((1, 5, 8))).shape)
    (1, 5, 8)
    """

    def __init__(
        self,
        num_heads,
        hidden_dim,
        activation="gelu",
        layer_norm_epsilon=1e-6,
        dropout_rate=0.0,
        moe=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        get_activation(activation)
        if moe is not None and (
            not isinstance(moe, dict) or {"name", "dtype"} & set(moe)
        ):
            raise ValueError(
                "moe must be None or a dict of MoeLayer kwargs other than "
                f"name and dtype (the block sets them); received {moe!r}"
            )
        self.num_heads = num_heads
        self.hidden_dim = hidden_dim
        self.activation = activation
        self.layer_norm_epsilon = float(layer_norm_epsilon)
        self.dropout_rate = float(dropout_rate)
        self.moe = None if moe is None else dict(moe)

    def build(self, input_shape):
        def norm(name):
            layer = keras.layers.LayerNormalization(
                epsilon=self.layer_norm_epsilon,
                dtype=self.dtype_policy,
                name=name,
            )
            layer.build(input_shape)
            return layer

        self.attention_norm = norm("attention_norm")
        self.attention = ViTAttention(
            self.num_heads, dtype=self.dtype_policy, name="attention"
        )
        self.attention.build(input_shape)
        self.mlp_norm = norm("mlp_norm")
        if self.moe is None:
            self.mlp = Mlp(
                self.hidden_dim,
                activation=self.activation,
                use_bias=True,
                bias_initializer=keras.initializers.RandomNormal(stddev=1e-6),
                dropout_rate=self.dropout_rate,
                dtype=self.dtype_policy,
                name="mlp",
            )
        else:
            kwargs = dict(
                hidden_dim=self.hidden_dim,
                activation=self.activation,
                use_bias=True,
                dropout_rate=self.dropout_rate,
            )
            kwargs.update(self.moe)
            layer_cls = (
                EnsembleMoeLayer if "ensemble_size" in self.moe else MoeLayer
            )
            self.mlp = layer_cls(dtype=self.dtype_policy, name="mlp", **kwargs)
        self.mlp.build(input_shape)
        self.dropout = keras.layers.Dropout(
            self.dropout_rate, dtype=self.dtype_policy, name="dropout"
        )

    def call(self, inputs, training=False):
        x = self.attention(self.attention_norm(inputs))
        x = inputs + self.dropout(x, training=training)
        y = self.mlp(self.mlp_norm(x), training=training)
        return x + self.dropout(y, training=training)

    def canonical_variables(self, prefix):
        """{f"{prefix}/<canonical name>": variable} of this block."""
        names = {}
        for norm in ("attention_norm", "mlp_norm"):
            layer = getattr(self, norm)
            names[f"{prefix}/{norm}/gamma"] = layer.gamma
            names[f"{prefix}/{norm}/beta"] = layer.beta
        for dense in ("query", "key", "value", "output"):
            layer = getattr(self.attention, f"{dense}_dense")
            names[f"{prefix}/attention/{dense}/kernel"] = layer.kernel
            names[f"{prefix}/attention/{dense}/bias"] = layer.bias
        if isinstance(self.mlp, MoeLayer):
            for part in (self.mlp.router, self.mlp.experts):
                for variable in part.weights:
                    names[f"{prefix}/mlp/{part.name}/{variable.name}"] = (
                        variable
                    )
        else:
            for variable in self.mlp.weights:
                names[f"{prefix}/mlp/{variable.name}"] = variable
        return names

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_heads": self.num_heads,
                "hidden_dim": self.hidden_dim,
                "activation": self.activation,
                "layer_norm_epsilon": self.layer_norm_epsilon,
                "dropout_rate": self.dropout_rate,
                "moe": self.moe,
            }
        )
        return config


def _moe_blocks(encoder_moe_blocks, num_layers):
    """Normalises {index (int or str): MoeLayer kwargs} to int keys."""
    if encoder_moe_blocks is None:
        return {}
    if not isinstance(encoder_moe_blocks, dict):
        raise ValueError(
            "encoder_moe_blocks must be None or a dict {block index: "
            f"MoeLayer kwargs}}; received {encoder_moe_blocks!r}"
        )
    blocks = {}
    for key, kwargs in encoder_moe_blocks.items():
        try:
            index = int(key)
        except (TypeError, ValueError):
            index = None
        if index is None or not 0 <= index < num_layers:
            raise ValueError(
                f"encoder_moe_blocks keys must be block indices in "
                f"[0, {num_layers}); received {key!r}"
            )
        if not isinstance(kwargs, dict):
            raise ValueError(
                f"encoder_moe_blocks[{key!r}] must be a dict of MoeLayer "
                f"kwargs; received {kwargs!r}"
            )
        blocks[index] = dict(kwargs)
    return dict(sorted(blocks.items()))


@keras.saving.register_keras_serializable(package="keras_moe")
class ViT(PresetMixin, keras.Model):
    """Vision Transformer classifier whose MLP blocks can be MoE layers.

    Call: images <float>[B, H_img, W_img, C] (already normalised, channels
    last, of the size the model was built for) -> logits <float32>[B,
    num_classes]; with `num_classes=0` there is no head and the call returns
    the pooled features <float32>[B, D]. `encode(images)` returns the final
    LayerNorm's output <[B, T, D]> (class token first).

    E^3 (`ensemble_size=M > 1`, see the module docstring): `call` returns
    per-member logits <float32>[M*B, num_classes] when training and the log
    of the averaged member probabilities <float32>[B, num_classes]
    otherwise (so `predict` gives log-probabilities of the ensemble: apply
    `softmax` or `exp` for probabilities); `encode` returns <[M*B, T, D]>;
    a headless E^3 model returns per-member features <float32>[M*B, D].
    Fit it with a `from_logits=True` cross-entropy: targets are repeated
    per member in training steps, so the loss is the mean of the members'
    cross-entropies and training metrics are means over members, while
    `evaluate` scores the ensemble's prediction. In a custom loop, tile the
    labels with `keras_moe.layers.ensemble.EnsembleTile(M)`.

    Weights are listed under the canonical names of MODELS.md by
    `canonical_variables()`; checkpoint readers in `keras_moe.checkpoints.vit`
    fill them from Hugging Face, TF Model Garden and keras-hub checkpoints.
    `ViT.from_preset(preset)` loads a model, weights included (a directory
    `save_to_preset` wrote, a keras-hub or Hugging Face directory, a hub
    handle); `ViT.from_architecture(name)` builds a randomly initialised one.

    Args:
        image_size: int or (height, width) of the input images.
        patch_size: P; must divide the image size.
        num_channels: C.
        model_dim: D.
        num_heads: h; must divide D.
        hidden_dim: H of the MLPs.
        num_layers: number of encoder blocks.
        num_classes: head outputs; 0 for no head.
        pooling: "token" (class token) or "gap" (mean of the patch tokens,
            no class token).
        layer_norm_epsilon: of every LayerNorm (1e-6 in the original ViT;
            Hugging Face's checkpoints use 1e-12).
        dropout_rate: dropout on the embeddings, the attention and MLP
            outputs and the MLP hidden activations, when training.
        activation: MLP activation: "gelu" (exact, original ViT, Hugging
            Face, keras-hub) or "gelu_tanh" (TF Model Garden).
        encoder_moe_blocks: None or {block index: MoeLayer kwargs}; those
            blocks get a `MoeLayer` as `mlp`.
        ensemble_size: M of E^3; 1 (default) is a plain (V-MoE) model. M > 1
            needs at least one MoE block, with num_experts a multiple of M
            (and K at most E/M): those blocks get an `EnsembleMoeLayer`. A
            block's kwargs may name `ensemble_size` only with this value.
        **kwargs: passed to `keras.Model` (name, dtype).

    Example:

    >>> model = ViT.from_architecture("vit_tiny")
    >>> tuple(model(np.zeros((2, 32, 32, 3), "float32")).shape)
    (2, 10)
    """

    # The stack whose MLP blocks can be MoE blocks (see `MoeStack`).
    MOE_STACKS = (
        MoeStack(
            "encoder",
            "encoder_moe_blocks",
            "num_layers",
            blocks="blocks",
            modality=VISION,
        ),
    )

    def __init__(
        self,
        image_size,
        patch_size,
        model_dim,
        num_heads,
        hidden_dim,
        num_layers,
        num_classes,
        num_channels=3,
        pooling="token",
        layer_norm_epsilon=1e-6,
        dropout_rate=0.0,
        activation="gelu",
        encoder_moe_blocks=None,
        ensemble_size=1,
        **kwargs,
    ):
        kwargs.setdefault("name", "vit")
        super().__init__(**kwargs)
        image = _pair(image_size, "image_size")
        if isinstance(patch_size, bool) or not isinstance(patch_size, int):
            raise ValueError(
                f"patch_size must be an int; received {patch_size!r}"
            )
        if patch_size < 1 or image[0] % patch_size or image[1] % patch_size:
            raise ValueError(
                f"patch_size={patch_size} must be >= 1 and divide "
                f"image_size={image_size}"
            )
        for name, value, low in (
            ("num_channels", num_channels, 1),
            ("model_dim", model_dim, 1),
            ("num_heads", num_heads, 1),
            ("hidden_dim", hidden_dim, 1),
            ("num_layers", num_layers, 1),
            ("num_classes", num_classes, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an int; received {value!r}")
            if value < low:
                raise ValueError(f"{name} must be >= {low}; received {value}")
        if model_dim % num_heads:
            raise ValueError(
                f"model_dim={model_dim} must be divisible by "
                f"num_heads={num_heads}"
            )
        if pooling not in POOLINGS:
            raise ValueError(
                f"pooling must be one of {POOLINGS}; received {pooling!r}"
            )
        get_activation(activation)
        self.image_size = (
            image_size if isinstance(image_size, int) else list(image)
        )
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.model_dim = model_dim
        self.num_heads = num_heads
        self.hidden_dim = hidden_dim
        self.num_layers = num_layers
        self.num_classes = num_classes
        self.pooling = pooling
        self.layer_norm_epsilon = float(layer_norm_epsilon)
        self.dropout_rate = float(dropout_rate)
        self.activation = activation
        self.encoder_moe_blocks = _moe_blocks(encoder_moe_blocks, num_layers)
        check_ensemble_size(ensemble_size)
        for index, block_kwargs in self.encoder_moe_blocks.items():
            given = block_kwargs.get("ensemble_size", ensemble_size)
            if given != ensemble_size:
                raise ValueError(
                    f"encoder_moe_blocks[{index}] has ensemble_size={given!r} "
                    f"but the ViT has ensemble_size={ensemble_size}: set it "
                    "once, on the ViT"
                )
        if ensemble_size > 1 and not self.encoder_moe_blocks:
            raise ValueError(
                f"ensemble_size={ensemble_size} needs at least one MoE block "
                "(the batch is tiled before the first one); "
                "encoder_moe_blocks is empty"
            )
        self.ensemble_size = ensemble_size
        self.image_hw = image
        self.grid_size = (image[0] // patch_size, image[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.num_tokens = self.num_patches + (pooling == "token")

        self.patch_embedding = keras.layers.Conv2D(
            model_dim,
            kernel_size=patch_size,
            strides=patch_size,
            padding="valid",
            data_format="channels_last",
            kernel_initializer="lecun_normal",
            dtype=self.dtype_policy,
            name="patch_embedding",
        )
        self.embedding_dropout = keras.layers.Dropout(
            self.dropout_rate, dtype=self.dtype_policy, name="dropout"
        )
        self.blocks = [
            ViTBlock(
                num_heads=num_heads,
                hidden_dim=hidden_dim,
                activation=activation,
                layer_norm_epsilon=layer_norm_epsilon,
                dropout_rate=dropout_rate,
                moe=self._block_moe_kwargs(i),
                dtype=self.dtype_policy,
                name=f"block_{i}",
            )
            for i in range(num_layers)
        ]
        self.ensemble_tile = self.ensemble_average = None
        if ensemble_size > 1:
            self.ensemble_tile = EnsembleTile(
                ensemble_size, dtype=self.dtype_policy, name="ensemble_tile"
            )
            # Averages the float32 head output in float32.
            self.ensemble_average = EnsembleAverage(
                ensemble_size,
                mode="logits",
                dtype="float32",
                name="ensemble_average",
            )
        self.final_norm = keras.layers.LayerNormalization(
            epsilon=layer_norm_epsilon,
            dtype=self.dtype_policy,
            name="final_norm",
        )
        self.head = None
        if num_classes:
            # Zero-initialised, as in big_vision: a fine-tuning run starts
            # from uniform predictions.
            self.head = keras.layers.Dense(
                num_classes,
                kernel_initializer="zeros",
                dtype=self.dtype_policy,
                name="head",
            )
        self.build((None, *image, num_channels))

    def _block_moe_kwargs(self, index):
        kwargs = self.encoder_moe_blocks.get(index)
        if kwargs is not None and self.ensemble_size > 1:
            kwargs = dict(kwargs, ensemble_size=self.ensemble_size)
        return kwargs

    @property
    def first_moe_block(self):
        """Index of the first MoE block (where E^3 tiles), or None."""
        return min(self.encoder_moe_blocks, default=None)

    def build(self, input_shape):
        if self.pooling == "token":
            self.class_token = self.add_weight(
                name="class_token",
                shape=(1, 1, self.model_dim),
                initializer="zeros",
            )
        self.position_embedding = self.add_weight(
            name="position_embedding",
            shape=(1, self.num_tokens, self.model_dim),
            initializer=keras.initializers.RandomNormal(stddev=0.02),
        )
        self.patch_embedding.build((None, *self.image_hw, self.num_channels))
        tokens_shape = (None, self.num_tokens, self.model_dim)
        for block in self.blocks:
            block.build(tokens_shape)
        self.final_norm.build(tokens_shape)
        if self.head is not None:
            self.head.build((None, self.model_dim))
        self.built = True

    def _check_images(self, images):
        want = (*self.image_hw, self.num_channels)
        got = tuple(images.shape[1:])
        if len(got) != 3 or any(
            g is not None and g != w for g, w in zip(got, want)
        ):
            raise ValueError(
                f"This ViT takes images of shape [B, {want[0]}, {want[1]}, "
                f"{want[2]}]; received {tuple(images.shape)}. For another "
                "image size use ViT.with_image_size(model, new_size)."
            )

    def encode(self, images, training=False):
        """Images <[B, H_img, W_img, C]> -> final-norm tokens <[B, T, D]>
        (<[M*B, T, D]>, member-tiled, for E^3)."""
        images = ops.convert_to_tensor(images)
        self._check_images(images)
        x = self.patch_embedding(ops.cast(images, self.compute_dtype))
        # (B, gh, gw, D) -> (B, N, D)
        x = ops.reshape(x, (-1, self.num_patches, self.model_dim))
        if self.pooling == "token":
            token = ops.cast(self.class_token, x.dtype)
            token = ops.zeros_like(x[:, :1]) + token  # (B, 1, D)
            x = ops.concatenate([token, x], axis=1)
        x = x + ops.cast(self.position_embedding, x.dtype)
        x = self.embedding_dropout(x, training=training)
        for i, block in enumerate(self.blocks):
            if self.ensemble_tile is not None and i == self.first_moe_block:
                x = self.ensemble_tile(x)  # (B, T, D) -> (M*B, T, D)
            x = block(x, training=training)
        return self.final_norm(x)

    def pool(self, tokens):
        """Final-norm tokens <[B, T, D]> -> pooled features <[B, D]>."""
        if self.pooling == "token":
            return tokens[:, 0]
        return ops.mean(tokens, axis=1)

    def call(self, images, training=False):
        x = self.pool(self.encode(images, training=training))
        if self.head is None:
            return ops.cast(x, "float32")
        x = ops.cast(self.head(x), "float32")
        if self.ensemble_average is not None and not training:
            # (M*B, classes) -> (B, classes): log(mean_m softmax(z_m)).
            x = self.ensemble_average(x)
        return x

    def member_logits(self, images, training=False):
        """Images <[B, ...]> -> each member's logits <float32>[M, B, classes].

        For a plain model (M=1) this is the call's output with a leading
        axis of 1. Needs a head.
        """
        if self.head is None:
            raise ValueError("member_logits needs a head (num_classes > 0)")
        x = self.pool(self.encode(images, training=training))
        x = ops.cast(self.head(x), "float32")
        # (M*B, classes) -> (M, B, classes)
        return ops.reshape(x, (self.ensemble_size, -1, self.num_classes))

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        """Keras loss; for E^3, targets are repeated for each member."""
        if self.ensemble_size > 1 and y_pred is not None:
            y = match_member_rows(y, y_pred)
            sample_weight = match_member_rows(sample_weight, y_pred)
        return super().compute_loss(
            x=x,
            y=y,
            y_pred=y_pred,
            sample_weight=sample_weight,
            training=training,
        )

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        """Keras metrics; for E^3, targets are repeated for each member."""
        if self.ensemble_size > 1 and y_pred is not None:
            y = match_member_rows(y, y_pred)
            sample_weight = match_member_rows(sample_weight, y_pred)
        return super().compute_metrics(
            x, y, y_pred, sample_weight=sample_weight
        )

    def canonical_variables(self):
        """{canonical name: keras.Variable}, the names of MODELS.md."""
        names = {
            "patch_embedding/kernel": self.patch_embedding.kernel,
            "patch_embedding/bias": self.patch_embedding.bias,
        }
        if self.pooling == "token":
            names["class_token"] = self.class_token
        names["position_embedding"] = self.position_embedding
        for i, block in enumerate(self.blocks):
            names.update(block.canonical_variables(f"encoder/block_{i}"))
        names["encoder/final_norm/gamma"] = self.final_norm.gamma
        names["encoder/final_norm/beta"] = self.final_norm.beta
        if self.head is not None:
            names["head/kernel"] = self.head.kernel
            names["head/bias"] = self.head.bias
        return names

    @classmethod
    def from_architecture(cls, name, **overrides):
        """A new, randomly initialised ViT of architecture `name` (see
        `vit_config`), with `overrides` applied to its kwargs;
        `from_preset` loads weights."""
        config = vit_config(name)
        config.update(overrides)
        return cls(**config)

    @classmethod
    def with_image_size(cls, model, image_size):
        """A copy of `model` built for `image_size`, weights copied.

        The position embedding is resampled to the new patch grid with
        `interpolate_position_embedding` (class token kept); every other
        weight is copied unchanged. `image_size` must be a multiple of the
        patch size.
        """
        config = model.get_config()
        config["image_size"] = image_size
        new = cls.from_config(config)
        new_variables = new.canonical_variables()
        for name, variable in model.canonical_variables().items():
            value = ops.convert_to_numpy(variable)
            if name == "position_embedding":
                value = interpolate_position_embedding(
                    value,
                    new.grid_size,
                    old_grid=model.grid_size,
                    has_class_token=model.pooling == "token",
                )
            new_variables[name].assign(value)
        return new

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "image_size": self.image_size,
                "patch_size": self.patch_size,
                "num_channels": self.num_channels,
                "model_dim": self.model_dim,
                "num_heads": self.num_heads,
                "hidden_dim": self.hidden_dim,
                "num_layers": self.num_layers,
                "num_classes": self.num_classes,
                "pooling": self.pooling,
                "layer_norm_epsilon": self.layer_norm_epsilon,
                "dropout_rate": self.dropout_rate,
                "activation": self.activation,
                "encoder_moe_blocks": self.encoder_moe_blocks or None,
                "ensemble_size": self.ensemble_size,
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        return cls(**config)
