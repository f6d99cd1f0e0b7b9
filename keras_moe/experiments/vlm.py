"""The small vision-language model on the digits task mixture.

Trains a `keras_moe.models.vlm.VisionLanguageModel` (a ViT on the 8 x 16
digit canvas, a T5 over the embedded SentencePiece vocabulary) on the
mixture of `keras_moe.data.vlm_tasks` (multilingual digit captioning,
questions about two-digit images, text-only span corruption), then scores
exact match on held-out images, with the images and with the images
blanked out (zeros), which tells whether the model reads the image.
Optionally the trained dense model is upcycled (`keras_moe.upcycle`, the
paper's recipe: every other block of the ViT, the T5 encoder and the T5
decoder) and trained further, continuing the dense run's optimizer
(`keras_moe.upcycle_optimizer`: Adam's moments tiled to the experts, the
step count, and the learning-rate schedule, which has decayed to 10% of its
peak), and scored the same way.

Exact match: the greedy generation, cut at its first end-of-sequence id,
equals the target ids. Captioning is scored on every `digits` test image
in each language; question answering on the first `vqa_eval_images`
`composed_digits` test images, each with every question.

Entry points:

* `train_and_evaluate(config)`: one run (one seed); returns the result rows
  and the trained models. `train_vlm` runs it and also writes the files
  below.
* `run(output_dir, seeds, small, options)`: the contract of
  `keras_moe.experiments` (experiment "vlm"), one run per seed;
  `options` may hold `num_experts` (then the runs upcycle).

Files written to the output directory (atomically): `results.csv` (one
row per seed, model, task, language and image condition), `results.md`
(the table, mean ± std over seeds), `exact_match.png` (with and without
images), `loss.png` (training loss) and, from `train_vlm`, the trained
models as `vlm_dense.keras` / `vlm_upcycled.keras`.

Example:

    result = train_and_evaluate(VlmConfig(steps=800, languages=("en", "de")))
    result.rows[0]  # {"model": "dense", "task": "caption", ...}
"""

import dataclasses
import os
import time

import keras
import numpy as np

from keras_moe import data
from keras_moe import upcycling
from keras_moe.checkpoints import read_vlm_checkpoints
from keras_moe.data import vlm_tasks
from keras_moe.data.specs import CLASSIFICATION
from keras_moe.evaluation.sequences import exact_matches
from keras_moe.evaluation.sequences import until_eos
from keras_moe.experiments import common
from keras_moe.models.vlm import VisionLanguageModel
from keras_moe.training.fit import compile_for_task
from keras_moe.utils.checks import check_int
from keras_moe.utils.files import save_keras
from keras_moe.utils.files import write_text

NAME = "vlm"
SUPPORTED_OPTIONS = ("num_experts",)
VISION = dict(
    image_size=list(vlm_tasks.IMAGE_SHAPE[:2]),
    patch_size=4,
    num_channels=vlm_tasks.IMAGE_SHAPE[2],
    model_dim=64,
    num_heads=4,
    hidden_dim=128,
    num_layers=2,
)
TEXT = dict(
    vocab_size=data.VOCAB_SIZE,
    model_dim=64,
    num_heads=4,
    head_dim=16,
    hidden_dim=128,
    num_encoder_layers=2,
    num_decoder_layers=2,
    activation="gated_gelu",
    tie_embeddings=False,
)
# --small: a CI smoke run, not a meaningful result.
_SMALL = dict(
    steps=20,
    upcycle_steps=10,
    batch_size=16,
    eval_images=24,  # 8 VQA images x 3 questions: one generation trace
    vqa_eval_images=8,
    vision=dict(VISION, model_dim=32, hidden_dim=64),
    text=dict(
        TEXT,
        model_dim=32,
        head_dim=8,
        hidden_dim=64,
        num_encoder_layers=2,
        num_decoder_layers=2,
    ),
)
_EVAL_BATCH = 256


@dataclasses.dataclass(frozen=True)
class VlmConfig:
    """One training run (see the module docstring).

    Attributes:
        languages: captioning languages (tags of `vlm_tasks.LANGUAGES`).
        rates: {task: sampling rate} of the mixture.
        steps: dense training steps.
        batch_size: examples per step.
        learning_rate: peak Adam learning rate (linear warm-up over 5% of
            the steps, cosine decay to 10%).
        upcycle: upcycle the trained model and train it further.
        num_experts: E of the upcycled blocks.
        upcycle_steps: training steps of the upcycled model (at the dense
            run's final learning rate, its optimizer state continued).
        blank_images: also score with the images replaced by zeros.
        prompt_length, target_length: P and U of the task examples.
        eval_images: captioning test images scored (None: all 360).
        vqa_eval_images: composed test images scored, each with every
            question.
        vision, text: the ViT and T5 kwargs of the model.
        vit_checkpoint, t5_checkpoint: dense checkpoints to start from
            (both or neither); their sizes replace `vision` and `text`.
        jit_compile: XLA-compile the training step (slower to start,
            faster per step).
        seed: of the weights and of the data order.
        data_dir: TFDS data directory (None: the default).
    """

    languages: tuple = ("en", "fr", "de", "es")
    rates: dict = dataclasses.field(
        default_factory=lambda: dict(vlm_tasks.DEFAULT_RATES)
    )
    steps: int = 1000
    batch_size: int = 64
    learning_rate: float = 2e-3
    upcycle: bool = False
    num_experts: int = 8
    upcycle_steps: int = 300
    blank_images: bool = True
    prompt_length: int = 24
    target_length: int = 8
    eval_images: int | None = None
    vqa_eval_images: int = 200
    vision: dict = dataclasses.field(default_factory=lambda: dict(VISION))
    text: dict = dataclasses.field(default_factory=lambda: dict(TEXT))
    vit_checkpoint: str | None = None
    t5_checkpoint: str | None = None
    jit_compile: bool = False
    seed: int = 0
    data_dir: str | None = None

    def __post_init__(self):
        object.__setattr__(
            self, "languages", vlm_tasks.check_languages(self.languages)
        )
        vlm_tasks.check_rates(self.rates)
        for name in ("steps", "batch_size", "num_experts", "upcycle_steps"):
            check_int(name, getattr(self, name), 1)
        for name in ("prompt_length", "target_length"):
            check_int(name, getattr(self, name), 2)
        check_int("vqa_eval_images", self.vqa_eval_images, 0)
        if self.eval_images is not None:
            check_int("eval_images", self.eval_images, 1)
        if not self.learning_rate > 0:
            raise ValueError(
                f"learning_rate must be > 0; received {self.learning_rate!r}"
            )
        if (self.vit_checkpoint is None) != (self.t5_checkpoint is None):
            raise ValueError(
                "Give both vit_checkpoint and t5_checkpoint, or neither; "
                f"received {self.vit_checkpoint!r} and {self.t5_checkpoint!r}"
            )
        for path in (self.vit_checkpoint, self.t5_checkpoint):
            if path is not None and not os.path.exists(path):
                if not os.path.exists(f"{path}.index"):
                    raise ValueError(f"checkpoint path does not exist: {path}")

    @classmethod
    def small(cls, **overrides):
        """The CI smoke size, with `overrides`."""
        return cls(**{**_SMALL, **overrides})


@dataclasses.dataclass
class VlmResult:
    """What `train_and_evaluate` returns.

    Attributes:
        rows: result rows (see `evaluate`), with "seed" added.
        losses: {model name: training loss every `log_every` steps}.
        models: {model name: the trained Keras model}.
        seconds: {phase: wall seconds}.
    """

    rows: list
    losses: dict
    models: dict
    seconds: dict


def build_model(config):
    """A new model of `config` (random or from the dense checkpoints)."""
    kwargs = dict(max_prompt_length=config.prompt_length)
    if config.vit_checkpoint is not None:
        model = read_vlm_checkpoints(
            config.vit_checkpoint, config.t5_checkpoint, **kwargs
        )
        shape = model.image_shape
        if tuple(shape) != vlm_tasks.IMAGE_SHAPE:
            raise ValueError(
                f"The ViT checkpoint takes {shape} images; the tasks make "
                f"{vlm_tasks.IMAGE_SHAPE} images"
            )
        if model.language_model.vocab_size < data.VOCAB_SIZE:
            raise ValueError(
                "The T5 checkpoint's vocabulary "
                f"({model.language_model.vocab_size}) is smaller than the "
                f"task vocabulary ({data.VOCAB_SIZE})"
            )
        return model
    return VisionLanguageModel(config.vision, config.text, **kwargs)


def _compile(model, config, steps, optimizer=None):
    if optimizer is None:
        warmup = max(1, steps // 20)
        schedule = keras.optimizers.schedules.CosineDecay(
            0.0,
            decay_steps=steps - warmup,
            alpha=0.1,
            warmup_target=config.learning_rate,
            warmup_steps=warmup,
        )
        optimizer = keras.optimizers.Adam(schedule)
    # CLASSIFICATION's loss per target token: the mean over all B x U
    # positions, padding weighted 0 (not TRANSLATION's mean over the real
    # tokens); no metric, the progress lines print the loss only.
    compile_for_task(
        model,
        CLASSIFICATION,
        optimizer=optimizer,
        metrics=[],
        jit_compile=config.jit_compile,
    )


def _log_every(steps):
    """The largest divisor of `steps` that is at most `steps // 20`."""
    return max(d for d in range(1, max(1, steps // 20) + 1) if steps % d == 0)


class _Progress(keras.callbacks.Callback):
    """Records and prints the mean loss of every chunk of steps."""

    def __init__(self, steps, log_every, label):
        super().__init__()
        self.steps, self.log_every, self.label = steps, log_every, label
        self.losses = []
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        done = (epoch + 1) * self.log_every
        self.losses.append((done, float(logs["loss"])))
        print(
            f"{self.label}step {done}/{self.steps}: loss "
            f"{self.losses[-1][1]:.4f} ({time.perf_counter() - self.start:.0f}"
            " s)",
            flush=True,
        )


def train(model, dataset, steps, config, label="", optimizer=None):
    """Trains `model` for `steps` batches of the repeated `dataset`.

    Args:
        model: the model.
        dataset: `(inputs, targets, weights)` batches, repeated.
        steps: training steps.
        config: a `VlmConfig`.
        label: printed before the progress lines.
        optimizer: None for a new Adam (warm-up, cosine decay over
            `steps`), or an optimizer to continue with.

    Returns:
        [(step, mean loss of the steps since the previous entry)], about
        20 entries.
    """
    _compile(model, config, steps, optimizer)
    log_every = _log_every(steps)
    progress = _Progress(steps, log_every, label)
    # One fit: Keras keeps the dataset iterator across its epochs.
    model.fit(
        dataset,
        epochs=steps // log_every,
        steps_per_epoch=log_every,
        callbacks=[progress],
        verbose=0,
    )
    return progress.losses


def exact_match(model, dataset, max_length, blank=False):
    """(exact-match rate, examples, one (generated, target) id pair).

    Args:
        model: a `VisionLanguageModel`.
        dataset: unbatched `(inputs, targets)` task examples.
        max_length: L of the generation (start id included).
        blank: replace the images by zeros (image masks kept).
    """
    hits = total = 0
    sample = None
    for inputs, targets in dataset.batch(_EVAL_BATCH).as_numpy_iterator():
        images = inputs["images"]
        if blank:
            images = np.zeros_like(images)
        tokens = keras.ops.convert_to_numpy(
            model.generate(
                images,
                inputs["prompt_token_ids"],
                max_length,
                inputs["image_mask"],
            )
        )
        generated = tokens[:, 1:]  # the start id dropped
        hits += sum(exact_matches(generated, targets))
        total += len(targets)
        if sample is None:
            sample = (until_eos(generated[0]), until_eos(targets[0]))
    return hits / max(total, 1), total, sample


def evaluate(model, config, name):
    """Exact-match rows of `model` on the held-out tasks.

    Returns:
        A list of dicts: model, task, language ("-" for vqa), images
        ("real" or "blank"), exact_match, examples.
    """
    cases = []
    for language in config.languages:
        ds = vlm_tasks.caption_dataset(
            "test",
            (language,),
            config.prompt_length,
            config.target_length,
            config.data_dir,
        )
        if config.eval_images is not None:
            ds = ds.take(config.eval_images)
        cases.append(("caption", language, ds.cache()))
    if config.vqa_eval_images:
        ds = vlm_tasks.vqa_dataset(
            "test",
            config.prompt_length,
            config.target_length,
            data_dir=config.data_dir,
        )
        count = config.vqa_eval_images * len(vlm_tasks.QUESTIONS)
        cases.append(("vqa", "-", ds.take(count).cache()))
    conditions = ("real", "blank") if config.blank_images else ("real",)
    tokenizer = data.tokenizer(config.data_dir)
    rows = []
    for task, language, ds in cases:
        for images in conditions:
            score, count, (generated, target) = exact_match(
                model,
                ds,
                config.target_length + 1,
                blank=images == "blank",
            )
            rows.append(
                {
                    "model": name,
                    "task": task,
                    "language": language,
                    "images": images,
                    "exact_match": round(score, 4),
                    "examples": count,
                }
            )
            print(
                f"  {name} {task} {language} {images}: exact match "
                f"{score:.3f} on {count}; e.g. "
                f"{_text(tokenizer, generated)!r} for "
                f"{_text(tokenizer, target)!r}",
                flush=True,
            )
    return rows


def _text(tokenizer, ids):
    ids = [i for i in ids if 2 < i < data.SENTENCEPIECE_VOCAB_SIZE]
    return tokenizer.detokenize(np.array(ids, np.int32)).numpy().decode()


def train_and_evaluate(config):
    """One run of the experiment (see the module docstring)."""
    seconds = {}
    tic = time.perf_counter()
    # Seed first: tf.random.set_seed clears TensorFlow's resources, which
    # breaks the SentencePiece tokenizers of datasets made before it.
    keras.utils.set_random_seed(config.seed)
    dataset = vlm_tasks.mixture_dataset(
        config.batch_size,
        config.rates,
        config.languages,
        config.prompt_length,
        config.target_length,
        config.seed,
        config.data_dir,
    )
    model = build_model(config)
    print(
        f"VLM of {model.count_params():,} parameters, mixture "
        f"{vlm_tasks.check_rates(config.rates)}, languages "
        f"{','.join(config.languages)}",
        flush=True,
    )
    losses = {"dense": train(model, dataset, config.steps, config, "dense ")}
    seconds["train_dense"] = time.perf_counter() - tic
    tic = time.perf_counter()
    rows = evaluate(model, config, "dense")
    seconds["evaluate_dense"] = time.perf_counter() - tic
    models = {"dense": model}
    if config.upcycle:
        tic = time.perf_counter()
        upcycled = upcycling.upcycle(
            model, config.num_experts, seed=config.seed
        )
        print(upcycling.summarize(model, upcycled), flush=True)
        # The paper continues the dense run's optimizer: Adam's moments
        # (tiled to the experts), step count and learning-rate schedule.
        optimizer = upcycling.upcycle_optimizer(
            model.optimizer, model, upcycled
        )
        losses["upcycled"] = train(
            upcycled,
            dataset,
            config.upcycle_steps,
            config,
            "upcycled ",
            optimizer,
        )
        seconds["train_upcycled"] = time.perf_counter() - tic
        tic = time.perf_counter()
        rows += evaluate(upcycled, config, "upcycled")
        seconds["evaluate_upcycled"] = time.perf_counter() - tic
        models["upcycled"] = upcycled
    for row in rows:
        row["seed"] = config.seed
    return VlmResult(rows=rows, losses=losses, models=models, seconds=seconds)


def summary_rows(rows):
    """Mean ± std over seeds of exact match, real and blank side by side."""
    keys = ("model", "task", "language")
    summary = common.aggregate(rows, keys + ("images",), ("exact_match",))
    table = {}
    for row in summary:
        entry = table.setdefault(
            tuple(row[k] for k in keys), {k: row[k] for k in keys}
        )
        entry["seeds"] = row["n"]
        entry[f"{row['images']}"] = row["exact_match"]
        entry[f"{row['images']}_std"] = row["exact_match_std"]
        entry[f"{row['images']}_text"] = common.format_mean_std(
            row["exact_match"], row["exact_match_std"]
        )
    return list(table.values())


def write_results(output_dir, rows, losses_by_seed, extra_lines=()):
    """Writes results.csv, results.md, exact_match.png and loss.png."""
    common.write_csv(os.path.join(output_dir, "results.csv"), rows)
    summary = summary_rows(rows)
    blank = all("blank" in row for row in summary)
    columns = ["model", "task", "language", "seeds", "real_text"]
    headers = ["model", "task", "language", "seeds", "exact match"]
    if blank:
        columns.append("blank_text")
        headers.append("exact match, blank images")
    lines = [
        "# Vision-language model on the digits task mixture",
        "",
        "Exact match of greedy generations on held-out images (mean ± std "
        "over seeds).",
        "",
        common.markdown_table(summary, columns, headers),
        *extra_lines,
    ]
    write_text(os.path.join(output_dir, "results.md"), "\n".join(lines) + "\n")
    for row in summary:
        row["label"] = f"{row['model']} {row['task']} {row['language']}"
    metrics = ["real"] + (["blank"] if blank else [])
    common.plot_bars(
        summary,
        "label",
        metrics,
        os.path.join(output_dir, "exact_match.png"),
        titles=["exact match", "exact match, blank images"][: len(metrics)],
    )
    _plot_losses(losses_by_seed, os.path.join(output_dir, "loss.png"))


def _plot_losses(losses_by_seed, path):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axis = pyplot.subplots(figsize=(5.0, 3.5))
    for seed, losses in losses_by_seed.items():
        offset = 0
        for index, (name, points) in enumerate(losses.items()):
            steps = [offset + step for step, _ in points]
            axis.plot(
                steps,
                [loss for _, loss in points],
                color=f"C{index}",
                alpha=0.8,
                label=f"{name}" if seed == min(losses_by_seed) else None,
            )
            offset = steps[-1]
    axis.set_xlabel("training step")
    axis.set_ylabel("mixture loss")
    axis.set_yscale("log")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    common.save_figure(figure, path)


def check_output_dir(output_dir):
    """Raises ValueError when `output_dir` exists and is not a directory."""
    output_dir = os.fspath(output_dir)
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(
            f"output_dir={output_dir!r} is an existing file, not a directory"
        )


def train_vlm(output_dir, config):
    """One run, its files (see the module docstring) and saved models.

    Returns:
        The `VlmResult`.
    """
    output_dir = common.prepare_output_dir(output_dir)
    start = time.perf_counter()
    result = train_and_evaluate(config)
    wall = time.perf_counter() - start
    write_results(
        output_dir,
        result.rows,
        {config.seed: result.losses},
        _run_lines(config, result.seconds, wall),
    )
    for name, model in result.models.items():
        path = os.path.join(output_dir, f"vlm_{name}.keras")
        save_keras(model, path)
    print(f"Done in {wall:.0f} s; results in {output_dir}", flush=True)
    return result


def _run_lines(config, seconds, wall):
    phases = ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
    return [
        "",
        f"Steps {config.steps} (batch {config.batch_size})"
        + (
            f", then upcycled to {config.num_experts} experts and trained "
            f"{config.upcycle_steps} steps"
            if config.upcycle
            else ""
        )
        + f"; mixture {vlm_tasks.check_rates(config.rates)}. Wall time "
        f"{wall:.0f} s ({phases}).",
    ]


def run(output_dir, seeds=(0, 1, 2), small=False, options=None):
    """The `keras_moe.experiments` contract: one run per seed.

    Args:
        output_dir: where the files go.
        seeds: one run each.
        small: the CI smoke size.
        options: may hold "num_experts" (the runs then upcycle).

    Returns:
        {"rows": result rows, "summary": summary rows}.
    """
    from keras_moe.experiments import check_options

    options = check_options(NAME, options, SUPPORTED_OPTIONS)
    seeds = common.check_seeds(seeds)
    overrides = {}
    if "num_experts" in options:
        overrides = {"upcycle": True, "num_experts": options["num_experts"]}
    make = VlmConfig.small if small else VlmConfig
    make(**overrides)  # validates before any work
    output_dir = common.prepare_output_dir(output_dir)
    losses = {}
    start = time.perf_counter()

    def one(seed):
        result = train_and_evaluate(make(seed=seed, **overrides))
        losses[seed] = result.losses
        return result.rows

    rows = common.for_each_seed(seeds, one, label="vlm ")
    wall = time.perf_counter() - start
    write_results(
        output_dir,
        rows,
        losses,
        ["", f"Seeds {list(seeds)}; wall time {wall:.0f} s."],
    )
    return {"rows": rows, "summary": summary_rows(rows)}
