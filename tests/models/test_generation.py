"""Beam search and sampling of `T5.generate` and the vision-language model.

Beam search is checked token for token against Hugging Face's
`generate(num_beams=K, do_sample=False)` on tiny random
`T5ForConditionalGeneration` checkpoints read by keras_moe's own reader
(transformers and torch are test-only dependencies, skipped when absent),
and on a hand-built model whose decoder is a Markov chain, worked by hand.
Sampling is checked against NumPy statements of top-k and nucleus
filtering applied to the model's own logits, and against the distribution
it should draw from.
"""

import json
import math
import os
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_moe.checkpoints.t5 import read_t5_hf_safetensors
from keras_moe.models.t5 import T5
from keras_moe.models.t5 import beam_search_decode
from keras_moe.models.t5 import decoding_options
from keras_moe.models.t5 import sample_decode
from keras_moe.models.t5 import sampling_logits
from keras_moe.models.t5 import t5_config
from keras_moe.models.vlm import VisionLanguageModel
from tests import tiny_models

# Sizes of the Hugging Face parity models of tests/models/test_t5.py: fewer
# encoder than decoder blocks, sequences longer than max_distance.
_HF_TINY = dict(
    vocab_size=48,
    d_model=16,
    num_heads=2,
    d_kv=6,
    d_ff=24,
    num_layers=2,
    num_decoder_layers=3,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=12,
)
_HF_VERSIONS = {"v1_0": ("relu", True), "v1_1": ("gated-gelu", False)}
_MAX_LENGTH = 12


def _np(x):
    return keras.ops.convert_to_numpy(x)


def _encoder_ids(seed, batch=3, length=20, vocab_size=48):
    """Token ids with right and left padding."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, vocab_size, size=(batch, length))
    ids[0, -1] = 1
    ids[1, 13:] = 0
    ids[1, 12] = 1
    ids[2, :5] = 0
    return ids.astype("int32")


def _after_end_to_pad(tokens):
    """Hugging Face fills a finished beam with the end-of-sequence id and
    stops at the longest; keras_moe writes padding up to `max_length`."""
    tokens = np.pad(tokens, ((0, 0), (0, _MAX_LENGTH - tokens.shape[1])))
    for row in tokens:
        ends = np.flatnonzero(row[1:] == 1)
        if ends.size:
            row[ends[0] + 2 :] = 0
    return tokens


def _hf_checkpoint(version, seed, eos_factor, directory):
    """A tiny random HF T5 and its checkpoint on disk, read by keras_moe.

    Weights drawn as in test_t5.py (unit-variance activations, random norm
    scales); the end-of-sequence output row is scaled by `eos_factor` so
    that some beams end early and others run to `max_length`.
    """
    torch = pytest.importorskip("torch")
    from safetensors.numpy import save_file

    feed_forward_proj, tie = _HF_VERSIONS[version]
    hf = tiny_models.random_hf_t5(_HF_TINY, feed_forward_proj, tie, seed)
    with torch.no_grad():
        (hf.shared if tie else hf.lm_head).weight[1] *= eos_factor
    os.makedirs(directory)
    state = {
        name: tensor.detach().numpy().copy()
        for name, tensor in hf.state_dict().items()
    }
    save_file(state, os.path.join(directory, "model.safetensors"))
    hf_config = hf.config.to_dict()
    # As a transformers 4 save looks on the hub (version 5 records v1.1
    # as tied but unscaled).
    hf_config.pop("scale_decoder_outputs", None)
    hf_config["tie_word_embeddings"] = tie
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf_config, f)
    return hf, read_t5_hf_safetensors(directory)


def _hf_beam_search(hf, encoder_ids, num_beams, length_penalty, early_stopping):
    torch = pytest.importorskip("torch")
    with torch.no_grad():
        tokens = hf.generate(
            input_ids=torch.tensor(encoder_ids, dtype=torch.long),
            attention_mask=torch.tensor(encoder_ids != 0, dtype=torch.long),
            do_sample=False,
            num_beams=num_beams,
            length_penalty=length_penalty,
            early_stopping=early_stopping,
            # Counts the decoder start id, as keras_moe's max_length.
            max_length=_MAX_LENGTH,
            decoder_start_token_id=0,
            eos_token_id=1,
            pad_token_id=0,
            # Hugging Face sizes its cache by the encoder's block count,
            # which differs from the decoder's here; without a cache it
            # recomputes every prefix, a reference for keras_moe's caches.
            use_cache=False,
        ).numpy()
    return _after_end_to_pad(tokens)


# (version, seed, eos_factor, [(num_beams, length_penalty, early_stopping)]):
# every setting of a model gives other tokens than the rest and than
# greedy decoding, so that each option is seen to act as Hugging Face's.
_BEAM_CASES = [
    (
        "v1_1",
        3,
        2.0,
        [
            (4, 2.0, False),
            (4, 2.0, True),
            (4, 2.0, "never"),
            (4, 1.0, True),
            (4, 0.0, False),
        ],
    ),
    (
        "v1_0",
        5,
        2.5,
        [
            (2, 2.0, False),
            (2, 2.0, True),
            (2, 2.0, "never"),
            (4, 1.0, False),
            (4, -1.0, "never"),
        ],
    ),
]


@pytest.mark.parametrize("version,seed,eos_factor,settings", _BEAM_CASES)
def test_beam_search_matches_hugging_face(
    version, seed, eos_factor, settings, tmp_path
):
    hf, model = _hf_checkpoint(version, seed, eos_factor, str(tmp_path / "t5"))
    encoder_ids = _encoder_ids(seed)
    greedy = _np(model.generate(encoder_ids, _MAX_LENGTH))
    seen = set()
    for num_beams, length_penalty, early_stopping in settings:
        expected = _hf_beam_search(
            hf, encoder_ids, num_beams, length_penalty, early_stopping
        )
        tokens = _np(
            model.generate(
                encoder_ids,
                _MAX_LENGTH,
                num_beams=num_beams,
                length_penalty=length_penalty,
                early_stopping=early_stopping,
            )
        )
        np.testing.assert_array_equal(
            tokens,
            expected,
            err_msg=f"num_beams={num_beams}, length_penalty="
            f"{length_penalty}, early_stopping={early_stopping!r}",
        )
        assert tokens.dtype == np.int32
        assert not np.array_equal(tokens, greedy)
        seen.add(tokens.tobytes())
    assert len(seen) == len(settings)


def _markov_t5(transitions):
    """A T5 whose next-token distribution is `transitions[current token]`.

    Every weight is zero but the embedding (the identity: token t is the
    unit vector e_t), the decoder's final norm and the output projection,
    so the decoder's output is `RMSNorm(e_t) = 2 * e_t * scale` whatever
    the encoder input and the earlier tokens, and the logits are row t of
    `log(transitions)`.
    """
    vocab = len(transitions)
    model = T5(
        vocab_size=vocab,
        model_dim=vocab,
        num_heads=1,
        head_dim=2,
        hidden_dim=2,
        num_encoder_layers=1,
        num_decoder_layers=1,
        relative_attention_num_buckets=4,
        relative_attention_max_distance=4,
        activation="gated_gelu",
        tie_embeddings=False,
        layer_norm_epsilon=1e-12,
    )
    for variable in model.weights:
        variable.assign(np.zeros(variable.shape, "float32"))
    variables = model.canonical_variables()
    variables["shared/embedding"].assign(np.eye(vocab, dtype="float32"))
    # RMS of a unit vector of `vocab` = 4 entries is 1/2.
    variables["decoder/final_norm/scale"].assign(np.full(vocab, 0.5))
    variables["lm_head/kernel"].assign(np.log(transitions).astype("float32"))
    return model


# Tokens 0 (start), 1 (end), 2 ("a"), 3 ("b"); row = current token.
_CHAIN = np.array(
    [
        [0.02, 0.50, 0.40, 0.08],
        [0.25, 0.25, 0.25, 0.25],
        [0.02, 0.90, 0.05, 0.03],
        [0.10, 0.20, 0.30, 0.40],
    ]
)


@pytest.mark.parametrize(
    "length_penalty,expected",
    [(1.0, [0, 2, 1, 0]), (0.0, [0, 1, 0, 0]), (-1.0, [0, 1, 0, 0])],
)
def test_length_penalty_by_hand(length_penalty, expected):
    """Two beams, four tokens at most.

    Step 1, from the start: "end" log 0.5 = -0.693 and "a" log 0.4 =
    -0.916 are the two best candidates; "end" finishes (length 1, score
    -0.693 whatever the penalty), "a" and "b" (log 0.08 = -2.526) run on.
    Step 2: "a end" scores -0.916 + log 0.9 = -1.022 and finishes at
    length 2: -1.022 / 2**length_penalty. Both slots are now full, and
    the best running beam, "b b" at -2.526 + log 0.4 = -3.442, cannot beat
    the worse of them (-3.442 / 2**p is below both), so the search stops.
    Penalty 1: -0.511 ("a end") beats -0.693 ("end"); penalty 0: -1.022
    loses; penalty -1: -2.044 loses.
    """
    model = _markov_t5(_CHAIN)
    tokens = model.generate(
        np.array([[2, 3, 1]], "int32"),
        4,
        num_beams=2,
        length_penalty=length_penalty,
    )
    assert _np(tokens).tolist() == [expected]
    # Greedy decoding takes "end" at once.
    assert _np(model.generate(np.array([[2, 3, 1]], "int32"), 4)).tolist() == [
        [0, 1, 0, 0]
    ]


@pytest.fixture(scope="module")
def model():
    """A randomly initialised tiny T5 v1.1 (no torch needed)."""
    keras.utils.set_random_seed(3)
    return T5.from_architecture("t5_v1_1_tiny", vocab_size=48)


def test_one_beam_is_greedy(model):
    ids = _encoder_ids(1)
    greedy = _np(model.generate(ids, 9))
    np.testing.assert_array_equal(
        _np(model.generate(ids, 9, num_beams=1)), greedy
    )


@pytest.mark.parametrize(
    "options",
    [
        dict(top_k=1),
        dict(top_k=1, temperature=0.3),
        dict(top_p=1e-6, temperature=3.0),
    ],
)
def test_sampling_one_token_is_greedy(model, options):
    ids = _encoder_ids(2)
    greedy = _np(model.generate(ids, 10))
    for seed in (0, 1):
        tokens = model.generate(ids, 10, do_sample=True, seed=seed, **options)
        np.testing.assert_array_equal(_np(tokens), greedy)


def test_sampling_is_reproducible(model):
    ids = _encoder_ids(4)
    first = _np(model.generate(ids, 10, do_sample=True, seed=7))
    again = _np(model.generate(ids, 10, do_sample=True, seed=7))
    other = _np(model.generate(ids, 10, do_sample=True, seed=8))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    # Without a seed: TensorFlow's global generator, which
    # keras.utils.set_random_seed resets.
    keras.utils.set_random_seed(11)
    unseeded = _np(model.generate(ids, 10, do_sample=True))
    next_call = _np(model.generate(ids, 10, do_sample=True))
    keras.utils.set_random_seed(11)
    np.testing.assert_array_equal(
        _np(model.generate(ids, 10, do_sample=True)), unseeded
    )
    assert not np.array_equal(unseeded, next_call)


def _allowed(logits, top_k, top_p, temperature, slack=1e-4):
    """The tokens sampling may draw: NumPy, one row <[V]> of logits.

    Top-k: logits at least the k-th largest. Nucleus: sorted by
    probability, a token whose more likely tokens hold less than top_p of
    the (top-k renormalised) mass. `slack` widens both so that float
    differences between cached and recomputed logits do not matter.
    """
    scaled = logits.astype("float64") / temperature
    order = np.argsort(-scaled)
    keep = np.ones_like(scaled, bool)
    if top_k:
        keep = scaled >= scaled[order[min(top_k, len(scaled)) - 1]] - slack
    probs = np.where(keep, np.exp(scaled - scaled.max()), 0.0)
    probs /= probs.sum()
    ranked = probs[order]
    more_likely = np.cumsum(ranked) - ranked
    in_nucleus = np.zeros_like(keep)
    in_nucleus[order] = (more_likely < top_p + slack) | (top_p >= 1.0)
    return keep & in_nucleus


def _recomputed_logits(model, ids, tokens, index):
    """Logits after position `index`, by the full model (no caches)."""
    logits = model(
        {"encoder_token_ids": ids, "decoder_token_ids": tokens[:, : index + 1]}
    )
    return _np(logits)[:, -1]


@pytest.mark.parametrize(
    "top_k,top_p,temperature",
    [(5, 1.0, 1.0), (0, 0.6, 1.0), (10, 0.8, 0.7), (3, 0.9, 2.0)],
)
def test_sampled_tokens_lie_in_the_allowed_set(
    model, top_k, top_p, temperature
):
    ids = _encoder_ids(5, batch=6)
    length = 10
    options = dict(top_k=top_k, top_p=top_p, temperature=temperature)
    tokens = _np(model.generate(ids, length, do_sample=True, seed=3, **options))
    # The same draws without filtering, to show that the check can fail.
    free = _np(model.generate(ids, length, do_sample=True, seed=3))
    checked = not_argmax = outside = 0
    for index in range(length - 1):
        logits = _recomputed_logits(model, ids, tokens, index)
        free_logits = _recomputed_logits(model, ids, free, index)
        for row in range(len(ids)):
            if 1 not in tokens[row, 1 : index + 1]:
                allowed = _allowed(logits[row], **options)
                assert allowed.sum() < allowed.size
                token = tokens[row, index + 1]
                assert allowed[token], (row, index, token)
                checked += 1
                not_argmax += token != logits[row].argmax()
            if 1 not in free[row, 1 : index + 1]:
                allowed = _allowed(free_logits[row], **options)
                outside += not allowed[free[row, index + 1]]
    assert checked >= 30
    assert not_argmax >= 1  # it samples
    assert outside >= 1  # and unfiltered sampling would leave the set


def test_sampling_draws_from_the_filtered_softmax(model):
    """The first sampled token of 4000 copies of one input, against the
    softmax of the filtered logits."""
    ids = np.repeat(_encoder_ids(6)[:1], 4000, axis=0)
    options = dict(top_k=8, top_p=0.9, temperature=1.5)
    tokens = _np(model.generate(ids, 2, do_sample=True, seed=0, **options))
    logits = _recomputed_logits(model, ids[:1], tokens[:1], 0)[0]
    kept = _allowed(logits, **options, slack=0.0)
    probs = np.where(kept, np.exp(logits / 1.5 - (logits / 1.5).max()), 0.0)
    probs /= probs.sum()
    counts = np.bincount(tokens[:, 1], minlength=len(probs)) / len(ids)
    assert (counts[~kept] == 0).all()
    assert kept.sum() >= 3
    # Binomial standard deviations are at most 0.008 here.
    np.testing.assert_allclose(counts, probs, atol=0.03)


@pytest.mark.parametrize(
    "top_k,top_p,temperature",
    [
        (0, 1.0, 1.0),
        (5, 1.0, 1.0),
        (100, 1.0, 1.0),
        (0, 0.5, 1.0),
        (4, 0.7, 0.5),
        (0, 0.95, 2.0),
    ],
)
def test_sampling_logits_match_numpy(top_k, top_p, temperature):
    rng = np.random.default_rng(top_k + int(10 * top_p))
    logits = rng.normal(size=(4, 40)).astype("float32") * 2.0
    out = _np(sampling_logits(logits, top_k, top_p, temperature))
    for row, out_row in zip(logits, out):
        kept = _allowed(row, top_k, top_p, temperature, slack=0.0)
        np.testing.assert_array_equal(np.isfinite(out_row), kept)
        np.testing.assert_allclose(
            out_row[kept], row[kept] / temperature, rtol=1e-6
        )


def test_decoding_functions_and_traced_generate_agree(model):
    """`generate` inside another `tf.function` with an unknown batch size (as
    a serving signature calls it) equals the eager decoding functions."""
    ids = _encoder_ids(7)
    encoded = model.encode(ids)

    @tf.function(input_signature=[tf.TensorSpec((None, None), tf.int32)])
    def beams(encoder_ids):
        return model.generate(encoder_ids, 8, num_beams=3, length_penalty=0.5)

    @tf.function(input_signature=[tf.TensorSpec((None, None), tf.int32)])
    def samples(encoder_ids):
        return model.generate(encoder_ids, 8, do_sample=True, top_k=6, seed=4)

    np.testing.assert_array_equal(
        _np(beams(ids)),
        _np(
            beam_search_decode(
                model, encoded, ids != 0, 8, num_beams=3, length_penalty=0.5
            )
        ),
    )
    np.testing.assert_array_equal(
        _np(samples(ids)),
        _np(sample_decode(model, encoded, ids != 0, 8, seed=4, top_k=6)),
    )


def test_xla_compiled_generation(model):
    """Compiled by XLA, as for TPUs: beam search gives the eager tokens;
    sampling draws other noise there, but one allowed token is greedy."""
    ids = _encoder_ids(9)

    @tf.function(jit_compile=True)
    def beams(encoder_ids):
        return model.generate(encoder_ids, 7, num_beams=2)

    @tf.function(jit_compile=True)
    def one_token(encoder_ids):
        return model.generate(encoder_ids, 7, do_sample=True, top_k=1, seed=1)

    np.testing.assert_array_equal(
        _np(beams(ids)), _np(model.generate(ids, 7, num_beams=2))
    )
    np.testing.assert_array_equal(
        _np(one_token(ids)), _np(model.generate(ids, 7))
    )


def test_moe_decoder_beam_search_and_sampling():
    keras.utils.set_random_seed(0)
    model = T5.from_architecture(
        "t5_v1_1_tiny",
        decoder_moe_blocks={1: {"num_experts": 4, "num_selected_experts": 2}},
    )
    ids = _encoder_ids(8, vocab_size=128)
    for options in (dict(num_beams=3), dict(do_sample=True, seed=0)):
        tokens = _np(model.generate(ids, 6, **options))
        assert tokens.shape == (3, 6) and (tokens[:, 0] == 0).all()
        # The traced loop's auxiliary losses are not left behind.
        assert all(not hasattr(loss, "graph") for loss in model.losses)


def _vlm():
    keras.utils.set_random_seed(1)
    model = VisionLanguageModel(
        dict(
            image_size=16,
            patch_size=8,
            num_channels=3,
            model_dim=24,
            num_heads=4,
            hidden_dim=48,
            num_layers=1,
        ),
        t5_config("t5_v1_1_tiny"),
        max_prompt_length=8,
    )
    rng = np.random.default_rng(1)
    for weight in model.weights:
        noise = rng.normal(size=weight.shape).astype("float32") * 0.3
        weight.assign(weight.numpy() + noise)
    return model


def test_vision_language_model_decodes_its_encoder_outputs():
    model = _vlm()
    images = np.random.default_rng(2).uniform(size=(3, 16, 16, 3))
    images = images.astype("float32")
    ids = np.array([[5, 6, 1, 0], [7, 8, 9, 1], [10, 1, 0, 0]], "int32")
    encoded, mask = model.encode(images, ids)
    lm = model.language_model
    beams = _np(
        model.generate(images, ids, 7, num_beams=3, early_stopping=True)
    )
    np.testing.assert_array_equal(
        beams,
        _np(
            beam_search_decode(
                lm, encoded, mask, 7, num_beams=3, early_stopping=True
            )
        ),
    )
    samples = _np(
        model.generate(images, ids, 7, do_sample=True, top_p=0.8, seed=5)
    )
    np.testing.assert_array_equal(
        samples, _np(sample_decode(lm, encoded, mask, 7, seed=5, top_p=0.8))
    )
    assert not np.array_equal(beams, samples)
    greedy = _np(model.generate(images, ids, 7))
    assert not np.array_equal(beams, greedy)
    with pytest.raises(ValueError, match="num_beams must be >= 1"):
        model.generate(images, ids, 7, num_beams=0)


@pytest.mark.parametrize(
    "options,match",
    [
        (dict(num_beams=0), "num_beams must be >= 1; received 0"),
        (dict(num_beams=2.0), "num_beams must be an int"),
        (
            dict(num_beams=2, length_penalty="long"),
            "length_penalty must be a number",
        ),
        (
            dict(num_beams=2, length_penalty=math.inf),
            "length_penalty must be finite; received inf",
        ),
        (
            dict(num_beams=2, early_stopping="always"),
            "early_stopping must be one of",
        ),
        (dict(num_beams=2, early_stopping=1), "early_stopping must be one of"),
        (dict(do_sample=1), "do_sample must be a bool"),
        (dict(do_sample=True, top_k=-1), "top_k must be >= 0"),
        (dict(do_sample=True, top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(do_sample=True, top_p=1.5), r"top_p must be in \(0, 1\]"),
        (
            dict(do_sample=True, temperature=0.0),
            "temperature must be finite and > 0; received 0.0",
        ),
        (dict(do_sample=True, seed=-1), "seed must be >= 0"),
        (dict(do_sample=True, seed=1.5), "seed must be an int"),
        (dict(do_sample=True, seed=2**63), "seed must be < 2\\*\\*63"),
        (dict(num_beams=2, do_sample=True), "cannot be combined"),
        (dict(top_k=5), r"top_k=5 applies only when sampling"),
        (dict(temperature=0.7), "temperature=0.7 applies only when sampling"),
        (dict(seed=3), "seed=3 applies only when sampling"),
        (
            dict(length_penalty=2.0),
            r"length_penalty=2.0 applies only to beam search",
        ),
        (
            dict(early_stopping=True),
            "early_stopping=True applies only to beam search",
        ),
    ],
)
def test_bad_options_raise(model, options, match):
    with pytest.raises(ValueError, match=match):
        decoding_options(**options)
    with pytest.raises(ValueError, match=match):
        model.generate(_encoder_ids(0), 4, **options)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
