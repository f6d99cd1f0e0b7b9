"""Flag handling of the launchers: help text and one-line errors.

Every launcher runs in a subprocess (see `app_runner`). A wrong flag must
end the process before any work, with a non-zero exit code and exactly one
line on stderr that names the flag, and no traceback.
"""

import json
import re
import subprocess
import sys

import pytest

from apps import flags_util
from tests.apps.app_runner import ROOT
from tests.apps.app_runner import app_env
from tests.apps.app_runner import run_app

LAUNCHERS = ("train_dense", "upcycle", "train", "evaluate", "demo")

# Lists (name, help) of the flags a launcher module defines.
_LIST_FLAGS = """
import importlib, json, sys
from absl import flags
module = importlib.import_module("apps." + sys.argv[1])
print(json.dumps([
    (flag.name, flag.help)
    for flag in flags.FLAGS.get_key_flags_for_module(module.__name__)
]))
"""


def _module_flags(name):
    process = subprocess.run(
        [sys.executable, "-c", _LIST_FLAGS, name],
        cwd=ROOT,
        env=app_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(process.stdout)


def _single_error_line(process):
    """The one stderr line of a failed launcher."""
    assert process.returncode != 0, process.stdout
    assert "Traceback" not in process.stderr, process.stderr
    lines = [line for line in process.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, process.stderr
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


@pytest.mark.parametrize("name", LAUNCHERS)
def test_helpfull_lists_every_flag_with_help(name):
    defined = _module_flags(name)
    assert len(defined) >= 4
    process = run_app(name, "--helpfull")
    text = process.stdout + process.stderr
    # The module docstring (with a working command) heads the help.
    assert f"python -m apps.{name}" in text
    for flag_name, help_text in defined:
        assert help_text and len(help_text) > 10, flag_name
        # Boolean flags are listed as --[no]name.
        assert re.search(rf"--(\[no\])?{flag_name}:", text), flag_name
        # absl wraps long help; its first words follow the flag name.
        first_words = " ".join(help_text.split()[:3])
        assert first_words in " ".join(text.split()), (flag_name, first_words)


def test_unknown_dataset_is_one_line_naming_the_flag(tmp_path):
    process = run_app(
        "train_dense",
        "--architecture=vit",
        "--dataset=no_such_dataset",
        f"--output_dir={tmp_path / 'out'}",
        data_dir=tmp_path / "tfds",
    )
    line = _single_error_line(process)
    assert "--dataset='no_such_dataset'" in line
    assert "digits" in line  # lists what is available
    assert not (tmp_path / "out").exists()


def test_missing_checkpoint_is_one_line_naming_the_flag(tmp_path):
    process = run_app(
        "upcycle",
        f"--checkpoint={tmp_path / 'nope'}",
        f"--output={tmp_path / 'moe.keras'}",
    )
    line = _single_error_line(process)
    assert "--checkpoint=" in line and "nope" in line


def test_mesh_that_does_not_parse_is_one_line_naming_the_flag(tmp_path):
    model = tmp_path / "model.keras"
    model.write_bytes(b"not read: validation fails first")
    process = run_app(
        "train",
        f"--model={model}",
        "--dataset=digits",
        f"--output_dir={tmp_path / 'out'}",
        "--mesh=batch:two,expert:4",
        data_dir=tmp_path / "tfds",
    )
    line = _single_error_line(process)
    assert "--mesh='batch:two,expert:4'" in line
    assert "batch:<n>,expert:<m>" in line


@pytest.mark.parametrize("name", ["train_dense", "demo"])
def test_output_dir_that_is_a_file_is_one_line_naming_the_flag(name, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    extra = {"train_dense": ["--architecture=vit"], "demo": []}[name]
    process = run_app(
        name,
        *extra,
        f"--output_dir={a_file}",
        data_dir=tmp_path / "tfds",
    )
    line = _single_error_line(process)
    assert f"--output_dir={a_file}" in line
    assert "is a file" in line


def test_output_inside_a_file_is_refused(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    process = run_app(
        "upcycle",
        f"--checkpoint={checkpoint}",
        f"--output={a_file / 'moe.keras'}",
    )
    line = _single_error_line(process)
    assert "--output=" in line and "is a file" in line


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--eval_capacity_factor=-1"], "--eval_capacity_factor"),
        (["--blocks=every_third"], "--blocks"),
        (["--num_experts=1"], "--num_experts"),
        (["--router=random"], "--router"),
    ],
)
def test_upcycle_option_errors_name_the_flag(args, flag, tmp_path):
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    process = run_app(
        "upcycle",
        f"--checkpoint={checkpoint}",
        f"--output={tmp_path / 'moe.keras'}",
        *args,
    )
    line = _single_error_line(process)
    assert flag in line


def test_missing_required_flag_and_positional_arguments(tmp_path):
    process = run_app("upcycle", f"--output={tmp_path / 'moe.keras'}")
    assert "--checkpoint" in _single_error_line(process)
    process = run_app(
        "upcycle",
        f"--checkpoint={tmp_path}",
        f"--output={tmp_path / 'moe.keras'}",
        "stray",
    )
    assert "positional" in _single_error_line(process)


def test_mesh_and_strategy_are_exclusive(tmp_path):
    model = tmp_path / "model.keras"
    model.write_bytes(b"x")
    process = run_app(
        "train",
        f"--model={model}",
        "--dataset=digits",
        f"--output_dir={tmp_path / 'out'}",
        "--mesh=batch:1,expert:2",
        "--cpu_devices=2",
        "--strategy=mirrored",
        data_dir=tmp_path / "tfds",
    )
    assert "--mesh replaces --strategy" in _single_error_line(process)


@pytest.mark.parametrize(
    "text, expected",
    [("none", None), ("2", 2.0), ("1.25", 1.25), ("keep", "keep")],
)
def test_optional_float(text, expected):
    assert flags_util.optional_float(text, "f", allow_keep=True) == expected


@pytest.mark.parametrize("text", ["0", "-1", "inf", "nan", "two", "keep"])
def test_optional_float_errors(text):
    with pytest.raises(ValueError, match="--f must be"):
        flags_util.optional_float(text, "f")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))
