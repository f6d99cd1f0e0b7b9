"""The sparse-upcycling reproductions: option checks, compute accounting,
depth tiling, and both experiments end to end at smoke-test size."""

import math
import os
import re
import sys

import keras
import numpy as np
import pytest

from keras_moe.data import docstrings
from keras_moe.experiments import common
from keras_moe.experiments import upcycle_t5
from keras_moe.experiments import upcycle_vit
from keras_moe.experiments import upcycling_common as uc
from keras_moe.models import flops
from keras_moe.models.vit import ViT

BUDGETS = (0.0, *uc.DEFAULT_BUDGETS)
_TINY_VIT = dict(
    image_size=(8, 16),
    patch_size=4,
    num_channels=1,
    model_dim=8,
    num_heads=2,
    hidden_dim=16,
    num_layers=2,
    num_classes=5,
    pooling="gap",
)


# --------------------------------------------------------------------------
# Options: every bad value fails before anything is written.


@pytest.mark.parametrize("module", [upcycle_vit, upcycle_t5])
@pytest.mark.parametrize(
    "options, message",
    [
        ({"num_expert": 8}, "does not support option.*num_expert"),
        ({"num_experts": 0}, "num_experts must be >= 1"),
        ({"num_experts": 2.5}, "num_experts must be an int"),
        ({"capacity_factor": 0}, "capacity_factor must be a number > 0"),
        ({"capacity_factor": "2"}, "capacity_factor must be a number > 0"),
        ({"router": "top1"}, "router must be one of"),
        ({"moe_blocks": "odd"}, "moe_blocks must be"),
        ({"moe_blocks": "last_n:9"}, "moe_blocks='last_n:9' does not fit"),
        ({"expert_noise": -0.1}, "expert_noise must be a number >= 0"),
        ({"reinit_fraction": 1.5}, r"reinit_fraction must be .* \[0, 1\]"),
        ({"reuse_optimizer_state": "no"}, "reuse_optimizer_state must be"),
        ({"optimizer_state": "tile"}, "optimizer_state must be one of"),
        ({"normalize_combine_weights": 1}, "normalize_combine_weights must"),
        ({"budgets": []}, "budgets must be a non-empty list"),
        ({"budgets": [0.5, -1]}, "budgets must be a non-empty list"),
        ({"budgets": 0.5}, "budgets must be a list"),
        ({"budgets": [0.5, 0.5]}, "budgets repeats a value"),
    ],
)
def test_bad_options_fail_before_any_work(tmp_path, module, options, message):
    output_dir = tmp_path / "out"
    with pytest.raises(ValueError, match=message):
        module.run(output_dir, seeds=(0,), small=True, options=options)
    assert not output_dir.exists()
    with pytest.raises(ValueError, match=message):
        module.validate_options(options)


@pytest.mark.parametrize("module", [upcycle_vit, upcycle_t5])
def test_bad_arguments_fail_before_any_work(tmp_path, module):
    output_dir = tmp_path / "out"
    with pytest.raises(ValueError, match="small must be a bool"):
        module.run(output_dir, small="yes")
    with pytest.raises(ValueError, match="seeds must be distinct"):
        module.run(output_dir, seeds=(1, 1), small=True)
    assert not output_dir.exists()


def test_options_become_settings():
    settings = uc.parse_options(
        "x",
        {
            "num_experts": 4,
            "router": "tokens_choose",
            "moe_blocks": "last_n:1",
            "budgets": (1.0, 0.2),
            "reuse_optimizer_state": False,
        },
        {"encoder": 4},
    )
    assert settings.budgets == (0.2, 1.0)
    assert not settings.reuse_optimizer_state
    kwargs = settings.upcycle_kwargs(seed=3, moe_kwargs={"a": 1})
    assert kwargs["blocks"] == "last_n" and kwargs["last_n"] == 1
    assert kwargs["encoder_router"] == "tokens_choose"
    assert kwargs["num_selected_experts"] == 2
    assert kwargs["train_capacity_factor"] == 2.0
    assert kwargs["seed"] == 3 and kwargs["moe_kwargs"] == {"a": 1}
    # Token choice picks at most E experts.
    one = uc.parse_options("x", {"num_experts": 1}, {"encoder": 4})
    assert one.upcycle_kwargs(0)["num_selected_experts"] == 1
    assert uc.parse_options("x", None, {"encoder": 4}) == uc.Settings()
    # Combine weights: the paper's per-stack choice unless set.
    assert kwargs["normalize_combine_weights"] is None
    normalized = uc.parse_options(
        "x", {"normalize_combine_weights": True}, {"encoder": 4}
    )
    assert normalized.upcycle_kwargs(0)["normalize_combine_weights"] is True
    assert "combine weights normalised True" in normalized.describe()


# --------------------------------------------------------------------------
# Training machinery.


def test_steps_for_flops_rounds_to_the_nearest_step():
    assert uc.steps_for_flops(0, 7) == 0
    assert uc.steps_for_flops(1000, 300) == 3  # 3.33 steps
    assert uc.steps_for_flops(1000, 450) == 2  # 2.22 steps
    assert uc.steps_for_flops(1050, 300) == 4  # 3.5 steps: half rounds up
    with pytest.raises(ValueError, match="step_flops must be > 0"):
        uc.steps_for_flops(10, 0)


def test_make_optimizer_round_trips_its_schedule():
    optimizer = uc.make_optimizer(0.01, 4)
    copy = optimizer.__class__.from_config(optimizer.get_config())
    assert float(copy.learning_rate) == pytest.approx(0.0025)  # step 0


def _sgd_trainer(model, step_flops=10):
    def loss_fn(model, x, y):
        return keras.ops.mean((model(x, training=True)[:, 0] - y) ** 2)

    return uc.Trainer(
        model, keras.optimizers.Adam(0.01), loss_fn, step_flops, False
    )


def _batches(seed=0):
    rng = np.random.default_rng(seed)
    while True:
        x = rng.uniform(size=(4, 8, 16, 1)).astype("float32")
        yield x, rng.normal(size=(4,)).astype("float32")


def test_trainer_counts_steps_and_restores_snapshots():
    keras.utils.set_random_seed(0)
    trainer = _sgd_trainer(ViT(**_TINY_VIT), step_flops=7)
    trainer.train(_batches(), 3)
    assert trainer.steps == 3 and trainer.flops == 21
    assert int(trainer.optimizer.iterations) == 3
    before = trainer.snapshot()
    trainer.train(_batches(1), 2)
    assert trainer.steps == 5
    trainer.restore(before)
    assert trainer.steps == 3 and int(trainer.optimizer.iterations) == 3
    for a, b in zip(trainer.model.get_weights(), before[0]):
        np.testing.assert_array_equal(a, b)
    # `load` copies another model and optimizer of the architecture.
    other = ViT(**_TINY_VIT)
    other_trainer = _sgd_trainer(other)
    other_trainer.train(_batches(2), 1)
    trainer.load(other, other_trainer.optimizer)
    assert trainer.steps == 0 and int(trainer.optimizer.iterations) == 1
    for a, b in zip(trainer.model.get_weights(), other.get_weights()):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="architectures differ"):
        trainer.load(
            ViT(**dict(_TINY_VIT, num_layers=3)), keras.optimizers.Adam()
        )


def test_architecture_key_ignores_names_and_seeds():
    a = ViT(**_TINY_VIT, name="a")
    b = ViT(**_TINY_VIT, name="b")
    assert uc.architecture_key(a.get_config()) == uc.architecture_key(
        b.get_config()
    )
    moe = {1: {"num_experts": 4, "seed": 0, "router_kernel_initializer": 0}}
    other = {1: {"num_experts": 4, "seed": 5, "router_kernel_initializer": 1}}
    wider = {1: {"num_experts": 8, "seed": 0}}
    key = uc.architecture_key
    assert key({"m": moe}) == key({"m": other}) != key({"m": wider})


# --------------------------------------------------------------------------
# Dense upcycling by depth tiling.


def test_tiled_sources():
    assert uc.tiled_sources(4, 4) == [0, 1, 2, 3]
    assert uc.tiled_sources(4, 5) == [0, 0, 1, 2, 3]
    assert uc.tiled_sources(2, 4) == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="cannot be shallower"):
        uc.tiled_sources(4, 3)


def test_depth_tile_copies_blocks_and_optimizer_state():
    keras.utils.set_random_seed(1)
    dense = ViT(**_TINY_VIT)
    trainer = _sgd_trainer(dense)
    trainer.train(_batches(), 2)
    tiled, name_map = uc.depth_tile(dense, 2)  # 2 -> 4 blocks: 0 0 1 1
    assert tiled.num_layers == 4
    source = dense.canonical_variables()
    sources = [0, 0, 1, 1]
    for name, variable in tiled.canonical_variables().items():
        match = re.match(r"^encoder/block_(\d+)/(.*)$", name)
        expected = name
        if match:
            expected = f"encoder/block_{sources[int(match[1])]}/{match[2]}"
        assert name_map[name] == expected
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(variable),
            keras.ops.convert_to_numpy(source[expected]),
        )
    optimizer = uc.tile_optimizer(trainer.optimizer, dense, tiled, name_map)
    assert int(optimizer.iterations) == 2
    tiled_vars = tiled.canonical_variables()
    dense_opt = trainer.optimizer
    dense_slots = uc._slot_lists(dense_opt)
    tiled_slots = uc._slot_lists(optimizer)
    assert len(tiled_slots) == 2  # Adam's two moments
    for name in (
        "encoder/block_1/mlp/wi",
        "encoder/block_3/attention/query/kernel",
    ):
        src = dense_opt._get_variable_index(source[name_map[name]])
        dst = optimizer._get_variable_index(tiled_vars[name])
        for attr, slots in tiled_slots.items():
            want = keras.ops.convert_to_numpy(dense_slots[attr][src])
            got = keras.ops.convert_to_numpy(slots[dst])
            assert np.any(want != 0)
            np.testing.assert_array_equal(got, want)
    # No extra block: the same function.
    same, _ = uc.depth_tile(dense, 0)
    x = next(_batches())[0]
    np.testing.assert_allclose(same(x), dense(x), atol=1e-6)


def test_matched_depth_is_the_nearest_in_flops():
    dense = ViT(**dict(_TINY_VIT, num_layers=4))

    def step_flops(model):
        return flops.training_step_flops(model)

    per_block = step_flops(ViT(**dict(_TINY_VIT, num_layers=5))) - step_flops(
        dense
    )
    base = step_flops(dense)
    for blocks in (1.2, 1.6, 2.4, 3.0):
        extra = uc.matched_extra_layers(
            dense, base + blocks * per_block, step_flops
        )
        assert extra == max(1, math.floor(blocks + 0.5))


# --------------------------------------------------------------------------
# FLOPs of a training step, counted by hand for the smoke-test ViTs.


def _vit_step_flops(config, batch, moe_blocks=(), experts=8, factor=2.0):
    """3 x forward matmul FLOPs: patch embedding, attention projections and
    scores, MLPs (E * C slots in MoE blocks) and routers, head."""
    d, h = config["model_dim"], config["hidden_dim"]
    height, width = config["image_size"]
    tokens = (height // config["patch_size"]) * (width // config["patch_size"])
    total = 2 * tokens * config["patch_size"] ** 2 * d  # 1 channel
    for block in range(config["num_layers"]):
        total += 8 * tokens * d * d + 4 * tokens * tokens * d
        if block in moe_blocks:
            capacity = max(1, math.ceil(tokens * factor / experts))
            total += experts * capacity * 4 * d * h + 2 * tokens * d * experts
        else:
            total += 4 * tokens * d * h
    total += 2 * d * config["num_classes"]
    return 3 * batch * total


# --------------------------------------------------------------------------
# End to end at smoke-test size.


def _run(module, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp(module.NAME)
    result = module.run(output_dir, seeds=(0,), small=True)
    return output_dir, result


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory):
    return _run(upcycle_vit, tmp_path_factory)


@pytest.fixture(scope="module")
def t5_run(tmp_path_factory):
    return _run(upcycle_t5, tmp_path_factory)


# The ViT runs the converged protocol: the re-warmed arms start at +10%.
_VIT_ARMS = tuple(
    arm
    for arm in uc.CONVERGED_ARMS
    if arm != "dense_tiled"
    and (arm != "upcycled_reset" or upcycle_vit.CONFIGS["small"]["reset_arm"])
)


def _vit_rows_expected():
    return {
        (arm, budget)
        for arm in _VIT_ARMS
        for budget in BUDGETS
        if budget > 0 or not arm.endswith("_rewarm")
    }


@pytest.mark.slow
def test_vit_smoke_run_writes_every_arm_and_budget(vit_run):
    output_dir, result = vit_run
    names = sorted(os.listdir(output_dir))
    assert names == sorted(
        ["results.csv", "pretrain_curve.csv", "results.md", "upcycle_vit.png"]
    )
    with open(output_dir / "upcycle_vit.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    rows = common.read_csv(output_dir / "results.csv")
    assert len(rows) == len(result["rows"]) == len(_vit_rows_expected())
    assert {(r["arm"], float(r["budget"])) for r in rows} == (
        _vit_rows_expected()
    )
    for row in rows:
        for metric in upcycle_vit.METRICS:
            assert math.isfinite(float(row[metric])), (row, metric)
        # No training loss before an arm's first step.
        if row["steps"] == "0":
            assert row["train_loss"] == ""
        else:
            assert math.isfinite(float(row["train_loss"])), row
        assert 0.0 <= float(row["probe_accuracy"]) <= 1.0
    curve = common.read_csv(output_dir / "pretrain_curve.csv")
    config = upcycle_vit.CONFIGS["small"]
    assert [int(r["step"]) for r in curve] == [
        round(config["pretrain_steps"] * (i + 1) / 5) for i in range(5)
    ]
    text = (output_dir / "results.md").read_text()
    for arm in _VIT_ARMS:
        assert uc.CONVERGED_LABELS[arm] in text
    assert uc.CONVERGED_LABELS["dense_tiled"] not in text
    assert "CONVERGENCE GATE" in text and "## Paired differences" in text
    for budget in BUDGETS:
        assert f"| +{budget:.0%} |" in text
    for metric in upcycle_vit.METRICS:
        assert f"**{metric}**" in text
    gate = result["gates"][0]
    by = {(r["arm"], r["budget"]): r for r in result["rows"]}
    start, later = by[("dense", 0.0)]["nll"], by[("dense", 0.5)]["nll"]
    assert gate["drop"] == pytest.approx((start - later) / start)
    assert gate["passed"] == (gate["drop"] <= uc.GATE_MAX_DROP)


@pytest.mark.slow
def test_vit_smoke_run_matches_compute_and_cooldowns(vit_run):
    rows = vit_run[1]["rows"]
    config = upcycle_vit.CONFIGS["small"]
    pretrain = rows[0]["pretrain_flops"]
    assert all(r["pretrain_flops"] == pretrain for r in rows)
    for budget in BUDGETS:
        at = [r for r in rows if r["budget"] == budget]
        for r in at:
            sunk = 0 if r["arm"] == "moe_scratch" else pretrain
            assert r["arm_flops"] == r["steps"] * r["step_flops"]
            assert r["total_flops"] == sunk + r["arm_flops"]
            target = (1 + budget) * pretrain
            assert abs(r["total_flops"] - target) <= r["step_flops"] / 2
            # The same cooldown compute for every arm, within half a step.
            cooldown = config["cooldown_fraction"] * pretrain
            assert abs(r["cooldown_flops"] - cooldown) <= r["step_flops"] / 2
    steps = {r["arm"]: r["step_flops"] for r in rows}
    moe = ("upcycled", "upcycled_rewarm", "upcycled_reset", "moe_scratch")
    assert len({steps[a] for a in moe}) == 1
    assert steps["upcycled"] > steps["dense"] == steps["dense_rewarm"]
    # One factor per pair: the re-warmed arms take the same steps on the
    # same batches as the continued ones, and end elsewhere.
    for arm in ("dense", "upcycled"):
        for budget in BUDGETS[1:]:
            a = next(
                r for r in rows if r["arm"] == arm and r["budget"] == budget
            )
            b = next(
                r
                for r in rows
                if r["arm"] == f"{arm}_rewarm" and r["budget"] == budget
            )
            assert a["steps"] == b["steps"]
            assert a["nll"] != b["nll"]


@pytest.mark.slow
def test_vit_step_flops_match_a_hand_count(vit_run):
    config = upcycle_vit.CONFIGS["small"]
    model, batch = config["model"], config["batch_size"]
    rows = {r["arm"]: r for r in vit_run[1]["rows"] if r["budget"] == 0}
    assert rows["dense"]["step_flops"] == _vit_step_flops(model, batch)
    moe = _vit_step_flops(model, batch, moe_blocks=(1,))
    assert rows["upcycled"]["step_flops"] == moe
    assert rows["moe_scratch"]["step_flops"] == moe
    assert rows["dense"]["pretrain_flops"] == (
        config["pretrain_steps"] * rows["dense"]["step_flops"]
    )


_T5_ARMS = (
    "dense",
    "upcycled",
    "upcycled_reset",
    "dense_tiled",
    "moe_scratch",
)


def _t5_finetuned(row):
    """Whether the naming fine-tune ran for this result row: at the
    largest budget for every arm, at +0% for FINETUNED_AT_ZERO."""
    budget = float(row["budget"])
    return budget == max(BUDGETS) or (
        budget == 0.0 and row["arm"] in upcycle_t5.FINETUNED_AT_ZERO
    )


@pytest.mark.slow
def test_t5_smoke_run_writes_every_arm_and_budget(t5_run):
    output_dir, result = t5_run
    assert sorted(os.listdir(output_dir)) == sorted(
        ["results.csv", "pretrain_curve.csv", "results.md", "upcycle_t5.png"]
    )
    rows = common.read_csv(output_dir / "results.csv")
    expected = {(arm, budget) for arm in _T5_ARMS for budget in BUDGETS}
    assert {(r["arm"], float(r["budget"])) for r in rows} == expected
    assert len(rows) == len(result["rows"]) == len(expected)
    for row in rows:
        assert float(row["heldout_loss"]) > 0
        for metric in upcycle_t5.FINETUNE_METRICS:
            if _t5_finetuned(row):
                assert math.isfinite(float(row[metric])), (row, metric)
            else:
                assert row[metric] == "", (row, metric)
    # The paper's language recipe (state reset) and the rescaled state
    # start from the same upcycled weights and differ after training.
    by = {(r["arm"], r["budget"]): r for r in result["rows"]}
    assert by[("upcycled", 1.0)]["heldout_loss"] != pytest.approx(
        by[("upcycled_reset", 1.0)]["heldout_loss"], abs=1e-7
    )
    for budget in BUDGETS:
        at = [r for r in result["rows"] if r["budget"] == budget]
        pretrain = at[0]["pretrain_flops"]
        for r in at:
            sunk = 0 if r["arm"] == "moe_scratch" else pretrain
            target = (1 + budget) * pretrain
            assert r["total_flops"] == sunk + r["steps"] * r["step_flops"]
            assert abs(r["total_flops"] - target) <= r["step_flops"] / 2
    reference = result["no_pretraining"]
    assert set(reference) == set(upcycle_t5.FINETUNE_METRICS)
    text = (output_dir / "results.md").read_text()
    assert "No pre-training baseline" in text
    assert "CONVERGENCE GATE" in text and "heldout_loss" in text
    assert "upcycled (state reset), schedule continued" in text
    # No stream ran out of text at this size.
    for stream, (read, available) in result["streams"].items():
        assert 0 < read <= available, stream
    assert "REPEATED" not in text


def test_t5_streams_never_repeat_a_run_and_are_disjoint():
    raw_length, _ = upcycle_t5._lengths(32)
    runs = np.arange(200 * raw_length, dtype=np.int32).reshape(200, -1)
    runs = 10 + runs % 1000  # ordinary token ids
    streams = upcycle_t5.TextStreams(
        runs, 32, 2, pretrain_runs=50, cooldown_runs=10, cooldowns=3
    )
    parts = {
        name: streams.indices(name, seed=3)
        for name in ("pretrain", "continue", "cooldown/0", "cooldown/2")
    }
    assert [len(parts[n]) for n in parts] == [50, 120, 10, 10]
    every = np.concatenate(list(parts.values()))
    assert len(set(every.tolist())) == len(every)  # disjoint, no repeats
    scratch = streams.indices("scratch", seed=3)
    assert sorted(scratch.tolist()) == sorted(
        np.concatenate([parts["pretrain"], parts["continue"]]).tolist()
    )
    assert not np.array_equal(scratch, streams.indices("scratch", seed=4))
    np.testing.assert_array_equal(
        parts["pretrain"], streams.indices("pretrain", seed=3)
    )
    with pytest.raises(ValueError, match="cooldown/<i>"):
        streams.indices("cool/1", seed=3)
    with pytest.raises(ValueError, match="too few"):
        upcycle_t5.TextStreams(runs, 32, 2, 190, 10, 3)
    # Batches: span corruptions of the runs in the stream's order.
    inputs, targets = next(streams.batches("pretrain", seed=3))
    assert inputs["encoder_token_ids"].shape == (2, 32)
    for row, index in zip(
        inputs["encoder_token_ids"].numpy(), parts["pretrain"]
    ):
        kept = row[(row >= 10) & (row < 1010)]
        assert set(kept.tolist()) <= set(runs[index].tolist())


# --------------------------------------------------------------------------
# The converged protocol's pieces.


def test_inverse_sqrt_rate_matches_the_keras_schedule():
    from keras_moe.training.schedules import InverseSqrtWarmup

    schedule = InverseSqrtWarmup(3e-3, 200)
    for step in (0, 1, 150, 199, 200, 1000, 4321):
        assert uc.inverse_sqrt_rate(3e-3, 200, step) == pytest.approx(
            float(schedule(step)), rel=1e-6
        )


def test_cooldown_rate_decays_linearly_to_zero():
    rates = [uc.cooldown_rate(0.8, 4, i) for i in range(6)]
    assert rates == pytest.approx([0.8, 0.6, 0.4, 0.2, 0.0, 0.0])


def _recording_batches(trainer, seen, seed=0):
    """`_batches`, recording the learning rate each step is taken at (the
    trainer assigns it just before drawing the batch)."""
    for batch in _batches(seed):
        seen.append(float(trainer.optimizer.learning_rate))
        yield batch


def test_trainer_drives_the_learning_rate_and_restores_it():
    keras.utils.set_random_seed(0)

    def loss_fn(model, x, y):
        return keras.ops.mean((model(x, training=True)[:, 0] - y) ** 2)

    trainer = uc.Trainer(
        ViT(**_TINY_VIT), keras.optimizers.Adam(0.0), loss_fn, 10, False
    )
    seen = []
    trainer.learning_rate_fn = lambda step: 0.001 * (step + 1)
    trainer.train(_recording_batches(trainer, seen), 3)
    assert seen == pytest.approx([0.001, 0.002, 0.003])
    assert trainer.schedule_step == 3
    saved = trainer.snapshot()
    trainer.learning_rate_fn, trainer.schedule_step = (lambda step: 0.5), 0
    trainer.train(_batches(), 1)
    trainer.restore(saved)
    assert trainer.schedule_step == 3 and trainer.steps == 3
    seen.clear()
    trainer.train(_recording_batches(trainer, seen), 1)
    assert seen == pytest.approx([0.004])
    # A zero rate leaves the weights where they are.
    before = trainer.model.get_weights()
    trainer.learning_rate_fn = lambda step: 0.0
    trainer.train(_batches(), 2)
    for a, b in zip(trainer.model.get_weights(), before):
        np.testing.assert_array_equal(a, b)
    scheduled = uc.Trainer(
        ViT(**_TINY_VIT), uc.make_optimizer(0.01, 4), loss_fn, 10, False
    )
    scheduled.learning_rate_fn = lambda step: 0.1
    with pytest.raises(ValueError, match="float learning rate"):
        scheduled.train(_batches(), 1)


def _probe_task(evaluate, steps=8):
    def step_flops(model):
        return 4 * flops.training_step_flops(model)

    def loss_fn(model, x, y):
        return keras.ops.mean((model(x, training=True)[:, 0] - y) ** 2)

    return uc.ConvergedTask(
        name="t",
        build_dense=lambda: ViT(**_TINY_VIT),
        loss_fn=loss_fn,
        batches=lambda stream, seed: _batches(seed),
        step_flops=step_flops,
        evaluate=evaluate,
        pretrain_steps=steps,
        learning_rate=0.01,
        warmup_steps=2,
        cooldown_fraction=0.5,
    )


def test_cooled_evaluation_decays_then_restores_the_arm():
    keras.utils.set_random_seed(2)
    seen = []

    def evaluate(trainer, seed, budget, arm):
        return {"x": float(trainer.model.get_weights()[0].sum())}

    task = _probe_task(evaluate)
    trainer = uc.Trainer(
        ViT(**_TINY_VIT),
        keras.optimizers.Adam(0.0),
        task.loss_fn,
        10,
        False,
    )
    trainer.learning_rate_fn, trainer.schedule_step = task.rate, 5
    trainer.train(_batches(), 2)
    saved = trainer.snapshot()
    task.batches = lambda stream, seed: _recording_batches(trainer, seen)
    metrics, steps = uc.cooled_evaluation(
        trainer, task, 0, 0.1, "dense", 1, pretrain_flops=80
    )
    # 50% of 80 FLOPs at 10 FLOPs a step: 4 steps from the arm's current
    # rate (its step 7) down towards 0.
    assert steps == 4
    start = task.rate(7)
    assert seen == pytest.approx(
        [start, 0.75 * start, 0.5 * start, 0.25 * start]
    )
    assert metrics["x"] != pytest.approx(float(saved[0][0].sum()))
    assert trainer.schedule_step == 7 and trainer.steps == 2
    for a, b in zip(trainer.model.get_weights(), saved[0]):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(trainer.optimizer.variables, saved[1]):
        np.testing.assert_array_equal(a.numpy(), b)


def test_convergence_gate_by_hand():
    rows = [
        {"arm": "dense", "budget": 0.0, "nll": 1.0},
        {"arm": "dense", "budget": 0.5, "nll": 0.9},
        {"arm": "upcycled", "budget": 0.5, "nll": 0.1},
    ]
    gate = uc.convergence_gate(rows)
    assert gate["drop"] == pytest.approx(0.1) and gate["passed"]
    assert "PASSED" in gate["message"] and "-10.0%" in gate["message"]
    rows[1]["nll"] = 0.8
    gate = uc.convergence_gate(rows)
    assert gate["drop"] == pytest.approx(0.2) and not gate["passed"]
    assert "FAILED" in gate["message"] and "NOT converged" in gate["message"]
    assert uc.convergence_gate(rows[:1])["passed"] is None


def test_paired_differences_by_hand():
    rows = []
    for seed, (dense, moe) in enumerate([(1.0, 0.7), (2.0, 2.5), (1.5, 1.4)]):
        rows.append({"seed": seed, "arm": "dense", "budget": 0.5, "nll": dense})
        rows.append({"seed": seed, "arm": "moe", "budget": 0.5, "nll": moe})
    rows.append({"seed": 9, "arm": "moe", "budget": 0.5, "nll": 0.0})  # no pair
    (out,) = uc.paired_differences(rows, "nll", "moe", "dense", True)
    diffs = [-0.3, 0.5, -0.1]
    assert out["budget"] == 0.5 and out["n"] == 3
    assert [s for s, _ in out["per_seed"]] == [0, 1, 2]
    np.testing.assert_allclose([d for _, d in out["per_seed"]], diffs)
    assert out["mean"] == pytest.approx(np.mean(diffs))
    # Sample std by hand: deviations -0.333, 0.467, -0.133.
    by_hand = math.sqrt((0.3333**2 + 0.4667**2 + 0.1333**2) / 2)
    assert out["std"] == pytest.approx(by_hand, abs=1e-3)
    assert out["wins"] == 2  # lower NLL in seeds 0 and 2
    (higher,) = uc.paired_differences(rows, "nll", "moe", "dense", False)
    assert higher["wins"] == 1
    table = uc.paired_table(
        rows, "nll", [("moe", "dense")], True, {"moe": "M", "dense": "D"}
    )
    assert "**nll: M − D**" in table and "| +50% |" in table
    assert "2 of 3" in table and "1: +0.5000" in table


def test_ridge_probe_matches_least_squares_and_separates():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3))
    y = rng.integers(0, 4, 40)
    test_x = rng.normal(size=(25, 3))
    test_y = rng.integers(0, 4, 25)
    # With no penalty, the weights are least squares on standardised
    # features with a bias column (an independent NumPy statement).
    mean, std = x.mean(0), x.std(0) + 1e-6
    design = np.c_[(x - mean) / std, np.ones(40)]
    weights = np.linalg.lstsq(design, np.eye(4)[y], rcond=None)[0]
    predicted = (np.c_[(test_x - mean) / std, np.ones(25)] @ weights).argmax(1)
    expected = np.mean(predicted == test_y)
    got = upcycle_vit.ridge_probe_accuracy(x, y, test_x, test_y, 4, 0.0)
    assert got == pytest.approx(expected)
    # Well-separated classes: every test example right.
    centres = 10.0 * np.eye(3)
    labels = np.repeat(np.arange(3), 10)
    points = centres[labels] + rng.normal(size=(30, 3))
    assert (
        upcycle_vit.ridge_probe_accuracy(points, labels, points, labels, 3, 1.0)
        == 1.0
    )
    with pytest.raises(ValueError, match="l2 must be >= 0"):
        upcycle_vit.ridge_probe_accuracy(x, y, test_x, test_y, 4, -1.0)


def test_probe_shots_are_balanced_and_fixed():
    labels = np.repeat(np.arange(3), 12)
    draws = upcycle_vit.probe_shots(labels, 10, 4)
    assert len(draws) == 4
    for draw in draws:
        assert np.all(np.bincount(labels[draw]) == 10)
    assert not np.array_equal(draws[0], draws[1])
    again = upcycle_vit.probe_shots(labels, 10, 4)
    for a, b in zip(draws, again):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="fewer than shots=20"):
        upcycle_vit.probe_shots(labels, 20, 1)


def test_vit_stream_numbers():
    assert upcycle_vit.stream_number("pretrain") == 0
    assert upcycle_vit.stream_number("cooldown/3") == 13
    with pytest.raises(ValueError, match="stream must be"):
        upcycle_vit.stream_number("cooldown/x")


# --------------------------------------------------------------------------
# T5 data and scoring.


def test_naming_arrays_are_eos_ended_shifted_and_within_bounds():
    from keras_moe import data as data_lib

    sp = upcycle_t5._sentencepiece()
    (inputs, targets), left_out = upcycle_t5.naming_arrays(sp, "test")
    pairs = docstrings.name_examples("test")
    assert len(targets) + left_out == len(pairs) and len(targets) > 100
    assert inputs["encoder_token_ids"].shape[1] == upcycle_t5.NAMING_MAX_INPUT
    assert targets.shape[1] == upcycle_t5.NAMING_MAX_TARGET
    np.testing.assert_array_equal(
        inputs["decoder_token_ids"][:, 1:], targets[:, :-1]
    )
    assert np.all(inputs["decoder_token_ids"][:, 0] == 0)
    # Row 0 decodes back to its prompt and name.
    row = targets[0][targets[0] != data_lib.PAD_ID]
    assert row[-1] == data_lib.EOS_ID
    summary, words = next(
        p
        for p in pairs
        if len(sp.encode(upcycle_t5.NAMING_PROMPT + p[0])) + 1
        <= upcycle_t5.NAMING_MAX_INPUT
        and len(sp.encode(p[1])) + 1 <= upcycle_t5.NAMING_MAX_TARGET
    )
    assert sp.decode(row[:-1].tolist()) == words
    source = inputs["encoder_token_ids"][0]
    source = source[source != data_lib.PAD_ID][:-1].tolist()
    assert sp.decode(source) == upcycle_t5.NAMING_PROMPT + summary


def test_span_corruption_examples_are_consistent():
    from keras_moe import data as data_lib

    runs = np.arange(10, 10 + 3 * 34, dtype=np.int32).reshape(3, 34)
    dataset = upcycle_t5.span_corruption(runs, 32, seed=4)
    raw, target_length = upcycle_t5._lengths(32)
    assert raw == 34
    examples = list(dataset)
    assert len(examples) == 3
    for run, (inputs, targets) in zip(runs, examples):
        encoder = inputs["encoder_token_ids"].numpy()
        targets = targets.numpy()
        assert encoder.shape == (32,) and targets.shape == (target_length,)
        # Every run token is either kept in the input or spelled out in the
        # target, in order, and sentinels count down from the top id.
        kept = encoder[(encoder >= 10) & (encoder < 2000)]
        noise = targets[(targets >= 10) & (targets < 2000)]
        np.testing.assert_array_equal(np.sort(np.r_[kept, noise]), run)
        sentinels = encoder[encoder >= 2000]
        assert list(sentinels) == [
            data_lib.sentinel_id(i) for i in range(len(sentinels))
        ]
        np.testing.assert_array_equal(
            inputs["decoder_token_ids"].numpy(), np.r_[0, targets[:-1]]
        )


def test_t5_moe_blocks_are_in_both_stacks():
    config = upcycle_t5.CONFIGS["small"]
    layers = upcycle_t5._stack_layers(config)
    assert layers == {"encoder": 2, "decoder": 2}
    with pytest.raises(ValueError, match="does not fit the encoder"):
        uc.parse_options("x", {"moe_blocks": "last_n:3"}, layers)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))
