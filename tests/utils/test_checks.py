"""Argument checks of keras_moe.utils.checks: what they accept and the
messages (callers' tests match parts of them)."""

import sys

import pytest

from keras_moe.utils.checks import check_int
from keras_moe.utils.checks import check_positive_int


def test_check_int_returns_accepted_values():
    assert check_int("n", 1) == 1
    assert check_int("n", 0, minimum=0) == 0
    assert check_int("n", 5, minimum=5) == 5
    assert check_int("seed", -3, minimum=None) == -3


@pytest.mark.parametrize(
    "value, minimum, message",
    [
        (0, 1, "epochs must be >= 1; received 0"),
        (4, 5, "epochs must be >= 5; received 4"),
        (1.5, 1, "epochs must be an int; received 1.5"),
        (True, 1, "epochs must be an int; received True"),
        ("2", 1, "epochs must be an int; received '2'"),
        (None, None, "epochs must be an int; received None"),
        (False, None, "epochs must be an int; received False"),
    ],
)
def test_check_int_messages(value, minimum, message):
    with pytest.raises(ValueError) as error:
        check_int("epochs", value, minimum=minimum)
    assert str(error.value) == message


def test_check_positive_int():
    assert check_positive_int("num_experts", 3) == 3
    for value in (0, -1, 1.0, True, None, "1"):
        with pytest.raises(ValueError) as error:
            check_positive_int("num_experts", value)
        assert str(error.value) == (
            f"num_experts must be an int >= 1; received {value!r}"
        )


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))
