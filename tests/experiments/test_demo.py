"""Tests of the main job: keras_moe/demo.py and `python -m apps.demo`.

The routing analysis is checked on hand-worked cases; the whole job runs
once with `--small` in a subprocess, and its printed table is recomputed
from the files it wrote (the pretrained checkpoint, both trained models,
FLOPs from keras_moe.models.flops).
"""

import json
import os
import re
import sys

import keras
import numpy as np
import pytest
from matplotlib import image as mpimg

import keras_moe
from keras_moe.checkpoints import read_checkpoint
from keras_moe.data import registry
from keras_moe.experiments import demo
from keras_moe.models.flops import training_step_flops
from keras_moe.models.vit import ViT
from tests.apps.app_runner import check_ok
from tests.apps.app_runner import run_app


def _moe_vit(router, **options):
    keras.utils.set_random_seed(0)
    dense = ViT(
        image_size=8,
        patch_size=2,
        num_channels=1,
        model_dim=16,
        num_heads=2,
        hidden_dim=32,
        num_layers=2,
        num_classes=10,
    )
    return keras_moe.upcycle(
        dense, num_experts=4, encoder_router=router, **options
    )


def _images(count=5):
    return np.random.default_rng(0).random((count, 8, 8, 1), "float32")


@pytest.mark.parametrize(
    "router, options, expected_rows",
    [
        # All router probabilities equal (zero kernel): each expert takes
        # the first C = ceil(17 * 2 / 4) = 9 tokens (ties go to the lower
        # position), in every image.
        ("experts_choose", {}, [[1.0] * 9 + [0.0] * 8] * 4),
        # Token choice, top-1: every token picks expert 0 (ties go to the
        # lower expert), which keeps the first C = 9 of them.
        (
            "tokens_choose",
            {"num_selected_experts": 1},
            [[1.0] * 9 + [0.0] * 8] + [[0.0] * 17] * 3,
        ),
    ],
)
def test_routing_by_position_hand_worked(router, options, expected_rows):
    model = _moe_vit(router, **options)
    layer = model.blocks[1].mlp
    layer.router.kernel.assign(np.zeros(layer.router.kernel.shape))
    heatmaps = demo.routing_by_position(model, _images(), batch_size=2)
    assert list(heatmaps) == [layer.path]
    np.testing.assert_array_equal(heatmaps[layer.path], expected_rows)
    # The layers are restored: no instance attribute is left behind.
    assert "call" not in vars(layer)


def test_routing_by_position_expert_choice_fills_every_slot():
    model = _moe_vit("experts_choose", expert_noise=0.3)
    layer = model.blocks[1].mlp
    layer.router.kernel.assign(
        np.random.default_rng(1).normal(size=layer.router.kernel.shape)
    )
    matrix = demo.routing_by_position(model, _images(7))[layer.path]
    assert matrix.shape == (4, 17)
    # Each expert takes C = 9 distinct tokens of every image.
    np.testing.assert_allclose(matrix.sum(axis=1), 9.0)
    assert 0.0 <= matrix.min() and matrix.max() <= 1.0
    assert matrix.std() > 0  # a trained-looking router does not tie


def test_routing_by_position_with_layers_compiled_by_xla():
    # On GPU and TPU the MoE layers route inside their own XLA functions;
    # the analysis routes eagerly and finds the same.
    images = _images(4)
    heatmaps = []
    for jit_compile in (False, True):
        model = _moe_vit(
            "experts_choose", moe_kwargs={"jit_compile": jit_compile}
        )
        layer = model.blocks[1].mlp
        layer.router.kernel.assign(
            np.random.default_rng(2).normal(size=layer.router.kernel.shape)
        )
        heatmaps.append(demo.routing_by_position(model, images)[layer.path])
    np.testing.assert_array_equal(heatmaps[0], heatmaps[1])


def test_routing_by_position_needs_moe_layers():
    with pytest.raises(ValueError, match="needs a model with MoE layers"):
        demo.routing_by_position(ViT.from_architecture("vit_tiny"), _images())


def test_markdown_table():
    row = {
        "model": "dense",
        "test_accuracy": 0.91234,
        "test_nll": 0.3,
        "test_ece": 0.05,
        "extra_tflops": 0.0123,
        "extra_steps": 1200,
        "parameters": 136138,
        "active_parameters": 136138,
    }
    lines = demo.markdown_table([row]).splitlines()
    assert lines[0].startswith("| model | test accuracy | test NLL |")
    assert lines[2] == (
        "| dense | 0.9123 | 0.3000 | 0.0500 | 0.012 | 1,200 | 136,138 | "
        "136,138 |"
    )


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"num_layers": 1}, "num_layers must be >= 2"),
        ({"num_experts": 1}, "num_experts must be >= 2"),
        ({"extra_compute": 0.0}, "extra_compute must be in"),
        ({"batch_size": 2.5}, "batch_size must be an int"),
        ({"learning_rate": -1.0}, "learning_rate must be > 0"),
        ({"optimizer_state": "tile"}, "optimizer_state must be one of"),
    ],
)
def test_demo_config_validation(overrides, match):
    with pytest.raises(ValueError, match=match):
        demo.DemoConfig(**overrides)


def test_run_refuses_a_file_as_output_dir(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        demo.run(str(tmp_path / "file"), config=demo.SMALL)


def _softmax_scores(logits, labels):
    logits = np.asarray(logits, np.float64)
    logits -= logits.max(-1, keepdims=True)
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    return (
        np.mean(probs.argmax(-1) == labels),
        -np.mean(np.log(probs[np.arange(len(labels)), labels])),
    )


def test_small_demo_end_to_end(tmp_path):
    data_dir = tmp_path / "tfds"
    registry.prepare("digits", str(data_dir))
    output_dir = tmp_path / "demo"
    process = check_ok(
        run_app(
            "demo",
            "--small",
            f"--output_dir={output_dir}",
            f"--tfds_data_dir={data_dir}",
            timeout=900,
            # `pip install keras-moe[demo]` is all the demo needs.
            extras=["demo"],
        )
    )
    out = process.stdout
    # Progress, the table, the served answer and where the files are.
    assert "pretraining a dense ViT" in out and "upcycled:" in out
    table = [line for line in out.splitlines() if line.startswith("|")]
    assert len(table) == 5 and table[0].startswith("| model |")
    served = re.search(
        r"served class (\d+) .* Keras model: class (\d+) .* = ([0-9.e+-]+)",
        out,
    )
    assert served, out
    assert served[1] == served[2] and float(served[3]) <= 1e-4
    assert "Files:" in out and str(output_dir) in out.splitlines()[-1]
    saved_model = output_dir / "serving" / "vit_moe" / "1"
    assert (saved_model / "saved_model.pb").is_file()

    for name in ("learning_curves.png", "routing.png"):
        assert mpimg.imread(output_dir / name).shape[0] > 100
    results = json.loads((output_dir / "results.json").read_text())
    assert (output_dir / "results.md").read_text().strip() == "\n".join(table)

    # The table's numbers, recomputed from the files the demo wrote.
    examples = list(registry.load("digits", "test", str(data_dir)))
    images = np.stack([e["image"].numpy() for e in examples]) / 255.0
    images = images.astype("float32")
    labels = np.array([e["label"].numpy() for e in examples])
    models = [
        read_checkpoint(str(output_dir / "dense_checkpoint")),
        keras.saving.load_model(output_dir / "dense.keras", compile=False),
        keras.saving.load_model(output_dir / "moe.keras", compile=False),
    ]
    rows = results["rows"]
    config = demo.SMALL
    for row, model in zip(rows, models):
        accuracy, nll = _softmax_scores(model(images), labels)
        np.testing.assert_allclose(row["test_accuracy"], accuracy, atol=1e-6)
        np.testing.assert_allclose(row["test_nll"], nll, rtol=1e-4)
        assert row["parameters"] == model.count_params()
        step_flops = config.batch_size * training_step_flops(model)
        np.testing.assert_allclose(
            row["extra_tflops"], row["extra_steps"] * step_flops / 1e12
        )
    # Equal extra compute: each continued run is within one evaluation
    # chunk of the budget, extra_compute x the pretraining FLOPs.
    budget = config.extra_compute * results["pretraining_tflops"]
    for row, model in zip(rows[1:], models[1:]):
        step = config.batch_size * training_step_flops(model) / 1e12
        chunk = step * row["extra_steps"] / config.eval_points
        assert abs(row["extra_tflops"] - budget) <= chunk
    assert rows[2]["active_parameters"] < rows[2]["parameters"]
    assert rows[0]["active_parameters"] == rows[0]["parameters"]
    routing = results["routing_by_position"]
    assert list(routing) == ["vit/block_1/mlp"]
    assert np.array(routing["vit/block_1/mlp"]).shape == (
        config.num_experts,
        17,
    )
    assert sorted(os.listdir(output_dir)) == sorted(
        [
            "dense.keras",
            "dense_checkpoint",
            "learning_curves.png",
            "moe.keras",
            "results.json",
            "results.md",
            "routing.png",
            "serving",
        ]
    )


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))
