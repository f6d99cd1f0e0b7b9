"""Formatting and lint checks, so style cannot drift (black, isort, ruff).

Settings live in pyproject.toml. `make format` applies the fixes these tests
ask for.
"""

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PATHS = ["keras_moe", "apps", "export", "benchmarks", "tests", "setup.py"]

TOOLS = {
    "black": ["black", "--check", "--diff"],
    "isort": ["isort", "--check-only", "--diff"],
    "ruff": ["ruff", "check", "--no-cache", "--output-format", "concise"],
}


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_style(tool):
    paths = [p for p in PATHS if (ROOT / p).exists()]
    result = subprocess.run(
        [sys.executable, "-m", *TOOLS[tool], *paths],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(
            f"`{tool}` found problems (fix with `make format`):\n"
            f"{result.stdout}\n{result.stderr}",
            pytrace=False,
        )


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))
