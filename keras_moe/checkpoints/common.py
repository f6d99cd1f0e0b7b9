"""Strict, all-or-nothing assignment of named arrays into a keras_moe model.

Every reader turns its source format into a dict of canonical weight names
(the names a model's `canonical_variables()` returns) to NumPy arrays (or
lazy arrays, see `keras_moe.checkpoints.io`) and calls `assign_weights`.
Nothing is assigned unless every name matches and every shape agrees, so a
failed load never leaves a half-loaded model. `config_kwargs` reads the
`config` argument every reader takes; `listing` words long lists in errors.
"""

import inspect

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
        problems.append(f"missing from the {source}: {listing(missing)}")
    if unexpected:
        problems.append(f"unexpected in the {source}: {listing(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches: {listing(mismatched)}")
    if problems:
        raise CheckpointMismatchError(
            f"Cannot load {source} into {type(model).__name__}: "
            + "; ".join(problems)
        )
    for name, variable in variables.items():
        variable.assign(np.asarray(arrays[name], dtype=variable.dtype))
    return model


def listing(items, limit=20):
    """`items` as "a, b, c (and 7 more)", for error messages."""
    items = list(items)
    shown = ", ".join(str(item) for item in items[:limit])
    more = len(items) - limit
    return f"{shown} (and {more} more)" if more > 0 else shown


def config_kwargs(config, model_class, architecture_config):
    """The model kwargs a reader's `config` argument gives.

    Args:
        config: None, an architecture name or a dict of `model_class` kwargs.
        model_class: `T5`, `ViT`, ...: the keys must be its `__init__`'s.
        architecture_config: architecture name -> kwargs dict
            (`t5_config`, ...).

    Returns:
        A new dict of kwargs ({} for None).

    Raises:
        ValueError: another type, an unknown architecture or unknown keys.
    """
    name = model_class.__name__
    if config is None:
        return {}
    if isinstance(config, str):
        config = architecture_config(config)
    if not isinstance(config, dict):
        raise ValueError(
            f"config must be None, a {name} architecture name or a dict of "
            f"{name} kwargs; received {type(config).__name__}."
        )
    accepted = set(inspect.signature(model_class.__init__).parameters)
    accepted -= {"self", "kwargs"}
    unknown = sorted(set(config) - accepted)
    if unknown:
        raise ValueError(
            f"config has keys {name} does not take: {unknown}; {name} takes "
            f"{sorted(accepted)}."
        )
    return dict(config)
