"""Sparse upcycling of a ViT at small scale, at equal extra compute, on
data that never repeats.

Reproduces the vision claims of "Sparse Upcycling: Training
Mixture-of-Experts from Dense Checkpoints" (Komatsuzaki et al., 2023) in
the paper's regime: the data is an unbounded stream
(`keras_moe.data.glyphs`: the 62 characters 0-9, a-z, A-Z rendered from
matplotlib's fonts with random font, stroke weight, rotation, scale,
shear, position, contrast and noise; no image is ever seen twice), so
extra compute buys new examples and the dense model is limited by its
capacity, not by its data. The dense `keras_moe.models.vit.ViT` is
pre-trained until its learning curve flattens, checked by a convergence
gate, then trained further for each extra budget in a 2x2 design,
{dense, upcycled} x {learning-rate schedule continued, re-warmed} (the
optimizer state is kept in all four), beside an MoE of the upcycled
architecture trained from scratch; every evaluation is of a cooled-down
branch (see `upcycling_common.run_seed_converged`).

Shape letters: B batch, H x W image (16 x 16), C channels (1), K classes
(62), T tokens (16 patches of 4 x 4; mean pooling, no class token, so
expert choice with E=8 and capacity factor 2 gives every expert exactly
C = 4 slots per image), D model dim.

Metrics: held-out accuracy, negative log-likelihood and expected
calibration error on a fixed held-out stream (its own key: disjoint from
every training stream, same distribution), and a 10-shot linear probe:
a ridge regression on the frozen pooled features of 10 images of each of
10 symbol classes (`glyphs.SYMBOLS`, never seen in training), scored on
other images of them, averaged over `PROBE_DRAWS` draws of the shots.
Expert-choice routing uses one group per image, so a prediction never
depends on the other images of a batch.

Example (a smoke run of about a minute):

    from keras_moe.experiments import upcycle_vit
    upcycle_vit.run("/tmp/upcycle_vit", seeds=(0,), small=True)
"""

import time

import keras
import numpy as np
import tensorflow as tf

from keras_moe.data import glyphs
from keras_moe.evaluation import metrics as metrics_lib
from keras_moe.experiments import common
from keras_moe.experiments import upcycling_common as uc
from keras_moe.models import flops
from keras_moe.models.vit import ViT

NAME = "upcycle_vit"
SUPPORTED_OPTIONS = uc.SUPPORTED_OPTIONS
METRICS = {
    "nll": "held-out NLL (nats)",
    "accuracy": "held-out accuracy",
    "probe_accuracy": "10-shot linear probe accuracy (unseen symbols)",
    "ece": "held-out ECE",
}
# Lower is better for these metrics (the others: higher).
LOWER_IS_BETTER = ("nll", "ece")
# Glyph stream numbers of each training phase (cooldown i: 10 + i).
_STREAMS = {"pretrain": 0, "continue": 1, "scratch": 2}
_COOLDOWN_STREAM = 10
# Held-out streams (split "heldout", seed 0): the test set and the probe's
# shot pool and test set.
_HELDOUT_STREAM, _PROBE_SHOT_STREAM, _PROBE_TEST_STREAM = 0, 1, 2
PROBE_SHOTS = 10
PROBE_DRAWS = 5
PROBE_L2 = 1.0
_PROBE_SEED = 7

_MODEL = dict(
    image_size=(16, 16),
    patch_size=4,
    num_channels=1,
    num_classes=len(glyphs.ALPHANUMERIC),
    pooling="gap",
)
CONFIGS = {
    "default": dict(
        # D=16 and lr 6e-3 were chosen on calibration runs (seed 0): of
        # D=16 and D=32, 3e-3 and 6e-3, this pair's curve flattened
        # soonest within the wall time of the run (docs/RESULTS.md).
        model=dict(
            _MODEL, model_dim=16, num_heads=4, hidden_dim=64, num_layers=4
        ),
        batch_size=64,
        pretrain_steps=6000,
        learning_rate=6e-3,
        warmup_steps=200,
        cooldown_fraction=0.03,
        eval_per_class=50,
        probe_pool_per_class=40,
        probe_test_per_class=100,
        reset_arm=False,
        # Whole-step XLA: faster steps for some seconds of compilation
        # per architecture.
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
        cooldown_fraction=0.1,
        eval_per_class=3,
        probe_pool_per_class=PROBE_SHOTS,
        probe_test_per_class=5,
        reset_arm=True,
        jit_compile=False,
    ),
}
# Expert choice over 16 tokens with E=8, capacity factor 2: C = 4, the
# floor of MoeLayer; the floor of 1 keeps smaller settings exact too.
MOE_KWARGS = {"min_expert_capacity": 1}


def stream_number(stream):
    """The glyph stream number of a protocol stream name ("pretrain",
    "continue", "scratch" or "cooldown/<i>")."""
    if stream in _STREAMS:
        return _STREAMS[stream]
    return _COOLDOWN_STREAM + uc.cooldown_index(stream)


def _batches(batch_size, image_size, stream, seed):
    """Endless training batches of the run's `seed` and `stream`."""
    return glyphs.GlyphStream(
        image_size=image_size, seed=seed, stream=stream_number(stream)
    ).batches(batch_size)


_CROSS_ENTROPY = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _loss(model, images, labels):
    return _CROSS_ENTROPY(labels, model(images, training=True))


def softmax(logits):
    """Row-wise softmax in float64."""
    logits = np.asarray(logits, np.float64)
    logits = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    return probs / probs.sum(axis=1, keepdims=True)


def ridge_probe_accuracy(train_x, train_y, test_x, test_y, num_classes, l2):
    """Accuracy of a closed-form ridge-regression classifier.

    Features are standardised with the training set's mean and std; the
    weights (a bias column included, not penalised) minimise
    `|X W - Y|^2 + l2 |W|^2` for one-hot targets Y; a test example gets
    the class of its largest score.

    Args:
        train_x: <float>[N, D] features; train_y: <int>[N] labels.
        test_x: <float>[M, D]; test_y: <int>[M].
        num_classes: K.
        l2: the ridge penalty (>= 0).

    Returns:
        The test accuracy, a float.
    """
    if not l2 >= 0:
        raise ValueError(f"l2 must be >= 0; received {l2!r}")
    train_x = np.asarray(train_x, np.float64)
    test_x = np.asarray(test_x, np.float64)
    mean = train_x.mean(axis=0)
    std = train_x.std(axis=0) + 1e-6
    x = np.c_[(train_x - mean) / std, np.ones(len(train_x))]
    targets = np.eye(num_classes)[np.asarray(train_y)]
    penalty = l2 * np.eye(x.shape[1])
    penalty[-1, -1] = 0.0  # the bias
    weights = np.linalg.solve(x.T @ x + penalty, x.T @ targets)
    scores = np.c_[(test_x - mean) / std, np.ones(len(test_x))] @ weights
    return float(np.mean(scores.argmax(axis=1) == np.asarray(test_y)))


def probe_shots(labels, shots, draws, seed=_PROBE_SEED):
    """Indices of `shots` examples per class, for each of `draws` draws.

    Returns:
        A list of `draws` sorted index arrays of `shots * K` entries.
    """
    labels = np.asarray(labels)
    out = []
    for draw in range(draws):
        rng = np.random.default_rng([seed, draw])
        picks = []
        for label in np.unique(labels):
            where = np.flatnonzero(labels == label)
            if len(where) < shots:
                raise ValueError(
                    f"class {label} has {len(where)} examples, fewer than "
                    f"shots={shots}"
                )
            picks.append(rng.choice(where, shots, replace=False))
        out.append(np.sort(np.concatenate(picks)))
    return out


def _evaluator(heldout, probe_pool, probe_test):
    """`fn(trainer, seed, budget, arm) -> metrics` on the held-out stream
    and the few-shot probe."""
    images, labels = heldout
    images = tf.constant(images)
    pool_images, pool_labels = tf.constant(probe_pool[0]), probe_pool[1]
    test_images, test_labels = tf.constant(probe_test[0]), probe_test[1]
    draws = probe_shots(pool_labels, PROBE_SHOTS, PROBE_DRAWS)
    num_classes = len(glyphs.SYMBOLS)

    def evaluate(trainer, seed, budget, arm):
        del seed, budget, arm  # The same images for every run.
        probs = softmax(trainer.forward(images).numpy())
        values = metrics_lib.uncertainty_metrics(labels, probs)
        pool_x = trainer.features(pool_images).numpy()
        test_x = trainer.features(test_images).numpy()
        probe = np.mean(
            [
                ridge_probe_accuracy(
                    pool_x[d],
                    pool_labels[d],
                    test_x,
                    test_labels,
                    num_classes,
                    PROBE_L2,
                )
                for d in draws
            ]
        )
        return {
            "nll": values["nll"],
            "accuracy": 1.0 - values["error"],
            "probe_accuracy": float(probe),
            "ece": values["ece"],
        }

    return evaluate


def _stack_layers(config):
    return {"encoder": config["model"]["num_layers"]}


def validate_options(options):
    """Raises a ValueError naming a bad option (value or name); the
    launcher calls it before any work."""
    uc.parse_options(NAME, options, _stack_layers(CONFIGS["default"]))


def _heldout(config):
    size = config["model"]["image_size"][0]

    def examples(classes, stream, per_class):
        return glyphs.GlyphStream(
            classes=classes, image_size=size, split="heldout", stream=stream
        ).examples(per_class * len(classes))

    return (
        examples(
            glyphs.ALPHANUMERIC, _HELDOUT_STREAM, config["eval_per_class"]
        ),
        examples(
            glyphs.SYMBOLS, _PROBE_SHOT_STREAM, config["probe_pool_per_class"]
        ),
        examples(
            glyphs.SYMBOLS, _PROBE_TEST_STREAM, config["probe_test_per_class"]
        ),
    )


def run(output_dir, seeds=(0, 1, 2), small=False, options=None):
    """Runs the experiment and writes results.csv, pretrain_curve.csv,
    results.md and upcycle_vit.png into `output_dir`.

    Args:
        output_dir: created if needed.
        seeds: one dense pre-training (and one run of every arm) per seed.
        small: smoke-test size (tiny model, tens of steps).
        options: ablation options (see `upcycling_common.parse_options`).

    Returns:
        {"rows": result rows, "curve": pre-training curve rows,
        "summary": mean/std rows, "gates": per-seed convergence gates,
        "files": paths}.
    """
    if not isinstance(small, bool):
        raise ValueError(f"small must be a bool; received {small!r}")
    config = CONFIGS["small" if small else "default"]
    seeds = common.check_seeds(seeds)
    settings = uc.parse_options(NAME, options, _stack_layers(config))
    output_dir = common.prepare_output_dir(output_dir)
    start = time.perf_counter()
    print(f"[{NAME}] {settings.describe()}", flush=True)
    heldout, probe_pool, probe_test = _heldout(config)
    batch_size = config["batch_size"]
    image_size = config["model"]["image_size"][0]

    def step_flops(model):
        return batch_size * flops.training_step_flops(model)

    task = uc.ConvergedTask(
        name=NAME,
        build_dense=lambda: ViT(**config["model"]),
        loss_fn=_loss,
        batches=lambda stream, seed: _batches(
            batch_size, image_size, stream, seed
        ),
        step_flops=step_flops,
        evaluate=_evaluator(heldout, probe_pool, probe_test),
        pretrain_steps=config["pretrain_steps"],
        learning_rate=config["learning_rate"],
        warmup_steps=config["warmup_steps"],
        cooldown_fraction=config["cooldown_fraction"],
        reset_arm=config["reset_arm"],
        moe_kwargs=MOE_KWARGS,
        jit_compile=config["jit_compile"],
    )
    rows, curve = uc.run_seeds_converged(task, settings, seeds)
    result = uc.write_converged_outputs(
        output_dir,
        NAME,
        rows,
        curve,
        task,
        METRICS,
        LOWER_IS_BETTER,
        _header(task, settings, config, heldout, probe_test),
        plot_metrics=("nll", "accuracy", "probe_accuracy"),
        wall_seconds=time.perf_counter() - start,
    )
    print(f"[{NAME}] wrote {', '.join(result['files'])}", flush=True)
    return {"rows": rows, "curve": curve, **result}


def _header(task, settings, config, heldout, probe_test):
    """What was run, in words, for results.md."""
    model = config["model"]
    return (
        f"Dense ViT (D={model['model_dim']}, H={model['hidden_dim']}, "
        f"{model['num_layers']} blocks, {model['num_heads']} heads, "
        f"{model['patch_size']}x{model['patch_size']} patches of "
        f"{model['image_size'][0]}x{model['image_size'][1]} images, mean "
        f"pooling) pre-trained for {task.pretrain_steps} steps of "
        f"{config['batch_size']} glyph images, never repeated "
        f"({len(glyphs.ALPHANUMERIC)} classes, "
        f"{len(glyphs.glyph_bank()[1])} fonts). "
        f"{uc.describe_converged_protocol(task)}. Extra budgets are "
        f"fractions of the pre-training FLOPs P; the MoE from scratch is "
        f"trained for (1 + budget) P. MoE recipe: {settings.describe()}. "
        f"Held-out: {len(heldout[1])} images of a disjoint stream. Probe: "
        f"{PROBE_SHOTS}-shot ridge regression (penalty {PROBE_L2:g}) on "
        f"pooled features, {len(glyphs.SYMBOLS)} unseen symbol classes, "
        f"{len(probe_test[1])} test images, mean of {PROBE_DRAWS} draws of "
        "the shots.\n"
    )
