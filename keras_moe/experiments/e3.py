"""E^3 at the paper's settings, scaled down: pre-train, fine-tune, evaluate.

Reproduces, at small scale, the protocol of "Sparse MoEs meet Efficient
Ensembles" (Allingham et al., 2021; google-research/vmoe's `eee_paper`
configs): an efficient ensemble of experts (E^3) against V-MoE at equal
expert FLOPs, a dense ViT and a deep ensemble of two V-MoEs, each
pre-trained upstream and fine-tuned downstream, on error, negative
log-likelihood (NLL), expected calibration error (ECE, 15 bins), Brier score
and out-of-distribution detection (AUROC of the max probability), with the
forward FLOPs per prediction of `keras_moe.models.flops` (total: every
capacity slot; active: each token through its K experts). A second arm
upcycles one pre-trained dense ViT into E^3 and into V-MoE and continues
each, and the dense ViT itself, for the same extra upstream FLOPs.

Shape letters: B batch, N examples, K classes (8), M ensemble members, E
experts.

Data (scikit-learn's `load_digits`, 1,797 real 8x8 digits, grey levels
0..16 scaled to [0, 1]):

* in-distribution: digits 0-7, split 75% / 25% (test), stratified, with a
  fixed split seed (the same split for every run seed); the 75% is split
  again in halves, stratified: the upstream images and the downstream
  (fine-tuning) images, disjoint;
* upstream task: the upstream images, each batch drawn afresh with a random
  shift of -1, 0 or +1 pixel along each axis (zero fill), so pre-training
  sees new examples rather than cycling one small set;
* downstream task: the downstream images, unshifted, in a fresh random
  order every epoch; the classifier head is re-initialised (zeros, as the
  ViT's head starts) before fine-tuning, as vmoe does not restore the head;
* near-OOD: every 8 and 9 (digits no model saw);
* far-OOD: `FAR_OOD_PHOTO` patches of the photos scikit-learn ships
  (`load_sample_images`: grey levels of random 32x32 crops, 4x4 block
  averages -> 8x8) and as many images of uniform noise.

Models: one ViT (8x8 images, 2x2 patches: 16 patches and a class token)
whose MoE blocks, when any, are the paper's "last n" layout: every other
block counting back from the last one (blocks 5 and 7 of 8 for n=2, as in
vmoe's `eee_s32_last2` config). Every MoE block routes by V-MoE's noisy
top-K (noise std 1 / the experts a token chooses among: 1/E for V-MoE,
1/(E/M) for E^3, in training only) with V-MoE's importance and load losses
(0.005 each) and capacity factor 1.5 (train) / 2.0 (eval):

* "dense": no MoE block;
* "vmoe_k1", "vmoe_k2": V-MoE with E experts and K=1 / K=2;
* "e3_m2_k1": E^3 with M=2 members of E/2 experts each and K=1; the batch
  is tiled before the first MoE block. Its equal-FLOPs V-MoE is "vmoe_k2":
  both evaluate K*M = 2 experts per token in each MoE block (the paper's
  pairing of E^3 (K, M) with V-MoE K*M); E^3 also runs the blocks after
  its first MoE block M times, which the FLOPs columns show;
* "ensemble_2x_vmoe_k1": the averaged probabilities of two "vmoe_k1" from
  different seeds (the run seed and seed + `ENSEMBLE_SEED_OFFSET`).

Protocol per run seed (the seed draws initialisations, the upstream shifts
and the downstream order, the same for every model of the seed):

1. each model above is pre-trained from scratch on the upstream task for
   `pretrain_steps` steps (Adam, `pretrain_learning_rate`), then fine-tuned
   on the downstream task for `finetune_steps` steps (fresh Adam,
   `finetune_learning_rate`);
2. upcycled arm: the pre-trained "dense" ViT is (a) continued densely
   ("dense_continued"), (b) upcycled into V-MoE K=2 ("upcycled_vmoe_k2")
   and (c) upcycled into E^3 M=2, K=1 ("upcycled_e3_m2_k1") with
   `keras_moe.upcycle` (experts start as copies of the dense MLP, combine
   weights renormalised, so each starts as the dense model), and each is
   trained upstream for the same extra FLOPs, `upcycle_budget` times the
   dense pre-training FLOPs (`training_step_flops`; fewer steps for the
   costlier models), with a fresh Adam; then fine-tuned like the others.

Paired differences (`PAIRS`): for each seed, metric(a) - metric(b) of two
models trained on the same data; their mean, sample std and per-seed
values.

One compiled model per architecture is reused across seeds and phases: it
takes the weights of a freshly initialised (or upcycled) model and the
optimizer's initial state, which spares re-tracing the training graph.

Outputs in `output_dir`: `results.csv` (one row per model and seed),
`paired.csv` (one row per pair, metric and seed), `results.md` (mean ± std
per model, paired differences) and `e3_quality_vs_flops.png` (NLL, error,
ECE and near-OOD AUROC against FLOPs per prediction).
"""

import dataclasses
import os
import time

import numpy as np

from keras_moe.experiments import check_options
from keras_moe.experiments import common
from keras_moe.utils.files import write_text

NAME = "e3"
SUPPORTED_OPTIONS = ("num_experts", "capacity_factor")
SCRATCH_MODELS = (
    "dense",
    "vmoe_k1",
    "vmoe_k2",
    "e3_m2_k1",
    "ensemble_2x_vmoe_k1",
)
UPCYCLED_MODELS = (
    "dense_continued",
    "upcycled_vmoe_k2",
    "upcycled_e3_m2_k1",
)
MODELS = SCRATCH_MODELS + UPCYCLED_MODELS
# (a, b): the paired differences a - b reported, same seed.
PAIRS = (
    ("e3_m2_k1", "vmoe_k2"),
    ("e3_m2_k1", "vmoe_k1"),
    ("e3_m2_k1", "ensemble_2x_vmoe_k1"),
    ("upcycled_e3_m2_k1", "upcycled_vmoe_k2"),
    ("upcycled_e3_m2_k1", "dense_continued"),
)
IN_CLASSES = 8
SPLIT_SEED = 0
OOD_SEED = 1
TEST_FRACTION = 0.25
FAR_OOD_PHOTO = 180
ENSEMBLE_SEED_OFFSET = 1000
ENSEMBLE_SIZE = 2
# vmoe's V-MoE / E^3 router losses (no Switch load balancing, no z-loss).
ROUTER_LOSS_WEIGHTS = {
    "router_z_loss_weight": 0.0,
    "load_balancing_loss_weight": 0.0,
    "importance_loss_weight": 0.005,
    "load_loss_weight": 0.005,
}
# Random-stream offsets of one seed's data draws.
_STREAMS = {"pretrain": 0, "continue": 1, "finetune": 2}
METRICS = (
    "error",
    "nll",
    "ece",
    "brier",
    "auroc_near",
    "auroc_far",
)
PAIRED_METRICS = ("nll", "ece", "error", "auroc_near", "auroc_far")
_TITLES = {
    "error": "error",
    "nll": "NLL",
    "ece": "ECE",
    "brier": "Brier",
    "auroc_near": "AUROC near-OOD",
    "auroc_far": "AUROC far-OOD",
}


@dataclasses.dataclass(frozen=True)
class Config:
    """Sizes and training settings of one run of the experiment."""

    model_dim: int = 32
    num_heads: int = 4
    hidden_dim: int = 64
    num_layers: int = 8
    patch_size: int = 2
    last_n: int = 2
    num_experts: int = 8
    train_capacity_factor: float = 1.5
    eval_capacity_factor: float = 2.0
    batch_size: int = 64
    pretrain_steps: int = 500
    pretrain_learning_rate: float = 2e-3
    finetune_steps: int = 150
    finetune_learning_rate: float = 1e-3
    upcycle_budget: float = 0.5
    eval_batch_size: int = 256

    @property
    def moe_blocks(self):
        """The last n of every other block, counting back from the last."""
        return alternating_last_n(self.num_layers, self.last_n)


DEFAULT = Config()
SMALL = Config(
    model_dim=16,
    num_heads=2,
    hidden_dim=32,
    num_layers=4,
    num_experts=4,
    batch_size=16,
    pretrain_steps=4,
    finetune_steps=2,
)


def alternating_last_n(num_layers, last_n):
    """Blocks of the paper's "last n" layout: every other block, the last
    one included, n of them.

    Example:

    >>> alternating_last_n(8, 2)
    (5, 7)
    """
    if not 1 <= last_n <= (num_layers + 1) // 2:
        raise ValueError(
            f"last_n must be in [1, {(num_layers + 1) // 2}] for "
            f"{num_layers} blocks; received {last_n!r}"
        )
    return tuple(range(num_layers - 1 - 2 * (last_n - 1), num_layers, 2))


def _grey_patches(count, seed):
    """<float32>[count, 8, 8, 1] patches of scikit-learn's sample photos."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    patches = np.empty((count, 8, 8, 1), np.float32)
    for i in range(count):
        photo = photos[i % len(photos)]
        top = rng.integers(0, photo.shape[0] - 32 + 1)
        left = rng.integers(0, photo.shape[1] - 32 + 1)
        crop = photo[top : top + 32, left : left + 32].astype(np.float64)
        grey = crop @ np.array([0.299, 0.587, 0.114]) / 255.0  # (32, 32)
        # (32, 32) -> (8, 4, 8, 4) -> (8, 8): 4x4 block means.
        patches[i, :, :, 0] = grey.reshape(8, 4, 8, 4).mean(axis=(1, 3))
    return patches


def load_data():
    """The experiment's images and labels (see the module docstring).

    Returns:
        A dict of NumPy arrays: "x_up" <float32>[N, 8, 8, 1] and "y_up"
        <int64>[N] (upstream), "x_down", "y_down" (downstream), "x_test",
        "y_test", "x_near" (8s and 9s) and "x_far" (photo patches, then
        noise).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[..., None]
    labels = digits.target.astype(np.int64)
    known = labels < IN_CLASSES
    x_train, x_test, y_train, y_test = train_test_split(
        images[known],
        labels[known],
        test_size=TEST_FRACTION,
        stratify=labels[known],
        random_state=SPLIT_SEED,
    )
    x_up, x_down, y_up, y_down = train_test_split(
        x_train,
        y_train,
        test_size=0.5,
        stratify=y_train,
        random_state=SPLIT_SEED,
    )
    rng = np.random.default_rng(OOD_SEED)
    noise = rng.uniform(0.0, 1.0, (FAR_OOD_PHOTO, 8, 8, 1))
    far = np.concatenate(
        [_grey_patches(FAR_OOD_PHOTO, OOD_SEED), noise.astype(np.float32)]
    )
    return {
        "x_up": x_up,
        "y_up": y_up,
        "x_down": x_down,
        "y_down": y_down,
        "x_test": x_test,
        "y_test": y_test,
        "x_near": images[~known],
        "x_far": far,
    }


def shift_images(images, shifts):
    """Shifts each image by whole pixels, filling with zeros.

    Args:
        images: <float32>[N, H, W, C].
        shifts: <int>[N, 2], (down, right) shifts in {-1, 0, 1}.

    Returns:
        <float32>[N, H, W, C]: out[n, i, j] = images[n, i - dy, j - dx]
        where that pixel exists, else 0.
    """
    shifts = np.asarray(shifts)
    if shifts.shape != (len(images), 2) or np.abs(shifts).max(initial=0) > 1:
        raise ValueError(
            "shifts must be <int>[N, 2] with values in {-1, 0, 1}; received "
            f"shape {shifts.shape} for {len(images)} images"
        )
    height, width = images.shape[1:3]
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.empty_like(images)
    for n, (dy, dx) in enumerate(shifts):
        out[n] = padded[n, 1 - dy : 1 - dy + height, 1 - dx : 1 - dx + width]
    return out


def upstream_batches(data, steps, batch_size, seed, stream):
    """`steps` batches of shifted upstream images, drawn with replacement.

    Returns:
        (images <float32>[steps*B, 8, 8, 1], labels <int64>[steps*B]); the
        draws are fixed by (seed, stream).
    """
    rng = np.random.default_rng([seed, _STREAMS[stream]])
    index = rng.integers(0, len(data["x_up"]), steps * batch_size)
    shifts = rng.integers(-1, 2, (steps * batch_size, 2))
    return shift_images(data["x_up"][index], shifts), data["y_up"][index]


def downstream_batches(data, steps, batch_size, seed):
    """`steps` batches of downstream images, epoch after epoch, each epoch
    in a fresh random order fixed by the seed."""
    rng = np.random.default_rng([seed, _STREAMS["finetune"]])
    count = len(data["x_down"])
    epochs = -(-steps * batch_size // count)
    order = np.concatenate([rng.permutation(count) for _ in range(epochs)])
    order = order[: steps * batch_size]
    return data["x_down"][order], data["y_down"][order]


def _moe_kwargs(config, k, members=1):
    experts = config.num_experts // members
    return dict(
        num_experts=config.num_experts,
        router="tokens_choose",
        num_selected_experts=k,
        train_capacity_factor=config.train_capacity_factor,
        eval_capacity_factor=config.eval_capacity_factor,
        # vmoe: noise std 1.0 divided by the experts a token chooses among.
        noise_std=1.0 / experts,
        **ROUTER_LOSS_WEIGHTS,
    )


def _base_kwargs(config):
    return dict(
        image_size=8,
        patch_size=config.patch_size,
        num_channels=1,
        model_dim=config.model_dim,
        num_heads=config.num_heads,
        hidden_dim=config.hidden_dim,
        num_layers=config.num_layers,
        num_classes=IN_CLASSES,
    )


def model_kwargs(kind, config):
    """`ViT` kwargs of a from-scratch model: "dense", "vmoe_k1", "vmoe_k2"
    or "e3_m2_k1"."""
    kinds = ("dense", "vmoe_k1", "vmoe_k2", "e3_m2_k1")
    if kind not in kinds:
        raise ValueError(
            f"model kind must be one of {kinds}; received {kind!r}"
        )
    kwargs = _base_kwargs(config)
    if kind == "dense":
        return kwargs
    members = ENSEMBLE_SIZE if kind == "e3_m2_k1" else 1
    moe = _moe_kwargs(config, 2 if kind == "vmoe_k2" else 1, members)
    kwargs["encoder_moe_blocks"] = {i: dict(moe) for i in config.moe_blocks}
    if members > 1:
        kwargs["ensemble_size"] = members
    return kwargs


def upcycled_model(dense_model, kind, config, seed):
    """Upcycles a dense ViT into "upcycled_vmoe_k2" or "upcycled_e3_m2_k1".

    The MoE blocks are those of the from-scratch models; token choice with
    the same K, noise, losses and capacity; the upcycling recipe's
    renormalised combine weights and Normal(0, 0.02) router, so that the
    upcycled model starts as the dense one.
    """
    from keras_moe.upcycling import upcycle

    if kind not in UPCYCLED_MODELS[1:]:
        raise ValueError(
            f"upcycled kind must be one of {UPCYCLED_MODELS[1:]}; received "
            f"{kind!r}"
        )
    members = ENSEMBLE_SIZE if kind == "upcycled_e3_m2_k1" else 1
    k = 1 if members > 1 else 2
    moe = _moe_kwargs(config, k, members)
    extra = {name: moe[name] for name in ("noise_std", *ROUTER_LOSS_WEIGHTS)}
    return upcycle(
        dense_model,
        num_experts=config.num_experts,
        blocks=list(config.moe_blocks),
        encoder_router="tokens_choose",
        num_selected_experts=k,
        train_capacity_factor=config.train_capacity_factor,
        eval_capacity_factor=config.eval_capacity_factor,
        moe_kwargs=extra,
        ensemble_size=members,
        seed=seed,
    )


def active_flops(model):
    """Forward FLOPs per prediction with each token through exactly its K
    experts (no empty capacity slot counted)."""
    from keras_moe.models.flops import flops_per_prediction
    from keras_moe.models.vit import ViT

    config = model.get_config()
    blocks = config.get("encoder_moe_blocks") or {}
    config["encoder_moe_blocks"] = {
        key: dict(value, eval_capacity_factor=None)
        for key, value in blocks.items()
    } or None
    return flops_per_prediction(ViT.from_config(config))


class _Runner:
    """One compiled model of an architecture, re-initialised per phase."""

    def __init__(self, build, config):
        from keras_moe.data.specs import CLASSIFICATION
        from keras_moe.training.fit import compile_for_task

        self.build = build
        self.config = config
        self.model = build()
        compile_for_task(
            self.model,
            CLASSIFICATION,
            config.pretrain_learning_rate,
            metrics=[],
            jit_compile=False,
        )
        self.model.optimizer.build(self.model.trainable_variables)
        self._initial_optimizer = [
            np.array(v.numpy()) for v in self.model.optimizer.variables
        ]

    def init(self, seed):
        """Fresh weights drawn with `seed`."""
        import keras

        keras.utils.set_random_seed(seed)
        self.model.set_weights(self.build().get_weights())

    def reset_head(self):
        """The head as a fresh ViT's: zeros."""
        for weight in self.model.head.weights:
            weight.assign(np.zeros(weight.shape, weight.dtype))

    def train(self, x, y, learning_rate):
        """Trains on (x, y) in order, one pass, from a fresh optimizer
        state; returns the last loss."""
        import tensorflow as tf

        optimizer = self.model.optimizer
        for variable, value in zip(
            optimizer.variables, self._initial_optimizer
        ):
            variable.assign(value)
        optimizer.learning_rate.assign(learning_rate)
        # Whole batches only: one static shape, one trace of the step.
        dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(
            self.config.batch_size, drop_remainder=True
        )
        history = self.model.fit(dataset, epochs=1, shuffle=False, verbose=0)
        return float(history.history["loss"][-1])

    def probabilities(self, x):
        """<float64>[N, K] predictive probabilities (E^3: averaged)."""
        size = self.config.eval_batch_size
        pad = (-len(x)) % size
        padded = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
        logits = self.model.predict(padded, batch_size=size, verbose=0)
        logits = np.asarray(logits, np.float64)[: len(x)]
        # The E^3 output is log(mean_m softmax(z_m)): its softmax is the
        # ensemble's averaged distribution.
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        return probs / probs.sum(axis=1, keepdims=True)


def evaluate(probs, data):
    """Metrics of predictions on the concatenated test, near and far sets.

    Args:
        probs: <float>[N_test + N_near + N_far, K] probabilities, in the
            order test, near-OOD, far-OOD.
        data: the dict of `load_data`.

    Returns:
        A dict with the keys of `METRICS`.
    """
    from keras_moe.evaluation import metrics

    n_test, n_near = len(data["x_test"]), len(data["x_near"])
    test = probs[:n_test]
    near = probs[n_test : n_test + n_near]
    far = probs[n_test + n_near :]
    result = metrics.uncertainty_metrics(data["y_test"], test)
    return {
        "error": result["error"],
        "nll": result["nll"],
        "ece": result["ece"],
        "brier": result["brier"],
        "auroc_near": metrics.ood_auroc(test, near, "max_prob"),
        "auroc_far": metrics.ood_auroc(test, far, "max_prob"),
    }


def paired_differences(rows, pairs=PAIRS, metrics=PAIRED_METRICS):
    """Per-seed differences metric(a) - metric(b) and their mean and std.

    Args:
        rows: result rows with "model", "seed" and the metrics.
        pairs: (a, b) model names.
        metrics: metric keys.

    Returns:
        (per_seed, summary): per_seed is a list of dicts {"a", "b",
        "metric", "seed", "difference"}; summary a list of dicts {"a",
        "b", "metric", "n", "mean", "std" (sample, ddof=1; 0 for one
        seed), "per_seed" (the differences in seed order)}.
    """
    by_key = {(r["model"], r["seed"]): r for r in rows}
    seeds = sorted({r["seed"] for r in rows})
    per_seed, summary = [], []
    for a, b in pairs:
        for metric in metrics:
            values = []
            for seed in seeds:
                if (a, seed) not in by_key or (b, seed) not in by_key:
                    continue
                diff = float(by_key[(a, seed)][metric]) - float(
                    by_key[(b, seed)][metric]
                )
                values.append(diff)
                per_seed.append(
                    dict(a=a, b=b, metric=metric, seed=seed, difference=diff)
                )
            if not values:
                continue
            values = np.array(values)
            summary.append(
                dict(
                    a=a,
                    b=b,
                    metric=metric,
                    n=len(values),
                    mean=float(values.mean()),
                    std=float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                    per_seed=[float(v) for v in values],
                )
            )
    return per_seed, summary


def _config(small, options):
    config = SMALL if small else DEFAULT
    changes = {}
    if "num_experts" in options:
        experts = options["num_experts"]
        if (
            isinstance(experts, bool)
            or not isinstance(experts, int)
            or experts < ENSEMBLE_SIZE
            or experts % ENSEMBLE_SIZE
        ):
            raise ValueError(
                "num_experts must be an even int >= 2 (E^3 splits the "
                f"experts between {ENSEMBLE_SIZE} members; V-MoE K=2 needs "
                f"2); received {experts!r}"
            )
        changes["num_experts"] = experts
    if "capacity_factor" in options:
        factor = options["capacity_factor"]
        if isinstance(factor, bool) or not float(factor) > 0:
            raise ValueError(
                f"capacity_factor must be > 0; received {factor!r}"
            )
        changes["train_capacity_factor"] = float(factor)
        changes["eval_capacity_factor"] = float(factor)
    return dataclasses.replace(config, **changes)


def validate_options(options):
    """Raises a ValueError for options `run` would refuse (no work done).

    Args:
        options: None or a dict of options (see `run`).
    """
    _config(False, check_options(NAME, options, SUPPORTED_OPTIONS))


_HEADERS = (
    "model",
    "FLOPs / prediction (total)",
    "FLOPs / prediction (active)",
    "upstream steps",
    *[_TITLES[m] for m in METRICS],
    "seeds",
)


def _summary_rows(summary):
    rows = []
    for row in summary:
        out = {
            "model": row["model"],
            _HEADERS[1]: common.format_flops(row["flops"]),
            _HEADERS[2]: common.format_flops(row["active_flops"]),
            _HEADERS[3]: f"{row['upstream_steps']:.0f}",
            "seeds": row["n"],
        }
        for metric in METRICS:
            out[_TITLES[metric]] = common.format_mean_std(
                row[metric], row[f"{metric}_std"]
            )
        rows.append(out)
    return rows


def _paired_rows(summary):
    rows = []
    for item in summary:
        rows.append(
            {
                "a - b": f"{item['a']} - {item['b']}",
                "metric": _TITLES[item["metric"]],
                "mean ± std": common.format_mean_std(item["mean"], item["std"]),
                "per seed": ", ".join(f"{v:+.3f}" for v in item["per_seed"]),
            }
        )
    return rows


def upcycle_steps(config, step_flops):
    """Upstream steps of each upcycled-arm model for the extra budget:
    `upcycle_budget * pretrain_steps` dense steps' FLOPs, divided by each
    model's training-step FLOPs (rounded, at least 1)."""
    budget = config.upcycle_budget * config.pretrain_steps * step_flops["dense"]
    return {
        kind: max(1, int(round(budget / step_flops[kind])))
        for kind in UPCYCLED_MODELS
    }


def results_markdown(summary, paired, config, seeds, wall_s, steps):
    """The Markdown report of `run`: settings, the table, paired
    differences."""
    lines = [
        "# E^3 on digits: pre-trained and upcycled, against V-MoE",
        "",
        f"Seeds {list(seeds)}; mean ± std (sample std over seeds). "
        f"Wall time {wall_s:.0f} s.",
        "",
        f"ViT: D={config.model_dim}, heads={config.num_heads}, "
        f"H={config.hidden_dim}, {config.num_layers} blocks, "
        f"{config.patch_size}x{config.patch_size} patches; MoE blocks "
        f"{list(config.moe_blocks)} (every other, last "
        f"{config.last_n}), E={config.num_experts}, noisy top-K (std 1/E, "
        "E^3 1/(E/M)), importance + load losses 0.005 each, capacity "
        f"factor {config.train_capacity_factor} (train) / "
        f"{config.eval_capacity_factor} (eval). Pre-training: "
        f"{config.pretrain_steps} steps, batch {config.batch_size}, Adam "
        f"{config.pretrain_learning_rate}, shifted upstream digits. "
        f"Fine-tuning: {config.finetune_steps} steps, Adam "
        f"{config.finetune_learning_rate}, fresh head, downstream digits. "
        f"Upcycled arm: extra upstream FLOPs {config.upcycle_budget:g}x "
        "the dense pre-training: "
        + ", ".join(f"{k} {v} steps" for k, v in steps.items())
        + ".",
        "",
        "Error, NLL, ECE (15 bins) and Brier on the in-distribution test "
        "digits (0-7); AUROC of the max probability against 8s and 9s "
        "(near-OOD) and photo patches and noise (far-OOD). FLOPs: forward "
        "pass per prediction, `keras_moe.models.flops` (total: every "
        "capacity slot at the eval capacity factor; active: each token "
        "through its K experts).",
        "",
        common.markdown_table(_summary_rows(summary), _HEADERS),
        "## Paired differences (a - b, same seed)",
        "",
        "Negative is better for NLL, ECE and error; positive for AUROC.",
        "",
        common.markdown_table(
            _paired_rows(paired), ("a - b", "metric", "mean ± std", "per seed")
        ),
    ]
    return "\n".join(lines)


def plot_quality_vs_flops(summary, path):
    """Four panels (NLL, error, ECE, near-OOD AUROC), mean ± std against
    forward FLOPs per prediction, one labelled point per model."""
    from keras_moe.experiments.common import _pyplot
    from keras_moe.experiments.common import save_figure

    pyplot = _pyplot()
    panels = ("nll", "error", "ece", "auroc_near")
    figure, axes = pyplot.subplots(2, 2, figsize=(10.0, 7.5))
    for axis, metric in zip(axes.flat, panels):
        for i, row in enumerate(summary):
            marker = "s" if row["model"] in UPCYCLED_MODELS else "o"
            axis.errorbar(
                row["flops"] / 1e6,
                row[metric],
                yerr=row[f"{metric}_std"],
                fmt=marker,
                color=f"C{i}",
                capsize=3,
                label=row["model"],
            )
        axis.set_xlabel("forward MFLOPs per prediction (total)")
        axis.set_ylabel(_TITLES[metric])
        axis.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    figure.suptitle(
        "E^3 vs V-MoE, dense and deep ensemble (circles: from scratch; "
        "squares: upcycled arm)",
        fontsize=10,
    )
    figure.tight_layout()
    save_figure(figure, path)


def run(output_dir, seeds=(0, 1, 2, 3, 4), small=False, options=None):
    """Runs the experiment and writes its results into `output_dir`.

    Args:
        output_dir: directory for the CSVs, results.md and the plot.
        seeds: run seeds (paired differences over them).
        small: a smoke-test size (seconds of training).
        options: None or {"num_experts": even int, "capacity_factor":
            float (train and eval)}.

    Returns:
        A dict: "rows" (one per model and seed), "summary" (mean and std
        per model), "paired" (paired-difference summary), "steps"
        (upstream steps of the upcycled arm), "files" (paths written),
        "wall_s".
    """
    options = check_options(NAME, options, SUPPORTED_OPTIONS)
    seeds = common.check_seeds(seeds)
    if not isinstance(small, bool):
        raise ValueError(f"small must be a bool; received {small!r}")
    config = _config(small, options)
    output_dir = common.prepare_output_dir(output_dir)

    from keras_moe.models import flops
    from keras_moe.models.vit import ViT

    start = time.perf_counter()
    data = load_data()
    eval_x = np.concatenate([data["x_test"], data["x_near"], data["x_far"]])
    print(
        f"E^3 experiment: {len(data['x_up'])} upstream, "
        f"{len(data['x_down'])} downstream, {len(data['x_test'])} test, "
        f"{len(data['x_near'])} near-OOD, {len(data['x_far'])} far-OOD "
        "images",
        flush=True,
    )
    runners = {}

    def runner(kind, build=None):
        if kind not in runners:
            if build is None:
                kwargs = model_kwargs(kind, config)

                def build():
                    return ViT(**kwargs)

            runners[kind] = _Runner(build, config)
        return runners[kind]

    def finetune_and_score(kind, run, seed, tic):
        run.reset_head()
        x, y = downstream_batches(
            data, config.finetune_steps, config.batch_size, seed
        )
        loss = run.train(x, y, config.finetune_learning_rate)
        probs = run.probabilities(eval_x)
        print(
            f"  {kind} (seed {seed}): fine-tune loss {loss:.4f}, "
            f"{time.perf_counter() - tic:.1f} s",
            flush=True,
        )
        return probs

    def scratch(kind, seed):
        tic = time.perf_counter()
        run = runner(kind)
        run.init(seed)
        x, y = upstream_batches(
            data, config.pretrain_steps, config.batch_size, seed, "pretrain"
        )
        run.train(x, y, config.pretrain_learning_rate)
        pretrained = run.model.get_weights()
        return finetune_and_score(kind, run, seed, tic), pretrained

    step_flops = {}
    costs = {}

    def cost(kind, model):
        if kind not in costs:
            step_flops[kind] = flops.training_step_flops(model)
            costs[kind] = (
                flops.flops_per_prediction(model),
                active_flops(model),
            )
        return costs[kind]

    def row(kind, seed, probs, upstream_steps, prediction_flops):
        return dict(
            model=kind,
            seed=seed,
            flops=prediction_flops[0],
            active_flops=prediction_flops[1],
            upstream_steps=upstream_steps,
            **evaluate(probs, data),
        )

    def one_seed(seed):
        rows, probs = [], {}
        pretrained_dense = None
        for kind in SCRATCH_MODELS[:-1]:
            probs[kind], weights = scratch(kind, seed)
            if kind == "dense":
                pretrained_dense = weights
            rows.append(
                row(
                    kind,
                    seed,
                    probs[kind],
                    config.pretrain_steps,
                    cost(kind, runners[kind].model),
                )
            )
        second, _ = scratch("vmoe_k1", seed + ENSEMBLE_SEED_OFFSET)
        ensemble = (probs["vmoe_k1"] + second) / 2.0
        k1_flops = costs["vmoe_k1"]
        rows.append(
            row(
                SCRATCH_MODELS[-1],
                seed,
                ensemble,
                2 * config.pretrain_steps,
                (2 * k1_flops[0], 2 * k1_flops[1]),
            )
        )

        # Upcycled arm: from the pre-trained dense ViT of this seed.
        dense_model = runners["dense"].model
        dense_model.set_weights(pretrained_dense)
        models = {"dense_continued": None}
        for kind in UPCYCLED_MODELS[1:]:
            models[kind] = upcycled_model(dense_model, kind, config, seed)
        for kind, model in models.items():
            if model is not None and kind not in runners:
                model_config = model.get_config()

                def build(model_config=model_config):
                    return ViT.from_config(model_config)

                runner(kind, build)
            cost(kind, runners["dense" if model is None else kind].model)
        steps = upcycle_steps(config, step_flops)
        x_all, y_all = upstream_batches(
            data,
            max(steps.values()),
            config.batch_size,
            seed,
            "continue",
        )
        for kind, model in models.items():
            tic = time.perf_counter()
            run = runners["dense" if model is None else kind]
            run.model.set_weights(
                pretrained_dense if model is None else model.get_weights()
            )
            count = steps[kind] * config.batch_size
            run.train(
                x_all[:count], y_all[:count], config.pretrain_learning_rate
            )
            probs[kind] = finetune_and_score(kind, run, seed, tic)
            rows.append(
                row(
                    kind,
                    seed,
                    probs[kind],
                    config.pretrain_steps + steps[kind],
                    costs[kind],
                )
            )
        for out in rows:
            print(
                f"  {out['model']}: error {out['error']:.4f}, nll "
                f"{out['nll']:.4f}, ece {out['ece']:.4f}, auroc near "
                f"{out['auroc_near']:.4f}, far {out['auroc_far']:.4f}",
                flush=True,
            )
        return rows

    rows = common.for_each_seed(seeds, one_seed, label="e3: ")
    wall_s = time.perf_counter() - start
    summary = common.aggregate(
        rows, ("model",), ("flops", "active_flops", "upstream_steps", *METRICS)
    )
    per_seed, paired = paired_differences(rows)
    steps = upcycle_steps(config, step_flops)
    files = [
        os.path.join(output_dir, name)
        for name in (
            "results.csv",
            "paired.csv",
            "results.md",
            "e3_quality_vs_flops.png",
        )
    ]
    columns = (
        "model",
        "seed",
        "flops",
        "active_flops",
        "upstream_steps",
        *METRICS,
    )
    common.write_csv(files[0], rows, columns)
    common.write_csv(
        files[1], per_seed, ("a", "b", "metric", "seed", "difference")
    )
    write_text(
        files[2],
        results_markdown(summary, paired, config, seeds, wall_s, steps),
    )
    plot_quality_vs_flops(summary, files[3])
    print(f"e3: done in {wall_s:.1f} s", flush=True)
    return {
        "rows": rows,
        "summary": summary,
        "paired": paired,
        "steps": steps,
        "files": files,
        "wall_s": wall_s,
    }
