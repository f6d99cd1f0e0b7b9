"""Shared fixtures of the keras_moe.data tests: one offline data directory.

Every dataset and the SentencePiece model are built once per test session,
with the network disabled, into a temporary data directory.
"""

import contextlib
import socket

import pytest


class NetworkAccess(RuntimeError):
    """Raised by any attempt to open a network connection."""


def _refuse(*args, **kwargs):
    raise NetworkAccess(f"network access attempted: {args!r}")


@contextlib.contextmanager
def no_network():
    """Makes every socket connection and name lookup raise NetworkAccess."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", _refuse)
        patch.setattr(socket.socket, "connect_ex", _refuse)
        patch.setattr(socket, "create_connection", _refuse)
        patch.setattr(socket, "getaddrinfo", _refuse)
        yield


@pytest.fixture
def offline():
    """Disables the network for the duration of a test."""
    with no_network():
        yield


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A data directory holding every prepared dataset and the vocabulary."""
    import keras_moe.data as kd

    path = str(tmp_path_factory.mktemp("tensorflow_datasets"))
    with no_network():
        for name in kd.DATASETS:
            kd.prepare(name, path)
        kd.sentencepiece_model_path(path)
    return path
