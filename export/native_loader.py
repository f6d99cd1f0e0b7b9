"""Runs an exported SavedModel through TensorFlow's C API, with no Python.

TensorFlow Serving loads a SavedModel with TensorFlow's C++ loader; the C API
function `TF_LoadSessionFromSavedModel` is that loader. This module compiles
`export/native/run_saved_model.c` against the TensorFlow wheel's own headers
(`tensorflow/include`) and libraries (`libtensorflow_cc.so.2`,
`libtensorflow_framework.so.2`), then runs a signature in a separate process
that has no Python in it: an export that relies on a Python-only op, a
resource captured from Python or an op library the server would not have
fails here as it would in the server.

The signature's input and output tensor names come from the SavedModel's own
SignatureDefs (`signature_tensors`), never from the caller.

Example:

    outputs = run_signature(
        "/tmp/models/vit_moe/1", "serving_default", {"images": images}
    )
    outputs["probabilities"]  # a NumPy array, as the server computes it
"""

import dataclasses
import glob
import hashlib
import os
import shutil
import struct
import subprocess
import tempfile

import numpy as np

SOURCE = os.path.join(os.path.dirname(__file__), "native", "run_saved_model.c")
_MAGIC = b"KMT1"
# TF_DataType enum values (tensorflow/c/tf_datatype.h) <-> NumPy dtypes.
_DTYPES = {
    1: np.dtype("float32"),
    2: np.dtype("float64"),
    3: np.dtype("int32"),
    4: np.dtype("uint8"),
    5: np.dtype("int16"),
    6: np.dtype("int8"),
    9: np.dtype("int64"),
    10: np.dtype("bool"),
    19: np.dtype("float16"),
}
_STRING = 7
_ENUMS = {dtype: enum for enum, dtype in _DTYPES.items()}


class NativeLoaderError(RuntimeError):
    """The C program could not be built, or the SavedModel failed in it."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One signature argument: its graph tensor, dtype enum and shape."""

    name: str  # graph tensor, e.g. "serving_default_images:0"
    dtype: int  # TF_DataType enum value
    shape: tuple  # dims, -1 where unknown


def tensorflow_paths():
    """(include directory, library directory) of the installed TensorFlow
    wheel, found without importing TensorFlow."""
    import importlib.util

    spec = importlib.util.find_spec("tensorflow")
    if spec is None or not spec.submodule_search_locations:
        raise NativeLoaderError(
            "TensorFlow is not installed: pip install tensorflow (the wheel "
            "ships the C API headers and libraries this loader links to)"
        )
    root = list(spec.submodule_search_locations)[0]
    include = os.path.join(root, "include")
    if not os.path.isfile(os.path.join(include, "tensorflow", "c", "c_api.h")):
        raise NativeLoaderError(
            f"no TensorFlow C API headers under {include}; reinstall the "
            "tensorflow wheel (pip install --force-reinstall tensorflow)"
        )
    for library in ("libtensorflow_cc.so.2", "libtensorflow_framework.so.2"):
        if not os.path.isfile(os.path.join(root, library)):
            raise NativeLoaderError(
                f"no {library} in {root}; this loader needs the Linux "
                "tensorflow wheel, which ships it"
            )
    return include, root


def build_runner(cache_dir=None):
    """Compiles the C loader once and returns the executable's path.

    The executable is cached under `cache_dir` (default
    `~/.cache/keras_moe/native`) by a hash of the source and the TensorFlow
    installation, so it is rebuilt when either changes.

    Raises:
        NativeLoaderError: no C compiler (it says what to install), or the
            compilation failed (with the compiler's message).
    """
    wanted = os.environ.get("CC")
    if wanted:
        compiler = shutil.which(wanted)
    else:
        compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise NativeLoaderError(
            f"no C compiler found ({'CC=' + wanted if wanted else 'gcc, cc'})"
            ": install gcc (apt-get install gcc) or set CC to a C compiler"
        )
    include, library_dir = tensorflow_paths()
    with open(SOURCE, "rb") as f:
        source = f.read()
    key = hashlib.sha256(source + library_dir.encode()).hexdigest()[:16]
    cache_dir = cache_dir or os.path.join(
        os.path.expanduser("~"), ".cache", "keras_moe", "native"
    )
    os.makedirs(cache_dir, exist_ok=True)
    executable = os.path.join(cache_dir, f"run_saved_model-{key}")
    if os.path.isfile(executable):
        return executable
    handle, temp = tempfile.mkstemp(dir=cache_dir, prefix=".build-")
    os.close(handle)
    command = [
        compiler,
        "-O1",
        "-o",
        temp,
        SOURCE,
        f"-I{include}",
        f"-L{library_dir}",
        "-l:libtensorflow_cc.so.2",
        "-l:libtensorflow_framework.so.2",
        f"-Wl,-rpath,{library_dir}",
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        if os.path.exists(temp):
            os.remove(temp)
        raise NativeLoaderError(
            f"compiling {SOURCE} failed ({' '.join(command)}):\n"
            f"{done.stderr[-4000:]}"
        )
    os.replace(temp, executable)  # atomic: concurrent builds agree
    return executable


def signature_tensors(export_dir, signature_name, tag="serve"):
    """The graph tensors of one signature, read from `saved_model.pb`.

    Returns:
        (inputs, outputs): dicts argument name -> `TensorInfo`.

    Raises:
        ValueError: no MetaGraph with `tag`, or no such signature (the
            message lists the ones there are).
    """
    from tensorflow.core.protobuf import saved_model_pb2

    saved_model = saved_model_pb2.SavedModel()
    path = os.path.join(os.fspath(export_dir), "saved_model.pb")
    with open(path, "rb") as f:
        saved_model.ParseFromString(f.read())
    graphs = [
        meta
        for meta in saved_model.meta_graphs
        if tag in meta.meta_info_def.tags
    ]
    if not graphs:
        raise ValueError(f"{export_dir} has no MetaGraph tagged {tag!r}")
    signatures = graphs[0].signature_def
    if signature_name not in signatures:
        raise ValueError(
            f"{export_dir} has no signature {signature_name!r}; it has "
            f"{sorted(signatures)}"
        )
    signature = signatures[signature_name]

    def infos(mapping):
        return {
            key: TensorInfo(
                info.name,
                int(info.dtype),
                tuple(d.size for d in info.tensor_shape.dim),
            )
            for key, info in mapping.items()
        }

    return infos(signature.inputs), infos(signature.outputs)


def tf_text_libraries():
    """The op libraries of tensorflow-text (SentencePiece and the other
    text kernels), as a server built with those ops has them."""
    import importlib.util

    spec = importlib.util.find_spec("tensorflow_text")
    if spec is None or not spec.submodule_search_locations:
        raise NativeLoaderError(
            "tensorflow-text is not installed: pip install tensorflow-text"
        )
    root = list(spec.submodule_search_locations)[0]
    return sorted(glob.glob(os.path.join(root, "python", "ops", "*.so")))


def write_tensor(path, value, dtype_enum):
    """Writes `value` in the C program's tensor file format."""
    if dtype_enum == _STRING:
        array = np.asarray(value, dtype=object)
    else:
        array = np.array(value, dtype=_DTYPES[dtype_enum], order="C")
    with open(path, "wb") as f:
        f.write(_MAGIC + struct.pack("<ii", dtype_enum, array.ndim))
        f.write(struct.pack(f"<{array.ndim}q", *array.shape))
        if dtype_enum == _STRING:
            for item in array.reshape(-1):
                data = item.encode() if isinstance(item, str) else bytes(item)
                f.write(struct.pack("<Q", len(data)) + data)
        else:
            f.write(array.astype(array.dtype.newbyteorder("<")).tobytes())


def read_tensor(path):
    """Reads a tensor file the C program wrote; strings come back as an
    object array of bytes."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != _MAGIC:
        raise NativeLoaderError(f"{path} is not a tensor file")
    dtype_enum, rank = struct.unpack_from("<ii", data, 4)
    shape = struct.unpack_from(f"<{rank}q", data, 12)
    offset = 12 + 8 * rank
    if dtype_enum == _STRING:
        items = []
        for _ in range(int(np.prod(shape, dtype=np.int64))):
            (size,) = struct.unpack_from("<Q", data, offset)
            offset += 8
            items.append(data[offset : offset + size])
            offset += size
        array = np.empty(len(items), dtype=object)
        array[:] = items
        return array.reshape(shape)
    if dtype_enum not in _DTYPES:
        raise NativeLoaderError(f"{path} holds an unsupported dtype")
    dtype = _DTYPES[dtype_enum].newbyteorder("<")
    return np.frombuffer(data, dtype, offset=offset).reshape(shape).copy()


def run_signature(
    export_dir,
    signature_name,
    inputs,
    libraries=(),
    tag="serve",
    timeout=600,
):
    """Runs a signature of a SavedModel in a process without Python.

    Args:
        export_dir: the SavedModel directory (a version directory).
        signature_name: e.g. "serving_default" or "serving_xla".
        inputs: dict argument name -> array (bytes or str for string
            arguments); every argument of the signature must be given.
        libraries: op libraries to load first (see `tf_text_libraries`).
        tag: the MetaGraph tag.
        timeout: seconds before the process is killed.

    Returns:
        dict output name -> NumPy array.

    Raises:
        ValueError: missing or unknown arguments.
        NativeLoaderError: the loader failed; the message holds its stderr.
    """
    input_infos, output_infos = signature_tensors(
        export_dir, signature_name, tag
    )
    if set(inputs) != set(input_infos):
        raise ValueError(
            f"signature {signature_name!r} takes {sorted(input_infos)}; "
            f"received {sorted(inputs)}"
        )
    runner = build_runner()
    with tempfile.TemporaryDirectory(prefix="keras_moe_native-") as work:
        command = [runner, os.fspath(export_dir), "--tag", tag]
        for library in libraries:
            command += ["--library", library]
        for index, (key, info) in enumerate(sorted(input_infos.items())):
            path = os.path.join(work, f"in{index}")
            write_tensor(path, inputs[key], info.dtype)
            command += ["--input", info.name, path]
        keys = sorted(output_infos)
        for index, key in enumerate(keys):
            command += [
                "--output",
                output_infos[key].name,
                os.path.join(work, f"out{index}"),
            ]
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
        # Nothing of Python's may leak into the loader's process.
        for name in ("PYTHONPATH", "PYTHONHOME", "LD_PRELOAD"):
            env.pop(name, None)
        done = subprocess.run(
            command, capture_output=True, text=True, env=env, timeout=timeout
        )
        if done.returncode != 0:
            raise NativeLoaderError(
                f"the C API loader failed on {export_dir} "
                f"({signature_name}): {done.stderr.strip()[-4000:]}"
            )
        return {
            key: read_tensor(os.path.join(work, f"out{index}"))
            for index, key in enumerate(keys)
        }
