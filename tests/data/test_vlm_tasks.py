"""The vision-language task mixture: examples against NumPy, num2words and
the raw datasets, held-out splits, sampling rates, bad input."""

import sys

import numpy as np
import pytest
import sentencepiece
import tensorflow as tf
from num2words import num2words

from keras_moe import data
from keras_moe.data import vlm_tasks

P, U = 24, 8


@pytest.fixture(scope="module")
def processor(data_dir):
    """The vocabulary through the `sentencepiece` package (not tf-text)."""
    model = sentencepiece.SentencePieceProcessor()
    model.Load(data.sentencepiece_model_path(data_dir))
    return model


def _text(processor, ids, images=0):
    """The text of `ids`, after checking that `images` placeholders open
    them and no other placeholder is there."""
    ids = [int(i) for i in ids]
    ph = vlm_tasks.IMAGE_TOKEN_ID
    assert ids[:images] == [ph] * images
    ids = ids[images:]
    assert ph not in ids
    assert ids.count(data.EOS_ID) == 1
    end = ids.index(data.EOS_ID)
    assert not any(ids[end + 1 :])  # 0-padded after EOS
    return processor.decode(ids[:end])


def _raw(name, split, data_dir, count):
    ds = data.load(name, split, data_dir).take(count)
    return list(ds.as_numpy_iterator())


def test_words_and_answers_by_hand():
    assert vlm_tasks.caption_target(7, "de") == "sieben"
    assert vlm_tasks.caption_target(4, "fr") == "quatre"
    assert vlm_tasks.caption_target(1, "es") == "uno"
    assert vlm_tasks.caption_target(0, "en") == "zero"
    assert vlm_tasks.caption_prompt("de") == "caption in de:"
    assert vlm_tasks.answer("sum", 9, 4) == "13"
    assert vlm_tasks.answer("left", 9, 4) == "9"
    assert vlm_tasks.answer("right", 9, 4) == "4"


def test_caption_examples(data_dir, processor):
    languages = ("de", "fr", "es")
    raw = _raw("digits", "test", data_dir, 4)
    ds = vlm_tasks.caption_dataset("test", languages, P, U, data_dir)
    examples = list(ds.take(4 * len(languages)).as_numpy_iterator())
    for i, (inputs, targets) in enumerate(examples):
        source = raw[i // len(languages)]
        language = languages[i % len(languages)]
        # The 8x8 digit centred on the 8x16 canvas, black borders.
        canvas = np.zeros((8, 16, 1), np.float32)
        canvas[:, 4:12] = source["image"] / 255.0
        np.testing.assert_allclose(inputs["images"][0], canvas, atol=1e-6)
        assert inputs["images"].shape == (1, 8, 16, 1)
        assert inputs["image_mask"].tolist() == [True]
        prompt = _text(processor, inputs["prompt_token_ids"], images=1)
        assert prompt == f"caption in {language}:"
        words = num2words(int(source["label"]), lang=language)
        assert _text(processor, targets) == words
        np.testing.assert_array_equal(
            inputs["decoder_token_ids"], np.concatenate([[0], targets[:-1]])
        )


def test_vqa_examples(data_dir, processor):
    raw = _raw("composed_digits", "test", data_dir, 5)
    ds = vlm_tasks.vqa_dataset("test", P, U, data_dir=data_dir)
    questions = list(vlm_tasks.QUESTIONS)
    examples = list(ds.take(5 * len(questions)).as_numpy_iterator())
    for i, (inputs, targets) in enumerate(examples):
        source = raw[i // len(questions)]
        question = questions[i % len(questions)]
        left, right = divmod(int(source["label"]), 10)
        np.testing.assert_allclose(
            inputs["images"][0], source["image"] / 255.0, atol=1e-6
        )
        prompt = _text(processor, inputs["prompt_token_ids"], images=1)
        assert prompt == vlm_tasks.QUESTIONS[question]
        expected = {"left": left, "right": right, "sum": left + right}
        assert _text(processor, targets) == str(expected[question])


def test_span_corruption_examples_are_text_only(data_dir):
    ds = vlm_tasks.span_corruption_dataset("train", P, U, data_dir=data_dir)
    sentinels = set(range(data.sentinel_id(data.NUM_EXTRA_IDS - 1), 2100))
    for inputs, targets in ds.take(8).as_numpy_iterator():
        assert inputs["image_mask"].tolist() == [False]
        assert not inputs["images"].any()
        ids = inputs["prompt_token_ids"].tolist()
        assert len(ids) == P and data.EOS_ID in ids
        assert sentinels & set(ids)
        assert vlm_tasks.IMAGE_TOKEN_ID not in ids  # no placeholder clash
        assert targets.shape == (U,) and int(targets[0]) in sentinels


def test_held_out_images_come_from_the_test_split(data_dir):
    """Caption images are the digits test images; every half of a composed
    test image is a digits test image (and no train image)."""
    test = {x["image"].tobytes() for x in _raw("digits", "test", data_dir, 360)}
    train = {
        x["image"].tobytes() for x in _raw("digits", "train", data_dir, 1437)
    }
    captions = vlm_tasks.caption_dataset("test", ("en",), P, U, data_dir)
    for inputs, _ in captions.take(50).as_numpy_iterator():
        digit = np.round(inputs["images"][0, :, 4:12] * 255).astype(np.uint8)
        assert digit.tobytes() in test
    questions = vlm_tasks.vqa_dataset("test", P, U, ("sum",), data_dir)
    for inputs, _ in questions.take(50).as_numpy_iterator():
        image = np.round(inputs["images"][0] * 255).astype(np.uint8)
        for half in (image[:, :8], image[:, 8:]):
            half = np.ascontiguousarray(half).tobytes()
            assert half in test and half not in train


def test_mixture_follows_the_rates(data_dir, processor):
    rates = {
        "caption": 3.0,
        "vqa": 2.0,
        "fewshot": 2.0,
        "which": 1.5,
        "span_corruption": 1.5,
    }
    ds = vlm_tasks.mixture_dataset(
        64, rates, ("en", "de"), P, U, seed=3, data_dir=data_dir
    )
    counts = dict.fromkeys(vlm_tasks.TASKS, 0)
    questions = set(vlm_tasks.QUESTIONS.values())
    batches = list(ds.take(25).as_numpy_iterator())
    for inputs, targets, weights in batches:
        np.testing.assert_array_equal(weights, targets != 0)
        assert inputs["images"].shape == (64, 3, 8, 16, 1)
        for mask, ids, images in zip(
            inputs["image_mask"], inputs["prompt_token_ids"], inputs["images"]
        ):
            assert not images[mask.sum() :].any()  # unused slots are zeros
            if not mask.any():
                counts["span_corruption"] += 1
                continue
            if mask.all():
                ph = vlm_tasks.IMAGE_TOKEN_ID
                assert ids.tolist().count(ph) == 3
                # Few-shot prompts open with an image, "which" with "1:".
                counts["fewshot" if ids[0] == ph else "which"] += 1
                continue
            assert mask.tolist() == [True, False, False]
            prompt = _text(processor, ids, images=1)
            if prompt in questions:
                counts["vqa"] += 1
            else:
                assert prompt in ("caption in en:", "caption in de:"), prompt
                counts["caption"] += 1
    total = sum(counts.values())
    assert total == 25 * 64
    for task, rate in vlm_tasks.check_rates(rates).items():
        # Binomial standard deviation <= 0.0125 at 1,600 draws.
        assert abs(counts[task] / total - rate) < 0.05, counts
    # Same seed, same batches.
    again = vlm_tasks.mixture_dataset(
        64, rates, ("en", "de"), P, U, seed=3, data_dir=data_dir
    )
    first = next(again.as_numpy_iterator())
    np.testing.assert_array_equal(
        first[0]["prompt_token_ids"], batches[0][0]["prompt_token_ids"]
    )
    # A task at rate 0 is left out.
    only = vlm_tasks.mixture_dataset(
        32, {"caption": 1.0, "vqa": 0.0}, ("es",), P, U, data_dir=data_dir
    )
    inputs, _, _ = next(only.as_numpy_iterator())
    assert {
        _text(processor, ids, images=1) for ids in inputs["prompt_token_ids"]
    } == {"caption in es:"}


@pytest.mark.parametrize(
    "call,match",
    [
        (
            lambda d: vlm_tasks.caption_dataset("test", ("de", "it"), P, U, d),
            r"Unknown language tag\(s\) \['it'\]; supported: en, fr, de, es",
        ),
        (lambda d: vlm_tasks.caption_prompt("xx"), "supported: en, fr, de, es"),
        (
            lambda d: vlm_tasks.mixture_dataset(8, languages=(), data_dir=d),
            "supported: en, fr, de, es",
        ),
        (
            lambda d: vlm_tasks.caption_dataset("test", ("de",), 5, U, d),
            r"The prompt 'caption in de:' has 11 tokens with EOS and 1 image "
            r"placeholder\(s\), more than the prompt length 5",
        ),
        (
            lambda d: vlm_tasks.vqa_dataset("test", P, 3, data_dir=d),
            r"The target '1\d' has 4 tokens with EOS, more than the target",
        ),
        (
            lambda d: vlm_tasks.span_corruption_dataset("train", P, 4, 0, d),
            "targets of 6 tokens, more than the target length 4",
        ),
        (
            lambda d: vlm_tasks.mixture_dataset(
                8, {"captions": 1.0}, data_dir=d
            ),
            r"Unknown task\(s\) \['captions'\]",
        ),
        (
            lambda d: vlm_tasks.mixture_dataset(8, {"vqa": -1.0}, data_dir=d),
            "must be >= 0",
        ),
        (
            lambda d: vlm_tasks.mixture_dataset(8, {"vqa": 0.0}, data_dir=d),
            "At least one sampling rate must be > 0",
        ),
        (lambda d: vlm_tasks.mixture_dataset(0, data_dir=d), "batch_size"),
        (
            lambda d: vlm_tasks.which_dataset("test", P, U, 4, max_images=2),
            "The which task has 3 images per example; max_images=2 slots",
        ),
        (
            lambda d: vlm_tasks.caption_dataset("test", "en", P, U, d, (4,)),
            r"image_size must be \(height, width\); received \(4,\)",
        ),
        (
            lambda d: vlm_tasks.which_dataset("test", 21, U, 4, data_dir=d),
            "The prompt 'which image shows 0\\?' has 22 tokens with its 3 "
            "labelled images and EOS, more than the prompt length 21",
        ),
        (
            lambda d: vlm_tasks.fewshot_dataset("test", "de", 9, U, 50, 0, d),
            "The few-shot prompt of captions .* more than the prompt length 9",
        ),
        (
            lambda d: vlm_tasks.which_episodes([0, 1, 2, 3], 5),
            r"No image of digit\(s\) \[4, 5, 6, 7, 8, 9\]",
        ),
        (lambda d: vlm_tasks.answer("product", 1, 2), "Unknown question"),
        (
            lambda d: vlm_tasks.task_dataset("ocr", "test", P, U, data_dir=d),
            "Unknown task 'ocr'",
        ),
    ],
)
def test_bad_input(data_dir, call, match):
    with pytest.raises(ValueError, match=match):
        call(data_dir)


def test_which_examples(data_dir, processor):
    """Three images of distinct digits from the split; the target is the
    1-based slot of the image of the asked digit."""
    raw = _raw("digits", "test", data_dir, 360)
    pictures = {x["image"].tobytes(): int(x["label"]) for x in raw}
    ds = vlm_tasks.which_dataset("test", P, U, episodes=40, data_dir=data_dir)
    examples = list(ds.as_numpy_iterator())
    assert len(examples) == 40
    answers = []
    for inputs, targets in examples:
        assert inputs["images"].shape == (3, 8, 16, 1)
        assert inputs["image_mask"].tolist() == [True] * 3
        digits = []
        for image in inputs["images"]:
            digit = np.round(image[:, 4:12] * 255).astype(np.uint8)
            digits.append(pictures[digit.tobytes()])  # a test image
        assert len(set(digits)) == 3
        ids = inputs["prompt_token_ids"].tolist()
        ph = vlm_tasks.IMAGE_TOKEN_ID
        labelled = []
        for label in ("1:", "2:", "3:"):
            labelled += processor.encode(label) + [ph]
        assert ids[: len(labelled)] == labelled
        prompt = _text(processor, ids[len(labelled) :])
        asked = int(prompt.removeprefix("which image shows ").rstrip("?"))
        position = int(_text(processor, targets))
        assert digits[position - 1] == asked
        answers.append(position)
    # Every position is asked; the episodes follow the seed.
    assert set(answers) == {1, 2, 3}
    again = vlm_tasks.which_dataset(
        "test", P, U, episodes=40, data_dir=data_dir
    )
    first = next(again.as_numpy_iterator())[0]
    np.testing.assert_array_equal(first["images"], examples[0][0]["images"])
    other = vlm_tasks.which_dataset(
        "test", P, U, episodes=40, seed=1, data_dir=data_dir
    )
    assert any(
        not np.array_equal(a[0]["images"], b[0]["images"])
        for a, b in zip(other.as_numpy_iterator(), examples)
    )


def test_fewshot_examples(data_dir, processor):
    """Two test images with their captions, then the query image; one
    language per episode, named nowhere; the target is the query's
    caption in that language."""
    raw = _raw("digits", "test", data_dir, 360)
    pictures = {x["image"].tobytes(): int(x["label"]) for x in raw}
    languages = ("fr", "de")
    ds = vlm_tasks.fewshot_dataset(
        "test", languages, P, U, episodes=30, data_dir=data_dir
    )
    seen = set()
    ph = vlm_tasks.IMAGE_TOKEN_ID
    for inputs, targets in ds.as_numpy_iterator():
        assert inputs["images"].shape == (3, 8, 16, 1)
        assert inputs["image_mask"].tolist() == [True] * 3
        digits = [
            pictures[np.round(im[:, 4:12] * 255).astype(np.uint8).tobytes()]
            for im in inputs["images"]
        ]
        ids = inputs["prompt_token_ids"].tolist()
        end = ids.index(data.EOS_ID)
        assert ids[end - 1] == ph and ids[0] == ph and ids.count(ph) == 3
        second = ids.index(ph, 1)
        first_word = processor.decode(ids[1:second])
        second_word = processor.decode(ids[second + 1 : end - 1])
        matches = [
            tag
            for tag in languages
            if first_word == num2words(digits[0], lang=tag)
            and second_word == num2words(digits[1], lang=tag)
            and _text(processor, targets) == num2words(digits[2], lang=tag)
        ]
        assert matches, (first_word, second_word, digits)
        seen.update(matches)
    assert seen == set(languages)


def test_which_episodes_by_hand():
    labels = np.array([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 0])
    indices, queried = vlm_tasks.which_episodes(labels, 200, seed=5)
    assert indices.shape == (200, 3) and queried.shape == (200,)
    for row in labels[indices]:
        assert len(set(row.tolist())) == 3
    assert set(queried.tolist()) == {0, 1, 2}
    again = vlm_tasks.which_episodes(labels, 200, seed=5)
    np.testing.assert_array_equal(again[0], indices)
    np.testing.assert_array_equal(again[1], queried)


def test_lower_resolution_averages_blocks(data_dir):
    """(4, 8): each pixel is the mean of a 2 x 2 block of the canvas."""
    digit = np.arange(64, dtype=np.uint8).reshape(8, 8, 1)
    full = vlm_tasks.canvas(tf.constant(digit)).numpy()
    low = vlm_tasks.canvas(tf.constant(digit), (4, 8)).numpy()
    expected = full.reshape(4, 2, 8, 2, 1).mean(axis=(1, 3))
    assert low.shape == (4, 8, 1)
    np.testing.assert_allclose(low, expected, atol=1e-6)
    ds = vlm_tasks.caption_dataset(
        "test", "en", P, U, data_dir, image_size=(4, 8), max_images=3
    )
    inputs, _ = next(ds.as_numpy_iterator())
    assert inputs["images"].shape == (3, 4, 8, 1)
    assert inputs["image_mask"].tolist() == [True, False, False]
    source = _raw("digits", "test", data_dir, 1)[0]["image"]
    np.testing.assert_allclose(
        inputs["images"][0],
        vlm_tasks.canvas(tf.constant(source), (4, 8)).numpy(),
        atol=1e-6,
    )
    assert not inputs["images"][1:].any()


def test_canvas_keeps_the_aspect_ratio():
    digit = np.arange(64, dtype=np.uint8).reshape(8, 8, 1)
    out = vlm_tasks.canvas(tf.constant(digit)).numpy()
    assert out.shape == (8, 16, 1)
    np.testing.assert_allclose(out[:, 4:12], digit / 255.0, atol=1e-6)
    assert not out[:, :4].any() and not out[:, 12:].any()
    pair = np.arange(128, dtype=np.uint8).reshape(8, 16, 1)
    np.testing.assert_allclose(
        vlm_tasks.canvas(tf.constant(pair)).numpy(), pair / 255.0, atol=1e-6
    )


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))
