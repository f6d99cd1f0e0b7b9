"""The vision-language task mixture of the embedded data.

Shape letters: B batch, H, W, C the image canvas (`IMAGE_SHAPE`, 8 x 16 x
1), P prompt length, U target length.

Every example is `(inputs, targets)` in the format of
`keras_moe.models.vlm.VisionLanguageModel`, one image slot per example:

    inputs = {
        "images":            <float32>[1, H, W, C] in [0, 1],
        "image_mask":        <bool>[1]  (False: a text-only example),
        "prompt_token_ids":  <int32>[P] ending with EOS, 0-padded,
        "decoder_token_ids": <int32>[U] the targets shifted right,
    }
    targets = <int32>[U] ending with EOS, 0-padded

Tasks (`TASKS`):

* "caption": a `digits` image, centred on the 8 x 16 canvas between two
  4-pixel black borders (`tf.image.resize_with_pad`, as the exported
  `caption` signature fits images), prompt "caption in de:", target the
  digit in words in that language by num2words ("sieben"); one example per
  image and language of `languages` (a subset of `LANGUAGES`).
* "vqa": a `composed_digits` image (two digits side by side), one example
  per question of `QUESTIONS` ("what is the left digit?" -> "7", "sum of
  the digits?" -> "13"); answers in digits.
* "span_corruption": text only, T5 span corruption of `pydoc_corpus`
  (`keras_moe.data.span_corruption_dataset`, inputs of length P); the
  image slot holds zeros and is masked.

`mixture_dataset` samples the three with given rates
(`tf.data.Dataset.sample_from_datasets`). Held-out evaluation uses the
`test` splits: `digits` test images, and `composed_digits` test images,
which are made only of `digits` test images.

Prompts and targets are tokenised with `keras_moe.data.tokenizer()` and
never truncated: a prompt or target longer than P or U (EOS included)
raises a ValueError that names it.
"""

import numpy as np
import tensorflow as tf
from num2words import num2words

from keras_moe import data
from keras_moe.utils.checks import check_int

IMAGE_SHAPE = (8, 16, 1)
LANGUAGES = tuple(data.LANGUAGES)
TASKS = ("caption", "vqa", "span_corruption")
QUESTIONS = {
    "left": "what is the left digit?",
    "right": "what is the right digit?",
    "sum": "sum of the digits?",
}
DEFAULT_RATES = {"caption": 0.5, "vqa": 0.3, "span_corruption": 0.2}
_SHUFFLE_BUFFER = 10_000


def check_languages(languages):
    """Returns `languages` (a tag or an iterable of tags) as a tuple.

    Raises:
        ValueError: an unknown tag (the message lists the supported ones),
            or no tag at all.
    """
    if isinstance(languages, str):
        languages = (languages,)
    languages = tuple(languages)
    unknown = [tag for tag in languages if tag not in LANGUAGES]
    if unknown or not languages:
        raise ValueError(
            f"Unknown language tag(s) {unknown or languages!r}; supported: "
            f"{', '.join(LANGUAGES)}"
        )
    return tuple(dict.fromkeys(languages))


def caption_prompt(language):
    """The captioning prompt of `language`, e.g. "caption in de:"."""
    return f"caption in {check_languages(language)[0]}:"


def caption_target(digit, language):
    """`digit` in words in `language` (num2words), e.g. 7, "de" -> "sieben"."""
    return num2words(int(digit), lang=check_languages(language)[0])


def answer(question, left, right):
    """The answer (digits) of a `QUESTIONS` key about a composed image."""
    if question not in QUESTIONS:
        raise ValueError(
            f"Unknown question {question!r}; expected one of {list(QUESTIONS)}"
        )
    return str({"left": left, "right": right, "sum": left + right}[question])


def check_rates(rates):
    """{task: sampling rate} -> the rates normalised to sum to 1.

    Raises:
        ValueError: an unknown task, a negative rate, or no positive rate.
    """
    rates = dict(rates)
    unknown = sorted(set(rates) - set(TASKS))
    if unknown:
        raise ValueError(f"Unknown task(s) {unknown}; tasks are {list(TASKS)}")
    if any(not rate >= 0 for rate in rates.values()):
        raise ValueError(f"Sampling rates must be >= 0; received {rates}")
    total = sum(rates.values())
    if not total > 0:
        raise ValueError(f"At least one sampling rate must be > 0: {rates}")
    return {task: rate / total for task, rate in rates.items() if rate > 0}


def encode(texts, length, what, data_dir=None):
    """Token ids of `texts`, each with EOS, 0-padded to `length`.

    Args:
        texts: a list of str.
        length: the padded length (EOS included).
        what: what the texts are ("prompt", "target"), for errors.
        data_dir: TFDS data directory of the vocabulary.

    Returns:
        <int32>[len(texts), length] NumPy ids.

    Raises:
        ValueError: a text longer than `length` tokens with EOS, named.
    """
    check_int(f"{what} length", length, minimum=2)
    pieces = data.tokenizer(data_dir).tokenize(list(texts)).to_list()
    ids = np.zeros((len(texts), length), np.int32)
    for row, (text, tokens) in enumerate(zip(texts, pieces)):
        tokens = list(tokens) + [data.EOS_ID]
        if len(tokens) > length:
            raise ValueError(
                f"The {what} {text!r} has {len(tokens)} tokens with EOS, "
                f"more than the {what} length {length}"
            )
        ids[row, : len(tokens)] = tokens
    return ids


def _decoder_ids(targets):
    # (U,) -> (U,): the start id 0 in front, the last target dropped.
    return tf.concat([[data.PAD_ID], targets[:-1]], 0)


def _example(image, image_mask, prompt_ids, target_ids):
    inputs = {
        "images": image[None],
        "image_mask": tf.reshape(image_mask, (1,)),
        "prompt_token_ids": prompt_ids,
        "decoder_token_ids": _decoder_ids(target_ids),
    }
    return inputs, target_ids


def canvas(image):
    """A uint8 <[h, w, 1]> image -> <float32>[8, 16, 1] in [0, 1], fitted
    into the canvas keeping its aspect ratio, centred, zero padded."""
    image = tf.cast(image, tf.float32) / 255.0
    return tf.image.resize_with_pad(image, *IMAGE_SHAPE[:2])


def caption_dataset(
    split, languages, prompt_length, target_length, data_dir=None
):
    """Captioning examples of `digits` `split`, one per image and language.

    Examples come image by image (languages in the given order); shuffle
    for training.
    """
    languages = check_languages(languages)
    prompts = encode(
        [caption_prompt(tag) for tag in languages],
        prompt_length,
        "prompt",
        data_dir,
    )
    # (languages * 10, U): row language * 10 + digit.
    targets = encode(
        [caption_target(d, tag) for tag in languages for d in range(10)],
        target_length,
        "target",
        data_dir,
    )
    prompts, targets = tf.constant(prompts), tf.constant(targets)
    count = len(languages)

    def per_language(example):
        image = tf.repeat(canvas(example["image"])[None], count, axis=0)
        rows = tf.range(count) * 10 + tf.cast(example["label"], tf.int32)
        return image, prompts, tf.gather(targets, rows)

    def build(image, prompt_ids, target_ids):
        return _example(image, True, prompt_ids, target_ids)

    ds = data.load("digits", split, data_dir).map(per_language)
    return ds.unbatch().map(build, num_parallel_calls=tf.data.AUTOTUNE)


def vqa_dataset(
    split, prompt_length, target_length, questions=None, data_dir=None
):
    """Question-answer examples of `composed_digits` `split`, one per image
    and question (keys of `QUESTIONS`; all by default)."""
    questions = tuple(questions or QUESTIONS)
    for question in questions:
        answer(question, 0, 0)  # validates the key
    prompts = tf.constant(
        encode(
            [QUESTIONS[q] for q in questions], prompt_length, "prompt", data_dir
        )
    )
    # Answers to every question about every pair: row q * 100 + label.
    answers = tf.constant(
        encode(
            [
                answer(q, label // 10, label % 10)
                for q in questions
                for label in range(100)
            ],
            target_length,
            "target",
            data_dir,
        )
    )
    count = len(questions)

    def per_question(example):
        image = tf.repeat(canvas(example["image"])[None], count, axis=0)
        rows = tf.range(count) * 100 + tf.cast(example["label"], tf.int32)
        return image, prompts, tf.gather(answers, rows)

    def build(image, prompt_ids, target_ids):
        return _example(image, True, prompt_ids, target_ids)

    ds = data.load("composed_digits", split, data_dir).map(per_question)
    return ds.unbatch().map(build, num_parallel_calls=tf.data.AUTOTUNE)


def span_corruption_dataset(
    split, prompt_length, target_length, seed=0, data_dir=None
):
    """Text-only span-corruption examples of `pydoc_corpus` `split`,
    repeated forever with new noise masks."""
    _, needed = data.span_corruption_lengths(prompt_length)
    if needed > target_length:
        raise ValueError(
            f"Span corruption of inputs of length {prompt_length} has "
            f"targets of {needed} tokens, more than the target length "
            f"{target_length}"
        )
    ds = data.span_corruption_dataset(
        split,
        batch_size=1,
        input_length=prompt_length,
        seed=seed,
        repeat=True,
        data_dir=data_dir,
    ).unbatch()
    blank = tf.zeros(IMAGE_SHAPE, tf.float32)

    def build(inputs, targets):
        targets = tf.pad(targets, [[0, target_length - tf.size(targets)]])
        targets = tf.ensure_shape(targets, [target_length])
        return _example(blank, False, inputs["encoder_token_ids"], targets)

    return ds.map(build, num_parallel_calls=tf.data.AUTOTUNE)


def task_dataset(
    task,
    split,
    prompt_length,
    target_length,
    languages=LANGUAGES,
    seed=0,
    data_dir=None,
):
    """The examples of one of `TASKS` (see the module docstring)."""
    if task == "caption":
        return caption_dataset(
            split, languages, prompt_length, target_length, data_dir
        )
    if task == "vqa":
        return vqa_dataset(
            split, prompt_length, target_length, data_dir=data_dir
        )
    if task == "span_corruption":
        return span_corruption_dataset(
            split, prompt_length, target_length, seed, data_dir
        )
    raise ValueError(f"Unknown task {task!r}; tasks are {list(TASKS)}")


def with_weights(inputs, targets):
    """(inputs, targets) -> (inputs, targets, loss weights of non-padding)."""
    return inputs, targets, tf.cast(targets != data.PAD_ID, tf.float32)


def mixture_dataset(
    batch_size,
    rates=None,
    languages=LANGUAGES,
    prompt_length=24,
    target_length=8,
    seed=0,
    data_dir=None,
):
    """Training batches sampled from the tasks' `train` splits.

    Each task's examples are shuffled (seeded) and repeated; batches draw
    each example from task t with probability `rates[t]` (normalised).

    Args:
        batch_size: B.
        rates: {task: rate}; default `DEFAULT_RATES`. Tasks left out or at
            rate 0 are not used.
        languages: captioning languages, a subset of `LANGUAGES`.
        prompt_length: P.
        target_length: U.
        seed: of the shuffles, the span-corruption masks and the sampling.
        data_dir: TFDS data directory; `keras_moe.data.default_data_dir()`
            if None.

    Returns:
        A repeated `tf.data.Dataset` of `(inputs, targets, weights)`
        batches (weights <float32>[B, U]: 1 on non-padding targets).

    Raises:
        ValueError: bad rates, languages, batch size or lengths, or a
            prompt or target longer than its length; raised before any
            batch is made.
    """
    check_int("batch_size", batch_size)
    rates = check_rates(DEFAULT_RATES if rates is None else rates)
    languages = check_languages(languages)
    datasets = []
    for index, task in enumerate(rates):
        ds = task_dataset(
            task,
            "train",
            prompt_length,
            target_length,
            languages,
            seed,
            data_dir,
        )
        datasets.append(
            ds.cache().shuffle(_SHUFFLE_BUFFER, seed=seed + index).repeat()
            if task != "span_corruption"
            else ds.shuffle(_SHUFFLE_BUFFER // 10, seed=seed + index)
        )
    mixed = tf.data.Dataset.sample_from_datasets(
        datasets, weights=list(rates.values()), seed=seed
    )
    mixed = mixed.map(with_weights, num_parallel_calls=tf.data.AUTOTUNE)
    return mixed.batch(batch_size, drop_remainder=True).prefetch(
        tf.data.AUTOTUNE
    )
