"""TF Serving configuration files for exported models.

`write_model_config` writes the `--model_config_file` of
`tensorflow_model_server`: a `ModelServerConfig` text proto whose
`model_config_list` has one entry per model directory under the export
base (built with the `tensorflow_serving.config` protos, so it parses).
`write_batching_parameters` writes the `--batching_parameters_file` (a
`BatchingParameters` text proto; with `--enable_batching`).

    tensorflow_model_server --rest_api_port=8501 \\
        --model_config_file=<export_base>/models.config \\
        --enable_batching \\
        --batching_parameters_file=<export_base>/batching_parameters.txt

Batching concatenates concurrent requests along dimension 0 before one
call. Outputs stay the same per example when the exported MoE blocks drop
no token (the default eval capacity factor); see the adapters' docstrings.
`pad_variable_length_inputs` pads other dimensions with each tensor's
first element, not with a padding id: it stays off here, so T5 clients pad
`encoder_token_ids` themselves. `serving_xla` needs batches of exactly
`xla_batch_size`: `allowed_batch_sizes` equal to it pads every batch to it.
"""

import os
import pathlib

from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

MODEL_CONFIG_FILE = "models.config"
BATCHING_PARAMETERS_FILE = "batching_parameters.txt"


def _versions(model_dir):
    return sorted(
        int(entry.name)
        for entry in model_dir.iterdir()
        if entry.name.isdigit() and (entry / "saved_model.pb").is_file()
    )


def served_models(export_base):
    """{model name: [versions]} of the complete exports under a base."""
    base = pathlib.Path(export_base)
    models = {}
    for entry in sorted(base.iterdir()) if base.is_dir() else []:
        if entry.is_dir() and not entry.name.startswith("."):
            versions = _versions(entry)
            if versions:
                models[entry.name] = versions
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
    base = pathlib.Path(export_base).absolute()
    models = served_models(base)
    if not models:
        raise ValueError(f"No exported model under {base}")
    root = serving_base_path or os.fspath(base)
    text = model_config_text(
        {name: f"{root.rstrip('/')}/{name}" for name in models}, num_versions
    )
    path = base / MODEL_CONFIG_FILE
    path.write_text(text, encoding="utf-8")
    return os.fspath(path)


def batching_parameters_text(
    max_batch_size=32,
    batch_timeout_micros=1000,
    max_enqueued_batches=100,
    num_batch_threads=None,
    allowed_batch_sizes=(),
    pad_variable_length_inputs=False,
):
    """A `BatchingParameters` text proto.

    Args:
        max_batch_size: largest batch the server forms.
        batch_timeout_micros: longest wait for a batch to fill.
        max_enqueued_batches: queue length before requests are refused.
        num_batch_threads: batches run in parallel; None: CPU count.
        allowed_batch_sizes: increasing sizes batches are padded to; the last
            must equal `max_batch_size`.
        pad_variable_length_inputs: pad non-batch dimensions (with each
            tensor's first element; see the module docstring).
    """
    num_batch_threads = num_batch_threads or os.cpu_count() or 1
    for name, value in (
        ("max_batch_size", max_batch_size),
        ("batch_timeout_micros", batch_timeout_micros),
        ("max_enqueued_batches", max_enqueued_batches),
        ("num_batch_threads", num_batch_threads),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0; received {value!r}")
    sizes = [int(size) for size in allowed_batch_sizes]
    if sizes and (
        sizes != sorted(set(sizes))
        or sizes[-1] != max_batch_size
        or sizes[0] < 1
    ):
        raise ValueError(
            "allowed_batch_sizes must increase and end with max_batch_size="
            f"{max_batch_size}; received {sizes}"
        )
    pad = str(bool(pad_variable_length_inputs)).lower()
    lines = [
        f"max_batch_size {{ value: {max_batch_size} }}",
        f"batch_timeout_micros {{ value: {batch_timeout_micros} }}",
        f"max_enqueued_batches {{ value: {max_enqueued_batches} }}",
        f"num_batch_threads {{ value: {num_batch_threads} }}",
        *(f"allowed_batch_sizes: {size}" for size in sizes),
        f"pad_variable_length_inputs: {pad}",
    ]
    return "\n".join(lines) + "\n"


def write_batching_parameters(export_base, **kwargs):
    """Writes `<export_base>/batching_parameters.txt`; kwargs as
    `batching_parameters_text`. Returns the path written."""
    path = pathlib.Path(export_base).absolute() / BATCHING_PARAMETERS_FILE
    path.write_text(batching_parameters_text(**kwargs), encoding="utf-8")
    return os.fspath(path)
