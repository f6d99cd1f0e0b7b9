"""Batched `tf.data` pipelines over the embedded datasets.

Shape letters: B batch, H image height, W image width, C channels, T
encoder (input) length, U decoder (target) length.

* `classification_dataset`: `(images <float32>[B, H, W, C] in [0, 1],
  labels <int32>[B])` from any prepared dataset with `image` and `label`
  features (`digits`, `composed_digits`).
* `seq2seq_dataset`: `number_words` tokenized with the SentencePiece
  vocabulary (`keras_moe.data.tokenizer`) as `(inputs, targets)`, where
  `inputs` is the dict `keras_moe.models.T5` takes and `targets`
  <int32>[B, U] the ids to predict.

T5 inputs (here and in `span_corruption_dataset`): every sequence ends with
`EOS_ID` and is padded with `PAD_ID` (0) to its fixed length;
`encoder_token_ids` <int32>[B, T]; `decoder_token_ids` <int32>[B, U] are the
targets shifted right behind the decoder start id 0; `encoder_padding_mask`
and `decoder_padding_mask` <bool>[B, T] / [B, U] are True on real tokens
(the decoder's on the positions whose target is real). Train with a loss
that ignores padded targets, e.g.
`keras.losses.SparseCategoricalCrossentropy(from_logits=True,
ignore_class=0)`.

Truncation policy: nothing is ever truncated. `seq2seq_dataset` measures
the longest tokenized sequence of the requested split and languages first
(`seq2seq_lengths`) and raises `ValueError` with the lengths needed when
`input_length` or `target_length` is shorter.
"""

import functools

import tensorflow as tf

from keras_moe.data import registry
from keras_moe.data import vocabulary
from keras_moe.data.shuffle import reproducible_shuffle
from keras_moe.data.text import LANGUAGES
from keras_moe.utils import checks

SEQ2SEQ_DATASETS = ("number_words",)
_SHUFFLE_BUFFER = 50_000
_LENGTH_BATCH = 4096


def check_positive_int(name, value):
    """Raises ValueError unless `value` is an int >= 1 (bool excluded).

    `keras_moe.utils.checks.check_positive_int`, in the words the data
    pipelines' errors have always used ("X must be a positive int").
    """
    try:
        return checks.check_positive_int(name, value)
    except ValueError:
        raise ValueError(
            f"{name} must be a positive int; received {value!r}"
        ) from None


def finish(ds, batch_size, shuffle, seed, repeat, drop_remainder):
    """Shuffles, repeats, batches and prefetches `ds`, in that order.

    Args:
        ds: an unbatched `tf.data.Dataset`.
        batch_size: examples per batch.
        shuffle: whether to shuffle examples (buffer of 50,000, a new order
            each pass).
        seed: shuffle seed (an int): every iteration of the result then
            yields the same stream (pass p shuffled by (seed, p); see
            `keras_moe.data.reproducible_shuffle`), which is what
            lets a resumed run see the data an uninterrupted one would.
            None for a random order.
        repeat: whether to repeat forever.
        drop_remainder: whether to drop the last, smaller batch.
    """
    if shuffle and seed is not None:
        ds = reproducible_shuffle(
            ds, _SHUFFLE_BUFFER, seed, passes=None if repeat else 1
        )
    else:
        if shuffle:
            ds = ds.shuffle(_SHUFFLE_BUFFER)
        if repeat:
            ds = ds.repeat()
    return ds.batch(batch_size, drop_remainder=drop_remainder).prefetch(
        tf.data.AUTOTUNE
    )


def classification_dataset(
    name,
    split,
    batch_size,
    *,
    shuffle=False,
    seed=None,
    repeat=False,
    drop_remainder=False,
    data_dir=None,
):
    """Returns batches of `(images, labels)` of an image dataset.

    Args:
        name: `"digits"`, `"composed_digits"` or another prepared dataset
            with uint8 `image` and integer `label` features.
        split: a split of that dataset (TFDS split syntax allowed).
        batch_size: examples per batch.
        shuffle: whether to shuffle examples.
        seed: shuffle seed (an int); None for a random order.
        repeat: whether to repeat forever.
        drop_remainder: whether to drop the last, smaller batch.
        data_dir: TFDS data directory; `default_data_dir()` if None.

    Returns:
        A `tf.data.Dataset` of `(images <float32>[B, H, W, C] = uint8 /
        255, labels <int32>[B])`.

    Example:

    >>> import tempfile
    >>> ds = classification_dataset("digits", "test", 32,
    ...                             data_dir=tempfile.mkdtemp())
    >>> images, labels = next(iter(ds))
    >>> tuple(images.shape), labels.dtype.name
    ((32, 8, 8, 1), 'int32')
    """
    check_positive_int("batch_size", batch_size)
    ds = registry.load(name, split, data_dir)
    spec = ds.element_spec
    if not {"image", "label"} <= set(spec):
        raise ValueError(
            f"classification_dataset needs 'image' and 'label' features; "
            f"{name} has {sorted(spec)}"
        )
    if spec["image"].dtype != tf.uint8:
        raise ValueError(
            f"classification_dataset needs uint8 images; {name}'s are "
            f"{spec['image'].dtype.name}"
        )

    def to_float(example):
        image = tf.cast(example["image"], tf.float32) / 255.0
        return image, tf.cast(example["label"], tf.int32)

    ds = ds.map(to_float, num_parallel_calls=tf.data.AUTOTUNE).cache()
    return finish(ds, batch_size, shuffle, seed, repeat, drop_remainder)


def t5_features(encoder_ids, target_ids, input_length, target_length):
    """Pads one example into the `(inputs, targets)` T5 trains on.

    Args:
        encoder_ids: <int32>[t] encoder tokens, `EOS_ID` included,
            t <= input_length.
        target_ids: <int32>[u] target tokens, `EOS_ID` included,
            u <= target_length.
        input_length: T.
        target_length: U.

    Returns:
        `(inputs, targets)`: the dict of the module docstring (unbatched)
        and <int32>[U].
    """
    encoder = tf.pad(encoder_ids, [[0, input_length - tf.size(encoder_ids)]])
    targets = tf.pad(target_ids, [[0, target_length - tf.size(target_ids)]])
    encoder = tf.ensure_shape(encoder, [input_length])
    targets = tf.ensure_shape(targets, [target_length])
    # (U,) -> (U,): start id 0 in front, last target dropped.
    decoder = tf.concat([[vocabulary.PAD_ID], targets[:-1]], 0)
    inputs = {
        "encoder_token_ids": encoder,
        "decoder_token_ids": decoder,
        "encoder_padding_mask": encoder != vocabulary.PAD_ID,
        "decoder_padding_mask": targets != vocabulary.PAD_ID,
    }
    return inputs, targets


def _check_languages(languages):
    if languages is None:
        return tuple(LANGUAGES)
    if isinstance(languages, str):
        languages = (languages,)
    if not all(isinstance(language, str) for language in languages):
        raise ValueError(
            f"languages must be language codes (str) from "
            f"{sorted(LANGUAGES)}; received {languages!r}"
        )
    languages = tuple(languages)
    if not languages or not set(languages) <= set(LANGUAGES):
        raise ValueError(
            f"languages must be a non-empty subset of {sorted(LANGUAGES)}; "
            f"received {languages!r}"
        )
    return tuple(sorted(set(languages), key=list(LANGUAGES).index))


def _check_seq2seq_name(name):
    if name not in SEQ2SEQ_DATASETS:
        raise ValueError(
            f"seq2seq_dataset supports {list(SEQ2SEQ_DATASETS)}; received "
            f"{name!r}"
        )


def _tokenized(name, split, languages, data_dir):
    """Returns `number_words` examples as (encoder ids, target ids) + EOS."""
    sp = vocabulary.tokenizer(data_dir)
    ds = registry.load(name, split, data_dir)
    wanted = tf.constant(languages)
    ds = ds.filter(lambda ex: tf.reduce_any(ex["language"] == wanted))
    eos = tf.constant([vocabulary.EOS_ID], tf.int32)

    def tokenize(example):
        return (
            tf.concat([sp.tokenize(example["inputs"]), eos], 0),
            tf.concat([sp.tokenize(example["targets"]), eos], 0),
        )

    return ds.map(tokenize, num_parallel_calls=tf.data.AUTOTUNE)


@functools.lru_cache(maxsize=16)
def _language_lengths(model_path, data_dir, name, split):
    """Maps each language to its longest (input, target) ids, EOS included."""
    del model_path  # Part of the cache key only: lengths depend on it.
    sp = vocabulary.tokenizer(data_dir)

    def lengths(batch):
        return (
            batch["language"],
            sp.tokenize(batch["inputs"]).row_lengths() + 1,
            sp.tokenize(batch["targets"]).row_lengths() + 1,
        )

    ds = registry.load(name, split, data_dir).batch(_LENGTH_BATCH)
    longest = {}
    for languages, inputs, targets in ds.map(lengths).as_numpy_iterator():
        for language in set(languages):
            rows = languages == language
            previous = longest.get(language.decode(), (0, 0))
            longest[language.decode()] = (
                max(previous[0], int(inputs[rows].max())),
                max(previous[1], int(targets[rows].max())),
            )
    return longest


def seq2seq_lengths(name, split, languages=None, data_dir=None):
    """Returns the longest tokenized (input, target) of a split, EOS included.

    These are the smallest `input_length` / `target_length` that
    `seq2seq_dataset` accepts for the same arguments.

    Args:
        name: `"number_words"`.
        split: a split of it.
        languages: language codes to keep; None for all of `LANGUAGES`.
        data_dir: TFDS data directory; `default_data_dir()` if None.
    """
    _check_seq2seq_name(name)
    languages = _check_languages(languages)
    registry.check_split(name, split, registry.SPLITS[name])
    data_dir = registry.resolve_data_dir(data_dir)
    path = vocabulary.sentencepiece_model_path(data_dir)
    longest = _language_lengths(path, data_dir, name, split)
    return tuple(
        max(longest[language][i] for language in languages) for i in (0, 1)
    )


def seq2seq_dataset(
    name,
    split,
    batch_size,
    input_length,
    target_length,
    *,
    languages=None,
    shuffle=False,
    seed=None,
    repeat=False,
    drop_remainder=False,
    data_dir=None,
):
    """Returns tokenized, padded T5 batches of a text-to-text dataset.

    Args:
        name: `"number_words"`.
        split: `"train"`, `"validation"` or `"test"` (TFDS split syntax
            allowed).
        batch_size: examples per batch.
        input_length: T, encoder length; at least the longest tokenized
            input (EOS included), else ValueError.
        target_length: U, decoder length; at least the longest tokenized
            target (EOS included), else ValueError.
        languages: language codes to keep (a subset of `LANGUAGES`); None
            for all.
        shuffle: whether to shuffle examples.
        seed: shuffle seed (an int); None for a random order.
        repeat: whether to repeat forever.
        drop_remainder: whether to drop the last, smaller batch.
        data_dir: TFDS data directory; `default_data_dir()` if None.

    Returns:
        A `tf.data.Dataset` of `(inputs, targets <int32>[B, U])`, `inputs`
        the dict of the module docstring.
    """
    _check_seq2seq_name(name)
    check_positive_int("batch_size", batch_size)
    check_positive_int("input_length", input_length)
    check_positive_int("target_length", target_length)
    languages = _check_languages(languages)
    needed = seq2seq_lengths(name, split, languages, data_dir)
    if input_length < needed[0] or target_length < needed[1]:
        raise ValueError(
            f"{name} {split!r} in {list(languages)} needs input_length >= "
            f"{needed[0]} and target_length >= {needed[1]} (longest "
            f"tokenized sequences, EOS included; nothing is truncated); "
            f"received input_length={input_length}, "
            f"target_length={target_length}"
        )
    ds = _tokenized(name, split, languages, data_dir).map(
        lambda x, y: t5_features(x, y, input_length, target_length),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    # Tokenized once; later epochs read the cache.
    ds = ds.cache()
    return finish(ds, batch_size, shuffle, seed, repeat, drop_remainder)
