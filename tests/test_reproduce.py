"""The experiment registry and `python -m apps.reproduce`.

The registry's helpers are tested here in-process; the launcher runs in
subprocesses (absl flags are process-wide): wrong flags stop it before any
work, with a message naming the flag, and `--small` runs E^3 end to end.
"""

import os
import pathlib
import re
import subprocess
import sys

import pytest

from keras_moe import experiments
from keras_moe.experiments import common

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_registry_lists_and_imports_experiments():
    assert {"e3", "upcycle_vit", "upcycle_t5"} <= set(experiments.names())
    assert experiments.names() == sorted(experiments.EXPERIMENTS)
    module = experiments.get("e3")
    assert module.__name__ == "keras_moe.experiments.e3"
    assert callable(module.run)
    with pytest.raises(ValueError, match="Unknown experiment 'nope'"):
        experiments.get("nope")


def test_registered_module_that_is_missing(monkeypatch):
    monkeypatch.setitem(
        experiments.EXPERIMENTS, "ghost", "keras_moe.experiments.ghost"
    )
    with pytest.raises(ValueError, match="registered but its module"):
        experiments.get("ghost")


def test_option_checks():
    assert experiments.check_options("x", None, ("router",)) == {}
    with pytest.raises(ValueError, match="'x' does not support.*budgets"):
        experiments.check_options("x", {"budgets": (1.0,)}, ("router",))
    e3 = experiments.get("e3")
    with pytest.raises(ValueError, match="does not support.*router"):
        experiments.check_module_options(e3, {"router": "tokens_choose"})
    assert experiments.check_module_options(e3, {"num_experts": 4}) == {
        "num_experts": 4
    }
    # The module's own value checks run too (E^3 needs an even E).
    with pytest.raises(ValueError, match="num_experts must be an even int"):
        experiments.check_module_options(e3, {"num_experts": 3})


def test_parse_seeds_and_moe_blocks():
    assert experiments.parse_seeds(["0", "1", "2"]) == (0, 1, 2)
    assert experiments.parse_seeds("3,-1") == (3, -1)
    for bad, message in (
        (["0", "x"], "comma-separated integers"),
        ([], "at least one seed"),
        (["1", "1"], "distinct"),
    ):
        with pytest.raises(ValueError, match=f"^seeds .*{message}"):
            experiments.parse_seeds(bad)
    assert experiments.parse_moe_blocks("every_other") == ("every_other", None)
    assert experiments.parse_moe_blocks("all") == ("all", None)
    assert experiments.parse_moe_blocks("last_n:3") == ("last_n", 3)
    for bad in ("last_n:0", "last_n:", "last_n:x", "odd", 2):
        with pytest.raises(ValueError, match="moe_blocks must be"):
            experiments.parse_moe_blocks(bad)


@pytest.mark.parametrize(
    "name, value",
    [
        ("num_experts", 0),
        ("num_experts", 2.0),
        ("capacity_factor", 0.0),
        ("router", "top2"),
        ("moe_blocks", "last_n:-1"),
        ("expert_noise", -0.1),
        ("reinit_fraction", 1.5),
        ("reuse_optimizer_state", "yes"),
        ("budgets", ["0.1", "x"]),
        ("budgets", ["0.5", "0"]),
    ],
)
def test_option_values_are_checked(name, value):
    with pytest.raises(ValueError, match=f"^{name} must be"):
        experiments.check_option_values({name: value})


def test_option_values_are_normalised():
    options = experiments.check_option_values(
        {"budgets": ["0.1", "0.25", "1"], "router": "tokens_choose"}
    )
    assert options == {"budgets": (0.1, 0.25, 1.0), "router": "tokens_choose"}
    with pytest.raises(ValueError, match="Unknown option"):
        experiments.check_option_values({"learning_rate": 0.1})


def _launch(*args, timeout=600):
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run(
        [sys.executable, "-m", "apps.reproduce", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "--experiment must have a value"),
        (
            ["--experiment=nope"],
            "--experiment=nope: value should be one of <e3|",
        ),
        (["--experiment=e3", "--seeds=0,a"], "--seeds must be comma-separated"),
        (
            ["--experiment=e3", "--moe_blocks=last_n:0"],
            "--moe_blocks must be",
        ),
        (
            ["--experiment=e3", "--router=tokens_choose"],
            "does not support option\\(s\\) router",
        ),
        (
            ["--experiment=e3", "--num_experts=3"],
            "num_experts must be an even int",
        ),
        (["--experiment=e3", "--output_dir=FILE"], "--output_dir=.* is an"),
    ],
    ids=[
        "missing",
        "unknown",
        "seeds",
        "moe_blocks",
        "unsupported",
        "value",
        "file",
    ],
)
def test_wrong_flags_fail_before_any_work(tmp_path, args, message):
    file_path = tmp_path / "a_file"
    file_path.write_text("x")
    args = [a.replace("FILE", str(file_path)) for a in args]
    if not any(a.startswith("--output_dir") for a in args):
        args.append(f"--output_dir={tmp_path / 'out'}")
    result = _launch(*args)
    assert result.returncode != 0
    assert re.search(message, result.stderr), result.stderr[-2000:]
    assert "Running experiment" not in result.stdout
    assert not (tmp_path / "out").exists()
    assert file_path.read_text() == "x"


@pytest.mark.slow
def test_small_e3_run_end_to_end(tmp_path):
    output_dir = tmp_path / "e3"
    result = _launch(
        "--experiment=e3", "--small", "--seeds=0", f"--output_dir={output_dir}"
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "e3: done in" in result.stdout
    rows = common.read_csv(output_dir / "results.csv")
    assert [r["model"] for r in rows] == [
        "dense",
        "vmoe_k1",
        "vmoe_k2",
        "e3_m2_k1",
        "ensemble_2x_vmoe_k1",
        "dense_continued",
        "upcycled_vmoe_k2",
        "upcycled_e3_m2_k1",
    ]
    assert (output_dir / "results.md").read_text().count("\n| ") >= 9
    assert (output_dir / "paired.csv").stat().st_size > 0
    assert (output_dir / "e3_quality_vs_flops.png").stat().st_size > 0


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))
