"""Held-out metrics of ViT classifiers and T5 translators.

Classifier: accuracy, NLL (nats), ECE (15 bins) and Brier score of the
softmax of its logits (`keras_moe.evaluation.metrics`). T5: the loss (mean
cross-entropy per real target token), token accuracy and exact match of
greedy generation.
"""

import time

import keras
import numpy as np

from keras_moe.checkpoints import load_model
from keras_moe.data.specs import CLASSIFICATION
from keras_moe.data.specs import batches
from keras_moe.data.specs import check_model_fits_data
from keras_moe.data.specs import describe_dataset
from keras_moe.evaluation import metrics as metrics_lib
from keras_moe.evaluation.sequences import exact_matches
from keras_moe.models.moe_blocks import moe_layers
from keras_moe.models.moe_blocks import with_eval_capacity_factor


def evaluate_model(model, spec, batch_size=64, split="test", max_examples=None):
    """Held-out metrics of a built model on `spec`'s `split`.

    Classifier: accuracy, NLL (nats), ECE (15 bins) and Brier score of the
    softmax of its logits (`keras_moe.evaluation.metrics`). T5: the loss (mean
    cross-entropy per real target token), token accuracy and exact match
    of greedy generation (the generated ids up to end of sequence equal
    the target's).

    Args:
        model: a keras_moe ViT or T5.
        spec: a `DataSpec`.
        batch_size: evaluation batch size.
        split: the split to score.
        max_examples: score only the first this many examples.

    Returns:
        A dict of floats, with "examples" the count scored.
    """
    check_model_fits_data(model, spec)
    dataset = batches(spec, split, batch_size)
    if max_examples is not None:
        dataset = dataset.unbatch().take(max_examples).batch(batch_size)
    if spec.kind == CLASSIFICATION:
        return score_classifier(model, dataset)
    return score_translation(model, dataset)


def score_classifier(model, dataset):
    """Accuracy, NLL, ECE and Brier score of a classifier's softmax.

    Args:
        model: called on each batch of images, returning logits <[B, K]>.
        dataset: an iterable of (images, labels <int>[B]) batches.

    Returns:
        {"examples", "accuracy", "nll", "ece", "brier"} (floats but the
        count; `keras_moe.evaluation.metrics.uncertainty_metrics`).
    """
    logits, labels = [], []
    for images, batch_labels in dataset:
        logits.append(keras.ops.convert_to_numpy(model(images)))
        labels.append(np.asarray(batch_labels))
    logits = np.concatenate(logits).astype(np.float64)
    labels = np.concatenate(labels)
    probs = np.exp(logits - _logsumexp(logits))
    results = metrics_lib.uncertainty_metrics(labels, probs)
    return {
        "examples": int(len(labels)),
        "accuracy": 1.0 - results["error"],
        "nll": results["nll"],
        "ece": results["ece"],
        "brier": results["brier"],
    }


def score_translation(model, dataset):
    """Loss, token accuracy and exact match of a T5.

    The loss is the mean cross-entropy over real target tokens (weight 1)
    with teacher forcing; token accuracy the share of them the argmax
    predicts; exact match the share of examples whose greedy generation
    (`T5.generate`, as many tokens as the targets hold) equals the target
    up to and including its end-of-sequence id
    (`keras_moe.evaluation.sequences.exact_matches`).

    Args:
        model: a keras_moe T5.
        dataset: an iterable of (inputs, targets <int>[B, U], weights
            <float>[B, U]) batches (see `batches`).

    Returns:
        {"examples", "loss", "token_accuracy", "exact_match"}.
    """
    total_loss = total_tokens = correct_tokens = 0.0
    exact = count = 0
    for inputs, targets, weights in dataset:
        logits = keras.ops.convert_to_numpy(model(inputs)).astype(np.float64)
        targets, weights = np.asarray(targets), np.asarray(weights)
        log_probs = logits - _logsumexp(logits)
        picked = np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
        total_loss += float(-(picked * weights).sum())
        total_tokens += float(weights.sum())
        correct_tokens += float(
            ((logits.argmax(-1) == targets) * weights).sum()
        )
        generated = keras.ops.convert_to_numpy(
            model.generate(inputs["encoder_token_ids"], targets.shape[1] + 1)
        )[:, 1:]
        exact += sum(exact_matches(generated, targets))
        count += len(targets)
    return {
        "examples": count,
        "loss": total_loss / max(total_tokens, 1.0),
        "token_accuracy": correct_tokens / max(total_tokens, 1.0),
        "exact_match": exact / max(count, 1),
    }


def _logsumexp(logits):
    peak = logits.max(-1, keepdims=True)
    return peak + np.log(np.exp(logits - peak).sum(-1, keepdims=True))


def evaluate(
    model_path,
    dataset,
    data_dir=None,
    split="test",
    batch_size=64,
    eval_capacity_factor="keep",
    max_examples=None,
    input_length=16,
    target_length=16,
):
    """Loads a model and returns `evaluate_model`'s metrics.

    Args:
        model_path: a `.keras` file or a dense checkpoint.
        dataset: dataset name; `split` of it is scored.
        data_dir: TFDS data directory.
        split: the split.
        batch_size: evaluation batch size.
        eval_capacity_factor: "keep" (the model's), None (drop no token) or
            a float > 0 for every MoE block.
        max_examples: score only the first this many examples.
        input_length, target_length: T5 sequence lengths.
    """
    spec = describe_dataset(dataset, data_dir, input_length, target_length)
    model = load_model(model_path)
    if eval_capacity_factor != "keep":
        model = with_eval_capacity_factor(model, eval_capacity_factor)
    start = time.perf_counter()
    results = evaluate_model(model, spec, batch_size, split, max_examples)
    results["seconds"] = round(time.perf_counter() - start, 2)
    results["eval_capacity_factors"] = sorted(
        {str(layer.eval_capacity_factor) for layer in moe_layers(model)}
    )
    return results
