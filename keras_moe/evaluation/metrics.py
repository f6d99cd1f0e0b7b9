"""Uncertainty metrics of a classifier's predictive probabilities.

Shape letters: N examples, K classes.

Every function takes NumPy-convertible arrays, `labels` <int>[N] and
`probs` <float>[N, K] (rows are probability vectors: apply the softmax to
logits first; for an ensemble, average the members' probabilities, e.g. with
`keras_moe.layers.ensemble.EnsembleAverage`), works in float64 and returns a
Python float. Rows must sum to 1 within 1e-3 and are renormalised to sum
to 1 exactly (float32 rounding). Where scikit-learn has the metric it
computes it:

* `negative_log_likelihood`: mean of -log p[y] (`sklearn.metrics.log_loss`,
  probabilities clipped to [eps, 1 - eps] of float64).
* `brier_score`: mean over examples of sum_k (p_k - 1[k = y])^2, the
  multi-class Brier score of Brier (1950), in [0, 2], for any K, two
  included (`sklearn.metrics.brier_score_loss(scale_by_half=False)`).
* `expected_calibration_error`: Guo et al. (2017). Confidence is the max
  probability, the prediction its argmax (ties: lowest class). Examples
  fall into `num_bins` B (15) equal-width bins of confidence, bin b holding
  confidences in (b/B, (b+1)/B] (edges `np.linspace(0, 1, B + 1)`; a
  confidence of exactly 0 joins bin 0);
  ECE = sum_b |bin b| / N * |accuracy(bin b) - mean confidence(bin b)|.
  Empty bins count 0. scikit-learn's `calibration_curve` is binary only,
  so this one is NumPy.
* `ood_auroc`: area under the ROC curve of telling out-of-distribution
  inputs (positives) from in-distribution ones (negatives) by an
  uncertainty score (`sklearn.metrics.roc_auc_score`): the negative max
  probability (`score="max_prob"`, Hendrycks and Gimpel, 2017) or the
  predictive entropy -sum_k p_k log p_k (`score="entropy"`). 0.5 is chance,
  1.0 perfect.

`uncertainty_metrics` returns all of them in one dict.
"""

import numpy as np
from sklearn import metrics as sk_metrics

from keras_moe.utils.checks import check_positive_int

OOD_SCORES = ("max_prob", "entropy")


def _check(labels, probs, atol=1e-3):
    """Validated (labels <int64>[N], probs <float64>[N, K])."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] == 0 or probs.shape[1] < 2:
        raise ValueError(
            "probs must be <float>[N, K] with N >= 1 and K >= 2; received "
            f"shape {probs.shape}"
        )
    if not np.all(np.isfinite(probs)) or np.any(probs < 0):
        raise ValueError("probs must be finite and >= 0")
    sums = probs.sum(axis=1)
    if not np.allclose(sums, 1.0, atol=atol):
        worst = int(np.argmax(np.abs(sums - 1.0)))
        raise ValueError(
            "each row of probs must sum to 1 (pass probabilities, not "
            f"logits); row {worst} sums to {sums[worst]:.6f}"
        )
    # Rounding (float32 softmax, averaging) leaves sums a few ulps off 1.
    probs = probs / sums[:, None]
    if labels is None:
        return None, probs
    labels = np.asarray(labels)
    if labels.shape != probs.shape[:1] or not np.issubdtype(
        labels.dtype, np.integer
    ):
        raise ValueError(
            f"labels must be <int>[N] with N = {probs.shape[0]}; received "
            f"{labels.dtype} of shape {labels.shape}"
        )
    if labels.min() < 0 or labels.max() >= probs.shape[1]:
        raise ValueError(
            f"labels must be in [0, {probs.shape[1]}); received values in "
            f"[{labels.min()}, {labels.max()}]"
        )
    return labels.astype(np.int64), probs


def negative_log_likelihood(labels, probs):
    """Mean negative log-likelihood of the labels, in nats.

    Example:

    >>> round(negative_log_likelihood([0, 1], [[0.5, 0.5], [0.2, 0.8]]), 4)
    0.4581
    """
    labels, probs = _check(labels, probs)
    return float(
        sk_metrics.log_loss(labels, probs, labels=np.arange(probs.shape[1]))
    )


def brier_score(labels, probs):
    """Multi-class Brier score, mean of sum_k (p_k - 1[k = y])^2.

    Example:

    >>> round(brier_score([0], [[0.7, 0.2, 0.1]]), 4)
    0.14
    """
    labels, probs = _check(labels, probs)
    return float(
        sk_metrics.brier_score_loss(
            labels,
            probs,
            labels=np.arange(probs.shape[1]),
            # Sum over all K classes, two included (sklearn's "auto" would
            # halve binary scores to the one-class form).
            scale_by_half=False,
        )
    )


def expected_calibration_error(labels, probs, num_bins=15):
    """Expected calibration error with `num_bins` equal-width bins.

    See the module docstring for the binning.

    Example:

    >>> expected_calibration_error([0, 0], [[0.9, 0.1], [0.6, 0.4]])
    0.25
    """
    check_positive_int("num_bins", num_bins)
    labels, probs = _check(labels, probs)
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    # Bin b holds (edges[b], edges[b + 1]]; a confidence of 0 joins bin 0.
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    bins = np.digitize(confidence, edges[1:-1], right=True)
    total = 0.0
    for b in range(num_bins):
        members = bins == b
        if members.any():
            gap = correct[members].mean() - confidence[members].mean()
            total += members.sum() * abs(gap)
    return float(total / len(labels))


def predictive_entropy(probs):
    """<float64>[N] entropy -sum_k p_k log p_k (0 log 0 = 0), in nats."""
    _, probs = _check(None, probs)
    logs = np.log(np.where(probs > 0, probs, 1.0))
    return -np.sum(probs * logs, axis=1)


def ood_auroc(in_probs, out_probs, score="max_prob"):
    """AUROC of detecting out-of-distribution inputs from `score`.

    Args:
        in_probs: <float>[N_in, K] probabilities on in-distribution inputs.
        out_probs: <float>[N_out, K] probabilities on OOD inputs.
        score: "max_prob" (OOD when the max probability is low) or
            "entropy" (OOD when the predictive entropy is high).

    Example:

    >>> ood_auroc([[0.9, 0.1], [0.8, 0.2]], [[0.5, 0.5], [0.85, 0.15]])
    0.75
    """
    if score not in OOD_SCORES:
        raise ValueError(
            f"score must be one of {OOD_SCORES}; received {score!r}"
        )
    _, in_probs = _check(None, in_probs)
    _, out_probs = _check(None, out_probs)
    if in_probs.shape[1] != out_probs.shape[1]:
        raise ValueError(
            "in_probs and out_probs must have the same number of classes; "
            f"received {in_probs.shape[1]} and {out_probs.shape[1]}"
        )
    probs = np.concatenate([in_probs, out_probs])
    is_ood = np.concatenate([np.zeros(len(in_probs)), np.ones(len(out_probs))])
    if score == "max_prob":
        uncertainty = -probs.max(axis=1)
    else:
        uncertainty = predictive_entropy(probs)
    return float(sk_metrics.roc_auc_score(is_ood, uncertainty))


def uncertainty_metrics(labels, probs, ood_probs=None, num_bins=15):
    """All metrics of one set of predictions, as a dict of floats.

    Keys: "error" (1 - accuracy, argmax), "nll", "ece", "brier" and, when
    `ood_probs` (<float>[N_ood, K] on out-of-distribution inputs) is given,
    "ood_auroc_max_prob" and "ood_auroc_entropy".

    Example:

    >>> out = uncertainty_metrics([0, 1], [[0.9, 0.1], [0.6, 0.4]])
    >>> out["error"]
    0.5
    """
    labels, probs = _check(labels, probs)
    results = {
        "error": float(np.mean(probs.argmax(axis=1) != labels)),
        "nll": negative_log_likelihood(labels, probs),
        "ece": expected_calibration_error(labels, probs, num_bins),
        "brier": brier_score(labels, probs),
    }
    if ood_probs is not None:
        for score in OOD_SCORES:
            results[f"ood_auroc_{score}"] = ood_auroc(probs, ood_probs, score)
    return results
