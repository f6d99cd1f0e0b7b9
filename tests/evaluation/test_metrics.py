"""Uncertainty metrics against values worked out by hand."""

import math
import sys

import numpy as np
import pytest

from keras_moe.evaluation import metrics

# Four binary predictions: confidence .9 (right), .7 (wrong), .65 (right),
# .55 (wrong); with 15 bins each falls in its own bin (13, 10, 9, 8).
LABELS = np.array([0, 1, 1, 0])
PROBS = np.array([[0.9, 0.1], [0.7, 0.3], [0.35, 0.65], [0.45, 0.55]])


def test_negative_log_likelihood():
    expected = -(
        math.log(0.9) + math.log(0.3) + math.log(0.65) + math.log(0.45)
    )
    assert metrics.negative_log_likelihood(LABELS, PROBS) == pytest.approx(
        expected / 4
    )
    # Three classes, one never the label: still a 3-way distribution.
    probs = [[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]
    assert metrics.negative_log_likelihood([0, 2], probs) == pytest.approx(
        (math.log(2) - math.log(0.8)) / 2
    )
    # float32 rows that sum to 1 within rounding are accepted.
    assert metrics.negative_log_likelihood(
        LABELS, PROBS.astype("float32")
    ) == pytest.approx(expected / 4, rel=1e-6)


def test_brier_score():
    # (p_y - 1)^2 + (p_other)^2 per row: .02, .98, .245, .605.
    assert metrics.brier_score(LABELS, PROBS) == pytest.approx(1.85 / 4)
    # Three classes: (.5 - 1)^2 + .25^2 + .25^2 = .375; .01 + .01 + .04.
    probs = [[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]
    assert metrics.brier_score([0, 2], probs) == pytest.approx(0.435 / 2)


def test_expected_calibration_error_with_fifteen_bins():
    # One example per bin: mean of |correct - confidence|.
    expected = (0.1 + 0.7 + 0.35 + 0.55) / 4
    assert metrics.expected_calibration_error(LABELS, PROBS) == pytest.approx(
        expected
    )


def test_expected_calibration_error_bins_are_equal_width():
    # Two bins, (0, .5] and (.5, 1]: all four fall in the second; accuracy
    # 1/2, mean confidence (.9 + .7 + .65 + .55) / 4 = .7.
    assert metrics.expected_calibration_error(
        LABELS, PROBS, num_bins=2
    ) == pytest.approx(0.2)
    # Three classes, bins of 1/3: confidence .3334 goes to bin 1 (1/3, 2/3]
    # with .6 (right, wrong); .9 alone in bin 2 (right).
    probs = [[0.3334, 0.3333, 0.3333], [0.6, 0.3, 0.1], [0.05, 0.05, 0.9]]
    labels = [0, 1, 2]
    bin_1 = 2 / 3 * abs(0.5 - (0.3334 + 0.6) / 2)
    bin_2 = 1 / 3 * abs(1.0 - 0.9)
    assert metrics.expected_calibration_error(
        labels, probs, num_bins=3
    ) == pytest.approx(bin_1 + bin_2)
    # A confidence of exactly 1 belongs to the last bin: perfect calibration.
    assert metrics.expected_calibration_error([1], [[0.0, 1.0]]) == 0.0


def test_ood_auroc_from_max_probability_and_entropy():
    in_probs = [[0.9, 0.1], [0.7, 0.3], [0.35, 0.65]]
    out_probs = [[0.6, 0.4], [0.8, 0.2]]
    # OOD uncertainty above in-distribution in 4 of the 6 pairs: .6 beats
    # all three, .8 only beats .9.
    assert metrics.ood_auroc(in_probs, out_probs) == pytest.approx(4 / 6)
    # Two classes: entropy ranks like the max probability.
    assert metrics.ood_auroc(
        in_probs, out_probs, score="entropy"
    ) == pytest.approx(4 / 6)
    # Three classes where the two scores disagree: the OOD input has the
    # lower max probability (.5 < .6) but the lower entropy (ln 2 < .950).
    in_probs, out_probs = [[0.6, 0.2, 0.2]], [[0.5, 0.5, 0.0]]
    assert metrics.ood_auroc(in_probs, out_probs, "max_prob") == 1.0
    assert metrics.ood_auroc(in_probs, out_probs, "entropy") == 0.0
    np.testing.assert_allclose(
        metrics.predictive_entropy(in_probs + out_probs),
        [-(0.6 * math.log(0.6) + 0.4 * math.log(0.2)), math.log(2)],
    )


def test_uncertainty_metrics_collects_everything():
    ood = [[0.5, 0.5], [0.6, 0.4]]
    results = metrics.uncertainty_metrics(LABELS, PROBS, ood_probs=ood)
    assert results == {
        "error": 0.5,
        "nll": metrics.negative_log_likelihood(LABELS, PROBS),
        "ece": metrics.expected_calibration_error(LABELS, PROBS),
        "brier": metrics.brier_score(LABELS, PROBS),
        "ood_auroc_max_prob": metrics.ood_auroc(PROBS, ood, "max_prob"),
        "ood_auroc_entropy": metrics.ood_auroc(PROBS, ood, "entropy"),
    }
    assert set(metrics.uncertainty_metrics(LABELS, PROBS)) == {
        "error",
        "nll",
        "ece",
        "brier",
    }


@pytest.mark.parametrize(
    "labels, probs, match",
    [
        ([0, 1], [[2.0, -1.0], [0.5, 0.5]], "must be finite and >= 0"),
        ([0, 1], [[0.9, 0.3], [0.5, 0.5]], "must sum to 1"),
        ([0, 2], [[0.9, 0.1], [0.5, 0.5]], r"labels must be in \[0, 2\)"),
        ([0.0, 1.0], [[0.9, 0.1], [0.5, 0.5]], "labels must be <int>"),
        ([0], [[0.9, 0.1], [0.5, 0.5]], "labels must be <int>"),
        ([0], [0.9, 0.1], r"probs must be <float>\[N, K\]"),
        ([0], [[1.0]], r"probs must be <float>\[N, K\]"),
    ],
)
def test_bad_inputs(labels, probs, match):
    with pytest.raises(ValueError, match=match):
        metrics.negative_log_likelihood(labels, probs)


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_bins must be an int >= 1"):
        metrics.expected_calibration_error(LABELS, PROBS, num_bins=0)
    with pytest.raises(ValueError, match="score must be one of"):
        metrics.ood_auroc(PROBS, PROBS, score="energy")
    with pytest.raises(ValueError, match="same number of classes"):
        metrics.ood_auroc(PROBS, [[0.2, 0.3, 0.5]])


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))
