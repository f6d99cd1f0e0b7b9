"""SavedModel export of keras_moe models, in TensorFlow Serving's layout.

    <export_base>/<model_name>/<version>/saved_model.pb
                                         variables/
                                         fingerprint.pb
                                         assets.extra/keras_moe_export.json
                                         assets.extra/tf_serving_warmup_requests

The signatures come from the adapter registered for the model's class
(`export.adapters`; ViT in `export.vit_serving`, T5 in `export.t5_serving`).
The SavedModel is written with `keras.export.ExportArchive`: it loads with
`tf.saved_model.load` or TF Serving, without Keras or keras_moe. The
function behind `serving_xla` is named in
`tf.saved_model.SaveOptions(function_aliases={"tpu_func": ...})` for TPU
inference converters.

Capacity: every `MoeLayer` is rebuilt with the export's eval capacity factor
(default None: no token is dropped at serving time; see the adapters'
docstrings for what a finite factor changes), weights copied, by
`keras_moe.models.with_eval_capacity_factor`.

Atomicity: the SavedModel is written to a hidden temporary directory beside
the version directory (`.<version>.tmp-<host>-<pid>-<random>`, a name TF
Serving never takes for a version) and renamed into place, so a server sees
either no version or a complete one. An interrupted export leaves only the
hidden directory, removed by the next export of that version on the same
host (once its process is gone). An existing version is refused unless
`overwrite=True`; overwriting renames the old version aside first
(`.<version>.old-...`), so for a moment there is no version directory (a
server keeps serving the version it has loaded).

Example:

    model = keras_moe.upcycle(ViT.from_architecture("vit_tiny"), num_experts=4)
    result = export_saved_model(model, "/tmp/models", "vit_moe", version=1)
    # result.path == "/tmp/models/vit_moe/1"
"""

import dataclasses
import json
import os
import re
import time

import keras
import tensorflow as tf

from keras_moe.models import moe_layers
from keras_moe.models import with_eval_capacity_factor
from keras_moe.utils import files
from keras_moe.utils.checks import require_tensorflow_backend
from keras_moe.utils.files import atomic_directory

from . import client
from . import signature_names as names
from . import t5_serving
from . import vit_serving
from . import vlm_serving
from .adapters import ServingOptions
from .adapters import adapter_class
from .adapters import make_adapter

# Adapters of the models keras_moe defines; importing them registers them.
BUILTIN_ADAPTERS = (
    vit_serving.VitAdapter,
    t5_serving.T5Adapter,
    vlm_serving.VlmAdapter,
)

NO_DROP = None
KEEP = "keep"
METADATA_FILE = "keras_moe_export.json"
WARMUP_FILE = "tf_serving_warmup_requests"
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

# Called with the temporary directory after it is complete and before it is
# renamed into place. Tests set it to interrupt an export at that point.
before_commit_hook = None


@dataclasses.dataclass(frozen=True)
class ExportResult:
    """What `export_saved_model` wrote.

    Attributes:
        path: the version directory.
        model_name, version: its parts of the layout.
        signatures: {signature name: description}.
        model: the Keras model that was exported (rebuilt when its capacity
            factor changed), the in-process reference of the SavedModel.
        adapter: the `ServingAdapter` that built the signatures.
    """

    path: str
    model_name: str
    version: int
    signatures: dict
    model: keras.Model
    adapter: object


def load_model(path):
    """Loads a keras_moe model from a `.keras` file (no compile); the path
    may have a scheme (`gs://...`)."""
    path = os.fspath(path)
    if not path.endswith(".keras"):
        raise ValueError(f"model must be a .keras file; received {path!r}")
    if not files.exists(path):
        raise FileNotFoundError(f"No model file at {path!r}")
    try:
        return keras.saving.load_model(path, compile=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"Cannot load {path!r} as a Keras model: {e}") from e


def capacity_doc(model):
    """One sentence on what the MoE capacity means for served outputs."""
    factors = sorted(
        {str(layer.eval_capacity_factor) for layer in moe_layers(model)}
    )
    if not factors:
        return "No MoE blocks: capacity does not apply."
    if factors == ["None"]:
        return (
            "MoE blocks drop no token (eval capacity factor None): an "
            "example's outputs do not depend on the rest of the batch or on "
            "its padding; every expert slot is computed, so no-drop blocks "
            "cost up to E times a dense MLP."
        )
    return (
        f"MoE eval capacity factors {factors}: a token past an expert's "
        "capacity skips that expert (only the residual carries it); outputs "
        "can depend on padding and, when routing groups span examples, on "
        "the rest of the batch."
    )


def _check_layout_parts(model_name, version):
    if not isinstance(model_name, str) or not _MODEL_NAME.match(model_name):
        raise ValueError(
            "model_name must be letters, digits, '_', '.' or '-' (not "
            f"starting with '.', '_' or '-'); received {model_name!r}"
        )
    if isinstance(version, bool) or not isinstance(version, int):
        raise ValueError(f"version must be an int; received {version!r}")
    if version < 0:
        raise ValueError(f"version must be >= 0; received {version}")


class VersionExistsError(FileExistsError, ValueError):
    """The version directory exists and overwrite was not asked for (both a
    FileExistsError and a ValueError: a bad argument)."""


def _existing_version_error(version_dir):
    return VersionExistsError(
        f"Version directory {version_dir} exists; pass overwrite=True "
        "to replace it, or export another version"
    )


def _write_archive(adapter, directory):
    signatures = adapter.signatures()
    archive = keras.export.ExportArchive()
    archive.track(adapter.model)
    for resource in adapter.resources():
        archive.track(resource)
    for name, function in signatures.items():
        archive.add_endpoint(name, function)
    options = tf.saved_model.SaveOptions(
        function_aliases={names.TPU_FUNCTION_ALIAS: adapter.xla_function()}
    )
    archive.write_out(os.fspath(directory), options=options, verbose=False)


def _write_extras(adapter, directory, metadata, warmup):
    # `directory` is always local: atomic_directory stages remote exports.
    extra = os.path.join(directory, "assets.extra")
    os.mkdir(extra)
    with open(os.path.join(extra, METADATA_FILE), "w", encoding="utf-8") as f:
        f.write(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
    if warmup:
        # TF Serving runs these requests when it loads the version, so the
        # first real request does not pay for graph optimisation.
        inputs = adapter.example_inputs(names.SERVING_DEFAULT, batch_size=1)
        request = client.predict_request(
            metadata["model_name"], names.SERVING_DEFAULT, inputs
        )
        client.write_warmup_requests(
            os.path.join(extra, WARMUP_FILE), [request]
        )


def _signature_specs(function):
    """{"inputs": {name: [dtype, shape]}, "outputs": {...}} of a function."""
    concrete = function.get_concrete_function()

    def spec(tensor_spec):
        shape = [-1 if d is None else d for d in tensor_spec.shape.as_list()]
        return [tensor_spec.dtype.name, shape]

    inputs = {
        spec_.name: spec(spec_)
        for spec_ in concrete.structured_input_signature[0]
    }
    outputs = {
        key: spec(value) for key, value in concrete.structured_outputs.items()
    }
    return {"inputs": inputs, "outputs": outputs}


def export_saved_model(
    model,
    export_base,
    model_name,
    version=None,
    options=None,
    eval_capacity_factor=NO_DROP,
    overwrite=False,
    warmup=True,
):
    """Exports `model` to `<export_base>/<model_name>/<version>`.

    Args:
        model: a keras_moe model whose class has a registered adapter.
        export_base: the directory TF Serving's `--model_config_file` (or
            `--model_base_path`'s parent) points at.
        model_name: the served model's name.
        version: int >= 0; None uses the current Unix time.
        options: `ServingOptions` (default options when None).
        eval_capacity_factor: the serving capacity factor of every MoE
            block: None (no token dropped), a float > 0, or `KEEP` for the
            model's own factors.
        overwrite: replace an existing version directory.
        warmup: write a TF Serving warmup request for `serving_default`.

    Returns:
        An `ExportResult`.

    Raises:
        ValueError: for an unknown model type or invalid arguments.
        FileExistsError: when the version exists and `overwrite` is False.
    """
    require_tensorflow_backend("SavedModel export")
    adapter_class(model)  # fails early for an unknown model type
    version = int(time.time()) if version is None else version
    _check_layout_parts(model_name, version)
    options = options or ServingOptions()
    version_dir = files.join(
        files.absolute(export_base), model_name, str(version)
    )
    if files.exists(version_dir) and not overwrite:
        raise _existing_version_error(version_dir)
    if eval_capacity_factor != KEEP:
        model = with_eval_capacity_factor(model, eval_capacity_factor)
    adapter = make_adapter(model, options)
    capacity = capacity_doc(model)
    docs = {
        name: f"{doc} {capacity}"
        for name, doc in adapter.signature_docs().items()
    }
    metadata = {
        "model_name": model_name,
        "version": version,
        "model_class": type(model).__name__,
        "keras_version": keras.__version__,
        "tensorflow_version": tf.__version__,
        "eval_capacity_factors": sorted(
            {str(layer.eval_capacity_factor) for layer in moe_layers(model)}
        ),
        "capacity": capacity,
        "options": options.describe(),
        "tpu_function_alias": names.TPU_FUNCTION_ALIAS,
        "signatures": {
            name: {"doc": docs.get(name, ""), **_signature_specs(function)}
            for name, function in adapter.signatures().items()
        },
    }
    # The hidden directory, its clean-up and the rename: see the module doc.
    with atomic_directory(version_dir, overwrite=overwrite) as temp:
        _write_archive(adapter, temp)
        _write_extras(adapter, temp, metadata, warmup)
        if before_commit_hook is not None:
            before_commit_hook(temp)
    return ExportResult(
        path=os.fspath(version_dir),
        model_name=model_name,
        version=version,
        signatures={
            name: spec["doc"] for name, spec in metadata["signatures"].items()
        },
        model=model,
        adapter=adapter,
    )


def read_metadata(version_dir):
    """The `keras_moe_export.json` of an exported version, as a dict."""
    path = files.join(version_dir, "assets.extra", METADATA_FILE)
    return json.loads(files.read_text(path))
