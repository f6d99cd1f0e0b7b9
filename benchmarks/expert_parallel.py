"""Step time and peak memory of expert-parallel training layouts.

Each configuration runs in a fresh process of its own with 8 virtual CPU
devices (TensorFlow splits its CPU only before it starts, so
`run_expert_parallel_benchmark` runs this module as a worker:
`python -m benchmarks.expert_parallel --worker --config=...`), one after
the other. Every configuration trains the same model on the same batch
with `ExpertParallelTrainer`:

    data_parallel            batch:8,expert:1 (plain data parallelism:
                             the baseline of every ratio)
    gshard_{b}x{n}           layout="gshard": the batch split over all
                             b*n devices, all-to-alls around the experts
    replicated_{b}x{n}       layout="replicated": the batch split over
                             `batch` only, replicated over `expert`

for the meshes 1x8 and 2x4 (and 8x1, which is `data_parallel`).

Why not one process: alternating between trainers on different meshes in
one process made DTensor recompile the step each time (a 13 s step where
the same step run back to back took 40 ms), and TensorFlow's allocator
statistics (`tf.config.experimental.get_memory_info`) read 0 for every
virtual CPU device while DTensor steps ran, so they cannot give a
per-device peak here.

Time: the step is traced and run `warmup` times, then `repeats` times
back to back; the record holds the median step in milliseconds (wall
time of `train_step`, which returns the loss as a Python float, i.e.
waits for the step).

Memory: Linux's peak resident set of the process (`VmHWM`), reset by
writing "5" to `/proc/self/clear_refs` after the warm-up;
`step_peak_rss_growth_mib` is that peak during the timed steps minus the
resident set at the reset (MiB): the memory the steps need beyond what
stays resident (weights, optimizer state, compiled functions), summed
over the 8 virtual devices, which share the process's memory.
`per_device_mib` divides it by 8: an average, not a per-device peak.
TensorFlow's CPU allocator keeps freed memory for reuse, so the warm-up
steps have already raised the resident set; the growth is then what the
timed steps needed beyond the warm-up's own high-water mark, and can be
0. The figures are for comparing layouts on this machine, not a model of
an accelerator's memory.

The model: inputs <[B, T, D]> -> Dense(D) -> self-attention (4 heads) ->
MoeLayer(E experts, H hidden, top-1, capacity factor 1.25, einsum
dispatch; each sequence a group) -> Dense(D) -> mean over T -> Dense(10);
Adam; float32. (With index dispatch and token choice, DTensor failed to
expand the step even on batch:8,expert:1: "SPMD expansion resulted in op
output inconsistent with the provided layout" at a TopKV2.)
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

DEFAULT_SHAPES = {
    "batch": 64,
    # With 64 tokens (as many as examples) DTensor failed to expand the
    # data-parallel step at a TopKV2 (expected local shape <512,64>, got
    # <64,64>); 8, 16 and 32 ran.
    "tokens": 32,
    "model_dim": 128,
    "hidden_dim": 512,
    "num_experts": 8,
}
QUICK_SHAPES = {
    "batch": 16,
    "tokens": 8,
    "model_dim": 16,
    "hidden_dim": 32,
    "num_experts": 8,
}
NUM_DEVICES = 8
BASELINE = "data_parallel"
MESHES = ((1, 8), (2, 4))
MIB = 2**20


def config_names():
    """The configurations in the order they run."""
    names = [BASELINE]
    for b, n in MESHES:
        names += [f"gshard_{b}x{n}", f"replicated_{b}x{n}"]
    return names


def check_arguments(shapes, repeats, warmup):
    """ValueError for shapes or counts the benchmark cannot run."""
    for name, value in shapes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1; received {value!r}")
    if shapes["batch"] % NUM_DEVICES:
        raise ValueError(
            f"batch={shapes['batch']} must be a multiple of the "
            f"{NUM_DEVICES} devices (the GShard layout splits it over all)"
        )
    if shapes["num_experts"] % NUM_DEVICES:
        raise ValueError(
            f"num_experts={shapes['num_experts']} must be a multiple of "
            f"{NUM_DEVICES} (the 1x8 mesh puts E/8 experts on each device)"
        )
    if shapes["model_dim"] % 4:
        raise ValueError(
            f"model_dim={shapes['model_dim']} must be a multiple of the 4 "
            "attention heads"
        )
    for name, value in (("repeats", repeats), ("warmup", warmup)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1; received {value!r}")


def run_expert_parallel_benchmark(shapes=None, repeats=5, warmup=2):
    """Runs each configuration's worker process; returns (records, ratios).

    Args:
        shapes: dict with the keys of `DEFAULT_SHAPES` (None: those).
        repeats: timed rounds.
        warmup: untimed steps of each configuration first.

    Returns:
        A list of one dict per configuration and a list of one dict per
        configuration other than the baseline, with its time and memory
        as ratios to `data_parallel`.
    """
    shapes = dict(DEFAULT_SHAPES if shapes is None else shapes)
    check_arguments(shapes, repeats, warmup)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env["PYTHONPATH"] = os.pathsep.join(
        [root] + [p for p in [env.get("PYTHONPATH")] if p]
    )
    records = []
    for name in config_names():
        command = [
            sys.executable,
            "-m",
            "benchmarks.expert_parallel",
            "--worker",
            f"--config={name}",
            f"--shapes={json.dumps(shapes)}",
            f"--repeats={repeats}",
            f"--warmup={warmup}",
        ]
        result = subprocess.run(
            command, capture_output=True, text=True, env=env, cwd=root
        )
        if result.returncode:
            raise RuntimeError(
                f"the expert-parallel benchmark worker of {name} failed:\n"
                + result.stderr[-6000:]
            )
        records.append(json.loads(result.stdout.strip().splitlines()[-1]))
        print(f"{name}: {records[-1]['median_ms']:.1f} ms", file=sys.stderr)
    return records, ratios(records)


def ratios(records):
    """Time and peak-memory ratios of each configuration to the baseline."""
    by_name = {r["config"]: r for r in records}
    base = by_name[BASELINE]
    lines = []
    for record in records:
        if record["config"] == BASELINE:
            continue
        line = {
            "ratio": f"{record['config']}/{BASELINE}",
            "time": record["median_ms"] / base["median_ms"],
        }
        growth = record.get("step_peak_rss_growth_mib")
        base_growth = base.get("step_peak_rss_growth_mib")
        if growth is not None and base_growth:
            line["step_peak_rss_growth"] = growth / base_growth
        lines.append(line)
    return lines


# ---------------------------------------------------------------------------
# The worker (in its own process, with the virtual devices).


def _make_model(keras, shapes):
    from keras_moe.layers.moe import MoeLayer

    keras.utils.set_random_seed(0)
    tokens, dim = shapes["tokens"], shapes["model_dim"]
    inputs = keras.Input((tokens, dim))
    hidden = keras.layers.Dense(dim, name="embed")(inputs)
    attended = keras.layers.MultiHeadAttention(4, dim // 4, name="attention")(
        hidden, hidden
    )
    hidden = keras.layers.Add()([hidden, attended])
    moe = MoeLayer(
        shapes["num_experts"],
        shapes["hidden_dim"],
        dispatcher="einsum",
        name="moe",
    )(hidden)
    hidden = keras.layers.Add()([hidden, moe])
    hidden = keras.layers.Dense(dim, activation="relu", name="mlp")(hidden)
    pooled = keras.layers.GlobalAveragePooling1D()(hidden)
    outputs = keras.layers.Dense(10, name="head")(pooled)
    return keras.Model(inputs, outputs, name="ep_benchmark")


def _rss_mib(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024 / MIB
    raise RuntimeError(f"/proc/self/status has no {field}")


def _worker(config, shapes, repeats, warmup):
    import numpy as np
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * NUM_DEVICES
    )
    import keras

    from keras_moe.distribution import mesh as mesh_lib
    from keras_moe.distribution.expert_parallel import ExpertParallelTrainer

    meshes = {BASELINE: ((NUM_DEVICES, 1), "gshard")}
    for b, n in MESHES:
        meshes[f"gshard_{b}x{n}"] = ((b, n), "gshard")
        meshes[f"replicated_{b}x{n}"] = ((b, n), "replicated")
    if config not in meshes:
        raise ValueError(f"config must be one of {list(meshes)}: {config!r}")
    (b, n), layout = meshes[config]
    rng = np.random.default_rng(0)
    x = rng.normal(
        size=(shapes["batch"], shapes["tokens"], shapes["model_dim"])
    ).astype("float32")
    y = rng.integers(0, 10, size=(shapes["batch"],)).astype("int32")
    start = time.perf_counter()
    trainer = ExpertParallelTrainer(
        _make_model(keras, shapes),
        mesh_lib.make_mesh(b, n),
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        layout=layout,
    )
    for _ in range(warmup):
        trainer.train_step(x, y)
    trace_and_warmup_s = time.perf_counter() - start
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    resident = _rss_mib("VmRSS")
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        trainer.train_step(x, y)
        times.append(1000 * (time.perf_counter() - start))
    growth = max(_rss_mib("VmHWM") - resident, 0.0)
    return {
        "config": config,
        "mesh": f"batch:{b},expert:{n}",
        "layout": layout,
        "median_ms": statistics.median(times),
        "step_ms": times,
        "step_peak_rss_growth_mib": growth,
        "per_device_mib": growth / NUM_DEVICES,
        "resident_mib": resident,
        "trace_and_warmup_s": trace_and_warmup_s,
        "repeats": repeats,
        "warmup": warmup,
        **shapes,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--config", default=BASELINE)
    parser.add_argument("--shapes", default=json.dumps(DEFAULT_SHAPES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    shapes = json.loads(args.shapes)
    check_arguments(shapes, args.repeats, args.warmup)
    if not args.worker:
        records, lines = run_expert_parallel_benchmark(
            shapes, args.repeats, args.warmup
        )
        for line in records + lines:
            print(json.dumps(line))
        return
    print(json.dumps(_worker(args.config, shapes, args.repeats, args.warmup)))


if __name__ == "__main__":
    main()
