"""Runs Python code with only keras_moe's declared requirements importable.

The test environment holds every extra (torch, transformers, keras-hub...),
so a module that imports a package its install does not declare would pass
every test and fail for a user who ran `pip install keras-moe[demo]`. This
runner reads keras_moe's installed requirements (setup.py's
`install_requires` plus the chosen extras), closes them over the installed
distributions' own requirements, and makes the top-level modules of every
other installed distribution unimportable before running a module:

    python tests/requirements_guard.py --extras=demo -m apps.demo --small
    python tests/requirements_guard.py --extras= -c "import keras_moe"

Standard-library modules, the checkout's own packages (apps, export, tests)
and keras_moe are never blocked.
"""

import importlib.metadata
import pathlib
import runpy
import sys

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

DISTRIBUTION = "keras_moe"


def _requirements(distribution, extras):
    """The Requirement objects of `distribution` active under `extras`."""
    found = []
    for line in importlib.metadata.requires(distribution) or ():
        requirement = Requirement(line)
        marker = requirement.marker
        if marker is None:
            found.append(requirement)
        elif any(marker.evaluate({"extra": e}) for e in extras or ("",)):
            found.append(requirement)
    return found


def allowed_distributions(extras):
    """Canonical names of keras_moe and everything its install pulls in."""
    allowed = {canonicalize_name(DISTRIBUTION)}
    pending = [(DISTRIBUTION, tuple(extras))]
    while pending:
        name, wanted = pending.pop()
        for requirement in _requirements(name, wanted):
            key = canonicalize_name(requirement.name)
            if key in allowed:
                continue
            try:
                importlib.metadata.distribution(requirement.name)
            except importlib.metadata.PackageNotFoundError:
                continue  # Not installed here: nothing to block or follow.
            allowed.add(key)
            pending.append((requirement.name, tuple(requirement.extras)))
    return allowed


def blocked_modules(extras):
    """Top-level modules of installed distributions outside the closure."""
    allowed = allowed_distributions(extras)
    blocked = set()
    for module, names in importlib.metadata.packages_distributions().items():
        if not any(canonicalize_name(n) in allowed for n in names):
            blocked.add(module)
    # The checkout's packages and the library itself stay importable.
    return blocked - {"keras_moe", "apps", "export", "tests"}


class _Blocker:
    """A meta path finder that refuses the blocked top-level modules."""

    def __init__(self, blocked):
        self.blocked = frozenset(blocked)

    def find_spec(self, name, path=None, target=None):
        del path, target
        top = name.partition(".")[0]
        if top in self.blocked:
            raise ModuleNotFoundError(
                f"{name!r} is not a declared requirement of keras_moe with "
                "these extras",
                name=name,
            )
        return None


def install(extras):
    """Blocks undeclared packages in this process; returns the blocked set."""
    blocked = blocked_modules(extras)
    sys.meta_path.insert(0, _Blocker(blocked))
    return blocked


def main(argv):
    if len(argv) < 3 or not argv[1].startswith("--extras="):
        raise SystemExit(
            "usage: requirements_guard.py --extras=a,b (-m module | -c code) "
            "[args...]"
        )
    extras = [e for e in argv[1].partition("=")[2].split(",") if e]
    # Run from the checkout's root (the script's own directory is tests/).
    sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])
    install(extras)
    mode, target, *rest = argv[2:]
    if mode == "-m":
        sys.argv = [target, *rest]
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    elif mode == "-c":
        sys.argv = ["-c", *rest]
        exec(compile(target, "<requirements_guard>", "exec"), {})
    else:
        raise SystemExit(f"expected -m or -c; received {mode!r}")


if __name__ == "__main__":
    main(sys.argv)
