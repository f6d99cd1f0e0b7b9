"""Helpers shared by the experiments: seeds, tables, aggregation, plots.

Every file is written atomically (`keras_moe.utils.files`): to a temporary
file in the target directory, then renamed over the target, so a reader (or
a run that is interrupted) never leaves half a file behind.

Example:

    rows = [{"model": "dense", "seed": 0, "nll": 0.31},
            {"model": "dense", "seed": 1, "nll": 0.35}]
    summary = aggregate(rows, by=("model",), metrics=("nll",))
    write_csv(os.path.join(out, "results.csv"), rows)
    keras_moe.utils.files.write_text(
        os.path.join(out, "results.md"),
        markdown_table(summary, ("model", "nll")),
    )
"""

import csv
import io
import os
import time

import numpy as np

from keras_moe.utils import files
from keras_moe.utils.files import atomic_path
from keras_moe.utils.files import write_text


def check_seeds(seeds):
    """Validated tuple of distinct int seeds (at least one).

    Args:
        seeds: an iterable of ints.

    Returns:
        A tuple of ints.
    """
    try:
        seeds = tuple(seeds)
    except TypeError:
        raise ValueError(
            f"seeds must be an iterable of ints; received {seeds!r}"
        ) from None
    if not seeds or not all(
        isinstance(s, (int, np.integer)) and not isinstance(s, bool)
        for s in seeds
    ):
        raise ValueError(
            f"seeds must be a non-empty sequence of ints; received {seeds!r}"
        )
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct; received {seeds!r}")
    return tuple(int(s) for s in seeds)


def prepare_output_dir(output_dir):
    """Creates `output_dir` if needed; refuses an existing file.

    Args:
        output_dir: a directory path.

    Returns:
        The path as a string.
    """
    output_dir = os.fspath(output_dir)
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(
            f"output_dir={output_dir!r} is an existing file, not a directory"
        )
    files.makedirs(output_dir)
    return output_dir


def write_csv(path, rows, columns=None):
    """Writes a list of dicts as CSV, atomically.

    Args:
        path: the .csv path.
        rows: list of dicts.
        columns: column order; None takes the keys in order of first
            appearance.
    """
    if columns is None:
        columns = []
        for row in rows:
            columns.extend(k for k in row if k not in columns)
    buffer = io.StringIO()
    writer = csv.DictWriter(
        buffer, fieldnames=list(columns), lineterminator="\n"
    )
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k, "") for k in columns})
    write_text(path, buffer.getvalue())


def read_csv(path):
    """Reads a CSV written by `write_csv` as a list of dicts of strings."""
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def aggregate(rows, by, metrics):
    """Mean and standard deviation of `metrics` over rows sharing `by` keys.

    The standard deviation is the sample one (ddof=1) across the rows of a
    group (seeds, typically); a group of one row gets std 0.

    Args:
        rows: list of dicts.
        by: keys that identify a group (e.g. ("model",)).
        metrics: keys whose values are averaged.

    Returns:
        A list of dicts, one per group in order of first appearance, with
        the `by` keys, `n` (rows in the group), and for each metric
        `<metric>` (the mean) and `<metric>_std`.

    Example:

    >>> aggregate([{"m": "a", "x": 1.0}, {"m": "a", "x": 3.0}], ("m",),
    ...           ("x",))
    [{'m': 'a', 'n': 2, 'x': 2.0, 'x_std': 1.4142135623730951}]
    """
    groups = {}
    for row in rows:
        key = tuple(row[k] for k in by)
        groups.setdefault(key, []).append(row)
    summary = []
    for key, members in groups.items():
        out = dict(zip(by, key))
        out["n"] = len(members)
        for metric in metrics:
            values = np.array([float(r[metric]) for r in members])
            out[metric] = float(values.mean())
            out[f"{metric}_std"] = (
                float(values.std(ddof=1)) if len(values) > 1 else 0.0
            )
        summary.append(out)
    return summary


def format_mean_std(mean, std, digits=3):
    """ "0.123 ± 0.004" (digits after the decimal point)."""
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def format_flops(flops):
    """Engineering notation for a FLOP count: 1.23 M, 4.56 G, ..."""
    flops = float(flops)
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(flops) >= scale:
            return f"{flops / scale:.3g} {unit}"
    return f"{flops:.3g}"


def markdown_table(rows, columns, headers=None):
    """A GitHub Markdown table.

    Args:
        rows: list of dicts.
        columns: keys to show, in order.
        headers: column titles (default: the keys).

    Returns:
        The table as a string ending in a newline.

    Example:

    >>> print(markdown_table([{"a": 1, "b": "x"}], ("a", "b")), end="")
    | a | b |
    |---|---|
    | 1 | x |
    """
    headers = list(headers or columns)
    if len(headers) != len(columns):
        raise ValueError(
            f"headers ({len(headers)}) and columns ({len(columns)}) differ "
            "in length"
        )
    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---" for _ in headers) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(str(row[c]) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def for_each_seed(seeds, fn, label=""):
    """Calls `fn(seed)` for each seed, printing progress and wall time.

    Args:
        seeds: the seeds.
        fn: a function of one seed returning a list of result rows.
        label: printed before each seed.

    Returns:
        The concatenated rows.
    """
    rows = []
    start = time.perf_counter()
    seeds = check_seeds(seeds)
    for i, seed in enumerate(seeds):
        tic = time.perf_counter()
        print(f"{label}seed {seed} ({i + 1}/{len(seeds)})", flush=True)
        rows.extend(fn(seed))
        total = time.perf_counter() - start
        left = len(seeds) - i - 1
        # Seeds cost alike: the mean so far times the seeds left.
        eta = f", about {total / (i + 1) * left:.0f} s left" if left else ""
        print(
            f"{label}seed {seed} done in {time.perf_counter() - tic:.1f} s "
            f"(total {total:.1f} s{eta})",
            flush=True,
        )
    return rows


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    return pyplot


def save_figure(figure, path):
    """Saves a matplotlib figure as PNG, atomically, and closes it."""
    if not os.fspath(path).endswith(".png"):
        raise ValueError(f"path must end in .png; received {path!r}")
    with atomic_path(path) as temp:
        figure.savefig(temp, dpi=110, bbox_inches="tight")
    _pyplot().close(figure)


def plot_bars(summary, label_key, metrics, path, titles=None):
    """One bar chart per metric (mean with a std error bar), side by side.

    Args:
        summary: rows of `aggregate`.
        label_key: key of the bar labels (e.g. "model").
        metrics: metric keys, one panel each.
        path: the .png path.
        titles: panel titles (default: the metric keys).
    """
    pyplot = _pyplot()
    titles = list(titles or metrics)
    figure, axes = pyplot.subplots(
        1, len(metrics), figsize=(3.2 * len(metrics), 3.4), squeeze=False
    )
    labels = [str(row[label_key]) for row in summary]
    positions = np.arange(len(labels))
    colors = [f"C{i}" for i in range(len(labels))]
    for axis, metric, title in zip(axes[0], metrics, titles):
        means = [row[metric] for row in summary]
        stds = [row[f"{metric}_std"] for row in summary]
        axis.bar(positions, means, yerr=stds, color=colors, capsize=3)
        axis.set_xticks(positions)
        axis.set_xticklabels(labels, rotation=45, ha="right", fontsize=8)
        axis.set_title(title, fontsize=10)
        axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    save_figure(figure, path)


def plot_scatter(summary, label_key, x_key, y_key, path, x_label, y_label):
    """Mean y (with std bars) against x, one labelled point per row.

    Args:
        summary: rows of `aggregate`.
        label_key: key of the point labels.
        x_key, y_key: keys of the coordinates (`<y_key>_std` gives y bars;
            `<x_key>_std`, when present, x bars).
        path: the .png path.
        x_label, y_label: axis titles.
    """
    pyplot = _pyplot()
    figure, axis = pyplot.subplots(figsize=(5.0, 3.8))
    for i, row in enumerate(summary):
        axis.errorbar(
            row[x_key],
            row[y_key],
            xerr=row.get(f"{x_key}_std"),
            yerr=row.get(f"{y_key}_std"),
            fmt="o",
            color=f"C{i}",
            capsize=3,
            label=str(row[label_key]),
        )
    values = [row[x_key] for row in summary]
    if values and min(values) > 0 and max(values) / min(values) > 10:
        axis.set_xscale("log")
    axis.set_xlabel(x_label)
    axis.set_ylabel(y_label)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    save_figure(figure, path)
