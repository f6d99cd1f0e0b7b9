"""VisionLanguageModel: layout against NumPy, masks, generation, weights
copied from dense checkpoints, upcycling, saving, bad input."""

import json
import sys

import keras
import numpy as np
import pytest

import keras_moe
from keras_moe.checkpoints import read_vlm_checkpoints
from keras_moe.checkpoints.writers import write_mtf_checkpoint
from keras_moe.layers.moe import MoeLayer
from keras_moe.models.t5 import EOS_ID
from keras_moe.models.t5 import T5
from keras_moe.models.t5 import t5_config
from keras_moe.models.vit import ViT
from keras_moe.models.vit import interpolate_position_embedding
from keras_moe.models.vlm import VisionLanguageModel
from keras_moe.models.vlm import pack_tokens

IMAGE_TOKEN = 100
VISION = dict(
    image_size=16,
    patch_size=8,
    num_channels=3,
    model_dim=24,
    num_heads=4,
    hidden_dim=48,
    num_layers=2,
)
_LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _np(x):
    return keras.ops.convert_to_numpy(x)


def _randomize(model, seed, scale=0.3):
    """Noise on every weight: unit norm scales, zero biases and identical
    rows make weak tests."""
    rng = np.random.default_rng(seed)
    for weight in model.weights:
        noise = rng.normal(size=weight.shape).astype(weight.dtype) * scale
        weight.assign(_np(weight) + noise)
    return model


def _model(seed=0, **kwargs):
    keras.utils.set_random_seed(seed)
    model = VisionLanguageModel(
        VISION, t5_config("t5_v1_1_tiny"), max_prompt_length=8, **kwargs
    )
    return _randomize(model, seed)


@pytest.fixture(scope="module")
def prefix_model():
    return _model()


@pytest.fixture(scope="module")
def placeholder_model(prefix_model):
    """The same weights, with the placeholder layout."""
    config = prefix_model.get_config()
    config["image_token_id"] = IMAGE_TOKEN
    model = VisionLanguageModel.from_config(config)
    model.set_weights(prefix_model.get_weights())
    return model


def _images(batch, count, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(size=(batch, count, 16, 16, 3)).astype("float32")


def _reference_pack(text, text_mask, is_image, visual, image_mask):
    """The layout, one token at a time."""
    batch, length, dim = text.shape
    count, tokens = visual.shape[1:3]
    size = length + count * (tokens - 1)
    packed = np.zeros((batch, size, dim), "float32")
    mask = np.zeros((batch, size), bool)
    for b in range(batch):
        rows, image = [], 0
        for t in range(length):
            if is_image[b, t]:
                if image < count and image_mask[b, image]:
                    rows.extend(visual[b, image])
                image += 1
            elif text_mask[b, t]:
                rows.append(text[b, t])
        packed[b, : len(rows)] = rows
        mask[b, : len(rows)] = True
    return packed, mask


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pack_tokens_matches_numpy(seed):
    """Random placeholders (more than the images, some of masked images),
    padding anywhere."""
    rng = np.random.default_rng(seed)
    batch, length, count, tokens, dim = 5, 9, 3, 4, 6
    text = rng.normal(size=(batch, length, dim)).astype("float32")
    visual = rng.normal(size=(batch, count, tokens, dim)).astype("float32")
    is_image = rng.uniform(size=(batch, length)) < 0.4
    text_mask = rng.uniform(size=(batch, length)) < 0.8
    image_mask = rng.uniform(size=(batch, count)) < 0.7
    assert (is_image.sum(1) > count).any()  # extra placeholders happen
    packed, mask = pack_tokens(text, text_mask, is_image, visual, image_mask)
    expected, expected_mask = _reference_pack(
        text, text_mask, is_image, visual, image_mask
    )
    np.testing.assert_array_equal(_np(mask), expected_mask)
    np.testing.assert_array_equal(_np(packed), expected)


def _embedded(model, images, ids):
    """Visual tokens and prompt embeddings, computed by parts."""
    visual = _np(model.visual_tokens(images))
    table = _np(model.language_model.shared.embeddings)
    return visual, table[ids]


def test_prefix_layout(prefix_model):
    images = _images(3, 2)
    image_mask = np.array([[True, True], [False, True], [False, False]])
    ids = np.array([[5, 6, 7, 1], [8, 1, 0, 0], [9, 10, 1, 0]], "int32")
    packed, mask = prefix_model.embed_inputs(images, ids, image_mask)
    visual, text = _embedded(prefix_model, images, ids)
    n = prefix_model.num_image_tokens
    assert n == 4 and visual.shape == (3, 2, n, 32)
    assert packed.shape == (3, 2 * n + 4, 32)
    expected = np.zeros(packed.shape, "float32")
    # Example 0: both images, then the prompt.
    expected[0, :n], expected[0, n : 2 * n] = visual[0, 0], visual[0, 1]
    expected[0, 2 * n :] = text[0]
    # Example 1: only image 1, then two real tokens.
    expected[1, :n], expected[1, n : n + 2] = visual[1, 1], text[1, :2]
    # Example 2: text only.
    expected[2, :3] = text[2, :3]
    np.testing.assert_array_equal(_np(mask).sum(1), [2 * n + 4, n + 2, 3])
    np.testing.assert_allclose(_np(packed), expected, atol=1e-6)


def test_placeholder_layout_interleaves(placeholder_model):
    images = _images(2, 2, seed=1)
    ph = IMAGE_TOKEN
    ids = np.array([[5, ph, 6, ph, 1], [ph, 7, 1, 0, 0]], "int32")
    image_mask = np.array([[True, True], [True, False]])
    packed, mask = placeholder_model.embed_inputs(images, ids, image_mask)
    visual, text = _embedded(placeholder_model, images, ids)
    n = placeholder_model.num_image_tokens
    expected = np.zeros(packed.shape, "float32")
    expected[0] = np.concatenate(
        [text[0, :1], visual[0, 0], text[0, 2:3], visual[0, 1], text[0, 4:]]
    )
    expected[1, : n + 2] = np.concatenate([visual[1, 0], text[1, 1:3]])
    assert packed.shape[1] == 5 + 2 * (n - 1)
    np.testing.assert_array_equal(_np(mask).sum(1), [3 + 2 * n, n + 2])
    np.testing.assert_allclose(_np(packed), expected, atol=1e-6)


def test_three_images_land_where_the_placeholders_say(placeholder_model):
    """Hand-worked positions (N = 4 tokens per image). Example 0 is the
    experiment's convention, three placeholders then text; example 1
    interleaves two images with text and leaves slot 2 unused:

        example 0: ids [ph, ph, ph, 5, 6, 1]
            positions 0-3 image 0, 4-7 image 1, 8-11 image 2,
            12 token 5, 13 token 6, 14 EOS; 15-17 padding
        example 1: ids [7, ph, 8, ph, 1, 0]
            position 0 token 7, 1-4 image 0, 5 token 8, 6-9 image 1,
            10 EOS; 11-17 padding
    """
    ph = IMAGE_TOKEN
    images = _images(2, 3, seed=4)
    ids = np.array([[ph, ph, ph, 5, 6, 1], [7, ph, 8, ph, 1, 0]], "int32")
    image_mask = np.array([[True, True, True], [True, True, False]])
    packed, mask = placeholder_model.embed_inputs(images, ids, image_mask)
    packed, mask = _np(packed), _np(mask)
    visual, text = _embedded(placeholder_model, images, ids)
    assert placeholder_model.num_image_tokens == 4
    # S = T + M * (N - 1) = 6 + 3 * 3
    assert packed.shape == (2, 15, 32) and mask.shape == (2, 15)
    np.testing.assert_array_equal(mask[0], [True] * 15)
    np.testing.assert_array_equal(mask[1], [True] * 11 + [False] * 4)
    for image in range(3):
        np.testing.assert_allclose(
            packed[0, 4 * image : 4 * image + 4], visual[0, image], atol=1e-6
        )
    np.testing.assert_allclose(packed[0, 12:15], text[0, 3:6], atol=1e-6)
    np.testing.assert_allclose(packed[1, 0], text[1, 0], atol=1e-6)
    np.testing.assert_allclose(packed[1, 1:5], visual[1, 0], atol=1e-6)
    np.testing.assert_allclose(packed[1, 5], text[1, 2], atol=1e-6)
    np.testing.assert_allclose(packed[1, 6:10], visual[1, 1], atol=1e-6)
    np.testing.assert_allclose(packed[1, 10], text[1, 4], atol=1e-6)
    assert not packed[1, 11:].any()
    # The images are distinct, so each block is the image it should be.
    assert not np.allclose(visual[0, 0], visual[0, 1])


def test_with_image_size_is_the_vit_at_the_new_size(placeholder_model):
    """Stage 2: the ViT is `ViT.with_image_size` of the old one (position
    embedding interpolated as `interpolate_position_embedding` does),
    the projection and the T5 are unchanged, and freeze_vision is set."""
    model = VisionLanguageModel.with_image_size(
        placeholder_model, [32, 16], freeze_vision=True
    )
    assert model.image_shape == (32, 16, 3) and model.num_image_tokens == 8
    assert model.freeze_vision and not model.vision_encoder.trainable
    assert model.image_token_id == IMAGE_TOKEN
    vit = ViT.with_image_size(placeholder_model.vision_encoder, [32, 16])
    old = placeholder_model.vision_encoder.canonical_variables()
    np.testing.assert_allclose(
        _np(model.vision_encoder.position_embedding),
        interpolate_position_embedding(
            _np(old["position_embedding"]), (4, 2), old_grid=(2, 2)
        ),
        atol=1e-6,
    )
    for name, variable in model.vision_encoder.canonical_variables().items():
        if name != "position_embedding":
            np.testing.assert_array_equal(_np(variable), _np(old[name]))
    images = np.random.default_rng(3).uniform(size=(2, 2, 32, 16, 3))
    images = images.astype("float32")
    tokens = _np(vit.encode(images.reshape(4, 32, 16, 3)))[:, 1:]
    kernel = _np(placeholder_model.projection.kernel)
    bias = _np(placeholder_model.projection.bias)
    np.testing.assert_allclose(
        _np(model.visual_tokens(images)),
        (tokens @ kernel + bias).reshape(2, 2, 8, 32),
        atol=1e-5,
    )
    old_text = placeholder_model.language_model.canonical_variables()
    for name, variable in model.language_model.canonical_variables().items():
        np.testing.assert_array_equal(_np(variable), _np(old_text[name]))
    # At the same size the model is the same function.
    same = VisionLanguageModel.with_image_size(placeholder_model, 16)
    images = _images(2, 1)
    ids = np.array([[IMAGE_TOKEN, 5, 1], [IMAGE_TOKEN, 6, 1]], "int32")
    inputs = _inputs(images, ids, [[0, 3], [0, 4]])
    np.testing.assert_array_equal(
        _np(same(inputs)), _np(placeholder_model(inputs))
    )
    assert not same.freeze_vision
    with pytest.raises(ValueError, match="must be a VisionLanguageModel"):
        VisionLanguageModel.with_image_size(vit, 32)
    with pytest.raises(ValueError, match="divide"):
        VisionLanguageModel.with_image_size(placeholder_model, 20)


def _inputs(images, ids, decoder_ids, image_mask=None):
    inputs = {
        "images": images,
        "prompt_token_ids": np.asarray(ids, "int32"),
        "decoder_token_ids": np.asarray(decoder_ids, "int32"),
    }
    if image_mask is not None:
        inputs["image_mask"] = np.asarray(image_mask)
    return inputs


def test_text_only_example_is_the_t5_alone(prefix_model):
    ids = np.array([[5, 6, 7, 1], [8, 1, 0, 0]], "int32")
    decoder_ids = np.array([[0, 3, 4], [0, 9, 2]], "int32")
    logits = prefix_model(
        _inputs(_images(2, 1), ids, decoder_ids, np.zeros((2, 1), bool))
    )
    reference = prefix_model.language_model(
        {"encoder_token_ids": ids, "decoder_token_ids": decoder_ids}
    )
    np.testing.assert_allclose(_np(logits), _np(reference), atol=2e-5)


@pytest.mark.parametrize("layout", ["prefix", "placeholder"])
def test_padding_and_masked_images_change_nothing(
    layout, prefix_model, placeholder_model
):
    """One example alone, and padded in a batch beside a masked junk image
    and longer prompts: the same logits."""
    model = prefix_model if layout == "prefix" else placeholder_model
    lead = [IMAGE_TOKEN] if layout == "placeholder" else []
    images = _images(2, 2, seed=3)
    decoder_ids = np.array([[0, 7, 8, 9]] * 2, "int32")
    alone = model(_inputs(images[:1, :1], [lead + [5, 6, 1]], decoder_ids[:1]))
    ids = np.array([lead + [5, 6, 1, 0, 0], lead + [9, 4, 11, 12, 1]])
    batch = model(
        _inputs(images, ids, decoder_ids, [[True, False], [True, False]])
    )
    np.testing.assert_allclose(_np(batch[:1]), _np(alone), atol=2e-5)
    # The images matter: another image changes the logits.
    other = model(_inputs(images[:1, 1:], [lead + [5, 6, 1]], decoder_ids[:1]))
    assert np.abs(_np(other) - _np(alone)).max() > 1e-2


def test_placeholders_at_the_front_equal_the_prefix_layout(
    prefix_model, placeholder_model
):
    images = _images(2, 2, seed=4)
    ids = np.array([[5, 6, 1], [7, 1, 0]], "int32")
    ph = np.full((2, 2), IMAGE_TOKEN, "int32")
    decoder_ids = np.array([[0, 3], [0, 4]], "int32")
    prefix = prefix_model(_inputs(images, ids, decoder_ids))
    placeholder = placeholder_model(
        _inputs(images, np.concatenate([ph, ids], 1), decoder_ids)
    )
    np.testing.assert_allclose(_np(placeholder), _np(prefix), atol=2e-5)


def _naive_greedy(model, images, ids, max_length, image_mask=None):
    """Greedy decoding by re-running the whole model at every step."""
    tokens = np.zeros((len(ids), max_length), "int32")
    finished = np.zeros(len(ids), bool)
    for index in range(max_length - 1):
        logits = _np(
            model(_inputs(images, ids, tokens[:, : index + 1], image_mask))
        )
        token = np.where(finished, 0, logits[:, index].argmax(-1))
        tokens[:, index + 1] = token
        finished |= token == EOS_ID
        if finished.all():
            break
    return tokens


def test_generate_equals_greedy_recomputation(placeholder_model):
    images = _images(3, 2, seed=5)
    ph = IMAGE_TOKEN
    ids = np.array([[ph, 5, ph, 1], [6, ph, 1, 0], [9, 8, 1, 0]], "int32")
    image_mask = np.array([[True, True], [True, False], [False, False]])
    tokens = _np(placeholder_model.generate(images, ids, 7, image_mask))
    assert tokens.shape == (3, 7) and tokens.dtype == np.int32
    expected = _naive_greedy(placeholder_model, images, ids, 7, image_mask)
    np.testing.assert_array_equal(tokens, expected)
    assert len(set(tokens[:, 1:].ravel().tolist())) > 2  # not degenerate


def test_config_round_trip_and_keras_file(placeholder_model, tmp_path):
    config = placeholder_model.get_config()
    clone = VisionLanguageModel.from_config(config)
    assert clone.get_config() == config
    json.dumps(config)  # plain values only
    inputs = _inputs(
        _images(1, 1), [[IMAGE_TOKEN, 5, 1]], [[0, 4, 5]], [[True]]
    )
    path = str(tmp_path / "vlm.keras")
    placeholder_model.save(path)
    restored = keras.models.load_model(path)
    assert isinstance(restored, VisionLanguageModel)
    assert restored.get_config() == config
    np.testing.assert_array_equal(
        _np(restored(inputs)), _np(placeholder_model(inputs))
    )


# ------------------------------------------------------- dense checkpoints


@pytest.fixture(scope="module")
def dense_models():
    keras.utils.set_random_seed(7)
    vit = _randomize(ViT(**VISION, num_classes=10), seed=7)
    t5 = _randomize(T5.from_architecture("t5_tiny"), seed=8)
    return vit, t5


def _assert_parts_equal(vlm, vit, t5):
    images = _images(2, 1, seed=9)[:, 0]
    np.testing.assert_array_equal(
        _np(vlm.vision_encoder.encode(images)), _np(vit.encode(images))
    )
    inputs = {
        "encoder_token_ids": np.array([[5, 6, 1], [9, 1, 0]], "int32"),
        "decoder_token_ids": np.array([[0, 3], [0, 8]], "int32"),
    }
    np.testing.assert_array_equal(
        _np(vlm.language_model(inputs)), _np(t5(inputs))
    )


def test_from_models_copies_every_weight(dense_models):
    vit, t5 = dense_models
    vlm = VisionLanguageModel.from_models(vit, t5, freeze_vision=True)
    _assert_parts_equal(vlm, vit, t5)
    names = vlm.canonical_variables()
    assert "vision/block_1/mlp/wi" in names and "projection/kernel" in names
    assert "shared/embedding" in names and "vision/head/kernel" not in names
    assert len(names) == len(vlm.weights)


def _write_hf_vit(vit, directory):
    """A Hugging Face ViT safetensors directory, from canonical weights."""
    from safetensors.numpy import save_file

    w = {n: _np(v) for n, v in vit.canonical_variables().items()}
    hf = {
        "vit.embeddings.patch_embeddings.projection.weight": w[
            "patch_embedding/kernel"
        ].transpose(3, 2, 0, 1),
        "vit.embeddings.patch_embeddings.projection.bias": w[
            "patch_embedding/bias"
        ],
        "vit.embeddings.cls_token": w["class_token"],
        "vit.embeddings.position_embeddings": w["position_embedding"],
        "vit.layernorm.weight": w["encoder/final_norm/gamma"],
        "vit.layernorm.bias": w["encoder/final_norm/beta"],
        "classifier.weight": w["head/kernel"].T,
        "classifier.bias": w["head/bias"],
    }
    for i in range(vit.num_layers):
        ours, theirs = f"encoder/block_{i}", f"vit.encoder.layer.{i}"
        pairs = [
            (f"attention/{p}", f"attention.attention.{p}")
            for p in ("query", "key", "value")
        ] + [("attention/output", "attention.output.dense")]
        for a, b in pairs:
            hf[f"{theirs}.{b}.weight"] = w[f"{ours}/{a}/kernel"].T
            hf[f"{theirs}.{b}.bias"] = w[f"{ours}/{a}/bias"]
        for a, b in (
            ("attention_norm", "layernorm_before"),
            ("mlp_norm", "layernorm_after"),
        ):
            hf[f"{theirs}.{b}.weight"] = w[f"{ours}/{a}/gamma"]
            hf[f"{theirs}.{b}.bias"] = w[f"{ours}/{a}/beta"]
        for a, b in (("i", "intermediate.dense"), ("o", "output.dense")):
            hf[f"{theirs}.{b}.weight"] = w[f"{ours}/mlp/w{a}"].T
            hf[f"{theirs}.{b}.bias"] = w[f"{ours}/mlp/b{a}"]
    directory.mkdir()
    save_file(
        {k: np.ascontiguousarray(v) for k, v in hf.items()},
        str(directory / "model.safetensors"),
    )
    config = {
        "model_type": "vit",
        "hidden_size": vit.model_dim,
        "num_hidden_layers": vit.num_layers,
        "num_attention_heads": vit.num_heads,
        "intermediate_size": vit.hidden_dim,
        "image_size": vit.image_hw[0],
        "patch_size": vit.patch_size,
        "num_channels": vit.num_channels,
        "hidden_act": "gelu",
        "layer_norm_eps": vit.layer_norm_epsilon,
        "qkv_bias": True,
    }
    (directory / "config.json").write_text(json.dumps(config))
    return str(directory)


def test_from_checkpoints_reads_both_formats(dense_models, tmp_path):
    """A Hugging Face ViT and an original (Mesh TensorFlow) T5."""
    vit, t5 = dense_models
    vit_path = _write_hf_vit(vit, tmp_path / "hf_vit")
    t5_path = write_mtf_checkpoint(
        t5, str(tmp_path / "t5"), optimizer_slots=False
    )
    vlm = read_vlm_checkpoints(
        vit_path, t5_path, t5_options={"config": "t5_tiny"}
    )
    _assert_parts_equal(vlm, vit, t5)
    with pytest.raises(ValueError, match="does not exist"):
        read_vlm_checkpoints(str(tmp_path / "nope"), t5_path)


def test_from_models_keeps_moe_blocks(dense_models):
    vit, t5 = dense_models
    moe_vit = keras_moe.upcycle(vit, 4, encoder_router="tokens_choose")
    vlm = VisionLanguageModel.from_models(moe_vit, t5)
    assert isinstance(vlm.vision_encoder.blocks[1].mlp, MoeLayer)
    assert vlm.get_config()["vision_moe_blocks"][1]["num_experts"] == 4
    _assert_parts_equal(vlm, moe_vit, t5)


def test_freeze_vision_trains_everything_else(dense_models):
    vit, t5 = dense_models
    vlm = VisionLanguageModel.from_models(vit, t5, freeze_vision=True)
    trainable = {id(v) for v in vlm.trainable_weights}
    assert not any(id(v) in trainable for v in vlm.vision_encoder.weights)
    before = {n: _np(v) for n, v in vlm.canonical_variables().items()}
    vlm.compile(
        optimizer=keras.optimizers.Adam(1e-2), loss=_LOSS, run_eagerly=True
    )
    inputs = _inputs(_images(4, 1), [[5, 6, 1]] * 4, [[0, 3, 4]] * 4)
    vlm.fit(inputs, np.array([[3, 4, 1]] * 4), epochs=1, verbose=0)
    after = {n: _np(v) for n, v in vlm.canonical_variables().items()}
    changed = {n for n in before if not np.array_equal(before[n], after[n])}
    assert not {n for n in changed if n.startswith("vision/")}
    assert {"projection/kernel", "shared/embedding"} <= changed


# -------------------------------------------------------------- upcycling


def test_upcycle_follows_the_paper_per_stack(prefix_model):
    moe = keras_moe.upcycle(prefix_model, num_experts=4)
    assert moe.upcycled_blocks == {
        "vision": [1],
        "encoder": [1],
        "decoder": [1],
    }
    config = moe.get_config()
    vision = config["vision_moe_blocks"][1]
    encoder = config["encoder_moe_blocks"][1]
    decoder = config["decoder_moe_blocks"][1]
    assert vision["router"] == encoder["router"] == "experts_choose"
    assert vision["train_capacity_factor"] == 2.0
    assert vision["normalize_combine_weights"]  # vision
    assert not encoder["normalize_combine_weights"]  # language
    assert decoder["router"] == "tokens_choose"
    assert decoder["num_selected_experts"] == 2
    assert not decoder["normalize_combine_weights"]
    assert isinstance(moe.vision_encoder.blocks[1].mlp, MoeLayer)
    assert isinstance(moe.language_model.decoder.blocks[1].mlp, MoeLayer)
    assert not isinstance(prefix_model.vision_encoder.blocks[1].mlp, MoeLayer)
    only = keras_moe.upcycle(
        prefix_model, 4, blocks={"vision": "all", "encoder": "none"}
    )
    assert only.upcycled_blocks == {
        "vision": [0, 1],
        "encoder": [],
        "decoder": [1],
    }
    with pytest.raises(ValueError, match="unknown stacks"):
        keras_moe.upcycle(prefix_model, 4, blocks={"text": "all"})


def test_upcycled_model_starts_as_the_dense_model(placeholder_model):
    """Token choice, normalised weights, no drops: every stack's MoE block
    equals its dense MLP, so the logits and the generations are the
    dense model's."""
    moe = keras_moe.upcycle(
        placeholder_model,
        num_experts=4,
        blocks="all",
        encoder_router="tokens_choose",
        normalize_combine_weights=True,
        eval_capacity_factor=None,
        router_kernel_initializer=keras.initializers.RandomNormal(
            stddev=1.0, seed=3
        ),
    )
    # The shapes of test_generate_equals_greedy_recomputation: the dense
    # model's generation is traced once.
    images = _images(3, 2, seed=6)
    ph = IMAGE_TOKEN
    ids = np.array([[ph, 5, ph, 1], [6, ph, 1, 0], [7, 1, 0, 0]], "int32")
    image_mask = np.array([[True, True], [True, False], [False, False]])
    decoder_ids = [[0, 3, 4, 5], [0, 7, 2, 9], [0, 1, 1, 1]]
    inputs = _inputs(images, ids, decoder_ids, image_mask)
    np.testing.assert_allclose(
        _np(moe(inputs)), _np(placeholder_model(inputs)), rtol=1e-4, atol=1e-5
    )
    np.testing.assert_array_equal(
        _np(moe.generate(images, ids, 7, image_mask)),
        _np(placeholder_model.generate(images, ids, 7, image_mask)),
    )


def test_upcycled_model_trains_and_round_trips(prefix_model, tmp_path):
    moe = keras_moe.upcycle(prefix_model, num_experts=4)
    rng = np.random.default_rng(0)
    ids = rng.integers(2, 100, (8, 6)).astype("int32")
    targets = rng.integers(2, 100, (8, 4)).astype("int32")
    decoder_ids = np.concatenate(
        [np.zeros((8, 1), "int32"), targets[:, :-1]], 1
    )
    inputs = _inputs(_images(8, 1, seed=2), ids, decoder_ids)
    moe.compile(
        optimizer=keras.optimizers.Adam(3e-3), loss=_LOSS, run_eagerly=True
    )
    history = moe.fit(inputs, targets, batch_size=8, epochs=5, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < losses[0] - 0.1, losses
    moe(inputs, training=True)
    assert len(moe.losses) >= 3  # router z-losses of the three stacks
    path = str(tmp_path / "moe_vlm.keras")
    moe.save(path)
    restored = keras.models.load_model(path)
    np.testing.assert_allclose(
        _np(restored(inputs)), _np(moe(inputs)), atol=1e-6, rtol=0
    )


# --------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "images,ids,image_mask,match",
    [
        (np.zeros((1, 8, 8, 3)), [[5, 1]], None, r"images must have shape"),
        (np.zeros((1, 16, 16, 1)), [[5, 1]], None, r"\[B, 16, 16, 3\]"),
        (np.zeros((1, 16, 16)), [[5, 1]], None, "images must have shape"),
        (np.zeros((1, 0, 16, 16, 3)), [[5, 1]], None, "at least one image"),
        (np.zeros((1, 16, 16, 3)), [[5] * 9], None, "max_prompt_length=8"),
        (np.zeros((1, 16, 16, 3)), [5, 1], None, "rank 2"),
        (np.zeros((1, 16, 16, 3)), [[5.0, 1.0]], None, "integer token ids"),
        (np.zeros((2, 16, 16, 3)), [[5, 1]], None, "different batch sizes"),
        (np.zeros((1, 2, 16, 16, 3)), [[5, 1]], [[True]], r"\[B, 2\]"),
    ],
)
def test_bad_inputs(prefix_model, images, ids, image_mask, match):
    images = np.asarray(images, "float32")
    with pytest.raises(ValueError, match=match):
        prefix_model.generate(images, np.asarray(ids), 4, image_mask)
    inputs = {
        "images": images,
        "prompt_token_ids": np.asarray(ids),
        "decoder_token_ids": np.zeros((1, 2), "int32"),
    }
    if image_mask is not None:
        inputs["image_mask"] = np.asarray(image_mask)
    with pytest.raises(ValueError, match=match):
        prefix_model(inputs)


def test_placeholders_must_match_the_images(placeholder_model):
    images = _images(1, 2)
    with pytest.raises(ValueError, match=r"\(example, placeholders, images"):
        placeholder_model.generate(images, [[IMAGE_TOKEN, 5, 1]], 4)
    with pytest.raises(
        ValueError, match="example 1 has 3 placeholder\\(s\\) and 2 image"
    ):
        placeholder_model.embed_inputs(
            _images(2, 2),
            np.array([[IMAGE_TOKEN] * 2 + [1, 0], [IMAGE_TOKEN] * 3 + [1]]),
        )
    with pytest.raises(ValueError, match="one image_token_id=100 per real"):
        placeholder_model.embed_inputs(
            images, [[IMAGE_TOKEN, 5, 1]], [[True, True]]
        )


def test_bad_calls_and_configs(prefix_model, dense_models):
    with pytest.raises(ValueError, match="missing \\['decoder_token_ids'\\]"):
        prefix_model(
            {"images": _images(1, 1), "prompt_token_ids": np.array([[5, 1]])}
        )
    with pytest.raises(ValueError, match="expects a dict"):
        prefix_model(_images(1, 1))
    with pytest.raises(ValueError, match="decoder_token_ids must be integer"):
        prefix_model(
            dict(
                _inputs(_images(1, 1), [[5, 1]], [[0, 3]]),
                decoder_token_ids=np.array([[0.0, 3.0]], "float32"),
            )
        )
    with pytest.raises(ValueError, match="max_length must be >= 1"):
        prefix_model.generate(_images(1, 1), np.array([[5, 1]]), 0)
    text = t5_config("t5_tiny")
    with pytest.raises(ValueError, match=r"must not set \['num_classes'\]"):
        VisionLanguageModel(dict(VISION, num_classes=10), text)
    with pytest.raises(ValueError, match="must not set"):
        VisionLanguageModel(VISION, dict(text, encoder_moe_blocks={}))
    with pytest.raises(ValueError, match=r"image_token_id must be in \[2, 128"):
        VisionLanguageModel(VISION, text, image_token_id=128)
    with pytest.raises(ValueError, match="image_token_id must be >= 2"):
        VisionLanguageModel(VISION, text, image_token_id=1)
    with pytest.raises(ValueError, match="freeze_vision must be a bool"):
        VisionLanguageModel(VISION, text, freeze_vision="yes")
    vit, t5 = dense_models
    with pytest.raises(ValueError, match="vit must be a keras_moe ViT"):
        VisionLanguageModel.from_models(t5, t5)
    e3 = keras_moe.upcycle(
        vit,
        4,
        encoder_router="tokens_choose",
        num_selected_experts=1,
        ensemble_size=2,
    )
    with pytest.raises(ValueError, match="ensemble_size=2"):
        VisionLanguageModel.from_models(e3, t5)


def test_mixed_precision_call():
    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        model = VisionLanguageModel(VISION, t5_config("t5_tiny"))
    finally:
        keras.config.set_dtype_policy(policy)
    assert all(w.dtype == "float32" for w in model.weights)
    logits = model(_inputs(_images(2, 1), [[5, 6, 1], [7, 1, 0]], [[0, 3]] * 2))
    assert keras.backend.standardize_dtype(logits.dtype) == "float32"
    assert np.isfinite(_np(logits)).all()
    packed, _ = model.embed_inputs(_images(2, 1), np.array([[5, 1], [6, 1]]))
    assert keras.backend.standardize_dtype(packed.dtype) == "bfloat16"


def test_docstring_examples_run():
    import doctest

    from keras_moe.models import vlm

    result = doctest.testmod(vlm, extraglobs={"keras": keras})
    assert result.attempted >= 3 and result.failed == 0


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))
