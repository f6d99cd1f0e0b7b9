"""TF Serving configuration files for exported models.

`write_model_config` writes the `--model_config_file` of
`tensorflow_model_server`: a `ModelServerConfig` text proto whose
`model_config_list` has one entry per model directory under the export
base (built with the `tensorflow_serving.config` protos, so it parses).
`write_batching_parameters` writes the `--batching_parameters_file` (a
`BatchingParameters` text proto; with `--enable_batching`), built as a
`BatchingParameters` message (the `tensorflow_serving` class where the
installed package ships it, else one made from the schema TF Serving
documents in `session_bundle_config.proto`) and parsed back before it is
written.

    tensorflow_model_server --rest_api_port=8501 \\
        --model_config_file=<export_base>/models.config \\
        --enable_batching \\
        --batching_parameters_file=<export_base>/batching_parameters.txt

Batching concatenates concurrent requests along dimension 0 before one
call. Outputs stay the same per example when the exported MoE blocks drop
no token (the default eval capacity factor); see the adapters' docstrings.
`pad_variable_length_inputs` pads other dimensions with each tensor's
first element, not with a padding id: it stays off here, so T5 clients pad
`encoder_token_ids` themselves (to the export's `max_input_length` when
requests of several lengths may be merged).

`serving_xla` takes batches of exactly `xla_batch_size`, and the batching
parameters apply to every signature of every model the server loads: the
only consistent setting is `allowed_batch_sizes: [xla_batch_size]` with
`max_batch_size` equal to it, so that every merged batch is padded to that
size. `write_batching_parameters` reads each export's `xla_batch_size` from
its metadata and writes that setting; it refuses a `max_batch_size` or
`allowed_batch_sizes` the XLA function would not take, and exports that
disagree on the size. Requests larger than the batch must then be split by
the client.

Files are written through `tf.io.gfile` (local paths atomically), so the
export base may be a `gs://`, `s3://` or `ram://` path.
"""

import json
import os

import tensorflow as tf
from google.protobuf import descriptor_pb2
from google.protobuf import descriptor_pool
from google.protobuf import message_factory
from google.protobuf import text_format
from google.protobuf import wrappers_pb2
from tensorflow_serving.config import model_server_config_pb2

from keras_moe.utils import files
from keras_moe.utils.files import write_text

MODEL_CONFIG_FILE = "models.config"
BATCHING_PARAMETERS_FILE = "batching_parameters.txt"


METADATA_FILE = "assets.extra/keras_moe_export.json"


def _entries(directory):
    return sorted(name.rstrip("/") for name in tf.io.gfile.listdir(directory))


def _versions(model_dir):
    return sorted(
        int(name)
        for name in _entries(model_dir)
        if name.isdigit()
        and tf.io.gfile.exists(files.join(model_dir, name, "saved_model.pb"))
    )


def served_models(export_base):
    """{model name: [versions]} of the complete exports under a base."""
    base = files.absolute(export_base)
    models = {}
    if not tf.io.gfile.isdir(base):
        return models
    for name in _entries(base):
        entry = files.join(base, name)
        if not name.startswith(".") and tf.io.gfile.isdir(entry):
            versions = _versions(entry)
            if versions:
                models[name] = versions
    return models


def model_config_text(models, num_versions=1):
    """A `ModelServerConfig` text proto for `{model name: base path}`.

    Args:
        models: {name: base path as the server sees it}.
        num_versions: serve the latest `num_versions` versions of each.
    """
    if not models:
        raise ValueError("models must name at least one model")
    if num_versions < 1:
        raise ValueError(f"num_versions must be >= 1; received {num_versions}")
    config = model_server_config_pb2.ModelServerConfig()
    for name, base_path in sorted(models.items()):
        entry = config.model_config_list.config.add()
        entry.name = name
        entry.base_path = str(base_path)
        entry.model_platform = "tensorflow"
        entry.model_version_policy.latest.num_versions = num_versions
    return text_format.MessageToString(config)


def write_model_config(export_base, serving_base_path=None, num_versions=1):
    """Writes `<export_base>/models.config` listing every exported model.

    Args:
        export_base: the export base directory.
        serving_base_path: where the server sees `export_base` (e.g.
            "/models" in a container); None uses the absolute local path.
        num_versions: versions to serve per model (the latest ones).

    Returns:
        The path written.
    """
    base = files.absolute(export_base)
    models = served_models(base)
    if not models:
        raise ValueError(f"No exported model under {base}")
    root = serving_base_path or base
    text = model_config_text(
        {name: f"{root.rstrip('/')}/{name}" for name in models}, num_versions
    )
    return write_text(files.join(base, MODEL_CONFIG_FILE), text)


def _batching_parameters_class():
    """The `tensorflow.serving.BatchingParameters` message class."""
    try:
        from tensorflow_serving.servables.tensorflow import (
            session_bundle_config_pb2,
        )

        return session_bundle_config_pb2.BatchingParameters
    except ImportError:
        pass
    # tensorflow-serving-api ships only the client protos: build the message
    # from the schema of session_bundle_config.proto (field numbers and types
    # as TF Serving declares them), in a pool of its own.
    field = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(
        name="keras_moe/batching_parameters.proto",
        package="tensorflow.serving",
        syntax="proto3",
        dependency=["google/protobuf/wrappers.proto"],
    )
    message = proto.message_type.add(name="BatchingParameters")
    int64_value = ".google.protobuf.Int64Value"
    for number, (name, kind, type_name, label) in enumerate(
        (
            ("max_batch_size", field.TYPE_MESSAGE, int64_value, None),
            ("batch_timeout_micros", field.TYPE_MESSAGE, int64_value, None),
            ("max_enqueued_batches", field.TYPE_MESSAGE, int64_value, None),
            ("num_batch_threads", field.TYPE_MESSAGE, int64_value, None),
            (
                "thread_pool_name",
                field.TYPE_MESSAGE,
                ".google.protobuf.StringValue",
                None,
            ),
            ("allowed_batch_sizes", field.TYPE_INT64, None, "repeated"),
            ("pad_variable_length_inputs", field.TYPE_BOOL, None, None),
        ),
        start=1,
    ):
        entry = message.field.add(
            name=name,
            number=number,
            type=kind,
            label=(
                field.LABEL_REPEATED
                if label == "repeated"
                else field.LABEL_OPTIONAL
            ),
        )
        if type_name:
            entry.type_name = type_name
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(wrappers_pb2.DESCRIPTOR.serialized_pb)
    pool.Add(proto)
    return message_factory.GetMessageClass(
        pool.FindMessageTypeByName("tensorflow.serving.BatchingParameters")
    )


def batching_parameters(
    max_batch_size=None,
    batch_timeout_micros=1000,
    max_enqueued_batches=100,
    num_batch_threads=None,
    allowed_batch_sizes=None,
    pad_variable_length_inputs=False,
    xla_batch_size=None,
):
    """A `BatchingParameters` message, checked.

    Args:
        max_batch_size: largest batch the server forms (default: the
            `xla_batch_size`, or 32 without one).
        batch_timeout_micros: longest wait for a batch to fill.
        max_enqueued_batches: queue length before requests are refused.
        num_batch_threads: batches run in parallel; None: CPU count.
        allowed_batch_sizes: increasing sizes batches are padded to; the last
            must equal `max_batch_size` (default: `[xla_batch_size]` with an
            XLA function, else none).
        pad_variable_length_inputs: pad non-batch dimensions (with each
            tensor's first element; see the module docstring).
        xla_batch_size: the fixed batch of the exports' `serving_xla`
            function, which every merged batch must then have.

    Raises:
        ValueError: a negative or non-int value, allowed sizes that do not
            increase to `max_batch_size`, or sizes `serving_xla` would not
            take.
    """
    if xla_batch_size is not None:
        if max_batch_size is None:
            max_batch_size = xla_batch_size
        if allowed_batch_sizes is None:
            allowed_batch_sizes = (xla_batch_size,)
    max_batch_size = 32 if max_batch_size is None else max_batch_size
    num_batch_threads = num_batch_threads or os.cpu_count() or 1
    for name, value in (
        ("max_batch_size", max_batch_size),
        ("batch_timeout_micros", batch_timeout_micros),
        ("max_enqueued_batches", max_enqueued_batches),
        ("num_batch_threads", num_batch_threads),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0; received {value!r}")
    sizes = [int(size) for size in allowed_batch_sizes or ()]
    if xla_batch_size is not None and (
        sizes != [xla_batch_size] or max_batch_size != xla_batch_size
    ):
        raise ValueError(
            f"serving_xla takes batches of exactly {xla_batch_size}; with "
            "server-side batching every merged batch is padded to an allowed "
            f"size, so allowed_batch_sizes must be [{xla_batch_size}] and "
            f"max_batch_size {xla_batch_size}; received max_batch_size="
            f"{max_batch_size}, allowed_batch_sizes={sizes}"
        )
    if sizes and (
        sizes != sorted(set(sizes))
        or sizes[-1] != max_batch_size
        or sizes[0] < 1
    ):
        raise ValueError(
            "allowed_batch_sizes must increase and end with max_batch_size="
            f"{max_batch_size}; received {sizes}"
        )
    message = _batching_parameters_class()()
    message.max_batch_size.value = max_batch_size
    message.batch_timeout_micros.value = batch_timeout_micros
    message.max_enqueued_batches.value = max_enqueued_batches
    message.num_batch_threads.value = num_batch_threads
    message.allowed_batch_sizes.extend(sizes)
    message.pad_variable_length_inputs = bool(pad_variable_length_inputs)
    return message


def batching_parameters_text(**kwargs):
    """The `BatchingParameters` text proto, one field per line.

    Takes the arguments of `batching_parameters`; the text is parsed back
    into the message class and must equal the message it was made from.
    """
    message = batching_parameters(**kwargs)
    pad = str(message.pad_variable_length_inputs).lower()
    lines = [
        f"max_batch_size {{ value: {message.max_batch_size.value} }}",
        "batch_timeout_micros { value: "
        f"{message.batch_timeout_micros.value} }}",
        "max_enqueued_batches { value: "
        f"{message.max_enqueued_batches.value} }}",
        f"num_batch_threads {{ value: {message.num_batch_threads.value} }}",
        *(f"allowed_batch_sizes: {s}" for s in message.allowed_batch_sizes),
        f"pad_variable_length_inputs: {pad}",
    ]
    text = "\n".join(lines) + "\n"
    parsed = text_format.Parse(text, type(message)())
    if parsed != message:  # the one-line writer and the schema disagree
        raise AssertionError(f"batching parameters do not round trip: {text}")
    return text


def export_metadata(export_dir):
    """The `keras_moe_export.json` an export wrote next to its SavedModel."""
    with tf.io.gfile.GFile(files.join(export_dir, METADATA_FILE), "r") as f:
        return json.load(f)


def xla_batch_size(export_base):
    """The `serving_xla` batch size shared by the latest version of every
    export under `export_base`; None if none has an XLA function.

    Raises:
        ValueError: exports with different sizes (one batching file cannot
            serve both), naming them.
    """
    base = files.absolute(export_base)
    sizes = {}
    for name, versions in served_models(base).items():
        export_dir = files.join(base, name, str(versions[-1]))
        if not tf.io.gfile.exists(files.join(export_dir, METADATA_FILE)):
            continue
        metadata = export_metadata(export_dir)
        if "serving_xla" in metadata.get("signatures", {}):
            sizes[f"{name}/{versions[-1]}"] = int(
                metadata["options"]["xla_batch_size"]
            )
    if len(set(sizes.values())) > 1:
        raise ValueError(
            "the exports' serving_xla functions take different batch sizes "
            f"{sizes}; one batching parameters file needs one: export them "
            "with the same xla_batch_size"
        )
    return next(iter(sizes.values()), None)


def write_batching_parameters(export_base, **kwargs):
    """Writes `<export_base>/batching_parameters.txt`; returns its path.

    kwargs as `batching_parameters`; `xla_batch_size` defaults to the one
    the exports under `export_base` share (`xla_batch_size`).
    """
    base = files.absolute(export_base)
    if "xla_batch_size" not in kwargs:
        kwargs["xla_batch_size"] = xla_batch_size(base)
    return write_text(
        files.join(base, BATCHING_PARAMETERS_FILE),
        batching_parameters_text(**kwargs),
    )
