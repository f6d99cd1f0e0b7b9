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
import numpy as np
import pytest

from keras_moe.checkpoints import read_checkpoint
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
    """Pre-training, stage 1 (ViT frozen, 4 x 8), stage 2 (8 x 16, ViT
    trained), the continued and upcycled arms, every task with real and
    blank images, the files and the kept models."""
    out, models = tmp_path / "vlm", tmp_path / "models"
    process = _launch(
        "--small",
        "--upcycle",
        "--num_experts=4",
        f"--output_dir={out}",
        f"--model_dir={models}",
    )
    assert process.returncode == 0, process.stderr[-4000:]
    assert {p.name for p in out.iterdir()} == {
        "results.csv",
        "paired.csv",
        "pretraining.csv",
        "results.md",
        "exact_match.png",
        "loss.png",
    }
    assert {p.name for p in models.iterdir()} == {
        "pretrained_vit",
        "pretrained_t5",
        *(f"vlm_{name}.keras" for name in vlm.MODELS),
    }
    with open(out / "results.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    cases = {(r["model"], r["task"], r["language"], r["images"]) for r in rows}
    expected = {
        (model, task, language, images)
        for model in vlm.MODELS
        for task, language in [("caption", t) for t in "en fr de es".split()]
        + [("vqa", "-"), ("fewshot", "-"), ("which", "-")]
        for images in ("real", "blank")
    }
    assert cases == expected and len(rows) == len(expected)
    assert all(0.0 <= float(r["exact_match"]) <= 1.0 for r in rows)
    episodes = [r for r in rows if r["task"] in ("fewshot", "which")]
    assert {r["examples"] for r in episodes} == {"24"}
    with open(out / "paired.csv", encoding="utf-8") as f:
        paired = list(csv.DictReader(f))
    comparisons = {r["comparison"] for r in paired}
    assert "stage2 real - stage1 real" in comparisons
    assert "upcycled real - continued real" in comparisons
    # Each paired difference is the difference of the two rates.
    rate = {
        (r["model"], r["task"], r["language"], r["images"]): float(
            r["exact_match"]
        )
        for r in rows
    }
    for row in paired:
        first, second = row["comparison"].split(" - ")
        (m1, i1), (m2, i2) = first.split(), second.split()
        key = (row["task"], row["language"])
        assert float(row["difference"]) == pytest.approx(
            rate[(m1, *key, i1)] - rate[(m2, *key, i2)], abs=2e-4
        )
    text = (out / "results.md").read_text()
    assert "exact match, blank images" in text and "Paired differences" in text
    assert "stage2 caption de real: exact match" in process.stdout
    assert "ViT test accuracy" in process.stdout

    # Stage 1 starts from the pre-trained checkpoints, read back, and
    # keeps the ViT frozen: its weights are the checkpoint's.
    pretrained = read_checkpoint(models / "pretrained_vit", "vit")
    stage1 = keras.models.load_model(models / "vlm_stage1.keras")
    assert stage1.freeze_vision and stage1.image_shape == (4, 8, 1)
    source = pretrained.canonical_variables()
    for name, variable in stage1.vision_encoder.canonical_variables().items():
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(variable),
            keras.ops.convert_to_numpy(source[name]),
        )
    t5 = read_checkpoint(models / "pretrained_t5", "t5")
    stage2 = keras.models.load_model(models / "vlm_stage2.keras")
    assert not stage2.freeze_vision and stage2.image_shape == (8, 16, 1)
    assert stage2.num_image_tokens == 4 * stage1.num_image_tokens
    trained = stage2.vision_encoder.canonical_variables()
    changed = [
        not np.array_equal(
            keras.ops.convert_to_numpy(variable),
            keras.ops.convert_to_numpy(source[name]),
        )
        for name, variable in trained.items()
        if name != "position_embedding"
    ]
    assert all(changed)  # stage 2 trains the ViT
    assert t5.vocab_size == stage2.language_model.vocab_size
    model = keras.models.load_model(models / "vlm_upcycled.keras")
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
        ({"stage1_steps": 0}, "stage1_steps must be >= 1"),
        ({"vit_pretrain_steps": 0}, "vit_pretrain_steps must be >= 1"),
        ({"stage2_learning_rate": 0.0}, "stage2_learning_rate must be > 0"),
        (
            {"stage2_image_size": (9, 16)},
            r"stage2_image_size=\(9, 16\) is not a multiple of the ViT's "
            "patch size 2",
        ),
        ({"stage1_image_size": 4}, "image_size must be \\(height, width\\)"),
        ({"vision": {"image_size": 8}}, "vision must not set image_size"),
        ({"rates": {"which": 1.0, "ocr": 1.0}}, r"Unknown task\(s\) \['ocr'\]"),
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


def test_paired_difference_by_hand():
    # d = [1, 0, 0, 1]: mean 1/2, sample std sqrt(1/3), over sqrt(4).
    mean, error, count = vlm.paired_difference([1, 1, 0, 1], [0, 1, 0, 0])
    assert (mean, count) == (0.5, 4)
    assert error == pytest.approx(np.sqrt(1 / 3) / 2)
    hits = {
        ("stage1", "which", "-", "real"): np.array([0, 1, 0, 0], bool),
        ("stage2", "which", "-", "real"): np.array([1, 1, 1, 0], bool),
        ("stage2", "which", "-", "blank"): np.array([0, 0, 1, 0], bool),
    }
    rows = {r["comparison"]: r for r in vlm.paired_differences(hits)}
    assert set(rows) == {
        "stage2 real - stage1 real",
        "stage2 real - stage2 blank",
    }
    assert rows["stage2 real - stage1 real"]["difference"] == 0.5
    assert rows["stage2 real - stage2 blank"]["difference"] == 0.5
    with pytest.raises(ValueError, match=r"shapes \(3,\) and \(2,\)"):
        vlm.paired_difference([1, 0, 1], [1, 0])
    with pytest.raises(ValueError, match="at least one example; received 0"):
        vlm.paired_difference([], [])


def test_run_refuses_unknown_options_before_any_work(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="does not support option"):
        vlm.run(out, seeds=(0,), small=True, options={"router": "x"})
    with pytest.raises(ValueError, match="seeds must be"):
        vlm.run(out, seeds=(), small=True)
    assert not out.exists()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))
