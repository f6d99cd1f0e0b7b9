"""ViT against a NumPy statement of the architecture, and its contract.

Position-embedding interpolation is checked against implementations
nobody here wrote: `tf.image.resize`, `torch.nn.functional.interpolate`
and `scipy.ndimage.zoom`.
"""

import math
import os
import sys

import keras
import numpy as np
import pytest

from keras_moe.layers.mlp import Mlp
from keras_moe.layers.moe import MoeLayer
from keras_moe.models.vit import ARCHITECTURES
from keras_moe.models.vit import ViT
from keras_moe.models.vit import interpolate_position_embedding
from keras_moe.models.vit import vit_config

TINY = vit_config("vit_tiny")  # 32x32 images, P=8, D=32, 4 heads, F=64, L=2


def _randomize(model, seed=0):
    """Random weights everywhere (LayerNorm scales around 1)."""
    rng = np.random.default_rng(seed)
    for name, variable in model.canonical_variables().items():
        value = rng.normal(scale=0.3, size=variable.shape)
        if name.endswith("gamma"):
            value += 1.0
        variable.assign(value.astype("float32"))
    return model


def _images(batch=2, size=32, seed=1):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(batch, size, size, 3)).astype("float32")


def _np_layer_norm(x, gamma, beta, epsilon):
    mean = x.mean(-1, keepdims=True)
    var = x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + epsilon) * gamma + beta


def _np_gelu(x):
    erf = np.vectorize(math.erf)
    return 0.5 * x * (1 + erf(x / math.sqrt(2)))


def _np_vit(w, images, config):
    """ViT forward in NumPy (float64) from canonical weights.

    Returns (final-norm tokens <[B, T, D]>, logits <[B, K]>).
    """
    w = {k: np.asarray(v, np.float64) for k, v in w.items()}
    p, eps = config["patch_size"], config.get("layer_norm_epsilon", 1e-6)
    heads = config["num_heads"]
    b, h, wd, c = images.shape
    dim = w["patch_embedding/bias"].shape[0]
    # Non-overlapping patches flattened in (row, column, channel) order:
    # (B, gh, P, gw, P, C) -> (B, gh, gw, P, P, C) -> (B, N, P*P*C)
    patches = images.reshape(b, h // p, p, wd // p, p, c)
    patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(b, -1, p * p * c)
    x = patches @ w["patch_embedding/kernel"].reshape(-1, dim)
    x = x + w["patch_embedding/bias"]
    if "class_token" in w:
        token = np.broadcast_to(w["class_token"], (b, 1, dim))
        x = np.concatenate([token, x], axis=1)
    x = x + w["position_embedding"]
    for i in range(config["num_layers"]):
        pre = f"encoder/block_{i}/"
        y = _np_layer_norm(
            x,
            w[pre + "attention_norm/gamma"],
            w[pre + "attention_norm/beta"],
            eps,
        )

        def project(name, y=y, pre=pre):
            out = y @ w[pre + f"attention/{name}/kernel"]
            out = out + w[pre + f"attention/{name}/bias"]
            return out.reshape(b, -1, heads, dim // heads)

        q, k, v = project("query"), project("key"), project("value")
        logits = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(dim // heads)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs = probs / probs.sum(-1, keepdims=True)
        att = np.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, -1, dim)
        att = att @ w[pre + "attention/output/kernel"]
        x = x + att + w[pre + "attention/output/bias"]
        y = _np_layer_norm(
            x, w[pre + "mlp_norm/gamma"], w[pre + "mlp_norm/beta"], eps
        )
        y = _np_gelu(y @ w[pre + "mlp/wi"] + w[pre + "mlp/bi"])
        x = x + y @ w[pre + "mlp/wo"] + w[pre + "mlp/bo"]
    x = _np_layer_norm(
        x, w["encoder/final_norm/gamma"], w["encoder/final_norm/beta"], eps
    )
    pooled = x[:, 0] if "class_token" in w else x.mean(1)
    return x, pooled @ w["head/kernel"] + w["head/bias"]


def _numpy_weights(model):
    return {
        name: keras.ops.convert_to_numpy(variable)
        for name, variable in model.canonical_variables().items()
    }


@pytest.mark.parametrize(
    "name, dims",
    [
        ("vit_ti16", (16, 192, 3, 768, 12)),
        ("vit_s16", (16, 384, 6, 1536, 12)),
        ("vit_b16", (16, 768, 12, 3072, 12)),
        ("vit_l16", (16, 1024, 16, 4096, 24)),
        ("vit_ti32", (32, 192, 3, 768, 12)),
        ("vit_s32", (32, 384, 6, 1536, 12)),
        ("vit_b32", (32, 768, 12, 3072, 12)),
        ("vit_l32", (32, 1024, 16, 4096, 24)),
    ],
)
def test_architectures_match_the_vit_paper(name, dims):
    config = vit_config(name)
    keys = ("patch_size", "model_dim", "num_heads", "hidden_dim", "num_layers")
    assert tuple(config[k] for k in keys) == dims
    assert config["image_size"] == 224 and config["num_classes"] == 1000


def test_architecture_names_and_overrides():
    assert set(ARCHITECTURES) == {
        "vit_ti16",
        "vit_s16",
        "vit_b16",
        "vit_l16",
        "vit_ti32",
        "vit_s32",
        "vit_b32",
        "vit_l32",
        "vit_tiny",
    }
    with pytest.raises(ValueError, match="Unknown ViT architecture 'vit_h14'"):
        vit_config("vit_h14")
    config = vit_config("vit_tiny")
    config["num_layers"] = 99
    assert vit_config("vit_tiny")["num_layers"] == 2  # a copy each time
    model = ViT.from_architecture("vit_tiny", num_classes=3, pooling="gap")
    assert model.num_classes == 3 and model.pooling == "gap"


@pytest.mark.parametrize("pooling", ["token", "gap"])
def test_matches_numpy(pooling):
    config = dict(TINY, pooling=pooling)
    model = _randomize(ViT(**config))
    images = _images()
    tokens, logits = _np_vit(_numpy_weights(model), images.astype("f8"), config)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(model.encode(images)), tokens, atol=2e-5
    )
    out = model(images)
    assert keras.backend.standardize_dtype(out.dtype) == "float32"
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(out), logits, atol=2e-5
    )


def _expected_names(num_layers, pooling, num_classes=10):
    names = ["patch_embedding/kernel", "patch_embedding/bias"]
    names += ["class_token"] if pooling == "token" else []
    names += ["position_embedding"]
    for i in range(num_layers):
        pre = f"encoder/block_{i}/"
        names += [
            pre + f"{n}/{g}"
            for n in ("attention_norm", "mlp_norm")
            for g in ("gamma", "beta")
        ]
        names += [
            pre + f"attention/{n}/{k}"
            for n in ("query", "key", "value", "output")
            for k in ("kernel", "bias")
        ]
        names += [pre + f"mlp/{n}" for n in ("wi", "bi", "wo", "bo")]
    names += ["encoder/final_norm/gamma", "encoder/final_norm/beta"]
    names += ["head/kernel", "head/bias"] if num_classes else []
    return sorted(names)


@pytest.mark.parametrize("pooling", ["token", "gap"])
def test_canonical_variables(pooling):
    model = ViT(**dict(TINY, pooling=pooling))
    variables = model.canonical_variables()
    assert sorted(variables) == _expected_names(2, pooling)
    shapes = {name: tuple(v.shape) for name, v in variables.items()}
    tokens = 16 + (pooling == "token")
    assert shapes["patch_embedding/kernel"] == (8, 8, 3, 32)
    assert shapes["position_embedding"] == (1, tokens, 32)
    assert shapes["encoder/block_1/attention/output/kernel"] == (32, 32)
    assert shapes["encoder/block_1/mlp/wi"] == (32, 64)
    assert shapes["encoder/block_1/mlp/wo"] == (64, 32)
    assert shapes["head/kernel"] == (32, 10)
    if pooling == "token":
        assert shapes["class_token"] == (1, 1, 32)
    # Every weight of the model has exactly one canonical name.
    assert {id(v) for v in variables.values()} == {id(v) for v in model.weights}
    assert len(variables) == len(model.weights)
    assert all(isinstance(b.mlp, Mlp) for b in model.blocks)


def test_headless_model_returns_pooled_features():
    model = _randomize(ViT(**dict(TINY, num_classes=0)))
    assert sorted(model.canonical_variables()) == _expected_names(2, "token", 0)
    images = _images()
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(model(images)),
        keras.ops.convert_to_numpy(model.encode(images))[:, 0],
        atol=1e-6,
    )


def test_keras_round_trip(tmp_path):
    model = _randomize(ViT(**dict(TINY, dropout_rate=0.1)))
    config = model.get_config()
    assert ViT.from_config(config).get_config() == config
    path = os.path.join(str(tmp_path), "vit.keras")
    model.save(path)
    restored = keras.models.load_model(path)
    assert isinstance(restored, ViT)
    images = _images()
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(model(images)),
        keras.ops.convert_to_numpy(restored(images)),
    )


def test_fit_step_and_mixed_precision():
    # Random weights: with the zero-initialised head no gradient would reach
    # the encoder on the first step.
    model = _randomize(ViT(**TINY))
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    before = _numpy_weights(model)
    model.fit(_images(4), np.arange(4), batch_size=4, verbose=0)
    after = _numpy_weights(model)
    assert not np.allclose(before["head/kernel"], after["head/kernel"])
    assert not np.allclose(
        before["encoder/block_0/mlp/wi"], after["encoder/block_0/mlp/wi"]
    )
    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        mixed = _randomize(ViT(**TINY))
        out = mixed(_images())
    finally:
        keras.config.set_dtype_policy(policy)
    assert keras.backend.standardize_dtype(out.dtype) == "float32"
    assert all(w.dtype == "float32" for w in mixed.weights)
    assert np.all(np.isfinite(keras.ops.convert_to_numpy(out)))


def test_moe_blocks_build_run_and_save(tmp_path):
    # JSON turns the keys into strings: both spellings are accepted.
    moe = {"1": {"num_experts": 4, "num_selected_experts": 2}}
    model = ViT(**dict(TINY, encoder_moe_blocks=moe))
    assert isinstance(model.blocks[0].mlp, Mlp)
    layer = model.blocks[1].mlp
    assert isinstance(layer, MoeLayer)
    # The MoE layer inherits the dense MLP's H, activation and biases.
    assert (layer.hidden_dim, layer.activation, layer.use_bias) == (
        64,
        "gelu",
        True,
    )
    assert model.get_config()["encoder_moe_blocks"] == {
        1: {"num_experts": 4, "num_selected_experts": 2}
    }
    shapes = {k: tuple(v.shape) for k, v in model.canonical_variables().items()}
    assert shapes["encoder/block_1/mlp/router/kernel"] == (32, 4)
    assert shapes["encoder/block_1/mlp/experts/wi"] == (4, 32, 64)
    assert shapes["encoder/block_1/mlp/experts/wo"] == (4, 64, 32)
    assert "encoder/block_1/mlp/wi" not in shapes
    assert len(shapes) == len(model.weights)
    images = _images()
    out = keras.ops.convert_to_numpy(model(images))
    assert out.shape == (2, 10) and np.all(np.isfinite(out))
    assert len(model.losses) > 0  # router z-loss and load-balancing loss
    path = os.path.join(str(tmp_path), "moe_vit.keras")
    model.save(path)
    restored = keras.models.load_model(path)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(restored(images)), out, atol=1e-6
    )


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"pooling": "mean"}, "pooling must be one of"),
        ({"patch_size": 5}, "must be >= 1 and divide"),
        ({"model_dim": 30}, "divisible by num_heads"),
        ({"num_classes": -1}, "num_classes must be >= 0"),
        ({"activation": "tanh"}, "activation must be one of"),
        ({"image_size": (32, 0)}, "image_size must be"),
        ({"encoder_moe_blocks": {2: {"num_experts": 2}}}, r"\[0, 2\)"),
        ({"encoder_moe_blocks": {"x": {}}}, "block indices"),
        ({"encoder_moe_blocks": [1]}, "must be None or a dict"),
        ({"encoder_moe_blocks": {0: {"name": "x"}}}, "other than name"),
    ],
)
def test_rejects_bad_kwargs(overrides, message):
    with pytest.raises(ValueError, match=message):
        ViT(**dict(TINY, **overrides))


def test_rejects_images_of_another_size():
    model = ViT(**TINY)
    with pytest.raises(ValueError, match="with_image_size"):
        model(_images(size=48))


# Position-embedding interpolation.


def _embedding(grid, with_token, dim=5, seed=0):
    rng = np.random.default_rng(seed)
    length = grid[0] * grid[1] + with_token
    return rng.normal(size=(1, length, dim)).astype("float32")


@pytest.mark.parametrize("with_token", [False, True])
def test_interpolation_to_the_same_grid_is_the_identity(with_token):
    array = _embedding((4, 4), with_token)
    np.testing.assert_array_equal(
        interpolate_position_embedding(array, 4), array
    )


GRIDS = [((4, 4), (6, 6)), ((4, 4), (3, 3)), ((4, 4), (2, 7)), ((3, 5), (7, 4))]


@pytest.mark.parametrize("old, new", GRIDS)
@pytest.mark.parametrize("with_token", [False, True])
def test_interpolation_matches_tf_image_resize(old, new, with_token):
    import tensorflow as tf

    array = _embedding(old, with_token)
    out = interpolate_position_embedding(
        array, new, old_grid=old, has_class_token=with_token
    )
    grid = array[:, int(with_token) :].reshape(1, *old, -1)
    want = tf.image.resize(grid, new, method="bilinear").numpy()
    assert out.shape == (1, new[0] * new[1] + with_token, 5)
    np.testing.assert_allclose(
        out[:, int(with_token) :], want.reshape(1, -1, 5), atol=1e-6
    )
    if with_token:  # the class-token embedding is kept as it is
        np.testing.assert_array_equal(out[:, :1], array[:, :1])


@pytest.mark.parametrize("old, new", GRIDS)
def test_interpolation_matches_torch_interpolate(old, new):
    torch = pytest.importorskip("torch")
    array = _embedding(old, True)
    out = interpolate_position_embedding(array, new, old_grid=old)
    # As HF's interpolate_pos_encoding, with bilinear instead of bicubic.
    grid = torch.tensor(array[:, 1:]).reshape(1, *old, -1).permute(0, 3, 1, 2)
    want = torch.nn.functional.interpolate(
        grid, size=new, mode="bilinear", align_corners=False
    )
    want = want.permute(0, 2, 3, 1).reshape(1, -1, 5).numpy()
    np.testing.assert_allclose(out[:, 1:], want, atol=1e-6)


@pytest.mark.parametrize("old, new", GRIDS)
def test_interpolation_matches_scipy_zoom(old, new):
    ndimage = pytest.importorskip("scipy.ndimage")
    array = _embedding(old, False)
    out = interpolate_position_embedding(array, new, old_grid=old)
    grid = array[0].reshape(*old, -1).astype("f8")
    # grid_mode=True: pixel areas, not centres, span the image (half-pixel
    # convention); mode="nearest" clamps at the edges.
    want = ndimage.zoom(
        grid,
        (new[0] / old[0], new[1] / old[1], 1),
        order=1,
        grid_mode=True,
        mode="nearest",
    )
    np.testing.assert_allclose(out[0], want.reshape(-1, 5), atol=1e-5)


def test_interpolation_rejects_what_it_cannot_read():
    with pytest.raises(ValueError, match=r"shape \[1, T, D\]"):
        interpolate_position_embedding(np.zeros((17, 4)), 5)
    with pytest.raises(ValueError, match="Cannot infer the patch grid"):
        interpolate_position_embedding(np.zeros((1, 15, 4)), 5)
    with pytest.raises(ValueError, match="does not fit grid"):
        interpolate_position_embedding(np.zeros((1, 17, 4)), 5, old_grid=3)
    with pytest.raises(ValueError, match="new_grid"):
        interpolate_position_embedding(np.zeros((1, 17, 4)), 0)


@pytest.mark.parametrize("pooling", ["token", "gap"])
def test_with_image_size(pooling):
    model = _randomize(ViT(**dict(TINY, pooling=pooling)))
    bigger = ViT.with_image_size(model, 48)
    assert bigger.image_size == 48 and bigger.grid_size == (6, 6)
    old, new = _numpy_weights(model), _numpy_weights(bigger)
    assert sorted(old) == sorted(new)
    for name in old:
        if name != "position_embedding":
            np.testing.assert_array_equal(old[name], new[name])
    np.testing.assert_allclose(
        new["position_embedding"],
        interpolate_position_embedding(old["position_embedding"], 6),
        atol=1e-6,
    )
    # The new model is the same function at the new size.
    images = _images(size=48)
    _, logits = _np_vit(new, images.astype("f8"), bigger.get_config())
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(bigger(images)), logits, atol=2e-5
    )
    # At the same size nothing changes.
    same = ViT.with_image_size(model, 32)
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(same(_images())),
        keras.ops.convert_to_numpy(model(_images())),
    )
    with pytest.raises(ValueError, match="divide"):
        ViT.with_image_size(model, 50)


def _doubling(size):
    """Bilinear 2x upsampling of `size` points, half-pixel centres, edges
    clamped, as a <[2*size, size]> matrix: output i samples the input at
    i / 2 - 1/4."""
    matrix = np.zeros((2 * size, size))
    for i in range(2 * size):
        x = min(max(i / 2 - 0.25, 0.0), size - 1)
        low = int(np.floor(x))
        high = min(low + 1, size - 1)
        matrix[i, low] += 1 - (x - low)
        matrix[i, high] += x - low
    return matrix


def test_with_image_size_rectangular_doubling():
    """The vision-language model's stage 2: a 4 x 8 ViT (patch 2, one
    channel, 2 x 4 grid) to 8 x 16 (4 x 8 grid). The patch part of the
    position embedding is R @ grid @ C^T per channel, with the
    hand-written doubling matrices; the class token's is kept; the model
    at the new size matches the NumPy forward."""
    np.testing.assert_allclose(
        _doubling(2), [[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]]
    )
    config = dict(
        TINY, image_size=[4, 8], patch_size=2, num_channels=1, num_classes=5
    )
    model = _randomize(ViT(**config), seed=3)
    bigger = ViT.with_image_size(model, [8, 16])
    assert bigger.grid_size == (4, 8) and bigger.num_patches == 32
    old = _numpy_weights(model)["position_embedding"][0]  # (1 + 8, D)
    grid = old[1:].reshape(2, 4, -1)
    expected = np.einsum("ij,jkd,lk->ild", _doubling(2), grid, _doubling(4))
    new = _numpy_weights(bigger)["position_embedding"][0]
    np.testing.assert_allclose(new[0], old[0], atol=1e-6)
    np.testing.assert_allclose(new[1:], expected.reshape(32, -1), atol=1e-5)
    images = np.random.default_rng(4).normal(size=(2, 8, 16, 1))
    tokens, logits = _np_vit(
        _numpy_weights(bigger), images, bigger.get_config()
    )
    images = images.astype("float32")
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(bigger.encode(images)), tokens, atol=2e-5
    )
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(bigger(images)), logits, atol=2e-5
    )


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))
