"""The docstring corpus: splits by module, prose only, the naming task."""

import sys

import pytest

from keras_moe.data import docstrings


def test_paragraphs_drop_doctests_and_short_lines():
    text = (
        "Adds two numbers and returns their sum.\n\n"
        "Args:\n  a: a number.\n\n"
        "Example:\n\n>>> add(1, 2)\n3\n\n"
        "The   result\nis exact for ints.  Floats round."
    )
    assert docstrings.paragraphs_of(text) == [
        "Adds two numbers and returns their sum.",
        "The result is exact for ints. Floats round.",
    ]


def test_name_words_split_snake_and_camel_case():
    assert docstrings.name_words("get_config") == "get config"
    assert docstrings.name_words("ExpertParallelTrainer") == (
        "expert parallel trainer"
    )
    assert docstrings.name_words("parse150") == "parse150"
    assert docstrings.name_words("HTTPServer") == "httpserver"


def test_splits_are_fixed_by_module_path():
    assert docstrings.split_of("stdlib", "json/decoder.py") == "downstream"
    counts = {split: 0 for split in docstrings.SPLIT_BUCKETS}
    for i in range(2000):
        counts[docstrings.split_of("stdlib", f"m{i}.py")] += 1
    # 1, 2 and 17 buckets of 20.
    assert 50 < counts["validation"] < 150
    assert 150 < counts["downstream"] < 250
    assert counts["train"] > 1500


def test_bad_splits_are_refused():
    with pytest.raises(ValueError, match="split must be one of"):
        docstrings.paragraphs("test")
    with pytest.raises(ValueError, match="split must be one of"):
        docstrings.name_examples("validation")


@pytest.fixture(scope="module")
def corpus():
    return {
        split: docstrings.paragraphs(split)
        for split in ("train", "validation", "downstream")
    }


def test_corpus_is_large_prose_and_each_paragraph_once(corpus):
    words = {s: sum(len(p.split()) for p in ps) for s, ps in corpus.items()}
    # Over a million words of training text (pydoc_corpus has 65k).
    assert words["train"] > 1_000_000
    assert words["validation"] > 30_000
    every = [p for ps in corpus.values() for p in ps]
    assert len(set(every)) == len(every)
    # Doctest paragraphs are dropped (a prompt inside running text, as in
    # "Call it as >>> f(x)", is not a doctest line and stays).
    assert not any(p.startswith(">>>") for p in every)
    assert all(len(p.split()) >= docstrings.MIN_PARAGRAPH_WORDS for p in every)
    summary = docstrings.corpus_summary()
    assert summary["train"]["words"] == words["train"]
    assert summary["roots"][0] == "stdlib"


def test_naming_splits_have_disjoint_names():
    train = docstrings.name_examples("train")
    test = docstrings.name_examples("test")
    assert len(train) > 500 and len(test) > 100
    assert not {w for _, w in train} & {w for _, w in test}
    summaries = [s for s, _ in train + test]
    assert len(set(summaries)) == len(summaries)  # one name per summary
    for summary, words in train[:50]:
        assert words == words.lower() and "_" not in words
        assert len(summary.split()) >= docstrings.MIN_PARAGRAPH_WORDS


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))
