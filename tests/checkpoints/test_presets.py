"""Presets: `save_to_preset` -> `from_preset` / `read_checkpoint`, other
formats and hub handles through `from_preset`, and every bad input.

Round trips must be exact (float32 weights written and read back): the
reloaded model's outputs equal the saved model's bit for bit, and a fresh
model of the same architecture (other weights) does not. Hugging Face and
keras-hub directories loaded through `from_preset` are checked against the
outputs of the library that wrote them (transformers on PyTorch, keras-hub).
Hub handles never reach the network: the download functions are replaced,
or `huggingface_hub` runs offline on a cache built here.
"""

import json
import os
import sys

import keras
import numpy as np
import pytest

import keras_moe
from keras_moe.checkpoints import load_model
from keras_moe.checkpoints import load_preset
from keras_moe.checkpoints import read_checkpoint
from keras_moe.checkpoints.presets import read_keras_moe_preset
from keras_moe.models import T5
from keras_moe.models import VisionLanguageModel
from keras_moe.models import ViT
from keras_moe.models import moe_layers
from keras_moe.models import presets
from tests import tiny_models

TOLERANCE = 1e-4


def _randomize(model, seed):
    """Normal noise on every weight: zero heads, unit norms and identical
    experts would let a misplaced weight pass."""
    rng = np.random.default_rng(seed)
    for weight in model.weights:
        noise = rng.normal(scale=0.3, size=weight.shape).astype("float32")
        weight.assign(weight.numpy() + noise)
    return model


def _t5_batch(vocab_size=128):
    rng = np.random.default_rng(3)
    encoder = rng.integers(2, vocab_size, size=(2, 7)).astype("int32")
    encoder[1, 5:] = 0
    decoder = rng.integers(2, vocab_size, size=(2, 5)).astype("int32")
    decoder[:, 0] = 0
    return {"encoder_token_ids": encoder, "decoder_token_ids": decoder}


def _images(size=32, channels=3, count=3):
    rng = np.random.default_rng(4)
    return rng.normal(size=(count, size, size, channels)).astype("float32")


def _vlm_batch():
    rng = np.random.default_rng(5)
    prompt = rng.integers(2, 128, size=(2, 4)).astype("int32")
    decoder = rng.integers(2, 128, size=(2, 3)).astype("int32")
    decoder[:, 0] = 0
    return {
        "images": _images(count=2),
        "prompt_token_ids": prompt,
        "decoder_token_ids": decoder,
    }


def _outputs(model):
    if isinstance(model, T5):
        batch = _t5_batch(model.vocab_size)
    elif isinstance(model, ViT):
        batch = _images(model.image_hw[0], model.num_channels)
    else:
        batch = _vlm_batch()
    return keras.ops.convert_to_numpy(model(batch))


def _max_diff(ours, reference):
    ours = keras.ops.convert_to_numpy(ours)
    assert ours.shape == reference.shape
    return float(np.max(np.abs(ours - reference)))


# --------------------------------------------------------------------------
# The models saved: dense and upcycled (experts made unequal).


def _t5(kind):
    if kind == "dense":  # v1.1: an untied lm_head too
        return _randomize(T5.from_architecture("t5_v1_1_tiny"), seed=0)
    moe = keras_moe.upcycle(T5.from_architecture("t5_tiny"), num_experts=4)
    return _randomize(moe, seed=1)


def _vit(kind):
    dense = ViT.from_architecture("vit_tiny", num_layers=2)
    if kind == "dense":
        return _randomize(dense, seed=2)
    ensemble = {"e3": 2}.get(kind, 1)
    moe = keras_moe.upcycle(dense, num_experts=4, ensemble_size=ensemble)
    return _randomize(moe, seed=3)


def _check_round_trip(model, path, model_class, architecture):
    saved = model.save_to_preset(path)
    assert saved == os.path.abspath(path)
    expected = _outputs(model)
    fresh = model_class.from_config(model.get_config())
    assert _max_diff(_outputs(fresh), expected) > 1e-2  # weights matter
    loaded = [
        model_class.from_preset(path),
        read_checkpoint(path),
        read_checkpoint(path, architecture=architecture),
        load_model(path, architecture=architecture),
    ]
    for other in loaded:
        assert type(other) is model_class
        assert other.get_config() == model.get_config()
        np.testing.assert_array_equal(_outputs(other), expected)
        ours = model.canonical_variables()
        theirs = other.canonical_variables()
        assert sorted(ours) == sorted(theirs)
        for name, variable in ours.items():
            np.testing.assert_array_equal(
                theirs[name].numpy(), variable.numpy(), err_msg=name
            )
    return loaded[0]


@pytest.mark.parametrize("kind", ["dense", "upcycled"])
def test_t5_round_trip(kind, tmp_path):
    model = _t5(kind)
    loaded = _check_round_trip(model, str(tmp_path / "t5"), T5, "t5")
    assert len(moe_layers(loaded)) == len(moe_layers(model))
    assert bool(moe_layers(loaded)) == (kind == "upcycled")


@pytest.mark.parametrize("kind", ["dense", "upcycled", "e3"])
def test_vit_round_trip(kind, tmp_path):
    model = _vit(kind)
    loaded = _check_round_trip(model, str(tmp_path / "vit"), ViT, "vit")
    assert len(moe_layers(loaded)) == len(moe_layers(model))
    assert loaded.ensemble_size == (2 if kind == "e3" else 1)


def test_vision_language_model_round_trip(tmp_path):
    dense = VisionLanguageModel.from_architectures("vit_tiny", "t5_tiny")
    model = _randomize(keras_moe.upcycle(dense, num_experts=2), seed=4)
    assert moe_layers(model)
    path = str(tmp_path / "vlm")
    model.save_to_preset(path)
    loaded = VisionLanguageModel.from_preset(path)
    assert loaded.get_config() == model.get_config()
    np.testing.assert_array_equal(_outputs(loaded), _outputs(model))
    # read_checkpoint and load_model take T5 and ViT only.
    with pytest.raises(ValueError, match="holds a VisionLanguageModel"):
        read_checkpoint(path)
    with pytest.raises(ValueError, match="holds a VisionLanguageModel"):
        T5.from_preset(path)


# --------------------------------------------------------------------------
# What save_to_preset writes, and how.


def test_preset_files_follow_keras_hub_layout(tmp_path):
    model = _t5("upcycled")
    path = tmp_path / "preset"
    old_umask = os.umask(0o027)
    try:
        model.save_to_preset(path)
    finally:
        os.umask(old_umask)
    assert sorted(os.listdir(path)) == [
        "config.json",
        "metadata.json",
        "model.weights.h5",
    ]
    assert os.stat(path).st_mode & 0o777 == 0o750
    for name in os.listdir(path):
        assert os.stat(path / name).st_mode & 0o777 == 0o640, name
    assert [p for p in os.listdir(tmp_path) if p != "preset"] == []
    with open(path / "config.json") as f:
        config = json.load(f)
    assert config["class_name"] == "T5"
    assert config["module"] == "keras_moe.models.t5"
    assert config["registered_name"] == "keras_moe>T5"
    assert "build_config" not in config and "compile_config" not in config
    # The constructor config, MoE settings included, as JSON keeps it.
    assert config["config"] == json.loads(json.dumps(model.get_config()))
    moe_blocks = config["config"]["encoder_moe_blocks"]
    assert moe_blocks and all(
        block["num_experts"] == 4 for block in moe_blocks.values()
    )
    with open(path / "metadata.json") as f:
        metadata = json.load(f)
    assert metadata["keras_moe_version"] == keras_moe.__version__
    assert metadata["keras_version"] == keras.version()
    # Every variable counted once (tied embeddings are one variable).
    unique = {id(w): w for w in model.weights}.values()
    assert metadata["parameter_count"] == sum(
        int(np.prod(w.shape)) for w in unique
    )
    assert set(metadata) == {
        "keras_version",
        "keras_moe_version",
        "parameter_count",
        "date_saved",
    }


def test_save_replaces_only_when_asked_and_leaves_nothing_on_failure(
    tmp_path, monkeypatch
):
    path = str(tmp_path / "preset")
    first, second = _vit("dense"), _randomize(_vit("dense"), seed=9)
    first.save_to_preset(path)
    with pytest.raises(ValueError, match="exists; pass overwrite=True"):
        second.save_to_preset(path)
    np.testing.assert_array_equal(
        _outputs(ViT.from_preset(path)), _outputs(first)
    )
    second.save_to_preset(path, overwrite=True)
    np.testing.assert_array_equal(
        _outputs(ViT.from_preset(path)), _outputs(second)
    )

    def fail(filepath):
        with open(filepath, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(first, "save_weights", fail)
    with pytest.raises(OSError, match="disk full"):
        first.save_to_preset(tmp_path / "other")
    with pytest.raises(OSError, match="disk full"):
        first.save_to_preset(path, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["preset"]  # no hidden leftovers
    np.testing.assert_array_equal(
        _outputs(ViT.from_preset(path)), _outputs(second)
    )


def test_gfile_paths(tmp_path):
    model = _vit("upcycled")
    model.save_to_preset("ram://presets/vit")
    loaded = ViT.from_preset("ram://presets/vit")
    np.testing.assert_array_equal(_outputs(loaded), _outputs(model))
    local = str(tmp_path / "vit")
    model.save_to_preset(local)
    loaded = ViT.from_preset("file://" + local)
    np.testing.assert_array_equal(_outputs(loaded), _outputs(model))
    with pytest.raises(ValueError, match="No preset directory at 'ram://no"):
        ViT.from_preset("ram://nothing/here")


# --------------------------------------------------------------------------
# Hugging Face and keras-hub directories, checked against their libraries.

HF_T5 = dict(
    vocab_size=40,
    d_model=16,
    num_heads=2,
    d_kv=6,
    d_ff=24,
    num_layers=2,
    num_decoder_layers=3,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=12,
)


@pytest.fixture(scope="module")
def hf_t5(tmp_path_factory):
    torch = pytest.importorskip("torch")
    hf = tiny_models.random_hf_t5(HF_T5, "relu", tie=True, seed=0)
    path = str(tmp_path_factory.mktemp("hf") / "t5")
    hf.save_pretrained(path, safe_serialization=True)
    batch = _t5_batch(HF_T5["vocab_size"])
    with torch.no_grad():
        logits = hf(
            input_ids=torch.tensor(batch["encoder_token_ids"]).long(),
            attention_mask=torch.tensor(batch["encoder_token_ids"] != 0).long(),
            decoder_input_ids=torch.tensor(batch["decoder_token_ids"]).long(),
        ).logits.numpy()
    return path, logits


@pytest.fixture(scope="module")
def hf_vit(tmp_path_factory):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=8,
        patch_size=4,
        num_channels=3,
        num_labels=5,
    )
    hf = transformers.ViTForImageClassification(config).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in hf.parameters():
            parameter.normal_(0.0, 0.3)
    path = str(tmp_path_factory.mktemp("hf") / "vit")
    hf.save_pretrained(path, safe_serialization=True)
    images = _images(8, 3)
    with torch.no_grad():
        pixels = torch.tensor(images.transpose(0, 3, 1, 2))  # NHWC -> NCHW
        logits = hf(pixel_values=pixels).logits.numpy()
    return path, logits


@pytest.fixture(scope="module")
def keras_hub_presets(tmp_path_factory):
    keras_hub = pytest.importorskip("keras_hub")
    base = tmp_path_factory.mktemp("keras_hub")
    rng = np.random.default_rng(6)
    t5 = keras_hub.models.T5Backbone(
        vocabulary_size=128,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=24,
        key_value_dim=6,
        dropout=0.0,
        activation="relu",
        use_gated_activation=False,
        tie_embedding_weights=True,
    )
    vit = keras_hub.models.ViTImageClassifier(
        backbone=keras_hub.models.ViTBackbone(
            image_shape=(32, 32, 3),
            patch_size=8,
            num_layers=2,
            num_heads=2,
            hidden_dim=16,
            mlp_dim=32,
        ),
        num_classes=3,
    )
    for weight in t5.weights + vit.weights:
        value = rng.normal(scale=0.3, size=weight.shape)
        if weight.path.endswith(("/weight", "gamma")):  # norm scales
            value += 1.0
        weight.assign(value)
    batch = _t5_batch()
    outputs = t5(
        {
            "encoder_token_ids": batch["encoder_token_ids"],
            "encoder_padding_mask": (batch["encoder_token_ids"] != 0).astype(
                "int32"
            ),
            "decoder_token_ids": batch["decoder_token_ids"],
            "decoder_padding_mask": np.ones_like(batch["decoder_token_ids"]),
        }
    )
    decoded = keras.ops.convert_to_numpy(outputs["decoder_sequence_output"])
    embeddings = keras.ops.convert_to_numpy(t5.token_embedding.embeddings)
    # T5Seq2SeqLM's head with tied embeddings: (h * D**-0.5) @ E.T.
    t5_logits = decoded * 16**-0.5 @ embeddings.T
    vit_logits = keras.ops.convert_to_numpy(vit(_images()))
    t5.save_to_preset(str(base / "t5"))
    vit.save_to_preset(str(base / "vit"))
    return {
        "t5": (str(base / "t5"), t5_logits),
        "vit": (str(base / "vit"), vit_logits),
    }


def test_from_preset_reads_hugging_face_directories(hf_t5, hf_vit):
    path, expected = hf_t5
    model = T5.from_preset(path)
    assert model.vocab_size == HF_T5["vocab_size"]
    assert _max_diff(_outputs(model), expected) < TOLERANCE
    path, expected = hf_vit
    model = ViT.from_preset(path)
    assert model.num_classes == 5
    assert _max_diff(_outputs(model), expected) < TOLERANCE


def test_from_preset_reads_keras_hub_presets(keras_hub_presets):
    path, expected = keras_hub_presets["t5"]
    assert _max_diff(_outputs(T5.from_preset(path)), expected) < TOLERANCE
    path, expected = keras_hub_presets["vit"]
    assert _max_diff(_outputs(ViT.from_preset(path)), expected) < TOLERANCE


def test_from_preset_refuses_another_class(hf_t5, keras_hub_presets, tmp_path):
    with pytest.raises(ValueError, match="holds a T5, not a ViT"):
        ViT.from_preset(hf_t5[0])
    with pytest.raises(ValueError, match="holds a ViT, not a T5"):
        T5.from_preset(keras_hub_presets["vit"][0])
    vit_preset = str(tmp_path / "vit")
    _vit("dense").save_to_preset(vit_preset)
    with pytest.raises(ValueError, match="holds a ViT preset, not a T5"):
        T5.from_preset(vit_preset)
    with pytest.raises(ValueError, match="VisionLanguageModel.from_preset"):
        VisionLanguageModel.from_preset(hf_t5[0])


# --------------------------------------------------------------------------
# Hub handles.


def test_hf_handle_goes_through_snapshot_download(hf_t5, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    calls = []

    def snapshot_download(**kwargs):
        calls.append(kwargs)
        return hf_t5[0]

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    model = T5.from_preset("hf://someone/tiny-t5")
    assert _max_diff(_outputs(model), hf_t5[1]) < TOLERANCE
    assert calls == [
        {
            "repo_id": "someone/tiny-t5",
            "allow_patterns": ["*.json", "*.safetensors", "*.weights.h5"],
        }
    ]

    def unreachable(**kwargs):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    with pytest.raises(
        ValueError, match="Cannot download hf://someone/tiny-t5 .*no route"
    ):
        T5.from_preset("hf://someone/tiny-t5")


def test_hf_handle_from_an_offline_cache(hf_vit, tmp_path, monkeypatch):
    """The real `snapshot_download`, offline, on a cache laid out as
    huggingface_hub lays it out (refs/main -> snapshots/<commit>)."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny-vit"
    snapshot = repo / "snapshots" / commit
    os.makedirs(snapshot)
    os.makedirs(repo / "refs")
    (repo / "refs" / "main").write_text(commit)
    for name in os.listdir(hf_vit[0]):
        with open(os.path.join(hf_vit[0], name), "rb") as f:
            (snapshot / name).write_bytes(f.read())
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert huggingface_hub.constants.is_offline_mode()
    model = ViT.from_preset("hf://someone/tiny-vit")
    assert _max_diff(_outputs(model), hf_vit[1]) < TOLERANCE
    # read_checkpoint takes the same handles.
    model = read_checkpoint("hf://someone/tiny-vit")
    assert isinstance(model, ViT)
    assert _max_diff(_outputs(model), hf_vit[1]) < TOLERANCE
    with pytest.raises(
        ValueError,
        match="Cannot download hf://someone/missing .*LocalEntryNotFound",
    ):
        ViT.from_preset("hf://someone/missing")


def test_kaggle_handle_goes_through_kagglehub(keras_hub_presets, monkeypatch):
    kagglehub = pytest.importorskip("kagglehub")
    calls = []

    def model_download(handle):
        calls.append(handle)
        return keras_hub_presets["vit"][0]

    monkeypatch.setattr(kagglehub, "model_download", model_download)
    model = ViT.from_preset("kaggle://someone/vit/keras/tiny/2")
    assert calls == ["someone/vit/keras/tiny/2"]
    expected = keras_hub_presets["vit"][1]
    assert _max_diff(_outputs(model), expected) < TOLERANCE
    model = read_checkpoint("kaggle://someone/vit/keras/tiny/2", "vit")
    assert _max_diff(_outputs(model), expected) < TOLERANCE

    def gated(handle):
        raise PermissionError("403 Client Error")

    monkeypatch.setattr(kagglehub, "model_download", gated)
    with pytest.raises(ValueError, match="Cannot download kaggle://.*403"):
        ViT.from_preset("kaggle://someone/vit/keras/tiny")


def test_handles_without_their_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    monkeypatch.setitem(sys.modules, "kagglehub", None)
    with pytest.raises(ValueError, match="needs the huggingface_hub package"):
        T5.from_preset("hf://someone/t5")
    with pytest.raises(ValueError, match="needs the kagglehub package"):
        T5.from_preset("kaggle://someone/t5/keras/tiny")


@pytest.mark.parametrize(
    "preset, message",
    [
        ("hf://only-a-name", "A Hugging Face handle is hf://org/name"),
        ("hf://a/b/c", "A Hugging Face handle is hf://org/name"),
        ("kaggle://a/b", "A Kaggle handle is kaggle://org/model/keras"),
        ("ftp://host/preset", "Unknown preset scheme 'ftp'"),
    ],
)
def test_malformed_handles(preset, message):
    with pytest.raises(ValueError, match=message) as error:
        T5.from_preset(preset)
    assert preset in str(error.value)


# --------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize(
    "model_class, name, points_to",
    [
        (T5, "t5_small", r"T5\.from_architecture\('t5_small'\)"),
        (T5, "t5_tiny", r"T5\.from_architecture\('t5_tiny'\)"),
        (ViT, "vit_b16", r"ViT\.from_architecture\('vit_b16'\)"),
        (ViT, "t5_base", r"T5\.from_architecture\('t5_base'\)"),
        (
            VisionLanguageModel,
            "vit_tiny",
            r"VisionLanguageModel\.from_architectures",
        ),
    ],
)
def test_architecture_names_point_to_from_architecture(
    model_class, name, points_to
):
    with pytest.raises(ValueError, match=points_to) as error:
        model_class.from_preset(name)
    assert "not a preset with weights" in str(error.value)


def test_bad_arguments(tmp_path):
    missing = str(tmp_path / "missing")
    with pytest.raises(ValueError, match=f"No preset at '{missing}'"):
        T5.from_preset(missing)
    with pytest.raises(ValueError, match="preset must be a directory"):
        T5.from_preset(42)
    with pytest.raises(ValueError, match="preset must be a directory"):
        T5.from_preset("")
    with pytest.raises(ValueError, match=r"received \['vocab_size'\]"):
        T5.from_preset(str(tmp_path), vocab_size=10)
    model = _vit("dense")
    with pytest.raises(ValueError, match="preset_dir must be a directory"):
        model.save_to_preset("")
    with pytest.raises(ValueError, match="overwrite must be a bool"):
        model.save_to_preset(str(tmp_path / "p"), overwrite="yes")
    with pytest.raises(ValueError, match="loader must be callable"):
        presets.register_preset_loader("not a function")
    # An empty directory is no preset of any format.
    with pytest.raises(ValueError, match="no keras_moe reader accepts"):
        T5.from_preset(str(tmp_path))


def test_broken_presets_raise(tmp_path):
    model = _t5("dense")
    path = tmp_path / "t5"
    model.save_to_preset(path)
    with pytest.raises(ValueError, match="holds a T5 preset, not a ViT"):
        read_checkpoint(path, architecture="vit")
    with pytest.raises(ValueError, match="config disagrees .*'vocab_size'"):
        read_checkpoint(path, config={"vocab_size": 64})
    agreeing = read_checkpoint(path, config="t5_v1_1_tiny")
    np.testing.assert_array_equal(_outputs(agreeing), _outputs(model))

    weights = path / "model.weights.h5"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.weights.h5 .truncated"):
        T5.from_preset(path)
    os.remove(weights)
    with pytest.raises(ValueError, match="no model.weights.h5"):
        T5.from_preset(path)

    # Weights of another configuration: more or fewer blocks than the
    # weights (Keras alone would ignore the extra ones), other shapes.
    other = tmp_path / "other"
    _t5("dense").save_to_preset(other)
    saved = json.loads((other / "config.json").read_text())
    for change, message in (
        ({"num_decoder_layers": 3}, "holds 52 variables, the T5 .* has 66"),
        ({"num_decoder_layers": 1}, "holds 52 variables, the T5 .* has 38"),
        ({"hidden_dim": 48}, "model.weights.h5 into the T5"),
    ):
        config = json.loads(json.dumps(saved))
        config["config"].update(change)
        (other / "config.json").write_text(json.dumps(config))
        with pytest.raises(ValueError, match=f"Cannot load .*{message}"):
            T5.from_preset(other)
    config["registered_name"] = "keras_moe>Unknown"
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="describes 'keras_moe>Unknown'"):
        read_keras_moe_preset(other)


def test_from_preset_needs_a_registered_loader(tmp_path, monkeypatch):
    # `import keras_moe` (and any keras_moe module, whose package imports
    # the checkpoints) registers the loader.
    assert presets.preset_loader() is load_preset
    path = str(tmp_path / "vit")
    _vit("dense").save_to_preset(path)
    monkeypatch.setattr(presets, "_LOADER", None)
    with pytest.raises(ValueError, match="no preset loader is registered"):
        ViT.from_preset(path)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))
