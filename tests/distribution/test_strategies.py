"""The strategy factory, TF_CONFIG validation, batch checks, fit helper."""

import doctest
import json
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_moe.distribution import strategies
from keras_moe.distribution.strategies import STRATEGY_NAMES
from keras_moe.distribution.strategies import auto_strategy_name
from keras_moe.distribution.strategies import build_for_fit
from keras_moe.distribution.strategies import check_global_batch_size
from keras_moe.distribution.strategies import fit_distributed
from keras_moe.distribution.strategies import get_strategy
from keras_moe.distribution.strategies import parse_tf_config
from keras_moe.distribution.strategies import prepare_dataset


def _tf_config(cluster, task_type="worker", index=0):
    return json.dumps(
        {"cluster": cluster, "task": {"type": task_type, "index": index}}
    )


TWO_WORKERS = {"worker": ["10.0.0.1:2222", "10.0.0.2:2222"]}


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("TF_CONFIG", "TPU_NAME"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


# TF_CONFIG.


@pytest.mark.parametrize(
    "cluster,task_type,index,workers,chief",
    [
        (TWO_WORKERS, "worker", 0, 2, True),
        (TWO_WORKERS, "worker", 1, 2, False),
        ({"chief": ["a:1"], "worker": ["b:2", "c:3"]}, "worker", 0, 3, False),
        ({"chief": ["a:1"], "worker": ["b:2"]}, "chief", 0, 2, True),
        ({"worker": ["[::1]:2222", "host-1.example.com:65535"]}, "worker", 1,
         2, False),
        (TWO_WORKERS, "evaluator", 0, 2, False),
    ],
)  # fmt: skip
def test_parse_tf_config(cluster, task_type, index, workers, chief):
    config = parse_tf_config(_tf_config(cluster, task_type, index))
    assert config.num_workers == workers
    assert config.is_chief is chief
    assert config.task_type == task_type and config.task_index == index
    assert config.cluster == {k: tuple(v) for k, v in cluster.items()}


def test_parse_tf_config_reads_the_environment(clean_env):
    assert parse_tf_config() is None
    clean_env.setenv("TF_CONFIG", "  ")
    assert parse_tf_config() is None
    clean_env.setenv("TF_CONFIG", _tf_config(TWO_WORKERS, index=1))
    assert parse_tf_config().task_index == 1


@pytest.mark.parametrize(
    "value,match",
    [
        ('{"cluster": ', "is not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        (json.dumps({"task": {"type": "worker", "index": 0}}),
         'no "cluster" object'),
        (json.dumps({"cluster": [], "task": {}}), 'no "cluster" object'),
        (_tf_config({"worker": []}), 'must be a non-empty list'),
        (_tf_config({"worker": "a:1"}), "must be a non-empty list"),
        (_tf_config({"worker": ["localhost"]}), "not \"host:port\""),
        (_tf_config({"worker": ["a:1", "b:"]}), "'b:', which is not"),
        (_tf_config({"worker": [":2222"]}), "not \"host:port\""),
        (_tf_config({"worker": ["a:0"]}), "not \"host:port\""),
        (_tf_config({"worker": ["a:70000"]}), "not \"host:port\""),
        (_tf_config({"worker": ["a b:1"]}), "not \"host:port\""),
        (_tf_config({"worker": [2222]}), "not \"host:port\""),
        (_tf_config({"chief": ["a:1", "b:2"]}, "chief"), "at most one"),
        (json.dumps({"cluster": TWO_WORKERS}), 'needs a "task" object'),
        (json.dumps({"cluster": TWO_WORKERS, "task": {"type": "worker"}}),
         'needs a "task" object'),
        (_tf_config(TWO_WORKERS, "chief"), "task type 'chief' is not a job"),
        (_tf_config(TWO_WORKERS, index=2), "task index 2 is out of range"),
        (_tf_config(TWO_WORKERS, index=-1), "task index -1 is out of range"),
        (_tf_config(TWO_WORKERS, index="0"), 'must be an integer'),
        (_tf_config(TWO_WORKERS, index=True), 'must be an integer'),
    ],
)  # fmt: skip
def test_parse_tf_config_rejects(value, match):
    with pytest.raises(ValueError, match=match) as error:
        parse_tf_config(value)
    # Every message names TF_CONFIG and shows what was expected.
    assert str(error.value).startswith("TF_CONFIG ")
    assert '"cluster": {"worker": ["host0:2222"' in str(error.value)


def test_parse_tf_config_rejects_non_strings():
    with pytest.raises(ValueError, match="must be a JSON string"):
        parse_tf_config({"cluster": TWO_WORKERS})


# Strategy selection.


@pytest.mark.parametrize(
    "tpu,environ,devices,expected",
    [
        ("grpc://10.0.0.1:8470", {}, {}, "tpu"),
        (None, {"TPU_NAME": "my-tpu"}, {}, "tpu"),
        (None, {}, {"TPU": 4}, "tpu"),
        # TPU first, even with a cluster and GPUs.
        (None, {"TPU_NAME": "t", "TF_CONFIG": _tf_config(TWO_WORKERS)},
         {"GPU": 8}, "tpu"),
        (None, {"TF_CONFIG": _tf_config(TWO_WORKERS)}, {"GPU": 8},
         "multi_worker"),
        (None, {"TF_CONFIG": _tf_config({"chief": ["a:1"], "worker": ["b:1"]},
                                        "chief")}, {}, "multi_worker"),
        # A one-worker cluster is not multi-worker.
        (None, {"TF_CONFIG": _tf_config({"worker": ["a:1"]})}, {"GPU": 2},
         "mirrored"),
        (None, {}, {"GPU": 2}, "mirrored"),
        (None, {}, {"GPU": 1}, "one_device"),
        (None, {}, {}, "one_device"),
        (None, {"TF_CONFIG": ""}, {}, "one_device"),
    ],
)  # fmt: skip
def test_auto_strategy_name(tpu, environ, devices, expected):
    assert (
        auto_strategy_name(tpu=tpu, environ=environ, physical_devices=devices)
        == expected
    )


def test_auto_strategy_name_rejects_a_malformed_tf_config():
    with pytest.raises(ValueError, match="TF_CONFIG is not valid JSON"):
        auto_strategy_name(environ={"TF_CONFIG": "{"}, physical_devices={})


def test_auto_on_this_machine_is_one_device(clean_env):
    # No TPU, no GPU, no cluster here.
    strategy = get_strategy("auto")
    assert isinstance(strategy, tf.distribute.OneDeviceStrategy)
    assert strategy.num_replicas_in_sync == 1


def test_one_device_and_mirrored_on_the_cpu(clean_env):
    one = get_strategy("one_device", devices=["/cpu:0"])
    assert isinstance(one, tf.distribute.OneDeviceStrategy)
    mirrored = get_strategy("mirrored", devices=["/cpu:0"])
    assert isinstance(mirrored, tf.distribute.MirroredStrategy)
    assert mirrored.extended.worker_devices == (
        "/job:localhost/replica:0/task:0/device:CPU:0",
    )


class _Recorder:
    """Stands in for the TPU API; records the calls in order."""

    def __init__(self, monkeypatch, resolver=True):
        self.calls = []
        recorder = self

        class Strategy:
            def __init__(self, resolver):
                recorder.calls.append(("TPUStrategy", resolver))
                self.resolver = resolver

        monkeypatch.setattr(
            tf.config,
            "experimental_connect_to_cluster",
            lambda r: self.calls.append(("connect", r)),
        )
        monkeypatch.setattr(
            tf.tpu.experimental,
            "initialize_tpu_system",
            lambda r: self.calls.append(("initialize", r)),
        )
        monkeypatch.setattr(tf.distribute, "TPUStrategy", Strategy)
        if resolver:

            class Resolver:
                def __init__(self, tpu=None):
                    recorder.calls.append(("resolver", tpu))

            monkeypatch.setattr(
                tf.distribute.cluster_resolver, "TPUClusterResolver", Resolver
            )


def test_tpu_connects_initialises_then_builds_the_strategy(clean_env):
    recorder = _Recorder(clean_env, resolver=False)
    strategy = get_strategy("tpu", tpu="grpc://10.1.2.3:8470")
    kinds = [kind for kind, _ in recorder.calls]
    assert kinds == ["connect", "initialize", "TPUStrategy"]
    # One real resolver, built from the address, goes through every call.
    resolver = recorder.calls[0][1]
    assert isinstance(
        resolver, tf.distribute.cluster_resolver.TPUClusterResolver
    )
    assert resolver.master() == "grpc://10.1.2.3:8470"
    assert all(arg is resolver for _, arg in recorder.calls)
    assert strategy.resolver is resolver


@pytest.mark.parametrize(
    "environ,devices,expected_tpu",
    [
        ({"TPU_NAME": "my-tpu"}, {}, None),  # the resolver reads TPU_NAME
        ({}, {"TPU": 8}, "local"),  # a TPU VM
    ],
)
def test_auto_picks_the_tpu(clean_env, environ, devices, expected_tpu):
    for name, value in environ.items():
        clean_env.setenv(name, value)
    clean_env.setattr(
        tf.config,
        "list_physical_devices",
        lambda kind=None: [kind] * devices.get(kind, 0),
    )
    recorder = _Recorder(clean_env)
    get_strategy("auto")
    assert recorder.calls[0] == ("resolver", expected_tpu)
    assert [kind for kind, _ in recorder.calls] == [
        "resolver",
        "connect",
        "initialize",
        "TPUStrategy",
    ]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"name": "gpu"}, "valid names: auto, tpu, mirrored, multi_worker"),
        ({"name": "Mirrored"}, "Unknown strategy 'Mirrored'"),
        ({"name": "mirrored", "tpu": "grpc://a:1"}, "applies to the 'tpu'"),
        ({"name": "tpu", "tpu": ""}, "tpu must be a non-empty string"),
        ({"name": "tpu", "tpu": 3}, "tpu must be a non-empty string"),
        ({"name": "tpu", "devices": ["/cpu:0"]}, "devices applies to the"),
        ({"name": "multi_worker", "devices": ["/cpu:0"]}, "devices applies"),
        ({"name": "one_device", "devices": ["/cpu:0", "/cpu:0"]},
         "exactly one device"),
        ({"name": "mirrored", "devices": "/cpu:0"}, "must be a list"),
        ({"name": "mirrored", "devices": []}, "non-empty list of strings"),
        ({"name": "mirrored", "devices": ["/gpu:0"]},
         r"Unknown device '/gpu:0'; this machine has \[.*CPU:0"),
        ({"name": "mirrored", "devices": ["/cpu:7"]}, "Unknown device"),
        ({"name": "mirrored", "devices": ["nonsense"]}, "Unknown device"),
        ({"name": "mirrored", "devices": ["/cpu:0", "/cpu:0"]}, "repeats"),
        ({"name": "multi_worker", "communication": "mpi"},
         "communication must be one of"),
        ({"name": "multi_worker"}, "reads its cluster from TF_CONFIG, which "
         "is not set"),
    ],
)  # fmt: skip
def test_get_strategy_rejects(clean_env, kwargs, match):
    recorder = _Recorder(clean_env)  # nothing may reach the TPU API
    with pytest.raises(ValueError, match=match):
        get_strategy(**kwargs)
    assert recorder.calls == []


@pytest.mark.parametrize(
    "tf_config,match",
    [
        ('{"cluster": {', "TF_CONFIG is not valid JSON"),
        (_tf_config(TWO_WORKERS, index=5), "task index 5 is out of range"),
        (_tf_config({"worker": ["a:1"], "ps": ["b:2"]}), "'ps' job"),
    ],
)
def test_multi_worker_validates_tf_config_first(clean_env, tf_config, match):
    clean_env.setenv("TF_CONFIG", tf_config)
    created = []
    clean_env.setattr(
        tf.distribute,
        "MultiWorkerMirroredStrategy",
        lambda **kwargs: created.append(kwargs),
    )
    with pytest.raises(ValueError, match=match):
        get_strategy("multi_worker")
    assert created == []


def test_multi_worker_passes_the_communication(clean_env):
    clean_env.setenv("TF_CONFIG", _tf_config(TWO_WORKERS))
    created = []
    clean_env.setattr(
        tf.distribute,
        "MultiWorkerMirroredStrategy",
        lambda **kwargs: created.append(kwargs) or "strategy",
    )
    assert get_strategy("multi_worker", communication="ring") == "strategy"
    options = created[0]["communication_options"]
    assert (
        options.implementation
        == tf.distribute.experimental.CommunicationImplementation.RING
    )


def test_strategy_names():
    assert STRATEGY_NAMES == (
        "auto",
        "tpu",
        "mirrored",
        "multi_worker",
        "one_device",
    )


# Batches and datasets.


class _Replicas:
    """A strategy as far as the batch checks see it."""

    def __init__(self, num_replicas_in_sync):
        self.num_replicas_in_sync = num_replicas_in_sync


@pytest.mark.parametrize(
    "batch,replicas,per_replica", [(8, 4, 2), (8, 1, 8), (96, 32, 3)]
)
def test_check_global_batch_size(batch, replicas, per_replica):
    assert check_global_batch_size(batch, _Replicas(replicas)) == per_replica


@pytest.mark.parametrize(
    "batch,replicas,match",
    [
        (10, 4, "global batch size 10 does not split over the 4 replicas"),
        (10, 4, r"e\.g\. 8 or 12"),
        (3, 4, "size 3 does not split over the 4 replicas"),
        (0, 1, "positive multiple of 1"),
        (-4, 2, "size -4 does not split"),
        (8.0, 4, "batch_size must be an int"),
        (True, 1, "batch_size must be an int"),
    ],
)
def test_check_global_batch_size_rejects(batch, replicas, match):
    with pytest.raises(ValueError, match=match):
        check_global_batch_size(batch, _Replicas(replicas))


def test_check_global_batch_size_defaults_to_the_current_strategy():
    assert check_global_batch_size(6) == 6
    with get_strategy("mirrored", devices=["/cpu:0"]).scope():
        assert check_global_batch_size(6) == 6


def _examples(n=10):
    x = np.arange(n * 2, dtype="float32").reshape(n, 2)
    return tf.data.Dataset.from_tensor_slices((x, x[:, :1]))


def test_prepare_dataset_batches_by_the_global_batch():
    batches = list(prepare_dataset(_examples(10), 4, _Replicas(2)))
    assert [int(x.shape[0]) for x, _ in batches] == [4, 4]
    np.testing.assert_array_equal(batches[1][0][:, 0], [8, 10, 12, 14])
    kept = prepare_dataset(_examples(10), 4, _Replicas(2), drop_remainder=False)
    assert [int(x.shape[0]) for x, _ in kept] == [4, 4, 2]


def test_prepare_dataset_sets_the_shard_policy():
    policy = tf.data.experimental.AutoShardPolicy.DATA
    dataset = prepare_dataset(
        _examples(), 2, _Replicas(1), auto_shard_policy=policy
    )
    assert dataset.options().experimental_distribute.auto_shard_policy == policy


def test_prepare_dataset_rejects(monkeypatch):
    with pytest.raises(ValueError, match="does not split over the 4"):
        prepare_dataset(_examples(), 6, _Replicas(4))
    with pytest.raises(ValueError, match="must be a tf.data.Dataset"):
        prepare_dataset(np.zeros((4, 2)), 2, _Replicas(1))
    with pytest.raises(ValueError, match="auto_shard_policy must be"):
        prepare_dataset(_examples(), 2, _Replicas(1), auto_shard_policy="DATA")

    class FakeTPUStrategy(_Replicas):
        pass

    monkeypatch.setattr(tf.distribute, "TPUStrategy", FakeTPUStrategy)
    with pytest.raises(ValueError, match="TPUStrategy cannot compile"):
        prepare_dataset(
            _examples(), 2, FakeTPUStrategy(1), drop_remainder=False
        )


# fit_distributed.


def test_fit_distributed_takes_the_numpy_sgd_steps():
    """Two SGD steps of a linear model with MSE, against NumPy."""
    strategy = get_strategy("mirrored", devices=["/cpu:0"])
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 3)).astype("float32")
    y = rng.normal(size=(8, 1)).astype("float32")
    w0 = rng.normal(size=(3, 1)).astype("float32")
    with strategy.scope():
        model = keras.Sequential(
            [keras.Input((3,)), keras.layers.Dense(1, use_bias=False)]
        )
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    model.layers[0].kernel.assign(w0)
    data = prepare_dataset(
        tf.data.Dataset.from_tensor_slices((x, y)), 4, strategy
    )
    history = fit_distributed(model, data, epochs=1, verbose=0)

    w, losses = w0.astype(np.float64), []
    for batch in (slice(0, 4), slice(4, 8)):
        error = x[batch] @ w - y[batch]
        losses.append(np.mean(error**2))
        w = w - 0.1 * 2 * x[batch].T @ error / 4
    np.testing.assert_allclose(
        model.layers[0].kernel.numpy(), w, rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        history.history["loss"], [np.mean(losses)], rtol=1e-5
    )
    # The model is left as it was found.
    assert model._distribute_strategy is strategy
    assert "train_step" not in model.__dict__


def test_build_for_fit_builds_without_computing():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse", metrics=["mae"])
    before = [w.numpy() for w in model.weights]
    build_for_fit(model, _examples().batch(2))
    assert model.optimizer.built
    assert int(model.optimizer.iterations.numpy()) == 0
    for a, b in zip(before, model.weights):
        np.testing.assert_array_equal(a, b.numpy())
    with pytest.raises(ValueError, match="must be a tf.data.Dataset"):
        build_for_fit(model, np.zeros((2, 2)))
    uncompiled = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    with pytest.raises(ValueError, match="has no optimizer"):
        build_for_fit(uncompiled, _examples().batch(2))


def test_docstring_examples_run(clean_env):
    result = doctest.testmod(strategies, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 15 and result.failed == 0


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))
