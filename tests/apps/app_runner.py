"""Runs a launcher (`python -m apps.<name>`) in a fresh process for tests.

Each launcher defines its absl flags at import, and several launchers share
flag names, so they cannot all be imported into the pytest process: every
launcher test runs one in a subprocess, from the repository root, with the
embedded datasets in a data directory of the test session.
"""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def app_env(data_dir=None):
    """The environment of a launcher subprocess."""
    env = dict(os.environ)
    env.update(KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2")
    if data_dir is not None:
        env["KERAS_MOE_DATA_DIR"] = os.fspath(data_dir)
    return env


def run_app(name, *args, data_dir=None, timeout=600, extras=None):
    """Runs `python -m apps.<name> *args`; returns the CompletedProcess.

    With `extras` (a list of setup.py extras), only keras_moe's declared
    requirements with those extras are importable (tests/
    requirements_guard.py).
    """
    command = [sys.executable]
    if extras is not None:
        guard = ROOT / "tests" / "requirements_guard.py"
        command += [str(guard), f"--extras={','.join(extras)}"]
    return subprocess.run(
        [*command, "-m", f"apps.{name}", *map(str, args)],
        cwd=ROOT,
        env=app_env(data_dir),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def check_ok(process):
    """Fails with the launcher's stderr unless it exited with 0."""
    if process.returncode != 0:
        raise AssertionError(
            f"{process.args} exited with {process.returncode}:\n"
            f"{process.stdout[-3000:]}\n{process.stderr[-5000:]}"
        )
    return process
