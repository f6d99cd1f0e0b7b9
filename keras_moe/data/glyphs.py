"""An unbounded, seeded stream of rendered glyph images.

Characters are rendered from the TrueType fonts that ship with matplotlib
(DejaVu, STIX and Computer Modern families, `FONT_FILES`) through
FreeType (`matplotlib.ft2font`), once per process, into a bank of masks:
one per font, character and stroke weight (thin, regular, bold), on a
`BANK_SIZE` x `BANK_SIZE` canvas with a common baseline, so that case
(c / C) and descenders (p / P) keep their place. Every example is then
composed on the fly from a bank mask: a random affine map (rotation,
scale, shear, translation) sampled bilinearly onto the output grid, a
random ink and background level and Gaussian pixel
noise. The augmentation parameters are continuous, so no two examples of
a stream are the same image: extra training buys new examples, never
another epoch. Some classes are ambiguous in some fonts, as in real text:
DejaVu Sans (regular and bold) and cmss10 draw l and I as the same bar,
and o / O, s / S, x / X and the like differ only in size, which the
random scale blurs; no model reaches zero loss.

Cost: about 2.3 ms for a batch of 64 16x16 images on one core (NumPy,
bilinear sampling of the bank), after about 3.5 s to render the bank once
per process.

Shape letters: B batch, H x W image (`image_size` square), K classes.

A stream is a pure function of its key: `GlyphStream(...).batch(step, B)`
depends only on the split, the seed, the stream number and `step`, so a
run can be replayed from any step, and the "train" and "heldout" splits
(different keys) never share an example. Labels are balanced: examples
`n * K` to `(n + 1) * K - 1` of a stream hold every class exactly once,
in an order drawn from the key and `n`.

Example:

    stream = GlyphStream(seed=0)
    images, labels = stream.batch(step=0, batch_size=64)
    images.shape, labels.shape  # (64, 16, 16, 1), (64,)
"""

import functools
import math
import os
import string

import numpy as np

from keras_moe.utils.checks import check_int

# The 62 characters of the default classification task, in label order.
ALPHANUMERIC = string.digits + string.ascii_lowercase + string.ascii_uppercase
# Symbols that `ALPHANUMERIC` lacks: classes a model trained on it never saw.
SYMBOLS = "#$%&*+<>?@"
# Text fonts of matplotlib's mpl-data/fonts/ttf; a font is used only if it
# maps every character of the stream's classes to a glyph.
FONT_FILES = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
    "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf",
    "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf",
    "STIXGeneralBol.ttf",
    "STIXGeneralItalic.ttf",
    "STIXGeneralBolIta.ttf",
    "cmr10.ttf",
    "cmb10.ttf",
    "cmss10.ttf",
    "cmti10.ttf",
    "cmtt10.ttf",
)
SPLITS = {"train": 0, "heldout": 1}
BANK_SIZE = 32
# Font size (pixels per em) and baseline row of the bank canvas.
_EM = 22
_BASELINE = 24
# Augmentation ranges (the output scale is image_size / BANK_SIZE times
# SCALE; angles in degrees; shifts in output pixels).
ROTATION = 10.0
SCALE = (0.8, 1.15)
SHEAR = 0.15
SHIFT = 0.1  # fraction of image_size
NOISE = (0.0, 0.08)
INK = (0.7, 1.0)
BACKGROUND = (0.0, 0.2)


def font_directory():
    """matplotlib's directory of bundled TrueType fonts."""
    import matplotlib

    return os.path.join(matplotlib.get_data_path(), "fonts", "ttf")


def _render(font, char):
    """One character as a float32 mask <[BANK_SIZE, BANK_SIZE]> in [0, 1],
    centred horizontally, its baseline on row `_BASELINE`."""
    font.clear()
    font.set_text(char, 0.0)
    font.draw_glyphs_to_bitmap(antialiased=True)
    glyph = np.asarray(font.get_image(), np.float32) / 255.0
    canvas = np.zeros((BANK_SIZE, BANK_SIZE), np.float32)
    height, width = glyph.shape
    # The bitmap's bottom row sits `descent` pixels below the baseline.
    bottom = _BASELINE + int(round(font.get_descent() / 64.0))
    top = bottom - height
    left = (BANK_SIZE - width) // 2
    # Clip what falls off the canvas (rare: wide capitals, deep descenders).
    rows = slice(max(top, 0), min(bottom, BANK_SIZE))
    cols = slice(max(left, 0), min(left + width, BANK_SIZE))
    canvas[rows, cols] = glyph[
        rows.start - top : rows.stop - top, cols.start - left : cols.stop - left
    ]
    return canvas


def _shifted(mask, dy, dx):
    """`mask` moved by (dy, dx) pixels, zero-filled."""
    out = np.zeros_like(mask)
    h, w = mask.shape[-2:]
    out[..., max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = mask[
        ..., max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


def _stroke_variants(mask):
    """(thin, regular, bold) versions of `mask` <[..., S, S]>: erosion and
    dilation over the 4-neighbourhood, averaged with the mask (half a pixel
    of stroke either way), then a light blur against aliasing."""
    neighbours = [_shifted(mask, dy, dx) for dy, dx in _CROSS]
    thin = 0.5 * (mask + np.minimum.reduce([mask, *neighbours]))
    bold = 0.5 * (mask + np.maximum.reduce([mask, *neighbours]))
    return np.stack([_blur(v) for v in (thin, mask, bold)], axis=-3)


_CROSS = ((-1, 0), (1, 0), (0, -1), (0, 1))


def _blur(mask):
    """[1, 2, 1] / 4 separable blur: the bank is sampled at about half its
    resolution."""
    out = 0.5 * mask + 0.25 * (_shifted(mask, 1, 0) + _shifted(mask, -1, 0))
    return 0.5 * out + 0.25 * (_shifted(out, 0, 1) + _shifted(out, 0, -1))


@functools.lru_cache(maxsize=4)
def glyph_bank(classes=ALPHANUMERIC):
    """Renders every usable font's glyphs of `classes` (cached).

    Args:
        classes: a string of distinct characters, one class each.

    Returns:
        `(bank, font_names)`: bank <float32>[F, K, 3, BANK_SIZE, BANK_SIZE]
        (stroke weight thin / regular / bold on axis 2, read-only) and the
        F font file names used, those of `FONT_FILES` that have a glyph for
        every character of `classes`.
    """
    _check_classes(classes)
    from matplotlib import ft2font

    directory = font_directory()
    masks, names = [], []
    for name in FONT_FILES:
        path = os.path.join(directory, name)
        if not os.path.exists(path):
            continue
        font = ft2font.FT2Font(path)
        if any(font.get_char_index(ord(c)) == 0 for c in classes):
            continue
        font.set_size(_EM, 72)
        rendered = np.stack([_render(font, c) for c in classes])
        if np.any(rendered.reshape(len(classes), -1).max(axis=1) < 0.5):
            continue  # an empty or unreadable glyph
        masks.append(rendered)
        names.append(name)
    if not masks:
        raise ValueError(
            f"no font in {directory} has a glyph for every one of "
            f"{classes!r}"
        )
    bank = _stroke_variants(np.stack(masks))  # (F, K, 3, S, S)
    bank.flags.writeable = False
    return bank, tuple(names)


def _check_classes(classes):
    if not isinstance(classes, str) or len(classes) < 2:
        raise ValueError(
            "classes must be a string of at least 2 characters; received "
            f"{classes!r}"
        )
    if len(set(classes)) != len(classes) or any(c.isspace() for c in classes):
        raise ValueError(
            "classes must be distinct, non-blank characters; received "
            f"{classes!r}"
        )


class GlyphStream:
    """Deterministic batches of augmented glyphs (see the module doc).

    Args:
        classes: the characters to classify, label i for `classes[i]`.
        image_size: H = W of the output images (>= 8).
        split: "train" or "heldout"; the two never share an example.
        seed: the run's seed (an int >= 0).
        stream: an independent stream number within the split and seed
            (int >= 0), e.g. one per training phase.
        fonts: None for every usable font of `FONT_FILES`, or a sequence
            of font file names from it.

    Raises:
        ValueError: any argument out of range, named with its value.
    """

    def __init__(
        self,
        classes=ALPHANUMERIC,
        image_size=16,
        split="train",
        seed=0,
        stream=0,
        fonts=None,
    ):
        _check_classes(classes)
        check_int("image_size", image_size, minimum=8)
        if split not in SPLITS:
            raise ValueError(
                f"split must be one of {sorted(SPLITS)}; received {split!r}"
            )
        check_int("seed", seed, minimum=0)
        check_int("stream", stream, minimum=0)
        bank, names = glyph_bank(classes)
        if fonts is not None:
            fonts = tuple(fonts)
            unknown = [f for f in fonts if f not in names]
            if not fonts or unknown:
                raise ValueError(
                    f"fonts must be a non-empty subset of {names}; received "
                    f"{fonts!r}"
                )
            bank = bank[[names.index(f) for f in fonts]]
            names = fonts
        self.classes = classes
        self.num_classes = len(classes)
        self.image_size = image_size
        self.split = split
        self.seed = seed
        self.stream = stream
        self.fonts = names
        self._bank = bank
        # Output pixel centres, relative to the image centre.
        centres = np.arange(image_size, dtype=np.float64) - (image_size - 1) / 2
        grid_y, grid_x = np.meshgrid(centres, centres, indexing="ij")
        self._grid = np.stack([grid_y.ravel(), grid_x.ravel()])  # (2, H*W)

    def _key(self, *more):
        return [SPLITS[self.split], self.seed, self.stream, *more]

    def labels(self, start, count):
        """Labels <int32>[count] of examples `start`..`start + count - 1`.

        Each block of K consecutive examples (`n * K` to `(n + 1) * K - 1`)
        holds every class once, in a permutation drawn from the key and n.
        """
        check_int("start", start, minimum=0)
        check_int("count", count)
        k = self.num_classes
        index = np.arange(start, start + count)
        blocks = index // k
        out = np.empty(count, np.int32)
        for block in np.unique(blocks):
            order = np.random.default_rng(self._key(0, int(block))).permutation(
                k
            )
            where = blocks == block
            out[where] = order[index[where] % k]
        return out

    def batch(self, step, batch_size):
        """Batch `step` of the stream: examples `step * batch_size` on.

        Args:
            step: the batch index (int >= 0).
            batch_size: B (int >= 1).

        Returns:
            `(images <float32>[B, H, W, 1] in [0, 1], labels <int32>[B])`.
        """
        check_int("step", step, minimum=0)
        check_int("batch_size", batch_size)
        labels = self.labels(step * batch_size, batch_size)
        rng = np.random.default_rng(self._key(1, step, batch_size))
        return self._render(labels, rng), labels

    def batches(self, batch_size, start=0):
        """Endless `batch(step, batch_size)` for step = start, start + 1,
        ..."""
        check_int("batch_size", batch_size)
        check_int("start", start, minimum=0)
        step = start
        while True:
            yield self.batch(step, batch_size)
            step += 1

    def examples(self, count, batch_size=500):
        """The first `count` examples of the stream, as one array pair
        (a fixed evaluation set; `count` a multiple of K is balanced)."""
        check_int("count", count)
        images, labels = [], []
        for step in range(math.ceil(count / batch_size)):
            x, y = self.batch(step, batch_size)
            images.append(x)
            labels.append(y)
        return np.concatenate(images)[:count], np.concatenate(labels)[:count]

    def _render(self, labels, rng):
        """Augmented images of `labels`, all parameters drawn from `rng`."""
        b, size, bank_size = len(labels), self.image_size, BANK_SIZE
        font = rng.integers(0, len(self.fonts), b)
        weight = rng.integers(0, 3, b)
        angle = np.deg2rad(rng.uniform(-ROTATION, ROTATION, b))
        scale = rng.uniform(*SCALE, b) * size / bank_size
        shear = rng.uniform(-SHEAR, SHEAR, b)
        shift = rng.uniform(-SHIFT, SHIFT, (b, 2)) * size
        ink = rng.uniform(*INK, b)
        background = rng.uniform(*BACKGROUND, b)
        noise = rng.uniform(*NOISE, b)
        # Output -> bank coordinates: x_bank = A^-1 (x_out - shift) + centre,
        # A = scale * rotation * shear (y rows, x columns).
        cos, sin = np.cos(angle), np.sin(angle)
        # (2, 2, B): shear(-shear) @ rotation(angle), the inverse of
        # rotation(-angle) @ shear(shear) (angles are symmetric).
        inverse = np.stack(
            [
                np.stack([cos - shear * sin, -sin - shear * cos]),
                np.stack([sin, cos]),
            ]
        )
        inverse = inverse / scale  # (2, 2, B)
        points = self._grid[None] - shift[:, :, None]  # (B, 2, H*W)
        # (2, 2, B) x (B, 2, H*W) -> (B, 2, H*W)
        source = np.einsum("ijb,bjn->bin", inverse, points)
        source += (bank_size - 1) / 2
        masks = self._bank[font, labels, weight]  # (B, S, S)
        values = _bilinear(masks, source[:, 0], source[:, 1])  # (B, H*W)
        values = values.reshape(b, size, size)
        low, high = background[:, None, None], ink[:, None, None]
        images = low + (high - low) * values
        images += noise[:, None, None] * rng.standard_normal(images.shape)
        images = np.clip(images, 0.0, 1.0).astype(np.float32)
        return images[..., None]


def _bilinear(masks, y, x):
    """Bilinear samples of `masks` <[B, S, S]> at rows `y`, columns `x`
    <[B, N]>; zero outside the canvas."""
    b, s = masks.shape[0], masks.shape[1]
    y0, x0 = np.floor(y), np.floor(x)
    fy, fx = y - y0, x - x0
    y0, x0 = y0.astype(np.int64), x0.astype(np.int64)
    flat = masks.reshape(b, s * s)
    rows = np.arange(b)[:, None]
    out = np.zeros(y.shape, np.float64)
    for dy, dx, w in (
        (0, 0, (1 - fy) * (1 - fx)),
        (0, 1, (1 - fy) * fx),
        (1, 0, fy * (1 - fx)),
        (1, 1, fy * fx),
    ):
        yy, xx = y0 + dy, x0 + dx
        inside = (yy >= 0) & (yy < s) & (xx >= 0) & (xx < s)
        index = np.clip(yy, 0, s - 1) * s + np.clip(xx, 0, s - 1)
        out += np.where(inside, flat[rows, index], 0.0) * w
    return out
