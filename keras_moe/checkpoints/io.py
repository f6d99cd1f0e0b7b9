"""File I/O shared by the checkpoint readers of every model family.

The family modules (`keras_moe.checkpoints.t5`, `keras_moe.checkpoints.vit`)
hold name maps and family logic; what touches a file is here:

* `LazyTensor`: an array whose shape is known at once and whose values are
  read when used. Readers map source names to canonical names with these,
  `assign_weights` checks every name and shape before it reads anything, and
  loading then holds one source tensor at a time.
* Hugging Face `save_pretrained` directories (`hf_checkpoint`): `config.json`
  and `model.safetensors` or the shards of `model.safetensors.index.json`,
  opened by `open_safetensors` with the `safetensors` package (bfloat16
  tensors come back as `ml_dtypes.bfloat16`; a truncated or corrupt file is
  refused when opened).
* Keras `.weights.h5` files (`open_h5`, read with h5py) and keras-hub preset
  configs (`keras_hub_config`).
* TensorFlow checkpoints (`open_tf_checkpoint`), read by name with
  `tf.train.load_checkpoint`, and the names their object graphs give
  (`tf_object_variables`, `tf_variable_names`).
* `put`, which refuses a second source tensor for one canonical name, and
  `checkpoint_format`, which tells the formats apart from a path.

Every failure is a `ValueError` that names the file, and the tensor where
there is one.
"""

import contextlib
import functools
import glob
import json
import math
import os
import re

import h5py
import numpy as np
import tensorflow as tf
from safetensors import SafetensorError
from safetensors import safe_open

from keras_moe.checkpoints.common import CheckpointMismatchError

HF_FILES = ("model.safetensors", "model.safetensors.index.json")
KERAS_HUB_WEIGHTS = "model.weights.h5"


# --------------------------------------------------------------------------
# Lazy tensors and the canonical-name map.


class _ReadError(ValueError):
    """A read failure already worded; derived tensors pass it on as is."""


class LazyTensor:
    """An array whose shape is known now and whose values are read on use.

    `assign_weights` takes `np.shape` of every value (the `shape` attribute
    here) before it assigns anything, then `np.asarray` of each in turn.
    Read errors of any kind become a `ValueError` naming the tensor.

    Args:
        shape: the shape the file's header or index records.
        load: a function of no arguments that returns the values.
        where: the tensor and its file, for errors (see `where`).
    """

    def __init__(self, shape, load, where):
        self.shape = tuple(int(d) for d in shape)
        self._load = load
        self.where = where

    @property
    def ndim(self):
        return len(self.shape)

    @property
    def T(self):
        return self.transpose()

    def transpose(self, *axes):
        """Transposed as `np.transpose`; no axes reverse them."""
        axes = tuple(axes) or tuple(reversed(range(self.ndim)))
        shape = tuple(self.shape[a] for a in axes)
        return LazyTensor(
            shape, lambda: np.transpose(self.read(), axes), self.where
        )

    def reshape(self, *shape):
        """Reshaped as `np.reshape`, one -1 allowed."""
        shape = list(shape)
        size = math.prod(self.shape)
        if -1 in shape:
            known = math.prod(d for d in shape if d != -1)
            shape[shape.index(-1)] = size // known if known else 0
        if math.prod(shape) != size:
            raise ValueError(
                f"{self.where} of shape {self.shape} cannot be reshaped to "
                f"{tuple(shape)}."
            )
        shape = tuple(shape)
        return LazyTensor(
            shape, lambda: np.reshape(self.read(), shape), self.where
        )

    def read(self):
        """The values, checked against the recorded shape."""
        try:
            array = np.asarray(self._load())
        except _ReadError:
            raise
        except Exception as error:  # TF, h5py, safetensors and I/O errors.
            # TensorFlow's messages go on with the op's stack: one line
            # says what went wrong.
            message = getattr(error, "message", None) or str(error)
            first = message.splitlines()[0] if message else repr(error)
            raise _ReadError(f"Cannot read {self.where}: {first}") from error
        if array.shape != self.shape:
            raise _ReadError(
                f"{self.where} has shape {array.shape}, its header says "
                f"{self.shape}."
            )
        return array

    def __array__(self, dtype=None, copy=None):
        array = self.read()
        return array if dtype is None else array.astype(dtype, copy=False)


def where(name, source):
    """How errors name tensor `name` of `source` (a file or checkpoint)."""
    return f"{source} (tensor {name!r})"


def variable_tensor(variable, source):
    """A `LazyTensor` of a Keras variable, named by its path."""
    return LazyTensor(
        variable.shape, variable.numpy, where(variable.path, source)
    )


def put(arrays, canonical, value, source_name, source):
    """`arrays[canonical] = value`, refusing a second value for one name.

    Raises:
        CheckpointMismatchError: `canonical` already has a value: two
            source tensors map to one weight.
    """
    if canonical in arrays:
        raise CheckpointMismatchError(
            f"{source} has two weights for {canonical!r} (the second is "
            f"{source_name!r})."
        )
    arrays[canonical] = value


def read_json(path):
    """The parsed JSON file `path`; a `ValueError` naming it otherwise."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as error:
        raise ValueError(f"Cannot read {path}: {error}") from error


def checkpoint_format(path):
    """Which kind of reader `path` goes to, from its name and files.

    Returns:
        "keras_hub_object" for anything that is not a path (a keras-hub
        model); "hf" for a `.safetensors` file or a directory with
        `model.safetensors[.index.json]`; "keras_hub" for a `.weights.h5`
        file or a directory with `model.weights.h5` (a keras-hub preset);
        "tf" for anything else (a TensorFlow checkpoint, or nothing).
    """
    if not isinstance(path, (str, os.PathLike)):
        return "keras_hub_object"
    path = os.fspath(path)

    def has(name):
        return os.path.isdir(path) and os.path.isfile(os.path.join(path, name))

    if path.endswith(".safetensors") or any(map(has, HF_FILES)):
        return "hf"
    if path.endswith(".weights.h5") or has(KERAS_HUB_WEIGHTS):
        return "keras_hub"
    return "tf"


# --------------------------------------------------------------------------
# Hugging Face safetensors.


class HFCheckpoint:
    """The files of a Hugging Face `save_pretrained` checkpoint.

    Attributes:
        path: the path it was found at.
        files: the safetensors files.
        weight_map: tensor name -> file name of a sharded checkpoint, None
            for one file.
        config: the `config.json` dict, None when there is none.
        config_path: the `config.json` path, None when there is none.
    """

    def __init__(self, path, files, weight_map, config, config_path):
        self.path = path
        self.files = files
        self.weight_map = weight_map
        self.config = config
        self.config_path = config_path


def hf_checkpoint(path, model_types, family):
    """Finds the files and the config of a Hugging Face checkpoint.

    A single `model.safetensors` is taken before a shard index, as
    transformers does.

    Args:
        path: a `save_pretrained` directory, or one `.safetensors` file (a
            `config.json` beside it is read).
        model_types: the `model_type`s `config.json` may give (it may also
            give none).
        family: the model family, for errors ("T5", "ViT").

    Returns:
        An `HFCheckpoint`.

    Raises:
        ValueError: no safetensors file or shard, an unreadable index or
            `config.json`, or a `config.json` of another model type.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        directory = path
        single, index = (os.path.join(path, name) for name in HF_FILES)
        if os.path.isfile(single):
            files, weight_map = [single], None
        elif os.path.isfile(index):
            weight_map = read_json(index)
            if not isinstance(weight_map, dict) or not isinstance(
                weight_map.get("weight_map"), dict
            ):
                raise ValueError(
                    f"Cannot read the shard index {index}: it has no "
                    "'weight_map'."
                )
            weight_map = weight_map["weight_map"]
            files = sorted({os.path.join(path, f) for f in weight_map.values()})
        else:
            found = sorted(os.listdir(path))
            raise ValueError(
                f"No model.safetensors or model.safetensors.index.json in "
                f"{path}: it holds no model.safetensors checkpoint (it has "
                f"{found[:10]})."
            )
    elif os.path.isfile(path):
        directory, files, weight_map = os.path.dirname(path), [path], None
    else:
        raise ValueError(f"No Hugging Face checkpoint at {path}.")
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise ValueError(
            f"Hugging Face checkpoint {path} lacks shards {missing}."
        )
    config, config_path = None, os.path.join(directory, "config.json")
    if os.path.isfile(config_path):
        config = read_json(config_path)
        if not isinstance(config, dict):
            raise ValueError(f"{config_path} is not a JSON object.")
        model_type = config.get("model_type")
        if model_type is not None and model_type not in model_types:
            architectures = config.get("architectures")
            raise ValueError(
                f"{config_path} describes a {model_type!r} model, not "
                f"{family}"
                + (
                    f" (architectures {architectures})."
                    if architectures
                    else "."
                )
            )
    else:
        config_path = None
    return HFCheckpoint(path, files, weight_map, config, config_path)


@contextlib.contextmanager
def open_safetensors(files, weight_map=None):
    """Name -> `LazyTensor` of every tensor of `files`, open in the block.

    Args:
        files: safetensors files.
        weight_map: a shard index's tensor -> file map, checked against the
            shards when given.

    Yields:
        dict tensor name -> `LazyTensor`, readable until the block ends.

    Raises:
        ValueError: a truncated, corrupt or unreadable file, a tensor in
            two shards or an index listing tensors no shard holds.
    """
    with contextlib.ExitStack() as stack:
        tensors = {}
        for file in files:
            try:
                handle = stack.enter_context(safe_open(file, framework="numpy"))
            except SafetensorError as error:
                # The package checks the header against the file's size.
                raise ValueError(
                    f"Cannot read safetensors file: {file} is truncated or "
                    f"corrupt ({error})."
                ) from error
            except OSError as error:
                raise ValueError(
                    f"Cannot read safetensors file {file}: {error}"
                ) from error
            for name in handle.keys():
                if name in tensors:
                    raise ValueError(
                        f"{name!r} is in more than one shard ({file})."
                    )
                tensors[name] = LazyTensor(
                    handle.get_slice(name).get_shape(),
                    functools.partial(handle.get_tensor, name),
                    where(name, file),
                )
        if weight_map is not None:
            absent = sorted(set(weight_map) - set(tensors))
            if absent:
                raise ValueError(
                    "The shard index lists tensors no shard holds: "
                    f"{absent[:10]}."
                )
        yield tensors


# --------------------------------------------------------------------------
# Keras .weights.h5 files and keras-hub presets.


@contextlib.contextmanager
def open_h5(path, source=None):
    """Dataset path -> `LazyTensor` of an HDF5 weights file, open in the block.

    Optimizer state (`optimizer/...`, saved with a compiled model) is left
    out: it is not part of the model.

    Args:
        path: a `.weights.h5` file.
        source: names the file in tensor errors; `path` by default.

    Yields:
        dict dataset path (`layers/dense/vars/0`) -> `LazyTensor`.

    Raises:
        ValueError: no such file, or one that is truncated, corrupt or not
            HDF5.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"No weights file at {path}.")
    source = source or path
    datasets = {}

    def visit(name, item):
        if isinstance(item, h5py.Dataset) and not name.startswith("optimizer/"):
            datasets[name] = LazyTensor(
                item.shape,
                functools.partial(item.__getitem__, ()),
                where(name, source),
            )

    try:
        handle = h5py.File(path, "r")
    except (OSError, ValueError) as error:
        raise ValueError(
            f"Cannot read {path} (truncated, corrupt or not an HDF5 weights "
            f"file): {error}"
        ) from error
    with handle:
        try:
            handle.visititems(visit)
        except (OSError, KeyError, ValueError, RuntimeError) as error:
            raise ValueError(
                f"Cannot read {path} (truncated, corrupt or not an HDF5 "
                f"weights file): {error}"
            ) from error
        yield datasets


def keras_hub_config(path, class_name):
    """The `config` of a keras-hub `config.json` or `task.json`.

    Args:
        path: the JSON file (`save_to_preset` writes them).
        class_name: the class it must describe ("T5Backbone", ...).

    Raises:
        ValueError: no such file, an unreadable one, or one of another
            class.
    """
    if not os.path.isfile(path):
        raise ValueError(
            f"{os.path.dirname(path)} is not a keras-hub preset: it has no "
            f"{os.path.basename(path)}."
        )
    saved = read_json(path)
    found = saved.get("class_name") if isinstance(saved, dict) else None
    if found != class_name:
        raise ValueError(
            f"{path} describes a {found!r}, not a keras-hub {class_name}."
        )
    return saved.get("config", {})


# --------------------------------------------------------------------------
# TensorFlow checkpoints.

_OBJECT_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"
_OBJECT_GRAPH = "_CHECKPOINTABLE_OBJECT_GRAPH"
# Entries of a name-based checkpoint that are not model weights.
_BOOKKEEPING = ("save_counter", "global_step")


def open_tf_checkpoint(path, what="TensorFlow checkpoint"):
    """Opens a TensorFlow checkpoint, checking every data shard exists.

    Args:
        path: a checkpoint prefix (`.../ckpt-1`), its `.index` file, or a
            directory holding a `checkpoint` file or one checkpoint.
        what: the kind of checkpoint, for errors ("Model Garden
            checkpoint").

    Returns:
        (prefix, `tf.train.CheckpointReader`).

    Raises:
        ValueError: no checkpoint there, several in a directory, a missing
            data shard, or an index TensorFlow cannot read.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        prefix = tf.train.latest_checkpoint(path)
        if prefix is None:
            indexes = sorted(
                glob.glob(os.path.join(glob.escape(path), "*.index"))
            )
            if not indexes:
                raise ValueError(
                    f"Cannot read {what} {path}. The directory holds no "
                    "tf.train checkpoint: no 'checkpoint' file and no "
                    "*.index file."
                )
            if len(indexes) > 1:
                names = [os.path.basename(i) for i in indexes]
                raise ValueError(
                    f"Cannot read {what} {path}. The directory holds several "
                    f"checkpoints ({names}); pass a prefix."
                )
            prefix = indexes[0][: -len(".index")]
    else:
        prefix = path[: -len(".index")] if path.endswith(".index") else path
        if not os.path.isfile(prefix + ".index"):
            raise ValueError(
                f"Cannot read {what} {path}. No TensorFlow checkpoint has "
                f"that prefix: {prefix}.index does not exist."
            )
    shards = glob.glob(glob.escape(prefix) + ".data-*-of-*")
    if not shards:
        raise ValueError(
            f"Cannot read {what} {prefix}. The index has no data file "
            f"({prefix}.data-00000-of-NNNNN)."
        )
    count = int(shards[0].rsplit("-of-", 1)[1])
    missing = [
        f"{prefix}.data-{i:05d}-of-{count:05d}"
        for i in range(count)
        if not os.path.isfile(f"{prefix}.data-{i:05d}-of-{count:05d}")
    ]
    if missing:
        raise ValueError(
            f"Cannot read {what} {prefix}. It is incomplete: missing "
            f"{missing}."
        )
    try:
        reader = tf.train.load_checkpoint(prefix)
    except (tf.errors.OpError, ValueError) as error:
        raise ValueError(f"Cannot read {what} {prefix}: {error}") from error
    return prefix, reader


def tf_object_variables(reader):
    """Object path -> (checkpoint key, shape) of an object-based checkpoint.

    `tf.train.Checkpoint(model=m).save` keys `m.encoder.kernel` as
    `model/encoder/kernel/.ATTRIBUTES/VARIABLE_VALUE`; this gives
    `model/encoder/kernel`. Optimizer slots are left out.
    """
    variables = {}
    for key, shape in reader.get_variable_to_shape_map().items():
        if key.endswith(_OBJECT_SUFFIX) and ".OPTIMIZER_SLOT" not in key:
            variables[key[: -len(_OBJECT_SUFFIX)]] = (key, shape)
    return variables


def tf_variable_names(reader, prefix, what="TensorFlow checkpoint"):
    """Variable name -> checkpoint key of a checkpoint's model variables.

    The names are the variables' own (`encoder/dense/kernel`, as
    `variable.name` without `:0`), which an object-based checkpoint's object
    graph records; a name-based (TF1 `Saver`) checkpoint is keyed by them.
    Optimizer state and the variables a trainer hangs on the root (global
    step, save counter) are left out.

    Args:
        reader: a `tf.train.CheckpointReader`.
        prefix: its prefix, for errors.
        what: the kind of checkpoint, for errors.

    Raises:
        ValueError: the object graph cannot be read.
    """
    keys = reader.get_variable_to_shape_map()
    if _OBJECT_GRAPH not in keys:
        return {k: k for k in keys if k not in _BOOKKEEPING}
    from tensorflow.core.protobuf import trackable_object_graph_pb2

    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    try:
        graph.ParseFromString(reader.get_tensor(_OBJECT_GRAPH))
    except Exception as error:  # TF's OpError or protobuf's DecodeError.
        message = getattr(error, "message", None) or str(error)
        raise ValueError(
            f"Cannot read {what} {prefix} (truncated, corrupt or not a "
            f"tf.train checkpoint): {message.splitlines()[0]}"
        ) from error
    slots = {
        slot.slot_variable_node_id
        for node in graph.nodes
        for slot in node.slot_variables
    }
    names, seen, queue = {}, {0}, [0]
    while queue:
        node_id = queue.pop(0)
        node = graph.nodes[node_id]
        for attribute in node.attributes:
            if attribute.name == "VARIABLE_VALUE":
                name = attribute.full_name or attribute.checkpoint_key
                names[re.sub(r":\d+$", "", name)] = attribute.checkpoint_key
        for child in node.children:
            # Optimizer state, and variables hung on the root (global step,
            # save counter), are not model weights.
            if child.local_name == "optimizer" or child.node_id in slots:
                continue
            if node_id == 0 and _is_variable(graph.nodes[child.node_id]):
                continue
            if child.node_id not in seen:
                seen.add(child.node_id)
                queue.append(child.node_id)
    return names


def _is_variable(node):
    return any(a.name == "VARIABLE_VALUE" for a in node.attributes)
