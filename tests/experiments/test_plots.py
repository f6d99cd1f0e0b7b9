"""Tests of keras_moe.experiments.plots: PNGs written atomically, bad input."""

import os
import sys

import numpy as np
import pytest
from matplotlib import image as mpimg

from keras_moe.experiments import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _read_png(path):
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    return mpimg.imread(path)


def test_learning_curves_png(tmp_path):
    path = plots.plot_learning_curves(
        {
            "test accuracy": {
                "dense": ([0, 1, 2], [0.5, 0.6, 0.7]),
                "moe": ([1, 2], [0.65, 0.8]),
            },
            "test NLL": {"dense": ([0, 1, 2], [1.0, 0.8, 0.7])},
        },
        tmp_path / "out" / "curves.png",
        x_label="TFLOPs",
        title="curves",
    )
    pixels = _read_png(path)
    # Two panels side by side: wider than tall, not blank.
    assert pixels.shape[1] > pixels.shape[0] > 100
    assert pixels[..., :3].std() > 0.05
    assert os.listdir(tmp_path / "out") == ["curves.png"]


def test_routing_heatmaps_png(tmp_path):
    rng = np.random.default_rng(0)
    path = plots.plot_routing_heatmaps(
        {"block_1": rng.random((4, 17)), "block_3": rng.random((4, 17))},
        tmp_path / "routing.png",
        x_label="token position",
        y_label="expert",
    )
    pixels = _read_png(path)
    assert pixels.shape[1] > pixels.shape[0]
    assert os.listdir(tmp_path) == ["routing.png"]


@pytest.mark.parametrize(
    "panels, match",
    [
        ({}, "non-empty"),
        ({"acc": {}}, "has no curve"),
        ({"acc": {"a": ([0, 1], [1])}}, "as many xs as ys"),
    ],
)
def test_learning_curves_bad_input(panels, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        plots.plot_learning_curves(panels, tmp_path / "c.png", "x")
    assert os.listdir(tmp_path) == []


def test_heatmaps_bad_input(tmp_path):
    with pytest.raises(ValueError, match="at least one"):
        plots.plot_routing_heatmaps({}, tmp_path / "h.png", "x", "y")
    with pytest.raises(ValueError, match="finite 2-D"):
        plots.plot_routing_heatmaps(
            {"a": np.ones(3)}, tmp_path / "h.png", "x", "y"
        )
    with pytest.raises(ValueError, match=".png"):
        plots.plot_routing_heatmaps(
            {"a": np.ones((2, 2))}, tmp_path / "h.jpg", "x", "y"
        )
    assert os.listdir(tmp_path) == []


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))
