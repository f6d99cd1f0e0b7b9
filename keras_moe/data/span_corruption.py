"""T5's span-corruption objective over the `pydoc_corpus` text.

Raffel et al. 2020, section 3.1.4: in a run of n tokens, `noise_density`
of them (rounded) are noise, grouped into spans of mean length
`mean_noise_span_length`. The input keeps the other tokens and replaces
each noise span by one sentinel; the target lists each sentinel followed by
the span it replaced. With sentinels s0, s1, ... (`sentinel_id(i)`, counting
down from the top of the vocabulary) and spans alternating clean / noise,
always starting clean:

    tokens   a b c d e f g h       (noise: c d and g)
    inputs   a b s0 e f s1 h EOS
    targets  s0 c d s1 g s2 EOS

(`noise_span_mask` always ends with a noise span, as T5's does, so a
target's last sentinel is the one before the last noise span.)

Shape letters: B batch, n raw tokens per example, T input length, U target
length.

`span_corruption_dataset` tokenizes the paragraphs of a `pydoc_corpus`
split, concatenates them in order (no separator), cuts the stream into runs
of n tokens (the longest whose corrupted input fits in T, see
`span_corruption_lengths`; a last shorter run is dropped) and corrupts each
run with a noise mask drawn from `seed` and the run's position in the
stream, so a dataset is reproducible, and each repetition (`repeat=True`)
draws new masks.
"""

import tensorflow as tf

from keras_moe.data import registry
from keras_moe.data import vocabulary
from keras_moe.data.pipelines import check_positive_int
from keras_moe.data.pipelines import finish
from keras_moe.data.pipelines import t5_features
from keras_moe.utils.checks import check_int

SPAN_CORRUPTION_DATASET = "pydoc_corpus"


def span_counts(length, noise_density, mean_noise_span_length):
    """Returns `(num_noise_tokens, num_noise_spans)` for a run of `length`.

    `round(length * noise_density)` noise tokens, kept in [1, length - 1],
    in `round(num_noise_tokens / mean_noise_span_length)` spans, at least
    one and at most the number of clean tokens.
    """
    num_noise = min(max(round(length * noise_density), 1), length - 1)
    num_spans = max(round(num_noise / mean_noise_span_length), 1)
    # Each span needs a clean span before it.
    return num_noise, min(num_spans, length - num_noise)


def _check_noise(noise_density, mean_noise_span_length):
    if not 0.0 < noise_density < 1.0:
        raise ValueError(
            f"noise_density must be in (0, 1); received {noise_density!r}"
        )
    if not mean_noise_span_length >= 1.0:
        raise ValueError(
            "mean_noise_span_length must be >= 1; received "
            f"{mean_noise_span_length!r}"
        )


def span_corruption_lengths(
    input_length, noise_density=0.15, mean_noise_span_length=3.0
):
    """Returns `(raw_length, target_length)` for corrupted inputs of T.

    Args:
        input_length: T, the encoder length; EOS included.
        noise_density: fraction of noise tokens.
        mean_noise_span_length: mean noise span length.

    Returns:
        `(n, U)`: n the largest raw run whose corrupted input (clean tokens,
        one sentinel per span, EOS) is at most T long, and U its target
        length (noise tokens, one sentinel per span, EOS). Every example of
        `span_corruption_dataset` has exactly these lengths before padding.
    """
    check_positive_int("input_length", input_length)
    _check_noise(noise_density, mean_noise_span_length)

    def corrupted(n):
        num_noise, num_spans = span_counts(
            n, noise_density, mean_noise_span_length
        )
        return n - num_noise + num_spans + 1, num_noise + num_spans + 1

    n = 2  # The shortest run with a clean and a noise token.
    if corrupted(n)[0] > input_length:
        raise ValueError(
            f"input_length={input_length} is too short for span corruption; "
            f"it needs at least {corrupted(n)[0]}"
        )
    # The input length grows by at most one per raw token: walk up.
    while corrupted(n + 1)[0] <= input_length:
        n += 1
    return n, corrupted(n)[1]


def _random_segmentation(num_items, num_segments, seed):
    """Splits `num_items` into `num_segments` random positive lengths.

    The `num_segments - 1` segment starts are a uniform random subset of
    positions 1 .. num_items - 1.

    Returns:
        <int32>[num_segments], summing to `num_items`.
    """
    # A random permutation of the num_items - 1 possible starts.
    order = tf.argsort(tf.random.stateless_uniform([num_items - 1], seed))
    is_start = tf.concat([[False], order < num_segments - 1], 0)
    segment = tf.cumsum(tf.cast(is_start, tf.int32))
    return tf.math.unsorted_segment_sum(
        tf.ones([num_items], tf.int32), segment, num_segments
    )


def noise_span_mask(length, noise_density, mean_noise_span_length, seed):
    """Draws T5's noise mask for a run of `length` tokens.

    Args:
        length: n, a Python int >= 2.
        noise_density: fraction of noise tokens (`span_counts`).
        mean_noise_span_length: mean noise span length.
        seed: <int32>[2] stateless random seed.

    Returns:
        <bool>[n]: True on noise. Exactly `span_counts(n, ...)` noise tokens
        in that many spans; the first token is never noise.
    """
    check_int("length", length, minimum=2)
    _check_noise(noise_density, mean_noise_span_length)
    num_noise, num_spans = span_counts(
        length, noise_density, mean_noise_span_length
    )
    seeds = tf.random.experimental.stateless_split(seed, 2)
    noise_lengths = _random_segmentation(num_noise, num_spans, seeds[0])
    clean_lengths = _random_segmentation(
        length - num_noise, num_spans, seeds[1]
    )
    # (spans,) x 2 -> (2 * spans,): clean, noise, clean, noise, ...
    lengths = tf.reshape(tf.stack([clean_lengths, noise_lengths], 1), [-1])
    starts = tf.cumsum(lengths)[:-1]
    is_start = tf.scatter_nd(
        starts[:, None], tf.ones_like(starts), [length]
    )  # 1 where a new span begins
    return tf.cumsum(is_start) % 2 == 1


def _spans_to_sentinels(tokens, mask, vocab_size):
    """Replaces each run of `mask` by one sentinel, counting from 0."""
    previous = tf.concat([[False], mask[:-1]], 0)
    first = mask & ~previous
    # Span k (from 0) gets vocab_size - 1 - k.
    sentinels = vocab_size - tf.cumsum(tf.cast(first, tokens.dtype))
    return tf.boolean_mask(
        tf.where(first, sentinels, tokens), ~previous | ~mask
    )


def corrupt_spans(tokens, noise_mask, vocab_size=vocabulary.VOCAB_SIZE):
    """Applies span corruption to one run of tokens.

    Args:
        tokens: <int32>[n] token ids below the sentinel ids.
        noise_mask: <bool>[n] True on noise (e.g. from `noise_span_mask`).
        vocab_size: the model vocabulary size; sentinel k is
            `vocab_size - 1 - k`.

    Returns:
        `(inputs, targets)`, <int32>[t] and <int32>[u], each ending with
        `EOS_ID`: inputs with each noise span replaced by its sentinel,
        targets with each clean span replaced by its sentinel (so each
        sentinel is followed by the noise it stands for).

    Example (the module docstring's):

    >>> inputs, targets = corrupt_spans(
    ...     [3, 4, 5, 6, 7, 8, 9, 10], [0, 0, 1, 1, 0, 0, 1, 0], 2100
    ... )
    >>> inputs.numpy().tolist()
    [3, 4, 2099, 7, 8, 2098, 10, 1]
    >>> targets.numpy().tolist()
    [2099, 5, 6, 2098, 9, 2097, 1]
    """
    tokens = tf.convert_to_tensor(tokens, tf.int32)
    noise_mask = tf.cast(tf.convert_to_tensor(noise_mask), tf.bool)
    eos = tf.constant([vocabulary.EOS_ID], tf.int32)
    inputs = _spans_to_sentinels(tokens, noise_mask, vocab_size)
    targets = _spans_to_sentinels(tokens, ~noise_mask, vocab_size)
    return tf.concat([inputs, eos], 0), tf.concat([targets, eos], 0)


def span_corruption_dataset(
    split,
    batch_size,
    input_length=128,
    *,
    noise_density=0.15,
    mean_noise_span_length=3.0,
    seed=0,
    shuffle=False,
    repeat=False,
    drop_remainder=False,
    data_dir=None,
):
    """Returns T5 span-corruption batches of the `pydoc_corpus` text.

    Args:
        split: `"train"` or `"validation"` of `pydoc_corpus`.
        batch_size: examples per batch.
        input_length: T, the encoder length.
        noise_density: fraction of noise tokens (T5: 0.15).
        mean_noise_span_length: mean noise span length (T5: 3).
        seed: int seed of the noise masks and of the shuffle.
        shuffle: whether to shuffle the corrupted runs.
        repeat: whether to repeat forever, with new masks each time.
        drop_remainder: whether to drop the last, smaller batch.
        data_dir: TFDS data directory; `default_data_dir()` if None.

    Returns:
        A `tf.data.Dataset` of `(inputs, targets <int32>[B, U])` in the
        format of `keras_moe.data.pipelines` (U from
        `span_corruption_lengths(T, ...)`).
    """
    check_positive_int("batch_size", batch_size)
    check_int("seed", seed, minimum=None)
    raw_length, target_length = span_corruption_lengths(
        input_length, noise_density, mean_noise_span_length
    )
    _, num_spans = span_counts(
        raw_length, noise_density, mean_noise_span_length
    )
    if num_spans > vocabulary.NUM_EXTRA_IDS:
        raise ValueError(
            f"input_length={input_length} gives {num_spans} noise spans, "
            f"more than the {vocabulary.NUM_EXTRA_IDS} sentinel ids"
        )
    registry.check_split(
        SPAN_CORRUPTION_DATASET,
        split,
        registry.SPLITS[SPAN_CORRUPTION_DATASET],
    )
    sp = vocabulary.tokenizer(data_dir)
    ds = registry.load(SPAN_CORRUPTION_DATASET, split, data_dir)
    # Paragraphs -> one token stream -> runs of raw_length tokens.
    ds = ds.map(lambda ex: sp.tokenize(ex["text"]))
    ds = ds.unbatch().batch(raw_length, drop_remainder=True)
    if repeat:
        ds = ds.repeat()

    def corrupt(index, tokens):
        mask = noise_span_mask(
            raw_length,
            noise_density,
            mean_noise_span_length,
            tf.stack([tf.constant(seed, tf.int64), index]),
        )
        inputs, targets = corrupt_spans(tokens, mask)
        return t5_features(inputs, targets, input_length, target_length)

    ds = ds.enumerate().map(corrupt, num_parallel_calls=tf.data.AUTOTUNE)
    return finish(ds, batch_size, shuffle, seed, False, drop_remainder)
