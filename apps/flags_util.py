"""Flag checks shared by the launchers, and `run`, their `app.run`.

Every launcher validates all its flags while absl parses them, before any
work starts: absl validators (`register_*` below), required flags and enum
flags. A wrong flag ends the process with exit code 2 and one line per
wrong flag on stderr, naming the flag (wrapped here):

    error: flag --checkpoint=/tmp/nope: no checkpoint or model file at
        '/tmp/nope'
    error: flags dataset=nope, tfds_data_dir=None: --dataset='nope' is not
        a keras_moe dataset [...] and is not prepared in ...; available: [...]

An error the library raises later (a `ValueError`: a checkpoint no reader
takes, a dataset that does not fit the model) ends it with exit code 1 and
one line, `error: <message>`, without a traceback.

The checks here import nothing heavy, except the dataset and mesh checks,
which need `keras_moe.data` and `keras_moe.distribution.mesh` (TensorFlow;
the mesh check lists the devices only for a spec that parses).
"""

import os
import sys

from absl import app
from absl import flags

# TensorFlow's C++ INFO and WARNING lines are noise in a launcher's output;
# set before any launcher imports TensorFlow.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

FLAGS = flags.FLAGS
USAGE_EXIT_CODE = 2
ERROR_EXIT_CODE = 1
_NONE = ("none", "null", "")


def fail(message, exit_code=ERROR_EXIT_CODE):
    """Writes `error: <message>` as one line to stderr and exits."""
    one_line = " ".join(str(message).split())
    sys.stderr.write(f"error: {one_line}\n")
    sys.exit(exit_code)


def _parse(argv):
    """absl's flag parsing, each problem reported on one line."""
    try:
        return FLAGS(argv)
    except flags.Error as error:
        lines = [line.strip() for line in str(error).splitlines()]
        for line in filter(None, lines):
            sys.stderr.write(f"error: {line}\n")
        sys.exit(USAGE_EXIT_CODE)


def run(main):
    """`app.run(main)` with one-line errors for flags and `ValueError`s."""

    def guarded(argv):
        if not FLAGS["verbosity"].present:
            # absl turns INFO logging on after parsing; keep to warnings
            # (progress is printed), unless --verbosity asks otherwise.
            FLAGS.verbosity = -1
        if len(argv) > 1:
            fail(
                f"unexpected positional arguments {argv[1:]}; every input "
                "is a --flag",
                USAGE_EXIT_CODE,
            )
        try:
            return main(argv)
        except (ValueError, FileExistsError, FileNotFoundError) as error:
            fail(error)

    app.run(guarded, flags_parser=_parse)


def optional_float(value, flag_name, allow_keep=False):
    """'none' -> None, 'keep' -> 'keep' (when allowed), else a float > 0.

    Raises:
        ValueError: naming the flag, for anything else.
    """
    text = str(value).strip().lower()
    if text in _NONE:
        return None
    if allow_keep and text == "keep":
        return "keep"
    try:
        number = float(text)
    except ValueError:
        number = float("nan")
    if not number > 0 or number == float("inf"):
        keep = ", 'keep'" if allow_keep else ""
        raise ValueError(
            f"--{flag_name} must be 'none'{keep} or a number > 0; received "
            f"{value!r}"
        )
    return number


def register_optional_float(flag_name, allow_keep=False):
    """Validates a flag holding `optional_float` text."""

    def check(value):
        try:
            optional_float(value, flag_name, allow_keep)
        except ValueError as error:
            raise flags.ValidationError(str(error)) from None
        return True

    flags.register_validator(flag_name, check)


def register_existing_path(flag_name, what="checkpoint or model file"):
    """The flag (when set) must name an existing path or checkpoint prefix."""

    def check(value):
        if value is None:
            return True
        if os.path.exists(value) or os.path.exists(f"{value}.index"):
            return True
        raise flags.ValidationError(f"no {what} at {value!r}")

    flags.register_validator(flag_name, check)


def register_output_dir(flag_name):
    """The flag must name a directory, or a path where one can be made."""

    def check(value):
        if value is None:
            return True
        path = os.path.abspath(os.path.expanduser(value))
        if os.path.isfile(path):
            raise flags.ValidationError(
                f"{value!r} is a file; an output directory is expected"
            )
        parent = path
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            raise flags.ValidationError(
                f"{parent!r} is a file, so {value!r} cannot be created"
            )
        return True

    flags.register_validator(flag_name, check)


def register_output_file(flag_name, suffix, overwrite_flag="overwrite"):
    """The flag must name a new `suffix` file (or `--overwrite` is set) in a
    directory that exists or can be made."""

    def check(values):
        value = values[flag_name]
        if value is None:
            return True
        path = os.path.abspath(os.path.expanduser(value))
        if not path.endswith(suffix):
            raise flags.ValidationError(
                f"--{flag_name}={value!r} must end in {suffix}"
            )
        if os.path.isdir(path):
            raise flags.ValidationError(
                f"--{flag_name}={value!r} is a directory; a {suffix} file "
                "is expected"
            )
        if os.path.exists(path) and not values[overwrite_flag]:
            raise flags.ValidationError(
                f"--{flag_name}={value!r} exists; pass --{overwrite_flag} to "
                "replace it"
            )
        parent = os.path.dirname(path)
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            raise flags.ValidationError(
                f"--{flag_name}={value!r}: {parent!r} is a file"
            )
        return True

    flags.register_multi_flags_validator([flag_name, overwrite_flag], check)


def register_dataset(flag_name="dataset", data_dir_flag="tfds_data_dir"):
    """The flag must name a keras_moe dataset or one prepared locally."""

    def check(values):
        name = values[flag_name]
        if name is None:
            return True
        from keras_moe.data import registry

        data_dir = registry.resolve_data_dir(values[data_dir_flag])
        known = registry.available(data_dir)
        if name not in known:
            raise flags.ValidationError(
                f"--{flag_name}={name!r} is not a keras_moe dataset "
                f"{list(registry.DATASETS)} and is not prepared in "
                f"--{data_dir_flag}={data_dir} (nothing is downloaded); "
                f"available: {known}"
            )
        return True

    flags.register_multi_flags_validator([flag_name, data_dir_flag], check)


def register_mesh(flag_name="mesh", devices_flag="cpu_devices"):
    """The flag (when set) must be a mesh spec of
    `keras_moe.distribution.mesh.parse_mesh_spec` whose size is the number
    of devices: `--cpu_devices` when set, else the devices TensorFlow sees.
    """

    def check(values):
        spec = values[flag_name]
        if spec is None:
            return True
        from keras_moe.distribution.mesh import parse_mesh_spec

        try:
            # A spec that does not parse fails before any device is listed.
            parse_mesh_spec(spec, num_devices=values[devices_flag])
        except ValueError as error:
            raise flags.ValidationError(
                f"--{flag_name}={spec!r}: {error}"
            ) from None
        return True

    flags.register_multi_flags_validator([flag_name, devices_flag], check)
