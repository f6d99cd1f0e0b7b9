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


def test_tensorflow_only_features_say_so_on_other_backends():
    # Keras reads the backend at import: a fresh process on torch.
    import os
    import subprocess
    import textwrap

    code = textwrap.dedent("""
        import keras
        from export.saved_model import export_saved_model
        from keras_moe.distribution.strategies import get_strategy
        from keras_moe.utils.checks import require_tensorflow_backend
        assert keras.backend.backend() == "torch"
        for call in (
            lambda: require_tensorflow_backend("X"),
            lambda: get_strategy("one_device"),
            lambda: export_saved_model(None, "/tmp/never", "m"),
        ):
            try:
                call()
            except ValueError as error:
                assert "TensorFlow backend" in str(error), error
                assert "'torch'" in str(error), error
            else:
                raise AssertionError("no error")
        print("ok")
        """)
    root = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=os.path.abspath(root),
        env=dict(os.environ, KERAS_BACKEND="torch", TF_CPP_MIN_LOG_LEVEL="3"),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))
