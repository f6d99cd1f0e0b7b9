"""Data-parallel `fit` of upcycled ViT and T5 equals single-device training.

Upcycled tiny ViT and T5 models (`keras_moe.upcycle(..., num_experts=4)`)
train for 2 epochs of 4 steps on global batches of 8, from the same initial
weights, on one device, under MirroredStrategy over 4 virtual CPU devices
(2 examples per replica), and under MultiWorkerMirroredStrategy with two
worker processes on 127.0.0.1 (4 examples per replica). A data-parallel step
sums the replicas' gradients of losses Keras scales by 1 / replicas, so it
is the single-device step up to the float32 summation order. Tolerances:

* the loss `fit` logs after every step and every epoch: relative 1e-5;
* the final weights (magnitudes 0.01-4): absolute 1e-5, relative 1e-4;
* the weight updates (final - initial) of each model taken as one vector:
  relative 1e-4 of its norm, which is itself checked to be far above that
  (so a run that did not train, or trained differently, fails).

Expected differences are ~1e-7 relative on the losses and up to ~1e-4 of
an update on single arrays.

The scripts run in subprocesses (tests/distribution/_data_parallel_fit.py):
TensorFlow's devices and the multi-worker runtime are configured once per
process, before TensorFlow initialises.
"""

import contextlib
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(os.path.dirname(_HERE))
_SCRIPT = os.path.join(_HERE, "_data_parallel_fit.py")
_TIMEOUT_S = 900
MODELS = ("vit", "t5")
LOSS_RTOL = 1e-5
WEIGHT_ATOL = 1e-5
WEIGHT_RTOL = 1e-4
UPDATE_RTOL = 1e-4
MIN_UPDATE_NORM = 0.1


def _env(**extra):
    return dict(
        os.environ,
        PYTHONPATH=_ROOT,
        TF_CPP_MIN_LOG_LEVEL="2",
        KERAS_BACKEND="tensorflow",
        **extra,
    )


def _free_ports(count):
    """Ports free on 127.0.0.1 now (held open together so they differ)."""
    with contextlib.ExitStack() as stack:
        sockets = [
            stack.enter_context(socket.socket(socket.AF_INET))
            for _ in range(count)
        ]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def _run_all(commands, timeout_s):
    """Runs processes together; kills the others as soon as one fails."""
    procs = [
        subprocess.Popen(
            command,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for command, env in commands
    ]
    deadline = time.monotonic() + timeout_s
    try:
        while any(p.poll() is None for p in procs):
            failed = [p for p in procs if p.poll() not in (None, 0)]
            if failed or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    outputs = [p.communicate()[0] for p in procs]
    for p, output in zip(procs, outputs):
        assert (
            p.returncode == 0
        ), f"{p.args} exited with {p.returncode}:\n{output[-6000:]}"


@pytest.fixture(scope="module")
def mirrored_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("mirrored")
    command = [sys.executable, _SCRIPT, "--mode", "mirrored", "--out", out]
    _run_all([([str(c) for c in command], _env())], _TIMEOUT_S)
    return {
        label: dict(np.load(out / f"{label}.npz"))
        for label in ("one_device", "mirrored")
    }


@pytest.fixture(scope="module")
def multi_worker_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("multi_worker")
    workers = [f"127.0.0.1:{port}" for port in _free_ports(2)]
    commands = []
    for index in range(2):
        tf_config = {
            "cluster": {"worker": workers},
            "task": {"type": "worker", "index": index},
        }
        command = [sys.executable, _SCRIPT, "--mode", "multi_worker"]
        commands.append(
            (
                [*command, "--out", str(out)],
                _env(TF_CONFIG=json.dumps(tf_config)),
            )
        )
    _run_all(commands, _TIMEOUT_S)
    return [dict(np.load(out / f"multi_worker_{i}.npz")) for i in range(2)]


def _assert_same_training(got, expected, model):
    for key in ("step_loss", "epoch_loss"):
        np.testing.assert_allclose(
            got[f"{model}/{key}"],
            expected[f"{model}/{key}"],
            rtol=LOSS_RTOL,
            err_msg=f"{model} {key}",
        )
    assert len(got[f"{model}/step_loss"]) == 8
    names = sorted(
        (k for k in expected if k.startswith(f"{model}/weight_")),
        key=lambda k: int(k.rsplit("_", 1)[1]),
    )
    assert names and len(names) == len(
        [k for k in got if k.startswith(f"{model}/weight_")]
    )
    got_updates, expected_updates = [], []
    for name in names:
        initial = name.replace("/weight_", "/initial_")
        np.testing.assert_array_equal(got[initial], expected[initial])
        np.testing.assert_allclose(
            got[name],
            expected[name],
            rtol=WEIGHT_RTOL,
            atol=WEIGHT_ATOL,
            err_msg=f"{model} {name}",
        )
        got_updates.append((got[name] - got[initial]).ravel())
        expected_updates.append((expected[name] - expected[initial]).ravel())
    got_update = np.concatenate(got_updates).astype(np.float64)
    expected_update = np.concatenate(expected_updates).astype(np.float64)
    norm = np.linalg.norm(expected_update)
    assert norm > MIN_UPDATE_NORM, f"{model}: the weights barely moved"
    error = np.linalg.norm(got_update - expected_update) / norm
    assert error < UPDATE_RTOL, f"{model}: relative update error {error:.2e}"


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_mirrored_fit_matches_one_device(mirrored_results, model):
    _assert_same_training(
        mirrored_results["mirrored"], mirrored_results["one_device"], model
    )
    # The loss went down: the comparison is about real training.
    losses = mirrored_results["one_device"][f"{model}/epoch_loss"]
    assert losses[-1] < losses[0]


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_multi_worker_fit_matches_one_device(
    multi_worker_results, mirrored_results, model
):
    chief, other = multi_worker_results
    # Both workers hold the same (synchronised) model.
    for key in chief:
        np.testing.assert_array_equal(chief[key], other[key], err_msg=key)
    _assert_same_training(chief, mirrored_results["one_device"], model)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))
