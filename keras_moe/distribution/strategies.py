"""tf.distribute strategies for training keras_moe models with `model.fit`.

`get_strategy(name)` is the one place launchers turn a flag into a
`tf.distribute.Strategy`:

* `"tpu"`: `TPUStrategy` on the TPU at `tpu` (a name, a `grpc://host:port`
  address or `"local"` on a TPU VM), after connecting to it and initialising
  the TPU system;
* `"mirrored"`: `MirroredStrategy` on the local GPUs (or the given devices);
* `"multi_worker"`: `MultiWorkerMirroredStrategy` on the cluster described by
  the `TF_CONFIG` environment variable (validated first);
* `"one_device"`: `OneDeviceStrategy` on the first GPU, else the CPU (or the
  given device);
* `"auto"`: the first of these that applies, in this order:
  1. `"tpu"` if a TPU address is passed or `TPU_NAME` is set, or this
     machine has TPU devices (a TPU VM);
  2. `"multi_worker"` if `TF_CONFIG` names more than one worker (chief and
     worker tasks counted together);
  3. `"mirrored"` if there is more than one GPU;
  4. `"one_device"` otherwise.

Global batch B and R replicas (`strategy.num_replicas_in_sync`): each step
splits the B examples of a global batch into R slices of B / R, and the
gradients are summed across replicas after Keras scales each replica's loss
by 1 / R, so a step equals a single-device step on the whole batch (up to the
float summation order). `check_global_batch_size` enforces that B divides
evenly; `prepare_dataset` batches a dataset of examples for `fit` with it.

MoE routing is per group: with `group_size=None` a group is one sequence
(one image in ViT), so splitting a batch over replicas changes no group.
With a fixed `group_size` S the tokens of a replica's slice are grouped
together: the groups match single-device training only when each replica's
token count (B / R times the sequence length) is a multiple of S.

`model.compile(jit_compile=True)` fails under `MirroredStrategy` with more
than one replica; compile with `jit_compile=False` there (the MoE layers can
still compile routing and dispatch with XLA themselves).
"""

import json
import logging
import os
import re

import tensorflow as tf

from keras_moe.utils.checks import require_tensorflow_backend

STRATEGY_NAMES = ("auto", "tpu", "mirrored", "multi_worker", "one_device")
COMMUNICATIONS = ("auto", "ring", "nccl")

_TF_CONFIG_EXAMPLE = (
    '{"cluster": {"worker": ["host0:2222", "host1:2222"]}, '
    '"task": {"type": "worker", "index": 0}}'
)
# host:port, host a name, an IPv4 address or a bracketed IPv6 address.
_ADDRESS = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.\-]+):([0-9]{1,5})$")

logger = logging.getLogger(__name__)


class TFConfig:
    """A validated `TF_CONFIG`: the cluster and this process's task.

    Attributes:
        cluster: dict job name -> tuple of "host:port" addresses.
        task_type: this task's job name ("chief", "worker", "evaluator"...).
        task_index: this task's index in its job.
    """

    def __init__(self, cluster, task_type, task_index):
        self.cluster = cluster
        self.task_type = task_type
        self.task_index = task_index

    @property
    def num_workers(self):
        """Training tasks: chief and worker addresses together."""
        return len(self.cluster.get("chief", ())) + len(
            self.cluster.get("worker", ())
        )

    @property
    def is_chief(self):
        """Whether this task is the chief (worker 0 when there is none)."""
        if "chief" in self.cluster:
            return self.task_type == "chief"
        return self.task_type == "worker" and self.task_index == 0

    def __repr__(self):
        return (
            f"TFConfig(cluster={self.cluster!r}, task_type="
            f"{self.task_type!r}, task_index={self.task_index!r})"
        )


def _tf_config_error(problem):
    return ValueError(
        f"TF_CONFIG {problem}; expected a JSON object such as "
        f"{_TF_CONFIG_EXAMPLE}"
    )


def parse_tf_config(value=None):
    """Parses and validates a `TF_CONFIG` string.

    Args:
        value: the JSON text; None reads the `TF_CONFIG` environment
            variable.

    Returns:
        A `TFConfig`, or None when `TF_CONFIG` is unset or empty.

    Raises:
        ValueError naming TF_CONFIG and what was expected, for text that is
        not JSON, a missing or malformed "cluster" or "task", a task type
        absent from the cluster, a task index out of range, or an address
        that is not host:port.

    Example:

    >>> config = parse_tf_config(
    ...     '{"cluster": {"worker": ["10.0.0.1:2222", "10.0.0.2:2222"]}, '
    ...     '"task": {"type": "worker", "index": 1}}'
    ... )
    >>> config.num_workers, config.is_chief
    (2, False)
    """
    if value is None:
        value = os.environ.get("TF_CONFIG", "")
    if not isinstance(value, str):
        raise ValueError(
            f"TF_CONFIG must be a JSON string; received {type(value).__name__}"
        )
    if not value.strip():
        return None
    try:
        config = json.loads(value)
    except json.JSONDecodeError as e:
        raise _tf_config_error(f"is not valid JSON ({e}): {value!r}") from None
    if not isinstance(config, dict):
        raise _tf_config_error(f"must be a JSON object; received {value!r}")
    cluster = config.get("cluster")
    if not isinstance(cluster, dict) or not cluster:
        raise _tf_config_error(
            'has no "cluster" object mapping job names to address lists; '
            f"received cluster={cluster!r}"
        )
    parsed = {}
    for job, addresses in cluster.items():
        if not isinstance(addresses, list) or not addresses:
            raise _tf_config_error(
                f'cluster job "{job}" must be a non-empty list of "host:port"'
                f" addresses; received {addresses!r}"
            )
        for address in addresses:
            match = isinstance(address, str) and _ADDRESS.match(address)
            if not match or not 1 <= int(match.group(2)) <= 65535:
                raise _tf_config_error(
                    f'cluster job "{job}" has address {address!r}, which is '
                    'not "host:port" (port 1-65535)'
                )
        parsed[job] = tuple(addresses)
    if len(parsed.get("chief", ())) > 1:
        raise _tf_config_error(
            f'has {len(parsed["chief"])} "chief" addresses; at most one is '
            "allowed"
        )
    task = config.get("task")
    if not isinstance(task, dict) or "type" not in task or "index" not in task:
        raise _tf_config_error(
            'needs a "task" object with "type" and "index"; received '
            f"task={task!r}"
        )
    task_type, task_index = task["type"], task["index"]
    if task_type not in parsed and task_type != "evaluator":
        raise _tf_config_error(
            f"task type {task_type!r} is not a job of the cluster "
            f"{sorted(parsed)}"
        )
    if isinstance(task_index, bool) or not isinstance(task_index, int):
        raise _tf_config_error(
            f'task "index" must be an integer; received {task_index!r}'
        )
    size = len(parsed.get(task_type, ())) or 1  # an evaluator runs alone
    if not 0 <= task_index < size:
        raise _tf_config_error(
            f"task index {task_index} is out of range for job "
            f'"{task_type}" with {size} address(es) (valid: 0..{size - 1})'
        )
    return TFConfig(parsed, task_type, task_index)


def auto_strategy_name(tpu=None, environ=None, physical_devices=None):
    """The strategy `get_strategy("auto")` picks (see the module docstring).

    Args:
        tpu: the TPU address a launcher passes (None if not given).
        environ: environment mapping (default `os.environ`).
        physical_devices: device type -> count (default: from
            `tf.config.list_physical_devices`, which does not initialise
            the devices).

    Returns:
        One of "tpu", "multi_worker", "mirrored", "one_device".

    Example:

    >>> auto_strategy_name(environ={}, physical_devices={"GPU": 2})
    'mirrored'
    """
    environ = os.environ if environ is None else environ
    if physical_devices is None:
        physical_devices = {
            kind: len(tf.config.list_physical_devices(kind))
            for kind in ("TPU", "GPU")
        }
    if tpu or environ.get("TPU_NAME") or physical_devices.get("TPU", 0):
        return "tpu"
    config = parse_tf_config(environ.get("TF_CONFIG", ""))
    if config is not None and config.num_workers > 1:
        return "multi_worker"
    if physical_devices.get("GPU", 0) > 1:
        return "mirrored"
    return "one_device"


def get_strategy(name="auto", tpu=None, devices=None, communication="auto"):
    """Returns the `tf.distribute.Strategy` called `name`.

    Every argument is validated before TensorFlow connects to a cluster or
    a TPU. Call it at program start, before any other
    TensorFlow op: `MultiWorkerMirroredStrategy` and the TPU system must be
    set up first. Build and compile the model inside `strategy.scope()`.

    Args:
        name: one of `STRATEGY_NAMES`; "auto" picks one as the module
            docstring describes.
        tpu: for "tpu" (and "auto"): the TPU name, `grpc://host:port`
            address, or "local" (TPU VM); None lets `TPUClusterResolver`
            find it (`TPU_NAME`). Refused with the other strategies.
        devices: for "mirrored", a list of devices (default: all GPUs, or
            the CPU); for "one_device", a list of exactly one device
            (default: the first GPU, else the CPU). E.g. ["/gpu:0",
            "/gpu:1"] or ["/cpu:0"]. Refused with the other strategies.
        communication: for "multi_worker", the collective implementation:
            "auto", "ring" or "nccl".

    Returns:
        The strategy.

    Raises:
        ValueError for an unknown name (listing the valid ones), arguments
        that do not apply to the strategy, unknown devices, or a missing or
        malformed `TF_CONFIG` for "multi_worker".

    Example:

    >>> import keras
    >>> strategy = get_strategy("one_device")
    >>> strategy.num_replicas_in_sync
    1
    >>> with strategy.scope():
    ...     model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    ...     model.compile(optimizer="sgd", loss="mse", jit_compile=False)
    """
    require_tensorflow_backend("tf.distribute strategies")
    if name not in STRATEGY_NAMES:
        raise ValueError(
            f"Unknown strategy {name!r}; valid names: "
            f"{', '.join(STRATEGY_NAMES)}"
        )
    if tpu is not None and (not isinstance(tpu, str) or not tpu.strip()):
        raise ValueError(
            f"tpu must be a non-empty string (a TPU name, grpc://host:port "
            f"or 'local') or None; received {tpu!r}"
        )
    if tpu is not None and name not in ("tpu", "auto"):
        raise ValueError(
            f"tpu={tpu!r} applies to the 'tpu' and 'auto' strategies only; "
            f"received name={name!r}"
        )
    if communication not in COMMUNICATIONS:
        raise ValueError(
            f"communication must be one of {COMMUNICATIONS}; received "
            f"{communication!r}"
        )
    if devices is not None:
        if name not in ("mirrored", "one_device"):
            raise ValueError(
                "devices applies to the 'mirrored' and 'one_device' "
                f"strategies only; received name={name!r}"
            )
        devices = _check_devices(devices, name)
    if name == "auto":
        name = auto_strategy_name(tpu=tpu)
        if name == "tpu" and tpu is None and not os.environ.get("TPU_NAME"):
            tpu = "local"  # TPU devices on this machine: a TPU VM
        logger.info("Strategy 'auto' picked %r", name)
    if name == "multi_worker":
        # Fails with the TF_CONFIG problem before TensorFlow's own parser
        # (or a collective that never connects) would.
        config = parse_tf_config()
        if config is None:
            raise ValueError(
                "Strategy 'multi_worker' reads its cluster from TF_CONFIG, "
                "which is not set; expected a JSON object such as "
                f"{_TF_CONFIG_EXAMPLE}. On one machine use 'mirrored'."
            )
        if "ps" in config.cluster:
            raise ValueError(
                "TF_CONFIG names a 'ps' job: that is a parameter-server "
                "cluster, which MultiWorkerMirroredStrategy does not run; "
                "expected only 'chief' and 'worker' jobs"
            )
        options = tf.distribute.experimental.CommunicationOptions(
            implementation=getattr(
                tf.distribute.experimental.CommunicationImplementation,
                communication.upper(),
            )
        )
        return tf.distribute.MultiWorkerMirroredStrategy(
            communication_options=options
        )
    if name == "tpu":
        return _tpu_strategy(tpu)
    if name == "mirrored":
        return tf.distribute.MirroredStrategy(devices=devices)
    if devices is None:
        gpus = tf.config.list_logical_devices("GPU")
        devices = [gpus[0].name if gpus else "/cpu:0"]
    return tf.distribute.OneDeviceStrategy(devices[0])


def _tpu_strategy(tpu):
    """Connects to the TPU, initialises it, returns a `TPUStrategy`."""
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)


def _check_devices(devices, name):
    """Validated device strings that exist on this machine."""
    if isinstance(devices, str) or not isinstance(devices, list | tuple):
        raise ValueError(
            f"devices must be a list of device names such as ['/gpu:0']; "
            f"received {devices!r}"
        )
    if not devices or not all(isinstance(d, str) for d in devices):
        raise ValueError(
            f"devices must be a non-empty list of strings; received "
            f"{devices!r}"
        )
    if name == "one_device" and len(devices) != 1:
        raise ValueError(
            f"strategy 'one_device' takes exactly one device; received "
            f"devices={devices!r}"
        )
    available = {}
    for device in tf.config.list_logical_devices():
        spec = tf.DeviceSpec.from_string(device.name)
        available[(spec.device_type, spec.device_index)] = device.name
    for device in devices:
        try:
            spec = tf.DeviceSpec.from_string(device)
        except ValueError:
            spec = None
        key = spec and (
            (spec.device_type or "").upper(),
            spec.device_index or 0,
        )
        if key not in available:
            raise ValueError(
                f"Unknown device {device!r}; this machine has "
                f"{sorted(available.values())}"
            )
    if len(set(devices)) != len(devices):
        raise ValueError(f"devices repeats a device: {devices!r}")
    return list(devices)


def check_global_batch_size(batch_size, strategy=None):
    """Checks that a global batch splits evenly over the replicas.

    Args:
        batch_size: the global batch size B.
        strategy: the strategy (default: the current one,
            `tf.distribute.get_strategy()`).

    Returns:
        The per-replica batch size B / R.

    Raises:
        ValueError naming B and R when B is not a positive multiple of R.

    Example:

    >>> import tensorflow as tf
    >>> check_global_batch_size(32, tf.distribute.get_strategy())
    32
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int):
        raise ValueError(f"batch_size must be an int; received {batch_size!r}")
    strategy = strategy or tf.distribute.get_strategy()
    replicas = strategy.num_replicas_in_sync
    if batch_size < 1 or batch_size % replicas:
        below = max(batch_size // replicas, 1) * replicas
        raise ValueError(
            f"The global batch size {batch_size} does not split over the "
            f"{replicas} replicas of {type(strategy).__name__}: it must be a "
            f"positive multiple of {replicas} (e.g. {below} or "
            f"{below + replicas})"
        )
    return batch_size // replicas


def prepare_dataset(
    dataset,
    global_batch_size,
    strategy=None,
    drop_remainder=True,
    auto_shard_policy=None,
):
    """Batches a dataset of examples for `model.fit` under `strategy`.

    `fit` distributes the returned dataset itself: each global batch of
    `global_batch_size` examples is split into one slice per replica, in
    order. With several workers, each worker reads the whole pipeline unless
    `auto_shard_policy` says otherwise (TensorFlow's default, AUTO, shards
    by file when the source has files, else by data).

    Args:
        dataset: an unbatched `tf.data.Dataset` of (inputs, targets)
            examples.
        global_batch_size: B, checked with `check_global_batch_size`.
        strategy: the strategy (default: the current one).
        drop_remainder: drop a last, smaller batch (required on TPU, whose
            shapes must be static; a smaller batch would also split
            unevenly over the replicas).
        auto_shard_policy: a `tf.data.experimental.AutoShardPolicy`, or
            None to keep the dataset's.

    Returns:
        The batched, prefetched `tf.data.Dataset`.

    Example:

    >>> import numpy as np
    >>> import tensorflow as tf
    >>> examples = tf.data.Dataset.from_tensor_slices(
    ...     (np.zeros((10, 4), "float32"), np.zeros((10, 1), "float32")))
    >>> batches = prepare_dataset(examples, 4, tf.distribute.get_strategy())
    >>> [int(x.shape[0]) for x, y in batches]
    [4, 4]
    """
    if not isinstance(dataset, tf.data.Dataset):
        raise ValueError(
            f"dataset must be a tf.data.Dataset; received "
            f"{type(dataset).__name__}"
        )
    strategy = strategy or tf.distribute.get_strategy()
    check_global_batch_size(global_batch_size, strategy)
    if not drop_remainder and isinstance(strategy, tf.distribute.TPUStrategy):
        raise ValueError(
            "drop_remainder=False gives a last batch of another shape, which "
            "TPUStrategy cannot compile; pass drop_remainder=True"
        )
    if auto_shard_policy is not None and not isinstance(
        auto_shard_policy, tf.data.experimental.AutoShardPolicy
    ):
        raise ValueError(
            "auto_shard_policy must be a tf.data.experimental.AutoShardPolicy "
            f"or None; received {auto_shard_policy!r}"
        )
    dataset = dataset.batch(global_batch_size, drop_remainder=drop_remainder)
    if auto_shard_policy is not None:
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = auto_shard_policy
        dataset = dataset.with_options(options)
    return dataset.prefetch(tf.data.AUTOTUNE)


def _check_fit_args(model, dataset):
    if not isinstance(dataset, tf.data.Dataset):
        raise ValueError(
            f"dataset must be a tf.data.Dataset; received "
            f"{type(dataset).__name__}"
        )
    if getattr(model, "optimizer", None) is None:
        raise ValueError(
            f"model {getattr(model, 'name', model)!r} has no optimizer: "
            "compile it first"
        )


def build_for_fit(model, dataset):
    """Builds `model`'s compiled loss, metrics and optimizer for `dataset`.

    Only the shapes and dtypes of `dataset.element_spec` are used: nothing
    is computed, no state changes. `fit_distributed` and `fit_resumable`
    call it; it is public for custom loops that need the optimizer's
    variables (e.g. to restore a checkpoint) before training.

    Args:
        model: a compiled model, built and compiled in its strategy's scope.
        dataset: the batched `tf.data.Dataset` that `fit` will get.

    Example:

    >>> import keras
    >>> import numpy as np
    >>> import tensorflow as tf
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    >>> model.compile(optimizer="sgd", loss="mse")
    >>> data = tf.data.Dataset.from_tensor_slices(
    ...     (np.zeros((8, 4), "float32"), np.zeros((8, 1), "float32"))
    ... ).batch(4)
    >>> build_for_fit(model, data)
    >>> model.optimizer.built
    True
    """
    _check_fit_args(model, dataset)
    with model.distribute_strategy.scope():
        # What `fit` does itself without a strategy (a private Keras
        # method), from the element spec instead of a batch.
        model._symbolic_build(data_batch=dataset.element_spec)


def fit_distributed(model, dataset, **fit_kwargs):
    """`model.fit(dataset, ...)` under the model's strategy, any strategy.

    Works around two failures of Keras 3.15's `fit` under a strategy, both
    in the step where `fit` builds the compiled loss and metrics from the
    first batch reduced over replicas (MEAN): integer inputs (T5 token ids)
    become floats, which the model rejects, and under
    `MultiWorkerMirroredStrategy` the reduction of a tuple or dict batch
    fails outright (keras-team/keras#20329). Here the loss, metrics and
    optimizer are built first from the dataset's element spec
    (`build_for_fit`), and that step of `fit` is skipped; the training
    itself is `fit`'s own, under the same strategy.

    With several workers, Keras 3.15 also fails to average each step's
    scalar logs over the replicas (tensorflow/tensorflow#72388): for the
    duration of the call the model's train and test steps return them with
    shape [1], which that averaging handles.

    Args:
        model: a compiled model, built and compiled in its strategy's scope.
        dataset: a batched `tf.data.Dataset` (see `prepare_dataset`).
        **fit_kwargs: passed to `model.fit` (epochs, steps_per_epoch,
            callbacks, ...).

    Returns:
        The `History` `fit` returns.

    Example:

    >>> import keras
    >>> import numpy as np
    >>> import tensorflow as tf
    >>> strategy = get_strategy("one_device")
    >>> with strategy.scope():
    ...     model = keras.Sequential([keras.Input((4,)),
    ...                               keras.layers.Dense(1)])
    ...     model.compile(optimizer="sgd", loss="mse", jit_compile=False)
    >>> examples = tf.data.Dataset.from_tensor_slices(
    ...     (np.ones((8, 4), "float32"), np.ones((8, 1), "float32")))
    >>> history = fit_distributed(
    ...     model, prepare_dataset(examples, 4, strategy), epochs=2,
    ...     verbose=0)
    >>> len(history.history["loss"])
    2
    """
    build_for_fit(model, dataset)
    strategy = model.distribute_strategy
    # Keras reads the strategy from `_distribute_strategy` (set when the
    # model was made in a strategy scope) or, when it is None, from the
    # enclosing scope; only the reduction step above looks at the attribute
    # itself and is skipped when it is None. In the strategy's scope `fit`
    # then trains exactly as it would have.
    saved_strategy = model._distribute_strategy
    steps = ("train_step", "test_step") if _other_workers(strategy) else ()
    saved_steps = {name: model.__dict__.get(name) for name in steps}
    model._distribute_strategy = None
    for name in steps:
        setattr(model, name, _with_rank_1_logs(getattr(model, name)))
    try:
        with strategy.scope():
            # A dataset's order is its own: no warning that shuffle=True
            # (fit's default) is ignored.
            return model.fit(dataset, **{"shuffle": False, **fit_kwargs})
    finally:
        model._distribute_strategy = saved_strategy
        for name, step in saved_steps.items():
            if step is None:
                delattr(model, name)  # back to the class's method
            else:
                setattr(model, name, step)


def _with_rank_1_logs(step):
    """`step` returning its scalar logs with shape [1].

    With several workers, Keras 3.15 averages a step's logs over replicas
    with `strategy.reduce("MEAN", log, axis=0)`, which fails on scalars
    (tensorflow/tensorflow#72388); on shape [1] it is the mean over
    replicas, a scalar again.
    """

    def step_with_rank_1_logs(data):
        return tf.nest.map_structure(
            lambda v: tf.reshape(v, [1]) if v.shape.rank == 0 else v,
            step(data),
        )

    return step_with_rank_1_logs


def _other_workers(strategy):
    """Whether some of the strategy's replicas run in other processes."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return False
    local = len(strategy.extended.worker_devices)
    return local < strategy.num_replicas_in_sync
