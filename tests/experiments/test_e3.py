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
    total = len(data["x_up"]) + len(data["x_down"]) + len(data["x_test"])
    assert total == known == 1443
    assert len(data["x_up"]) == len(data["x_down"]) == 541
    assert len(data["x_near"]) == int(np.sum(labels >= 8)) == 354
    assert len(data["x_far"]) == 2 * e3.FAR_OOD_PHOTO
    # Upstream, downstream and test images are disjoint (no image repeats
    # among the 0-7 digits that is not a true duplicate of the data set).
    flat = {
        key: {x.tobytes() for x in data[key]}
        for key in ("x_up", "x_down", "x_test")
    }
    all_known = load_digits().images[labels < 8] / 16.0
    distinct = len(
        {x.astype(np.float32)[..., None].tobytes() for x in all_known}
    )
    assert len(flat["x_up"] | flat["x_down"] | flat["x_test"]) == distinct
    # Stratified splits: each class's share is the same in all three.
    shares = [
        np.bincount(data[key]) / len(data[key])
        for key in ("y_up", "y_down", "y_test")
    ]
    for share in shares[1:]:
        np.testing.assert_allclose(share, shares[0], atol=0.01)
    assert abs(len(data["x_test"]) / known - 0.25) < 0.01
    for key in ("x_up", "x_down", "x_test", "x_near", "x_far"):
        x = data[key]
        assert x.dtype == np.float32 and x.shape[1:] == (8, 8, 1)
        assert x.min() >= 0.0 and x.max() <= 1.0
    # Grey levels 0..16 scaled by 1/16.
    np.testing.assert_array_equal(
        np.unique(data["x_up"] * 16), np.arange(17, dtype=np.float32)
    )
    noise = data["x_far"][e3.FAR_OOD_PHOTO :]
    assert abs(float(noise.mean()) - 0.5) < 0.02


def test_shift_images_matches_a_pixel_loop():
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(9, 4, 5, 2)).astype(np.float32)
    shifts = np.array([(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)])
    out = e3.shift_images(images, shifts)
    expected = np.zeros_like(images)
    for n, (dy, dx) in enumerate(shifts):
        for i in range(4):
            for j in range(5):
                if 0 <= i - dy < 4 and 0 <= j - dx < 5:
                    expected[n, i, j] = images[n, i - dy, j - dx]
    np.testing.assert_array_equal(out, expected)
    with pytest.raises(ValueError, match="values in"):
        e3.shift_images(images[:1], [[2, 0]])
    with pytest.raises(ValueError, match="shifts must be"):
        e3.shift_images(images, shifts[:3])


def test_batches_are_fixed_by_seed_and_stream(data):
    x, y = e3.upstream_batches(data, 3, 8, seed=0, stream="pretrain")
    again, _ = e3.upstream_batches(data, 3, 8, seed=0, stream="pretrain")
    other, _ = e3.upstream_batches(data, 3, 8, seed=0, stream="continue")
    assert x.shape == (24, 8, 8, 1) and y.shape == (24,)
    np.testing.assert_array_equal(x, again)
    assert not np.array_equal(x, other)
    # Every upstream example is an upstream image shifted by at most one
    # pixel, with its label.
    shifts = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    for image, label in zip(x, y):
        found = [
            index
            for index in range(len(data["x_up"]))
            for dy, dx in shifts
            if np.array_equal(
                e3.shift_images(data["x_up"][index : index + 1], [(dy, dx)])[0],
                image,
            )
        ]
        assert found and all(data["y_up"][i] == label for i in found)
    # Downstream: each epoch is a permutation of the downstream images.
    count = len(data["x_down"])
    x, y = e3.downstream_batches(data, count // 4 + 3, 8, seed=1)
    keys = [image.tobytes() + bytes([int(lab)]) for image, lab in zip(x, y)]
    first = sorted(keys[:count])
    expected = sorted(
        image.tobytes() + bytes([int(lab)])
        for image, lab in zip(data["x_down"], data["y_down"])
    )
    assert first == expected
    assert len(keys) == (count // 4 + 3) * 8


@pytest.mark.parametrize(
    "num_layers, last_n, blocks",
    [(8, 2, (5, 7)), (8, 1, (7,)), (4, 2, (1, 3)), (7, 3, (2, 4, 6))],
)
def test_alternating_last_n(num_layers, last_n, blocks):
    assert e3.alternating_last_n(num_layers, last_n) == blocks


def test_alternating_last_n_refuses_too_many_blocks():
    with pytest.raises(ValueError, match="last_n must be in"):
        e3.alternating_last_n(8, 5)
    with pytest.raises(ValueError, match="last_n must be in"):
        e3.alternating_last_n(8, 0)


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
    config = e3.DEFAULT
    assert config.moe_blocks == (5, 7)
    dense = ViT(**e3.model_kwargs("dense", config))
    assert not any(isinstance(b.mlp, MoeLayer) for b in dense.blocks)
    for kind, k in (("vmoe_k1", 1), ("vmoe_k2", 2)):
        model = ViT(**e3.model_kwargs(kind, config))
        layers = [b.mlp for b in model.blocks]
        moe = [i for i, layer in enumerate(layers) if type(layer) is MoeLayer]
        assert moe == [5, 7]
        for index in moe:
            layer = layers[index]
            assert layer.num_selected_experts == k
            assert layer.num_experts == 8
            assert layer.router_type == "tokens_choose"
            assert layer.noise_std == 1.0 / 8
            assert layer.loss_weights == {
                "router_z_loss": 0.0,
                "load_balancing_loss": 0.0,
                "importance_loss": 0.005,
                "load_loss": 0.005,
            }
            assert layer.train_capacity_factor == 1.5
    model = ViT(**e3.model_kwargs("e3_m2_k1", config))
    assert model.ensemble_size == 2
    layers = [b.mlp for b in model.blocks]
    ensemble = [
        i for i, layer in enumerate(layers) if isinstance(layer, MoeLayer)
    ]
    assert ensemble == [5, 7]
    for index in ensemble:
        layer = layers[index]
        assert isinstance(layer, EnsembleMoeLayer)
        assert layer.experts_per_member == 4
        assert layer.num_selected_experts == 1
        # vmoe: 1 / (E/M).
        assert layer.noise_std == 0.25
        assert layer.loss_weights["load_loss"] == 0.005
    with pytest.raises(ValueError, match="model kind must be one of"):
        e3.model_kwargs("ensemble_2x_vmoe_k1", config)


def test_upcycled_models_start_as_the_dense_model(data):
    """With no token dropped (small config: C = S), renormalised combine
    weights and experts copied from the dense MLP, both upcycled models
    predict exactly what the dense ViT predicts."""
    keras.utils.set_random_seed(0)
    dense = ViT(**e3.model_kwargs("dense", e3.SMALL))
    # A head that is not zero, so predictions are not uniform.
    dense.head.kernel.assign(
        np.random.default_rng(0).normal(size=dense.head.kernel.shape)
    )
    x = data["x_test"][:16]
    want = keras.ops.convert_to_numpy(dense(x))
    for kind in e3.UPCYCLED_MODELS[1:]:
        model = e3.upcycled_model(dense, kind, e3.SMALL, seed=1)
        layers = [b.mlp for b in model.blocks if isinstance(b.mlp, MoeLayer)]
        assert [i for i, b in enumerate(model.blocks) if b.mlp in layers] == [
            1,
            3,
        ]
        # Noise std 1 / (experts a token chooses among): E/M=2 or E=4.
        if kind == "upcycled_e3_m2_k1":
            assert model.ensemble_size == 2
            assert all(layer.num_selected_experts == 1 for layer in layers)
            assert all(layer.noise_std == 0.5 for layer in layers)
        else:
            assert model.ensemble_size == 1
            assert all(layer.num_selected_experts == 2 for layer in layers)
            assert all(layer.noise_std == 0.25 for layer in layers)
        got = keras.ops.convert_to_numpy(model(x))
        # E^3 returns log(mean_m softmax): compare log-probabilities.
        np.testing.assert_allclose(
            got - np.log(np.exp(got).sum(1, keepdims=True)),
            want - np.log(np.exp(want).sum(1, keepdims=True)),
            rtol=1e-5,
            atol=1e-5,
        )
    with pytest.raises(ValueError, match="upcycled kind must be one of"):
        e3.upcycled_model(dense, "dense_continued", e3.SMALL, seed=1)


def test_active_flops_count_each_token_through_its_k_experts():
    config = e3.DEFAULT
    dense = flops.flops_per_prediction(ViT(**e3.model_kwargs("dense", config)))
    tokens = (8 // config.patch_size) ** 2 + 1
    router = 2 * tokens * config.model_dim * config.num_experts
    mlp = 2 * 2 * tokens * config.model_dim * config.hidden_dim
    blocks = len(config.moe_blocks)
    k1 = ViT(**e3.model_kwargs("vmoe_k1", config))
    k2 = ViT(**e3.model_kwargs("vmoe_k2", config))
    # K=1: the dense MLP's work plus the routers; K=2: one more MLP pass.
    assert e3.active_flops(k1) == dense + blocks * router
    assert e3.active_flops(k2) == dense + blocks * (router + mlp)
    # Total counts every capacity slot: ceil(K * 17 * 2.0 / 8) per expert.
    slots = 8 * (-(-1 * tokens * 2 // 8))
    assert flops.flops_per_prediction(k1) == dense + blocks * (
        router + (slots - tokens) * mlp // tokens
    )


def test_runner_init_and_fresh_optimizer_per_phase():
    runner = e3._Runner(
        lambda: ViT(**e3.model_kwargs("vmoe_k1", e3.SMALL)), e3.SMALL
    )
    optimizer = runner.model.optimizer
    for variable in runner.model.weights + list(optimizer.variables):
        variable.assign(np.full(variable.shape, 7, variable.dtype))
    runner.init(3)
    keras.utils.set_random_seed(3)
    fresh = ViT(**e3.model_kwargs("vmoe_k1", e3.SMALL))
    for got, want in zip(runner.model.get_weights(), fresh.get_weights()):
        np.testing.assert_array_equal(got, want)
    runner.reset_head()
    assert not np.any(runner.model.head.kernel.numpy())
    x = np.random.default_rng(0).uniform(size=(16, 8, 8, 1)).astype("float32")
    y = np.arange(16) % 8
    runner.train(x, y, learning_rate=1e-4)
    # One step from the state of a new Adam: step 1, the given rate, and
    # first moments (1 - beta_1) * gradient, not 7.
    assert int(optimizer.iterations) == 1
    assert float(optimizer.learning_rate) == pytest.approx(1e-4)
    moments = [v.numpy() for v in optimizer.variables if "momentum" in v.path]
    assert moments and all(np.abs(m).max() < 1.0 for m in moments)


def test_paired_differences_match_a_hand_example():
    rows = [
        {"model": "a", "seed": 0, "nll": 0.5},
        {"model": "b", "seed": 0, "nll": 0.7},
        {"model": "a", "seed": 1, "nll": 0.4},
        {"model": "b", "seed": 1, "nll": 0.3},
        {"model": "a", "seed": 2, "nll": 0.9},
        {"model": "b", "seed": 2, "nll": 0.9},
    ]
    per_seed, summary = e3.paired_differences(rows, [("a", "b")], ["nll"])
    # Differences -0.2, +0.1, 0.0: mean -1/30, sample std sqrt(7/300).
    assert [round(r["difference"], 10) for r in per_seed] == [-0.2, 0.1, 0.0]
    (item,) = summary
    assert item["mean"] == pytest.approx(-1 / 30)
    assert item["std"] == pytest.approx(np.sqrt(7 / 300))
    assert item["n"] == 3


def test_upcycle_steps_spend_equal_extra_flops():
    config = e3.Config(pretrain_steps=400, upcycle_budget=0.5)
    steps = e3.upcycle_steps(
        config,
        {
            "dense": 100,
            "dense_continued": 100,
            "upcycled_vmoe_k2": 125,
            "upcycled_e3_m2_k1": 160,
        },
    )
    assert steps == {
        "dense_continued": 200,
        "upcycled_vmoe_k2": 160,
        "upcycled_e3_m2_k1": 125,
    }


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("e3") / "out"
    result = e3.run(output_dir, seeds=(0, 1), small=True)
    return output_dir, result


@pytest.mark.slow
def test_small_run_writes_consistent_results(small_run):
    output_dir, result = small_run
    assert sorted(os.listdir(output_dir)) == [
        "e3_quality_vs_flops.png",
        "paired.csv",
        "results.csv",
        "results.md",
    ]
    with open(output_dir / "e3_quality_vs_flops.png", "rb") as f:
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
    # pays for its two V-MoEs; upcycled models cost their from-scratch
    # twins; the active count never exceeds the total.
    by_model = {r["model"]: r for r in rows if r["seed"] == "0"}
    for kind in ("dense", "vmoe_k1", "vmoe_k2", "e3_m2_k1"):
        model = ViT(**e3.model_kwargs(kind, e3.SMALL))
        assert int(by_model[kind]["flops"]) == flops.flops_per_prediction(model)
        assert int(by_model[kind]["active_flops"]) == e3.active_flops(model)
    assert int(by_model["ensemble_2x_vmoe_k1"]["flops"]) == 2 * int(
        by_model["vmoe_k1"]["flops"]
    )
    for up, twin in (
        ("dense_continued", "dense"),
        ("upcycled_vmoe_k2", "vmoe_k2"),
        ("upcycled_e3_m2_k1", "e3_m2_k1"),
    ):
        assert by_model[up]["flops"] == by_model[twin]["flops"]
    for row in rows:
        assert int(row["active_flops"]) <= int(row["flops"])
    # Upstream steps: pre-training plus the equal-FLOPs extra budget.
    for kind, steps in result["steps"].items():
        assert int(by_model[kind]["upstream_steps"]) == (
            e3.SMALL.pretrain_steps + steps
        )

    # Paired differences: a - b of the CSV rows, seed by seed.
    paired = common.read_csv(output_dir / "paired.csv")
    assert len(paired) == len(e3.PAIRS) * len(e3.PAIRED_METRICS) * 2
    values = {(r["model"], r["seed"]): r for r in rows}
    for item in paired:
        a = float(values[(item["a"], item["seed"])][item["metric"]])
        b = float(values[(item["b"], item["seed"])][item["metric"]])
        assert float(item["difference"]) == pytest.approx(a - b)

    # The Markdown table: mean ± sample std of the CSV rows over seeds.
    text = (output_dir / "results.md").read_text(encoding="utf-8")
    for model in e3.MODELS:
        nll = np.array([float(r["nll"]) for r in rows if r["model"] == model])
        cell = f"{nll.mean():.3f} ± {nll.std(ddof=1):.3f}"
        line = next(x for x in text.splitlines() if x.startswith(f"| {model}"))
        assert cell in line, (cell, line)
        assert line.rstrip().endswith("| 2 |")
    first = e3.PAIRS[0]
    diffs = [
        float(r["difference"])
        for r in paired
        if (r["a"], r["b"], r["metric"]) == (*first, "nll")
    ]
    line = next(
        x
        for x in text.splitlines()
        if x.startswith(f"| {first[0]} - {first[1]} | NLL |")
    )
    cell = f"{np.mean(diffs):.3f} ± {np.std(diffs, ddof=1):.3f}"
    assert cell in line, (cell, line)


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
