r"""The main job: dense ViT -> upcycled MoE -> equal-compute comparison ->
TF Serving export -> one request answered by the exported model.

Usage:

  python -m apps.demo --output_dir=/tmp/keras_moe_demo
  python -m apps.demo --small --output_dir=/tmp/demo_small   # CI size

Pretrains a dense ViT on real handwritten digits, upcycles it
(`keras_moe.upcycle`, the paper's recipe), trains the dense and the
upcycled model further for the same extra FLOPs, prints a table (accuracy,
NLL, extra compute, parameters, active parameters) and writes learning
curves and a routing heatmap (`keras_moe.experiments.demo`). Then exports the
MoE model for TF Serving (`export.saved_model`,
`<output_dir>/serving/vit_moe/1`), sends one test image as a `PredictRequest`
to it in a fresh process where Keras and keras_moe cannot be imported
(`apps/serving_probe.py`), checks
the answer against the Keras model, and lists the files it wrote.
"""

import dataclasses
import os
import subprocess
import sys
import tempfile
import time

from absl import flags

from . import flags_util

_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir",
    "/tmp/keras_moe_demo",
    "Directory for the checkpoint, models, plots, table and SavedModel.",
)
_SMALL = flags.DEFINE_boolean(
    "small", False, "Run the same steps at a tiny size (about a minute)."
)
_NUM_EXPERTS = flags.DEFINE_integer(
    "num_experts",
    None,
    "Experts per MoE block (default: 8; 4 with --small).",
    lower_bound=2,
)
_PRETRAIN_EPOCHS = flags.DEFINE_integer(
    "pretrain_epochs",
    None,
    "Epochs of dense pretraining (default: 30; 2 with --small).",
    lower_bound=1,
)
_EXTRA_COMPUTE = flags.DEFINE_float(
    "extra_compute",
    None,
    "Extra training FLOPs of each continued run, as a fraction of the "
    "pretraining FLOPs (default: 0.5).",
    lower_bound=0.01,
    upper_bound=10.0,
)
_OPTIMIZER_STATE = flags.DEFINE_enum(
    "optimizer_state",
    None,
    ["rescale", "copy", "reset"],
    "How the upcycled model continues the dense optimizer's state "
    "(default: rescale).",
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the weights and data order.")
_TFDS_DATA_DIR = flags.DEFINE_string(
    "tfds_data_dir",
    None,
    "TFDS data directory of keras_moe.data (default: $KERAS_MOE_DATA_DIR or "
    "~/.cache/keras_moe/tensorflow_datasets).",
)
flags_util.register_output_dir("output_dir")

MODEL_NAME = "vit_moe"
PROBE = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "serving_probe.py"
)
# The served and the in-process probabilities of one image must agree.
TOLERANCE = 1e-4


def export_and_ask(model, images, labels, output_dir, log=print):
    """Exports `model`, answers a request for `images[0]` in a fresh
    process and compares the answer with the Keras model's.

    Args:
        model: the keras_moe ViT to export.
        images: <float32>[N, H, W, C] in [0, 1] (uint8 pixels / 255).
        labels: <int>[N].
        output_dir: the export goes to `<output_dir>/serving`.
        log: called with each progress line.

    Returns:
        A dict: the version directory, the served and the Keras answers
        and their largest probability difference.
    """
    import numpy as np
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    try:  # Installed: keras_moe.apps beside keras_moe.export.
        from ..export import client
        from ..export.adapters import ServingOptions
        from ..export.saved_model import export_saved_model
    except ImportError:  # A checkout: top-level apps/ and export/.
        from export import client
        from export.adapters import ServingOptions
        from export.saved_model import export_saved_model

    exported = export_saved_model(
        model,
        os.path.join(output_dir, "serving"),
        MODEL_NAME,
        version=1,
        options=ServingOptions(image_dtype="uint8", top_k=3),
        overwrite=True,
    )
    log(f"exported {MODEL_NAME} for TF Serving: {exported.path}")
    pixels = np.round(images[:1] * 255.0).astype(np.uint8)  # (1, H, W, C)
    request = client.images_request(MODEL_NAME, pixels)
    with tempfile.TemporaryDirectory() as work:
        request_path = os.path.join(work, "request.pb")
        response_path = os.path.join(work, "response.pb")
        with open(request_path, "wb") as f:
            f.write(request.SerializeToString())
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
        start = time.perf_counter()
        process = subprocess.run(
            [sys.executable, PROBE, exported.path, request_path, response_path],
            cwd=work,  # nothing of the repository is importable there
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if process.returncode != 0:
            raise ValueError(
                "the exported model did not answer the request: "
                + (process.stderr.strip().splitlines() or ["no output"])[-1]
            )
        with open(response_path, "rb") as f:
            response = predict_pb2.PredictResponse.FromString(f.read())
        seconds = time.perf_counter() - start
    served = {
        name: tf.make_ndarray(proto) for name, proto in response.outputs.items()
    }
    # The in-process reference: the exported Keras model (no-drop capacity)
    # on the same pixels, scaled as the signature scales them.
    logits = np.asarray(exported.model(pixels.astype("float32") / 255.0))
    logits = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    keras_probs = np.exp(logits) / np.exp(logits).sum(axis=-1, keepdims=True)
    difference = float(np.abs(served["probabilities"] - keras_probs).max())
    answer = {
        "saved_model": exported.path,
        "label": int(labels[0]),
        "served_class": int(served["top_k_class_ids"][0, 0]),
        "served_probability": float(served["top_k_probabilities"][0, 0]),
        "keras_class": int(keras_probs[0].argmax()),
        "keras_probability": float(keras_probs[0].max()),
        "max_probability_difference": difference,
        "seconds": seconds,
    }
    log(
        f"request: test image 0 (label {answer['label']}) -> served class "
        f"{answer['served_class']} (p={answer['served_probability']:.4f}) "
        f"in a fresh process without Keras ({seconds:.1f} s); Keras model: "
        f"class {answer['keras_class']} "
        f"(p={answer['keras_probability']:.4f}); max |p_served - p_keras| = "
        f"{difference:.2e}"
    )
    if answer["served_class"] != answer["keras_class"] or not (
        difference <= TOLERANCE
    ):
        raise ValueError(
            f"the served answer differs from the Keras model's: {answer}"
        )
    return answer


def main(argv):
    del argv
    # TensorFlow loads after the flags parse.
    from keras_moe.experiments import demo

    base = demo.SMALL if _SMALL.value else demo.DEFAULT
    overrides = {
        key: flag.value
        for key, flag in (
            ("num_experts", _NUM_EXPERTS),
            ("pretrain_epochs", _PRETRAIN_EPOCHS),
            ("extra_compute", _EXTRA_COMPUTE),
            ("optimizer_state", _OPTIMIZER_STATE),
        )
        if flag.value is not None
    }
    config = dataclasses.replace(base, **overrides)
    output_dir = os.path.abspath(os.path.expanduser(_OUTPUT_DIR.value))

    def log(line):
        print(line, flush=True)

    log(f"keras_moe demo{' (--small)' if _SMALL.value else ''}: {config}")
    start = time.perf_counter()
    result = demo.run(
        output_dir,
        config=config,
        data_dir=_TFDS_DATA_DIR.value,
        seed=_SEED.value,
        log=log,
    )
    log("")
    log(result.table)
    log("")
    answer = export_and_ask(
        result.moe_model,
        result.test_images,
        result.test_labels,
        output_dir,
        log=log,
    )
    files = dict(result.files)
    files["TF Serving SavedModel"] = answer["saved_model"]
    log("")
    log(f"finished in {time.perf_counter() - start:.0f} s. Files:")
    for description, path in files.items():
        log(f"  {description}: {path}")


def cli():
    """The `keras-moe-demo` console script."""
    flags_util.run(main)


if __name__ == "__main__":
    cli()
