"""TFDS builders for the embedded text data: number words and pydoc topics.

* `number_words`: every number 0..9999 (`NUMBER_RANGE`) written in words by
  num2words in each language of `LANGUAGES`, as a translation task:
  inputs "translate to French: 21", targets "vingt et un", plus the
  `language` code and the `number`. A seeded permutation (`NUMBERS_SEED`)
  of the numbers gives disjoint number sets: `test` 1,000 numbers, then
  `validation` 1,000, `train` the other 8,000; each number appears in every
  language, so the splits hold 4,000 / 4,000 / 32,000 examples.
* `pydoc_corpus`: the English help topics of CPython's
  `pydoc_data.topics`, one example per paragraph (text between blank lines,
  heading underlines and table borders removed, Unicode NFKC-normalized as
  the SentencePiece model normalizes, whitespace runs collapsed to one
  space) with its `topic`. Split by topic, so no topic's paragraphs are on
  both sides: `VALIDATION_TOPICS` (8) topics drawn with seed `TOPICS_SEED`
  are `validation`, the rest `train`. The text is that of the running
  Python; on Python 3.11.7: 79 topics, 2,607 paragraphs, 65,142 words;
  `train` 2,190 paragraphs, `validation` 417 (11,516 words, from the
  topics assignment, calls, conversions, return, try, types, typesmapping,
  unary).
"""

import re
import unicodedata

import numpy as np
import tensorflow_datasets as tfds

LANGUAGES = {"en": "English", "fr": "French", "de": "German", "es": "Spanish"}
NUMBER_RANGE = (0, 10000)  # [low, high)
NUMBERS_SEED = 20242
# Numbers per held-out split; train gets the rest of NUMBER_RANGE.
HELD_OUT_NUMBERS = {"test": 1000, "validation": 1000}
TOPICS_SEED = 20243
VALIDATION_TOPICS = 8

_BLANK_LINES = re.compile(r"\n\s*\n")
# Heading underlines and table borders: "*****", "+----+----+", "==  ==".
_RULE_CHARS = frozenset("-=*~^")
_RULE_LINE_CHARS = _RULE_CHARS | frozenset("+| \t")


def prompt(number, language):
    """Returns the `number_words` input text for `number` in `language`.

    Args:
        number: an int.
        language: a key of `LANGUAGES`.
    """
    if language not in LANGUAGES:
        raise ValueError(
            f"Unknown language {language!r}; expected one of "
            f"{sorted(LANGUAGES)}"
        )
    return f"translate to {LANGUAGES[language]}: {number}"


def number_split(split):
    """Returns the sorted numbers of `number_words`' split.

    Args:
        split: `"train"`, `"validation"` or `"test"`.

    Returns:
        <int64>[N], sorted; the three splits partition `NUMBER_RANGE`.
    """
    splits = ("train", *HELD_OUT_NUMBERS)
    if split not in splits:
        raise ValueError(
            f"number_words has splits {list(splits)}; received "
            f"split={split!r}"
        )
    numbers = np.random.default_rng(NUMBERS_SEED).permutation(
        np.arange(*NUMBER_RANGE)
    )
    start = 0
    for name, size in HELD_OUT_NUMBERS.items():
        if name == split:
            return np.sort(numbers[start : start + size])
        start += size
    return np.sort(numbers[start:])


def pydoc_paragraphs():
    """Returns the paragraphs of the running Python's pydoc topics.

    Returns:
        A list of `(topic, paragraph)` pairs, topics in sorted order and
        paragraphs in text order: heading underlines and table borders
        (lines of only `-=*~^+|` and spaces, with at least three of
        `-=*~^`) removed, NFKC-normalized, whitespace runs collapsed to one
        space, empty paragraphs dropped.
    """
    from pydoc_data.topics import topics

    pairs = []
    for topic in sorted(topics):
        for paragraph in _BLANK_LINES.split(topics[topic]):
            lines = [
                line for line in paragraph.split("\n") if not _is_rule(line)
            ]
            paragraph = unicodedata.normalize("NFKC", " ".join(lines))
            paragraph = " ".join(paragraph.split())
            if paragraph:
                pairs.append((topic, paragraph))
    return pairs


def _is_rule(line):
    """Whether `line` only draws a heading underline or a table border."""
    return set(line) <= _RULE_LINE_CHARS and (
        sum(char in _RULE_CHARS for char in line) >= 3
    )


def pydoc_validation_topics():
    """Returns the sorted topics of `pydoc_corpus`' validation split."""
    from pydoc_data.topics import topics

    names = np.array(sorted(topics))
    rng = np.random.default_rng(TOPICS_SEED)
    chosen = rng.choice(len(names), VALIDATION_TOPICS, replace=False)
    return sorted(names[chosen].tolist())


class NumberWords(tfds.core.GeneratorBasedBuilder):
    """Numbers and their words in four languages (see module doc)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {
        "1.0.0": "0..9999 in en, fr, de, es; 8,000 / 1,000 / 1,000 numbers."
    }

    def _info(self):
        return self.dataset_info_from_configs(
            description=(
                "Numbers 0..9999 and their words (num2words) in English, "
                "French, German and Spanish: inputs 'translate to French: "
                "21', targets 'vingt et un'. Disjoint numbers per split, "
                "seed 20242: train 8,000 / validation 1,000 / test 1,000 "
                "numbers, each in every language."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "inputs": tfds.features.Text(),
                    "targets": tfds.features.Text(),
                    "language": tfds.features.Text(),
                    "number": np.int64,
                }
            ),
            supervised_keys=("inputs", "targets"),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download: num2words holds the words.
        return {
            split: self._generate_examples(split)
            for split in ("train", *HELD_OUT_NUMBERS)
        }

    def _generate_examples(self, split):
        from num2words import num2words

        for number in number_split(split):
            number = int(number)
            for language in LANGUAGES:
                yield f"{number}-{language}", {
                    "inputs": prompt(number, language),
                    "targets": num2words(number, lang=language),
                    "language": language,
                    "number": number,
                }


class PydocCorpus(tfds.core.GeneratorBasedBuilder):
    """Paragraphs of CPython's pydoc topics (see module doc)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Paragraphs; 8 validation topics, seed 20243."}

    def _info(self):
        return self.dataset_info_from_configs(
            description=(
                "Paragraphs of the English help topics in CPython's "
                "pydoc_data.topics (about 65k words), split by topic: 8 "
                "topics drawn with seed 20243 are validation."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "text": tfds.features.Text(),
                    "topic": tfds.features.Text(),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download: the text ships with Python.
        return {
            "train": self._generate_examples(validation=False),
            "validation": self._generate_examples(validation=True),
        }

    def _generate_examples(self, validation):
        held_out = set(pydoc_validation_topics())
        for key, (topic, text) in enumerate(pydoc_paragraphs()):
            if (topic in held_out) == validation:
                yield key, {"text": text, "topic": topic}
