"""The small vision-language model trained as PaLI-X builds it.

PaLI-X (Chen et al., 2023) starts from a pre-trained ViT and a pre-trained
encoder-decoder language model, trains the mixture with the ViT frozen
(stage 1), then raises the image resolution and trains everything,
ViT included (stage 2). This experiment follows that recipe at the size
of the embedded data:

1. Pre-training (short, from scratch, our own runs): a ViT classifier of
   the `digits` train images at the stage-1 resolution
   (`vlm_tasks.classification_dataset`), and a T5 by span corruption of
   `pydoc_corpus`. Each is written with `save_to_preset` and read back
   through `keras_moe.checkpoints.read_vlm_checkpoints`
   (`read_checkpoint` of each), which builds the
   `VisionLanguageModel` (head dropped, projection new). Given
   `vit_checkpoint` and `t5_checkpoint`, those are read instead and
   nothing is pre-trained.
2. Stage 1: the mixture of `keras_moe.data.vlm_tasks` (digit captions in
   four languages, questions about two-digit images, two multi-image
   tasks: few-shot captioning and "which image shows 7?", text-only span
   corruption) with the ViT
   frozen, at `stage1_image_size` (4 x 8: the 8 x 16 canvas area-averaged
   2 x 2).
3. Stage 2: `VisionLanguageModel.with_image_size` to `stage2_image_size`
   (the native 8 x 16 canvas; the ViT's position embedding interpolated
   to the 4x larger patch grid), ViT unfrozen, a new optimizer.
4. With `upcycle`: the stage-2 model is upcycled (`keras_moe.upcycle`, the
   paper's every-other-block recipe in the ViT, the T5 encoder and the T5
   decoder) and trained `upcycle_steps` more, continuing the stage-2
   optimizer (`keras_moe.upcycle_optimizer`); the dense stage-2 model is
   trained the same steps with its own optimizer, so the two arms differ
   only in the MoE blocks.

Every model is scored by exact match on held-out images (the greedy
generation, cut at its first end-of-sequence id, equals the target ids):
captions of every `digits` test image in each language (or the first
`eval_images`), the first `vqa_eval_images` `composed_digits` test images
with every question, and `eval_episodes` episodes of each multi-image
task drawn from the `digits` test images. Each is scored with the real
images and, as a control, with every image replaced by zeros ("blank"): a
model that reads its images falls to the rate of guessing from the prompt
alone.
Paired differences (the same examples scored by two models, or by one
model with real and blank images) are reported with the standard error
of the mean of the per-example differences.

Entry points:

* `train_and_evaluate(config)`: one run (one seed); returns the result
  rows, paired differences and the trained models. `train_vlm` runs it and
  also writes the files below.
* `run(output_dir, seeds, small, options)`: the contract of
  `keras_moe.experiments` (experiment "vlm"), one run per seed;
  `options` may hold `num_experts` (then the runs upcycle).

Files written to the output directory (atomically): `results.csv` (one
row per seed, model, task, language and image condition), `paired.csv`
(paired differences), `pretraining.csv` (held-out scores of the
pre-trained ViT and T5), `results.md` (the tables, mean ± std over
seeds), `exact_match.png` (with and without images) and `loss.png`
(training loss of every phase). With `model_dir`, the pre-trained
checkpoints and the trained models (`vlm_<model>.keras`) go there.

Example:

    result = train_and_evaluate(VlmConfig.small(languages=("en", "de")))
    result.rows[0]  # {"model": "stage1", "task": "caption", ...}
"""

import dataclasses
import os
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf

from keras_moe import data
from keras_moe import upcycling
from keras_moe.checkpoints import read_vlm_checkpoints
from keras_moe.data import vlm_tasks
from keras_moe.data.specs import CLASSIFICATION
from keras_moe.evaluation.sequences import exact_matches
from keras_moe.evaluation.sequences import until_eos
from keras_moe.experiments import common
from keras_moe.models.t5 import T5
from keras_moe.models.vit import ViT
from keras_moe.models.vlm import VisionLanguageModel
from keras_moe.training.fit import compile_for_task
from keras_moe.utils.checks import check_int
from keras_moe.utils.files import save_keras
from keras_moe.utils.files import write_text

NAME = "vlm"
SUPPORTED_OPTIONS = ("num_experts",)
STAGE1_IMAGE_SIZE = (4, 8)
STAGE2_IMAGE_SIZE = tuple(vlm_tasks.IMAGE_SHAPE[:2])
# The ViT's kwargs but its image size (each stage's).
VISION = dict(
    patch_size=2,
    num_channels=vlm_tasks.IMAGE_SHAPE[2],
    model_dim=64,
    num_heads=4,
    hidden_dim=128,
    num_layers=3,
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
MODELS = ("stage1", "stage2", "continued", "upcycled")
# --small: a CI smoke run, not a meaningful result.
_SMALL = dict(
    vit_pretrain_steps=10,
    t5_pretrain_steps=10,
    stage1_steps=10,
    stage2_steps=10,
    upcycle_steps=10,
    batch_size=16,
    eval_images=24,
    vqa_eval_images=8,
    eval_episodes=24,
    vision=dict(VISION, model_dim=32, hidden_dim=64, num_layers=2),
    text=dict(TEXT, model_dim=32, head_dim=8, hidden_dim=64),
)
_EVAL_BATCH = 256
_EVAL_SEED = 0  # of the held-out episodes, whatever the run's seed
_T5_PRETRAIN_LENGTH = 48


@dataclasses.dataclass(frozen=True)
class VlmConfig:
    """One training run (see the module docstring).

    Attributes:
        languages: captioning languages (tags of `vlm_tasks.LANGUAGES`).
        rates: {task: sampling rate} of the mixture.
        vit_pretrain_steps: steps of the ViT classifier's pre-training.
        t5_pretrain_steps: steps of the T5's span-corruption pre-training.
        stage1_steps: mixture steps with the ViT frozen.
        stage2_steps: mixture steps at the higher resolution, ViT trained.
        batch_size: examples per step (every phase).
        learning_rate: peak Adam learning rate of pre-training and stage 1
            (linear warm-up over 5% of the steps, cosine decay to 10%).
        stage2_learning_rate: the same for stage 2.
        stage1_image_size, stage2_image_size: (height, width) of the
            images in each stage.
        upcycle: upcycle the stage-2 model and train it further, beside
            the dense stage-2 model trained as far.
        num_experts: E of the upcycled blocks.
        upcycle_steps: steps of both continuation arms (at the stage-2
            run's final learning rate, its optimizer state continued).
        blank_images: also score with the images replaced by zeros.
        prompt_length, target_length: P and U of the task examples.
        eval_images: captioning test images scored (None: all 360).
        vqa_eval_images: composed test images scored, each with every
            question.
        eval_episodes: held-out episodes of each multi-image task
            ("fewshot", "which") scored.
        vision, text: the ViT (without image_size) and T5 kwargs.
        vit_checkpoint, t5_checkpoint: dense checkpoints to start from
            instead of pre-training (both or neither); the ViT must take
            `stage1_image_size` images.
        model_dir: where the pre-trained checkpoints and the trained
            models are written (None: the checkpoints go to a temporary
            directory and the models are not saved).
        jit_compile: XLA-compile the training steps.
        seed: of the weights, the data order and the training episodes.
        data_dir: TFDS data directory (None: the default).
    """

    languages: tuple = ("en", "fr", "de", "es")
    rates: dict = dataclasses.field(
        default_factory=lambda: dict(vlm_tasks.DEFAULT_RATES)
    )
    vit_pretrain_steps: int = 600
    t5_pretrain_steps: int = 600
    stage1_steps: int = 800
    stage2_steps: int = 800
    batch_size: int = 64
    learning_rate: float = 2e-3
    stage2_learning_rate: float = 5e-4
    stage1_image_size: tuple = STAGE1_IMAGE_SIZE
    stage2_image_size: tuple = STAGE2_IMAGE_SIZE
    upcycle: bool = False
    num_experts: int = 8
    upcycle_steps: int = 300
    blank_images: bool = True
    prompt_length: int = 24
    target_length: int = 8
    eval_images: int | None = None
    vqa_eval_images: int = 200
    eval_episodes: int = 300
    vision: dict = dataclasses.field(default_factory=lambda: dict(VISION))
    text: dict = dataclasses.field(default_factory=lambda: dict(TEXT))
    vit_checkpoint: str | None = None
    t5_checkpoint: str | None = None
    model_dir: str | None = None
    jit_compile: bool = False
    seed: int = 0
    data_dir: str | None = None

    def __post_init__(self):
        object.__setattr__(
            self, "languages", vlm_tasks.check_languages(self.languages)
        )
        vlm_tasks.check_rates(self.rates)
        for name in (
            "vit_pretrain_steps",
            "t5_pretrain_steps",
            "stage1_steps",
            "stage2_steps",
            "batch_size",
            "num_experts",
            "upcycle_steps",
        ):
            check_int(name, getattr(self, name), 1)
        for name in ("prompt_length", "target_length"):
            check_int(name, getattr(self, name), 2)
        check_int("vqa_eval_images", self.vqa_eval_images, 0)
        check_int("eval_episodes", self.eval_episodes, 0)
        if self.eval_images is not None:
            check_int("eval_images", self.eval_images, 1)
        for name in ("learning_rate", "stage2_learning_rate"):
            if not getattr(self, name) > 0:
                raise ValueError(
                    f"{name} must be > 0; received {getattr(self, name)!r}"
                )
        for name in ("stage1_image_size", "stage2_image_size"):
            size = vlm_tasks.check_image_size(getattr(self, name))
            patch = self.vision.get("patch_size", VISION["patch_size"])
            if size[0] % patch or size[1] % patch:
                raise ValueError(
                    f"{name}={size} is not a multiple of the ViT's patch "
                    f"size {patch}"
                )
            object.__setattr__(self, name, size)
        if "image_size" in self.vision:
            raise ValueError(
                "vision must not set image_size: each stage sets it "
                "(stage1_image_size, stage2_image_size)"
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
        if self.model_dir is not None:
            path = os.fspath(self.model_dir)
            if os.path.exists(path) and not os.path.isdir(path):
                raise ValueError(
                    f"model_dir={path!r} is an existing file, not a directory"
                )

    @classmethod
    def small(cls, **overrides):
        """The CI smoke size, with `overrides`."""
        return cls(**{**_SMALL, **overrides})


@dataclasses.dataclass
class VlmResult:
    """What `train_and_evaluate` returns.

    Attributes:
        rows: exact-match rows (see `evaluate`), with "seed" added.
        paired: paired-difference rows (see `paired_differences`).
        pretraining: rows of the pre-trained models' held-out scores.
        losses: {phase: [(step, mean training loss)]}.
        models: {model name: the trained Keras model}.
        seconds: {phase: wall seconds}.
    """

    rows: list
    paired: list
    pretraining: list
    losses: dict
    models: dict
    seconds: dict


def _schedule(peak, steps):
    """Linear warm-up over 5% of `steps`, cosine decay to 10% of `peak`."""
    warmup = max(1, steps // 20)
    return keras.optimizers.schedules.CosineDecay(
        0.0,
        decay_steps=max(1, steps - warmup),
        alpha=0.1,
        warmup_target=peak,
        warmup_steps=warmup,
    )


def _compile(model, config, steps, optimizer=None, peak=None, metrics=()):
    if optimizer is None:
        peak = config.learning_rate if peak is None else peak
        optimizer = keras.optimizers.Adam(_schedule(peak, steps))
    # CLASSIFICATION's loss per target token: the mean over all B x U
    # positions, padding weighted 0 (not TRANSLATION's mean over the real
    # tokens).
    compile_for_task(
        model,
        CLASSIFICATION,
        optimizer=optimizer,
        metrics=list(metrics),
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


def train(model, dataset, steps, config, label="", optimizer=None, peak=None):
    """Trains `model` for `steps` batches of the repeated `dataset`.

    Args:
        model: the model.
        dataset: `(inputs, targets[, weights])` batches, repeated.
        steps: training steps.
        config: a `VlmConfig`.
        label: printed before the progress lines.
        optimizer: None for a new Adam (warm-up, cosine decay over
            `steps` from `peak`), or an optimizer to continue with.
        peak: the new Adam's peak learning rate (None: the config's).

    Returns:
        [(step, mean loss of the steps since the previous entry)], about
        20 entries.
    """
    _compile(model, config, steps, optimizer, peak)
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


def pretrain_vit(config, path):
    """Pre-trains the ViT classifier of the digits at stage-1 resolution
    and writes it to `path` (`save_to_preset`).

    Returns:
        (training losses, held-out accuracy on the 360 test digits).
    """
    keras.utils.set_random_seed(config.seed)
    size = config.stage1_image_size
    vit = ViT(**config.vision, image_size=list(size), num_classes=10)
    train_ds = (
        vlm_tasks.classification_dataset("train", size, config.data_dir)
        .cache()
        .shuffle(2_000, seed=config.seed)
        .repeat()
        .batch(config.batch_size, drop_remainder=True)
        .prefetch(tf.data.AUTOTUNE)
    )
    losses = train(
        vit, train_ds, config.vit_pretrain_steps, config, "vit pre-training "
    )
    test_ds = vlm_tasks.classification_dataset(
        "test", size, config.data_dir
    ).batch(_EVAL_BATCH)
    hits = total = 0
    for images, labels in test_ds.as_numpy_iterator():
        logits = keras.ops.convert_to_numpy(vit(images))
        hits += int((logits.argmax(-1) == labels).sum())
        total += len(labels)
    accuracy = hits / total
    print(f"  ViT test accuracy {accuracy:.3f} on {total}", flush=True)
    vit.save_to_preset(path)
    return losses, accuracy, total


def pretrain_t5(config, path):
    """Pre-trains the T5 by span corruption of `pydoc_corpus` and writes
    it to `path` (`save_to_preset`).

    Returns:
        (training losses, held-out token accuracy of the span targets on
        the validation split, tokens scored).
    """
    keras.utils.set_random_seed(config.seed)
    t5 = T5(**config.text)

    def batches(split, repeat):
        return data.span_corruption_dataset(
            split,
            config.batch_size,
            input_length=_T5_PRETRAIN_LENGTH,
            seed=config.seed,
            # The corpus in order, new noise masks on every pass: a
            # shuffle buffer of the whole corpus costs more than the
            # short pre-training itself.
            shuffle=False,
            repeat=repeat,
            drop_remainder=repeat,
            data_dir=config.data_dir,
        )

    losses = train(
        t5,
        batches("train", True),
        config.t5_pretrain_steps,
        config,
        "t5 pre-training ",
    )
    hits = total = 0
    for inputs, targets in batches("validation", False).take(8):
        logits = keras.ops.convert_to_numpy(t5(inputs))
        real = targets.numpy() != data.PAD_ID
        hits += int(((logits.argmax(-1) == targets.numpy()) & real).sum())
        total += int(real.sum())
    accuracy = hits / max(total, 1)
    print(
        f"  T5 validation span-target token accuracy {accuracy:.3f} on "
        f"{total} tokens",
        flush=True,
    )
    t5.save_to_preset(path)
    return losses, accuracy, total


def build_model(config, vit_path, t5_path):
    """The stage-1 model: the dense checkpoints read back, ViT frozen."""
    model = read_vlm_checkpoints(
        vit_path,
        t5_path,
        image_token_id=vlm_tasks.IMAGE_TOKEN_ID,
        max_prompt_length=config.prompt_length,
        freeze_vision=True,
    )
    shape = tuple(model.image_shape)
    want = (*config.stage1_image_size, vlm_tasks.IMAGE_SHAPE[2])
    if shape != want:
        raise ValueError(
            f"The ViT checkpoint takes {shape} images; stage 1 makes {want} "
            "images (stage1_image_size)"
        )
    if model.language_model.vocab_size < data.VOCAB_SIZE:
        raise ValueError(
            "The T5 checkpoint's vocabulary "
            f"({model.language_model.vocab_size}) is smaller than the "
            f"task vocabulary ({data.VOCAB_SIZE})"
        )
    return model


def exact_match(model, dataset, max_length, blank=False):
    """(per-example hits <bool>[n], one (generated, target) id pair).

    Args:
        model: a `VisionLanguageModel`.
        dataset: unbatched `(inputs, targets)` task examples.
        max_length: L of the generation (start id included).
        blank: replace the images by zeros (image masks kept).
    """
    hits = []
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
        hits.extend(exact_matches(generated, targets))
        if sample is None:
            sample = (until_eos(generated[0]), until_eos(targets[0]))
    return np.array(hits, bool), sample


def evaluation_cases(config, image_size):
    """[(task, language, held-out examples)] at `image_size`."""
    cases = []
    for language in config.languages:
        ds = vlm_tasks.caption_dataset(
            "test",
            (language,),
            config.prompt_length,
            config.target_length,
            config.data_dir,
            image_size=image_size,
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
            image_size=image_size,
        )
        count = config.vqa_eval_images * len(vlm_tasks.QUESTIONS)
        cases.append(("vqa", "-", ds.take(count).cache()))
    if config.eval_episodes:
        ds = vlm_tasks.fewshot_dataset(
            "test",
            config.languages,
            config.prompt_length,
            config.target_length,
            episodes=config.eval_episodes,
            seed=_EVAL_SEED,
            data_dir=config.data_dir,
            image_size=image_size,
        )
        cases.append(("fewshot", "-", ds.cache()))
        ds = vlm_tasks.which_dataset(
            "test",
            config.prompt_length,
            config.target_length,
            episodes=config.eval_episodes,
            seed=_EVAL_SEED,
            data_dir=config.data_dir,
            image_size=image_size,
        )
        cases.append(("which", "-", ds.cache()))
    return cases


def evaluate(model, config, name, image_size, hits_out):
    """Exact-match rows of `model` on the held-out tasks.

    Args:
        model: a `VisionLanguageModel` taking `image_size` images.
        config: the `VlmConfig`.
        name: the model's name in the rows.
        image_size: (height, width) of the held-out images.
        hits_out: a dict that receives the per-example hits, keyed
            (model, task, language, images).

    Returns:
        A list of dicts: model, task, language ("-" but for captions),
        images ("real" or "blank"), exact_match, examples.
    """
    conditions = ("real", "blank") if config.blank_images else ("real",)
    tokenizer = data.tokenizer(config.data_dir)
    rows = []
    for task, language, ds in evaluation_cases(config, image_size):
        for images in conditions:
            hits, (generated, target) = exact_match(
                model,
                ds,
                config.target_length + 1,
                blank=images == "blank",
            )
            hits_out[(name, task, language, images)] = hits
            score = float(hits.mean()) if len(hits) else 0.0
            rows.append(
                {
                    "model": name,
                    "task": task,
                    "language": language,
                    "images": images,
                    "exact_match": round(score, 4),
                    "examples": len(hits),
                }
            )
            print(
                f"  {name} {task} {language} {images}: exact match "
                f"{score:.3f} on {len(hits)}; e.g. "
                f"{_text(tokenizer, generated)!r} for "
                f"{_text(tokenizer, target)!r}",
                flush=True,
            )
    return rows


def _text(tokenizer, ids):
    ids = [i for i in ids if 2 < i < data.SENTENCEPIECE_VOCAB_SIZE]
    return tokenizer.detokenize(np.array(ids, np.int32)).numpy().decode()


def paired_difference(first, second):
    """Mean and standard error of `first - second`, per-example hits of
    the same examples (<bool>[n] each).

    The standard error is std(d, ddof=1) / sqrt(n) over the n per-example
    differences d in {-1, 0, 1}: the spread of the held-out examples, not
    of training runs.

    Example:

    >>> paired_difference([1, 1, 0, 1], [0, 1, 0, 0])
    (0.5, 0.2886751345948129, 4)
    """
    first = np.asarray(first, np.float64)
    second = np.asarray(second, np.float64)
    if first.shape != second.shape or first.ndim != 1:
        raise ValueError(
            "Paired hits must be two vectors of one length; received "
            f"shapes {first.shape} and {second.shape}"
        )
    count = len(first)
    if count == 0:
        raise ValueError("Paired hits need at least one example; received 0")
    diff = first - second
    error = float(diff.std(ddof=1) / np.sqrt(count)) if count > 1 else 0.0
    return float(diff.mean()), error, count


def paired_differences(hits):
    """Rows of the paired comparisons the hits allow.

    Compared on the same held-out examples: stage 2 against stage 1,
    upcycled against continued (real images), and each model with real
    against blank images.
    """
    comparisons = [("stage2", "real", "stage1", "real")]
    comparisons.append(("upcycled", "real", "continued", "real"))
    comparisons += [(m, "real", m, "blank") for m in MODELS]
    rows = []
    for first, first_images, second, second_images in comparisons:
        for name, task, language, images in list(hits):
            if (name, images) != (first, first_images):
                continue
            other = hits.get((second, task, language, second_images))
            if other is None:
                continue
            mean, error, count = paired_difference(
                hits[(name, task, language, images)], other
            )
            rows.append(
                {
                    "comparison": f"{first} {first_images} - "
                    f"{second} {second_images}",
                    "task": task,
                    "language": language,
                    "difference": round(mean, 4),
                    "standard_error": round(error, 4),
                    "examples": count,
                }
            )
    return rows


def _checkpoints(config, directory):
    """(vit path, t5 path, pre-training rows, losses, seconds)."""
    if config.vit_checkpoint is not None:
        return config.vit_checkpoint, config.t5_checkpoint, [], {}, {}
    vit_path = os.path.join(directory, "pretrained_vit")
    t5_path = os.path.join(directory, "pretrained_t5")
    tic = time.perf_counter()
    vit_losses, vit_accuracy, images = pretrain_vit(config, vit_path)
    seconds = {"pretrain_vit": time.perf_counter() - tic}
    tic = time.perf_counter()
    t5_losses, t5_accuracy, tokens = pretrain_t5(config, t5_path)
    seconds["pretrain_t5"] = time.perf_counter() - tic
    rows = [
        {
            "model": "vit",
            "objective": "digit classification, "
            f"{config.stage1_image_size[0]}x{config.stage1_image_size[1]}",
            "steps": config.vit_pretrain_steps,
            "metric": "test accuracy",
            "value": round(vit_accuracy, 4),
            "examples": images,
        },
        {
            "model": "t5",
            "objective": "span corruption of pydoc_corpus",
            "steps": config.t5_pretrain_steps,
            "metric": "validation token accuracy",
            "value": round(t5_accuracy, 4),
            "examples": tokens,
        },
    ]
    losses = {"vit pre-training": vit_losses, "t5 pre-training": t5_losses}
    return vit_path, t5_path, rows, losses, seconds


def _mixture(config, image_size):
    return vlm_tasks.mixture_dataset(
        config.batch_size,
        config.rates,
        config.languages,
        config.prompt_length,
        config.target_length,
        config.seed,
        config.data_dir,
        image_size=image_size,
    )


def train_and_evaluate(config):
    """One run of the experiment (see the module docstring)."""
    # Seed first: tf.random.set_seed clears TensorFlow's resources, which
    # breaks the SentencePiece tokenizers of datasets made before it.
    keras.utils.set_random_seed(config.seed)
    if config.model_dir is not None:
        directory = common.prepare_output_dir(config.model_dir)
        return _train_and_evaluate(config, directory)
    with tempfile.TemporaryDirectory(prefix="vlm_pretrained_") as directory:
        return _train_and_evaluate(config, directory)


def _train_and_evaluate(config, directory):
    vit_path, t5_path, pretraining, losses, seconds = _checkpoints(
        config, directory
    )
    keras.utils.set_random_seed(config.seed)
    model = build_model(config, vit_path, t5_path)
    print(
        f"VLM of {model.count_params():,} parameters, mixture "
        f"{vlm_tasks.check_rates(config.rates)}, languages "
        f"{','.join(config.languages)}",
        flush=True,
    )
    hits = {}
    tic = time.perf_counter()
    stage1 = _mixture(config, config.stage1_image_size)
    losses["stage1"] = train(
        model, stage1, config.stage1_steps, config, "stage 1 "
    )
    seconds["stage1"] = time.perf_counter() - tic
    tic = time.perf_counter()
    rows = evaluate(model, config, "stage1", config.stage1_image_size, hits)
    seconds["evaluate_stage1"] = time.perf_counter() - tic
    models = {"stage1": model}

    tic = time.perf_counter()
    model = VisionLanguageModel.with_image_size(
        model, list(config.stage2_image_size), freeze_vision=False
    )
    stage2 = _mixture(config, config.stage2_image_size)
    losses["stage2"] = train(
        model,
        stage2,
        config.stage2_steps,
        config,
        "stage 2 ",
        peak=config.stage2_learning_rate,
    )
    seconds["stage2"] = time.perf_counter() - tic
    tic = time.perf_counter()
    rows += evaluate(model, config, "stage2", config.stage2_image_size, hits)
    seconds["evaluate_stage2"] = time.perf_counter() - tic
    models["stage2"] = model

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
            stage2,
            config.upcycle_steps,
            config,
            "upcycled ",
            optimizer,
        )
        seconds["train_upcycled"] = time.perf_counter() - tic
        tic = time.perf_counter()
        continued = VisionLanguageModel.from_config(model.get_config())
        continued.set_weights(model.get_weights())
        # The same optimizer state as the upcycled arm starts from.
        optimizer = keras.optimizers.Adam.from_config(
            model.optimizer.get_config()
        )
        optimizer.build(continued.trainable_variables)
        for mine, theirs in zip(optimizer.variables, model.optimizer.variables):
            mine.assign(theirs)
        losses["continued"] = train(
            continued,
            stage2,
            config.upcycle_steps,
            config,
            "continued ",
            optimizer,
        )
        seconds["train_continued"] = time.perf_counter() - tic
        tic = time.perf_counter()
        size = config.stage2_image_size
        rows += evaluate(continued, config, "continued", size, hits)
        rows += evaluate(upcycled, config, "upcycled", size, hits)
        seconds["evaluate_continued_upcycled"] = time.perf_counter() - tic
        models["continued"] = continued
        models["upcycled"] = upcycled
    if config.model_dir is not None:
        for name, trained in models.items():
            save_keras(trained, os.path.join(directory, f"vlm_{name}.keras"))
    paired = paired_differences(hits)
    for row in rows + paired + pretraining:
        row["seed"] = config.seed
    return VlmResult(
        rows=rows,
        paired=paired,
        pretraining=pretraining,
        losses=losses,
        models=models,
        seconds=seconds,
    )


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


def paired_summary(paired):
    """Paired differences averaged over seeds (mean standard error)."""
    keys = ("comparison", "task", "language")
    summary = common.aggregate(
        paired, keys, ("difference", "standard_error", "examples")
    )
    for row in summary:
        row["seeds"] = row["n"]
        row["difference_text"] = f"{row['difference']:+.3f}"
        row["error_text"] = f"{row['standard_error']:.3f}"
        if row["n"] > 1:
            row[
                "difference_text"
            ] += f" (std over seeds {row['difference_std']:.3f})"
        row["examples"] = int(row["examples"])
    return summary


def write_results(
    output_dir, rows, paired, pretraining, losses_by_seed, extra_lines=()
):
    """Writes results.csv, paired.csv, pretraining.csv, results.md,
    exact_match.png and loss.png."""
    common.write_csv(os.path.join(output_dir, "results.csv"), rows)
    common.write_csv(os.path.join(output_dir, "paired.csv"), paired)
    if pretraining:
        common.write_csv(
            os.path.join(output_dir, "pretraining.csv"), pretraining
        )
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
        "over seeds). stage1: pre-trained ViT frozen, low resolution; "
        "stage2: higher resolution, ViT trained; continued / upcycled: "
        "stage2 trained further, dense or upcycled to MoE.",
        "",
        common.markdown_table(summary, columns, headers),
    ]
    if paired:
        lines += [
            "Paired differences of exact match on the same held-out "
            "examples (± the standard error over examples).",
            "",
            common.markdown_table(
                paired_summary(paired),
                [
                    "comparison",
                    "task",
                    "language",
                    "difference_text",
                    "error_text",
                    "examples",
                ],
                [
                    "comparison",
                    "task",
                    "language",
                    "difference",
                    "standard error",
                    "examples",
                ],
            ),
        ]
    if pretraining:
        pre = common.aggregate(
            pretraining, ("model", "objective", "steps", "metric"), ("value",)
        )
        for row in pre:
            row["value_text"] = common.format_mean_std(
                row["value"], row["value_std"]
            )
        lines += [
            "Pre-trained models (before the mixture), held-out scores.",
            "",
            common.markdown_table(
                pre,
                ["model", "objective", "steps", "metric", "value_text"],
                ["model", "objective", "steps", "metric", "value"],
            ),
        ]
    lines += list(extra_lines)
    write_text(os.path.join(output_dir, "results.md"), "\n".join(lines) + "\n")
    _plot_exact_match(
        summary, blank, os.path.join(output_dir, "exact_match.png")
    )
    _plot_losses(losses_by_seed, os.path.join(output_dir, "loss.png"))


def _plot_exact_match(summary, blank, path):
    """Grouped bars: one group per task (and language), one bar per model;
    a panel for real images and one for blank images."""
    pyplot = common._pyplot()
    cases = list(dict.fromkeys((r["task"], r["language"]) for r in summary))
    models = list(dict.fromkeys(r["model"] for r in summary))
    by_key = {(r["model"], r["task"], r["language"]): r for r in summary}
    panels = ["real"] + (["blank"] if blank else [])
    figure, axes = pyplot.subplots(
        1, len(panels), figsize=(5.5 * len(panels), 3.6), squeeze=False
    )
    width = 0.8 / len(models)
    for axis, panel in zip(axes[0], panels):
        for index, name in enumerate(models):
            found = [by_key.get((name, *case)) for case in cases]
            axis.bar(
                np.arange(len(cases)) + (index - (len(models) - 1) / 2) * width,
                [r[panel] if r else 0.0 for r in found],
                width,
                yerr=[r[f"{panel}_std"] if r else 0.0 for r in found],
                color=f"C{index}",
                capsize=2,
                label=name,
            )
        axis.set_xticks(np.arange(len(cases)))
        axis.set_xticklabels(
            [task if lang == "-" else f"{task} {lang}" for task, lang in cases],
            rotation=30,
            ha="right",
            fontsize=8,
        )
        axis.set_ylim(0, 1.05)
        axis.set_title(
            "exact match" + (", blank images" if panel == "blank" else ""),
            fontsize=10,
        )
        axis.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    figure.tight_layout()
    common.save_figure(figure, path)


def _plot_losses(losses_by_seed, path):
    """Training loss of every phase, each on its own step axis offset so
    that the phases follow each other (the two continuation arms both
    start where stage 2 ends)."""
    pyplot = common._pyplot()
    figure, axis = pyplot.subplots(figsize=(6.0, 3.6))
    first = min(losses_by_seed)
    for seed, losses in losses_by_seed.items():
        offset = 0
        for index, (name, points) in enumerate(losses.items()):
            if not points:
                continue
            start = offset
            steps = [start + step for step, _ in points]
            axis.plot(
                steps,
                [loss for _, loss in points],
                color=f"C{index}",
                alpha=0.8,
                label=name if seed == first else None,
            )
            if name not in ("upcycled", "continued"):
                offset = steps[-1]
    axis.set_xlabel("training step (phases in order)")
    axis.set_ylabel("training loss")
    axis.set_yscale("log")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
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
    """One run and its files (see the module docstring).

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
        result.paired,
        result.pretraining,
        {config.seed: result.losses},
        _run_lines(config, result.seconds, wall),
    )
    print(f"Done in {wall:.0f} s; results in {output_dir}", flush=True)
    return result


def _run_lines(config, seconds, wall):
    phases = ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
    pretraining = (
        f"ViT pre-trained {config.vit_pretrain_steps} steps, T5 "
        f"{config.t5_pretrain_steps} steps"
        if config.vit_checkpoint is None
        else f"ViT {config.vit_checkpoint}, T5 {config.t5_checkpoint}"
    )
    s1, s2 = config.stage1_image_size, config.stage2_image_size
    return [
        "",
        f"Seed {config.seed}. {pretraining}; stage 1 {config.stage1_steps} "
        f"steps at {s1[0]}x{s1[1]} (ViT frozen), stage 2 "
        f"{config.stage2_steps} steps at {s2[0]}x{s2[1]} (ViT trained); "
        f"batch {config.batch_size}"
        + (
            f"; then {config.upcycle_steps} more steps of the dense model "
            f"(continued) and of it upcycled to {config.num_experts} experts"
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
    losses, paired, pretraining = {}, [], []
    start = time.perf_counter()

    def one(seed):
        result = train_and_evaluate(make(seed=seed, **overrides))
        losses[seed] = result.losses
        paired.extend(result.paired)
        pretraining.extend(result.pretraining)
        return result.rows

    rows = common.for_each_seed(seeds, one, label="vlm ")
    wall = time.perf_counter() - start
    write_results(
        output_dir,
        rows,
        paired,
        pretraining,
        losses,
        ["", f"Seeds {list(seeds)}; wall time {wall:.0f} s."],
    )
    return {"rows": rows, "summary": summary_rows(rows)}
