"""Sparse upcycling of a T5 at small scale, at equal extra compute, on text
that does not repeat.

Reproduces the language claims of "Sparse Upcycling: Training
Mixture-of-Experts from Dense Checkpoints" (Komatsuzaki et al., 2023): a
dense `keras_moe.models.t5.T5` is pre-trained with T5's span-corruption
objective on `keras_moe.data.docstrings` (the English docstrings of the
standard library, NumPy, Keras, scikit-learn and TensorFlow: about 1.5M
words, 4.5M tokens of training text), each run of text read once, then
trained further for each extra budget beside (see
`upcycling_common.run_seed_converged`):

* the dense model, its learning-rate schedule continued;
* the upcycled MoE (expert choice in the encoder, token-choice top-2 in
  the decoder, no renormalisation) with the dense optimizer's state
  rescaled to each expert's share (`upcycle_optimizer(state="rescale")`),
  schedule continued;
* the upcycled MoE with the paper's language recipe for the optimizer:
  state reset (t5x's sparse upcycling drops it), schedule continued;
* dense upcycling by depth tiling (the paper's dense baseline), state and
  schedule continued;
* the MoE trained from scratch for (1 + budget) P.

Every evaluation is of a branch cooled down for 3% of P FLOPs. The text
does not repeat within a run of an arm: each seed draws one order of the
training runs; pre-training reads the first P runs, the continuing arms
the next ones (shared, so they see the same batches), the cooldowns a
reserve at the end; the MoE from scratch reads its own order (text the
dense model also read, each run once). `results.md` reports how many runs
each stream needed against the corpus.

Shape letters: B batch, T encoder length, U decoder length, V vocabulary
(`keras_moe.data.VOCAB_SIZE`).

Measurements per arm and budget:

* upstream: the span-corruption loss (mean cross-entropy per target
  token, nats) and token accuracy on held-out modules' docstrings
  (`docstrings` "validation"), with fixed noise masks;
* downstream, at the largest budget (every arm) and at +0% (the dense
  checkpoint and the MoE from scratch): naming
  (`docstrings.name_examples`: "name: Return the absolute value of the
  argument." -> "abs"), a task from modules no arm trained on. A copy of
  the cooled-down model is fine-tuned for a fixed number of steps (the
  same batches and fresh optimizer for every arm) and scored on held-out
  names by teacher-forced loss per target token and token accuracy. The
  same fine-tune from random initialisation is reported as the
  no-pre-training baseline. (Exact match of greedy generation is not
  reported: at this size no model, pre-trained or not, names a single
  held-out function exactly.)

Example (a smoke run of about a minute):

    from keras_moe.experiments import upcycle_t5
    upcycle_t5.run("/tmp/upcycle_t5", seeds=(0,), small=True)
"""

import time

import keras
import numpy as np
import tensorflow as tf

from keras_moe import data as data_lib
from keras_moe.data import docstrings
from keras_moe.data.pipelines import t5_features
from keras_moe.experiments import common
from keras_moe.experiments import upcycling_common as uc
from keras_moe.models import flops
from keras_moe.models.t5 import T5

NAME = "upcycle_t5"
SUPPORTED_OPTIONS = uc.SUPPORTED_OPTIONS
METRICS = {
    "heldout_loss": "held-out span-corruption loss (nats/token)",
    "heldout_accuracy": "held-out span-corruption token accuracy",
    "downstream_loss": "naming: held-out loss after fine-tune (nats/token)",
    "downstream_token_accuracy": "naming: token accuracy after fine-tune",
}
LOWER_IS_BETTER = ("heldout_loss", "downstream_loss")
# Measured after a fine-tune, at the largest budget (every arm) and at +0%
# (the arms of FINETUNED_AT_ZERO) only.
FINETUNE_METRICS = ("downstream_loss", "downstream_token_accuracy")
FINETUNED_AT_ZERO = ("dense", "moe_scratch")
# Noise-mask seed of the held-out span-corruption examples.
_HELDOUT_SEED = 12345
# Noise-mask seeds of the training streams: 1000 * seed + stream number.
_STREAMS = {"pretrain": 0, "continue": 1, "scratch": 2}
_COOLDOWN_STREAM = 10
# T5's span-corruption settings (`keras_moe.data` defaults).
_NOISE_DENSITY = 0.15
_MEAN_NOISE_SPAN_LENGTH = 3.0
# The naming task's prompt, and its longest kept sequences (tokens, EOS
# included): longer examples are left out (counted in results.md), never
# truncated.
NAMING_PROMPT = "name: "
NAMING_MAX_INPUT = 48
NAMING_MAX_TARGET = 12

_MODEL = dict(
    vocab_size=data_lib.VOCAB_SIZE,
    activation="relu",
    tie_embeddings=True,
    # No dropout: the text is not repeated (T5 1.1 and the paper's C4
    # runs use none).
    dropout_rate=0.0,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
)
CONFIGS = {
    "default": dict(
        model=dict(
            _MODEL,
            model_dim=64,
            num_heads=4,
            head_dim=16,
            hidden_dim=256,
            num_encoder_layers=2,
            num_decoder_layers=2,
        ),
        input_length=32,
        batch_size=32,
        pretrain_steps=1000,
        learning_rate=2e-3,
        warmup_steps=100,
        cooldown_fraction=0.03,
        heldout_examples=2048,
        finetune_steps=300,
        finetune_batch_size=32,
        finetune_learning_rate=1e-3,
        test_examples=None,
        tiled_arm=True,
        jit_compile=False,
    ),
    "small": dict(
        model=dict(
            _MODEL,
            model_dim=16,
            num_heads=2,
            head_dim=8,
            hidden_dim=32,
            num_encoder_layers=2,
            num_decoder_layers=2,
        ),
        input_length=24,
        batch_size=8,
        pretrain_steps=20,
        learning_rate=2e-3,
        warmup_steps=4,
        cooldown_fraction=0.1,
        heldout_examples=32,
        finetune_steps=4,
        finetune_batch_size=8,
        finetune_learning_rate=1e-3,
        test_examples=16,
        tiled_arm=True,
        jit_compile=False,
    ),
}


def _masked_mean(values, targets):
    """Mean of <[B, U]> `values` over the real (non-padding) targets."""
    mask = tf.cast(targets != data_lib.PAD_ID, values.dtype)
    return tf.reduce_sum(values * mask) / tf.maximum(tf.reduce_sum(mask), 1.0)


def _token_losses(logits, targets):
    return tf.nn.sparse_softmax_cross_entropy_with_logits(targets, logits)


def _loss(model, inputs, targets):
    logits = model(inputs, training=True)
    return _masked_mean(_token_losses(logits, targets), targets)


def _lengths(input_length):
    """(raw run length n, target length U) for encoder length T."""
    return data_lib.span_corruption_lengths(
        input_length, _NOISE_DENSITY, _MEAN_NOISE_SPAN_LENGTH
    )


def _sentencepiece():
    """The vocabulary's SentencePiece model, in Python.

    The text is tokenized once, in NumPy, by the `sentencepiece` package
    rather than by the shared TensorFlow tokenizer of `keras_moe.data`:
    its kernel resource does not survive `keras.utils.set_random_seed`
    (`tf.random.set_seed` clears TensorFlow's kernel cache).
    """
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(
        model_file=data_lib.sentencepiece_model_path()
    )


def token_runs(sp, split, raw_length):
    """<int32>[N, n] runs of n tokens of a `docstrings` split.

    The paragraphs are tokenized and concatenated in order, and the stream
    is cut into runs of n tokens (a last shorter run dropped), as
    `keras_moe.data.span_corruption_dataset` does.
    """
    stream = np.concatenate(
        [
            np.asarray(ids, np.int32)
            for ids in sp.encode(list(docstrings.paragraphs(split)))
        ]
    )
    count = len(stream) // raw_length
    return stream[: count * raw_length].reshape(count, raw_length)


def _corrupt_fn(input_length, seed):
    """`fn(position, tokens) -> (inputs, targets)`: span corruption of a
    run, its noise mask drawn from `seed` and the run's position in its
    stream (`keras_moe.data.noise_span_mask`, T5's noise density 0.15 and
    mean span length 3)."""
    raw_length, target_length = _lengths(input_length)

    def corrupt(position, tokens):
        mask = data_lib.noise_span_mask(
            raw_length,
            _NOISE_DENSITY,
            _MEAN_NOISE_SPAN_LENGTH,
            tf.stack([tf.constant(seed, tf.int64), position]),
        )
        inputs, targets = data_lib.corrupt_spans(tokens, mask)
        return t5_features(inputs, targets, input_length, target_length)

    return corrupt


def span_corruption(runs, input_length, seed):
    """Unbatched `(inputs, targets)` T5 examples of the rows of `runs`, in
    order, with the noise masks of `seed`."""
    return (
        tf.data.Dataset.from_tensor_slices(runs)
        .enumerate()
        .map(_corrupt_fn(input_length, seed))
    )


class TextStreams:
    """The training streams of a run: batches of span-corrupted runs of
    text, each run read at most once per stream.

    For seed s, one order of the N training runs is drawn; its last
    `cooldown_runs * cooldowns` runs are the cooldown reserve (block i for
    stream "cooldown/<i>"), its first `pretrain_runs` the "pretrain"
    stream, and the runs between them the "continue" stream, shared by
    every continuing arm. "scratch" reads every run but the reserve in an
    order of its own. A stream that runs out starts its runs again (a
    second epoch), which `run` reports; with the default sizes none does.

    Args:
        runs: <int32>[N, n] training runs.
        input_length: T.
        batch_size: B.
        pretrain_runs: runs of the dense pre-training.
        cooldown_runs: runs of one cooldown.
        cooldowns: cooldowns per arm (evaluated budgets).
    """

    def __init__(
        self,
        runs,
        input_length,
        batch_size,
        pretrain_runs,
        cooldown_runs,
        cooldowns,
    ):
        self.runs = tf.constant(runs)
        self.count = len(runs)
        self.input_length = input_length
        self.batch_size = batch_size
        self.pretrain_runs = pretrain_runs
        self.cooldown_runs = cooldown_runs
        self.reserve = cooldown_runs * cooldowns
        self.continue_runs = self.count - pretrain_runs - self.reserve
        if self.continue_runs < batch_size:
            raise ValueError(
                f"the corpus has {self.count} runs: too few for "
                f"{pretrain_runs} pre-training runs and a cooldown reserve "
                f"of {self.reserve}"
            )

    def indices(self, stream, seed):
        """<int64>[M] run indices of `stream` for `seed`, in read order."""
        order = np.random.default_rng([seed, 0]).permutation(self.count)
        body = order[: self.count - self.reserve]
        if stream == "pretrain":
            return body[: self.pretrain_runs]
        if stream == "continue":
            return body[self.pretrain_runs :]
        if stream == "scratch":
            return np.random.default_rng([seed, 1]).permutation(body)
        index = uc.cooldown_index(stream)
        start = self.count - self.reserve + index * self.cooldown_runs
        return order[start : start + self.cooldown_runs]

    def batches(self, stream, seed):
        """Endless batches `(inputs, targets)` of `stream` for `seed`."""
        number = (
            _STREAMS[stream]
            if stream in _STREAMS
            else _COOLDOWN_STREAM + uc.cooldown_index(stream)
        )
        indices = tf.constant(self.indices(stream, seed))
        runs = self.runs
        dataset = (
            tf.data.Dataset.from_tensor_slices(indices)
            .repeat()
            .map(lambda i: tf.gather(runs, i))
            .enumerate()
            .map(_corrupt_fn(self.input_length, 1000 * seed + number))
            .batch(self.batch_size, drop_remainder=True)
            .prefetch(2)
        )
        return iter(dataset)


def _heldout(sp, config):
    """The held-out span-corruption examples ("validation" modules), as one
    batch with fixed noise masks."""
    raw_length, _ = _lengths(config["input_length"])
    runs = token_runs(sp, "validation", raw_length)
    if config["heldout_examples"] is not None:
        runs = runs[: config["heldout_examples"]]
    dataset = span_corruption(runs, config["input_length"], _HELDOUT_SEED)
    return next(iter(dataset.batch(len(runs))))


def _pad(rows, length):
    """<int32>[N, length]: each row of ids followed by zeros."""
    out = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def naming_arrays(sp, split, limit=None):
    """The naming task's (inputs, targets) NumPy arrays of `split`.

    Inputs are `NAMING_PROMPT` + the summary line, targets the name's
    words, each EOS-ended and 0-padded to `NAMING_MAX_INPUT` /
    `NAMING_MAX_TARGET` tokens; the decoder reads the targets shifted
    right behind start id 0.

    Args:
        sp: the SentencePiece model.
        split: "train" or "test" of `docstrings.name_examples`.
        limit: keep only the first `limit` examples (None: all).

    Returns:
        `((inputs, targets), left_out)`: left_out counts the examples
        longer than the maximum lengths.
    """
    pairs = docstrings.name_examples(split)
    sources = [
        sp.encode(NAMING_PROMPT + summary) + [data_lib.EOS_ID]
        for summary, _ in pairs
    ]
    labels = [sp.encode(words) + [data_lib.EOS_ID] for _, words in pairs]
    kept = [
        i
        for i in range(len(pairs))
        if len(sources[i]) <= NAMING_MAX_INPUT
        and len(labels[i]) <= NAMING_MAX_TARGET
    ]
    left_out = len(pairs) - len(kept)
    kept = kept[:limit]
    encoder = _pad([sources[i] for i in kept], NAMING_MAX_INPUT)
    targets = _pad([labels[i] for i in kept], NAMING_MAX_TARGET)
    # (N, U) -> (N, U): start id 0 in front, the last target dropped.
    decoder = np.concatenate(
        [np.zeros_like(targets[:, :1]), targets[:, :-1]], axis=1
    )
    inputs = {
        "encoder_token_ids": encoder,
        "decoder_token_ids": decoder,
        "encoder_padding_mask": encoder != data_lib.PAD_ID,
        "decoder_padding_mask": targets != data_lib.PAD_ID,
    }
    return (inputs, targets), left_out


class FineTuner:
    """Fine-tunes an arm's model on the naming task and scores it.

    Every fine-tune starts from the arm's weights with a zeroed Adam (the
    learning rate warms up over the first tenth of the steps, then decays
    linearly to 0) and sees the same batches for every arm of a seed. It
    runs on the arm's own model, whose weights are restored afterwards:
    one fine-tuning step is traced per architecture, not per fine-tune.

    Args:
        config: the experiment config.
        train: (inputs, targets) NumPy arrays to fine-tune on.
        test: (inputs, targets) NumPy arrays to score.
    """

    def __init__(self, config, train, test):
        self.steps = config["finetune_steps"]
        self.batch_size = config["finetune_batch_size"]
        self.learning_rate = config["finetune_learning_rate"]
        self.train_inputs, self.train_targets = train
        self.test_inputs, self.test_targets = test
        self._trainers = {}  # id(arm model) -> (arm model, its fine-tuner)

    def _trainer(self, model):
        if id(model) not in self._trainers:
            optimizer = uc.make_optimizer(
                self.learning_rate,
                max(1, self.steps // 10),
                decay_steps=self.steps,
            )
            self._trainers[id(model)] = (
                model,  # Kept alive, so that its id stays its own.
                uc.Trainer(model, optimizer, _loss, 0, jit_compile=False),
            )
        return self._trainers[id(model)][1]

    def _batches(self, seed):
        """The fine-tuning batches of `seed`: the same for every arm."""
        rng = np.random.default_rng([seed, 7])
        while True:
            index = rng.choice(
                len(self.train_targets), self.batch_size, replace=False
            )
            inputs = {k: v[index] for k, v in self.train_inputs.items()}
            yield inputs, self.train_targets[index]

    def __call__(self, model, seed):
        """The `FINETUNE_METRICS` of `model` after the fine-tune; `model`
        is left as it was."""
        trainer = self._trainer(model)
        weights = model.get_weights()
        uc.reset_optimizer(trainer.optimizer)
        trainer.train(self._batches(seed), self.steps)
        logits = trainer.forward(self.test_inputs)
        targets = tf.constant(self.test_targets)
        scores = {
            "downstream_loss": float(
                _masked_mean(_token_losses(logits, targets), targets)
            ),
            "downstream_token_accuracy": token_accuracy(
                logits, self.test_targets
            ),
        }
        model.set_weights(weights)
        return scores


def token_accuracy(logits, targets):
    """Fraction of real (non-padding) targets that are the argmax of the
    teacher-forced `logits` <[B, U, V]>."""
    targets = np.asarray(targets)
    predicted = np.argmax(keras.ops.convert_to_numpy(logits), axis=-1)
    real = targets != data_lib.PAD_ID
    return float(np.sum((predicted == targets) & real) / np.sum(real))


def _evaluator(heldout, finetuner, largest_budget):
    """`fn(trainer, seed, budget, arm) -> metrics`: held-out loss and token
    accuracy, and the downstream metrics after a fine-tune (None where
    not fine-tuned).

    Fine-tuned: every arm at `largest_budget`; at +0%, the two models that
    exist before any extra compute, the pre-trained dense checkpoint and
    the MoE trained from scratch for the same FLOPs (the upcycled and
    tiled models at +0% compute nearly the dense checkpoint's function).
    """
    inputs, targets = heldout

    def evaluate(trainer, seed, budget, arm):
        logits = trainer.forward(inputs)
        correct = tf.cast(
            tf.argmax(logits, axis=-1, output_type=targets.dtype) == targets,
            tf.float32,
        )
        scores = {
            "heldout_loss": float(
                _masked_mean(_token_losses(logits, targets), targets)
            ),
            "heldout_accuracy": float(_masked_mean(correct, targets)),
            **{metric: None for metric in FINETUNE_METRICS},
        }
        if budget == largest_budget or (
            budget == 0.0 and arm in FINETUNED_AT_ZERO
        ):
            scores.update(finetuner(trainer.model, seed))
        return scores

    return evaluate


def _stack_layers(config):
    return {
        "encoder": config["model"]["num_encoder_layers"],
        "decoder": config["model"]["num_decoder_layers"],
    }


def validate_options(options):
    """Raises a ValueError naming a bad option (value or name); the
    launcher calls it before any work."""
    uc.parse_options(NAME, options, _stack_layers(CONFIGS["default"]))


def run(output_dir, seeds=(0, 1, 2), small=False, options=None):
    """Runs the experiment and writes results.csv, pretrain_curve.csv,
    results.md and upcycle_t5.png into `output_dir`.

    Args:
        output_dir: created if needed.
        seeds: one dense pre-training (and one run of every arm) per seed.
        small: smoke-test size (tiny model, a few steps).
        options: ablation options (see `upcycling_common.parse_options`).

    Returns:
        {"rows", "curve", "summary", "gates", "files", "no_pretraining",
        "streams"}.
    """
    if not isinstance(small, bool):
        raise ValueError(f"small must be a bool; received {small!r}")
    config = CONFIGS["small" if small else "default"]
    seeds = common.check_seeds(seeds)
    settings = uc.parse_options(NAME, options, _stack_layers(config))
    output_dir = common.prepare_output_dir(output_dir)
    start = time.perf_counter()
    print(f"[{NAME}] {settings.describe()}", flush=True)
    sp = _sentencepiece()
    input_length = config["input_length"]
    batch_size = config["batch_size"]
    raw_length, _ = _lengths(input_length)
    runs = token_runs(sp, "train", raw_length)
    heldout = _heldout(sp, config)
    train, train_left_out = naming_arrays(sp, "train")
    test, test_left_out = naming_arrays(sp, "test", config["test_examples"])
    finetuner = FineTuner(config, train, test)
    target_length = int(heldout[1].shape[1])
    cooldown_steps = max(
        1, round(config["cooldown_fraction"] * config["pretrain_steps"])
    )
    streams = TextStreams(
        runs,
        input_length,
        batch_size,
        pretrain_runs=config["pretrain_steps"] * batch_size,
        cooldown_runs=cooldown_steps * batch_size,
        cooldowns=len(settings.budgets) + 1,
    )

    def step_flops(model):
        return batch_size * flops.training_step_flops(
            model, input_length, target_length
        )

    task = uc.ConvergedTask(
        name=NAME,
        build_dense=lambda: T5(**config["model"]),
        loss_fn=_loss,
        batches=streams.batches,
        step_flops=step_flops,
        evaluate=_evaluator(heldout, finetuner, settings.budgets[-1]),
        pretrain_steps=config["pretrain_steps"],
        learning_rate=config["learning_rate"],
        warmup_steps=config["warmup_steps"],
        cooldown_fraction=config["cooldown_fraction"],
        rewarm_arms=False,
        reset_arm=True,
        tiled_arm=config["tiled_arm"],
        gate_metric="heldout_loss",
        jit_compile=config["jit_compile"],
    )
    rows, curve = uc.run_seeds_converged(task, settings, seeds)
    reference = _no_pretraining_reference(config, finetuner, seeds)
    usage = stream_usage(rows, streams)
    model = config["model"]
    header = (
        f"Dense T5 (v1.0 style: ReLU MLP, tied embeddings, no dropout; D="
        f"{model['model_dim']}, F={model['hidden_dim']}, "
        f"{model['num_heads']} heads of {model['head_dim']}, "
        f"{model['num_encoder_layers']}+{model['num_decoder_layers']} blocks, "
        f"V={model['vocab_size']}) pre-trained with span corruption "
        f"(T={input_length}, U={target_length}) for "
        f"{config['pretrain_steps']} steps of {batch_size} runs of "
        f"{raw_length} tokens of `docstrings` training text "
        f"({streams.count:,} runs; {_describe_usage(usage)}). "
        f"{uc.describe_converged_protocol(task)}. Extra budgets are "
        f"fractions of the pre-training FLOPs P; the MoE from scratch is "
        f"trained for (1 + budget) P. MoE recipe: {settings.describe()}; "
        f"the state-reset arm zeroes the optimizer state instead. "
        f"Held-out: {int(heldout[1].shape[0])} span-corruption runs of the "
        f"validation modules. Downstream (naming, modules never trained "
        f"on), at the largest budget (every arm) and at +0% (the dense "
        f"checkpoint and the MoE from scratch): {config['finetune_steps']} "
        f"fine-tuning steps of {config['finetune_batch_size']} of "
        f"{len(train[1])} examples (Adam from a zeroed state, peak "
        f"learning rate {config['finetune_learning_rate']:g}, 10% warm-up, "
        f"linear decay to 0), scored on {len(test[1])} held-out names "
        f"({train_left_out} + {test_left_out} examples longer than "
        f"{NAMING_MAX_INPUT} / {NAMING_MAX_TARGET} tokens left out).\n\n"
        f"**No pre-training baseline** (the same fine-tune from random "
        f"initialisation, mean ± std over seeds): "
        + ", ".join(
            f"{metric} {_format(reference[metric])}"
            for metric in FINETUNE_METRICS
        )
        + ".\n"
    )
    result = uc.write_converged_outputs(
        output_dir,
        NAME,
        rows,
        curve,
        task,
        METRICS,
        LOWER_IS_BETTER,
        header,
        plot_metrics=("heldout_loss", "heldout_accuracy"),
        wall_seconds=time.perf_counter() - start,
    )
    print(f"[{NAME}] wrote {', '.join(result['files'])}", flush=True)
    return {
        "rows": rows,
        "curve": curve,
        **result,
        "no_pretraining": reference,
        "streams": usage,
    }


def stream_usage(rows, streams):
    """Runs each stream read against the runs it holds.

    Returns:
        {stream: (runs read, runs available)} for "pretrain", "continue"
        (the longest continuing arm) and "scratch".
    """
    batch = streams.batch_size
    continuing = [r["steps"] for r in rows if r["arm"] != "moe_scratch"]
    scratch = [r["steps"] for r in rows if r["arm"] == "moe_scratch"]
    return {
        "pretrain": (streams.pretrain_runs, streams.pretrain_runs),
        "continue": (max(continuing, default=0) * batch, streams.continue_runs),
        "scratch": (
            max(scratch, default=0) * batch,
            streams.count - streams.reserve,
        ),
    }


def _describe_usage(usage):
    parts = []
    for stream, (read, available) in usage.items():
        if stream == "pretrain":
            continue
        passes = read / available
        parts.append(
            f"the {stream} stream read {read:,} of its {available:,} runs"
            + (f" ({passes:.2f} passes: text REPEATED)" if passes > 1 else "")
        )
    return "; ".join(parts)


def _format(mean_std):
    return common.format_mean_std(*mean_std, digits=4)


def _no_pretraining_reference(config, finetuner, seeds):
    """{metric: (mean, std over seeds)} of the downstream metrics of a
    randomly initialised dense T5 after the fine-tune: what pre-training
    is compared with.

    One model holds each seed's initial weights in turn, so its fine-tuning
    step is traced once.
    """
    model = T5(**config["model"])
    scores = []
    for seed in seeds:
        uc.seed_everything(seed)
        model.set_weights(T5(**config["model"]).get_weights())
        scores.append(finetuner(model, seed))
    print(
        f"[{NAME}] no pre-training, after the fine-tune: {scores}", flush=True
    )
    (summary,) = common.aggregate(scores, (), FINETUNE_METRICS)
    return {m: (summary[m], summary[f"{m}_std"]) for m in FINETUNE_METRICS}
