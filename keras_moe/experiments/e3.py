"""E^3 on real handwritten digits: accuracy, calibration and OOD detection.

Reproduces, at toy scale, the comparison of "Sparse MoEs meet Efficient
Ensembles" (Allingham et al., 2021): an efficient ensemble of experts (E^3)
against a dense ViT, V-MoE with K=1 and K=2, and a deep ensemble of two
V-MoEs, on error, negative log-likelihood (NLL), expected calibration error
(ECE, 15 bins), Brier score and out-of-distribution detection (AUROC of the
max probability), with the forward FLOPs per prediction of
`keras_moe.models.flops`.

Shape letters: B batch, N examples, K classes (8), M ensemble members, E
experts.

Data (scikit-learn's `load_digits`, 1,797 real 8x8 digits, grey levels
0..16 scaled to [0, 1]):

* in-distribution: digits 0-7, split 75% train / 25% test, stratified,
  with a fixed split seed (the same split for every run seed);
* near-OOD: every 8 and 9 (digits the models never saw);
* far-OOD: `FAR_OOD_PHOTO` patches of the photos scikit-learn ships
  (`load_sample_images`: grey levels of random 32x32 crops, 4x4 block
  averages -> 8x8) and as many images of uniform noise.

Models (`MODELS`), all the same ViT (8x8 images, 2x2 patches, 16 patches
and a class token) with MoE blocks, when any, in the last two blocks,
token-choice routing (V-MoE's) and E experts:

* "dense": no MoE block;
* "vmoe_k1", "vmoe_k2": V-MoE with K=1 and K=2 experts per token;
* "e3_m2_k1": E^3 with M=2 members, E/2 experts each, K=1;
* "ensemble_2x_vmoe_k1": the average of two "vmoe_k1" models trained from
  different seeds (the run seed and seed + `ENSEMBLE_SEED_OFFSET`).

Each run seed initialises every model and shuffles its data; all models
train with Adam on the same data for the same number of steps (the
member-tiled cross-entropy for E^3, as in the paper). One compiled model
per architecture is reused across seeds: for each seed it takes the
weights of a freshly initialised model of that seed and the optimizer's
initial state, which spares re-tracing the training graph (tracing, not
training, dominates the cost at this size).

Outputs in `output_dir`: `results.csv` (one row per model and seed),
`results.md` (mean ± std over seeds), `e3_metrics.png` (bars with std)
and `e3_nll_vs_flops.png`.
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
MODELS = (
    "dense",
    "vmoe_k1",
    "vmoe_k2",
    "e3_m2_k1",
    "ensemble_2x_vmoe_k1",
)
IN_CLASSES = 8
SPLIT_SEED = 0
OOD_SEED = 1
TEST_FRACTION = 0.25
FAR_OOD_PHOTO = 180
ENSEMBLE_SEED_OFFSET = 1000
ENSEMBLE_SIZE = 2
METRICS = (
    "error",
    "nll",
    "ece",
    "brier",
    "auroc_near",
    "auroc_far",
)
_HEADERS = (
    "model",
    "FLOPs / prediction",
    "error",
    "NLL",
    "ECE",
    "Brier",
    "AUROC near-OOD",
    "AUROC far-OOD",
    "seeds",
)


@dataclasses.dataclass(frozen=True)
class Config:
    """Sizes and training settings of one run of the experiment."""

    model_dim: int = 32
    num_heads: int = 4
    hidden_dim: int = 64
    num_layers: int = 4
    patch_size: int = 2
    num_experts: int = 4
    train_capacity_factor: float = 1.25
    eval_capacity_factor: float = 2.0
    epochs: int = 25
    batch_size: int = 128
    eval_batch_size: int = 256
    learning_rate: float = 2e-3

    @property
    def moe_blocks(self):
        """The last two blocks (the last one for a one-block model)."""
        return tuple(range(max(self.num_layers - 2, 0), self.num_layers))


DEFAULT = Config()
SMALL = Config(
    model_dim=16,
    num_heads=2,
    hidden_dim=32,
    num_layers=2,
    epochs=1,
)


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
        A dict of NumPy arrays: "x_train" <float32>[N, 8, 8, 1], "y_train"
        <int64>[N], "x_test", "y_test", "x_near" (8s and 9s) and "x_far"
        (photo patches, then noise).
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
    rng = np.random.default_rng(OOD_SEED)
    noise = rng.uniform(0.0, 1.0, (FAR_OOD_PHOTO, 8, 8, 1))
    far = np.concatenate(
        [_grey_patches(FAR_OOD_PHOTO, OOD_SEED), noise.astype(np.float32)]
    )
    return {
        "x_train": x_train,
        "y_train": y_train,
        "x_test": x_test,
        "y_test": y_test,
        "x_near": images[~known],
        "x_far": far,
    }


def model_kwargs(kind, config):
    """`ViT` kwargs of model `kind` (one of `MODELS` but the ensemble)."""
    kwargs = dict(
        image_size=8,
        patch_size=config.patch_size,
        num_channels=1,
        model_dim=config.model_dim,
        num_heads=config.num_heads,
        hidden_dim=config.hidden_dim,
        num_layers=config.num_layers,
        num_classes=IN_CLASSES,
    )
    if kind == "dense":
        return kwargs
    moe = dict(
        num_experts=config.num_experts,
        router="tokens_choose",
        num_selected_experts=2 if kind == "vmoe_k2" else 1,
        train_capacity_factor=config.train_capacity_factor,
        eval_capacity_factor=config.eval_capacity_factor,
    )
    if kind not in ("vmoe_k1", "vmoe_k2", "e3_m2_k1"):
        raise ValueError(
            f"model kind must be one of {MODELS[:-1]}; received {kind!r}"
        )
    kwargs["encoder_moe_blocks"] = {i: dict(moe) for i in config.moe_blocks}
    if kind == "e3_m2_k1":
        kwargs["ensemble_size"] = ENSEMBLE_SIZE
    return kwargs


class _Runner:
    """One compiled model of an architecture, re-initialised per seed."""

    def __init__(self, kind, config):
        from keras_moe.data.specs import CLASSIFICATION
        from keras_moe.models.vit import ViT
        from keras_moe.training.fit import compile_for_task

        self.kind = kind
        self.config = config
        self.kwargs = model_kwargs(kind, config)
        self.model = ViT(**self.kwargs)
        compile_for_task(
            self.model,
            CLASSIFICATION,
            config.learning_rate,
            metrics=[],
            jit_compile=False,
        )
        self.model.optimizer.build(self.model.trainable_variables)
        self._initial_optimizer = [
            np.array(v.numpy()) for v in self.model.optimizer.variables
        ]

    def reset(self, seed):
        """Fresh weights drawn with `seed`; the optimizer's initial state."""
        import keras

        from keras_moe.models.vit import ViT

        keras.utils.set_random_seed(seed)
        self.model.set_weights(ViT(**self.kwargs).get_weights())
        for variable, value in zip(
            self.model.optimizer.variables, self._initial_optimizer
        ):
            variable.assign(value)

    def train(self, x, y, seed):
        """Trains from the state of `reset(seed)`; returns the last loss."""
        import tensorflow as tf

        self.reset(seed)
        # Whole batches only: one static shape, one trace of the step.
        dataset = (
            tf.data.Dataset.from_tensor_slices((x, y))
            .shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
            .batch(self.config.batch_size, drop_remainder=True)
        )
        history = self.model.fit(
            dataset, epochs=self.config.epochs, shuffle=False, verbose=0
        )
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

    def flops(self):
        from keras_moe.models.flops import flops_per_prediction

        return flops_per_prediction(self.model)


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


def _summary_rows(summary):
    rows = []
    for row in summary:
        out = {
            "model": row["model"],
            "FLOPs / prediction": common.format_flops(row["flops"]),
            "seeds": row["n"],
        }
        for metric, header in zip(METRICS, _HEADERS[2:-1]):
            out[header] = common.format_mean_std(
                row[metric], row[f"{metric}_std"]
            )
        rows.append(out)
    return rows


def results_markdown(summary, config, seeds, wall_s):
    """The Markdown report of `run`: settings and the mean ± std table."""
    lines = [
        "# E^3 on digits: dense ViT, V-MoE, E^3, deep ensemble",
        "",
        f"Seeds {list(seeds)}; mean ± std (sample std over seeds). "
        f"Wall time {wall_s:.0f} s.",
        "",
        f"ViT: D={config.model_dim}, heads={config.num_heads}, "
        f"H={config.hidden_dim}, {config.num_layers} blocks, "
        f"{config.patch_size}x{config.patch_size} patches; MoE blocks "
        f"{list(config.moe_blocks)}, E={config.num_experts}, token choice, "
        f"capacity factor {config.train_capacity_factor} (train) / "
        f"{config.eval_capacity_factor} (eval); Adam "
        f"{config.learning_rate}, batch {config.batch_size}, "
        f"{config.epochs} epochs.",
        "",
        "Error, NLL, ECE (15 bins) and Brier on the in-distribution test "
        "digits (0-7); AUROC of the max probability against 8s and 9s "
        "(near-OOD) and photo patches and noise (far-OOD). FLOPs: forward "
        "pass per prediction, `keras_moe.models.flops`.",
        "",
        common.markdown_table(_summary_rows(summary), _HEADERS),
    ]
    return "\n".join(lines)


def run(output_dir, seeds=(0, 1, 2), small=False, options=None):
    """Runs the experiment and writes its results into `output_dir`.

    Args:
        output_dir: directory for results.csv, results.md and the plots.
        seeds: run seeds (mean ± std over them).
        small: a smoke-test size (seconds of training).
        options: None or {"num_experts": even int, "capacity_factor":
            float (train and eval)}.

    Returns:
        A dict: "rows" (one per model and seed), "summary" (mean and std
        per model), "files" (paths written), "wall_s".
    """
    options = check_options(NAME, options, SUPPORTED_OPTIONS)
    seeds = common.check_seeds(seeds)
    if not isinstance(small, bool):
        raise ValueError(f"small must be a bool; received {small!r}")
    config = _config(small, options)
    output_dir = common.prepare_output_dir(output_dir)
    start = time.perf_counter()
    data = load_data()
    eval_x = np.concatenate([data["x_test"], data["x_near"], data["x_far"]])
    print(
        f"E^3 experiment: {len(data['x_train'])} train, "
        f"{len(data['x_test'])} test, {len(data['x_near'])} near-OOD, "
        f"{len(data['x_far'])} far-OOD images",
        flush=True,
    )
    runners = {}

    def train_and_predict(kind, seed):
        if kind not in runners:
            runners[kind] = _Runner(kind, config)
        runner = runners[kind]
        tic = time.perf_counter()
        loss = runner.train(data["x_train"], data["y_train"], seed)
        probs = runner.probabilities(eval_x)
        print(
            f"  {kind} (seed {seed}): loss {loss:.4f}, "
            f"{time.perf_counter() - tic:.1f} s",
            flush=True,
        )
        return probs, runner.flops(), time.perf_counter() - tic

    def one_seed(seed):
        rows, probs = [], {}
        for kind in MODELS[:-1]:
            probs[kind], flops, wall = train_and_predict(kind, seed)
            rows.append(
                dict(
                    model=kind,
                    seed=seed,
                    flops=flops,
                    wall_s=round(wall, 2),
                    **evaluate(probs[kind], data),
                )
            )
        second, flops, wall = train_and_predict(
            "vmoe_k1", seed + ENSEMBLE_SEED_OFFSET
        )
        ensemble = (probs["vmoe_k1"] + second) / 2.0
        rows.append(
            dict(
                model=MODELS[-1],
                seed=seed,
                flops=2 * flops,
                wall_s=round(rows[1]["wall_s"] + wall, 2),
                **evaluate(ensemble, data),
            )
        )
        for row in rows:
            print(
                f"  {row['model']}: error {row['error']:.4f}, nll "
                f"{row['nll']:.4f}, ece {row['ece']:.4f}, auroc near "
                f"{row['auroc_near']:.4f}, far {row['auroc_far']:.4f}",
                flush=True,
            )
        return rows

    rows = common.for_each_seed(seeds, one_seed, label="e3: ")
    wall_s = time.perf_counter() - start
    summary = common.aggregate(rows, ("model",), ("flops", *METRICS))
    files = [
        os.path.join(output_dir, name)
        for name in (
            "results.csv",
            "results.md",
            "e3_metrics.png",
            "e3_nll_vs_flops.png",
        )
    ]
    columns = ("model", "seed", "flops", *METRICS, "wall_s")
    common.write_csv(files[0], rows, columns)
    write_text(files[1], results_markdown(summary, config, seeds, wall_s))
    common.plot_bars(
        summary,
        "model",
        METRICS,
        files[2],
        titles=[h for h in _HEADERS[2:-1]],
    )
    common.plot_scatter(
        summary,
        "model",
        "flops",
        "nll",
        files[3],
        x_label="forward FLOPs per prediction",
        y_label="test NLL",
    )
    print(f"e3: done in {wall_s:.1f} s", flush=True)
    return {"rows": rows, "summary": summary, "files": files, "wall_s": wall_s}
