"""English text from the docstrings of installed Python code.

A larger language corpus than `pydoc_corpus`, built offline from what any
keras_moe install has: the standard library's docstrings and those of the
packages keras_moe requires (NumPy, Keras, scikit-learn, TensorFlow). The
modules are parsed with `ast` (never imported); each docstring of a module,
class or function is cut into paragraphs (blank lines), and paragraphs that
hold a doctest (a line starting with `>>>`) are dropped, so the text is
prose, not code. Whitespace runs are collapsed, the text is NFKC-normalised
(as `pydoc_corpus`), and a paragraph that occurs more than once in the
whole corpus (TensorFlow repeats generated docstrings) is kept once.

Splits are by module file, never by paragraph, so no module contributes to
two splits: `SPLIT_BUCKETS` of `BUCKETS` buckets of a stable hash of the
module's path below its root (the same on every machine with the same
versions).

* "train": pre-training text (`BUCKETS - 3` of 20 buckets);
* "validation": held-out text for the upstream loss (1 bucket);
* "downstream": modules kept out of both, for downstream tasks (2 buckets).

`name_examples(split)` derives a downstream task from the "downstream"
modules: from the summary line of a public function's or class's
docstring, name it ("Return the absolute value of the argument." ->
"abs"), with names split into lower-case words ("get config", "expert
parallel trainer"). Its "train" and "test" splits divide the examples by
a hash of the name, so a test name is never a fine-tuning name.

The exact figures depend on the Python and package versions (pinned in
requirements/constraints.txt); `corpus_summary()` reports them.
"""

import ast
import functools
import hashlib
import os
import re
import sysconfig
import unicodedata

# The roots read, in order: the standard library, then these packages.
PACKAGES = ("numpy", "keras", "sklearn", "tensorflow")
# Directories never read (tests, demos, vendored copies, tools).
_SKIP_DIRS = {
    "__pycache__",
    "test",
    "tests",
    "testing",
    "idlelib",
    "lib2to3",
    "turtledemo",
    "site-packages",
    "dist-packages",
    "_vendor",
    "include",
}
BUCKETS = 20
SPLIT_BUCKETS = {
    "validation": (0,),
    "downstream": (1, 2),
    "train": tuple(range(3, BUCKETS)),
}
# A paragraph shorter than this many words is not text (a signature, a
# heading, "Args:").
MIN_PARAGRAPH_WORDS = 5
_DOCSTRING_NODES = (
    ast.Module,
    ast.ClassDef,
    ast.FunctionDef,
    ast.AsyncFunctionDef,
)


def _roots():
    """(label, directory) of every root read, those that exist."""
    roots = [("stdlib", sysconfig.get_paths()["stdlib"])]
    for package in PACKAGES:
        directory = _package_dir(package)
        if directory is not None:
            roots.append((package, directory))
    return roots


def _package_dir(package):
    """The directory of an installed package, found without importing it."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def _module_files(root):
    """Sorted paths of the .py files under `root`, skipped dirs excluded."""
    out = []
    for directory, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
        out.extend(
            os.path.join(directory, f)
            for f in sorted(files)
            if f.endswith(".py")
        )
    return out


def split_of(label, relative_path):
    """The split of a module: "train", "validation" or "downstream".

    Example:

    >>> split_of("stdlib", "json/decoder.py")
    'downstream'
    """
    key = f"{label}/{relative_path}".encode("utf-8")
    bucket = int.from_bytes(hashlib.sha256(key).digest()[:8], "big") % BUCKETS
    for split, buckets in SPLIT_BUCKETS.items():
        if bucket in buckets:
            return split
    raise AssertionError(bucket)


def _normalise(text):
    return " ".join(unicodedata.normalize("NFKC", text).split())


def paragraphs_of(docstring):
    """The prose paragraphs of one docstring (see the module doc).

    Example:

    >>> paragraphs_of("Adds two numbers and returns the sum.\\n\\n"
    ...               ">>> add(1, 2)\\n3\\n\\nArgs:")
    ['Adds two numbers and returns the sum.']
    """
    out = []
    for paragraph in re.split(r"\n\s*\n", docstring):
        lines = paragraph.strip().split("\n")
        if any(line.lstrip().startswith(">>>") for line in lines):
            continue
        text = _normalise(paragraph)
        if len(text.split()) >= MIN_PARAGRAPH_WORDS:
            out.append(text)
    return out


def _docstring_nodes(path):
    """(node, docstring) of a module file's documented nodes; none if the
    file does not parse."""
    try:
        with open(path, encoding="utf-8") as file:
            tree = ast.parse(file.read())
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, _DOCSTRING_NODES):
            docstring = ast.get_docstring(node)
            if docstring:
                out.append((node, docstring))
    return out


@functools.lru_cache(maxsize=1)
def _modules():
    """[(label, relative path, split, [(node, docstring)])] of all roots."""
    out = []
    for label, root in _roots():
        for path in _module_files(root):
            relative = os.path.relpath(path, root).replace(os.sep, "/")
            out.append(
                (
                    label,
                    relative,
                    split_of(label, relative),
                    _docstring_nodes(path),
                )
            )
    return out


@functools.lru_cache(maxsize=None)
def paragraphs(split):
    """The paragraphs of `split`, in module order, each once in the whole
    corpus (the first occurrence, in root then path order, keeps it).

    Args:
        split: "train", "validation" or "downstream".

    Returns:
        A tuple of str.
    """
    _check_split(split, SPLIT_BUCKETS)
    seen = set()
    out = []
    for _, _, module_split, nodes in _modules():
        for _, docstring in nodes:
            for text in paragraphs_of(docstring):
                if text in seen:
                    continue
                seen.add(text)
                if module_split == split:
                    out.append(text)
    return tuple(out)


def _check_split(split, splits):
    if split not in splits:
        raise ValueError(
            f"split must be one of {sorted(splits)}; received {split!r}"
        )


def name_words(name):
    """A Python name as lower-case words.

    Example:

    >>> name_words("ExpertParallelTrainer"), name_words("get_config")
    ('expert parallel trainer', 'get config')
    """
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", name.replace("_", " "))
    return " ".join(spaced.lower().split())


def summary_line(docstring):
    """The first paragraph of a docstring, on one line."""
    return _normalise(re.split(r"\n\s*\n", docstring.strip())[0])


NAME_SPLITS = ("train", "test")
# One name in this many goes to the test split.
_NAME_TEST_EVERY = 5


@functools.lru_cache(maxsize=None)
def name_examples(split):
    """(summary, name words) pairs of the naming task (see module doc).

    Public (no leading underscore) functions and classes of the
    "downstream" modules whose docstring's summary line has at least
    `MIN_PARAGRAPH_WORDS` words and no doctest; a (summary, name) pair
    that repeats is kept once, and a summary given to two names is
    dropped (it does not determine its name).

    Args:
        split: "train" or "test" (by a hash of the name words).

    Returns:
        A tuple of (summary, words) str pairs, in module order.
    """
    _check_split(split, NAME_SPLITS)
    pairs = {}
    for _, _, module_split, nodes in _modules():
        if module_split != "downstream":
            continue
        for node, docstring in nodes:
            if isinstance(node, ast.Module) or node.name.startswith("_"):
                continue
            summary = summary_line(docstring)
            if ">>>" in summary or len(summary.split()) < MIN_PARAGRAPH_WORDS:
                continue
            pairs.setdefault(summary, set()).add(name_words(node.name))
    out = []
    for summary, names in pairs.items():
        if len(names) != 1:
            continue
        (words,) = names
        digest = hashlib.sha256(words.encode("utf-8")).digest()
        is_test = int.from_bytes(digest[:8], "big") % _NAME_TEST_EVERY == 0
        if is_test == (split == "test"):
            out.append((summary, words))
    return tuple(out)


def corpus_summary():
    """{split: {"paragraphs", "words"}} and the roots read, for reports."""
    out = {
        split: {
            "paragraphs": len(paragraphs(split)),
            "words": sum(len(p.split()) for p in paragraphs(split)),
        }
        for split in SPLIT_BUCKETS
    }
    out["roots"] = [label for label, _ in _roots()]
    out["name_examples"] = {s: len(name_examples(s)) for s in NAME_SPLITS}
    return out
