"""The glyph stream: bank rendering, determinism, balance, augmentation."""

import sys

import numpy as np
import pytest

from keras_moe.data import glyphs


@pytest.fixture(scope="module")
def bank():
    return glyphs.glyph_bank()


def test_bank_has_every_font_and_character(bank):
    masks, fonts = bank
    assert masks.shape == (
        len(fonts),
        len(glyphs.ALPHANUMERIC),
        3,
        glyphs.BANK_SIZE,
        glyphs.BANK_SIZE,
    )
    assert len(fonts) >= 15 and set(fonts) <= set(glyphs.FONT_FILES)
    assert masks.dtype == np.float32
    assert 0.0 <= masks.min() and masks.max() <= 1.0
    assert not masks.flags.writeable
    # Every glyph has ink; bold has more of it than regular, thin less.
    ink = masks.sum(axis=(-2, -1))  # (F, K, 3)
    assert np.all(ink[..., 1] > 1.0)
    assert np.all(ink[..., 0] < ink[..., 1]) and np.all(
        ink[..., 1] < ink[..., 2]
    )
    # Different characters of one font differ, except where the font
    # draws them alike: l and I are one vertical bar in some sans fonts.
    k = len(glyphs.ALPHANUMERIC)
    regular = masks[:, :, 1].reshape(len(fonts), k, -1)
    alike = {glyphs.ALPHANUMERIC.index(c) for c in "lI"}
    for font in regular:
        distances = np.abs(font[:, None] - font[None]).sum(-1)
        np.fill_diagonal(distances, np.inf)
        for a, b in zip(*np.nonzero(distances < 1.0)):
            assert {a, b} == alike


def _lowest_inked_row(mask):
    return np.flatnonzero(mask.max(axis=1) > 0.5).max()


def test_bank_keeps_the_baseline(bank):
    masks, fonts = bank
    index = {c: glyphs.ALPHANUMERIC.index(c) for c in "xXp"}
    for f in range(len(fonts)):
        x, big_x, p = (masks[f, index[c], 1] for c in "xXp")
        # Lower and upper case sit on one baseline; descenders go below.
        assert abs(_lowest_inked_row(x) - _lowest_inked_row(big_x)) <= 1
        assert _lowest_inked_row(p) >= _lowest_inked_row(x) + 3
        # Case shows in the height: x is shorter than X.
        top = np.flatnonzero(x.max(axis=1) > 0.5).min()
        big_top = np.flatnonzero(big_x.max(axis=1) > 0.5).min()
        assert top >= big_top + 3, fonts[f]


def test_batches_are_deterministic_and_typed():
    a = glyphs.GlyphStream(seed=3, stream=1)
    b = glyphs.GlyphStream(seed=3, stream=1)
    images, labels = a.batch(7, 64)
    again, labels_again = b.batch(7, 64)
    np.testing.assert_array_equal(images, again)
    np.testing.assert_array_equal(labels, labels_again)
    assert images.shape == (64, 16, 16, 1) and images.dtype == np.float32
    assert labels.shape == (64,) and labels.dtype == np.int32
    assert 0.0 <= images.min() and images.max() <= 1.0
    assert 0 <= labels.min() and labels.max() < len(glyphs.ALPHANUMERIC)
    # The iterator yields the same batches as `batch`.
    stream = a.batches(64, start=6)
    next(stream)
    np.testing.assert_array_equal(next(stream)[0], images)


def test_steps_streams_seeds_and_splits_differ():
    base = glyphs.GlyphStream(seed=0, stream=0)
    images = base.batch(0, 32)[0]
    others = [
        base.batch(1, 32)[0],
        glyphs.GlyphStream(seed=1, stream=0).batch(0, 32)[0],
        glyphs.GlyphStream(seed=0, stream=1).batch(0, 32)[0],
        glyphs.GlyphStream(seed=0, split="heldout").batch(0, 32)[0],
    ]
    for other in others:
        # Not a single image in common.
        diffs = np.abs(images[:, None] - other[None]).max(axis=(2, 3, 4))
        assert diffs.min() > 0.05


def test_no_image_repeats_within_a_stream():
    stream = glyphs.GlyphStream(seed=0, image_size=8)
    images = np.concatenate([stream.batch(s, 250)[0] for s in range(8)])
    flat = images.reshape(len(images), -1)
    assert len(np.unique(flat, axis=0)) == len(flat)


def test_labels_are_balanced_in_blocks_of_k():
    stream = glyphs.GlyphStream(seed=5)
    k = stream.num_classes
    labels = stream.labels(0, 7 * k)
    for block in labels.reshape(7, k):
        assert sorted(block) == list(range(k))
    # Batches read the same sequence, whatever their size.
    joined = np.concatenate([stream.batch(s, 31)[1] for s in range(14)])
    np.testing.assert_array_equal(joined, labels)
    # Blocks are shuffled differently.
    assert not np.array_equal(labels[:k], labels[k : 2 * k])
    held, held_labels = glyphs.GlyphStream(split="heldout").examples(3 * k)
    assert held.shape == (3 * k, 16, 16, 1)
    assert np.all(np.bincount(held_labels, minlength=k) == 3)


def _identity(monkeypatch):
    """No augmentation at all: the image is the bank mask."""
    for name, value in {
        "ROTATION": 0.0,
        "SCALE": (1.0, 1.0),
        "SHEAR": 0.0,
        "SHIFT": 0.0,
        "NOISE": (0.0, 0.0),
        "INK": (1.0, 1.0),
        "BACKGROUND": (0.0, 0.0),
    }.items():
        monkeypatch.setattr(glyphs, name, value)


def test_unaugmented_images_are_bank_masks(monkeypatch, bank):
    _identity(monkeypatch)
    masks = bank[0]
    stream = glyphs.GlyphStream(image_size=glyphs.BANK_SIZE, seed=2)
    images, labels = stream.batch(0, 40)
    for image, label in zip(images[..., 0], labels):
        # The same pixels as one font and weight of that character's masks.
        errors = np.abs(masks[:, label] - image).max(axis=(-2, -1))
        assert errors.min() < 1e-6


def test_half_size_images_sample_between_bank_pixels(monkeypatch, bank):
    _identity(monkeypatch)
    masks = bank[0]
    stream = glyphs.GlyphStream(image_size=glyphs.BANK_SIZE // 2, seed=2)
    images, labels = stream.batch(0, 10)
    # Output pixel (i, j) of a half-size image maps to bank point
    # (2i + 0.5, 2j + 0.5): the mean of a 2x2 block of bank pixels.
    for image, label in zip(images[..., 0], labels):
        candidates = masks[:, label]  # (F, 3, S, S)
        s = glyphs.BANK_SIZE
        pooled = candidates.reshape(*candidates.shape[:2], s // 2, 2, s // 2, 2)
        pooled = pooled.mean(axis=(3, 5))
        errors = np.abs(pooled - image).max(axis=(-2, -1))
        assert errors.min() < 1e-5


def test_bilinear_against_a_hand_example():
    masks = np.array([[[0.0, 1.0], [2.0, 3.0]]])
    y = np.array([[0.0, 0.5, 0.5, 1.0, -1.0, 0.25]])
    x = np.array([[1.0, 0.5, 0.0, 0.5, 0.0, 1.0]])
    # (0, 1) -> 1; centre -> 1.5; (0.5, 0) -> 1; (1, 0.5) -> 2.5; outside
    # -> 0; (0.25, 1) -> 0.75 * 1 + 0.25 * 3 (column 2 is off the canvas).
    np.testing.assert_allclose(
        glyphs._bilinear(masks, y, x), [[1.0, 1.5, 1.0, 2.5, 0.0, 1.5]]
    )


def test_fonts_and_classes_can_be_chosen():
    stream = glyphs.GlyphStream(
        classes=glyphs.SYMBOLS, fonts=("DejaVuSans.ttf", "cmr10.ttf")
    )
    assert stream.fonts == ("DejaVuSans.ttf", "cmr10.ttf")
    images, labels = stream.batch(0, 20)
    assert images.shape == (20, 16, 16, 1)
    assert sorted(labels[:10]) == list(range(10))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"classes": "a"}, "classes must be a string of at least 2"),
        ({"classes": "aab"}, "classes must be distinct"),
        ({"classes": ["a", "b"]}, "classes must be a string"),
        ({"image_size": 4}, "image_size must be >= 8"),
        ({"image_size": 16.0}, "image_size must be an int"),
        ({"split": "test"}, "split must be one of"),
        ({"seed": -1}, "seed must be >= 0"),
        ({"stream": 1.5}, "stream must be an int"),
        ({"fonts": ("Arial.ttf",)}, "fonts must be a non-empty subset"),
        ({"fonts": ()}, "fonts must be a non-empty subset"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        glyphs.GlyphStream(**kwargs)


def test_bad_batch_arguments_raise():
    stream = glyphs.GlyphStream()
    with pytest.raises(ValueError, match="step must be >= 0"):
        stream.batch(-1, 8)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        stream.batch(0, 0)
    with pytest.raises(ValueError, match="count must be"):
        stream.examples(0)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))
