"""Reproduction experiments, registered here by name.

Each experiment is a module of this package with one entry point,

    run(output_dir, seeds=(0, 1, 2), small=False, options=None) -> dict

that trains and evaluates what it reproduces once per seed, writes
`results.csv`, `results.md` and one or more PNG plots into `output_dir`
(each file written to a temporary name and renamed, so that no half-written
file is left behind), prints its progress, and returns a dict with at least
`"rows"`, the list of result rows it wrote. `small=True` is a smoke-test
size for continuous integration. `options` holds the ablation settings the
user asked for (see `OPTION_NAMES`); an experiment that receives an option
it does not support raises a ValueError naming it, before any work. A
module may list the options it accepts in `SUPPORTED_OPTIONS` (a tuple of
names): the launcher then rejects the others before importing anything
heavy or starting a run (`check_module_options`), and calls the module's
`validate_options(options)` when it has one, so that bad option values too
fail before any work.

`EXPERIMENTS` maps each name to its module; modules are imported only when
an experiment runs (`get`), so listing the names costs no TensorFlow import.
"""

import importlib

from keras_moe.utils.checks import check_positive_int

# name -> module under keras_moe.experiments
EXPERIMENTS = {
    "e3": "keras_moe.experiments.e3",
    "upcycle_vit": "keras_moe.experiments.upcycle_vit",
    "upcycle_t5": "keras_moe.experiments.upcycle_t5",
    "vlm": "keras_moe.experiments.vlm",
}

# Ablation options an experiment may accept in `options`.
OPTION_NAMES = (
    "num_experts",
    "capacity_factor",
    "router",
    "moe_blocks",
    "expert_noise",
    "reinit_fraction",
    "reuse_optimizer_state",
    "optimizer_state",
    "normalize_combine_weights",
    "budgets",
)


def names():
    """The registered experiment names, sorted."""
    return sorted(EXPERIMENTS)


def get(name):
    """Imports and returns the module of experiment `name`.

    Args:
        name: a key of `EXPERIMENTS`.

    Returns:
        The module; its `run` function runs the experiment.

    Example:

    >>> get("e3").__name__
    'keras_moe.experiments.e3'
    """
    if name not in EXPERIMENTS:
        raise ValueError(
            f"Unknown experiment {name!r}; registered: {', '.join(names())}"
        )
    try:
        return importlib.import_module(EXPERIMENTS[name])
    except ModuleNotFoundError as e:
        if e.name != EXPERIMENTS[name]:
            raise
        raise ValueError(
            f"Experiment {name!r} is registered but its module "
            f"{EXPERIMENTS[name]} is not installed"
        ) from e


def check_options(name, options, supported):
    """Raises a ValueError if `options` holds a key not in `supported`.

    Experiments call it first thing in `run`, before any work.

    Args:
        name: the experiment's name, for the message.
        options: None or a dict {option name: value}.
        supported: the option names the experiment accepts.

    Returns:
        A new dict of the options (empty for None).
    """
    options = dict(options or {})
    unknown = sorted(set(options) - set(supported))
    if unknown:
        raise ValueError(
            f"Experiment {name!r} does not support option(s) "
            f"{', '.join(unknown)}; it accepts: "
            f"{', '.join(sorted(supported)) or 'none'}"
        )
    return options


def check_module_options(module, options):
    """Checks `options` against `module.SUPPORTED_OPTIONS` and with
    `module.validate_options(options)`, for each that the module has.

    Args:
        module: an experiment module.
        options: None or a dict {option name: value}.

    Returns:
        A new dict of the options.
    """
    options = dict(options or {})
    supported = getattr(module, "SUPPORTED_OPTIONS", None)
    if supported is not None:
        name = module.__name__.rsplit(".", 1)[-1]
        options = check_options(name, options, supported)
    validate = getattr(module, "validate_options", None)
    if validate is not None:
        validate(dict(options))
    return options


def parse_moe_blocks(value):
    """Parses a `moe_blocks` option into `upcycle` arguments.

    Args:
        value: "every_other", "all" or "last_n:<n>" with n >= 1.

    Returns:
        (blocks, last_n): e.g. ("last_n", 2) or ("all", None).

    Example:

    >>> parse_moe_blocks("last_n:2")
    ('last_n', 2)
    """
    if value in ("every_other", "all"):
        return value, None
    if isinstance(value, str) and value.startswith("last_n:"):
        count = value[len("last_n:") :]
        if count.isdigit() and int(count) >= 1:
            return "last_n", int(count)
    raise ValueError(
        "moe_blocks must be 'every_other', 'all' or 'last_n:<n>' with "
        f"n >= 1; received {value!r}"
    )


def parse_seeds(values):
    """Seeds from command-line strings ("0", "1", ...), validated.

    Args:
        values: a list of strings (absl's list flag), or one
            comma-separated string.

    Returns:
        A tuple of distinct ints.

    Example:

    >>> parse_seeds("0,1,2")
    (0, 1, 2)
    """
    if isinstance(values, str):
        values = [v for v in values.split(",") if v.strip()]
    text = ",".join(values)
    try:
        seeds = tuple(int(v) for v in values)
    except ValueError:
        raise ValueError(
            f"seeds must be comma-separated integers; received {text!r}"
        ) from None
    if not seeds:
        raise ValueError("seeds must name at least one seed")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct; received {text!r}")
    return seeds


def check_option_values(options):
    """Validates the values of ablation options; returns a normalised copy.

    `budgets` may be given as strings (a list flag) and comes back as a
    tuple of floats; `moe_blocks` is checked with `parse_moe_blocks` and
    kept as given.

    Args:
        options: a dict {option name: value}, names from `OPTION_NAMES`.

    Returns:
        A new dict.
    """
    options = dict(options)
    unknown = sorted(set(options) - set(OPTION_NAMES))
    if unknown:
        raise ValueError(
            f"Unknown option(s) {', '.join(unknown)}; known: "
            f"{', '.join(OPTION_NAMES)}"
        )

    def fail(name, expected):
        raise ValueError(
            f"{name} must be {expected}; received {options[name]!r}"
        )

    def is_number(value):
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    if "num_experts" in options:
        check_positive_int("num_experts", options["num_experts"])
    if "capacity_factor" in options:
        value = options["capacity_factor"]
        if not (is_number(value) and value > 0):
            fail("capacity_factor", "a number > 0")
    if "router" in options and options["router"] not in (
        "experts_choose",
        "tokens_choose",
    ):
        fail("router", "'experts_choose' or 'tokens_choose'")
    if "moe_blocks" in options:
        parse_moe_blocks(options["moe_blocks"])
    if "expert_noise" in options:
        value = options["expert_noise"]
        if not (is_number(value) and value >= 0):
            fail("expert_noise", "a number >= 0")
    if "reinit_fraction" in options:
        value = options["reinit_fraction"]
        if not (is_number(value) and 0 <= value <= 1):
            fail("reinit_fraction", "a number in [0, 1]")
    if "reuse_optimizer_state" in options and not isinstance(
        options["reuse_optimizer_state"], bool
    ):
        fail("reuse_optimizer_state", "a bool")
    if "optimizer_state" in options and options["optimizer_state"] not in (
        "rescale",
        "copy",
        "reset",
    ):
        fail("optimizer_state", "one of rescale, copy, reset")
    if "normalize_combine_weights" in options and not isinstance(
        options["normalize_combine_weights"], bool
    ):
        fail("normalize_combine_weights", "a bool")
    if "budgets" in options:
        values = options["budgets"]
        if isinstance(values, str):
            values = values.split(",")
        try:
            budgets = tuple(float(v) for v in values)
        except (TypeError, ValueError):
            fail("budgets", "comma-separated numbers > 0")
        if not budgets or not all(b > 0 for b in budgets):
            fail("budgets", "comma-separated numbers > 0")
        options["budgets"] = budgets
    return options
