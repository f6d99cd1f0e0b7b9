"""Exact match of generated token ids against target ids.

Shape letters: B examples, U generated or target tokens.

Every scorer of greedy generation here (`scoring.score_translation`, the
T5 and vision-language experiments) compares a generation with its target
the same way: the ids after the decoder's start id, up to and including the
first end-of-sequence id, must equal the target's. What follows that id
differs by scorer, so it is a parameter: ignored (`compare_after_eos=False`,
the default: a model that pads after its end of sequence and one that goes
on writing are scored alike), or compared too (`True`: the row must equal
the target's whole row, padding included, which catches a generator that
does not stop at the end of sequence).

Example:

    generated = model.generate(inputs, targets.shape[1] + 1)[:, 1:]
    rate = np.mean(exact_matches(generated, targets))
"""

import numpy as np

from keras_moe.data.vocabulary import EOS_ID


def until_eos(ids, eos_id=EOS_ID):
    """Token ids up to and including the first `eos_id` (all of them when
    there is none), as a list of Python ints.

    Example:

    >>> until_eos([5, 6, 1, 0, 7])
    [5, 6, 1]
    >>> until_eos([5, 6])
    [5, 6]
    """
    ids = [int(i) for i in ids]
    if eos_id in ids:
        ids = ids[: ids.index(eos_id) + 1]
    return ids


def exact_matches(generated, targets, eos_id=EOS_ID, compare_after_eos=False):
    """Whether each generated row equals its target row (see module doc).

    Args:
        generated: <int>[B, U] generated ids, the decoder's start id
            dropped (rows of a list may differ in length).
        targets: <int>[B, U'] target ids, each ending with `eos_id` and
            then padding (a row without `eos_id` is compared whole).
        eos_id: the end-of-sequence id.
        compare_after_eos: False compares each row up to and including its
            first `eos_id`; True compares whole rows, so the ids after
            `eos_id` must equal the target's padding too.

    Returns:
        A list of B bools.

    Raises:
        ValueError: `generated` and `targets` hold different numbers of
            rows.

    Example:

    >>> exact_matches([[5, 1, 0], [5, 1, 7]], [[5, 1, 0], [5, 1, 0]])
    [True, True]
    >>> exact_matches(
    ...     [[5, 1, 0], [5, 1, 7]], [[5, 1, 0], [5, 1, 0]],
    ...     compare_after_eos=True,
    ... )
    [True, False]
    """
    generated, targets = list(generated), list(targets)
    if len(generated) != len(targets):
        raise ValueError(
            f"generated holds {len(generated)} rows and targets "
            f"{len(targets)}; one generation per target is expected"
        )

    def compared(ids):
        ids = [int(i) for i in np.ravel(ids)]
        return ids if compare_after_eos else until_eos(ids, eos_id)

    return [compared(g) == compared(t) for g, t in zip(generated, targets)]
