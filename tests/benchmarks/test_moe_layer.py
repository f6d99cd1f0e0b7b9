"""Tests of the benchmark harness (benchmarks/moe_layer.py) and its launcher.

The harness runs in-process on tiny shapes with one repeat; the launcher runs
once as `python -m apps.benchmark --quick` in a subprocess.
"""

import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import moe_layer as benchmarks

ROOT = pathlib.Path(__file__).resolve().parents[2]

RECORD_KEYS = {
    "name",
    "kind",
    "router",
    "num_experts",
    "num_selected",
    "dispatcher",
    "tokens",
    "group_size",
    "model_dim",
    "hidden_dim",
    "capacity_factor",
    "jit_compile",
    "device",
    "repeats",
    "warmup",
    "params",
    "ffn_gflop_fwd",
    "warmup_s",
    "median_ms",
    "min_ms",
    "max_ms",
    "times_ms",
    "peak_step_mb",
    "memory_source",
}
RATIO_KEYS = {"ratio", "numerator", "denominator", "time", "time_min"}


def _check_records(records, shapes, repeats):
    for record in records:
        assert RECORD_KEYS <= set(record), record
        assert record["median_ms"] > 0
        assert 0 < record["min_ms"] <= record["median_ms"] <= record["max_ms"]
        assert len(record["times_ms"]) == repeats
        assert record["warmup_s"] > 0
        assert record["params"] > 0
        assert record["tokens"] == shapes.tokens
        assert record["model_dim"] == shapes.model_dim


def test_harness_times_every_kind_and_gives_finite_ratios():
    shapes = benchmarks.QUICK_SHAPES
    configs = benchmarks.make_configs(
        num_experts=[4], num_selected=[1, 2], dispatchers=["einsum", "indices"]
    )
    records, ratios = benchmarks.run_benchmark(
        configs, shapes, repeats=1, warmup=1, device="CPU:0"
    )
    assert [r["name"] for r in records] == [c.name for c in configs]
    # Every peer is installed here (setup.py extras "bench"): nothing skips.
    assert not [r for r in records if "skipped" in r]
    _check_records(records, shapes, repeats=1)
    assert {r["kind"] for r in records} == set(benchmarks.KINDS)
    by_name = {r["name"]: r for r in records}
    moe = by_name["moe_tc_e4_k2_indices"]
    assert (moe["num_experts"], moe["num_selected"]) == (4, 2)
    assert moe["router"] == "tokens_choose"
    assert moe["dispatcher"] == "indices"
    # ceil(K * S * cf / E) = ceil(2 * 64 * 1.25 / 4).
    assert moe["expert_capacity"] == 40
    assert by_name["dense_k2"]["ffn_hidden_dim"] == 2 * shapes.hidden_dim
    # Two Dense kernels [D, 2H] and [2H, D], no biases.
    assert by_name["dense_k2"]["params"] == 2 * 2 * 16 * 32
    # Equal nominal expert FLOPs is the point of the dense baseline.
    assert moe["ffn_gflop_fwd"] == by_name["dense_k2"]["ffn_gflop_fwd"]

    names = {r["ratio"] for r in ratios}
    assert names == {
        "moe_tc_e4_k1_einsum/dense_k1",
        "moe_tc_e4_k1_indices/dense_k1",
        "moe_tc_e4_k2_einsum/dense_k2",
        "moe_tc_e4_k2_indices/dense_k2",
        "mg_ec_e4/moe_ec_e4_einsum",
        "mg_ec_e4/moe_ec_e4_indices",
        "mixtral_e4_k2/moe_tc_e4_k2_einsum",
        "mixtral_e4_k2/moe_tc_e4_k2_indices",
    }
    for ratio in ratios:
        assert RATIO_KEYS <= set(ratio)
        expected = (
            by_name[ratio["numerator"]]["median_ms"]
            / by_name[ratio["denominator"]]["median_ms"]
        )
        assert math.isfinite(ratio["time"]) and ratio["time"] > 0
        assert ratio["time"] == pytest.approx(expected)
        assert ratio["time_min"] == pytest.approx(
            by_name[ratio["numerator"]]["min_ms"]
            / by_name[ratio["denominator"]]["min_ms"]
        )


def test_harness_whole_step_xla_and_allocator_memory():
    # Big enough that the hidden activation, [512, 512] float32 = 1 MiB, is
    # above the 256 KiB the CPU allocator starts counting at.
    shapes = benchmarks.Shapes(
        tokens=512, group_size=256, model_dim=64, hidden_dim=512
    )
    configs = benchmarks.filter_configs(
        benchmarks.make_configs([4], [1], ["indices"]),
        ["dense", "moe_tc_*"],
    )
    assert [c.name for c in configs] == ["dense_k1", "moe_tc_e4_k1_indices"]
    records, ratios = benchmarks.run_benchmark(
        configs, shapes, repeats=2, warmup=1, jit_compile=True, device="CPU:0"
    )
    _check_records(records, shapes, repeats=2)
    assert all(r["jit_compile"] for r in records)
    dense = records[0]
    assert dense["memory_source"] == "tf_allocator:CPU:0"
    # At least the hidden activation (kept for the backward pass) is live.
    assert dense["peak_step_mb"] >= 1.0
    assert [r["ratio"] for r in ratios] == ["moe_tc_e4_k1_indices/dense_k1"]


def test_harness_dropless_and_no_drop_evaluation_rows():
    shapes = benchmarks.QUICK_SHAPES
    configs = benchmarks.make_configs(
        [4],
        [2],
        ["indices", "dropless"],
        group_sizes=[32],
        eval_dispatchers=["auto", "indices"],
        scaling_experts=[4, 8],
    )
    assert [c.name for c in configs] == [
        "dense_k2",
        "moe_tc_e4_k2_indices",
        "moe_tc_e4_k2_dropless",
        "moe_ec_e4_indices",  # dropless is token choice only
        "mg_ec_e4",
        "mixtral_e4_k2",
        "moe_tc_e4_k2_dropless_s32",
        "moe_tc_e8_k2_dropless",  # E=4 is a main row already
        "eval_dense_k2",
        "eval_moe_tc_e4_k2_auto",
        "eval_moe_tc_e4_k2_indices",
    ]
    configs = [c for c in configs if c.kind in ("moe", "dense")]
    records, ratios = benchmarks.run_benchmark(
        configs, shapes, repeats=1, warmup=1, device="CPU:0"
    )
    _check_records(records, shapes, repeats=1)
    by_name = {r["name"]: r for r in records}
    dropless = by_name["moe_tc_e4_k2_dropless"]
    assert dropless["dropless"] and dropless["expert_capacity"] is None
    assert dropless["mode"] == "train"
    assert by_name["moe_tc_e4_k2_dropless_s32"]["group_size"] == 32
    assert by_name["moe_tc_e4_k2_indices"]["group_size"] == 64
    # No-drop evaluation: "auto" goes dropless, "indices" has C = S slots.
    auto = by_name["eval_moe_tc_e4_k2_auto"]
    assert auto["mode"] == "eval" and auto["dropless"]
    indices = by_name["eval_moe_tc_e4_k2_indices"]
    assert not indices["dropless"] and indices["expert_capacity"] == 64
    # An evaluation step has no backward pass: fewer parameters are not the
    # point, the dense FLOPs equal the MoE's active FLOPs.
    assert auto["ffn_gflop_fwd"] == by_name["eval_dense_k2"]["ffn_gflop_fwd"]
    assert {r["ratio"] for r in ratios} == {
        "moe_tc_e4_k2_indices/dense_k2",
        "moe_tc_e4_k2_dropless/dense_k2",
        "moe_tc_e4_k2_dropless_s32/dense_k2",
        "moe_tc_e8_k2_dropless/dense_k2",
        "eval_moe_tc_e4_k2_auto/eval_dense_k2",
        "eval_moe_tc_e4_k2_indices/eval_dense_k2",
    }


def test_whole_step_xla_skips_dropless_rows():
    configs = benchmarks.filter_configs(
        benchmarks.make_configs([4], [1], ["dropless"]), ["moe_tc_*"]
    )
    records, ratios = benchmarks.run_benchmark(
        configs,
        benchmarks.QUICK_SHAPES,
        repeats=1,
        warmup=1,
        jit_compile=True,
        device="CPU:0",
    )
    assert "XLA" in records[0]["skipped"] and ratios == []


def test_isolated_rss_grows_with_the_layer():
    config = benchmarks.Config("dense_k1", "dense", num_selected=1)
    small = benchmarks.Shapes(
        tokens=512, group_size=256, model_dim=64, hidden_dim=64
    )
    big = benchmarks.Shapes(
        tokens=4096, group_size=4096, model_dim=256, hidden_dim=4096
    )
    sizes = [
        benchmarks.measure_isolated_rss(
            config, shapes, jit_compile=False, moe_jit_compile=None, warmup=1
        )
        for shapes in (small, big)
    ]
    # The big step holds a [4096, 4096] float32 activation (64 MiB) and its
    # gradient, plus two 4 MiB kernels and their gradients: >= 130 MiB. The
    # small one is a few MiB. A figure that does not separate them (say, a
    # peak inherited from this parent process) fails here.
    assert sizes[0] is not None and sizes[1] is not None
    assert sizes[0] < 40
    assert sizes[1] > sizes[0] + 120


def test_inputs_are_fresh_and_reproducible():
    shapes = benchmarks.QUICK_SHAPES
    first, second = benchmarks.Inputs(shapes), benchmarks.Inputs(shapes)
    a, b = first.next(), first.next()
    assert tuple(a.shape) == (2, 64, 16)
    assert not np.allclose(a.numpy(), b.numpy())
    np.testing.assert_array_equal(second.next().numpy(), a.numpy())
    assert abs(float(np.std(a.numpy())) - 1.0) < 0.1


def test_make_configs_names_and_validation():
    configs = benchmarks.make_configs([8], [1], ["einsum"])
    assert [c.name for c in configs] == [
        "dense_k1",
        "moe_tc_e8_k1_einsum",
        "moe_ec_e8_einsum",
        "mg_ec_e8",
        "mixtral_e8_k2",
    ]
    with pytest.raises(ValueError, match="num_selected=4 is larger"):
        benchmarks.make_configs([2], [4], ["einsum"])
    with pytest.raises(ValueError, match="dispatchers"):
        benchmarks.make_configs([8], [1], ["scatter"])
    with pytest.raises(ValueError, match="num_experts"):
        benchmarks.make_configs([0], [1], ["einsum"])
    with pytest.raises(ValueError, match="eval_dispatchers"):
        benchmarks.make_configs([8], [1], ["einsum"], eval_dispatchers=["x"])
    with pytest.raises(ValueError, match="group_sizes"):
        benchmarks.make_configs([8], [1], ["dropless"], group_sizes=[0])
    with pytest.raises(ValueError, match="num_selected=2 is larger"):
        benchmarks.make_configs([8], [2], ["dropless"], scaling_experts=[1])


def test_filter_configs_by_kind_and_pattern():
    configs = benchmarks.make_configs([8, 32], [1, 2], ["einsum", "indices"])
    kept = benchmarks.filter_configs(configs, ["model_garden", "mixtral_e32*"])
    assert [c.name for c in kept] == ["mg_ec_e8", "mg_ec_e32", "mixtral_e32_k2"]
    assert benchmarks.filter_configs(configs, []) == configs
    with pytest.raises(ValueError, match="match no configuration"):
        benchmarks.filter_configs(configs, ["moe_tc_e64*"])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"tokens": 100, "group_size": 64}, "must divide"),
        ({"model_dim": 0}, "model_dim must be positive"),
        ({"hidden_dim": 2.5}, "hidden_dim must be an int"),
        ({"capacity_factor": 0.0}, "capacity_factor must be > 0"),
    ],
)
def test_shapes_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        benchmarks.Shapes(**kwargs)


def test_run_benchmark_validation():
    configs = benchmarks.make_configs([4], [1], ["einsum"])[:1]
    shapes = benchmarks.QUICK_SHAPES
    with pytest.raises(ValueError, match="repeats and warmup"):
        benchmarks.run_benchmark(configs, shapes, repeats=0)
    with pytest.raises(ValueError, match="CPU runs only"):
        benchmarks.run_benchmark(
            configs, shapes, device="GPU:0", isolate_memory=True
        )
    with pytest.raises(ValueError, match="device must look like"):
        benchmarks.run_benchmark(configs, shapes, device="/gpu:0")
    with pytest.raises(ValueError, match="names repeat"):
        benchmarks.run_benchmark(configs * 2, shapes)
    odd = benchmarks.make_configs([4], [1], ["dropless"], group_sizes=[48])
    with pytest.raises(ValueError, match="group_size=48 must divide"):
        benchmarks.run_benchmark(odd, shapes)
    with pytest.raises(ValueError, match="mode must be one of"):
        benchmarks.make_step(None, False, mode="predict")


def test_launcher_quick_prints_json_lines(tmp_path):
    output = tmp_path / "bench.jsonl"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "apps.benchmark",
            "--quick",
            f"--output={output}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    records = [line for line in lines if "name" in line]
    ratios = [line for line in lines if "ratio" in line]
    assert len(records) + len(ratios) == len(lines)
    assert not [r for r in records if "skipped" in r]
    # --quick keeps E=8 only: 2 dense, 6 token choice (einsum, indices,
    # dropless), 2 expert choice, 1 Model Garden, 1 Mixtral; dropless at
    # S=32 (2) and E=16 (2); no-drop evaluation: 2 dense, 4 MoE.
    assert len(records) == 22
    assert all(r["median_ms"] > 0 for r in records)
    # 10 token choice / dense, 2 Model Garden, 3 Mixtral, 4 evaluation.
    assert len(ratios) == 19
    assert all(math.isfinite(r["time"]) for r in ratios)
    assert output.read_text().splitlines() == result.stdout.splitlines()


def test_launcher_rejects_bad_flags():
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "apps.benchmark",
            "--tokens=100",
            "--group_size=64",
        ],
        cwd=ROOT,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode != 0
    assert "must divide" in result.stderr


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))
