"""keras_moe.evaluation.scoring against Keras' own losses and metrics and
hand-made targets."""

import sys

import keras
import numpy as np
import pytest

from keras_moe.evaluation import scoring
from keras_moe.models.t5 import T5
from tests import tiny_models


def test_score_classifier_against_keras_metrics():
    model = tiny_models.tiny_vit()
    images = tiny_models.images(12)
    labels = np.arange(12) % 10
    dataset = [(images[:5], labels[:5]), (images[5:], labels[5:])]
    scores = scoring.score_classifier(model, dataset)
    logits = model(images)
    accuracy = keras.metrics.SparseCategoricalAccuracy()
    accuracy.update_state(labels, logits)
    nll = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(
        labels, logits
    )
    assert scores["examples"] == 12
    np.testing.assert_allclose(scores["accuracy"], accuracy.result(), atol=1e-7)
    np.testing.assert_allclose(scores["nll"], nll, rtol=1e-5)
    assert 0 <= scores["ece"] <= 1


def test_score_translation_against_keras_and_hand_made_targets():
    keras.utils.set_random_seed(0)
    model = T5.from_architecture("t5_tiny", vocab_size=40)
    rng = np.random.default_rng(0)
    encoder = rng.integers(3, 40, size=(4, 6)).astype("int32")
    encoder[:, -1] = 1  # end of sequence
    # Targets: the model's own greedy output for rows 0 and 2 (exact
    # matches), one token changed in rows 1 and 3.
    generated = model.generate(encoder, 6).numpy()[:, 1:]  # (4, 5)
    targets = generated.copy()
    targets[1, 0] = (targets[1, 0] + 1) % 40 or 3
    targets[3, -1] = (targets[3, -1] + 1) % 40 or 3
    # Every position counts, whatever the ids (an EOS the model generated
    # is kept as it is).
    weights = np.ones(targets.shape, "float32")
    decoder = np.concatenate([np.zeros((4, 1), "int32"), targets[:, :-1]], 1)
    inputs = {"encoder_token_ids": encoder, "decoder_token_ids": decoder}
    scores = scoring.score_translation(
        model,
        [
            (
                {k: v[:2] for k, v in inputs.items()},
                targets[:2],
                weights[:2],
            ),
            ({k: v[2:] for k, v in inputs.items()}, targets[2:], weights[2:]),
        ],
    )
    logits = model(inputs)
    loss = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction="mean_with_sample_weight"
    )(targets, logits, sample_weight=weights)
    accuracy = keras.metrics.SparseCategoricalAccuracy()
    accuracy.update_state(targets, logits, sample_weight=weights)
    assert scores["examples"] == 4
    np.testing.assert_allclose(scores["loss"], loss, rtol=1e-5)
    np.testing.assert_allclose(
        scores["token_accuracy"], accuracy.result(), atol=1e-7
    )
    assert scores["exact_match"] == 0.5


def test_score_translation_skips_padding():
    keras.utils.set_random_seed(0)
    model = T5.from_architecture("t5_tiny", vocab_size=40)
    encoder = np.array([[5, 6, 7, 1]], "int32")
    targets = np.array([[9, 1, 0, 0]], "int32")
    decoder = np.array([[0, 9, 1, 0]], "int32")
    weights = (targets != 0).astype("float32")
    inputs = {"encoder_token_ids": encoder, "decoder_token_ids": decoder}
    scores = scoring.score_translation(model, [(inputs, targets, weights)])
    logits = model(inputs).numpy().astype(np.float64)[0, :2]
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = -(log_probs[0, 9] + log_probs[1, 1]) / 2
    np.testing.assert_allclose(scores["loss"], expected, rtol=1e-5)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))
