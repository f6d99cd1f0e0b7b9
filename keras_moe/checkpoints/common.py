"""Strict, all-or-nothing assignment of named arrays into a keras_moe model.

Every reader turns its source format into a dict of canonical weight names
(the names a model's `canonical_variables()` returns) to NumPy arrays and
calls `assign_weights`. Nothing is assigned unless every name matches and
every shape agrees, so a failed load never leaves a half-loaded model.
"""

import numpy as np


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model; the message lists every problem."""


def assign_weights(model, arrays, source="checkpoint"):
    """Assigns `arrays` (canonical name -> array) to `model`'s variables.

    Args:
        model: a keras_moe model with a `canonical_variables()` method
            returning canonical name -> `keras.Variable`.
        arrays: dict canonical name -> array-like.
        source: a description of where the arrays come from, for errors.

    Raises:
        CheckpointMismatchError (a ValueError) listing missing names,
        unexpected names and shape mismatches, before anything is assigned.
    """
    variables = model.canonical_variables()
    missing = sorted(set(variables) - set(arrays))
    unexpected = sorted(set(arrays) - set(variables))
    mismatched = []
    for name in sorted(set(variables) & set(arrays)):
        want = tuple(variables[name].shape)
        got = tuple(np.shape(arrays[name]))
        if want != got:
            mismatched.append(f"{name}: checkpoint {got}, model {want}")
    problems = []
    if missing:
        problems.append(f"missing from the {source}: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected in the {source}: {_listing(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches: {_listing(mismatched)}")
    if problems:
        raise CheckpointMismatchError(
            f"Cannot load {source} into {type(model).__name__}: "
            + "; ".join(problems)
        )
    for name, variable in variables.items():
        variable.assign(np.asarray(arrays[name], dtype=variable.dtype))
    return model


def _listing(items, limit=20):
    shown = ", ".join(items[:limit])
    more = len(items) - limit
    return f"{shown} (and {more} more)" if more > 0 else shown
