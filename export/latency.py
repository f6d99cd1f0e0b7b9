"""Latency of an exported SavedModel against the in-process Keras model.

All sides do the same work on the same inputs (the adapter's
`benchmark_case`): for an image classifier, a batch of float32 images
through the model (the signature adds softmax and top-k); for T5, greedy
generation of `max_length - 1` tokens (`T5.generate`, itself a
`tf.function`, against the `serving_default` signature). Sides:

    keras               the Keras call as a Python program makes it (an
                        eager model call; `T5.generate`)
    keras_tf_function   the same call inside a `tf.function` (graph mode,
                        as `predict` runs it)
    saved_model         the loaded SavedModel's signature

Each side is called `warmup` times untimed (tracing, graph optimisation),
then the sides take turns for `repeats` rounds; the median and minimum wall
times are reported in milliseconds.

The SavedModel is loaded with `tf.saved_model.load` in the calling process,
as TF Serving loads it (the Keras objects of the process are not used by
it).
"""

import statistics
import time

import numpy as np
import tensorflow as tf


def _interleaved_times_ms(fns, repeats, warmup):
    """{name: [ms per call]}, the callables taking turns in each round, so
    that load from other processes affects all sides alike."""
    for fn in fns.values():
        for _ in range(warmup):
            _block(fn())
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            _block(fn())
            times[name].append((time.perf_counter() - start) * 1000.0)
    return times


def _block(outputs):
    """Materialises every output, so asynchronous work is timed too."""
    for value in tf.nest.flatten(outputs):
        np.asarray(value)


def measure_latency(
    adapter, saved_model_dir, batch_size=32, repeats=10, warmup=2
):
    """Times the Keras model and the loaded SavedModel on one workload.

    Args:
        adapter: the `ServingAdapter` of the export (its model is the
            in-process reference); `ExportResult.adapter`.
        saved_model_dir: the exported version directory.
        batch_size: examples per call.
        repeats, warmup: timed and untimed calls per side.

    Returns:
        A JSON-friendly dict: the signature, batch size, and for each side
        the median and minimum milliseconds per call.
    """
    keras_call, signature_name, inputs = adapter.benchmark_case(batch_size)
    loaded = tf.saved_model.load(str(saved_model_dir))
    signature = loaded.signatures[signature_name]
    tensors = {name: tf.constant(value) for name, value in inputs.items()}
    result = {
        "model_class": type(adapter.model).__name__,
        "signature": signature_name,
        "batch_size": batch_size,
        "inputs": {name: list(value.shape) for name, value in inputs.items()},
        "repeats": repeats,
    }
    keras_function = tf.function(keras_call)
    all_times = _interleaved_times_ms(
        {
            "keras": lambda: keras_call(**tensors),
            "keras_tf_function": lambda: keras_function(**tensors),
            "saved_model": lambda: signature(**tensors),
        },
        repeats,
        warmup,
    )
    for side, times in all_times.items():
        result[side] = {
            "median_ms": round(statistics.median(times), 3),
            "min_ms": round(min(times), 3),
        }
    result["saved_model_over_keras"] = round(
        result["saved_model"]["median_ms"] / result["keras"]["median_ms"], 3
    )
    return result
