"""A seeded shuffle that is the same stream on every iteration.

TensorFlow's seeded `Dataset.shuffle` reshuffles each time the dataset is
iterated, so a training run resumed from a checkpoint would not see the data
an uninterrupted run sees. `reproducible_shuffle` draws each pass's order
statelessly from (seed, pass), so that it does.
"""

import tensorflow as tf

from keras_moe.utils.checks import check_int


def reproducible_shuffle(dataset, buffer_size, seed, passes=None):
    """`dataset` repeated, each pass shuffled its own way, reproducibly.

    Pass p is shuffled as `dataset.shuffle(buffer_size)` does, with seeds
    drawn statelessly from (seed, p): each pass has a new order, and every
    iteration of the result yields the same elements in the same order, so
    `fit_resumable` can resume it at any step (see the module docstring).

    Args:
        dataset: a finite `tf.data.Dataset` of dense tensors (examples,
            before batching).
        buffer_size: the shuffle buffer size (the dataset's size for a full
            shuffle).
        seed: int seed of the whole stream.
        passes: number of passes; None repeats forever.

    Returns:
        The shuffled, repeated `tf.data.Dataset`.

    Example:

    >>> import tensorflow as tf
    >>> stream = reproducible_shuffle(tf.data.Dataset.range(4), 4, seed=1)
    >>> first = [int(x) for x in stream.take(8)]
    >>> first == [int(x) for x in stream.take(8)]
    True
    >>> sorted(first[:4]) == sorted(first[4:]) == [0, 1, 2, 3]
    True
    """
    if not isinstance(dataset, tf.data.Dataset):
        raise ValueError(
            f"dataset must be a tf.data.Dataset; received "
            f"{type(dataset).__name__}"
        )
    check_int("buffer_size", buffer_size)
    check_int("seed", seed, minimum=0)
    if passes is not None:
        check_int("passes", passes)
    spec = dataset.element_spec
    components = tf.nest.flatten(spec)
    if not all(isinstance(c, tf.TensorSpec) for c in components):
        raise ValueError(
            "reproducible_shuffle takes datasets of dense tensors; received "
            f"element_spec={spec!r}"
        )
    seed = tf.constant(seed, tf.int64)

    def one_pass(index):
        # (seed, pass) -> the two int64 seeds of this pass's shuffle, drawn
        # statelessly. The op is called directly: `Dataset.shuffle` fails on
        # seed tensors when the global seed is 0 (its seed checks compare
        # the tensor in Python).
        seeds = tf.random.stateless_uniform(
            [2], seed=tf.stack([seed, index]), minval=None, dtype=tf.int64
        )
        shuffled = tf.raw_ops.ShuffleDatasetV3(
            input_dataset=tf.data.experimental.to_variant(dataset),
            buffer_size=tf.constant(buffer_size, tf.int64),
            seed=seeds[0],
            seed2=seeds[1],
            seed_generator=tf.raw_ops.DummySeedGenerator(),
            output_types=[c.dtype for c in components],
            output_shapes=[c.shape for c in components],
            reshuffle_each_iteration=False,
        )
        return tf.data.experimental.from_variant(shuffled, spec)

    if passes is None:
        indices = tf.data.Dataset.counter()
    else:
        indices = tf.data.Dataset.range(passes)
    return indices.flat_map(one_pass)
