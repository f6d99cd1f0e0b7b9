"""Tests of the upcycling benchmark (keras_moe/benchmarks_upcycle.py).

The checkpoint writer the benchmark uses is tested in
tests/checkpoints/test_writers.py; here, how its output is measured. The
benchmark runs in-process on t5_tiny (each measurement still in a
subprocess of its own); the launcher runs once as
`python -m apps.benchmark_upcycle --quick` in a subprocess.
"""

import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import upcycle as benchmarks_upcycle
from keras_moe.models.t5 import T5

ROOT = pathlib.Path(__file__).resolve().parents[2]

COMMON_KEYS = {"name", "preset", "baseline_rss_mib"}
BUILD_KEYS = COMMON_KEYS | {
    "params",
    "weights_bytes",
    "seconds",
    "peak_rss_growth_mib",
    "build_peak_over_checkpoint",
}
READ_KEYS = COMMON_KEYS | {
    "params",
    "weights_bytes",
    "checkpoint_bytes",
    "seconds",
    "peak_rss_growth_mib",
    "read_peak_over_checkpoint",
    "reader_extra_seconds",
    "reader_extra_peak_rss_growth_mib",
}
UPCYCLE_KEYS = COMMON_KEYS | {
    "num_experts",
    "moe_blocks",
    "dense_model_bytes",
    "dense_model_rss_growth_mib",
    "moe_build_baseline_rss_mib",
    "expert_bytes",
    "upcycled_model_bytes",
    "upcycle_seconds",
    "upcycle_peak_rss_growth_mib",
    "numpy_tile_seconds",
    "numpy_tile_peak_rss_growth_mib",
    "moe_build_seconds",
    "moe_build_peak_rss_growth_mib",
    "upcycle_over_numpy_seconds",
    "upcycle_peak_over_expert_bytes",
    "upcycle_peak_over_upcycled_model_bytes",
    "numpy_tile_peak_over_expert_bytes",
}


def test_checkpoint_bytes_counts_weights_and_slots(tmp_path):
    # The writer itself is tested in tests/checkpoints/test_writers.py.
    model = T5.from_architecture("t5_tiny")
    prefix = benchmarks_upcycle.write_mtf_checkpoint(model, tmp_path)
    expected = model.canonical_variables()
    # Weights and slots are float32; the step an int64.
    params = sum(int(np.prod(v.shape)) for v in expected.values())
    assert benchmarks_upcycle.checkpoint_bytes(prefix) > 4 * params


def test_benchmark_measures_every_part(tmp_path):
    # 64 experts make each tiled t5_tiny weight 512 KiB, above the 64 KiB
    # mmap threshold, so that its pages show in the peak RSS.
    records = benchmarks_upcycle.run_upcycle_benchmark(
        "t5_tiny", 64, workdir=tmp_path
    )
    build, read, upcycle = records
    assert [r["name"] for r in records] == [
        "build_t5",
        "read_t5_mtf",
        "upcycle_t5",
    ]
    assert BUILD_KEYS <= set(build)
    assert READ_KEYS <= set(read)
    assert UPCYCLE_KEYS <= set(upcycle)
    for record in records:
        assert record["preset"] == "t5_tiny"
        for key, value in record.items():
            if key.endswith(
                ("_mib", "_bytes", "seconds")
            ) and not key.startswith("reader_extra"):
                assert math.isfinite(value) and value >= 0, (key, value)
    for record, key in [(build, "seconds"), (read, "seconds")]:
        assert record[key] > 0
    assert build["params"] == read["params"] > 0
    assert (
        read["checkpoint_bytes"] > read["weights_bytes"] == 4 * read["params"]
    )

    # t5_tiny: D=32, F=64, 2 blocks per stack; block 1 of each is upcycled.
    assert upcycle["moe_blocks"] == {"encoder": [1], "decoder": [1]}
    assert upcycle["num_experts"] == 64
    assert upcycle["expert_bytes"] == 2 * 64 * (32 * 64 + 64 * 32) * 4
    assert upcycle["upcycle_seconds"] > 0
    assert upcycle["numpy_tile_seconds"] > 0
    assert upcycle["moe_build_seconds"] > 0
    assert upcycle["numpy_tile_peak_rss_growth_mib"] > 0
    assert upcycle["upcycle_peak_rss_growth_mib"] > 0
    assert upcycle["upcycle_over_numpy_seconds"] == pytest.approx(
        upcycle["upcycle_seconds"] / upcycle["numpy_tile_seconds"]
    )
    assert upcycle["upcycle_peak_over_expert_bytes"] == pytest.approx(
        upcycle["upcycle_peak_rss_growth_mib"] * 2**20 / upcycle["expert_bytes"]
    )
    # The checkpoints live in the workdir given.
    assert (tmp_path / "t5_tiny" / "checkpoint").exists()


@pytest.mark.parametrize(
    "preset, num_experts, message",
    [
        ("t5_huge", 4, "preset must be one of"),
        ("t5_tiny", 0, "num_experts must be >= 1"),
        ("t5_tiny", 2.0, "num_experts must be an int"),
        ("t5_tiny", True, "num_experts must be an int"),
    ],
)
def test_bad_arguments(preset, num_experts, message):
    with pytest.raises(ValueError, match=message):
        benchmarks_upcycle.run_upcycle_benchmark(preset, num_experts)


def test_launcher_quick_prints_json_lines(tmp_path):
    output = tmp_path / "upcycle.jsonl"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "apps.benchmark_upcycle",
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
    assert [line["name"] for line in lines] == [
        "build_t5",
        "read_t5_mtf",
        "upcycle_t5",
    ]
    assert all(line["preset"] == "t5_tiny" for line in lines)
    assert lines[2]["num_experts"] == 4
    assert lines[1]["seconds"] > 0 and lines[2]["upcycle_seconds"] > 0
    assert output.read_text().splitlines() == result.stdout.splitlines()


def test_launcher_rejects_bad_flags():
    result = subprocess.run(
        [sys.executable, "-m", "apps.benchmark_upcycle", "--num_experts=0"],
        cwd=ROOT,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode != 0
    assert "num_experts" in result.stderr


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))
