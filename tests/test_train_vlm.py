"""`python -m apps.train_vlm`: the --small run end to end, and bad flags.

The launcher runs in a subprocess (its absl flags stay out of this
process). The embedded datasets are read from (and on first use prepared
in) `$KERAS_MOE_DATA_DIR` or keras_moe's default data directory.
"""

import csv
import os
import pathlib
import subprocess
import sys

import keras
import pytest

from keras_moe.experiments import vlm
from keras_moe.models import moe_layers
from keras_moe.models.vlm import VisionLanguageModel

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _launch(*flags, timeout=600):
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run(
        [sys.executable, "-m", "apps.train_vlm", *flags],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_small_run_trains_upcycles_and_reports(tmp_path):
    out = tmp_path / "vlm"
    process = _launch(
        "--small", "--upcycle", "--num_experts=4", f"--output_dir={out}"
    )
    assert process.returncode == 0, process.stderr[-4000:]
    names = {p.name for p in out.iterdir()}
    assert names == {
        "results.csv",
        "results.md",
        "exact_match.png",
        "loss.png",
        "vlm_dense.keras",
        "vlm_upcycled.keras",
    }
    with open(out / "results.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    cases = {(r["model"], r["task"], r["language"], r["images"]) for r in rows}
    expected = {
        (model, task, language, images)
        for model in ("dense", "upcycled")
        for task, language in [("caption", t) for t in "en fr de es".split()]
        + [("vqa", "-")]
        for images in ("real", "blank")
    }
    assert cases == expected and len(rows) == len(expected)
    assert all(0.0 <= float(r["exact_match"]) <= 1.0 for r in rows)
    assert "exact match, blank images" in (out / "results.md").read_text()
    assert "dense caption de real: exact match" in process.stdout
    model = keras.models.load_model(out / "vlm_upcycled.keras")
    assert isinstance(model, VisionLanguageModel)
    moe = moe_layers(model)
    assert len(moe) == 3 and {layer.num_experts for layer in moe} == {4}


def test_bad_flags_fail_before_any_work(tmp_path):
    out = tmp_path / "never"
    process = _launch("--small", "--languages=en,xx", f"--output_dir={out}")
    assert process.returncode != 0
    assert "supported: en, fr, de, es" in process.stderr
    assert not out.exists()
    afile = tmp_path / "afile"
    afile.write_text("")
    process = _launch("--small", f"--output_dir={afile}")
    assert process.returncode != 0
    assert "is an existing file, not a directory" in process.stderr


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"languages": ("de", "zz")}, "supported: en, fr, de, es"),
        ({"rates": {"caption": 0.0}}, "At least one sampling rate"),
        ({"rates": {"vqa": -1.0}}, "Sampling rates must be >= 0"),
        ({"steps": 0}, "steps must be >= 1"),
        ({"learning_rate": 0.0}, "learning_rate must be > 0"),
        ({"vit_checkpoint": "/nonexistent"}, "Give both"),
        (
            {"vit_checkpoint": "/nonexistent", "t5_checkpoint": "/nonexistent"},
            "checkpoint path does not exist",
        ),
    ],
)
def test_config_validation(overrides, match):
    with pytest.raises(ValueError, match=match):
        vlm.VlmConfig(**overrides)


def test_run_refuses_unknown_options_before_any_work(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="does not support option"):
        vlm.run(out, seeds=(0,), small=True, options={"router": "x"})
    with pytest.raises(ValueError, match="seeds must be"):
        vlm.run(out, seeds=(), small=True)
    assert not out.exists()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))
