"""Checks the Bazel BUILD files against the Python sources on disk.

Bazel cannot analyse Python targets offline on the machines this project is
built on, so this test stands in for `bazel build //...`. It parses every BUILD
file with Python's `ast` (Starlark BUILD files are a Python subset), reads the
`py_library` / `py_binary` / `py_test` calls and checks:

1. every directory under keras_moe/, apps/, export/ and tests/ that holds
   `.py` files has a BUILD file;
2. BUILD files parse, give `name`, `srcs`, `deps` and `main` as literals, and
   use each target name once;
3. every `srcs` / `main` entry is an existing file of that directory;
4. every `.py` file (`__init__.py` included) is in the `srcs` of exactly one
   target of its directory; `tests/**/test_*.py` files are in a `py_test`, and
   `apps/` modules with a `__main__` block are in a `py_binary`;
5. every dep label (`//pkg:name`, `//pkg`, `:name`) names an existing
   library or binary target (`@repo//...` labels are external and skipped);
6. every import of a project module is declared: the importing target deps on
   the target holding the imported module (directly);
7. the layering of docs/ARCHITECTURE.md holds: keras_moe/ deps on nothing
   in apps/, export/, benchmarks/ or tests/; export/ on nothing in apps/,
   benchmarks/ or tests/; only tests dep on tests; and inside keras_moe/ a
   stage imports only the stages before it (`STAGES`).

Conventions, used by the suggestions printed on failure:

- `foo.py` -> `py_library(name = "foo", srcs = ["foo.py"], deps = [...])`;
- a package's `__init__.py` -> a `py_library` named after the directory
  (`//keras_moe/layers:layers`, which `//keras_moe/layers` abbreviates);
- `apps/foo.py` with a `__main__` block -> `py_binary(name = "foo", ...)`;
- `tests/.../test_foo.py` -> `py_test(name = "test_foo", ...)`;
- deps list project targets only: third-party packages come from pip.

Each check reports every problem it finds in one message, with a BUILD
stanza to paste for each file that has no target. The same stanzas are printed
by

    python tests/test_build_files.py --show     # show what is missing
    python tests/test_build_files.py --append   # append them to BUILD files
    python tests/test_build_files.py --rewrite  # write all BUILD files anew

and without arguments (as a Bazel `py_test`) the file runs its tests.
"""

import ast
import dataclasses
import functools
import pathlib
import re
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCE_ROOTS = ("keras_moe", "apps", "export", "benchmarks", "tests")
RULES = ("py_library", "py_binary", "py_test")
SKIP_DIR_NAMES = frozenset({"__pycache__", "testdata"})
RULES_PYTHON_DEFS = "@rules_python//python:defs.bzl"
# package prefix -> packages it must not depend on (docs/ARCHITECTURE.md).
FORBIDDEN_DEPS = {
    "keras_moe": ("apps", "export", "benchmarks", "tests"),
    "export": ("apps", "benchmarks", "tests"),
    "benchmarks": ("apps", "export", "tests"),
    "apps": ("tests",),
}
# The stages of keras_moe/ in data-path order (docs/ARCHITECTURE.md): a module
# may import its own stage and the stages before it, never a later one.
# `utils` is the floor every stage may use; the package's own __init__.py
# (the public API) may import any stage.
STAGES = (
    "utils",
    "layers",
    "models",
    "data",
    "checkpoints",
    "upcycling",
    "evaluation",
    "distribution",
    "training",
    "experiments",
)


@dataclasses.dataclass(frozen=True)
class Target:
    package: str  # directory relative to ROOT, e.g. "keras_moe/layers"
    kind: str  # one of RULES
    name: str
    srcs: tuple
    deps: tuple  # normalised labels; external labels dropped
    main: str | None
    lineno: int

    @property
    def label(self):
        return f"//{self.package}:{self.name}"

    @property
    def where(self):
        return f"{self.package}/BUILD:{self.lineno} ({self.label})"


@dataclasses.dataclass
class Tree:
    """Everything parsed from disk, plus problems met while parsing."""

    python_files: list  # paths relative to ROOT, posix strings
    build_packages: list
    targets: dict  # label -> Target
    owners: dict  # python file -> list of labels whose srcs name it
    parse_problems: list
    label_problems: list  # malformed labels


def _is_skipped(path):
    return any(
        part in SKIP_DIR_NAMES or part.startswith(".") for part in path.parts
    )


def _python_files():
    files = []
    for root in SOURCE_ROOTS:
        for path in sorted((ROOT / root).rglob("*.py")):
            rel = path.relative_to(ROOT)
            if not _is_skipped(rel):
                files.append(rel.as_posix())
    return files


def _build_packages():
    packages = []
    for root in SOURCE_ROOTS:
        for path in sorted((ROOT / root).rglob("BUILD")):
            rel = path.relative_to(ROOT)
            if not _is_skipped(rel):
                packages.append(rel.parent.as_posix())
    return packages


def normalise_label(label, package):
    """Returns `//pkg:name` for a project label, None for an external one.

    Raises ValueError for a label this checker does not understand.
    """
    if label.startswith("@"):
        return None
    if label.startswith(":"):
        return f"//{package}:{label[1:]}"
    if label.startswith("//"):
        body = label[2:]
        if ":" in body:
            pkg, name = body.split(":", 1)
        else:
            pkg, name = body, body.rsplit("/", 1)[-1]
        if name and not pkg.endswith("/"):
            return f"//{pkg}:{name}"
    raise ValueError(f"unsupported label {label!r}")


def _load_line(rules):
    quoted = ", ".join(f'"{rule}"' for rule in sorted(rules))
    return f'load("{RULES_PYTHON_DEFS}", {quoted})'


def _loaded_rules(module):
    """Rule names a BUILD file loads from rules_python."""
    loaded = set()
    for node in ast.walk(module):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "load"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and node.args[0].value == RULES_PYTHON_DEFS
        ):
            loaded.update(
                arg.value
                for arg in node.args[1:]
                if isinstance(arg, ast.Constant)
            )
    return loaded


def _literal(node, what, where, problems):
    try:
        return ast.literal_eval(node)
    except ValueError:
        problems.append(f"{where}: {what} must be a literal, not a rule call")
        return None


def _parse_build(package, problems, label_problems):
    path = ROOT / package / "BUILD"
    where = f"{package}/BUILD"
    try:
        module = ast.parse(path.read_text(encoding="utf-8"), filename=where)
    except SyntaxError as e:
        problems.append(f"{where}:{e.lineno}: does not parse: {e.msg}")
        return []
    targets = []
    seen = {}
    loaded = _loaded_rules(module)
    for node in ast.walk(module):
        if not (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in RULES
        ):
            continue
        at = f"{where}:{node.lineno}"
        if node.func.id not in loaded:
            problems.append(
                f"{at}: {node.func.id} is used but not loaded; start the file "
                f"with {_load_line(loaded | {node.func.id})}"
            )
            loaded = loaded | {node.func.id}
        if node.args:
            problems.append(f"{at}: {node.func.id} takes keyword args only")
        kwargs = {kw.arg: kw.value for kw in node.keywords if kw.arg}
        name = None
        if "name" in kwargs:
            name = _literal(kwargs["name"], "name", at, problems)
        if not isinstance(name, str) or not name:
            problems.append(f"{at}: {node.func.id} without a string name")
            continue
        if name in seen:
            problems.append(
                f"{at}: duplicate target name {name!r} "
                f"(first defined on line {seen[name]})"
            )
            continue
        seen[name] = node.lineno
        values = {}
        for key in ("srcs", "deps"):
            value = []
            if key in kwargs:
                value = _literal(kwargs[key], key, at, problems) or []
            if not (
                isinstance(value, list | tuple)
                and all(isinstance(v, str) for v in value)
            ):
                problems.append(f"{at}: {key} of {name!r} is not a string list")
                value = []
            values[key] = tuple(value)
        main = None
        if "main" in kwargs:
            main = _literal(kwargs["main"], "main", at, problems)
        deps = []
        for dep in values["deps"]:
            try:
                normalised = normalise_label(dep, package)
            except ValueError as e:
                label_problems.append(f"{at}: {e}")
                continue
            if normalised is not None:
                deps.append(normalised)
        targets.append(
            Target(
                package=package,
                kind=node.func.id,
                name=name,
                srcs=values["srcs"],
                deps=tuple(deps),
                main=main,
                lineno=node.lineno,
            )
        )
    return targets


@functools.lru_cache(maxsize=None)
def load_tree():
    parse_problems, label_problems = [], []
    targets, owners = {}, {}
    packages = _build_packages()
    for package in packages:
        for target in _parse_build(package, parse_problems, label_problems):
            targets[target.label] = target
            for src in target.srcs:
                path = f"{package}/{src}"
                owners.setdefault(path, []).append(target.label)
    return Tree(
        python_files=_python_files(),
        build_packages=packages,
        targets=targets,
        owners=owners,
        parse_problems=parse_problems,
        label_problems=label_problems,
    )


@functools.lru_cache(maxsize=None)
def _parse_python(path):
    """The module's AST; an empty module for a file that does not parse.

    Syntax errors are the style test's to report, not this one's.
    """
    try:
        return ast.parse((ROOT / path).read_text(encoding="utf-8"))
    except SyntaxError:
        return ast.Module(body=[], type_ignores=[])


def _has_main_block(path):
    module = _parse_python(path)
    for node in module.body:
        if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
            return True
    return False


def _expected_kind(path):
    name = path.rsplit("/", 1)[-1]
    if path.startswith("tests/") and name.startswith("test_"):
        return "py_test"
    if path.startswith("apps/") and name != "__init__.py":
        if _has_main_block(path):
            return "py_binary"
    return "py_library"


def _module_file(dotted):
    """Returns the file (relative to ROOT) of a dotted module, or None."""
    base = dotted.replace(".", "/")
    for candidate in (f"{base}.py", f"{base}/__init__.py"):
        if (ROOT / candidate).is_file():
            return candidate
    return None


def imported_files(path):
    """Project files imported anywhere in `path` (relative to ROOT)."""
    module = _parse_python(path)
    package_parts = path.rsplit("/", 1)[0].split("/")
    found = set()
    for node in ast.walk(module):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                keep = len(package_parts) - (node.level - 1)
                prefix = ".".join(package_parts[: max(keep, 0)])
                base = ".".join(p for p in (prefix, node.module) if p)
            else:
                base = node.module
            # `from pkg import name`: name is a submodule or an attribute of
            # pkg/__init__.py.
            candidates = []
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                candidates.append(sub if _module_file(sub) else base)
        else:
            continue
        for dotted in candidates:
            if dotted.split(".")[0] not in SOURCE_ROOTS:
                continue
            target_file = _module_file(dotted)
            if target_file and target_file != path:
                found.add(target_file)
    return found


def _conventional_label(path):
    package, filename = path.rsplit("/", 1)
    if filename == "__init__.py":
        name = package.rsplit("/", 1)[-1]
    else:
        name = filename[: -len(".py")]
    return f"//{package}:{name}"


def _owner_label(tree, path):
    owners = tree.owners.get(path)
    return owners[0] if owners else _conventional_label(path)


def _short(label, package):
    pkg, name = label[2:].split(":")
    if pkg == package:
        return f":{name}"
    if pkg.rsplit("/", 1)[-1] == name:
        return f"//{pkg}"
    return label


def suggest_stanza(tree, path):
    """A BUILD stanza for a file that has no target, deps from its imports."""
    package, filename = path.rsplit("/", 1)
    name = _conventional_label(path).split(":")[1]
    deps = sorted(
        {
            _short(_owner_label(tree, imported), package)
            for imported in imported_files(path)
        },
        key=lambda label: (not label.startswith(":"), label),
    )
    lines = [f"{_expected_kind(path)}(", f'    name = "{name}",']
    lines.append(f'    srcs = ["{filename}"],')
    if _expected_kind(path) == "py_binary":
        lines.append(f'    main = "{filename}",')
    if deps:
        lines.append("    deps = [")
        lines.extend(f'        "{dep}",' for dep in deps)
        lines.append("    ],")
    lines.append(")")
    return "\n".join(lines)


def _fail(title, problems, hint=""):
    if problems:
        message = f"{title} ({len(problems)}):\n" + "\n".join(
            f"  - {p}" for p in problems
        )
        if hint:
            message += "\n\n" + hint
        pytest.fail(message, pytrace=False)


def missing_target_problems(tree):
    """Files without a target, with the stanza to add for each."""
    problems = []
    for path in tree.python_files:
        if not tree.owners.get(path):
            package = path.rsplit("/", 1)[0]
            stanza = suggest_stanza(tree, path).replace("\n", "\n      ")
            problems.append(
                f"{path} has no target; add to {package}/BUILD:\n      {stanza}"
            )
    return problems


def test_every_python_directory_has_a_build_file():
    tree = load_tree()
    dirs = sorted({path.rsplit("/", 1)[0] for path in tree.python_files})
    missing = [
        f"{d}/BUILD is missing" for d in dirs if d not in tree.build_packages
    ]
    _fail("Directories with .py files but no BUILD", missing)


def test_build_files_parse():
    tree = load_tree()
    _fail(
        "BUILD files that do not parse or repeat a target name",
        tree.parse_problems + tree.label_problems,
    )


def test_srcs_exist():
    tree = load_tree()
    problems = []
    for target in tree.targets.values():
        for src in target.srcs:
            if "/" in src or src.startswith(".."):
                problems.append(
                    f"{target.where}: src {src!r} is outside its package; "
                    "give that directory its own BUILD"
                )
            elif not (ROOT / target.package / src).is_file():
                problems.append(f"{target.where}: src {src!r} does not exist")
        if target.kind != "py_library" and len(target.srcs) > 1:
            if target.main not in target.srcs:
                problems.append(
                    f"{target.where}: several srcs need main= naming one"
                )
        if target.main is not None and target.main not in target.srcs:
            problems.append(f"{target.where}: main {target.main!r} not in srcs")
    _fail("Targets naming files that do not exist", problems)


def test_every_python_file_has_a_target():
    tree = load_tree()
    problems = missing_target_problems(tree)
    for path in tree.python_files:
        owners = tree.owners.get(path, [])
        if len(owners) > 1:
            problems.append(f"{path} is in the srcs of {', '.join(owners)}")
        if not owners:
            continue
        expected = _expected_kind(path)
        kind = tree.targets[owners[0]].kind
        if expected != "py_library" and kind != expected:
            problems.append(f"{path} must be in a {expected}, not a {kind}")
    _fail(
        "Python files without exactly one (correct) BUILD target",
        problems,
        "Print all stanzas with `python tests/test_build_files.py --show`.",
    )


def test_deps_resolve():
    tree = load_tree()
    problems = []
    for target in tree.targets.values():
        for dep in target.deps:
            if dep not in tree.targets:
                problems.append(f"{target.where}: dep {dep} does not exist")
            elif tree.targets[dep].kind == "py_test":
                problems.append(f"{target.where}: dep {dep} is a py_test")
    _fail("Dependencies on targets that do not exist", problems)


def test_imports_are_declared_as_deps():
    tree = load_tree()
    problems = []
    for path in tree.python_files:
        owners = tree.owners.get(path)
        if not owners:
            continue  # reported by test_every_python_file_has_a_target
        target = tree.targets[owners[0]]
        for imported in sorted(imported_files(path)):
            needed = tree.owners.get(imported)
            if not needed:
                continue  # that file has no target yet; reported elsewhere
            if needed[0] != target.label and needed[0] not in target.deps:
                problems.append(
                    f"{target.where}: {path} imports {imported}; "
                    f'add "{_short(needed[0], target.package)}" to deps'
                )
    _fail("Imports of project modules missing from deps", problems)


def test_layering():
    tree = load_tree()
    problems = []
    for target in tree.targets.values():
        top = target.package.split("/")[0]
        for dep in target.deps:
            dep_top = dep[2:].split("/")[0].split(":")[0]
            if dep_top in FORBIDDEN_DEPS.get(top, ()):
                problems.append(
                    f"{target.where}: {top}/ must not depend on {dep}"
                )
    _fail("Dependencies against the layering of ARCHITECTURE.md", problems)


def stage_of(path):
    """The stage (see `STAGES`) of a keras_moe file, or None for the
    package's own __init__.py and files outside keras_moe/."""
    parts = path.split("/")
    if (
        parts[0] != "keras_moe"
        or len(parts) < 2
        or path == "keras_moe/__init__.py"
    ):
        return None
    name = parts[1][: -len(".py")] if parts[1].endswith(".py") else parts[1]
    return name


def test_every_module_belongs_to_a_stage():
    problems = [
        f"{path} is in no stage of {STAGES}"
        for path in _python_files()
        if stage_of(path) is not None and stage_of(path) not in STAGES
    ]
    _fail("keras_moe modules outside the stages", problems)


def test_stages_import_only_earlier_stages():
    problems = []
    for path in _python_files():
        stage = stage_of(path)
        if stage not in STAGES:
            continue
        for imported in sorted(imported_files(path)):
            other = stage_of(imported)
            if imported == "keras_moe/__init__.py":
                problems.append(
                    f"{path} imports the keras_moe package root; import the "
                    "module it needs instead"
                )
            elif other in STAGES and STAGES.index(other) > STAGES.index(stage):
                problems.append(
                    f"{path} ({stage}) imports {imported} ({other}), a later "
                    "stage"
                )
    _fail("Imports against the stage order of ARCHITECTURE.md", problems)


def _runs_pytest_as_main(tree):
    """Whether a module ends in `if __name__ == "__main__":` calling
    `pytest.main`: a Bazel `py_test` runs the file as a script, and a test
    module without such a main would pass without running a test."""
    for node in tree.body:
        if not (
            isinstance(node, ast.If)
            and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name)
            and node.test.left.id == "__name__"
            and isinstance(node.test.comparators[0], ast.Constant)
            and node.test.comparators[0].value == "__main__"
        ):
            continue
        for call in ast.walk(node):
            if (
                isinstance(call, ast.Call)
                and isinstance(call.func, ast.Attribute)
                and call.func.attr == "main"
                and isinstance(call.func.value, ast.Name)
                and call.func.value.id == "pytest"
            ):
                return True
    return False


def test_every_test_module_runs_as_a_py_test_main():
    problems = [
        f'{path}: no `if __name__ == "__main__": '
        "sys.exit(pytest.main([__file__]))`"
        for path in _python_files()
        if re.match(r"tests/(.*/)?test_[^/]*\.py$", path)
        and not _runs_pytest_as_main(ast.parse((ROOT / path).read_text()))
    ]
    _fail("Test modules that Bazel would run without running a test", problems)


def test_a_test_module_run_as_main_runs_its_tests():
    import subprocess

    result = subprocess.run(
        [sys.executable, "-m", "tests.utils.test_checks"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"\b\d+ passed\b", result.stdout), result.stdout


def _with_load_line(text):
    """`text` with one rules_python load() naming exactly the rules used."""
    used = {
        node.func.id
        for node in ast.walk(ast.parse(text))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in RULES
    }
    lines = [
        line
        for line in text.splitlines()
        if not line.startswith(f'load("{RULES_PYTHON_DEFS}"')
    ]
    # The load() goes after the leading comment block.
    at = 0
    while at < len(lines) and lines[at].startswith("#"):
        at += 1
    header, body = lines[:at], lines[at:]
    while body and not body[0].strip():
        body.pop(0)
    lines = header + ([""] if header else []) + [_load_line(used), ""] + body
    return "\n".join(lines).rstrip("\n") + "\n"


def rewrite_build_files():
    """Writes every BUILD file anew from the sources' imports.

    Each directory's leading comment block is kept; every `.py` file gets
    its conventional target (see the module docstring) with deps read from
    its imports. Returns the packages written.
    """
    files = _python_files()
    by_package = {}
    for path in files:
        by_package.setdefault(path.rsplit("/", 1)[0], []).append(path)
    empty = Tree(files, [], {}, {}, [], [])
    for package, paths in by_package.items():
        build = ROOT / package / "BUILD"
        header = []
        if build.exists():
            for line in build.read_text(encoding="utf-8").splitlines():
                if not line.startswith("#"):
                    break
                header.append(line)
        body = ['package(default_visibility = ["//visibility:public"])']
        ordered = sorted(
            paths, key=lambda p: (not p.endswith("/__init__.py"), p)
        )
        body.extend(suggest_stanza(empty, path) for path in ordered)
        text = "\n".join(header) + "\n\n" + "\n\n".join(body) + "\n"
        build.write_text(_with_load_line(text.lstrip("\n")), encoding="utf-8")
    return sorted(by_package)


def _main(argv):
    """Prints (or with --append, appends) stanzas for files with no target;
    with --rewrite, writes every BUILD file anew from the imports."""
    if "--rewrite" in argv:
        for package in rewrite_build_files():
            print(f"wrote {package}/BUILD")
        return
    tree = load_tree()
    by_package = {}
    for path in tree.python_files:
        if not tree.owners.get(path):
            package = path.rsplit("/", 1)[0]
            stanza = suggest_stanza(tree, path)
            by_package.setdefault(package, []).append(stanza)
    for package, stanzas in by_package.items():
        build = ROOT / package / "BUILD"
        text = "\n\n".join(stanzas) + "\n"
        if "--append" in argv:
            if build.exists():
                old = build.read_text(encoding="utf-8").rstrip("\n")
            else:
                old = 'package(default_visibility = ["//visibility:public"])'
            new = _with_load_line(f"{old}\n\n{text}")
            build.write_text(new, encoding="utf-8")
            print(f"appended {len(stanzas)} target(s) to {package}/BUILD")
        else:
            print(f"# {package}/BUILD\n{text}")
    if not by_package:
        print("every Python file has a target")


if __name__ == "__main__":
    if {"--show", "--append", "--rewrite"} & set(sys.argv[1:]):
        _main(sys.argv[1:])
    else:
        sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))
