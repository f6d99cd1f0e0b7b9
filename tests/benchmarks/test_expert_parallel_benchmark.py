"""The expert-parallel training benchmark: arguments, ratios, one run."""

import sys

import pytest

from benchmarks import expert_parallel


@pytest.mark.parametrize(
    "change,match",
    [
        ({"batch": 12}, "batch=12 must be a multiple of the 8 devices"),
        ({"num_experts": 4}, "num_experts=4 must be a multiple of 8"),
        ({"model_dim": 18}, "model_dim=18 must be a multiple of the 4"),
        ({"tokens": 0}, "tokens must be an int >= 1; received 0"),
    ],
)
def test_bad_shapes_are_refused(change, match):
    shapes = dict(expert_parallel.QUICK_SHAPES, **change)
    with pytest.raises(ValueError, match=match):
        expert_parallel.run_expert_parallel_benchmark(shapes, 1, 1)


def test_bad_counts_are_refused():
    with pytest.raises(ValueError, match="repeats must be an int >= 1"):
        expert_parallel.check_arguments(expert_parallel.QUICK_SHAPES, 0, 1)


def test_ratios_are_to_the_data_parallel_baseline():
    records = [
        {
            "config": "data_parallel",
            "median_ms": 40.0,
            "step_peak_rss_growth_mib": 8.0,
        },
        {
            "config": "gshard_1x8",
            "median_ms": 50.0,
            "step_peak_rss_growth_mib": 6.0,
        },
        {"config": "replicated_1x8", "median_ms": 100.0},
    ]
    assert expert_parallel.ratios(records) == [
        {
            "ratio": "gshard_1x8/data_parallel",
            "time": 1.25,
            "step_peak_rss_growth": 0.75,
        },
        {"ratio": "replicated_1x8/data_parallel", "time": 2.5},
    ]


@pytest.mark.slow
def test_quick_run_measures_every_configuration():
    records, ratios = expert_parallel.run_expert_parallel_benchmark(
        expert_parallel.QUICK_SHAPES, repeats=1, warmup=1
    )
    assert [r["config"] for r in records] == expert_parallel.config_names()
    for record in records:
        assert record["median_ms"] > 0
        assert record["step_peak_rss_growth_mib"] >= 0
        assert record["per_device_mib"] == (
            record["step_peak_rss_growth_mib"] / 8
        )
    assert len(ratios) == len(records) - 1


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))
