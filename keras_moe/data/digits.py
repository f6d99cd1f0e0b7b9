"""TFDS builders for scikit-learn's handwritten digits and their pairs.

Source: `sklearn.datasets.load_digits()`, the 1,797 real 8x8 digits of the
UCI "Optical Recognition of Handwritten Digits" test set, grey levels 0..16.
Images are stored as uint8 `round(v * 255 / 16)`, so 16 becomes 255, in a
raw `tfds.features.Tensor` (no PNG to decode: these images are tiny).

Shape letters: H image height (8), W image width (8 for `digits`, 16 for
`composed_digits`), C channels (1).

* `digits`: image <uint8>[8, 8, 1], label 0..9 and `index`, the row of
  `load_digits()`. Stratified split with seed `SPLIT_SEED`: `train` 1,437,
  `test` 360 (20% of each class, 35 to 37 images).
* `composed_digits`: two digits side by side, image <uint8>[8, 16, 1],
  label `10 * left + right` (100 classes), `left_index` / `right_index` the
  `load_digits()` rows used. `train` 20,000 (200 per class) drawn only from
  `digits` train images, `test` 2,000 (20 per class) only from `digits` test
  images, with seed `COMPOSE_SEED`.
"""

import functools

import numpy as np
import tensorflow_datasets as tfds

SPLIT_SEED = 20240
COMPOSE_SEED = 20241
TEST_FRACTION = 0.2
NUM_CLASSES = 10
# Composed examples per class and split (100 classes).
COMPOSED_PER_CLASS = {"train": 200, "test": 20}


def _grey_levels_to_uint8(images):
    """Maps load_digits' grey levels 0..16 onto 0..255."""
    return np.round(images * (255.0 / 16.0)).astype(np.uint8)


@functools.lru_cache(maxsize=1)
def digits_arrays():
    """Returns scikit-learn's digits as images and labels.

    Returns:
        `(images, labels)`: <uint8>[1797, 8, 8, 1] scaled to 0..255 and
        <int64>[1797], in `load_digits()` order (read-only arrays).
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = _grey_levels_to_uint8(bunch.images)[..., None]
    labels = bunch.target.astype(np.int64)
    # Cached and shared: make accidental writes fail loudly.
    images.flags.writeable = labels.flags.writeable = False
    return images, labels


def digits_split_indices():
    """Returns the `load_digits()` rows of each split of `digits`.

    Returns:
        `{"train": <int64>[1437], "test": <int64>[360]}`, sorted row indices:
        a stratified split (exactly 20% of each class, rounded as
        scikit-learn's `train_test_split` does) with seed `SPLIT_SEED`.
    """
    from sklearn.model_selection import train_test_split

    _, labels = digits_arrays()
    train, test = train_test_split(
        np.arange(len(labels)),
        test_size=TEST_FRACTION,
        stratify=labels,
        random_state=SPLIT_SEED,
    )
    return {"train": np.sort(train), "test": np.sort(test)}


def composed_pairs(split):
    """Returns the `(left, right)` digit rows of `composed_digits`' split.

    Each of the 100 classes `10 * left + right` gets `COMPOSED_PER_CLASS`
    examples; each side is a uniformly drawn image of its digit from the
    same split of `digits`, so test pairs never use a train image.

    Args:
        split: `"train"` or `"test"`.

    Returns:
        <int64>[N, 2] rows of `load_digits()`, N = 100 * per-class count.
    """
    if split not in COMPOSED_PER_CLASS:
        raise ValueError(
            f"composed_digits has splits {sorted(COMPOSED_PER_CLASS)}; "
            f"received split={split!r}"
        )
    _, labels = digits_arrays()
    pool = digits_split_indices()[split]
    by_digit = [pool[labels[pool] == d] for d in range(NUM_CLASSES)]
    rng = np.random.default_rng([COMPOSE_SEED, int(split == "test")])
    per_class = COMPOSED_PER_CLASS[split]
    classes = np.repeat(np.arange(NUM_CLASSES**2), per_class)
    pairs = np.empty((len(classes), 2), np.int64)
    for side, digit in enumerate(
        (classes // NUM_CLASSES, classes % NUM_CLASSES)
    ):
        for d in range(NUM_CLASSES):
            where = digit == d
            pairs[where, side] = rng.choice(by_digit[d], size=where.sum())
    return pairs


class Digits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's 1,797 real 8x8 handwritten digits (see module doc)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Stratified 80/20 split, seed 20240."}

    def _info(self):
        return self.dataset_info_from_configs(
            description=(
                "The 1,797 8x8 handwritten digits of scikit-learn's "
                "load_digits, grey levels 0..16 scaled to 0..255. Splits: "
                "train 1,437 / test 360, stratified, seed 20240."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(
                        shape=(8, 8, 1), dtype=np.uint8
                    ),
                    "label": tfds.features.ClassLabel(num_classes=10),
                    "index": np.int64,
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://archive.ics.uci.edu/dataset/80",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download: the data ships with sklearn.
        return {
            split: self._generate_examples(rows)
            for split, rows in digits_split_indices().items()
        }

    def _generate_examples(self, rows):
        images, labels = digits_arrays()
        for row in rows:
            yield int(row), {
                "image": images[row],
                "label": int(labels[row]),
                "index": int(row),
            }


class ComposedDigits(tfds.core.GeneratorBasedBuilder):
    """Pairs of `digits` side by side, 100 classes (see module doc)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "200 / 20 examples per class, seed 20241."}

    def _info(self):
        return self.dataset_info_from_configs(
            description=(
                "Two scikit-learn digits side by side on an 8x16 canvas; "
                "label 10 * left + right. Train 20,000 from digits' train "
                "images, test 2,000 from digits' test images, seed 20241."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(
                        shape=(8, 16, 1), dtype=np.uint8
                    ),
                    "label": tfds.features.ClassLabel(
                        num_classes=NUM_CLASSES**2
                    ),
                    "left_index": np.int64,
                    "right_index": np.int64,
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {
            split: self._generate_examples(split)
            for split in COMPOSED_PER_CLASS
        }

    def _generate_examples(self, split):
        images, labels = digits_arrays()
        for key, (left, right) in enumerate(composed_pairs(split)):
            yield key, {
                # (8, 8, 1) twice -> (8, 16, 1)
                "image": np.concatenate([images[left], images[right]], 1),
                "label": int(labels[left] * NUM_CLASSES + labels[right]),
                "left_index": int(left),
                "right_index": int(right),
            }
