"""Expert parallelism on one DTensor mesh spanning two processes.

Two clients of a multi-client DTensor cluster run on this machine
(`_ep_multihost.py`, 4 virtual CPU devices each, gRPC on two free loopback
ports) and train `ExpertParallelTrainer` on one mesh over their 8 devices
(`batch:2,expert:4`, built from a spec and by `make_mesh`, and
`batch:1,expert:8` where each process holds experts the other has not),
each passing only its own rows of every global batch; the losses and
weights must equal plain Keras on one device, which client 0 also runs.
A checkpoint written by both clients into one directory must hold the
whole state and load back on the other mesh, and `train_resumable` must
resume across both.
"""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(os.path.dirname(_HERE))
_SCRIPT = os.path.join(_HERE, "_ep_multihost.py")
NUM_CLIENTS = 2
TOLERANCE = 1e-5
TIMEOUT = 240
RUNS = ("local_replicated", "local_1x8", "resumed")


def _free_ports(count):
    """`count` distinct loopback ports that were free a moment ago."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("localhost", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _launch(out):
    """Runs both clients; returns (return codes, output tails).

    A client killed at the timeout, or because its peer failed, has a
    negative return code.
    """
    jobs = ",".join(f"localhost:{p}" for p in _free_ports(NUM_CLIENTS))
    base = {k: v for k, v in os.environ.items() if not k.startswith("DTENSOR_")}
    procs, logs = [], []
    for client in range(NUM_CLIENTS):
        env = dict(
            base,
            PYTHONPATH=_ROOT,
            TF_CPP_MIN_LOG_LEVEL="2",
            CUDA_VISIBLE_DEVICES="",
            DTENSOR_JOBS=jobs,
            DTENSOR_CLIENT_ID=str(client),
        )
        log = open(os.path.join(out, f"client{client}.log"), "w+")
        logs.append(log)
        procs.append(
            subprocess.Popen(
                [sys.executable, _SCRIPT, f"--out={out}"],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        )
    # A client whose peer failed would wait for it until the timeout.
    deadline = time.monotonic() + TIMEOUT
    try:
        while time.monotonic() < deadline:
            codes = [proc.poll() for proc in procs]
            if None not in codes or any(code for code in codes):
                break
            time.sleep(0.5)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    codes = [proc.returncode for proc in procs]
    tails = []
    for log in logs:
        log.seek(0)
        tails.append(log.read()[-4000:])
        log.close()
    return codes, tails


@pytest.fixture(scope="module")
def clients(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("multihost"))
    codes, tails = _launch(out)
    if codes != [0] * NUM_CLIENTS and any(
        "Address already in use" in tail for tail in tails
    ):
        # Another process took a port between the check and the start.
        out = str(tmp_path_factory.mktemp("multihost"))
        codes, tails = _launch(out)
    assert codes == [0] * NUM_CLIENTS, "\n\n".join(
        f"client {c} (exit {code}):\n{tail}"
        for c, (code, tail) in enumerate(zip(codes, tails))
    )
    results = [{"out": out} for _ in range(NUM_CLIENTS)]
    for client in range(NUM_CLIENTS):
        with np.load(os.path.join(out, f"client{client}.npz")) as data:
            results[client].update({key: data[key] for key in data.files})
    return results


def _weights(result, run):
    count = sum(
        key.startswith(f"{run}/") and key != f"{run}/losses" for key in result
    )
    assert count > 0, run
    return [result[f"{run}/{i}"] for i in range(count)]


@pytest.mark.slow
def test_the_meshes_span_both_processes(clients):
    for client, result in enumerate(clients):
        assert int(result["num_clients"]) == NUM_CLIENTS
        # default_devices() keeps this process's own devices.
        assert list(result["default_devices"]) == [f"CPU:{i}" for i in range(4)]
        # Client c holds devices 4c..4c+3: on batch:2,expert:4 row c of
        # the batch axis, on batch:1,expert:8 experts 4c..4c+3.
        for mesh in ("2x4", "1x8", "spec"):
            np.testing.assert_array_equal(
                result[f"mesh_{mesh}/devices"], np.arange(4) + 4 * client
            )
        for mesh in ("2x4", "spec"):
            np.testing.assert_array_equal(
                result[f"mesh_{mesh}/locations"],
                [[client, j] for j in range(4)],
            )
        np.testing.assert_array_equal(
            result["mesh_1x8/locations"],
            [[0, 4 * client + j] for j in range(4)],
        )


@pytest.mark.slow
@pytest.mark.parametrize("client", range(NUM_CLIENTS))
def test_each_client_passes_its_own_rows(clients, client):
    """Of a global batch of 16: rows [8c, 8c + 8) wherever the client's
    devices take half the parts; all 16 with the replicated layout on
    batch:1,expert:8 (both clients' devices take the one batch part)."""
    result = clients[client]
    own = [8 * client, 8 * client + 8]
    assert list(result["rows/2x4/gshard"]) == own
    assert list(result["rows/2x4/replicated"]) == own
    assert list(result["rows/1x8/gshard"]) == own
    assert list(result["rows/1x8/replicated"]) == [0, 16]


@pytest.mark.slow
@pytest.mark.parametrize("client", range(NUM_CLIENTS))
def test_each_device_gets_its_own_rows(clients, client):
    """GShard on batch:2,expert:4: device (i, j) gets part 4i + j of the
    global batch, the client passing only its own rows [8c, 8c + 8)."""
    result = clients[client]
    x = result["batch_x"]
    rows = len(x) // 8
    want = [
        x[(4 * client + j) * rows : (4 * client + j + 1) * rows]
        for j in range(4)
    ]
    np.testing.assert_array_equal(result["packed"], want)


@pytest.mark.slow
@pytest.mark.parametrize("client", range(NUM_CLIENTS))
def test_bad_inputs_name_what_is_expected(clients, client):
    result = clients[client]
    # 6 rows cannot feed the client's 4 devices equally.
    message = str(result["error/rows"])
    assert "given 6 rows" in message and "4 equal parts" in message
    assert "local_batch_rows" in message
    message = str(result["error/spec"])
    assert "'batch:2,expert:2'" in message
    assert "4 devices but 8 are available" in message
    assert "4 per process x 2 processes" in message


@pytest.mark.slow
@pytest.mark.parametrize("client", range(NUM_CLIENTS))
@pytest.mark.parametrize("run", RUNS)
def test_three_steps_match_one_device(clients, run, client):
    """Each client passing only its own rows (see `_ep_multihost.py`)."""
    result, reference = clients[client], clients[0]
    np.testing.assert_allclose(
        result[f"{run}/losses"],
        reference["reference/losses"],
        rtol=0,
        atol=TOLERANCE,
    )
    # The steps must move the weights, or equality would prove nothing.
    moved = [
        np.max(np.abs(a - b))
        for a, b in zip(
            _weights(reference, "reference"),
            _weights(reference, "initial"),
        )
    ]
    assert min(moved) > 100 * TOLERANCE, moved
    want_weights = _weights(reference, "reference")
    assert len(_weights(result, run)) == len(want_weights)
    for got, want in zip(_weights(result, run), want_weights):
        np.testing.assert_allclose(got, want, rtol=0, atol=TOLERANCE)


@pytest.mark.slow
def test_both_clients_hold_the_same_whole_values(clients):
    first, second = clients
    for run in RUNS + ("restored",):
        np.testing.assert_array_equal(
            first[f"{run}/losses"], second[f"{run}/losses"]
        )
        for a, b in zip(_weights(first, run), _weights(second, run)):
            np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_one_checkpoint_holds_both_clients_experts(clients):
    """Both clients of the batch:1,expert:8 run write one directory: it
    holds every expert, whichever client's devices held it."""
    out = clients[0]["out"]
    path = os.path.join(out, "ckpt")
    assert sorted(os.listdir(out)) == [
        "ckpt",
        "client0.log",
        "client0.npz",
        "client1.log",
        "client1.npz",
        "resumable",
    ]  # no temporary directory left behind
    with open(os.path.join(path, "meta.json")) as file:
        meta = json.load(file)
    assert meta["step"] == 3
    assert meta["mesh"] == {"batch": 1, "expert": 8}
    reader = tf.train.load_checkpoint(os.path.join(path, "state"))
    saved = _weights(clients[0], "local_1x8")
    assert len(meta["trainable"]) == len(saved)
    for i, (want, reference) in enumerate(
        zip(saved, _weights(clients[0], "reference"))
    ):
        got = reader.get_tensor(f"trainable/{i}/.ATTRIBUTES/VARIABLE_VALUE")
        np.testing.assert_array_equal(got, want)
        np.testing.assert_allclose(got, reference, rtol=0, atol=TOLERANCE)


@pytest.mark.slow
@pytest.mark.parametrize("client", range(NUM_CLIENTS))
def test_the_checkpoint_loads_on_the_other_mesh(clients, client):
    """Loaded on batch:2,expert:4 by both clients into a model built from
    other initial weights."""
    result = clients[client]
    assert list(result["restored/losses"]) == [3]
    for got, want in zip(
        _weights(result, "restored"), _weights(result, "local_1x8")
    ):
        np.testing.assert_array_equal(got, want)


@pytest.mark.slow
def test_fit_resumable_across_both_clients(clients):
    """A checkpoint every step, one kept: after 2 + 1 steps only step 3
    remains, written by both clients, with no hidden leftovers; the
    second trainer ran 1 step (`resumed` has 3 losses in all, equal to
    one device's: test_three_steps_match_one_device)."""
    directory = os.path.join(clients[0]["out"], "resumable")
    assert sorted(os.listdir(directory)) == ["ckpt-000000003"]
    path = os.path.join(directory, "ckpt-000000003")
    with open(os.path.join(path, "meta.json")) as file:
        meta = json.load(file)
    assert meta["step"] == 3
    assert meta["mesh"] == {"batch": 2, "expert": 4}
    reader = tf.train.load_checkpoint(os.path.join(path, "state"))
    for i, want in enumerate(_weights(clients[0], "resumed")):
        got = reader.get_tensor(f"trainable/{i}/.ATTRIBUTES/VARIABLE_VALUE")
        np.testing.assert_array_equal(got, want)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))
