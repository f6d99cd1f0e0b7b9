"""The vision-language task mixture of the embedded data.

Shape letters: B batch, M image slots per example, H, W, C an image
(the canvas: `IMAGE_SHAPE`, 8 x 16 x 1, or another `image_size`), P prompt
length, U target length.

Every example is `(inputs, targets)` in the format of
`keras_moe.models.vlm.VisionLanguageModel` with the placeholder layout
(`image_token_id=IMAGE_TOKEN_ID`):

    inputs = {
        "images":            <float32>[M, H, W, C] in [0, 1],
        "image_mask":        <bool>[M]  (False: an unused slot),
        "prompt_token_ids":  <int32>[P] ending with EOS, 0-padded,
        "decoder_token_ids": <int32>[U] the targets shifted right,
    }
    targets = <int32>[U] ending with EOS, 0-padded

Placeholder convention: an example with k images fills slots 0..k-1 (the
rest are zeros, masked) and its prompt opens with k `IMAGE_TOKEN_ID`s,
the i-th standing for image i. Single-image prompts put the placeholder
first ("<img> caption in de:"); the multi-image prompt interleaves each
image with its label ("1: <img> 2: <img> 3: <img> which image shows 7?").
The model puts the visual tokens of image i where the i-th placeholder
is.

Tasks (`TASKS`):

* "caption": a `digits` image, centred on the 8 x 16 canvas between two
  4-pixel black borders (`tf.image.resize_with_pad`, as the exported
  `caption` signature fits images), prompt "caption in de:", target the
  digit in words in that language by num2words ("sieben"); one example per
  image and language of `languages` (a subset of `LANGUAGES`).
* "vqa": a `composed_digits` image (two digits side by side), one example
  per question of `QUESTIONS` ("what is the left digit?" -> "7", "sum of
  the digits?" -> "13"); answers in digits.
* "fewshot" (multi-image, PaLI-X's few-shot captioning): two `digits`
  images each followed by its caption, then a query image, all in one
  language drawn from `languages` per episode and named nowhere: prompt
  "<img> sieben <img> drei <img>", target the query's caption in the
  examples' language ("fünf").
* "which" (multi-image): `WHICH_IMAGES` `digits` images of distinct
  digits, each after its label, prompt "1: <img> 2: <img> 3: <img> which
  image shows 7?", target the label of the image of that digit ("2").
  Episodes are drawn by a seeded generator from one split's images only.
  The labels matter: the T5 sees positions only through relative-position
  buckets (and its cross-attention not at all), so three images without
  labels are told apart by how far they lie from the question.
* "span_corruption": text only, T5 span corruption of `pydoc_corpus`
  (`keras_moe.data.span_corruption_dataset`, inputs of length P); every
  image slot holds zeros and is masked, the prompt has no placeholder.

`image_size` (height, width) resamples the canvas by area averaging
(`tf.image.resize(method="area")`): (4, 8) is the 8 x 16 canvas with each
2 x 2 block of pixels averaged. The source digits are 8 x 8 pixels, so
the native canvas holds all the detail there is.

`mixture_dataset` samples the tasks with given rates
(`tf.data.Dataset.sample_from_datasets`). Held-out evaluation uses the
`test` splits: `digits` test images, and `composed_digits` test images,
which are made only of `digits` test images.

Prompts and targets are tokenised with `keras_moe.data.tokenizer()` and
never truncated: a prompt (placeholders included) or target longer than P
or U (EOS included) raises a ValueError that names it.
"""

import numpy as np
import tensorflow as tf
from num2words import num2words

from keras_moe import data
from keras_moe.utils.checks import check_int

IMAGE_SHAPE = (8, 16, 1)
# The last sentinel: span corruption of prompts of a few dozen tokens uses
# the first few sentinels only, and the model replaces the placeholder's
# embedding by the image's tokens.
IMAGE_TOKEN_ID = data.sentinel_id(data.NUM_EXTRA_IDS - 1)
LANGUAGES = tuple(data.LANGUAGES)
TASKS = ("caption", "vqa", "fewshot", "which", "span_corruption")
QUESTIONS = {
    "left": "what is the left digit?",
    "right": "what is the right digit?",
    "sum": "sum of the digits?",
}
WHICH_IMAGES = 3
MAX_IMAGES = max(WHICH_IMAGES, 3)
FEWSHOT_IMAGES = 3  # two captioned examples, then the query
DEFAULT_RATES = {
    "caption": 0.3,
    "vqa": 0.2,
    "fewshot": 0.2,
    "which": 0.15,
    "span_corruption": 0.15,
}
_SHUFFLE_BUFFER = 10_000
_WHICH_TRAIN_EPISODES = 30_000


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


def check_image_size(image_size):
    """None (the canvas, 8 x 16) or (height, width) -> (height, width)."""
    if image_size is None:
        return IMAGE_SHAPE[:2]
    if isinstance(image_size, int) or len(tuple(image_size)) != 2:
        raise ValueError(
            "image_size must be (height, width); received " f"{image_size!r}"
        )
    height, width = image_size
    check_int("image height", height)
    check_int("image width", width)
    return (int(height), int(width))


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


def which_prompt(digit):
    """The question of the multi-image task, e.g. "which image shows 7?"
    (after the labelled images)."""
    return f"which image shows {int(digit)}?"


def which_label(position):
    """The label before image `position` (0-based) of a "which" prompt."""
    return f"{position + 1}:"


def which_prompt_ids(prompt_length, data_dir=None):
    """<int32>[10, P] ids of the "which" prompts, row d asking for digit
    d: "1:" <img> "2:" <img> "3:" <img> "which image shows d?" EOS, 0-padded.

    Raises:
        ValueError: a prompt longer than `prompt_length`, named.
    """
    check_int("prompt length", prompt_length, minimum=2)
    tokenizer = data.tokenizer(data_dir)
    labels = tokenizer.tokenize(
        [which_label(i) for i in range(WHICH_IMAGES)]
    ).to_list()
    questions = tokenizer.tokenize([which_prompt(d) for d in range(10)])
    ids = np.zeros((10, prompt_length), np.int32)
    for digit, question in enumerate(questions.to_list()):
        tokens = []
        for label in labels:
            tokens += list(label) + [IMAGE_TOKEN_ID]
        tokens += list(question) + [data.EOS_ID]
        if len(tokens) > prompt_length:
            raise ValueError(
                f"The prompt {which_prompt(digit)!r} has {len(tokens)} "
                f"tokens with its {WHICH_IMAGES} labelled images and EOS, "
                f"more than the prompt length {prompt_length}"
            )
        ids[digit, : len(tokens)] = tokens
    return ids


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


def encode(texts, length, what, data_dir=None, images=0):
    """Token ids of `texts`, each with EOS, 0-padded to `length`.

    Args:
        texts: a list of str.
        length: the padded length (placeholders and EOS included).
        what: what the texts are ("prompt", "target"), for errors.
        data_dir: TFDS data directory of the vocabulary.
        images: placeholders (`IMAGE_TOKEN_ID`) put before each text.

    Returns:
        <int32>[len(texts), length] NumPy ids.

    Raises:
        ValueError: a text longer than `length` tokens with EOS, named.
    """
    check_int(f"{what} length", length, minimum=2)
    pieces = data.tokenizer(data_dir).tokenize(list(texts)).to_list()
    ids = np.zeros((len(texts), length), np.int32)
    for row, (text, tokens) in enumerate(zip(texts, pieces)):
        tokens = [IMAGE_TOKEN_ID] * images + list(tokens) + [data.EOS_ID]
        if len(tokens) > length:
            raise ValueError(
                f"The {what} {text!r} has {len(tokens)} tokens with EOS"
                + (f" and {images} image placeholder(s)" if images else "")
                + f", more than the {what} length {length}"
            )
        ids[row, : len(tokens)] = tokens
    return ids


def _check_slots(max_images, needed, task):
    check_int("max_images", max_images)
    if max_images < needed:
        raise ValueError(
            f"The {task} task has {needed} images per example; "
            f"max_images={max_images} slots cannot hold them"
        )


def _decoder_ids(targets):
    # (U,) -> (U,): the start id 0 in front, the last target dropped.
    return tf.concat([[data.PAD_ID], targets[:-1]], 0)


def _example(images, image_mask, prompt_ids, target_ids):
    inputs = {
        "images": images,
        "image_mask": image_mask,
        "prompt_token_ids": prompt_ids,
        "decoder_token_ids": _decoder_ids(target_ids),
    }
    return inputs, target_ids


def _slots(images, max_images):
    """<[k, H, W, C]> real images -> (<[M, H, W, C]>, <bool>[M])."""
    count = images.shape[0]
    padded = tf.pad(images, [[0, max_images - count], [0, 0], [0, 0], [0, 0]])
    mask = tf.range(max_images) < count
    return padded, mask


def canvas(image, image_size=None):
    """A uint8 <[h, w, 1]> image -> <float32>[H, W, 1] in [0, 1]: fitted
    into the 8 x 16 canvas keeping its aspect ratio, centred, zero padded,
    then resampled to `image_size` by area averaging (if given)."""
    height, width = check_image_size(image_size)
    image = tf.cast(image, tf.float32) / 255.0
    image = tf.image.resize_with_pad(image, *IMAGE_SHAPE[:2])
    if (height, width) != IMAGE_SHAPE[:2]:
        image = tf.image.resize(image, (height, width), method="area")
    return image


def _digit_canvases(split, data_dir, image_size):
    """Labels <int>[N] and canvases <float32>[N, H, W, 1] of a digits split."""
    raw = list(data.load("digits", split, data_dir).as_numpy_iterator())
    labels = np.array([int(x["label"]) for x in raw])
    pictures = tf.stack([canvas(x["image"], image_size) for x in raw])
    return labels, pictures


def caption_dataset(
    split,
    languages,
    prompt_length,
    target_length,
    data_dir=None,
    image_size=None,
    max_images=1,
):
    """Captioning examples of `digits` `split`, one per image and language.

    Examples come image by image (languages in the given order); shuffle
    for training.
    """
    languages = check_languages(languages)
    check_image_size(image_size)
    _check_slots(max_images, 1, "caption")
    prompts = encode(
        [caption_prompt(tag) for tag in languages],
        prompt_length,
        "prompt",
        data_dir,
        images=1,
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
        image = canvas(example["image"], image_size)[None]
        image = tf.repeat(image, count, axis=0)
        rows = tf.range(count) * 10 + tf.cast(example["label"], tf.int32)
        return image, prompts, tf.gather(targets, rows)

    def build(image, prompt_ids, target_ids):
        images, mask = _slots(image[None], max_images)
        return _example(images, mask, prompt_ids, target_ids)

    ds = data.load("digits", split, data_dir).map(per_language)
    return ds.unbatch().map(build, num_parallel_calls=tf.data.AUTOTUNE)


def vqa_dataset(
    split,
    prompt_length,
    target_length,
    questions=None,
    data_dir=None,
    image_size=None,
    max_images=1,
):
    """Question-answer examples of `composed_digits` `split`, one per image
    and question (keys of `QUESTIONS`; all by default)."""
    questions = tuple(questions or QUESTIONS)
    for question in questions:
        answer(question, 0, 0)  # validates the key
    check_image_size(image_size)
    _check_slots(max_images, 1, "vqa")
    prompts = tf.constant(
        encode(
            [QUESTIONS[q] for q in questions],
            prompt_length,
            "prompt",
            data_dir,
            images=1,
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
        image = canvas(example["image"], image_size)[None]
        image = tf.repeat(image, count, axis=0)
        rows = tf.range(count) * 100 + tf.cast(example["label"], tf.int32)
        return image, prompts, tf.gather(answers, rows)

    def build(image, prompt_ids, target_ids):
        images, mask = _slots(image[None], max_images)
        return _example(images, mask, prompt_ids, target_ids)

    ds = data.load("composed_digits", split, data_dir).map(per_question)
    return ds.unbatch().map(build, num_parallel_calls=tf.data.AUTOTUNE)


def which_episodes(labels, episodes, seed=0):
    """Seeded episodes of the "which" task over images with `labels`.

    Args:
        labels: <int>[n] the digit of each image of a split.
        episodes: how many episodes.
        seed: of the generator.

    Returns:
        (<int>[episodes, WHICH_IMAGES] image indices, all of distinct
        digits; <int>[episodes] the 0-based position of the queried one).
    """
    check_int("episodes", episodes)
    labels = np.asarray(labels)
    by_digit = [np.flatnonzero(labels == d) for d in range(10)]
    missing = [d for d in range(10) if not len(by_digit[d])]
    if missing:
        raise ValueError(f"No image of digit(s) {missing} to draw from")
    rng = np.random.default_rng(seed)
    indices = np.zeros((episodes, WHICH_IMAGES), np.int64)
    for episode in range(episodes):
        digits = rng.choice(10, size=WHICH_IMAGES, replace=False)
        indices[episode] = [rng.choice(by_digit[d]) for d in digits]
    queried = rng.integers(0, WHICH_IMAGES, size=episodes)
    return indices, queried


def which_dataset(
    split,
    prompt_length,
    target_length,
    episodes=None,
    seed=0,
    data_dir=None,
    image_size=None,
    max_images=WHICH_IMAGES,
):
    """Multi-image "which" examples over the `digits` `split` images.

    Args:
        split: "train" or "test" of `digits`.
        prompt_length, target_length: P and U.
        episodes: how many (default 30,000 for "train", 300 otherwise).
        seed: of the episodes.
        data_dir: TFDS data directory.
        image_size: (height, width) of the images; None: the canvas.
        max_images: M >= `WHICH_IMAGES`.
    """
    check_image_size(image_size)
    _check_slots(max_images, WHICH_IMAGES, "which")
    if episodes is None:
        episodes = _WHICH_TRAIN_EPISODES if split == "train" else 300
    prompts = tf.constant(which_prompt_ids(prompt_length, data_dir))
    targets = tf.constant(
        encode(
            [str(i + 1) for i in range(WHICH_IMAGES)],
            target_length,
            "target",
            data_dir,
        )
    )
    labels, pictures = _digit_canvases(split, data_dir, image_size)
    indices, queried = which_episodes(labels, episodes, seed)
    asked = labels[indices[np.arange(episodes), queried]]

    def build(index, position, digit):
        images, mask = _slots(tf.gather(pictures, index), max_images)
        return _example(
            images,
            mask,
            tf.gather(prompts, digit),
            tf.gather(targets, position),
        )

    ds = tf.data.Dataset.from_tensor_slices(
        (indices, queried.astype(np.int32), asked.astype(np.int32))
    )
    return ds.map(build, num_parallel_calls=tf.data.AUTOTUNE)


def fewshot_episodes(labels, num_languages, episodes, seed=0):
    """Seeded few-shot captioning episodes over images with `labels`.

    Returns:
        (<int>[episodes, FEWSHOT_IMAGES] image indices, the query last;
        <int>[episodes] the language index of each episode).
    """
    check_int("episodes", episodes)
    check_int("num_languages", num_languages)
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    indices = rng.integers(0, len(labels), size=(episodes, FEWSHOT_IMAGES))
    return indices, rng.integers(0, num_languages, size=episodes)


def fewshot_dataset(
    split,
    languages,
    prompt_length,
    target_length,
    episodes=None,
    seed=0,
    data_dir=None,
    image_size=None,
    max_images=FEWSHOT_IMAGES,
):
    """Few-shot captioning episodes over the `digits` `split` images (see
    the module docstring); `episodes` defaults as in `which_dataset`."""
    languages = check_languages(languages)
    check_image_size(image_size)
    _check_slots(max_images, FEWSHOT_IMAGES, "fewshot")
    if episodes is None:
        episodes = _WHICH_TRAIN_EPISODES if split == "train" else 300
    tokenizer = data.tokenizer(data_dir)
    words = [[caption_target(d, tag) for d in range(10)] for tag in languages]
    pieces = [tokenizer.tokenize(row).to_list() for row in words]
    targets = encode(
        [word for row in words for word in row],
        target_length,
        "target",
        data_dir,
    )
    labels, pictures = _digit_canvases(split, data_dir, image_size)
    indices, language = fewshot_episodes(labels, len(languages), episodes, seed)
    digits = labels[indices]  # (episodes, FEWSHOT_IMAGES)
    prompts = np.zeros((episodes, prompt_length), np.int32)
    for episode in range(episodes):
        row = pieces[language[episode]]
        tokens = []
        for digit in digits[episode, :-1]:
            tokens += [IMAGE_TOKEN_ID] + list(row[digit])
        tokens += [IMAGE_TOKEN_ID, data.EOS_ID]
        if len(tokens) > prompt_length:
            shown = " ".join(
                words[language[episode]][d] for d in digits[episode, :-1]
            )
            raise ValueError(
                f"The few-shot prompt of captions {shown!r} has "
                f"{len(tokens)} tokens with its {FEWSHOT_IMAGES} images and "
                f"EOS, more than the prompt length {prompt_length}"
            )
        prompts[episode, : len(tokens)] = tokens
    rows = language * 10 + digits[:, -1]

    def build(index, prompt_ids, target_ids):
        images, mask = _slots(tf.gather(pictures, index), max_images)
        return _example(images, mask, prompt_ids, target_ids)

    ds = tf.data.Dataset.from_tensor_slices((indices, prompts, targets[rows]))
    return ds.map(build, num_parallel_calls=tf.data.AUTOTUNE)


def span_corruption_dataset(
    split,
    prompt_length,
    target_length,
    seed=0,
    data_dir=None,
    image_size=None,
    max_images=1,
):
    """Text-only span-corruption examples of `pydoc_corpus` `split`,
    repeated forever with new noise masks."""
    height, width = check_image_size(image_size)
    check_int("max_images", max_images)
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
    blank = tf.zeros((max_images, height, width, IMAGE_SHAPE[2]), tf.float32)
    no_image = tf.zeros((max_images,), tf.bool)

    def build(inputs, targets):
        targets = tf.pad(targets, [[0, target_length - tf.size(targets)]])
        targets = tf.ensure_shape(targets, [target_length])
        return _example(blank, no_image, inputs["encoder_token_ids"], targets)

    return ds.map(build, num_parallel_calls=tf.data.AUTOTUNE)


def task_dataset(
    task,
    split,
    prompt_length,
    target_length,
    languages=LANGUAGES,
    seed=0,
    data_dir=None,
    image_size=None,
    max_images=MAX_IMAGES,
):
    """The examples of one of `TASKS` (see the module docstring)."""
    shared = dict(data_dir=data_dir, image_size=image_size)
    shared["max_images"] = max_images
    if task == "caption":
        return caption_dataset(
            split, languages, prompt_length, target_length, **shared
        )
    if task == "vqa":
        return vqa_dataset(split, prompt_length, target_length, **shared)
    if task == "fewshot":
        return fewshot_dataset(
            split,
            languages,
            prompt_length,
            target_length,
            seed=seed,
            **shared,
        )
    if task == "which":
        return which_dataset(
            split, prompt_length, target_length, seed=seed, **shared
        )
    if task == "span_corruption":
        return span_corruption_dataset(
            split, prompt_length, target_length, seed, **shared
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
    image_size=None,
    max_images=MAX_IMAGES,
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
        seed: of the shuffles, the episodes, the span-corruption masks and
            the sampling.
        data_dir: TFDS data directory; `keras_moe.data.default_data_dir()`
            if None.
        image_size: (height, width) of the images; None: the canvas.
        max_images: M, the image slots of every example.

    Returns:
        A repeated `tf.data.Dataset` of `(inputs, targets, weights)`
        batches (weights <float32>[B, U]: 1 on non-padding targets).

    Raises:
        ValueError: bad rates, languages, batch size, lengths, image size
            or slots, or a prompt or target longer than its length; raised
            before any batch is made.
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
            image_size,
            max_images,
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


def classification_dataset(split, image_size=None, data_dir=None):
    """(<float32>[H, W, 1] canvas, <int32> digit) pairs of `digits`
    `split`: what a ViT is pre-trained on before it reads for the T5."""
    check_image_size(image_size)

    def build(example):
        image = canvas(example["image"], image_size)
        return image, tf.cast(example["label"], tf.int32)

    ds = data.load("digits", split, data_dir)
    return ds.map(build, num_parallel_calls=tf.data.AUTOTUNE)
