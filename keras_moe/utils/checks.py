"""Argument checks with messages that name the value and what was expected.

`bool` is refused wherever an int is wanted even though it is an `int`
subclass: `True` passed as a count is a mistake, not 1.
"""


def check_int(name, value, minimum=1):
    """Raises ValueError unless `value` is an int >= `minimum`.

    Args:
        name: the argument's name, for the message.
        value: what the caller passed.
        minimum: the smallest value accepted; None accepts any int (a
            seed, say).

    Returns:
        `value`, so that a check can sit inside an expression.

    Example:

    >>> check_int("num_heads", 4)
    4
    >>> check_int("num_heads", 0)
    Traceback (most recent call last):
    ...
    ValueError: num_heads must be >= 1; received 0
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int; received {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; received {value}")
    return value


def check_positive_int(name, value):
    """Raises ValueError unless `value` is an int >= 1, in one message.

    Example:

    >>> check_positive_int("num_experts", 1.5)
    Traceback (most recent call last):
    ...
    ValueError: num_experts must be an int >= 1; received 1.5
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1; received {value!r}")
    return value


def require_tensorflow_backend(feature):
    """Raises a ValueError naming `feature` unless Keras runs on its
    TensorFlow backend.

    The MoE layers, models and upcycling are written with Keras ops and
    TensorFlow ops; tf.distribute strategies, the DTensor mesh and
    SavedModel export exist only on the TensorFlow backend.
    """
    import keras

    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise ValueError(
            f"{feature} needs Keras' TensorFlow backend "
            f"(KERAS_BACKEND=tensorflow); the current backend is {backend!r}"
        )
