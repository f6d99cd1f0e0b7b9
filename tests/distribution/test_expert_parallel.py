"""Expert parallelism on a DTensor mesh: mesh specs, layouts, training.

Multi-device checks run `_ep_small.py` / `_ep_train.py` in a
subprocess with 8 virtual CPU devices (TensorFlow's devices can only be
split before it starts, and pytest shares one process). One-device checks
(a 1 x 1 mesh on CPU:0) run here.
"""

import doctest
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from ep_models import one_moe_layer_model
from tensorflow.experimental import dtensor

from keras_moe.distribution import expert_parallel
from keras_moe.distribution import mesh as mesh_lib
from keras_moe.distribution.expert_parallel import ExpertParallelTrainer
from keras_moe.layers.moe import MoeLayer

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(os.path.dirname(_HERE))
TOLERANCE = 1e-5


def _run_script(name, *args, timeout=1500):
    env = dict(os.environ, PYTHONPATH=_ROOT, TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run(
        [sys.executable, os.path.join(_HERE, name), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-6000:]
    return result.stdout


# Mesh specs -----------------------------------------------------------------


@pytest.mark.parametrize(
    "spec,num_devices,expected",
    [
        ("batch:2,expert:4", 8, {"batch": 2, "expert": 4}),
        (" expert : 8 , batch : 1 ", 8, {"batch": 1, "expert": 8}),
        ("expert:8", 8, {"batch": 1, "expert": 8}),
        ("batch:3", 3, {"batch": 3, "expert": 1}),
    ],
)
def test_parse_mesh_spec(spec, num_devices, expected):
    assert mesh_lib.parse_mesh_spec(spec, num_devices=num_devices) == expected


@pytest.mark.parametrize(
    "spec,match",
    [
        ("batch=2,expert=4", "cannot parse mesh spec"),
        ("batch:2;expert:4", "cannot parse mesh spec"),
        ("batch:two,expert:4", "cannot parse mesh spec"),
        ("", "cannot parse mesh spec"),
        (None, "cannot parse mesh spec"),
        ("batch:2,model:4", "unknown axis 'model'"),
        ("batch:2,batch:4", "names axis 'batch' twice"),
        ("batch:0,expert:8", "axis 'batch' has size 0"),
        ("batch:2,expert:-4", "axis 'expert' has size -4"),
        ("batch:2,expert:2", r"2 \* 2 = 4 devices but 8 are available"),
    ],
)
def test_parse_mesh_spec_rejects(spec, match):
    with pytest.raises(ValueError, match=match):
        mesh_lib.parse_mesh_spec(spec, num_devices=8)


def test_parse_mesh_spec_counts_the_devices_tensorflow_sees():
    count = len(mesh_lib.default_devices())
    assert mesh_lib.parse_mesh_spec(f"expert:{count}") == {
        "batch": 1,
        "expert": count,
    }
    with pytest.raises(ValueError, match=f"but {count} are available"):
        mesh_lib.parse_mesh_spec(f"expert:{count + 1}")


def _two_clients(monkeypatch, client=1, local=2):
    """Makes mesh_lib see client `client` of a two-process cluster whose
    processes have `local` CPUs each, as TensorFlow lists them there."""
    names = [
        f"/job:worker/replica:0/task:{task}/device:CPU:{i}"
        for task in range(2)
        for i in range(local)
    ]

    def list_logical_devices(device_type):
        if device_type != "CPU":
            return []
        return [tf.config.LogicalDevice(n, "CPU") for n in names]

    monkeypatch.setattr(tf.config, "list_logical_devices", list_logical_devices)
    monkeypatch.setattr(dtensor, "num_clients", lambda: 2)
    monkeypatch.setattr(dtensor, "client_id", lambda: client)


@pytest.mark.parametrize("client", [0, 1])
def test_several_processes_count_every_process_devices(monkeypatch, client):
    _two_clients(monkeypatch, client=client)
    # Only this process's devices, renumbered from 0 as local names.
    assert mesh_lib.default_devices() == ["CPU:0", "CPU:1"]
    assert mesh_lib.parse_mesh_spec("batch:2,expert:2") == {
        "batch": 2,
        "expert": 2,
    }
    with pytest.raises(
        ValueError,
        match=r"2 devices but 4 are available \(2 per process x 2 processes",
    ):
        mesh_lib.parse_mesh_spec("expert:2")


def test_several_processes_make_a_distributed_mesh(monkeypatch):
    _two_clients(monkeypatch)
    calls = []

    def create_distributed_mesh(axes, local_devices, device_type):
        calls.append((axes, local_devices, device_type))
        return "mesh"

    def create_mesh(*args, **kwargs):
        raise AssertionError("create_mesh cannot span processes")

    monkeypatch.setattr(
        dtensor, "create_distributed_mesh", create_distributed_mesh
    )
    monkeypatch.setattr(dtensor, "create_mesh", create_mesh)
    assert mesh_lib.make_mesh(1, 4) == "mesh"
    assert mesh_lib.as_mesh("batch:2,expert:2", devices=["CPU:0", "CPU:1"])
    assert calls == [
        ([("batch", 1), ("expert", 4)], ["CPU:0", "CPU:1"], "CPU"),
        ([("batch", 2), ("expert", 2)], ["CPU:0", "CPU:1"], "CPU"),
    ]
    with pytest.raises(ValueError, match="2 \\* 4 = 8 devices but 4"):
        mesh_lib.make_mesh(2, 4)
    with pytest.raises(ValueError, match="of one type"):
        mesh_lib.make_mesh(2, 2, devices=["CPU:0", "GPU:0"])


class _FakeMesh:
    """The parts of a `dtensor.Mesh` the batch split reads."""

    def __init__(self, batch, expert, locations):
        self._sizes = {"batch": batch, "expert": expert}
        self._locations = [{"batch": b, "expert": e} for b, e in locations]

    def dim_size(self, name):
        return self._sizes[name]

    def local_device_locations(self):
        return self._locations


def _trainer_on(mesh, spread):
    """An `ExpertParallelTrainer` with nothing but a mesh and a layout,
    for the batch split (which reads nothing else)."""
    trainer = object.__new__(ExpertParallelTrainer)
    trainer.mesh, trainer._spread = mesh, spread
    return trainer


@pytest.mark.parametrize(
    "shape,locations,spread,expected",
    [
        # batch:2,expert:4, process 1 of 2: parts 4..7 of 8 (GShard),
        # part 1 of 2 (replicated).
        ((2, 4), [(1, 0), (1, 1), (1, 2), (1, 3)], True, (8, 16)),
        ((2, 4), [(1, 0), (1, 1), (1, 2), (1, 3)], False, (8, 16)),
        # batch:1,expert:8, process 0 of 2: parts 0..3 of 8 (GShard); the
        # one part of the batch axis (replicated: the whole batch).
        ((1, 8), [(0, 0), (0, 1), (0, 2), (0, 3)], True, (0, 8)),
        ((1, 8), [(0, 0), (0, 1), (0, 2), (0, 3)], False, (0, 16)),
        # batch:4,expert:2, process 1 of 2 (replicated): parts 2 and 3.
        ((4, 2), [(2, 0), (2, 1), (3, 0), (3, 1)], False, (8, 16)),
    ],
)
def test_local_batch_rows_on_part_of_a_mesh(shape, locations, spread, expected):
    mesh = _FakeMesh(*shape, locations)
    assert _trainer_on(mesh, spread).local_batch_rows(16) == expected


def test_local_batch_rows_rejects():
    mesh = _FakeMesh(2, 4, [(0, 0), (0, 2), (1, 0), (1, 2)])
    trainer = _trainer_on(mesh, spread=True)
    with pytest.raises(ValueError, match=r"parts \[0, 2, 4, 6\] .* not one"):
        trainer.local_batch_rows(16)
    with pytest.raises(ValueError, match="a batch of 12 examples cannot"):
        trainer.local_batch_rows(12)
    for bad in (0, -8, 8.0, True, "16", None):
        with pytest.raises(ValueError, match="batch_size must be an int"):
            trainer.local_batch_rows(bad)


def test_make_mesh_and_layouts():
    mesh = mesh_lib.make_mesh(1, 1, devices=["CPU:0"])
    assert tuple(mesh.dim_names) == ("batch", "expert")
    assert mesh_lib.expert_weight_layout(mesh, 3).sharding_specs == [
        "expert",
        "unsharded",
        "unsharded",
    ]
    assert mesh_lib.batch_layout(mesh, 2).sharding_specs == [
        "batch",
        "unsharded",
    ]
    with pytest.raises(ValueError, match="1 \\* 2 = 2 devices but 1"):
        mesh_lib.make_mesh(1, 2, devices=["CPU:0"])
    with pytest.raises(ValueError, match="'expert' must be an int >= 1"):
        mesh_lib.make_mesh(1, 0, devices=["CPU:0"])
    with pytest.raises(ValueError, match="must have the axes"):
        mesh_lib.as_mesh(
            dtensor.create_mesh([("x", 1), ("y", 1)], devices=["CPU:0"])
        )


def test_docstring_examples():
    for module in (mesh_lib, expert_parallel):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0 and result.attempted > 0, module.__name__


# The MoeLayer relayout hook ---------------------------------------------------


def test_relayout_hook_wraps_the_experts_and_is_not_serialised(tmp_path):
    layer = MoeLayer(4, 16, num_selected_experts=2, name="moe")
    x = np.random.default_rng(0).normal(size=(3, 6, 8)).astype("float32")
    expected = keras.ops.convert_to_numpy(layer(x, training=True))
    seen = []

    def hook(rows, to):
        seen.append((to, tuple(rows.shape)))
        return rows * 1.0

    layer.relayout_hook = hook
    got = keras.ops.convert_to_numpy(layer(x, training=True))
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    # <[E, G*C, D]>: G = 3 sequences, C = ceil(2 * 6 * 1.25 / 4) = 4.
    assert seen == [("experts", (4, 12, 8)), ("tokens", (4, 12, 8))]
    config = layer.get_config()
    assert "relayout_hook" not in config
    assert MoeLayer.from_config(config).relayout_hook is None
    inputs = keras.Input((6, 8))
    model = keras.Model(inputs, layer(inputs))
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert loaded.get_layer("moe").relayout_hook is None


def test_trainer_leaves_no_hook_behind():
    model = _small_model()
    trainer = ExpertParallelTrainer(
        model, _one_device_mesh(), optimizer="sgd", loss=_LOSS
    )
    trainer.fit(_data(steps=1))
    assert model.get_layer("moe").relayout_hook is None
    # Plain Keras calls still work on the model the trainer used.
    assert model(_data()[0][0]).shape == (4, 3)


def test_row_local_top_k_gradient_equals_tensorflows():
    x = tf.constant(np.random.default_rng(0).normal(size=(2, 3, 7)), "float32")
    weights = tf.constant(np.arange(6.0).reshape(2, 3, 1) + 1.0, "float32")

    def gradient():
        with tf.GradientTape() as tape:
            tape.watch(x)
            values = tf.math.top_k(x, 3).values
            loss = tf.reduce_sum(values * values * weights)
        return tape.gradient(loss, x).numpy()

    expected = gradient()
    with expert_parallel._dtensor_safe_top_k_gradient():
        got = gradient()
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert np.count_nonzero(got) == 2 * 3 * 3
    # The registered gradient is restored afterwards.
    assert (
        expert_parallel.tf_ops._gradient_registry.lookup("TopKV2")
        is not expert_parallel._topk_gradient_by_one_hot
    )


# One device: the optimizers against Keras ----------------------------------


def _small_model(num_experts=4, seed=0):
    return one_moe_layer_model(num_experts, seed, head_name="head")


def _data(steps=3, batch=4, seed=1):
    rng = np.random.default_rng(seed)
    return [
        (
            rng.normal(size=(batch, 6, 8)).astype("float32"),
            rng.integers(0, 3, size=(batch,)).astype("int32"),
        )
        for _ in range(steps)
    ]


_LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _adamw_without_head_decay():
    optimizer = keras.optimizers.AdamW(0.05, weight_decay=0.1, amsgrad=True)
    optimizer.exclude_from_weight_decay(var_names=["head"])
    return optimizer


def _one_device_mesh():
    return mesh_lib.make_mesh(1, 1, devices=["CPU:0"])


def test_local_batch_rows_on_one_process_is_the_whole_batch():
    trainer = ExpertParallelTrainer(
        _small_model(), _one_device_mesh(), optimizer="sgd", loss=_LOSS
    )
    assert trainer.local_batch_rows(8) == (0, 8)
    assert trainer.local_batch_rows(np.int64(3)) == (0, 3)


@pytest.mark.parametrize(
    "optimizer",
    [
        lambda: keras.optimizers.Adam(0.05),
        lambda: _adamw_without_head_decay(),
        lambda: keras.optimizers.SGD(0.1, momentum=0.9, nesterov=True),
        lambda: keras.optimizers.SGD(0.1, momentum=0.5, clipvalue=0.01),
        lambda: keras.optimizers.SGD(0.1, global_clipnorm=0.02),
        lambda: keras.optimizers.Adam(
            keras.optimizers.schedules.ExponentialDecay(0.05, 1, 0.5),
            clipnorm=0.5,
        ),
    ],
    ids=[
        "adam",
        "adamw_amsgrad_excluded",
        "sgd_nesterov",
        "sgd_momentum_clipvalue",
        "sgd_global_clipnorm",
        "adam_schedule_clipnorm",
    ],
)
def test_one_device_trainer_matches_keras_fit(optimizer):
    """The trainer's step (`DTensorOptimizer`, aux losses included)
    reproduces Keras' own train step with the same Keras optimizer."""
    data = _data()
    reference = _small_model()
    reference.compile(optimizer=optimizer(), loss=_LOSS, jit_compile=False)
    expected = [
        reference.train_on_batch(x, y, return_dict=True)["loss"]
        for x, y in data
    ]
    trainer = ExpertParallelTrainer(
        _small_model(), _one_device_mesh(), optimizer=optimizer(), loss=_LOSS
    )
    losses = trainer.fit(iter(data), steps=3)
    np.testing.assert_allclose(losses, expected, rtol=TOLERANCE)
    # The first loss is the cross-entropy plus the MoE auxiliary losses.
    model = _small_model()
    logits = keras.ops.convert_to_numpy(model(data[0][0], training=True))
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    cross_entropy = -np.mean(log_probs[np.arange(4), data[0][1]])
    aux = sum(float(loss) for loss in model.losses)
    assert aux > 1e-3
    np.testing.assert_allclose(losses[0], cross_entropy + aux, rtol=1e-5)
    for got, want in zip(
        trainer.model.trainable_variables, reference.trainable_variables
    ):
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(got),
            keras.ops.convert_to_numpy(want),
            atol=TOLERANCE,
            err_msg=got.path,
        )


class _StopAfter(keras.callbacks.Callback):
    def __init__(self, steps):
        super().__init__()
        self.steps = steps
        self.seen = []

    def on_train_batch_end(self, batch, logs=None):
        self.seen.append((batch, logs["loss"]))
        if len(self.seen) == self.steps:
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        # The Keras model already holds the trained weights.
        self.final = keras.ops.convert_to_numpy(
            self.model.get_layer("head").kernel
        )


def test_fit_runs_callbacks_and_syncs_before_train_end():
    trainer = ExpertParallelTrainer(
        _small_model(), _one_device_mesh(), optimizer="sgd", loss=_LOSS
    )
    before = keras.ops.convert_to_numpy(trainer.model.get_layer("head").kernel)
    callback = _StopAfter(2)
    dataset = tf.data.Dataset.from_tensor_slices(
        tuple(np.concatenate(a) for a in zip(*_data(steps=4)))
    ).batch(4)
    losses = trainer.fit(dataset, callbacks=[callback])
    assert len(losses) == 2 and trainer.step == 2
    assert [b for b, _ in callback.seen] == [0, 1]
    assert [loss for _, loss in callback.seen] == losses
    assert not np.allclose(callback.final, before)
    # steps=None runs until the dataset ends.
    assert len(trainer.fit(dataset)) == 4


def test_sample_weights_match_keras():
    data = [(x, y, np.linspace(0.0, 2.0, len(y))) for x, y in _data()]
    reference = _small_model()
    # A loss given by name: Keras' default reduction applies.
    loss = "sparse_categorical_crossentropy"
    reference.compile(optimizer="sgd", loss=loss, jit_compile=False)
    expected = [
        reference.train_on_batch(x, y, sample_weight=w, return_dict=True)[
            "loss"
        ]
        for x, y, w in data
    ]
    trainer = ExpertParallelTrainer(
        _small_model(), _one_device_mesh(), optimizer="sgd", loss=loss
    )
    np.testing.assert_allclose(trainer.fit(data), expected, rtol=TOLERANCE)


def test_dict_inputs_match_keras():
    def model():
        keras.utils.set_random_seed(0)
        a = keras.Input((6, 8), name="a")
        b = keras.Input((3,), name="b")
        hidden = MoeLayer(4, 16, name="moe")(a)
        joined = keras.layers.Concatenate()([keras.layers.Flatten()(hidden), b])
        return keras.Model({"a": a, "b": b}, keras.layers.Dense(3)(joined))

    rng = np.random.default_rng(3)
    data = [
        ({"a": x, "b": rng.normal(size=(4, 3)).astype("float32")}, y)
        for x, y in _data()
    ]
    reference = model()
    reference.compile(optimizer="adam", loss=_LOSS, jit_compile=False)
    expected = [
        reference.train_on_batch(x, y, return_dict=True)["loss"]
        for x, y in data
    ]
    trainer = ExpertParallelTrainer(
        model(), _one_device_mesh(), optimizer="adam", loss=_LOSS
    )
    np.testing.assert_allclose(trainer.fit(data), expected, rtol=TOLERANCE)


def test_checkpoint_round_trip_and_atomic_write(tmp_path):
    data = _data(steps=3)
    trainer = ExpertParallelTrainer(
        _small_model(), _one_device_mesh(), optimizer="adam", loss=_LOSS
    )
    trainer.fit(data[:2])
    path = str(tmp_path / "ckpt")
    assert trainer.save(path) == path
    assert os.listdir(tmp_path) == ["ckpt"]  # no temporary file left
    expected = trainer.train_step(*data[2])
    # A fresh model with other initial weights takes the checkpoint's.
    resumed = ExpertParallelTrainer.restore(
        path, _small_model(seed=5), _one_device_mesh()
    )
    assert resumed.step == 2
    assert isinstance(resumed.optimizer, keras.optimizers.Adam)
    np.testing.assert_allclose(
        resumed.train_step(*data[2]), expected, rtol=TOLERANCE
    )
    trainer.sync_to_model()
    resumed.sync_to_model()
    for a, b in zip(trainer.model.weights, resumed.model.weights):
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b)
        )


def _tree(path):
    """{relative file path: bytes} of a directory."""
    found = {}
    for root, _, names in os.walk(path):
        for name in names:
            full = os.path.join(root, name)
            with open(full, "rb") as file:
                found[os.path.relpath(full, path)] = file.read()
    return found


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    trainer = ExpertParallelTrainer(
        _small_model(), _one_device_mesh(), optimizer="adam", loss=_LOSS
    )
    path = str(tmp_path / "ckpt")
    trainer.save(path)
    saved = _tree(path)
    write = tf.train.Checkpoint.write

    def broken_write(self, prefix, options=None):
        write(self, prefix, options)  # the files are written, then:
        raise OSError("disk full")

    monkeypatch.setattr(tf.train.Checkpoint, "write", broken_write)
    trainer.fit(_data(steps=1))
    with pytest.raises(OSError, match="disk full"):
        trainer.save(path)
    assert os.listdir(tmp_path) == ["ckpt"]
    assert _tree(path) == saved


# Bad input --------------------------------------------------------------


def test_bad_checkpoints(tmp_path):
    trainer = ExpertParallelTrainer(
        _small_model(), _one_device_mesh(), optimizer="adam", loss=_LOSS
    )
    with pytest.raises(ValueError, match="no checkpoint at"):
        trainer.load(str(tmp_path / "missing"))
    junk = tmp_path / "junk"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="is not an expert-parallel"):
        trainer.load(str(junk))
    path = str(tmp_path / "ckpt")
    trainer.save(path)
    other = ExpertParallelTrainer(
        _small_model(num_experts=2), _one_device_mesh(), "adam", loss=_LOSS
    )
    with pytest.raises(ValueError, match="has shape"):
        other.load(path)
    sgd = ExpertParallelTrainer(
        _small_model(), _one_device_mesh(), optimizer="sgd", loss=_LOSS
    )
    with pytest.raises(ValueError, match="optimizer variables"):
        sgd.load(path)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"optimizer": "rmsprop"}, "must be a Keras optimizer of class"),
        (
            {"optimizer": keras.optimizers.Adam(use_ema=True)},
            "does not support use_ema=True",
        ),
        (
            {"optimizer": keras.optimizers.SGD(gradient_accumulation_steps=2)},
            "does not support gradient_accumulation_steps=2",
        ),
        ({"loss": None}, "loss is required"),
        ({"mesh": "batch:1,expert:2"}, "2 devices but 1 are available"),
        ({"mesh": {"batch": 1}}, "a dict with the keys"),
        ({"mesh": "batch:1;expert:1"}, "cannot parse mesh spec"),
    ],
)
def test_bad_trainer_arguments(kwargs, match):
    arguments = dict(mesh=_one_device_mesh(), optimizer="adam", loss=_LOSS)
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=match):
        ExpertParallelTrainer(_small_model(), **arguments)


def test_e3_models_are_refused():
    from keras_moe.models.vit import ViT
    from keras_moe.upcycling import upcycle

    model = upcycle(
        ViT.from_architecture("vit_tiny"), num_experts=4, ensemble_size=2
    )
    with pytest.raises(
        ValueError, match="ensemble_size=2\\) are not supported"
    ):
        ExpertParallelTrainer(model, _one_device_mesh(), loss=_LOSS)


def test_unbuilt_model_and_bad_batches():
    with pytest.raises(ValueError, match="must be built"):
        ExpertParallelTrainer(
            keras.Sequential([keras.layers.Dense(2)]),
            _one_device_mesh(),
            loss=_LOSS,
        )
    trainer = ExpertParallelTrainer(
        _small_model(), _one_device_mesh(), optimizer="sgd", loss=_LOSS
    )
    with pytest.raises(ValueError, match="yield \\(x, y\\)"):
        trainer.fit([np.zeros((4, 6, 8), "float32")])
    with pytest.raises(ValueError, match="steps must be >= 0"):
        trainer.fit(_data(), steps=-1)


@pytest.fixture(scope="module")
def small_eight_device_run():
    stdout = _run_script("_ep_small.py", timeout=900)
    return json.loads(stdout.strip().splitlines()[-1])


def test_mesh_checks_on_eight_devices(small_eight_device_run):
    """Expert axis not dividing E, a batch not splitting over the devices
    (GShard) or the batch axis (replicated layout): raised before any
    work, with the numbers."""
    report = small_eight_device_run
    assert report["expert_axis"] == (
        "MoE layer 'moe' has num_experts=6, which the mesh's expert "
        "axis of size 4 does not divide: each device must hold the same "
        "number of experts"
    )
    assert report["batch_axis"].startswith(
        "a batch of 6 examples cannot be split over the mesh's batch * "
        "expert = 4 * 2 = 8 devices"
    )
    assert report["batch_axis_replicated"].startswith(
        "a batch of 6 examples cannot be split over the mesh's batch axis "
        "of size 4"
    )
    assert report["steps_after_bad_batch"] == 0
    assert "3 * 2 = 6 devices but 8 are available" in report["spec"]
    assert report["default_devices"] == [f"CPU:{i}" for i in range(8)]


def test_small_model_on_eight_devices_matches_one_device(
    small_eight_device_run,
):
    """Two MoE layers (token choice with einsum dispatch, expert choice
    with index dispatch), Adam, mesh batch:2,expert:4 vs plain Keras."""
    report = small_eight_device_run
    np.testing.assert_allclose(
        report["losses"], report["reference_losses"], atol=TOLERANCE
    )
    for path, got, want in zip(
        report["paths"], report["weights"], report["reference_weights"]
    ):
        np.testing.assert_allclose(got, want, atol=TOLERANCE, err_msg=path)


# Eight devices: training matches one device ----------------------------------


@pytest.fixture(scope="module")
def eight_device_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ep")
    _run_script("_ep_train.py", f"--out={out}")
    results = dict(np.load(out / "results.npz"))
    with open(out / "summary.json") as file:
        summary = json.load(file)
    return results, summary


def _weights(results, run):
    count = sum(1 for k in results if k.startswith("reference/w"))
    return [results[f"{run}/w{i}"] for i in range(count)]


# Attention key biases have an exact gradient of zero (a softmax does not
# change when the same constant is added to all scores of a query), so
# their gradients are float noise that Adam scales up to steps of about
# 1% of the learning rate, in both runs independently.
_NOISE_ONLY = "attention/key/bias"


def _assert_weights_match(results, summary, run):
    for path, got, want in zip(
        summary["weight_paths"],
        _weights(results, run),
        _weights(results, "reference"),
    ):
        atol = 1e-4 if path.endswith(_NOISE_ONLY) else TOLERANCE
        np.testing.assert_allclose(got, want, atol=atol, err_msg=path)


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["2x4", "1x8"])
def test_expert_parallel_training_matches_one_device(eight_device_run, mesh):
    results, summary = eight_device_run
    np.testing.assert_allclose(
        results[f"{mesh}/losses"], results["reference/losses"], atol=TOLERANCE
    )
    _assert_weights_match(results, summary, mesh)
    paths = summary["weight_paths"]
    # The comparison is not vacuous: the expert kernels, the router and the
    # head moved by far more than the tolerance.
    initial = dict(zip(paths, _weights(results, "initial")))
    final = dict(zip(paths, _weights(results, "reference")))
    for path in paths:
        if path.endswith(
            ("experts/wi", "experts/wo", "router/kernel", "head/kernel")
        ):
            assert np.abs(final[path] - initial[path]).max() > 100 * TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize("mesh,experts_per_device", [("2x4", 2), ("1x8", 1)])
def test_expert_weights_and_rows_are_expert_sharded(
    eight_device_run, mesh, experts_per_device
):
    _, summary = eight_device_run
    kernel = summary[f"{mesh}/expert_kernel"]
    assert kernel["specs"] == ["expert", "unsharded", "unsharded"]
    assert kernel["global"] == [8, 32, 64]
    assert kernel["shards"] == [[experts_per_device, 32, 64]] * 8
    to_experts, to_tokens = summary[f"{mesh}/expert_rows"]
    batch_shards = 2 if mesh == "2x4" else 1
    # [E, G*C, D]: G = 16 images, C = ceil(17 * 2 / 8) = 5 slots per group.
    assert to_experts["global"] == [8, 80, 32]
    assert to_experts["specs"] == ["expert", "batch", "unsharded"]
    assert (
        to_experts["shards"]
        == [[experts_per_device, 80 // batch_shards, 32]] * 8
    )
    # Back in the token layout, each device holds the rows of its own 2
    # images (GShard: the batch of 16 is split over all 8 devices).
    assert to_tokens["specs"] == ["unsharded", "batch", "unsharded"]
    assert to_tokens["shards"] == [[8, 2 * 5, 32]] * 8


@pytest.mark.slow
@pytest.mark.parametrize("run", ["resumed_1x8", "resumed_1x1"])
def test_checkpoint_resumes_on_another_mesh(eight_device_run, run):
    """Saved on (2, 4) after 2 steps, resumed on (1, 8) and on one device:
    the third step gives the uninterrupted run's loss and weights."""
    results, summary = eight_device_run
    assert summary[f"{run}/step_before"] == 2
    np.testing.assert_allclose(
        results[f"{run}/loss"], results["reference/losses"][2:], atol=TOLERANCE
    )
    _assert_weights_match(results, summary, run)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))
