"""Sparse upcycling of a ViT at small scale, at equal extra compute.

Reproduces the vision claims of "Sparse Upcycling: Training
Mixture-of-Experts from Dense Checkpoints" (Komatsuzaki et al., 2023) on
composed digits (two real 8x8 handwritten digits side by side, label
10 * left + right, 100 classes): a dense `keras_moe.models.vit.ViT` is
pre-trained, then continued densely, sparsely upcycled, tiled deeper, or
replaced by an MoE trained from scratch, each for the same extra FLOPs
(see `upcycling_common` for the protocol).

Training pairs are composed afresh for every batch from the 1,437 images of
the `digits` train split, as `composed_digits` composes its train split
(about two million distinct pairs, so no composed image repeats in a run):
like the paper's upstream data, the training set is not cycled through
until it is memorised, and extra compute buys new examples rather than
more epochs. The held-out set is `composed_digits`' test split, composed
only of `digits` test images.

Shape letters: B batch, H x W image (8 x 16), C channels (1), K classes
(100), T tokens (8 patches of 4 x 4; mean pooling, no class token, so
expert choice with E=8 and capacity factor 2 gives every expert exactly
C = 2 slots per image).

Metrics on the 2,000 held-out images: accuracy, negative log-likelihood
and expected calibration error (`keras_moe.evaluation.metrics`). Expert-choice
routing uses one group per image, so a prediction never depends on the other
images of a batch.

Example (a smoke run of about a minute):

    from keras_moe.experiments import upcycle_vit
    upcycle_vit.run("/tmp/upcycle_vit", seeds=(0,), small=True)
"""

import time

import keras
import numpy as np
import tensorflow as tf

from keras_moe import data as data_lib
from keras_moe.evaluation import metrics as metrics_lib
from keras_moe.experiments import common
from keras_moe.experiments import upcycling_common
from keras_moe.models import flops
from keras_moe.models.vit import ViT

NAME = "upcycle_vit"
DATASET = "composed_digits"
SUPPORTED_OPTIONS = upcycling_common.SUPPORTED_OPTIONS
METRICS = {
    "accuracy": "held-out accuracy",
    "nll": "held-out NLL (nats)",
    "ece": "held-out ECE",
}
_STREAMS = {"pretrain": 0, "continue": 1, "scratch": 2}

_MODEL = dict(
    image_size=(8, 16),
    patch_size=4,
    num_channels=1,
    num_classes=100,
    pooling="gap",
)
CONFIGS = {
    "default": dict(
        model=dict(
            _MODEL, model_dim=32, num_heads=4, hidden_dim=128, num_layers=4
        ),
        batch_size=64,
        pretrain_steps=2000,
        learning_rate=2e-3,
        warmup_steps=100,
        eval_examples=None,
        # Whole-step XLA ran these steps 1.4x (dense) to 2x (MoE) faster
        # here, for about 15 s of compilation per architecture.
        jit_compile=True,
    ),
    "small": dict(
        model=dict(
            _MODEL, model_dim=16, num_heads=2, hidden_dim=32, num_layers=2
        ),
        batch_size=16,
        pretrain_steps=20,
        learning_rate=2e-3,
        warmup_steps=5,
        eval_examples=200,
        jit_compile=False,
    ),
}
# Expert choice over 8 tokens with E=8, capacity factor 2: C = 2, below
# MoeLayer's default floor of 4 slots.
MOE_KWARGS = {"min_expert_capacity": 1}


def _arrays(name, split, limit=None):
    """(images <float32>[N, H, W, C] in [0, 1], labels <int32>[N]) of a
    split."""
    dataset = data_lib.classification_dataset(name, split, 1 << 16)
    images, labels = next(iter(dataset))
    images, labels = images.numpy(), labels.numpy()
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return images, labels


def _batches(digits, batch_size, stream, seed):
    """Endless batches of freshly composed pairs of `digits` images,
    drawn uniformly; the draws are fixed by (seed, stream).

    Args:
        digits: (images <float32>[N, 8, 8, 1], labels <int32>[N]).
        batch_size: B.
        stream: a key of `_STREAMS`.
        seed: the run's seed.

    Yields:
        (images <float32>[B, 8, 16, 1], labels <int32>[B]), label
        10 * left + right.
    """
    images, labels = digits
    rng = np.random.default_rng([seed, _STREAMS[stream]])
    while True:
        left, right = rng.integers(0, len(labels), size=(2, batch_size))
        # (B, 8, 8, 1) twice -> (B, 8, 16, 1)
        pairs = np.concatenate([images[left], images[right]], axis=2)
        yield pairs, (10 * labels[left] + labels[right]).astype(np.int32)


_CROSS_ENTROPY = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _loss(model, images, labels):
    return _CROSS_ENTROPY(labels, model(images, training=True))


def _evaluator(images, labels):
    """`fn(trainer, seed, budget, arm) -> metrics` on the held-out
    images."""
    images = tf.constant(images)

    def evaluate(trainer, seed, budget, arm):
        del seed, budget, arm  # The same images for every run.
        logits = trainer.forward(images).numpy().astype(np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(axis=1, keepdims=True)
        values = metrics_lib.uncertainty_metrics(labels, probs)
        return {
            "accuracy": 1.0 - values["error"],
            "nll": values["nll"],
            "ece": values["ece"],
        }

    return evaluate


def _stack_layers(config):
    return {"encoder": config["model"]["num_layers"]}


def validate_options(options):
    """Raises a ValueError naming a bad option (value or name); the
    launcher calls it before any work."""
    upcycling_common.parse_options(
        NAME, options, _stack_layers(CONFIGS["default"])
    )


def run(output_dir, seeds=(0, 1, 2), small=False, options=None):
    """Runs the experiment and writes results.csv, results.md and
    upcycle_vit.png into `output_dir`.

    Args:
        output_dir: created if needed.
        seeds: one dense pre-training (and one run of every arm) per seed.
        small: smoke-test size (tiny model, tens of steps).
        options: ablation options (see `upcycling_common.parse_options`).

    Returns:
        {"rows": result rows, "summary": mean/std rows, "files": paths}.
    """
    if not isinstance(small, bool):
        raise ValueError(f"small must be a bool; received {small!r}")
    config = CONFIGS["small" if small else "default"]
    seeds = common.check_seeds(seeds)
    settings = upcycling_common.parse_options(
        NAME, options, _stack_layers(config)
    )
    output_dir = common.prepare_output_dir(output_dir)
    start = time.perf_counter()
    print(f"[{NAME}] {settings.describe()}", flush=True)
    digits = _arrays("digits", "train")
    test_images, test_labels = _arrays(DATASET, "test", config["eval_examples"])
    batch_size = config["batch_size"]

    def step_flops(model):
        return batch_size * flops.training_step_flops(model)

    task = upcycling_common.Task(
        name=NAME,
        build_dense=lambda: ViT(**config["model"]),
        loss_fn=_loss,
        batches=lambda stream, seed: _batches(digits, batch_size, stream, seed),
        step_flops=step_flops,
        evaluate=_evaluator(test_images, test_labels),
        pretrain_steps=config["pretrain_steps"],
        learning_rate=config["learning_rate"],
        warmup_steps=config["warmup_steps"],
        moe_kwargs=MOE_KWARGS,
        jit_compile=config["jit_compile"],
    )
    cache = {}
    rows = common.for_each_seed(
        seeds,
        lambda seed: upcycling_common.run_seed(task, settings, seed, cache),
        label=f"[{NAME}] ",
    )
    model = config["model"]
    header = (
        f"Dense ViT (D={model['model_dim']}, H={model['hidden_dim']}, "
        f"{model['num_layers']} blocks, {model['num_heads']} heads, "
        f"{model['patch_size']}x{model['patch_size']} patches, mean "
        f"pooling) pre-trained for {config['pretrain_steps']} steps of "
        f"{batch_size} pairs of digits train images composed afresh each "
        f"step ({upcycling_common.describe_optimizer(task)}); extra "
        f"budgets as fractions of those FLOPs. MoE recipe: "
        f"{settings.describe()}. Tiled dense: {cache['extra_layers']} "
        f"extra block(s). Held-out: {len(test_labels)} {DATASET} test "
        f"images.\n"
    )
    files, summary = upcycling_common.write_outputs(
        output_dir,
        NAME,
        rows,
        METRICS,
        header,
        time.perf_counter() - start,
    )
    print(f"[{NAME}] wrote {', '.join(files)}", flush=True)
    return {"rows": rows, "summary": summary, "files": files}
