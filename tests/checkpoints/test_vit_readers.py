"""ViT checkpoint readers against the reference implementations.

Each reference (Hugging Face transformers on PyTorch, TF Model Garden on
tf_keras, keras-hub) builds a tiny random ViT in this process, writes it in
its own format, and the keras_moe model read back must compute the same
function (max abs difference of the logits or features below 1e-4). The
tf_keras and keras-hub objects never meet keras_moe's Keras 3 objects: only
files and NumPy arrays cross over. Every reader is also fed a checkpoint of
another model, a truncated file and a configuration that contradicts the
weights, and must raise a ValueError that names the problem.
"""

import json
import os
import shutil
import sys

import keras
import numpy as np
import pytest

from keras_moe.checkpoints.common import CheckpointMismatchError
from keras_moe.checkpoints.vit import convert_vit_keras_hub_backbone
from keras_moe.checkpoints.vit import read_vit_hf_safetensors
from keras_moe.checkpoints.vit import read_vit_keras_hub
from keras_moe.checkpoints.vit import read_vit_model_garden_checkpoint
from keras_moe.models.vit import ViT

TOLERANCE = 1e-4
IMAGE, PATCH, DIM, HEADS, MLP, LAYERS, CLASSES = 16, 4, 32, 4, 64, 2, 5


def _images(batch=3, seed=7):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(batch, IMAGE, IMAGE, 3)).astype("float32")


def _max_diff(ours, reference, label):
    ours = keras.ops.convert_to_numpy(ours)
    assert ours.shape == reference.shape
    diff = float(np.max(np.abs(ours - reference)))
    print(f"\n[{label}] max abs difference: {diff:.3g}")
    assert diff < TOLERANCE, diff
    return diff


def _truncate(path):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)


def _write_t5_like_safetensors(path):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    save_file(
        {
            "shared.weight": rng.normal(size=(50, 16)).astype("float32"),
            "encoder.block.0.layer.0.SelfAttention.q.weight": rng.normal(
                size=(16, 16)
            ).astype("float32"),
            "encoder.final_layer_norm.weight": np.ones(16, "float32"),
        },
        path,
    )


# --------------------------------------------------------------------------
# Hugging Face transformers (PyTorch).


def _hf_model(kind="classifier", **config):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.ViTConfig(
        hidden_size=DIM,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=MLP,
        image_size=IMAGE,
        patch_size=PATCH,
        num_labels=CLASSES,
        **config,
    )
    if kind == "classifier":
        model = transformers.ViTForImageClassification(hf_config)
    else:
        model = transformers.ViTModel(
            hf_config, add_pooling_layer=kind == "with_pooler"
        )
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.normal_(0.0, 0.3)
            if "layernorm" in name and name.endswith("weight"):
                parameter.add_(1.0)
    return model.eval()


def _hf_reference(model, images):
    import torch

    pixels = torch.tensor(images.transpose(0, 3, 1, 2))  # NHWC -> NCHW
    with torch.no_grad():
        out = model(pixel_values=pixels)
    if hasattr(out, "logits"):
        return out.logits.numpy()
    return out.last_hidden_state.numpy()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    model = _hf_model()
    path = str(tmp_path_factory.mktemp("hf") / "vit")
    model.save_pretrained(path, safe_serialization=True)
    return path, _hf_reference(model, _images())


def test_hf_logits_match_transformers(hf_dir):
    path, reference = hf_dir
    model = read_vit_hf_safetensors(path)
    assert isinstance(model, ViT)
    config = model.get_config()
    assert (config["num_layers"], config["num_heads"]) == (LAYERS, HEADS)
    assert (config["image_size"], config["patch_size"]) == (IMAGE, PATCH)
    assert config["num_classes"] == CLASSES
    assert config["layer_norm_epsilon"] == 1e-12  # HF's, from config.json
    _max_diff(model(_images()), reference, "HF ViTForImageClassification")
    # The safetensors file alone works too (config.json beside it).
    single = read_vit_hf_safetensors(os.path.join(path, "model.safetensors"))
    _max_diff(single(_images()), reference, "HF model.safetensors path")


def test_hf_vit_model_without_head(tmp_path):
    hf = _hf_model("backbone")
    hf.save_pretrained(str(tmp_path), safe_serialization=True)
    model = read_vit_hf_safetensors(str(tmp_path))
    assert model.num_classes == 0
    _max_diff(
        model.encode(_images()),
        _hf_reference(hf, _images()),
        "HF ViTModel last_hidden_state",
    )


def test_hf_without_qkv_bias(tmp_path):
    hf = _hf_model(qkv_bias=False)
    hf.save_pretrained(str(tmp_path), safe_serialization=True)
    model = read_vit_hf_safetensors(str(tmp_path))
    _max_diff(model(_images()), _hf_reference(hf, _images()), "HF no qkv bias")


def _edit_config(directory, **changes):
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(changes)
    with open(path, "w") as f:
        json.dump(config, f)


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            {"num_hidden_layers": 3},
            "num_layers: 2 in the weights, 3 in config.json",
        ),
        (
            {"hidden_size": 48},
            "model_dim: 32 in the weights, 48 in config.json",
        ),
        (
            {"intermediate_size": 32},
            "hidden_dim: 64 in the weights, 32 in config.json",
        ),
        ({"image_size": 32}, "image_size: 32 in config.json"),
        ({"patch_size": 8}, "patch_size: 4 in the weights, 8 in config.json"),
        (
            {"hidden_act": "gelu_fast"},
            "hidden_act 'gelu_fast' is not supported",
        ),
        (
            {"id2label": {"0": "a", "1": "b"}},
            "num_classes: 5 in the weights, 2 in config.json id2label",
        ),
    ],
)
def test_hf_config_contradicting_the_weights(
    hf_dir, tmp_path, changes, message
):
    path = str(tmp_path / "vit")
    shutil.copytree(hf_dir[0], path)
    _edit_config(path, **changes)
    with pytest.raises(ValueError, match=message):
        read_vit_hf_safetensors(path)


def test_hf_num_heads_argument_is_checked(hf_dir):
    with pytest.raises(
        CheckpointMismatchError,
        match="num_heads: 4 in config.json, 2 in the arguments",
    ):
        read_vit_hf_safetensors(hf_dir[0], config={"num_heads": 2})
    assert (
        read_vit_hf_safetensors(
            hf_dir[0], config={"num_heads": HEADS}
        ).num_heads
        == HEADS
    )


def test_hf_rejects_checkpoints_of_other_models(hf_dir, tmp_path):
    # A T5 checkpoint, as save_pretrained writes one.
    t5 = tmp_path / "t5"
    t5.mkdir()
    _write_t5_like_safetensors(str(t5 / "model.safetensors"))
    (t5 / "config.json").write_text(
        json.dumps({"model_type": "t5", "architectures": ["T5Model"]})
    )
    with pytest.raises(ValueError, match="describes a 't5' model"):
        read_vit_hf_safetensors(str(t5))
    # The same weights under a ViT config.
    shutil.copy(os.path.join(hf_dir[0], "config.json"), str(t5))
    with pytest.raises(
        CheckpointMismatchError, match="holds no ViT weights.*shared.weight"
    ):
        read_vit_hf_safetensors(str(t5))
    # ViTModel's pooler has no keras_moe equivalent.
    pooled = str(tmp_path / "pooled")
    _hf_model("with_pooler").save_pretrained(pooled, safe_serialization=True)
    with pytest.raises(CheckpointMismatchError, match="pooler.dense.weight"):
        read_vit_hf_safetensors(pooled)


def test_hf_rejects_truncated_and_missing_files(hf_dir, tmp_path):
    path = str(tmp_path / "vit")
    shutil.copytree(hf_dir[0], path)
    _truncate(os.path.join(path, "model.safetensors"))
    with pytest.raises(ValueError, match="model.safetensors is truncated"):
        read_vit_hf_safetensors(path)
    with pytest.raises(ValueError, match="holds no model.safetensors"):
        read_vit_hf_safetensors(str(tmp_path))


# --------------------------------------------------------------------------
# TF Model Garden (tf_keras): checkpoints written here, read by name.


def _model_garden_checkpoint(directory, pooler="token", head=True):
    """Writes a tiny random Model Garden ViT checkpoint, as its trainer does
    (model, optimizer state, global step); returns (path, reference)."""
    pytest.importorskip("tf_keras")
    vit_lib = pytest.importorskip("official.vision.modeling.backbones.vit")
    import tensorflow as tf
    import tf_keras
    from official.vision.modeling import classification_model

    specs = tf_keras.layers.InputSpec(shape=[None, IMAGE, IMAGE, 3])
    backbone = vit_lib.VisionTransformer(
        mlp_dim=MLP,
        num_heads=HEADS,
        num_layers=LAYERS,
        dropout_rate=0.0,
        input_specs=specs,
        patch_size=PATCH,
        hidden_size=DIM,
        pooler=pooler,
    )
    model = backbone
    if head:
        model = classification_model.ClassificationModel(
            backbone, num_classes=CLASSES, input_specs=specs
        )
    rng = np.random.default_rng(3)
    for variable in model.variables:
        value = rng.normal(scale=0.3, size=variable.shape)
        if "gamma" in variable.name:
            value += 1.0
        variable.assign(value.astype("float32"))
    optimizer = tf_keras.optimizers.Adam(1e-3)
    # Zero gradients: Adam creates its slots and leaves the weights alone.
    optimizer.apply_gradients(
        [(tf.zeros_like(v), v) for v in model.trainable_variables]
    )
    out = model(_images(), training=False)
    reference = out.numpy() if head else out["pre_logits"].numpy()
    reference = reference.reshape(len(reference), -1)
    items = {"model": model} if head else {"backbone": model}
    checkpoint = tf.train.Checkpoint(
        optimizer=optimizer,
        global_step=tf.Variable(1, dtype=tf.int64, name="global_step"),
        **items,
    )
    return checkpoint.save(os.path.join(directory, "ckpt")), reference


@pytest.fixture(scope="module")
def model_garden_token(tmp_path_factory):
    return _model_garden_checkpoint(str(tmp_path_factory.mktemp("mg")))


def test_model_garden_logits_match(model_garden_token):
    path, reference = model_garden_token
    model = read_vit_model_garden_checkpoint(path)
    assert model.activation == "gelu_tanh"  # Model Garden's GELU
    assert (model.num_heads, model.num_classes, model.pooling) == (
        HEADS,
        CLASSES,
        "token",
    )
    _max_diff(model(_images()), reference, "Model Garden ViT, token")
    # A directory reads its latest checkpoint.
    _max_diff(
        read_vit_model_garden_checkpoint(os.path.dirname(path))(_images()),
        reference,
        "Model Garden ViT, directory",
    )


def test_model_garden_gap_and_backbone_only(tmp_path):
    path, reference = _model_garden_checkpoint(str(tmp_path / "gap"), "gap")
    model = read_vit_model_garden_checkpoint(path)
    assert model.pooling == "gap"
    _max_diff(model(_images()), reference, "Model Garden ViT, gap")
    path, reference = _model_garden_checkpoint(
        str(tmp_path / "backbone"), head=False
    )
    model = read_vit_model_garden_checkpoint(path)
    assert model.num_classes == 0
    _max_diff(model(_images()), reference, "Model Garden backbone pre_logits")


def test_model_garden_arguments_are_checked(model_garden_token):
    path, _ = model_garden_token
    with pytest.raises(
        CheckpointMismatchError,
        match="num_heads: 4 in the attention kernels, 2 in the arguments",
    ):
        read_vit_model_garden_checkpoint(path, config={"num_heads": 2})
    with pytest.raises(
        CheckpointMismatchError, match="image_size: 32 in the arguments"
    ):
        read_vit_model_garden_checkpoint(path, config={"image_size": 32})
    assert read_vit_model_garden_checkpoint(
        path, config={"num_heads": HEADS, "image_size": IMAGE}
    )


def test_model_garden_rejects_other_models(tmp_path):
    import tensorflow as tf

    module = tf.Module()
    module.embedding = tf.Variable(np.zeros((50, 16), "float32"), name="shared")
    module.query = tf.Variable(
        np.zeros((16, 16), "float32"), name="encoder/block_000/SelfAttention/q"
    )
    path = tf.train.Checkpoint(model=module).save(str(tmp_path / "t5"))
    with pytest.raises(
        CheckpointMismatchError,
        match="holds no Model Garden ViT variables.*SelfAttention/q",
    ):
        read_vit_model_garden_checkpoint(path)
    safetensors = str(tmp_path / "model.safetensors")
    _write_t5_like_safetensors(safetensors)
    with pytest.raises(ValueError, match="Cannot read Model Garden checkpoint"):
        read_vit_model_garden_checkpoint(safetensors)


def test_model_garden_rejects_truncated_checkpoints(
    model_garden_token, tmp_path
):
    path, _ = model_garden_token
    directory = os.path.dirname(path)
    copy = str(tmp_path / "copy")
    shutil.copytree(directory, copy)
    prefix = os.path.join(copy, os.path.basename(path))
    _truncate(prefix + ".data-00000-of-00001")
    with pytest.raises(ValueError, match="Cannot read Model Garden checkpoint"):
        read_vit_model_garden_checkpoint(prefix)
    with pytest.raises(ValueError, match="holds no tf.train checkpoint"):
        read_vit_model_garden_checkpoint(str(tmp_path))


# --------------------------------------------------------------------------
# keras-hub.


def _keras_hub_models(use_class_token=True, pooling="token", epsilon=1e-5):
    keras_hub = pytest.importorskip("keras_hub")
    backbone = keras_hub.models.ViTBackbone(
        image_shape=(IMAGE, IMAGE, 3),
        patch_size=PATCH,
        num_layers=LAYERS,
        num_heads=HEADS,
        hidden_dim=DIM,
        mlp_dim=MLP,
        layer_norm_epsilon=epsilon,
        use_class_token=use_class_token,
    )
    classifier = keras_hub.models.ViTImageClassifier(
        backbone=backbone, num_classes=CLASSES, pooling=pooling
    )
    rng = np.random.default_rng(5)
    for variable in classifier.weights:
        value = rng.normal(scale=0.3, size=variable.shape)
        if variable.path.endswith("gamma"):
            value += 1.0
        variable.assign(value.astype("float32"))
    return backbone, classifier


@pytest.fixture(scope="module")
def keras_hub_vit():
    backbone, classifier = _keras_hub_models()
    images = _images()
    return {
        "backbone": backbone,
        "classifier": classifier,
        "features": keras.ops.convert_to_numpy(backbone(images)),
        "logits": keras.ops.convert_to_numpy(classifier(images)),
    }


def test_keras_hub_objects(keras_hub_vit):
    model = convert_vit_keras_hub_backbone(keras_hub_vit["classifier"])
    assert model.layer_norm_epsilon == 1e-5 and model.num_classes == CLASSES
    _max_diff(model(_images()), keras_hub_vit["logits"], "keras-hub classifier")
    backbone = convert_vit_keras_hub_backbone(keras_hub_vit["backbone"])
    assert backbone.num_classes == 0
    _max_diff(
        backbone.encode(_images()),
        keras_hub_vit["features"],
        "keras-hub ViTBackbone sequence",
    )
    _max_diff(
        backbone(_images()),
        keras_hub_vit["features"][:, 0],
        "keras-hub ViTBackbone class token",
    )
    # A backbone can get a new (zero) head.
    headed = convert_vit_keras_hub_backbone(
        keras_hub_vit["backbone"], config={"num_classes": 3}
    )
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(headed(_images())), np.zeros((3, 3))
    )


def test_upcycle_takes_keras_hub_models(keras_hub_vit):
    # The function-preserving recipe: the upcycled keras-hub classifier
    # computes what keras-hub computes.
    import keras_moe
    from keras_moe.models import ViT
    from keras_moe.models import moe_layers

    moe = keras_moe.upcycle(
        keras_hub_vit["classifier"],
        num_experts=4,
        encoder_router="tokens_choose",
        normalize_combine_weights=True,
        train_capacity_factor=None,
        eval_capacity_factor=None,
    )
    assert isinstance(moe, ViT) and len(moe_layers(moe)) >= 1
    _max_diff(moe(_images()), keras_hub_vit["logits"], "upcycled keras-hub")
    backbone = keras_moe.upcycle(keras_hub_vit["backbone"], num_experts=4)
    assert backbone.num_classes == 0 and moe_layers(backbone)
    import keras_hub

    other = keras_hub.layers.PositionEmbedding(sequence_length=4)
    with pytest.raises(ValueError, match="received a keras-hub Position"):
        keras_moe.upcycle(other, 4)


def test_keras_hub_preset_and_weights_files(keras_hub_vit, tmp_path):
    preset = str(tmp_path / "preset")
    keras_hub_vit["classifier"].save_to_preset(preset)
    model = read_vit_keras_hub(preset)
    assert model.layer_norm_epsilon == 1e-5
    _max_diff(model(_images()), keras_hub_vit["logits"], "keras-hub preset")
    weights = str(tmp_path / "backbone.weights.h5")
    keras_hub_vit["backbone"].save_weights(weights)
    model = read_vit_keras_hub(weights, config={"layer_norm_epsilon": 1e-5})
    _max_diff(
        model.encode(_images()),
        keras_hub_vit["features"],
        "keras-hub backbone .weights.h5",
    )
    weights = str(tmp_path / "classifier.weights.h5")
    keras_hub_vit["classifier"].save_weights(weights)
    model = read_vit_keras_hub(weights, config={"layer_norm_epsilon": 1e-5})
    _max_diff(
        model(_images()), keras_hub_vit["logits"], "keras-hub classifier .h5"
    )


def test_keras_hub_gap_without_class_token(tmp_path):
    _, classifier = _keras_hub_models(use_class_token=False, pooling="gap")
    reference = keras.ops.convert_to_numpy(classifier(_images()))
    model = convert_vit_keras_hub_backbone(classifier)
    assert model.pooling == "gap"
    _max_diff(model(_images()), reference, "keras-hub classifier, gap")
    preset = str(tmp_path / "preset")
    classifier.save_to_preset(preset)
    _max_diff(
        read_vit_keras_hub(preset)(_images()),
        reference,
        "keras-hub preset, gap",
    )


def test_keras_hub_unsupported_pooling():
    _, classifier = _keras_hub_models(pooling="gap")
    with pytest.raises(ValueError, match="pooling='gap' with use_class_token"):
        convert_vit_keras_hub_backbone(classifier)


@pytest.fixture()
def keras_hub_preset(keras_hub_vit, tmp_path):
    preset = str(tmp_path / "preset")
    keras_hub_vit["classifier"].save_to_preset(preset)
    return preset


def _edit_json(path, **changes):
    with open(path) as f:
        data = json.load(f)
    for key, value in changes.items():
        if key == "class_name":
            data[key] = value
        else:
            data["config"][key] = value
    with open(path, "w") as f:
        json.dump(data, f)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"num_layers": 3}, "num_layers: 2 in the weights, 3 in config.json"),
        ({"hidden_dim": 64}, "model_dim: 32 in the weights, 64 in config.json"),
        (
            {"num_heads": 2},
            "num_heads: 2 in config.json / task.json, 4 in the attention",
        ),
        ({"image_shape": [32, 32, 3]}, "image_size: 32 in config.json"),
        ({"use_class_token": False}, "pooling='token' needs use_class_token"),
    ],
)
def test_keras_hub_config_contradicting_the_weights(
    keras_hub_preset, changes, message
):
    _edit_json(os.path.join(keras_hub_preset, "config.json"), **changes)
    with pytest.raises(ValueError, match=message):
        read_vit_keras_hub(keras_hub_preset)


def test_keras_hub_arguments_are_checked(keras_hub_vit):
    with pytest.raises(
        CheckpointMismatchError,
        match="num_heads: 4 in the keras-hub config, 3 in the arguments",
    ):
        convert_vit_keras_hub_backbone(
            keras_hub_vit["classifier"], config={"num_heads": 3}
        )
    with pytest.raises(CheckpointMismatchError, match="num_classes"):
        convert_vit_keras_hub_backbone(
            keras_hub_vit["classifier"], config={"num_classes": 7}
        )
    with pytest.raises(ValueError, match="Expected a keras_hub ViTBackbone"):
        convert_vit_keras_hub_backbone(
            keras.Sequential([keras.layers.Dense(2)])
        )


def test_keras_hub_rejects_other_models_and_truncated_files(
    keras_hub_preset, tmp_path
):
    _edit_json(
        os.path.join(keras_hub_preset, "config.json"), class_name="T5Backbone"
    )
    with pytest.raises(ValueError, match="describes a 'T5Backbone'"):
        read_vit_keras_hub(keras_hub_preset)
    other = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    other_path = str(tmp_path / "other.weights.h5")
    other.save_weights(other_path)
    with pytest.raises(CheckpointMismatchError, match="not a ViT checkpoint"):
        read_vit_keras_hub(other_path)
    safetensors = str(tmp_path / "model.safetensors")
    _write_t5_like_safetensors(safetensors)
    with pytest.raises(ValueError, match="not an HDF5 weights file"):
        read_vit_keras_hub(safetensors)
    _edit_json(
        os.path.join(keras_hub_preset, "config.json"), class_name="ViTBackbone"
    )
    _truncate(os.path.join(keras_hub_preset, "model.weights.h5"))
    with pytest.raises(ValueError, match="truncated, corrupt"):
        read_vit_keras_hub(keras_hub_preset)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))
