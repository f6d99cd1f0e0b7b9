"""PNG plots of training runs: learning curves and expert-routing heatmaps.

Shape letters: E experts, T token positions, P points on a curve.

Both functions draw with matplotlib's non-interactive Agg backend (no
display needed) and write the PNG atomically: to a temporary file in the
target directory, renamed into place, so a reader never sees half a file.

Example:

    plot_learning_curves(
        {"test accuracy": {"dense": ([0, 1e9, 2e9], [0.80, 0.84, 0.86])}},
        "/tmp/curves.png",
        x_label="extra training FLOPs",
    )
"""

import os

import numpy as np

from keras_moe.utils.files import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    return pyplot


def _save(figure, path):
    """Writes `figure` to `path` (a .png) through a temporary file."""
    with atomic_path(path) as temp:
        figure.savefig(temp, dpi=110, bbox_inches="tight")


def _check_png(path):
    if not os.fspath(path).endswith(".png"):
        raise ValueError(f"path must end in .png; received {path!r}")


def plot_learning_curves(panels, path, x_label, title=None):
    """Line plots of metrics against a common x axis, one panel per metric.

    Args:
        panels: {y label: {curve name: (xs <[P]>, ys <[P]>)}}, one panel per
            y label (left to right), one line (with markers) per curve.
        path: the PNG file to write.
        x_label: label of every panel's x axis.
        title: figure title (None for none).

    Returns:
        `path`.

    Raises:
        ValueError: no curve, or a curve whose xs and ys differ in length.
    """
    _check_png(path)
    if not panels or not all(isinstance(c, dict) for c in panels.values()):
        raise ValueError(
            "panels must be a non-empty {y label: {name: (xs, ys)}} dict; "
            f"received {panels!r}"
        )
    for y_label, curves in panels.items():
        if not curves:
            raise ValueError(f"panel {y_label!r} has no curve")
        for name, (xs, ys) in curves.items():
            if len(xs) != len(ys) or not len(xs):
                raise ValueError(
                    f"curve {name!r} of panel {y_label!r} needs as many xs as "
                    f"ys (at least one); received {len(xs)} and {len(ys)}"
                )
    pyplot = _pyplot()
    figure, axes = pyplot.subplots(
        1, len(panels), figsize=(5.2 * len(panels), 4.0), squeeze=False
    )
    for axis, (y_label, curves) in zip(axes[0], panels.items()):
        for name, (xs, ys) in curves.items():
            axis.plot(xs, ys, marker="o", markersize=3, label=name)
        axis.set_xlabel(x_label)
        axis.set_ylabel(y_label)
        axis.grid(alpha=0.3)
        axis.legend()
    if title:
        figure.suptitle(title)
    _save(figure, path)
    pyplot.close(figure)
    return path


def plot_routing_heatmaps(heatmaps, path, x_label, y_label, title=None):
    """One heatmap per MoE layer, side by side, with a shared colour scale.

    Args:
        heatmaps: {layer name: <float>[E, T] matrix}, e.g. the fraction of
            examples in which expert e processed token position t.
        path: the PNG file to write.
        x_label, y_label: axis labels of every panel (columns, rows).
        title: figure title (None for none).

    Returns:
        `path`.

    Raises:
        ValueError: no heatmap, or one that is not a finite 2-D matrix.
    """
    _check_png(path)
    if not heatmaps:
        raise ValueError("heatmaps must hold at least one matrix")
    matrices = {}
    for name, matrix in heatmaps.items():
        matrix = np.asarray(matrix, dtype=np.float64)
        if matrix.ndim != 2 or not np.all(np.isfinite(matrix)):
            raise ValueError(
                f"heatmap {name!r} must be a finite 2-D matrix; received "
                f"shape {matrix.shape}"
            )
        matrices[name] = matrix
    high = max(float(m.max()) for m in matrices.values())
    pyplot = _pyplot()
    widest = max(m.shape[1] for m in matrices.values())
    figure, axes = pyplot.subplots(
        1,
        len(matrices),
        figsize=(1.5 + (0.28 * widest + 1.2) * len(matrices), 4.0),
        squeeze=False,
    )
    image = None
    for axis, (name, matrix) in zip(axes[0], matrices.items()):
        image = axis.imshow(
            matrix,
            aspect="auto",
            cmap="viridis",
            vmin=0.0,
            vmax=high if high > 0 else 1.0,
            interpolation="nearest",
        )
        axis.set_title(name)
        axis.set_xlabel(x_label)
        axis.set_ylabel(y_label)
        axis.set_yticks(range(matrix.shape[0]))
    figure.colorbar(image, ax=list(axes[0]), shrink=0.85)
    if title:
        figure.suptitle(title, y=1.02)
    _save(figure, path)
    pyplot.close(figure)
    return path
