"""Tests of the library functions behind the launchers (in-process).

The launchers themselves run in `test_launchers.py`; here the pieces are
checked against independent computations: Keras' own losses and metrics,
a model rebuilt by hand, and hand-made examples.
"""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_moe
from keras_moe import checkpoints
from keras_moe.data import specs
from keras_moe.evaluation import scoring
from keras_moe.models import moe_blocks
from keras_moe.models.t5 import T5
from keras_moe.models.vit import ViT
from keras_moe.training import callbacks
from keras_moe.training import fit
from keras_moe.utils import files


def _tiny_vit(**overrides):
    kwargs = dict(
        image_size=8,
        patch_size=2,
        num_channels=1,
        model_dim=16,
        num_heads=2,
        hidden_dim=32,
        num_layers=2,
        num_classes=10,
    )
    kwargs.update(overrides)
    keras.utils.set_random_seed(0)
    model = ViT(**kwargs)
    rng = np.random.default_rng(0)
    for weight in model.weights:  # zero heads and unit norms test little
        noise = rng.normal(scale=0.3, size=weight.shape)
        weight.assign(weight.numpy() + noise.astype("float32"))
    return model


def _images(count=6, seed=1):
    return np.random.default_rng(seed).random((count, 8, 8, 1), "float32")


def _rebuilt_by_hand(vit, eval_capacity_factor):
    """`vit` rebuilt from its config with the factor in every MoE block's
    kwargs, weights copied in order."""
    config = vit.get_config()
    config["encoder_moe_blocks"] = {
        index: dict(kwargs, eval_capacity_factor=eval_capacity_factor)
        for index, kwargs in config["encoder_moe_blocks"].items()
    }
    rebuilt = ViT.from_config(config)
    for target, source in zip(rebuilt.weights, vit.weights, strict=True):
        target.assign(source.numpy())
    return rebuilt


def test_with_eval_capacity_factor_matches_a_rebuild_by_hand():
    moe = keras_moe.upcycle(
        _tiny_vit(),
        num_experts=4,
        eval_capacity_factor=0.5,
        expert_noise=0.2,  # experts that differ
        moe_kwargs={"min_expert_capacity": 1},
        seed=3,
    )
    images = _images()
    rebuilt = moe_blocks.with_eval_capacity_factor(moe, None)
    assert [
        layer.eval_capacity_factor for layer in moe_blocks.moe_layers(rebuilt)
    ] == [None]
    assert moe.blocks[1].mlp.eval_capacity_factor == 0.5  # left untouched
    for a, b in zip(moe.weights, rebuilt.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    # The same model built by hand from the config gives the same outputs.
    np.testing.assert_allclose(
        rebuilt(images), _rebuilt_by_hand(moe, None)(images), atol=1e-6
    )
    # Capacity 0.5 drops tokens that no-drop keeps: the outputs differ.
    assert not np.allclose(moe(images), rebuilt(images), atol=1e-4)
    assert moe_blocks.with_eval_capacity_factor(rebuilt, None) is rebuilt
    dense = _tiny_vit()
    assert moe_blocks.with_eval_capacity_factor(dense, 2.0) is dense


def test_with_eval_capacity_factor_rejects_a_bad_factor():
    moe = keras_moe.upcycle(_tiny_vit(), num_experts=4)
    with pytest.raises(ValueError, match="capacity_factor"):
        moe_blocks.with_eval_capacity_factor(moe, -1.0)


def test_score_classifier_against_keras_metrics():
    model = _tiny_vit()
    images = _images(12)
    labels = np.arange(12) % 10
    dataset = [(images[:5], labels[:5]), (images[5:], labels[5:])]
    scores = scoring.score_classifier(model, dataset)
    logits = model(images)
    accuracy = keras.metrics.SparseCategoricalAccuracy()
    accuracy.update_state(labels, logits)
    nll = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(
        labels, logits
    )
    assert scores["examples"] == 12
    np.testing.assert_allclose(scores["accuracy"], accuracy.result(), atol=1e-7)
    np.testing.assert_allclose(scores["nll"], nll, rtol=1e-5)
    assert 0 <= scores["ece"] <= 1


def test_score_translation_against_keras_and_hand_made_targets():
    keras.utils.set_random_seed(0)
    model = T5.from_preset("t5_tiny", vocab_size=40)
    rng = np.random.default_rng(0)
    encoder = rng.integers(3, 40, size=(4, 6)).astype("int32")
    encoder[:, -1] = 1  # end of sequence
    # Targets: the model's own greedy output for rows 0 and 2 (exact
    # matches), one token changed in rows 1 and 3.
    generated = model.generate(encoder, 6).numpy()[:, 1:]  # (4, 5)
    targets = generated.copy()
    targets[1, 0] = (targets[1, 0] + 1) % 40 or 3
    targets[3, -1] = (targets[3, -1] + 1) % 40 or 3
    # Every position counts, whatever the ids (an EOS the model generated
    # is kept as it is).
    weights = np.ones(targets.shape, "float32")
    decoder = np.concatenate([np.zeros((4, 1), "int32"), targets[:, :-1]], 1)
    inputs = {"encoder_token_ids": encoder, "decoder_token_ids": decoder}
    scores = scoring.score_translation(
        model,
        [
            (
                {k: v[:2] for k, v in inputs.items()},
                targets[:2],
                weights[:2],
            ),
            ({k: v[2:] for k, v in inputs.items()}, targets[2:], weights[2:]),
        ],
    )
    logits = model(inputs)
    loss = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction="mean_with_sample_weight"
    )(targets, logits, sample_weight=weights)
    accuracy = keras.metrics.SparseCategoricalAccuracy()
    accuracy.update_state(targets, logits, sample_weight=weights)
    assert scores["examples"] == 4
    np.testing.assert_allclose(scores["loss"], loss, rtol=1e-5)
    np.testing.assert_allclose(
        scores["token_accuracy"], accuracy.result(), atol=1e-7
    )
    assert scores["exact_match"] == 0.5


def test_score_translation_skips_padding():
    keras.utils.set_random_seed(0)
    model = T5.from_preset("t5_tiny", vocab_size=40)
    encoder = np.array([[5, 6, 7, 1]], "int32")
    targets = np.array([[9, 1, 0, 0]], "int32")
    decoder = np.array([[0, 9, 1, 0]], "int32")
    weights = (targets != 0).astype("float32")
    inputs = {"encoder_token_ids": encoder, "decoder_token_ids": decoder}
    scores = scoring.score_translation(model, [(inputs, targets, weights)])
    logits = model(inputs).numpy().astype(np.float64)[0, :2]
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = -(log_probs[0, 9] + log_probs[1, 1]) / 2
    np.testing.assert_allclose(scores["loss"], expected, rtol=1e-5)


def test_load_model_reads_keras_files_and_checkpoints(tmp_path):
    model = _tiny_vit()
    path = files.save_keras(model, tmp_path / "sub" / "vit.keras")
    assert os.listdir(tmp_path / "sub") == ["vit.keras"]  # no temp left
    loaded = checkpoints.load_model(path, architecture="vit")
    np.testing.assert_allclose(loaded(_images()), model(_images()), atol=1e-6)
    with pytest.raises(ValueError, match="holds a vit model"):
        checkpoints.load_model(path, architecture="t5")
    with pytest.raises(ValueError, match="no model file"):
        checkpoints.load_model(tmp_path / "missing.keras")
    with pytest.raises(ValueError, match="does not exist"):
        checkpoints.load_model(tmp_path / "missing_checkpoint")
    (tmp_path / "bad.keras").write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="cannot load"):
        checkpoints.load_model(tmp_path / "bad.keras")


def test_check_model_fits_data():
    digits = specs.DataSpec(
        "digits",
        specs.CLASSIFICATION,
        "/unused",
        image_shape=(8, 8, 1),
        num_classes=10,
    )
    specs.check_model_fits_data(_tiny_vit(), digits)
    with pytest.raises(ValueError, match=r"images \(8, 8, 1\) and 10"):
        specs.check_model_fits_data(_tiny_vit(num_classes=4), digits)
    with pytest.raises(ValueError, match="needs a ViT"):
        specs.check_model_fits_data(T5.from_preset("t5_tiny"), digits)
    words = specs.DataSpec("number_words", specs.TRANSLATION, "/unused")
    with pytest.raises(ValueError, match="vocab_size=128"):
        specs.check_model_fits_data(T5.from_preset("t5_tiny"), words)
    with pytest.raises(ValueError, match="needs a T5"):
        specs.check_model_fits_data(_tiny_vit(), words)


def test_dense_model_fits_its_dataset():
    spec = specs.DataSpec(
        "composed_digits",
        specs.CLASSIFICATION,
        "/unused",
        image_shape=(8, 16, 1),
        num_classes=100,
    )
    model = fit.dense_model("vit", spec, {"model_dim": 16, "num_heads": 2})
    specs.check_model_fits_data(model, spec)
    assert model.image_hw == (8, 16) and model.num_layers == 4
    with pytest.raises(ValueError, match="architecture must be one of"):
        fit.dense_model("bert", spec)
    with pytest.raises(ValueError, match="T5 trains on 'number_words'"):
        fit.dense_model("t5", spec)


def test_describe_dataset_errors(tmp_path):
    with pytest.raises(ValueError, match="Unknown dataset 'nope'"):
        specs.describe_dataset("nope", str(tmp_path))
    spec = specs.describe_dataset("number_words", str(tmp_path))
    assert spec.kind == specs.TRANSLATION and spec.input_length == 16


def test_routing_stats_logger_writes_every_layer(tmp_path):
    model = keras_moe.upcycle(_tiny_vit(), num_experts=4, blocks="all")
    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    images = _images(8)
    model.fit(
        images,
        np.arange(8) % 10,
        epochs=2,
        batch_size=4,
        verbose=0,
        callbacks=[callbacks.RoutingStatsLogger(str(tmp_path))],
    )
    values = {}
    for name in os.listdir(tmp_path):
        for event in tf.compat.v1.train.summary_iterator(str(tmp_path / name)):
            for value in event.summary.value:
                values.setdefault(value.tag, []).append(
                    tf.make_ndarray(value.tensor)
                )
    for index in (0, 1):
        path = f"vit/block_{index}/mlp"
        # The value of the last epoch is the layer's routing_stats() now.
        stats = model.blocks[index].mlp.routing_stats()
        for name in ("dropped", "confidence", "max_load"):
            logged = values[f"routing/{path}/{name}"]
            assert len(logged) == 2
            np.testing.assert_allclose(logged[-1], stats[name], rtol=1e-6)
        assert f"routing/{path}/expert_usage" in values


def test_write_json_is_atomic(tmp_path):
    path = tmp_path / "deep" / "out.json"
    files.write_json(path, {"a": np.float32(0.5)})
    assert json.loads(path.read_text()) == {"a": 0.5}
    assert os.listdir(tmp_path / "deep") == ["out.json"]
