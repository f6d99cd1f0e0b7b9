"""The main job: upcycle a pretrained dense ViT, then compare it with dense
training at equal extra compute, on real handwritten digits.

Steps (`run`):

1. Data: `keras_moe.data`'s `digits` (scikit-learn's 1,797 real 8x8
   digits; train 1,437 / test 360), images scaled to [0, 1].
2. Pretrain a dense ViT (patch 2: 16 patches and a class token) from
   scratch and write it as a Hugging Face checkpoint, the stand-in for a
   user's existing dense checkpoint.
3. Upcycle it with the Sparse Upcycling recipe (`keras_moe.upcycle`:
   every other MLP block becomes an MoE block of E experts copied from the
   MLP, expert-choice routing with capacity factor 2, renormalised combine
   weights) and reuse the dense optimizer state (`upcycle_optimizer`).
4. Continue training both the dense model and the upcycled one for the
   same extra compute, `extra_compute` x the pretraining FLOPs, counted
   with `keras_moe.models.flops.training_step_flops` (a training step of the MoE
   model costs more, so it takes fewer steps), scoring the test split at
   `eval_points` points along each run.
5. Score both (accuracy, NLL, ECE of the softmax with
`keras_moe.evaluation.metrics`), write a table, learning curves against
training FLOPs and a heatmap of the token positions each expert of each MoE
block takes on the test set (`routing_by_position`).

Outputs in `output_dir`: `dense_checkpoint/` (Hugging Face format),
`dense.keras` and `moe.keras` (both after the extra training),
`results.json`, `results.md`, `learning_curves.png`, `routing.png`.

Shape letters: B batch, G groups (one per image), S tokens per group, E
experts, C expert capacity, T token positions (S here).
"""

import contextlib
import dataclasses
import os
import time

import keras
import numpy as np

from keras_moe.checkpoints.writers import write_dense_checkpoint
from keras_moe.data import specs
from keras_moe.evaluation import metrics as metrics_lib
from keras_moe.experiments import plots
from keras_moe.models.flops import training_step_flops
from keras_moe.models.moe_blocks import moe_layers
from keras_moe.training.fit import compile_for_task
from keras_moe.training.fit import dense_model
from keras_moe.upcycling import summarize
from keras_moe.upcycling import upcycle
from keras_moe.upcycling import upcycle_optimizer
from keras_moe.utils.checks import check_int
from keras_moe.utils.files import makedirs
from keras_moe.utils.files import save_keras
from keras_moe.utils.files import write_json
from keras_moe.utils.files import write_text


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Sizes and budgets of one demo run.

    Attributes:
        dataset: an image classification dataset of `keras_moe.data`.
        model_dim, num_heads, hidden_dim, num_layers, patch_size: the ViT.
        batch_size: training batch size.
        learning_rate: Adam's, for pretraining and continued training.
        pretrain_epochs: epochs of dense pretraining.
        extra_compute: extra training FLOPs of each continued run, as a
            fraction of the pretraining FLOPs.
        num_experts: E of the upcycled MoE blocks.
        eval_points: test-set scorings along each continued run.
        optimizer_state: how the upcycled model continues the dense
            optimizer's state (`upcycle_optimizer`'s `state`: "rescale",
            "copy" or "reset").
    """

    dataset: str = "digits"
    model_dim: int = 64
    num_heads: int = 4
    hidden_dim: int = 128
    num_layers: int = 4
    patch_size: int = 2
    batch_size: int = 32
    learning_rate: float = 1e-3
    pretrain_epochs: int = 30
    extra_compute: float = 0.5
    num_experts: int = 8
    eval_points: int = 10
    optimizer_state: str = "rescale"

    def __post_init__(self):
        if self.optimizer_state not in ("rescale", "copy", "reset"):
            raise ValueError(
                "optimizer_state must be one of rescale, copy, reset; "
                f"received {self.optimizer_state!r}"
            )
        for name in (
            "model_dim",
            "num_heads",
            "hidden_dim",
            "num_layers",
            "patch_size",
            "batch_size",
            "pretrain_epochs",
            "num_experts",
            "eval_points",
        ):
            check_int(name, getattr(self, name))
        if self.num_layers < 2:
            raise ValueError(
                "num_layers must be >= 2: upcycling converts every other "
                f"block (1, 3, ...); received {self.num_layers}"
            )
        if self.num_experts < 2:
            raise ValueError(
                f"num_experts must be >= 2; received {self.num_experts}"
            )
        if not 0 < self.extra_compute <= 10:
            raise ValueError(
                "extra_compute must be in (0, 10] (a fraction of the "
                f"pretraining FLOPs); received {self.extra_compute!r}"
            )
        if not self.learning_rate > 0:
            raise ValueError(
                f"learning_rate must be > 0; received {self.learning_rate!r}"
            )


DEFAULT = DemoConfig()
# The same code path at a size that runs in well under a minute (CI).
SMALL = DemoConfig(
    model_dim=16,
    num_heads=2,
    hidden_dim=32,
    num_layers=2,
    batch_size=64,
    pretrain_epochs=2,
    extra_compute=0.5,
    num_experts=4,
    eval_points=2,
)


@dataclasses.dataclass
class DemoResult:
    """What `run` produced.

    Attributes:
        rows: the table, one dict per model (see `TABLE_COLUMNS`).
        table: the table as Markdown.
        files: {description: path} of every file written.
        moe_model: the trained upcycled model.
        test_images: <float32>[N, H, W, C] test images, the inputs the
            models were scored on; `test_labels` <int32>[N] their labels.
        seconds: wall time of `run`.
    """

    rows: list
    table: str
    files: dict
    moe_model: keras.Model
    test_images: np.ndarray
    test_labels: np.ndarray
    seconds: float


TABLE_COLUMNS = (
    ("model", "model", "{}"),
    ("test_accuracy", "test accuracy", "{:.4f}"),
    ("test_nll", "test NLL", "{:.4f}"),
    ("test_ece", "test ECE", "{:.4f}"),
    ("extra_tflops", "extra TFLOPs", "{:.3f}"),
    ("extra_steps", "extra steps", "{:,}"),
    ("parameters", "parameters", "{:,}"),
    ("active_parameters", "active parameters / token", "{:,}"),
)


def markdown_table(rows):
    """The rows as a Markdown table with the columns of `TABLE_COLUMNS`."""
    header = "| " + " | ".join(title for _, title, _ in TABLE_COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in TABLE_COLUMNS) + "|"
    lines = [header, rule]
    for row in rows:
        cells = [fmt.format(row[key]) for key, _, fmt in TABLE_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _compile(model, learning_rate=None, optimizer=None):
    compile_for_task(
        model,
        specs.CLASSIFICATION,
        learning_rate,
        optimizer,
        metrics=[
            "accuracy",
            # The loss of an MoE model includes its auxiliary losses; this
            # is the cross-entropy alone.
            keras.metrics.SparseCategoricalCrossentropy(
                from_logits=True, name="nll"
            ),
        ],
    )


class _Curve(keras.callbacks.Callback):
    """Records test accuracy and NLL against training FLOPs at epoch ends
    (`fit` runs with `validation_data`; an epoch is one chunk of steps)."""

    def __init__(self, start_flops, flops_per_step, steps_per_epoch, log):
        super().__init__()
        self.start_flops = start_flops
        self.flops_per_step = flops_per_step
        self.steps_per_epoch = steps_per_epoch
        self.log = log
        self.points = []  # (training FLOPs, accuracy, nll)

    def on_epoch_end(self, epoch, logs=None):
        flops = self.start_flops + (
            (epoch + 1) * self.steps_per_epoch * self.flops_per_step
        )
        accuracy, nll = float(logs["val_accuracy"]), float(logs["val_nll"])
        self.points.append((flops, accuracy, nll))
        self.log(
            f"    {flops / 1e12:7.3f} TFLOPs  train loss "
            f"{float(logs['loss']):.4f}  test accuracy {accuracy:.4f}  "
            f"test NLL {nll:.4f}"
        )


def _fit_chunks(
    model, train, test, first_step, steps, chunks, start_flops, step_flops, log
):
    """Trains about `steps` steps as `chunks` equal epochs, scoring the
    test set after each; the batches are those of the `train` stream from
    batch `first_step` on.

    Returns:
        (curve points, steps actually trained: `chunks` x round(steps /
        chunks), within half a chunk of `steps`).
    """
    per_chunk = max(round(steps / chunks), 1)
    curve = _Curve(start_flops, step_flops, per_chunk, log)
    model.fit(
        train.skip(first_step),
        epochs=chunks,
        steps_per_epoch=per_chunk,
        validation_data=test,
        callbacks=[curve],
        verbose=0,
        shuffle=False,
    )
    return curve.points, per_chunk * chunks


def test_probabilities(model, images, batch_size=256):
    """Softmax of `model`'s logits <float64>[N, K], computed eagerly."""
    logits = [
        keras.ops.convert_to_numpy(model(images[i : i + batch_size]))
        for i in range(0, len(images), batch_size)
    ]
    logits = np.concatenate(logits).astype(np.float64)
    logits -= logits.max(axis=-1, keepdims=True)
    probs = np.exp(logits)
    return probs / probs.sum(axis=-1, keepdims=True)


@contextlib.contextmanager
def _recorded_inputs(layers):
    """Records the inputs of each layer's calls.

    Yields {layer path: [inputs, ...]}; the layers are restored on exit.
    The model must be called eagerly, so that the inputs hold values.
    """
    records = {layer.path: [] for layer in layers}
    for layer in layers:
        original = layer.call

        def call(inputs, *args, _call=original, _out=records[layer.path], **kw):
            _out.append(inputs)
            return _call(inputs, *args, **kw)

        # A plain instance attribute, not a tracked Keras attribute.
        object.__setattr__(layer, "call", call)
    try:
        yield records
    finally:
        for layer in layers:
            object.__delattr__(layer, "call")


def routing_by_position(model, images, batch_size=256):
    """How often each expert takes each token position, per MoE layer.

    Runs `model` on `images` eagerly, records each MoE layer's inputs and
    routes them again with the layer's own router and eval capacity
    (`router.route`, outside any XLA function the layer may compile):
    with one group per image, expert e takes the tokens of its C slots out
    of the S token positions.

    Args:
        model: a keras_moe ViT whose MoE layers route each image as one
            group (`group_size=None`, no E^3 ensemble).
        images: <float32>[N, H, W, C].
        batch_size: images per call.

    Returns:
        {layer path: <float64>[E, S]}, entry [e, s] the fraction of the
        images in which expert e processed token position s (position 0 is
        the class token).

    Raises:
        ValueError: no MoE layer, or one that groups tokens otherwise.
    """
    layers = moe_layers(model)
    if not layers:
        raise ValueError("routing_by_position needs a model with MoE layers")
    for layer in layers:
        if layer.group_size is not None or layer.experts_per_router != (
            layer.num_experts
        ):
            raise ValueError(
                f"routing_by_position needs one routing group per image; "
                f"{layer.path} has group_size={layer.group_size} and routes "
                f"among {layer.experts_per_router} of {layer.num_experts} "
                "experts"
            )
    with _recorded_inputs(layers) as records:
        for i in range(0, len(images), batch_size):
            model(images[i : i + batch_size], training=False)
    heatmaps = {}
    for layer in layers:
        taken = []
        for inputs in records[layer.path]:
            tokens = inputs.shape[1]  # (B, S, D): one group per image
            routed = layer.router.route(
                inputs, layer.capacity(tokens, training=False), training=False
            ).instructions
            index = keras.ops.convert_to_numpy(routed.token_index)
            mask = keras.ops.convert_to_numpy(routed.dispatch_mask)
            # (G, E, C) -> (G, E, C, S) one-hot positions -> (G, E, S)
            one_hot = np.eye(tokens)[index] * mask[..., None]
            taken.append(np.minimum(one_hot.sum(axis=2), 1.0))
        heatmaps[layer.path] = np.concatenate(taken).mean(axis=0)
    return heatmaps


def _scores(model, images, labels):
    probs = test_probabilities(model, images)
    results = metrics_lib.uncertainty_metrics(labels, probs)
    return {
        "test_accuracy": 1.0 - results["error"],
        "test_nll": results["nll"],
        "test_ece": results["ece"],
    }


def run(output_dir, config=DEFAULT, data_dir=None, seed=0, log=print):
    """Runs the main job (see the module docstring) into `output_dir`.

    Args:
        output_dir: directory for every output (created; files replaced).
        config: a `DemoConfig` (`DEFAULT`, `SMALL` or your own).
        data_dir: TFDS data directory (None: `keras_moe.data`'s default).
        seed: seed of the weights and of the data order.
        log: called with each progress line.

    Returns:
        A `DemoResult`.
    """
    if not isinstance(config, DemoConfig):
        raise ValueError(
            f"config must be a DemoConfig; received {type(config).__name__}"
        )
    if os.path.isfile(output_dir):
        raise ValueError(f"output_dir {output_dir!r} is a file")
    start = time.perf_counter()

    def step(message):
        log(f"[{time.perf_counter() - start:6.1f}s] {message}")

    makedirs(output_dir)
    files = {}
    spec = specs.describe_dataset(config.dataset, data_dir)
    if spec.kind != specs.CLASSIFICATION:
        raise ValueError(
            f"the demo trains an image classifier; {config.dataset!r} is a "
            f"{spec.kind} dataset"
        )
    # One stream of shuffled batches: pretraining reads its start, both
    # continued runs read on from there, the same batches in the same order.
    train = specs.batches(
        spec, "train", config.batch_size, seed=seed, training=True
    )
    test = specs.batches(spec, "test", 256)
    test_images = np.concatenate([x.numpy() for x, _ in test])
    test_labels = np.concatenate([y.numpy() for _, y in test])
    steps_per_epoch = specs.steps_per_pass(spec, "train", config.batch_size)
    step(
        f"data: {config.dataset}, {steps_per_epoch * config.batch_size} "
        f"train images (batches of {config.batch_size}), {len(test_labels)} "
        f"test images of shape {spec.image_shape}"
    )

    # -- Dense pretraining.
    size = {
        "model_dim": config.model_dim,
        "num_heads": config.num_heads,
        "hidden_dim": config.hidden_dim,
        "num_layers": config.num_layers,
        "patch_size": config.patch_size,
    }
    dense = dense_model("vit", spec, size, seed=seed)
    _compile(dense, config.learning_rate)
    dense_step = config.batch_size * training_step_flops(dense)
    step(
        f"pretraining a dense ViT ({dense.count_params():,} parameters) for "
        f"{config.pretrain_epochs} epochs of {steps_per_epoch} steps "
        f"({dense_step / 1e9:.3f} GFLOPs per step)"
    )
    pretrain_steps = config.pretrain_epochs * steps_per_epoch
    pretrain_curve, _ = _fit_chunks(
        dense,
        train,
        test,
        0,
        pretrain_steps,
        config.pretrain_epochs,
        0,
        dense_step,
        step,
    )
    pretrain_flops = pretrain_steps * dense_step
    pretrained = _scores(dense, test_images, test_labels)
    files["dense checkpoint (Hugging Face format)"] = write_dense_checkpoint(
        dense, os.path.join(output_dir, "dense_checkpoint"), overwrite=True
    )

    # -- Upcycling.
    moe = upcycle(dense, num_experts=config.num_experts, seed=seed)
    _compile(
        moe,
        optimizer=upcycle_optimizer(
            dense.optimizer, dense, moe, state=config.optimizer_state
        ),
    )
    summary = summarize(dense, moe)
    moe_step = config.batch_size * training_step_flops(moe)
    step(
        f"upcycled: MoE blocks {summary.blocks}, E={config.num_experts}, "
        f"{summary.params_after:,} parameters, "
        f"{moe_step / 1e9:.3f} GFLOPs per step"
    )

    # -- Continued training at equal extra compute.
    budget = config.extra_compute * pretrain_flops
    dense_steps = max(round(budget / dense_step), 1)
    moe_steps = max(round(budget / moe_step), 1)
    chunks = config.eval_points
    step(
        f"continuing the dense model: {dense_steps} steps "
        f"({budget / 1e12:.3f} TFLOPs, {config.extra_compute:.0%} of "
        "pretraining)"
    )
    dense_curve, dense_steps = _fit_chunks(
        dense,
        train,
        test,
        pretrain_steps,
        dense_steps,
        chunks,
        pretrain_flops,
        dense_step,
        step,
    )
    step(f"training the upcycled model: {moe_steps} steps (same FLOPs)")
    moe_curve, moe_steps = _fit_chunks(
        moe,
        train,
        test,
        pretrain_steps,
        moe_steps,
        chunks,
        pretrain_flops,
        moe_step,
        step,
    )

    # -- Scores, table, plots, files.
    rows = [
        {
            "model": "dense, pretrained",
            **pretrained,
            "extra_tflops": 0.0,
            "extra_steps": 0,
            "parameters": summary.params_before,
            "active_parameters": summary.active_params_before,
        },
        {
            "model": "dense, continued",
            **_scores(dense, test_images, test_labels),
            "extra_tflops": dense_steps * dense_step / 1e12,
            "extra_steps": dense_steps,
            "parameters": summary.params_before,
            "active_parameters": summary.active_params_before,
        },
        {
            "model": f"upcycled MoE, E={config.num_experts}",
            **_scores(moe, test_images, test_labels),
            "extra_tflops": moe_steps * moe_step / 1e12,
            "extra_steps": moe_steps,
            "parameters": summary.params_after,
            "active_parameters": summary.active_params_after,
        },
    ]
    table = markdown_table(rows)
    branch = pretrain_curve[-1:]
    curves = {
        "dense pretraining": pretrain_curve,
        "dense, continued": branch + dense_curve,
        f"upcycled MoE (E={config.num_experts})": branch + moe_curve,
    }
    panels = {
        "test accuracy": {
            name: ([p[0] / 1e12 for p in pts], [p[1] for p in pts])
            for name, pts in curves.items()
        },
        "test NLL (nats)": {
            name: ([p[0] / 1e12 for p in pts], [p[2] for p in pts])
            for name, pts in curves.items()
        },
    }
    files["learning curves"] = plots.plot_learning_curves(
        panels,
        os.path.join(output_dir, "learning_curves.png"),
        x_label="training TFLOPs (pretraining + extra)",
        title=(
            f"ViT on {config.dataset}: upcycled vs dense at equal extra "
            "compute"
        ),
    )
    heatmaps = routing_by_position(moe, test_images)
    files["routing heatmap"] = plots.plot_routing_heatmaps(
        heatmaps,
        os.path.join(output_dir, "routing.png"),
        x_label="token position (0: class token, then patches row by row)",
        y_label="expert",
        title="Share of test images in which each expert took each token",
    )
    for path, matrix in heatmaps.items():
        covered = (matrix.sum(axis=0) > 0).mean()
        step(
            f"routing of {path}: {matrix.sum() / matrix.shape[1]:.2f} "
            f"experts per token on average; {covered:.0%} of token positions "
            "taken by some expert"
        )
    files["dense model after the extra training"] = save_keras(
        dense, os.path.join(output_dir, "dense.keras")
    )
    files["upcycled model after the extra training"] = save_keras(
        moe, os.path.join(output_dir, "moe.keras")
    )
    results = {
        "config": dataclasses.asdict(config),
        "seed": seed,
        "pretraining_tflops": pretrain_flops / 1e12,
        "rows": rows,
        "curves": {
            name: [list(point) for point in points]
            for name, points in curves.items()
        },
        "routing_by_position": {
            path: matrix.tolist() for path, matrix in heatmaps.items()
        },
    }
    files["results (JSON)"] = os.path.join(output_dir, "results.json")
    write_json(files["results (JSON)"], results)
    files["results table"] = os.path.join(output_dir, "results.md")
    write_text(files["results table"], table + "\n")
    seconds = time.perf_counter() - start
    step("done")
    return DemoResult(
        rows=rows,
        table=table,
        files=files,
        moe_model=moe,
        test_images=test_images,
        test_labels=test_labels,
        seconds=seconds,
    )
