"""Sparse upcycling of a T5 at small scale, at equal extra compute.

Reproduces the language claims of "Sparse Upcycling: Training
Mixture-of-Experts from Dense Checkpoints" (Komatsuzaki et al., 2023): a
dense `keras_moe.models.t5.T5` is pre-trained with T5's span-corruption
objective on `pydoc_corpus` (CPython's help topics, about 65k words), then
continued densely, sparsely upcycled (expert choice in the encoder,
token-choice top-2 in the decoder, no renormalisation), tiled deeper, or
replaced by an MoE trained from scratch, each for the same extra FLOPs
(see `upcycling_common` for the protocol).

Shape letters: B batch, T encoder length, U decoder length, V vocabulary
(`keras_moe.data.VOCAB_SIZE`).

Two measurements per arm and budget:

* upstream: the span-corruption loss (mean cross-entropy per target token)
  and token accuracy on the held-out `pydoc_corpus` validation topics,
  with fixed noise masks;
* downstream: `number_words` translation into English words ("translate to
  English: 4213" -> "four thousand, two hundred and thirteen"): a copy of
  the model is fine-tuned for a fixed number of steps (the same steps,
  batches and fresh optimizer for every arm) and scored by exact match of
  greedy generation on held-out numbers.

English is the target language because it is the pre-training corpus's
language. The fine-tune cost is the same for every arm in steps, not in
FLOPs (it is outside the compute budget, as in the paper).

Example (a smoke run of about a minute):

    from keras_moe.experiments import upcycle_t5
    upcycle_t5.run("/tmp/upcycle_t5", seeds=(0,), small=True)
"""

import time

import keras
import numpy as np
import tensorflow as tf

from keras_moe import data as data_lib
from keras_moe.data.pipelines import t5_features
from keras_moe.evaluation.sequences import exact_matches
from keras_moe.experiments import common
from keras_moe.experiments import upcycling_common
from keras_moe.models import flops
from keras_moe.models.t5 import T5

NAME = "upcycle_t5"
SUPPORTED_OPTIONS = upcycling_common.SUPPORTED_OPTIONS
DOWNSTREAM = "number_words"
LANGUAGE = "en"
METRICS = {
    "heldout_loss": "held-out span-corruption loss (nats/token)",
    "heldout_accuracy": "held-out span-corruption token accuracy",
    "exact_match": f"{DOWNSTREAM} ({LANGUAGE}) exact match after fine-tune",
    "downstream_token_accuracy": (
        f"{DOWNSTREAM} ({LANGUAGE}) token accuracy after fine-tune"
    ),
}
# Measured after a fine-tune, at the largest budget (every arm) and at +0%
# (the arms of FINETUNED_AT_ZERO) only.
FINETUNE_METRICS = ("exact_match", "downstream_token_accuracy")
FINETUNED_AT_ZERO = ("dense", "moe_scratch")
_STREAMS = {"pretrain": 0, "continue": 1, "scratch": 2}
# Noise-mask seed of the held-out span-corruption examples.
_HELDOUT_SEED = 12345
_SHUFFLE_BUFFER = 2048
# T5's span-corruption settings (`keras_moe.data` defaults).
_NOISE_DENSITY = 0.15
_MEAN_NOISE_SPAN_LENGTH = 3.0

_MODEL = dict(
    vocab_size=data_lib.VOCAB_SIZE,
    activation="relu",
    tie_embeddings=True,
    # T5 v1.0's pre-training dropout: without it the held-out loss stops
    # improving after a few epochs of this small corpus.
    dropout_rate=0.1,
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
        heldout_examples=None,
        finetune_steps=400,
        finetune_batch_size=64,
        finetune_learning_rate=2e-3,
        test_examples=1000,
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
        pretrain_steps=12,
        learning_rate=2e-3,
        warmup_steps=4,
        heldout_examples=32,
        finetune_steps=4,
        finetune_batch_size=8,
        finetune_learning_rate=2e-3,
        test_examples=16,
    ),
}


def _masked_mean(values, targets):
    """Mean of <[B, U]> `values` over the real (non-padding) targets."""
    mask = tf.cast(targets != data_lib.PAD_ID, values.dtype)
    return tf.reduce_sum(values * mask) / tf.maximum(tf.reduce_sum(mask), 1.0)


def _loss(model, inputs, targets):
    logits = model(inputs, training=True)
    losses = tf.nn.sparse_softmax_cross_entropy_with_logits(targets, logits)
    return _masked_mean(losses, targets)


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
    (`tf.random.set_seed` clears TensorFlow's kernel cache), which every
    seed of the experiment calls.
    """
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(
        model_file=data_lib.sentencepiece_model_path()
    )


def _texts(name, split, key, language=None):
    """The strings of feature `key` of a dataset split (one language)."""
    dataset = data_lib.load(name, split)
    if language is not None:
        dataset = dataset.filter(lambda ex: ex["language"] == language)
    texts = []
    for batch in dataset.batch(4096):
        texts.extend(text.decode() for text in batch[key].numpy())
    return texts


def _token_runs(sp, split, raw_length):
    """<int32>[N, n] runs of n tokens of a `pydoc_corpus` split.

    The paragraphs are tokenized and concatenated in order, and the stream
    is cut into runs of n tokens (a last shorter run dropped), as
    `keras_moe.data.span_corruption_dataset` does.
    """
    stream = []
    for text in _texts("pydoc_corpus", split, "text"):
        stream.extend(sp.encode(text))
    count = len(stream) // raw_length
    return np.asarray(stream[: count * raw_length], np.int32).reshape(
        count, raw_length
    )


def _span_corruption(runs, input_length, seed, repeat):
    """Unbatched `(inputs, targets)` T5 examples of span-corrupted runs.

    Each run gets a noise mask (`keras_moe.data.noise_span_mask`, T5's
    noise density 0.15 and mean span length 3) drawn from `seed` and the
    run's position in the (repeated) stream.
    """
    raw_length, target_length = _lengths(input_length)
    dataset = tf.data.Dataset.from_tensor_slices(runs)
    if repeat:
        dataset = dataset.repeat()

    def corrupt(index, tokens):
        mask = data_lib.noise_span_mask(
            raw_length,
            _NOISE_DENSITY,
            _MEAN_NOISE_SPAN_LENGTH,
            tf.stack([tf.constant(seed, tf.int64), index]),
        )
        inputs, targets = data_lib.corrupt_spans(tokens, mask)
        return t5_features(inputs, targets, input_length, target_length)

    return dataset.enumerate().map(corrupt)


def _pretraining_batches(runs, config, stream, seed):
    """Endless shuffled span-corruption batches; masks and order fixed by
    (seed, stream)."""
    stream_seed = 1000 * seed + _STREAMS[stream]
    dataset = (
        _span_corruption(runs, config["input_length"], stream_seed, True)
        .shuffle(_SHUFFLE_BUFFER, seed=stream_seed)
        .batch(config["batch_size"], drop_remainder=True)
        .prefetch(2)
    )
    return iter(dataset)


def _heldout(sp, config):
    """The held-out span-corruption examples (validation topics), as one
    batch with fixed noise masks."""
    raw_length, _ = _lengths(config["input_length"])
    runs = _token_runs(sp, "validation", raw_length)
    if config["heldout_examples"] is not None:
        runs = runs[: config["heldout_examples"]]
    dataset = _span_corruption(
        runs, config["input_length"], _HELDOUT_SEED, False
    )
    return next(iter(dataset.batch(len(runs))))


def _pad(rows, length):
    """<int32>[N, length]: each row of ids followed by zeros."""
    out = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def _translation(sp, test_examples):
    """`number_words` in `LANGUAGE`: (train, test) (inputs, targets) NumPy
    arrays in the format of `keras_moe.data.seq2seq_dataset` (EOS-ended,
    0-padded to the longest sequence of both splits)."""
    splits = {}
    for split in ("train", "test"):
        splits[split] = [
            [sp.encode(text) + [data_lib.EOS_ID] for text in texts]
            for texts in (
                _texts(DOWNSTREAM, split, key, LANGUAGE)
                for key in ("inputs", "targets")
            )
        ]
    input_length = max(len(r) for s in splits.values() for r in s[0])
    target_length = max(len(r) for s in splits.values() for r in s[1])
    out = []
    for split, (sources, labels) in splits.items():
        limit = test_examples if split == "test" else None
        encoder = _pad(sources[:limit], input_length)
        targets = _pad(labels[:limit], target_length)
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
        out.append((inputs, targets))
    return tuple(out)


class FineTuner:
    """Fine-tunes an arm's model on the translation task; exact match.

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
            optimizer = upcycling_common.make_optimizer(
                self.learning_rate,
                max(1, self.steps // 10),
                decay_steps=self.steps,
            )
            self._trainers[id(model)] = (
                model,  # Kept alive, so that its id stays its own.
                upcycling_common.Trainer(
                    model, optimizer, _loss, 0, jit_compile=False
                ),
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
        """{"exact_match", "downstream_token_accuracy"} of `model` after
        the fine-tune; `model` is left as it was."""
        trainer = self._trainer(model)
        weights = model.get_weights()
        upcycling_common.reset_optimizer(trainer.optimizer)
        trainer.train(self._batches(seed), self.steps)
        scores = {
            "exact_match": exact_match(
                model, self.test_inputs, self.test_targets
            ),
            "downstream_token_accuracy": token_accuracy(
                trainer.forward(self.test_inputs), self.test_targets
            ),
        }
        model.set_weights(weights)
        return scores


def exact_match(model, inputs, targets):
    """Fraction of examples whose greedy generation equals the target.

    Args:
        model: a T5.
        inputs: the T5 input dict (NumPy), `encoder_token_ids` <int>[B, T].
        targets: <int>[B, U] target ids, EOS-terminated, 0-padded.

    Returns:
        A float: the share of rows whose generated ids (after the start
        id) equal the whole target row, the zeros after EOS included
        (`exact_matches(..., compare_after_eos=True)`: a generation that
        goes on after its end of sequence does not match).
    """
    length = targets.shape[1]
    generated = model.generate(
        inputs["encoder_token_ids"],
        length + 1,
        encoder_padding_mask=inputs["encoder_padding_mask"],
    )
    generated = keras.ops.convert_to_numpy(generated)[:, 1:]
    return float(
        np.mean(exact_matches(generated, targets, compare_after_eos=True))
    )


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
    the MoE trained from scratch for the same FLOPs. (The upcycled model
    at +0% computes nearly the dense checkpoint's function, and the freshly
    tiled one is the dense checkpoint's blocks out of place: neither is a
    trained model of its own.)
    """
    inputs, targets = heldout

    def evaluate(trainer, seed, budget, arm):
        logits = trainer.forward(inputs)
        losses = tf.nn.sparse_softmax_cross_entropy_with_logits(targets, logits)
        correct = tf.cast(
            tf.argmax(logits, axis=-1, output_type=targets.dtype) == targets,
            tf.float32,
        )
        scores = {
            "heldout_loss": float(_masked_mean(losses, targets)),
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
    upcycling_common.parse_options(
        NAME, options, _stack_layers(CONFIGS["default"])
    )


def run(output_dir, seeds=(0, 1, 2), small=False, options=None):
    """Runs the experiment and writes results.csv, results.md and
    upcycle_t5.png into `output_dir`.

    Args:
        output_dir: created if needed.
        seeds: one dense pre-training (and one run of every arm) per seed.
        small: smoke-test size (tiny model, a few steps).
        options: ablation options (see `upcycling_common.parse_options`).

    Returns:
        {"rows": result rows, "summary": mean/std rows, "files": paths}.
    """
    if not isinstance(small, bool):
        raise ValueError(f"small must be a bool; received {small!r}")
    config = CONFIGS["small" if small else "default"]
    seeds = common.check_seeds(seeds)
    model = config["model"]
    settings = upcycling_common.parse_options(
        NAME, options, _stack_layers(config)
    )
    output_dir = common.prepare_output_dir(output_dir)
    start = time.perf_counter()
    print(f"[{NAME}] {settings.describe()}", flush=True)
    sp = _sentencepiece()
    raw_length, _ = _lengths(config["input_length"])
    runs = _token_runs(sp, "train", raw_length)
    heldout = _heldout(sp, config)
    finetuner = FineTuner(config, *_translation(sp, config["test_examples"]))
    input_length = config["input_length"]
    target_length = int(heldout[1].shape[1])
    batch_size = config["batch_size"]

    def step_flops(model):
        return batch_size * flops.training_step_flops(
            model, input_length, target_length
        )

    task = upcycling_common.Task(
        name=NAME,
        build_dense=lambda: T5(**config["model"]),
        loss_fn=_loss,
        batches=lambda stream, seed: _pretraining_batches(
            runs, config, stream, seed
        ),
        step_flops=step_flops,
        evaluate=_evaluator(heldout, finetuner, settings.budgets[-1]),
        pretrain_steps=config["pretrain_steps"],
        learning_rate=config["learning_rate"],
        warmup_steps=config["warmup_steps"],
    )
    cache = {}
    rows = common.for_each_seed(
        seeds,
        lambda seed: upcycling_common.run_seed(task, settings, seed, cache),
        label=f"[{NAME}] ",
    )
    reference = _no_pretraining_reference(config, finetuner, seeds)
    header = (
        f"Dense T5 (v1.0 style: ReLU MLP, tied embeddings; D="
        f"{model['model_dim']}, F={model['hidden_dim']}, "
        f"{model['num_heads']} heads of {model['head_dim']}, "
        f"{model['num_encoder_layers']}+{model['num_decoder_layers']} blocks, "
        f"V={model['vocab_size']}) pre-trained with span corruption "
        f"(T={input_length}, U={target_length}) on pydoc_corpus for "
        f"{config['pretrain_steps']} steps of {batch_size} "
        f"({upcycling_common.describe_optimizer(task)}; dropout "
        f"{model['dropout_rate']:g}); extra budgets as fractions of those "
        f"FLOPs. MoE recipe: {settings.describe()}. "
        f"Tiled dense: {cache['extra_layers']} extra block(s) per stack. "
        f"Held-out: {int(heldout[1].shape[0])} span-corruption examples of "
        f"the validation topics. Downstream, at the largest budget (every "
        f"arm) and at +0% (the dense checkpoint and the MoE from scratch): "
        f"{config['finetune_steps']} fine-tuning steps of "
        f"{config['finetune_batch_size']} {DOWNSTREAM} ({LANGUAGE}) "
        f"examples (Adam from a zeroed state, peak learning rate "
        f"{config['finetune_learning_rate']:g}, 10% warm-up, linear decay "
        f"to 0), exact match of greedy decoding on "
        f"{len(finetuner.test_targets)} held-out numbers, and their "
        f"teacher-forced token accuracy. Without any pre-training (random "
        f"initialisation), the same fine-tune gives an exact match of "
        f"{_format(reference['exact_match'])} and a token accuracy of "
        f"{_format(reference['downstream_token_accuracy'])} (mean ± std "
        f"over seeds).\n"
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
    return {
        "rows": rows,
        "summary": summary,
        "files": files,
        "no_pretraining": reference,
    }


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
        upcycling_common.seed_everything(seed)
        model.set_weights(T5(**config["model"]).get_weights())
        scores.append(finetuner(model, seed))
    print(
        f"[{NAME}] no pre-training, after the fine-tune: {scores}", flush=True
    )
    (summary,) = common.aggregate(scores, (), FINETUNE_METRICS)
    return {m: (summary[m], summary[f"{m}_std"]) for m in FINETUNE_METRICS}
