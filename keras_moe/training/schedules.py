"""Learning-rate schedules, registered for `.keras` saving.

`LinearWarmup`: linear warm-up, then constant or a linear decay to 0.
`InverseSqrtWarmup`: linear warm-up, then T5's inverse square-root decay.
"""

import keras
import numpy as np

from keras_moe.utils.checks import check_int


def _is_number(value):
    return isinstance(value, (int, float, np.number)) and not isinstance(
        value, bool
    )


def _check_schedule_args(peak, **steps):
    """Raises a ValueError unless `peak` > 0 and every step count in
    `steps` is an int >= 1."""
    if not _is_number(peak) or not peak > 0:
        raise ValueError(f"peak must be a number > 0; received {peak!r}")
    for name, value in steps.items():
        check_int(name, value)


@keras.saving.register_keras_serializable(package="keras_moe")
class LinearWarmup(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up to `peak`, then constant or a linear decay to 0.

    `peak * min(1, (step + 1) / warmup_steps)`, times
    `max(0, 1 - step / decay_steps)` when `decay_steps` is given.

    Args:
        peak: the learning rate after warm-up.
        warmup_steps: steps of the linear warm-up (>= 1).
        decay_steps: None (constant after warm-up), or the step at which
            a linear decay from the start reaches 0.

    Example:

    >>> round(float(LinearWarmup(1e-3, 10)(4)), 6)
    0.0005
    >>> round(float(LinearWarmup(1e-3, 1, decay_steps=4)(3)), 6)
    0.00025
    """

    def __init__(self, peak, warmup_steps, decay_steps=None):
        _check_schedule_args(peak, warmup_steps=warmup_steps)
        if decay_steps is not None:
            _check_schedule_args(peak, decay_steps=decay_steps)
        self.peak = float(peak)
        self.warmup_steps = warmup_steps
        self.decay_steps = decay_steps

    def __call__(self, step):
        step = keras.ops.cast(step, "float32")
        rate = self.peak * keras.ops.minimum(
            1.0, (step + 1.0) / float(self.warmup_steps)
        )
        if self.decay_steps is not None:
            rate = rate * keras.ops.maximum(
                0.0, 1.0 - step / float(self.decay_steps)
            )
        return rate

    def get_config(self):
        return {
            "peak": self.peak,
            "warmup_steps": self.warmup_steps,
            "decay_steps": self.decay_steps,
        }


@keras.saving.register_keras_serializable(package="keras_moe")
class InverseSqrtWarmup(keras.optimizers.schedules.LearningRateSchedule):
    """`peak * min((step + 1) / warmup_steps, sqrt(warmup_steps / (step +
    1)))`: linear warm-up, then T5's inverse square-root decay.

    It has no end, so a run can stop at any budget, and a run that goes on
    from a checkpoint with the step counter continues the same schedule.

    Args:
        peak: the learning rate at the end of the warm-up.
        warmup_steps: steps of the linear warm-up (>= 1).

    Example:

    >>> schedule = InverseSqrtWarmup(1e-3, 100)
    >>> [round(float(schedule(s)), 6) for s in (49, 99, 399)]
    [0.0005, 0.001, 0.0005]
    """

    def __init__(self, peak, warmup_steps):
        _check_schedule_args(peak, warmup_steps=warmup_steps)
        self.peak = float(peak)
        self.warmup_steps = warmup_steps

    def __call__(self, step):
        count = keras.ops.cast(step, "float32") + 1.0
        warmup = float(self.warmup_steps)
        return self.peak * keras.ops.minimum(
            count / warmup, keras.ops.sqrt(warmup / count)
        )

    def get_config(self):
        return {"peak": self.peak, "warmup_steps": self.warmup_steps}
