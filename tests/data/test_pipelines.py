"""Pipelines: classification, number_words seq2seq, T5 span corruption."""

import sys

import numpy as np
import pytest
import sentencepiece
import tensorflow as tf
import tensorflow_datasets as tfds
from num2words import num2words
from sklearn.datasets import load_digits

import keras_moe.data as kd
from keras_moe.data import span_corruption
from keras_moe.models.t5 import T5
from keras_moe.models.t5 import t5_config


@pytest.fixture(scope="module")
def processor(data_dir):
    sp = sentencepiece.SentencePieceProcessor()
    sp.Load(kd.sentencepiece_model_path(data_dir))
    return sp


def _batches(ds):
    """Concatenates every batch of `ds` into NumPy arrays (same structure)."""
    parts = list(tfds.as_numpy(ds))
    return tf.nest.map_structure(lambda *x: np.concatenate(x), *parts)


def _until_eos(ids):
    ids = list(ids)
    return ids[: ids.index(kd.EOS_ID)]


# ---------------------------------------------------------------- images


def test_classification_dataset(data_dir):
    images, labels = _batches(
        kd.classification_dataset("digits", "test", 50, data_dir=data_dir)
    )
    rows = np.array(
        [int(x["index"]) for x in kd.load("digits", "test", data_dir)]
    )
    bunch = load_digits()
    assert images.dtype == np.float32 and labels.dtype == np.int32
    assert images.shape == (360, 8, 8, 1)
    expected = np.round(bunch.images[rows] * 255 / 16) / 255
    np.testing.assert_allclose(images[..., 0], expected, atol=1e-7)
    np.testing.assert_array_equal(labels, bunch.target[rows])
    assert images.min() == 0.0 and images.max() == 1.0

    sizes = [
        int(x.shape[0])
        for x, _ in kd.classification_dataset(
            "digits", "test", 50, drop_remainder=True, data_dir=data_dir
        )
    ]
    assert sizes == [50] * 7

    def shuffled_labels(seed):
        ds = kd.classification_dataset(
            "composed_digits",
            "test",
            500,
            shuffle=True,
            seed=seed,
            data_dir=data_dir,
        )
        return _batches(ds)[1]

    first, again = shuffled_labels(1), shuffled_labels(1)
    np.testing.assert_array_equal(first, again)
    plain = _batches(
        kd.classification_dataset(
            "composed_digits", "test", 500, data_dir=data_dir
        )
    )
    assert plain[0].shape == (2000, 8, 16, 1)
    assert not np.array_equal(first, plain[1])
    np.testing.assert_array_equal(np.sort(first), np.sort(plain[1]))


def test_classification_bad_input(data_dir):
    with pytest.raises(ValueError, match="'image' and 'label'"):
        kd.classification_dataset("number_words", "test", 8, data_dir=data_dir)
    for bad in (0, -3, 2.5, True, None):
        with pytest.raises(ValueError, match="batch_size must be a positive"):
            kd.classification_dataset("digits", "test", bad, data_dir=data_dir)
    with pytest.raises(ValueError, match="splits"):
        kd.classification_dataset("digits", "dev", 8, data_dir=data_dir)


# --------------------------------------------------------------- seq2seq


def test_seq2seq_lengths_measured_on_the_data(data_dir, processor):
    ex = tfds.as_numpy(
        kd.load("number_words", "validation", data_dir).batch(4000)
    )
    ex = next(iter(ex))
    for languages in (["fr"], ["de", "es"], None):
        keep = np.isin(
            ex["language"], [s.encode() for s in (languages or kd.LANGUAGES)]
        )
        longest = tuple(
            1 + max(len(processor.EncodeAsIds(t.decode())) for t in ex[k][keep])
            for k in ("inputs", "targets")
        )
        assert (
            kd.seq2seq_lengths(
                "number_words", "validation", languages, data_dir
            )
            == longest
        )


def test_seq2seq_dataset(data_dir, processor):
    languages = ["fr", "de"]
    length = kd.seq2seq_lengths("number_words", "test", languages, data_dir)
    input_length, target_length = length[0] + 3, length[1]
    inputs, targets = _batches(
        kd.seq2seq_dataset(
            "number_words",
            "test",
            64,
            input_length,
            target_length,
            languages=languages,
            data_dir=data_dir,
        )
    )
    raw = [
        x
        for x in tfds.as_numpy(kd.load("number_words", "test", data_dir))
        if x["language"].decode() in languages
    ]
    assert len(raw) == len(targets) == 2000
    assert inputs["encoder_token_ids"].shape == (2000, input_length)
    assert (
        targets.shape
        == inputs["decoder_token_ids"].shape
        == (2000, target_length)
    )
    for i in range(0, 2000, 37):
        x = raw[i]
        encoder = inputs["encoder_token_ids"][i]
        assert processor.DecodeIds(_until_eos(encoder)) == x["inputs"].decode()
        assert processor.DecodeIds(_until_eos(targets[i])) == num2words(
            int(x["number"]), lang=x["language"].decode()
        )
    # Padding after EOS, masks on real tokens, decoder ids shifted targets.
    for ids in (inputs["encoder_token_ids"], targets):
        real = np.cumsum(ids == kd.EOS_ID, 1) - (ids == kd.EOS_ID) == 0
        np.testing.assert_array_equal(ids[~real], 0)
        assert (ids[real] > 0).all()
        assert ((ids == kd.EOS_ID).sum(1) == 1).all()
    np.testing.assert_array_equal(
        inputs["encoder_padding_mask"], inputs["encoder_token_ids"] != 0
    )
    np.testing.assert_array_equal(inputs["decoder_padding_mask"], targets != 0)
    np.testing.assert_array_equal(inputs["decoder_token_ids"][:, 0], 0)
    np.testing.assert_array_equal(
        inputs["decoder_token_ids"][:, 1:], targets[:, :-1]
    )
    # The exact lengths are enough: the longest sequences fill them.
    assert (targets[:, -1] == kd.EOS_ID).any()


def test_seq2seq_refuses_to_truncate(data_dir):
    need = kd.seq2seq_lengths("number_words", "validation", ["en"], data_dir)
    kd.seq2seq_dataset(
        "number_words",
        "validation",
        8,
        *need,
        languages=["en"],
        data_dir=data_dir,
    )
    message = f"needs input_length >= {need[0]} and target_length >= {need[1]}"
    with pytest.raises(ValueError, match=message):
        kd.seq2seq_dataset(
            "number_words",
            "validation",
            8,
            need[0] - 1,
            need[1],
            languages=["en"],
            data_dir=data_dir,
        )
    with pytest.raises(ValueError, match=message):
        kd.seq2seq_dataset(
            "number_words",
            "validation",
            8,
            need[0],
            need[1] - 1,
            languages="en",
            data_dir=data_dir,
        )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"name": "digits"}, "seq2seq_dataset supports"),
        ({"split": "dev"}, "number_words has splits"),
        ({"input_length": 0}, "input_length must be a positive int"),
        ({"target_length": 12.0}, "target_length must be a positive int"),
        ({"batch_size": -1}, "batch_size must be a positive int"),
        ({"languages": ["it"]}, "languages must be a non-empty subset"),
        ({"languages": []}, "languages must be a non-empty subset"),
        ({"languages": [["fr"]]}, "languages must be language codes"),
    ],
)
def test_seq2seq_bad_input(data_dir, kwargs, message):
    args = dict(
        name="number_words",
        split="test",
        batch_size=4,
        input_length=32,
        target_length=32,
        data_dir=data_dir,
    )
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        kd.seq2seq_dataset(**args)


def test_t5_takes_the_batches(data_dir):
    config = t5_config("t5_tiny")
    config["vocab_size"] = kd.VOCAB_SIZE
    model = T5(**config)
    loss = tf.keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, ignore_class=kd.PAD_ID
    )
    need = kd.seq2seq_lengths("number_words", "test", None, data_dir)
    for inputs, targets in (
        next(
            iter(
                kd.seq2seq_dataset(
                    "number_words", "test", 4, *need, data_dir=data_dir
                )
            )
        ),
        next(
            iter(
                kd.span_corruption_dataset(
                    "validation", 4, 32, data_dir=data_dir
                )
            )
        ),
    ):
        logits = model(inputs)
        assert tuple(logits.shape) == (*targets.shape, kd.VOCAB_SIZE)
        value = float(loss(targets, logits))
        # Near log(V) for an untrained model.
        assert abs(value - np.log(kd.VOCAB_SIZE)) < 1.0


# ------------------------------------------------------- span corruption


def np_corrupt(tokens, noise, vocab_size):
    """NumPy statement of T5 span corruption given the noise mask."""

    def replace_runs(keep_out):
        out, sentinel, previous = [], vocab_size - 1, False
        for token, hidden in zip(tokens, keep_out):
            if hidden and not previous:
                out.append(sentinel)
                sentinel -= 1
            elif not hidden:
                out.append(token)
            previous = hidden
        return out + [kd.EOS_ID]

    return replace_runs(noise), replace_runs(~noise)


def _runs(mask):
    """Number of runs of True in a boolean vector."""
    mask = np.asarray(mask, bool)
    return int(np.sum(mask & ~np.concatenate([[False], mask[:-1]])))


def test_corrupt_spans_matches_numpy():
    rng = np.random.default_rng(0)
    cases = [(np.arange(3, 11), np.array([0, 0, 1, 1, 0, 0, 1, 0], bool))]
    for n in (2, 5, 17, 64):
        for _ in range(5):
            noise = rng.random(n) < 0.3
            cases.append((rng.integers(3, 2000, n), noise))
    for tokens, noise in cases:
        inputs, targets = kd.corrupt_spans(tokens, noise, vocab_size=2100)
        ref_inputs, ref_targets = np_corrupt(tokens, noise, 2100)
        assert inputs.numpy().tolist() == ref_inputs
        assert targets.numpy().tolist() == ref_targets
    # Hand-worked (module docstring): a b c d e f g h, noise c d and g.
    inputs, targets = kd.corrupt_spans(*cases[0], vocab_size=2100)
    assert inputs.numpy().tolist() == [3, 4, 2099, 7, 8, 2098, 10, 1]
    assert targets.numpy().tolist() == [2099, 5, 6, 2098, 9, 2097, 1]


@pytest.mark.parametrize("n", [2, 10, 20, 141, 500])
def test_noise_span_mask(n):
    num_noise = int(np.clip(np.round(n * 0.15), 1, n - 1))
    num_spans = int(min(max(np.round(num_noise / 3), 1), n - num_noise))
    masks = np.stack(
        [
            kd.noise_span_mask(n, 0.15, 3.0, tf.constant([7, i])).numpy()
            for i in range(40)
        ]
    )
    np.testing.assert_array_equal(masks.sum(1), num_noise)
    assert [_runs(m) for m in masks] == [num_spans] * 40
    # Always starts with a clean span and ends with a noise span (T5).
    assert not masks[:, 0].any() and masks[:, -1].all()
    if num_spans > 1:
        assert len({m.tobytes() for m in masks}) > 30  # Seeds matter.
        # Every position but the first can be noise.
        assert masks[:, 1:].any(0).mean() > 0.5
    again = kd.noise_span_mask(n, 0.15, 3.0, tf.constant([7, 0])).numpy()
    np.testing.assert_array_equal(again, masks[0])


def test_noise_spans_are_uniform_compositions():
    # 21 noise tokens in 7 spans (n = 141): every split into 7 positive
    # lengths is equally likely, so the first span has length k with
    # probability C(21 - k - 1, 5) / C(20, 6).
    from math import comb

    draws = 300
    first = []
    for i in range(draws):
        mask = kd.noise_span_mask(141, 0.15, 3.0, tf.constant([11, i]))
        mask = mask.numpy()
        start = int(np.argmax(mask))
        first.append(int(np.argmin(mask[start:])))
    expected = np.array(
        [comb(21 - k - 1, 5) / comb(20, 6) for k in range(1, 16)]
    )
    assert abs(expected.sum() - 1) < 1e-12
    observed = np.bincount(first, minlength=16)[1:16] / draws
    # Three standard errors of a proportion from 300 draws, at most 0.08.
    np.testing.assert_allclose(observed, expected, atol=0.08)
    np.testing.assert_allclose(np.mean(first), 3.0, atol=0.3)


def test_span_corruption_lengths():
    for input_length in (4, 8, 31, 64, 128, 512):
        best = None
        for n in range(2, 2 * input_length):
            noise = int(np.clip(np.round(n * 0.15), 1, n - 1))
            spans = int(min(max(np.round(noise / 3), 1), n - noise))
            if n - noise + spans + 1 <= input_length:
                best = (n, noise + spans + 1)
        assert kd.span_corruption_lengths(input_length) == best
    assert kd.span_corruption_lengths(128) == (141, 29)


def test_span_corruption_dataset(data_dir, processor):
    input_length = 64
    raw_length, target_length = kd.span_corruption_lengths(input_length)
    ds = kd.span_corruption_dataset(
        "validation", 16, input_length, seed=5, data_dir=data_dir
    )
    inputs, targets = _batches(ds)
    assert inputs["encoder_token_ids"].shape[1] == input_length
    assert targets.shape[1] == target_length
    # The token stream: validation paragraphs, in order, concatenated.
    stream = []
    for x in tfds.as_numpy(kd.load("pydoc_corpus", "validation", data_dir)):
        stream += processor.EncodeAsIds(x["text"].decode())
    runs = len(stream) // raw_length
    assert len(targets) == runs
    num_noise = round(raw_length * 0.15)
    for i in range(runs):
        encoder = _until_eos(inputs["encoder_token_ids"][i])
        target = _until_eos(targets[i])
        # Invert the corruption: each sentinel in the input is followed,
        # in the target, by the tokens it replaced.
        spans, sentinel = {}, None
        for token in target:
            if token >= kd.SENTENCEPIECE_VOCAB_SIZE:
                sentinel = token
                spans[sentinel] = []
            else:
                spans[sentinel].append(token)
        original = []
        for token in encoder:
            original += spans[token] if token in spans else [token]
        assert original == stream[i * raw_length : (i + 1) * raw_length]
        assert sum(len(s) for s in spans.values()) == num_noise
        assert (
            sorted(spans)
            == [kd.sentinel_id(k) for k in range(len(spans))][::-1]
        )
    # Reproducible; a repetition draws new masks.
    again = _batches(
        kd.span_corruption_dataset(
            "validation", 16, input_length, seed=5, data_dir=data_dir
        )
    )
    np.testing.assert_array_equal(again[1], targets)
    repeated = kd.span_corruption_dataset(
        "validation", runs, input_length, seed=5, repeat=True, data_dir=data_dir
    )
    it = iter(repeated)
    first, second = next(it)[1].numpy(), next(it)[1].numpy()
    np.testing.assert_array_equal(first, targets)
    assert not np.array_equal(first, second)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"split": "test"}, "pydoc_corpus has splits"),
        ({"input_length": 2}, "too short for span corruption"),
        ({"input_length": 0}, "input_length must be a positive int"),
        ({"noise_density": 1.0}, r"noise_density must be in \(0, 1\)"),
        ({"mean_noise_span_length": 0.5}, "mean_noise_span_length must be"),
        ({"input_length": 4000}, "more than the 100 sentinel ids"),
        ({"seed": None}, "seed must be an int"),
        ({"batch_size": 0}, "batch_size must be a positive int"),
    ],
)
def test_span_corruption_bad_input(data_dir, kwargs, message):
    args = dict(split="train", batch_size=4, input_length=64, data_dir=data_dir)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        kd.span_corruption_dataset(**args)
    assert span_corruption.SPAN_CORRUPTION_DATASET == "pydoc_corpus"


def test_seeded_shuffle_gives_one_stream_per_seed(data_dir):
    """Every iteration of a seeded, repeated pipeline yields the same
    batches (resumed training relies on it); each pass is a new order of
    all the examples; another seed gives another stream."""

    def stream(seed):
        return kd.classification_dataset(
            "digits",
            "test",
            36,
            shuffle=True,
            seed=seed,
            repeat=True,
            data_dir=data_dir,
        )

    def labels(ds, batches=20):
        return np.concatenate([y.numpy() for _, y in ds.take(batches)])

    ds = stream(3)
    first = labels(ds)
    np.testing.assert_array_equal(first, labels(ds))
    np.testing.assert_array_equal(first, labels(stream(3)))
    assert not np.array_equal(first, labels(stream(4)))
    passes = first.reshape(2, 360)
    assert not np.array_equal(passes[0], passes[1])
    np.testing.assert_array_equal(np.sort(passes[0]), np.sort(passes[1]))


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))
