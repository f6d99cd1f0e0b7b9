"""The E^3 experiment: its data, metrics, model set-up, outputs and the
shared experiment helpers (aggregation, tables, atomic writes)."""

import os
import sys

import keras
import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.datasets import load_sample_images

from keras_moe.experiments import common
from keras_moe.experiments import e3
from keras_moe.layers.ensemble import EnsembleMoeLayer
from keras_moe.layers.moe import MoeLayer
from keras_moe.models import flops
from keras_moe.models.vit import ViT
from keras_moe.utils import files


@pytest.fixture(scope="module")
def data():
    return e3.load_data()


def test_data_splits(data):
    labels = load_digits().target
    known = int(np.sum(labels < 8))
    assert len(data["x_train"]) + len(data["x_test"]) == known == 1443
    assert len(data["x_near"]) == int(np.sum(labels >= 8)) == 354
    assert len(data["x_far"]) == 2 * e3.FAR_OOD_PHOTO
    assert set(np.unique(data["y_train"])) == set(range(8))
    # Stratified 25% test split: each class's share is the same in both.
    train_share = np.bincount(data["y_train"]) / len(data["y_train"])
    test_share = np.bincount(data["y_test"]) / len(data["y_test"])
    np.testing.assert_allclose(train_share, test_share, atol=0.01)
    assert abs(len(data["x_test"]) / known - 0.25) < 0.01
    for key in ("x_train", "x_test", "x_near", "x_far"):
        x = data[key]
        assert x.dtype == np.float32 and x.shape[1:] == (8, 8, 1)
        assert x.min() >= 0.0 and x.max() <= 1.0
    # Grey levels 0..16 scaled by 1/16.
    np.testing.assert_array_equal(
        np.unique(data["x_train"] * 16), np.arange(17, dtype=np.float32)
    )
    noise = data["x_far"][e3.FAR_OOD_PHOTO :]
    assert abs(float(noise.mean()) - 0.5) < 0.02


@pytest.mark.parametrize("index", [0, 1])
def test_photo_patches_are_block_means_of_a_grey_crop(data, index):
    """Patch i is the 4x4 block mean of some 32x32 crop of photo i % 2,
    found here by exhaustive search over crop positions."""
    photo = load_sample_images().images[index].astype(np.float64)
    grey = photo @ np.array([0.299, 0.587, 0.114]) / 255.0
    # Sums of every 4x4 window, from an integral image.
    integral = np.pad(grey.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    box = (
        integral[4:, 4:]
        - integral[:-4, 4:]
        - integral[4:, :-4]
        + integral[:-4, :-4]
    ) / 16.0
    tops = grey.shape[0] - 32 + 1
    lefts = grey.shape[1] - 32 + 1
    # candidates[t, l, a, b] = box[t + 4a, l + 4b]
    rows = np.arange(tops)[:, None, None, None] + 4 * np.arange(8)[:, None]
    cols = np.arange(lefts)[None, :, None, None] + 4 * np.arange(8)
    candidates = box[rows, cols]
    patch = data["x_far"][index, :, :, 0]
    error = np.abs(candidates - patch).max(axis=(2, 3))
    assert error.min() < 1e-6


def test_evaluate_matches_numpy(data):
    rng = np.random.default_rng(0)
    total = len(data["x_test"]) + len(data["x_near"]) + len(data["x_far"])
    logits = rng.normal(size=(total, 8)) * 3
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    result = e3.evaluate(probs, data)
    n_test, n_near = len(data["x_test"]), len(data["x_near"])
    test, labels = probs[:n_test], data["y_test"]
    assert result["error"] == pytest.approx(np.mean(test.argmax(1) != labels))
    assert result["nll"] == pytest.approx(
        -np.mean(np.log(test[np.arange(n_test), labels]))
    )
    assert result["brier"] == pytest.approx(
        np.mean(np.sum((test - np.eye(8)[labels]) ** 2, axis=1))
    )

    def auroc(ood):
        # P(an OOD input is less confident than an in-distribution one).
        diff = test.max(1)[:, None] - ood.max(1)[None, :]
        return np.mean(diff > 0) + 0.5 * np.mean(diff == 0)

    assert result["auroc_near"] == pytest.approx(
        auroc(probs[n_test : n_test + n_near])
    )
    assert result["auroc_far"] == pytest.approx(auroc(probs[n_test + n_near :]))
    assert 0.0 <= result["ece"] <= 1.0


def test_model_kinds():
    config = e3.SMALL
    assert config.moe_blocks == (0, 1)
    dense = ViT(**e3.model_kwargs("dense", config))
    assert not any(isinstance(b.mlp, MoeLayer) for b in dense.blocks)
    for kind, k in (("vmoe_k1", 1), ("vmoe_k2", 2)):
        model = ViT(**e3.model_kwargs(kind, config))
        layers = [b.mlp for b in model.blocks]
        assert all(type(layer) is MoeLayer for layer in layers)
        assert all(layer.num_selected_experts == k for layer in layers)
        assert all(layer.router_type == "tokens_choose" for layer in layers)
    model = ViT(**e3.model_kwargs("e3_m2_k1", config))
    assert model.ensemble_size == 2
    assert all(isinstance(b.mlp, EnsembleMoeLayer) for b in model.blocks)
    with pytest.raises(ValueError, match="model kind must be one of"):
        e3.model_kwargs("ensemble_2x_vmoe_k1", config)
    assert e3.DEFAULT.moe_blocks == (2, 3)


def test_runner_reset_restores_a_fresh_model_and_optimizer():
    runner = e3._Runner("vmoe_k1", e3.SMALL)
    optimizer = runner.model.optimizer
    for variable in runner.model.weights + [
        v for v in optimizer.variables if v is not optimizer.learning_rate
    ]:
        variable.assign(np.full(variable.shape, 7, variable.dtype))
    runner.reset(3)
    keras.utils.set_random_seed(3)
    fresh = ViT(**e3.model_kwargs("vmoe_k1", e3.SMALL))
    for got, want in zip(runner.model.get_weights(), fresh.get_weights()):
        np.testing.assert_array_equal(got, want)
    # The state of a new Adam built for the same variables: step 0, zero
    # moments, the configured learning rate.
    new = keras.optimizers.Adam(e3.SMALL.learning_rate)
    new.build(runner.model.trainable_variables)
    assert len(optimizer.variables) == len(new.variables)
    for got, want in zip(optimizer.variables, new.variables):
        np.testing.assert_array_equal(got.numpy(), want.numpy())
    assert int(optimizer.iterations) == 0


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("e3") / "out"
    result = e3.run(output_dir, seeds=(0, 1), small=True)
    return output_dir, result


@pytest.mark.slow
def test_small_run_writes_consistent_results(small_run):
    output_dir, result = small_run
    assert sorted(os.listdir(output_dir)) == [
        "e3_metrics.png",
        "e3_nll_vs_flops.png",
        "results.csv",
        "results.md",
    ]
    for name in ("e3_metrics.png", "e3_nll_vs_flops.png"):
        with open(output_dir / name, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    rows = common.read_csv(output_dir / "results.csv")
    assert [(r["model"], int(r["seed"])) for r in rows] == [
        (model, seed) for seed in (0, 1) for model in e3.MODELS
    ]
    assert len(result["rows"]) == len(rows)
    for row, returned in zip(rows, result["rows"]):
        for metric in e3.METRICS:
            assert float(row[metric]) == pytest.approx(returned[metric])
        assert 0 <= float(row["error"]) <= 1
        assert 0.0 <= float(row["auroc_near"]) <= 1.0

    # FLOPs per prediction: the counter on each model; the deep ensemble
    # pays for its two V-MoEs.
    by_model = {r["model"]: int(r["flops"]) for r in rows if r["seed"] == "0"}
    for kind in e3.MODELS[:-1]:
        model = ViT(**e3.model_kwargs(kind, e3.SMALL))
        assert by_model[kind] == flops.flops_per_prediction(model)
    assert by_model["ensemble_2x_vmoe_k1"] == 2 * by_model["vmoe_k1"]

    # The Markdown table: mean ± sample std of the CSV rows over seeds.
    text = (output_dir / "results.md").read_text(encoding="utf-8")
    for model in e3.MODELS:
        nll = np.array([float(r["nll"]) for r in rows if r["model"] == model])
        cell = f"{nll.mean():.3f} ± {nll.std(ddof=1):.3f}"
        line = next(x for x in text.splitlines() if x.startswith(f"| {model}"))
        assert cell in line, (cell, line)
        assert line.rstrip().endswith("| 2 |")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"options": {"router": "tokens_choose"}}, "does not support.*router"),
        ({"options": {"num_experts": 3}}, "num_experts must be an even int"),
        ({"options": {"capacity_factor": 0}}, "capacity_factor must be > 0"),
        ({"seeds": ()}, "seeds must be a non-empty sequence of ints"),
        ({"seeds": (0, 0)}, "seeds must be distinct"),
        ({"small": "yes"}, "small must be a bool"),
    ],
)
def test_bad_arguments_fail_before_any_work(tmp_path, kwargs, message):
    output_dir = tmp_path / "out"
    with pytest.raises(ValueError, match=message):
        e3.run(output_dir, **kwargs)
    assert not output_dir.exists()


def test_supported_options_change_the_config():
    config = e3._config(True, {"num_experts": 6, "capacity_factor": 1.5})
    assert config.num_experts == 6
    assert config.train_capacity_factor == config.eval_capacity_factor == 1.5
    assert config.num_layers == e3.SMALL.num_layers


def test_aggregate_and_markdown_table():
    rows = [
        {"model": "a", "seed": 0, "x": 1.0},
        {"model": "b", "seed": 0, "x": 5.0},
        {"model": "a", "seed": 1, "x": 2.0},
        {"model": "a", "seed": 2, "x": 6.0},
    ]
    summary = common.aggregate(rows, ("model",), ("x",))
    assert [s["model"] for s in summary] == ["a", "b"]
    assert summary[0]["n"] == 3 and summary[0]["x"] == pytest.approx(3.0)
    # Sample std of 1, 2, 6: sqrt(((-2)^2 + (-1)^2 + 3^2) / 2) = sqrt(7).
    assert summary[0]["x_std"] == pytest.approx(np.sqrt(7.0))
    assert summary[1]["x_std"] == 0.0
    assert common.format_mean_std(3.0, np.sqrt(7.0)) == "3.000 ± 2.646"
    assert common.format_flops(2_460_000) == "2.46 M"
    table = common.markdown_table(summary, ("model", "n"), ("Model", "N"))
    assert table == "| Model | N |\n|---|---|\n| a | 3 |\n| b | 1 |\n"


def test_writes_are_atomic(tmp_path):
    path = tmp_path / "results.csv"
    common.write_csv(path, [{"a": 1, "b": 2}, {"a": 3}])
    assert path.read_text() == "a,b\n1,2\n3,\n"
    with pytest.raises(RuntimeError):
        with files.atomic_path(path) as temp:
            with open(temp, "w") as f:
                f.write("half")
            raise RuntimeError("interrupted")
    # The old file is intact and no temporary file is left behind.
    assert path.read_text() == "a,b\n1,2\n3,\n"
    assert os.listdir(tmp_path) == ["results.csv"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is an existing file"):
        common.prepare_output_dir(tmp_path / "file")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))
