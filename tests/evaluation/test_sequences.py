"""Exact match of generated ids (keras_moe.evaluation.sequences), the one
comparison the T5 and vision-language scorers share."""

import sys

import numpy as np
import pytest

from keras_moe.data.vocabulary import EOS_ID
from keras_moe.evaluation.sequences import exact_matches
from keras_moe.evaluation.sequences import until_eos


def test_until_eos_cuts_after_the_first_eos():
    assert until_eos(np.array([5, EOS_ID, 7, EOS_ID])) == [5, EOS_ID]
    assert until_eos([5, 6]) == [5, 6]  # no EOS: all of it
    assert until_eos([]) == []
    assert until_eos([4, 9, 3], eos_id=9) == [4, 9]
    assert all(type(i) is int for i in until_eos(np.array([5, 1], "int32")))


def test_exact_matches_up_to_eos_or_whole_rows():
    targets = np.array([[5, 1, 0], [5, 6, 1], [5, 1, 0], [5, 1, 0]])
    generated = np.array([[5, 1, 0], [5, 6, 1], [5, 1, 7], [5, 6, 1]])
    # Row 3 goes on after its end of sequence: a match up to EOS only.
    assert exact_matches(generated, targets) == [True, True, True, False]
    assert exact_matches(generated, targets, compare_after_eos=True) == [
        True,
        True,
        False,
        False,
    ]


def test_exact_matches_takes_rows_of_any_length():
    # A generation shorter or longer than its target matches up to EOS.
    assert exact_matches([[5, 1], [5, 1, 0, 0]], [[5, 1, 0, 0], [5, 1]]) == [
        True,
        True,
    ]
    assert exact_matches([[5, 1]], [[5, 1, 0, 0]], compare_after_eos=True) == [
        False
    ]
    # Without EOS the whole rows are compared.
    assert exact_matches([[5, 6]], [[5, 6, 7]]) == [False]
    assert exact_matches([], []) == []


def test_exact_matches_refuses_unpaired_rows():
    with pytest.raises(ValueError, match="one generation per target"):
        exact_matches([[5, 1]], [[5, 1], [6, 1]])


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))
