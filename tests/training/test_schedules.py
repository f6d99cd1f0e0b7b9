"""The learning-rate schedules: values against hand counts and formulas,
config round trips, and argument checks."""

import sys

import keras
import numpy as np
import pytest

from keras_moe.training.schedules import InverseSqrtWarmup
from keras_moe.training.schedules import LinearWarmup


def test_linear_warmup_and_its_round_trip():
    schedule = LinearWarmup(0.01, 4)
    values = [float(schedule(step)) for step in range(6)]
    np.testing.assert_allclose(
        values, [0.0025, 0.005, 0.0075, 0.01, 0.01, 0.01], rtol=1e-6
    )
    # Through an optimizer's config, as `.keras` saving does.
    optimizer = keras.optimizers.Adam(schedule, global_clipnorm=1.0)
    copy = optimizer.__class__.from_config(optimizer.get_config())
    assert float(copy.learning_rate) == pytest.approx(0.0025)  # step 0
    with pytest.raises(ValueError, match="warmup_steps must be >= 1"):
        LinearWarmup(0.01, 0)


def test_linear_warmup_with_decay_matches_a_hand_count():
    schedule = LinearWarmup(0.01, 2, decay_steps=4)
    # min(1, (s + 1) / 2) * max(0, 1 - s / 4) for s = 0..5
    expected = [0.005, 0.0075, 0.005, 0.0025, 0.0, 0.0]
    values = [float(schedule(step)) for step in range(6)]
    np.testing.assert_allclose(values, expected, rtol=1e-6, atol=1e-12)


def test_inverse_sqrt_warmup_matches_the_formula():
    schedule = InverseSqrtWarmup(0.01, 4)
    steps = np.arange(20)
    count = steps + 1.0
    expected = 0.01 * np.minimum(count / 4, np.sqrt(4 / count))
    values = [float(schedule(step)) for step in steps]
    np.testing.assert_allclose(values, expected, rtol=1e-6)
    assert max(values) == pytest.approx(0.01)  # the peak, at step 3
    copy = InverseSqrtWarmup.from_config(schedule.get_config())
    assert float(copy(10)) == pytest.approx(float(schedule(10)))


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: InverseSqrtWarmup(0.0, 4), "peak must be a number > 0"),
        (lambda: InverseSqrtWarmup("1e-3", 4), "peak must be a number > 0"),
        (lambda: InverseSqrtWarmup(0.01, 0), "warmup_steps must be >= 1"),
        (
            lambda: InverseSqrtWarmup(0.01, 2.5),
            "warmup_steps must be an int",
        ),
        (
            lambda: InverseSqrtWarmup(0.01, True),
            "warmup_steps must be an int",
        ),
        (
            lambda: LinearWarmup(0.01, 4, decay_steps=0),
            "decay_steps must be >= 1",
        ),
        (
            lambda: LinearWarmup(0.01, 4, decay_steps=10.0),
            "decay_steps must be an int",
        ),
    ],
)
def test_schedules_refuse_bad_arguments(build, message):
    with pytest.raises(ValueError, match=message):
        build()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))
