"""Wall time and peak memory of loading a T5 checkpoint and upcycling it.

Four measurements, each in a fresh Python process of its own so that its
peak memory is its own (`run_upcycle_benchmark`):

* `build_t5`: `T5.from_architecture(preset)`, a randomly initialised model. The
  reader builds the same model before it assigns the checkpoint, so this
  separates the reader's own cost from the model's.
* `read_t5_mtf`: `read_t5_mtf_checkpoint(path, config=preset)` of a
  random-weight checkpoint of that preset written beforehand
  (`write_mtf_checkpoint`) in the original Mesh TensorFlow format: the
  released checkpoints' variable names and layouts, factored Adafactor slots
  and `global_step` included (the reader skips them). The preset supplies
  what MTF does not record (`relative_attention_max_distance`: 16 for the
  tiny presets, the reader's default 128 for the released sizes) and must
  agree with the rest. The record compares it with `build_t5`.
* `upcycle_t5`: `keras_moe.upcycle(model, num_experts)` with the paper's
  defaults (every other MLP block of the encoder and the decoder) of a
  `T5.from_architecture(preset)` built beforehand, compared in the same process
  with a NumPy baseline that makes the same expert weights from the same
  dense MLP arrays, `np.broadcast_to(w, (E,) + w.shape).copy()` per block
  weight (the arrays are read out of the model before the timer starts;
  upcycle's own reading is part of its time). Its `moe_build_*` fields come
  from a fourth process: `T5.from_config` of the upcycled model's config (as
  a `.keras` file holds it), i.e. the randomly initialised MoE model that
  `upcycle` builds before it overwrites every weight.

Time: `time.perf_counter` around the one call, in seconds. One run per
process; on a busy machine repeat the whole benchmark.

Memory: Linux's per-process peak resident set (`VmHWM` of
`/proc/self/status`), reset by writing "5" to `/proc/self/clear_refs` just
before the call; `*_peak_rss_growth_mib` is that peak minus the resident set
at the reset, in MiB (2**20 bytes). It counts every page the process touches:
TensorFlow tensors, NumPy arrays, Python objects, allocator slack. Before
the reset each process pays the one-time costs a first call would otherwise
be charged with (imports, TensorFlow's eager runtime, building, reading or
upcycling a `t5_tiny`), and `baseline_rss_mib` reports where it then
stands. The processes run with glibc's mmap threshold fixed at 64 KiB (as
`benchmarks.moe_layer` does), so that freed arrays go back to the OS instead
of a heap cache that would hide later peaks; this also makes every large
allocation fault in fresh pages, which both sides of a comparison pay.
TensorFlow's CPU allocator (oneDNN's, on by default) keeps the memory of
freed tensors for reuse and never returns it, so a measurement is only
clean in a process that has not yet freed big tensors. In `upcycle_t5` the
dense model is built first, and what its build leaves resident beyond its
weights (`dense_model_rss_growth_mib` over `dense_model_bytes`) is room the
upcycle can reuse without raising its peak.

Sizes: `*_bytes` fields are exact byte counts (float32 weights: 4 bytes a
parameter); `checkpoint_bytes` is the size on disk of the checkpoint's index
and data files. Ratios named `*_over_*` divide a peak growth by a size, both
in bytes.

Example (tiny sizes, a few seconds per process):

>>> records = run_upcycle_benchmark("t5_tiny", 4)  # doctest: +SKIP
>>> [r["name"] for r in records]  # doctest: +SKIP
['build_t5', 'read_t5_mtf', 'upcycle_t5']
"""

import contextlib
import gc
import glob
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import keras
import numpy as np
from absl import logging

from benchmarks.moe_layer import _proc_status_bytes
from keras_moe import upcycling
from keras_moe.checkpoints.t5 import read_t5_mtf_checkpoint
from keras_moe.checkpoints.writers import write_mtf_checkpoint
from keras_moe.models.t5 import ARCHITECTURES
from keras_moe.models.t5 import T5
from keras_moe.models.t5 import t5_config
from keras_moe.utils.checks import check_int

# Built, read and upcycled before each measurement to pay one-time costs.
WARMUP_PRESET = "t5_tiny"
MIB = 2**20


def checkpoint_bytes(prefix):
    """Bytes on disk of a TF checkpoint's index and data files."""
    files = [prefix + ".index"] + glob.glob(glob.escape(prefix) + ".data-*")
    return sum(os.path.getsize(f) for f in files)


# ---------------------------------------------------------------------------
# The benchmark: one fresh process per measurement.


def run_upcycle_benchmark(preset="t5_small", num_experts=32, workdir=None):
    """Measures building, reading and upcycling a T5 of `preset`.

    Args:
        preset: a `keras_moe.models.t5.ARCHITECTURES` name.
        num_experts: E of `upcycle`.
        workdir: where the checkpoints are written; None for a temporary
            directory removed afterwards.

    Returns:
        A list of three JSON-ready dicts, `build_t5`, `read_t5_mtf` and
        `upcycle_t5` (see the module docstring).

    Raises:
        ValueError: an unknown preset, num_experts < 1, or no Linux
            `/proc/self/clear_refs` to measure peak memory with.
        RuntimeError: a measurement process failed (its stderr included).
    """
    check_arguments(preset, num_experts)
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = stack.enter_context(
                tempfile.TemporaryDirectory(prefix="keras_moe_upcycle_")
            )
        paths = {}
        for name in dict.fromkeys([WARMUP_PRESET, preset]):
            paths[name] = _write_preset_checkpoint(name, workdir)
        common = {"preset": preset, "warmup_checkpoint": paths[WARMUP_PRESET]}
        build = _run_worker({**common, "measurement": "build_t5"})
        read = _run_worker(
            {**common, "measurement": "read_t5_mtf", "path": paths[preset]}
        )
        upcycle = _run_worker(
            {**common, "measurement": "upcycle_t5", "num_experts": num_experts}
        )
        moe_build = _run_worker(
            {
                **common,
                "measurement": "build_moe_t5",
                "config": upcycle.pop("moe_config"),
            }
        )
    upcycle["moe_build_seconds"] = moe_build["seconds"]
    upcycle["moe_build_peak_rss_growth_mib"] = moe_build["peak_rss_growth_mib"]
    upcycle["moe_build_baseline_rss_mib"] = moe_build["baseline_rss_mib"]
    size = read["checkpoint_bytes"]
    build["build_peak_over_checkpoint"] = (
        build["peak_rss_growth_mib"] * MIB / size
    )
    read["read_peak_over_checkpoint"] = read["peak_rss_growth_mib"] * MIB / size
    # What the reader adds to building the model it fills.
    read["reader_extra_seconds"] = read["seconds"] - build["seconds"]
    read["reader_extra_peak_rss_growth_mib"] = (
        read["peak_rss_growth_mib"] - build["peak_rss_growth_mib"]
    )
    return [build, read, upcycle]


def check_arguments(preset, num_experts):
    """Raises ValueError unless `run_upcycle_benchmark` can run with these."""
    if preset not in ARCHITECTURES:
        raise ValueError(
            f"preset must be one of {sorted(ARCHITECTURES)}; received "
            f"{preset!r}"
        )
    check_int("num_experts", num_experts)
    if not os.path.exists("/proc/self/clear_refs"):
        raise ValueError(
            "peak memory is read from Linux's /proc/self/status after a "
            "reset through /proc/self/clear_refs, which this system lacks"
        )


def _write_preset_checkpoint(preset, workdir):
    keras.utils.set_random_seed(0)
    model = T5.from_architecture(preset)
    prefix = write_mtf_checkpoint(model, os.path.join(workdir, preset))
    logging.info(
        "wrote a random %s Mesh TensorFlow checkpoint, %d bytes: %s",
        preset,
        checkpoint_bytes(prefix),
        prefix,
    )
    return prefix


def _run_worker(spec):
    root = pathlib.Path(__file__).resolve().parents[1]
    env = dict(os.environ)
    env.update(
        CUDA_VISIBLE_DEVICES="",
        TF_CPP_MIN_LOG_LEVEL="2",
        KERAS_BACKEND="tensorflow",
        # Fixed, so that glibc does not raise it as big blocks are freed and
        # keep freed arrays in its heap, out of a later peak's sight.
        MALLOC_MMAP_THRESHOLD_="65536",
        PYTHONPATH=os.pathsep.join(
            p for p in (str(root), env.get("PYTHONPATH")) if p
        ),
    )
    logging.info("measuring %s in a fresh process", spec["measurement"])
    code = "import benchmarks.upcycle as b; b._worker()"
    result = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps(spec),
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"the {spec['measurement']} process failed with exit code "
            f"{result.returncode}:\n{result.stderr[-3000:]}"
        )
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------
# Inside a measurement process.


def _worker():
    spec = json.loads(sys.stdin.read())
    keras.utils.set_random_seed(0)
    record = _MEASUREMENTS[spec["measurement"]](spec)
    print(json.dumps({"name": spec["measurement"], **record}))


def _measure(fn, *args, **kwargs):
    """(fn's result, wall seconds, peak RSS growth MiB, RSS at reset MiB)."""
    gc.collect()
    # Linux's per-process peak (VmHWM), reset to the current RSS. Not
    # getrusage's ru_maxrss: that one survives exec, so a process started by
    # a big parent inherits the parent's peak.
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")
    before = _proc_status_bytes("VmRSS")
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    seconds = time.perf_counter() - start
    peak = _proc_status_bytes("VmHWM") - before
    return result, seconds, peak / MIB, before / MIB


def _weight_bytes(variables):
    return sum(
        int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in variables
    )


def _measure_build(spec):
    read_t5_mtf_checkpoint(spec["warmup_checkpoint"], config=WARMUP_PRESET)
    model, seconds, peak, baseline = _measure(
        T5.from_architecture, spec["preset"]
    )
    variables = model.canonical_variables().values()
    return {
        "preset": spec["preset"],
        "params": sum(int(np.prod(v.shape)) for v in variables),
        "weights_bytes": _weight_bytes(variables),
        "seconds": seconds,
        "baseline_rss_mib": baseline,
        "peak_rss_growth_mib": peak,
    }


def _measure_read(spec):
    read_t5_mtf_checkpoint(spec["warmup_checkpoint"], config=WARMUP_PRESET)
    path = spec["path"]
    model, seconds, peak, baseline = _measure(
        read_t5_mtf_checkpoint, path, config=spec["preset"]
    )
    expected = t5_config(spec["preset"])
    config = model.get_config()
    differ = {
        k: (config.get(k), v) for k, v in expected.items() if config.get(k) != v
    }
    if differ:
        raise ValueError(
            f"the checkpoint read as another model than {spec['preset']}: "
            f"(read, preset) {differ}"
        )
    variables = model.canonical_variables().values()
    return {
        "preset": spec["preset"],
        "params": sum(int(np.prod(v.shape)) for v in variables),
        "weights_bytes": _weight_bytes(variables),
        "checkpoint_bytes": checkpoint_bytes(path),
        "seconds": seconds,
        "baseline_rss_mib": baseline,
        "peak_rss_growth_mib": peak,
    }


def _upcycled_mlp_arrays(model):
    """{name: array} of the dense MLP weights `upcycle`'s defaults convert."""
    _, stacks = upcycling.architecture(model)
    config = model.get_config()
    variables = model.canonical_variables()
    arrays = {}
    for stack in stacks:
        for index in upcycling.select_blocks(
            "every_other", config[stack.layers_key]
        ):
            prefix = f"{stack.name}/block_{index}/mlp/"
            for name, variable in variables.items():
                if name.startswith(prefix):
                    arrays[name] = variable.numpy()
    return arrays


def _numpy_tile(arrays, num_experts):
    return [
        np.broadcast_to(a, (num_experts,) + a.shape).copy()
        for a in arrays.values()
    ]


def _measure_upcycle(spec):
    num_experts = spec["num_experts"]
    upcycling.upcycle(T5.from_architecture(WARMUP_PRESET), num_experts=2)
    _numpy_tile(_upcycled_mlp_arrays(T5.from_architecture(WARMUP_PRESET)), 2)
    model, _, _, rss_before_model = _measure(
        T5.from_architecture, spec["preset"]
    )
    dense_bytes = _weight_bytes(model.canonical_variables().values())
    arrays = _upcycled_mlp_arrays(model)

    tiled, numpy_seconds, numpy_peak, baseline = _measure(
        _numpy_tile, arrays, num_experts
    )
    tiled_bytes = sum(t.nbytes for t in tiled)
    del tiled, arrays

    moe, seconds, peak, _ = _measure(
        upcycling.upcycle, model, num_experts=num_experts
    )
    variables = moe.canonical_variables()
    experts = [v for n, v in variables.items() if "/mlp/experts/" in n]
    expert_bytes = _weight_bytes(experts)
    if expert_bytes != tiled_bytes:
        raise ValueError(
            f"upcycle made {expert_bytes} bytes of expert weights, the NumPy "
            f"baseline {tiled_bytes}: they did not convert the same blocks"
        )
    moe_bytes = _weight_bytes(variables.values())
    return {
        "preset": spec["preset"],
        "num_experts": num_experts,
        "moe_blocks": moe.upcycled_blocks,
        "dense_model_bytes": dense_bytes,
        "expert_bytes": expert_bytes,
        "upcycled_model_bytes": moe_bytes,
        # Building the dense model may leave more than its weights resident
        # (initialiser temporaries in TensorFlow's CPU allocator, which keeps
        # freed memory): room the upcycle can reuse without growing the peak.
        "dense_model_rss_growth_mib": baseline - rss_before_model,
        "baseline_rss_mib": baseline,
        "upcycle_seconds": seconds,
        "upcycle_peak_rss_growth_mib": peak,
        "numpy_tile_seconds": numpy_seconds,
        "numpy_tile_peak_rss_growth_mib": numpy_peak,
        "upcycle_over_numpy_seconds": seconds / numpy_seconds,
        "upcycle_peak_over_expert_bytes": peak * MIB / expert_bytes,
        "upcycle_peak_over_upcycled_model_bytes": peak * MIB / moe_bytes,
        "numpy_tile_peak_over_expert_bytes": numpy_peak * MIB / expert_bytes,
        # Through JSON, as a `.keras` file holds it: `get_config()` returns
        # its `*_moe_blocks` as Keras `TrackedDict`s that reference the
        # model, which `T5.__init__` deep-copies, pickling the whole model.
        "moe_config": json.loads(json.dumps(moe.get_config())),
    }


def _measure_moe_build(spec):
    upcycling.upcycle(T5.from_architecture(WARMUP_PRESET), num_experts=2)
    _, seconds, peak, baseline = _measure(T5.from_config, spec["config"])
    return {
        "preset": spec["preset"],
        "seconds": seconds,
        "baseline_rss_mib": baseline,
        "peak_rss_growth_mib": peak,
    }


_MEASUREMENTS = {
    "build_t5": _measure_build,
    "read_t5_mtf": _measure_read,
    "upcycle_t5": _measure_upcycle,
    "build_moe_t5": _measure_moe_build,
}
