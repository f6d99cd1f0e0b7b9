"""keras_moe.data builders: sizes, contents, splits, determinism, offline."""

import functools
import os
import re
import sys
import threading

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from num2words import num2words
from sklearn.datasets import load_digits

import keras_moe.data as kd
from keras_moe.data import digits
from keras_moe.data import registry
from keras_moe.data import text
from keras_moe.data import vocabulary

# Sizes promised by the documentation.
DOCUMENTED_SIZES = {
    "digits": {"train": 1437, "test": 360},
    "composed_digits": {"train": 20000, "test": 2000},
    "number_words": {"train": 32000, "validation": 4000, "test": 4000},
}


@functools.lru_cache(maxsize=None)
def _read(name, split, data_dir):
    """Reads a whole split into a dict of NumPy arrays (shared: read-only)."""
    ds = kd.load(name, split, data_dir).batch(1 << 16)
    return next(iter(tfds.as_numpy(ds)))


def test_documented_sizes(data_dir):
    for name, sizes in DOCUMENTED_SIZES.items():
        info = kd.prepare(name, data_dir).info
        got = {split: info.splits[split].num_examples for split in info.splits}
        assert got == sizes, name
        assert set(sizes) == set(kd.SPLITS[name])


def test_pydoc_corpus_sizes(data_dir):
    from pydoc_data.topics import topics

    # Paragraphs counted here independently: blank-line separated blocks
    # with some text besides rule lines (underlines, table borders).
    expected = 0
    for body in topics.values():
        for block in re.split(r"\n\s*\n", body):
            lines = [
                line
                for line in block.split("\n")
                if not re.fullmatch(r"[-=*~^+| \t]*", line)
                or len(re.findall(r"[-=*~^]", line)) < 3
            ]
            expected += bool(" ".join(lines).strip())
    info = kd.prepare("pydoc_corpus", data_dir).info
    sizes = {s: info.splits[s].num_examples for s in info.splits}
    assert set(sizes) == {"train", "validation"}
    assert sum(sizes.values()) == expected
    train = _read("pydoc_corpus", "train", data_dir)
    validation = _read("pydoc_corpus", "validation", data_dir)
    # Split by topic: no topic on both sides, eight held out.
    assert not set(train["topic"]) & set(validation["topic"])
    assert len(set(validation["topic"])) == text.VALIDATION_TOPICS
    assert len(set(train["topic"])) == len(topics) - text.VALIDATION_TOPICS
    words = sum(len(t.split()) for t in [*train["text"], *validation["text"]])
    assert 55_000 < words < 75_000
    for paragraph in train["text"][:200]:
        assert paragraph == b" ".join(paragraph.split())


def test_digits_match_sklearn(data_dir):
    bunch = load_digits()
    seen = []
    for split in ("train", "test"):
        ex = _read("digits", split, data_dir)
        rows = ex["index"]
        expected = np.round(bunch.images[rows] * 255 / 16).astype(np.uint8)
        np.testing.assert_array_equal(ex["image"][..., 0], expected)
        assert ex["image"].shape[1:] == (8, 8, 1)
        np.testing.assert_array_equal(ex["label"], bunch.target[rows])
        seen.append(set(rows.tolist()))
        if split == "test":
            # Stratified: each class's share of the test split is 20%,
            # within one image.
            counts = np.bincount(ex["label"], minlength=10)
            np.testing.assert_allclose(
                counts, 0.2 * np.bincount(bunch.target), atol=1
            )
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(1797))
    # 16 maps to 255, 0 to 0.
    assert ex["image"].max() == 255 and ex["image"].min() == 0


def test_composed_digits_no_leakage(data_dir):
    digit_rows = {
        split: set(_read("digits", split, data_dir)["index"].tolist())
        for split in ("train", "test")
    }
    images, labels = load_digits().images, load_digits().target
    scaled = np.round(images * 255 / 16).astype(np.uint8)
    for split, per_class in (("train", 200), ("test", 20)):
        ex = _read("composed_digits", split, data_dir)
        left, right = ex["left_index"], ex["right_index"]
        # Test compositions only use digits test images, train only train.
        assert set(left.tolist()) | set(right.tolist()) <= digit_rows[split]
        np.testing.assert_array_equal(
            ex["label"], 10 * labels[left] + labels[right]
        )
        np.testing.assert_array_equal(
            ex["image"][..., 0],
            np.concatenate([scaled[left], scaled[right]], axis=2),
        )
        np.testing.assert_array_equal(
            np.bincount(ex["label"], minlength=100), np.full(100, per_class)
        )
    # The test split draws on most of the 360 digits test images.
    test = _read("composed_digits", "test", data_dir)
    used = set(test["left_index"].tolist()) | set(test["right_index"].tolist())
    assert len(used) > 300


def test_number_words(data_dir):
    numbers = {}
    for split in ("train", "validation", "test"):
        ex = _read("number_words", split, data_dir)
        numbers[split] = set(ex["number"].tolist())
        # Every number of the split in every language, once.
        pairs = set(zip(ex["number"].tolist(), ex["language"].tolist()))
        assert len(pairs) == len(ex["number"]) == 4 * len(numbers[split])
        for i in range(0, len(ex["number"]), 97):
            number, language = int(ex["number"][i]), ex["language"][i].decode()
            assert ex["targets"][i].decode() == num2words(number, lang=language)
            assert ex["inputs"][i].decode() == (
                f"translate to {text.LANGUAGES[language]}: {number}"
            )
    assert not numbers["train"] & numbers["validation"]
    assert not numbers["train"] & numbers["test"]
    assert not numbers["validation"] & numbers["test"]
    assert set().union(*numbers.values()) == set(range(10000))
    assert [len(numbers[s]) for s in ("train", "validation", "test")] == [
        8000,
        1000,
        1000,
    ]
    # Hand-picked: look the examples up in whichever split holds them.
    by_key = {}
    for split in ("train", "validation", "test"):
        ex = _read("number_words", split, data_dir)
        for n, lang, inputs, targets in zip(
            ex["number"], ex["language"], ex["inputs"], ex["targets"]
        ):
            by_key[int(n), lang.decode()] = (inputs.decode(), targets.decode())
    assert by_key[21, "fr"] == ("translate to French: 21", "vingt et un")
    assert by_key[4213, "fr"] == (
        "translate to French: 4213",
        "quatre mille deux cent treize",
    )
    assert by_key[21, "de"][1] == "einundzwanzig"
    assert by_key[21, "es"][1] == "veintiuno"
    assert by_key[21, "en"] == ("translate to English: 21", "twenty-one")
    assert by_key[0, "en"][1] == "zero"


def _record_bytes(builder_dir):
    """Maps each TFRecord file name of a prepared dataset to its bytes."""
    out = {}
    for name in sorted(os.listdir(builder_dir)):
        if ".tfrecord" in name:
            with open(os.path.join(builder_dir, name), "rb") as f:
                out[name] = f.read()
    return out


def test_prepare_is_deterministic_and_idempotent(data_dir, tmp_path):
    for name in ("digits", "pydoc_corpus"):
        first = kd.prepare(name, data_dir)
        second = kd.prepare(name, str(tmp_path))
        assert first.data_dir != second.data_dir
        files = _record_bytes(first.data_dir)
        assert files and files == _record_bytes(second.data_dir)
        # A second prepare reuses the data: nothing is rewritten.
        mtimes = {f: os.path.getmtime(f) for f in _files(second.data_dir)}
        kd.prepare(name, str(tmp_path))
        assert mtimes == {
            f: os.path.getmtime(f) for f in _files(second.data_dir)
        }
    # The bigger datasets are a pure function of their seeds: what was
    # written equals what the generators give again now.
    for split in ("train", "test"):
        ex = _read("composed_digits", split, data_dir)
        written = set(
            zip(ex["left_index"].tolist(), ex["right_index"].tolist())
        )
        again = set(map(tuple, digits.composed_pairs(split).tolist()))
        assert written == again
    for split in ("train", "validation", "test"):
        ex = _read("number_words", split, data_dir)
        np.testing.assert_array_equal(
            np.unique(ex["number"]), text.number_split(split)
        )
    # Nothing half-written is left behind.
    assert not [f for f in _files(str(tmp_path)) if "incomplete" in f]


def _files(root):
    return [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]


@pytest.mark.slow
def test_full_prepare_twice_gives_identical_files(data_dir, tmp_path):
    for name in ("composed_digits", "number_words", "pydoc_corpus"):
        first = kd.prepare(name, data_dir)
        second = kd.prepare(name, str(tmp_path))
        assert _record_bytes(first.data_dir) == _record_bytes(second.data_dir)
    # The SentencePiece model, trained again from the second directory.
    with open(kd.sentencepiece_model_path(data_dir), "rb") as f:
        first = f.read()
    with open(kd.sentencepiece_model_path(str(tmp_path)), "rb") as f:
        assert f.read() == first
    sentences = vocabulary.training_sentences(str(tmp_path))
    pydoc = kd.prepare("pydoc_corpus", data_dir).info.splits["train"]
    assert len(sentences) == pydoc.num_examples + 2 * 32000


def test_tfds_load_offline(data_dir, offline):
    import socket

    with pytest.raises(Exception, match="network access"):
        socket.create_connection(("example.com", 80))
    for name, sizes in DOCUMENTED_SIZES.items():
        for split, size in sizes.items():
            ds = tfds.load(name, split=split, data_dir=data_dir)
            assert ds.cardinality().numpy() == size
    # Read from the files alone, without keras_moe's builder code.
    builder = tfds.builder_from_directory(
        os.path.join(data_dir, "number_words", "1.0.0")
    )
    ds = builder.as_dataset(split="test")
    assert ds.cardinality().numpy() == 4000


class TinySquares(tfds.core.GeneratorBasedBuilder):
    """A dataset that is not keras_moe's, for `load` of other names."""

    VERSION = tfds.core.Version("0.1.0")

    def _info(self):
        # Plain DatasetInfo: no package metadata to look up for a class
        # defined in a test module.
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(
                        shape=(2, 2, 1), dtype=np.uint8
                    ),
                    "label": tfds.features.ClassLabel(num_classes=2),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i in range(6):
            image = np.full((2, 2, 1), 50 * i, np.uint8)
            yield i, {"image": image, "label": i % 2}


def test_load_other_prepared_dataset(tmp_path, offline):
    data_dir = str(tmp_path)
    assert "tiny_squares" not in kd.available(data_dir)
    with pytest.raises(ValueError, match="tiny_squares.*Available"):
        kd.load("tiny_squares", "train", data_dir)
    TinySquares(data_dir=data_dir).download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )
    assert "tiny_squares" in kd.available(data_dir)
    ex = next(
        iter(tfds.as_numpy(kd.load("tiny_squares", "train", data_dir).batch(6)))
    )
    assert sorted(ex["image"][:, 0, 0, 0].tolist()) == [
        0,
        50,
        100,
        150,
        200,
        250,
    ]
    images, labels = next(
        iter(
            kd.classification_dataset(
                "tiny_squares", "train", 6, data_dir=data_dir
            )
        )
    )
    np.testing.assert_allclose(
        sorted(images.numpy()[:, 1, 1, 0]), np.arange(6) * 50 / 255, rtol=1e-6
    )
    with pytest.raises(ValueError, match="splits"):
        kd.load("tiny_squares", "test", data_dir)


def test_unknown_names_and_splits(tmp_path, offline):
    data_dir = str(tmp_path / "empty")
    with pytest.raises(ValueError, match="'mnist'.*digits.*number_words"):
        kd.load("mnist", "train", data_dir)
    with pytest.raises(ValueError, match="Unknown dataset 'mnist'"):
        kd.prepare("mnist", data_dir)
    with pytest.raises(ValueError, match=r"Unknown dataset \['digits'\]"):
        kd.prepare(["digits"], data_dir)
    with pytest.raises(
        ValueError, match=r"digits has splits \['test', 'train'\]"
    ):
        kd.load("digits", "validation", data_dir)
    with pytest.raises(ValueError, match="splits"):
        kd.load("pydoc_corpus", "test[:10%]", data_dir)
    with pytest.raises(ValueError, match="splits"):
        kd.load("number_words", "", data_dir)
    with pytest.raises(ValueError, match="must be a str"):
        kd.load(None, "train", data_dir)
    with pytest.raises(ValueError, match="composed_digits has splits"):
        digits.composed_pairs("validation")
    with pytest.raises(ValueError, match="number_words has splits"):
        text.number_split("dev")
    with pytest.raises(ValueError, match="Unknown language 'it'"):
        text.prompt(3, "it")
    # Bad names and splits are refused before anything is built.
    assert not os.path.exists(data_dir)


def test_concurrent_prepares_build_once(tmp_path):
    built, errors = [], []

    def run():
        try:
            built.append(kd.prepare("digits", str(tmp_path)).data_dir)
        except Exception as e:  # Reported below, with the others.
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(built) == 3 and len(set(built)) == 1
    assert sorted(os.listdir(tmp_path / "digits")) == ["1.0.0"]


def test_split_syntax(data_dir):
    ds = kd.load("digits", "train[:10]+test[:5]", data_dir)
    assert ds.cardinality().numpy() == 15


def test_default_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv(registry.DATA_DIR_ENV, str(tmp_path))
    assert kd.default_data_dir() == str(tmp_path)
    monkeypatch.delenv(registry.DATA_DIR_ENV)
    assert kd.default_data_dir() == os.path.join(
        os.path.expanduser("~"), ".cache", "keras_moe", "tensorflow_datasets"
    )


def test_load_reads_in_a_fixed_order(data_dir):
    first = [int(x["index"]) for x in kd.load("digits", "test", data_dir)]
    second = [int(x["index"]) for x in kd.load("digits", "test", data_dir)]
    assert first == second and len(first) == 360
    assert isinstance(kd.load("digits", "test", data_dir), tf.data.Dataset)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))
