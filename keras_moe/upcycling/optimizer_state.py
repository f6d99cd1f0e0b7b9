"""Optimizer state for an upcycled model: `upcycle_optimizer`.

A dense run leaves an optimizer whose slots (Adam's moments, Adafactor's
factored second moments, SGD's momentum) are tuned to the dense gradients.
After upcycling, each expert receives only its share of the gradient that
the dense MLP received, and the router is new. Three ways to start the MoE
model's optimizer (`state=`):

* `"rescale"` (the default): step-consistent state. Every weight the two
  models share keeps its slots. Each expert's slots are the dense MLP's,
  scaled to the expert's expected share `s` of the dense gradient: first
  moments (and SGD momentum) by `s`, second moments (Adam's `v`,
  Adafactor's `r` and `c`) by `s**2`. An Adam-family update
  `m / sqrt(v)` is then the dense update from the first step, where a
  plain copy makes it about `s` times the dense one (until `v` forgets,
  ~`1 / (1 - beta_2)` steps). The router's slots start at zero with a step
  counter of their own, so their bias corrections are those of a fresh
  optimizer, while every other weight and the learning-rate schedule
  continue at the dense step.
* `"copy"`: the dense slots copied unchanged, tiled to the experts; the
  router's slots at zero under the dense step counter (no bias
  correction for its first updates). The behaviour of keras_moe before
  0.2, kept for comparison.
* `"reset"`: every slot starts at zero, as t5x's sparse upcycling does for
  language; the learning-rate schedule still continues at the dense step,
  and every weight gets the bias corrections of a fresh optimizer.

The share `s` is estimated at a uniform router (an upcycled router starts
near uniform) with no token dropped, from each MoE layer's settings (E
experts per router, K selected experts, capacity factor c):

* combine weights renormalised (`normalize_combine_weights=True`): each
  routed token's weights sum to 1 over its experts, so the experts share
  the dense gradient equally: `s = 1 / E`, for token and expert choice;
* token choice, raw router probabilities: a token's K weights sum to about
  `K / E`, so `s = K / E**2`;
* expert choice, raw probabilities: an expert takes `c * S / E` of the S
  tokens with weight about `1 / E`, so `s = c / E**2`.

E^3 ensembles divide tokens among M members, each routing among E/M
experts, and the prediction averages the members: `1 / M` of the gradient
for each member's `1 / (E/M)` share, `1 / E` again. Pass
`expert_gradient_share=` to override the estimate.

Exactness: Adam-family updates are invariant to the gradient's scale
except for epsilon (`m / (sqrt(v) + eps)`): with `v` scaled by `s**2` a
shared epsilon would act as `eps / s` on the dense scale, so the
optimizers made here scale each expert's epsilon by its share (Adam's
`epsilon` by `s`, Adafactor's `epsilon_1` by `s**2`) and the upcycled step
equals the dense step (tested to 1e-5 on the outputs, Adam, AdamW and
Adafactor). Exact preservation is impossible for SGD: its update is
proportional to the gradient, so an expert receiving `s` times the
gradient moves `s` times as far whatever its momentum holds. Its momentum
is scaled by `s`, which keeps the momentum in the units of the gradients
that follow. Away from the exact case (a learned router, noisy experts,
drops) the share is an estimate and the steps agree only on average.

Router bias correction: Keras optimizers keep one step counter. The
optimizers made here (`UpcycledAdam`, `UpcycledAdamW`, `UpcycledAdafactor`,
`UpcycledSGD`: the Keras classes plus three config entries) count the steps
of the variables listed in `fresh_variable_indices` from
`fresh_since_step`, so their bias corrections (Adam) and decay schedule
(Adafactor's `1 - t**-0.8`) are those of a fresh optimizer; the learning
rate schedule reads the global counter for every variable. They save and
load like the Keras classes (registered as `keras_moe>Upcycled...`).
"""

import keras
import numpy as np

from keras_moe.layers.moe import MoeLayer
from keras_moe.models.moe_blocks import moe_layers

RESCALE = "rescale"
COPY = "copy"
RESET = "reset"
STATES = (RESCALE, COPY, RESET)

# Slot attributes of the Keras optimizers, by what they accumulate: first
# moments (and momentum) scale with the gradient, second moments with its
# square.
_FIRST_MOMENTS = ("_momentums", "momentums")
_SECOND_MOMENTS = ("_velocities", "_velocity_hats", "_r", "_c", "_v")


class _UpcycledMixin:
    """A Keras optimizer with two per-variable adjustments, applied while a
    variable's update step is traced (both are Python attributes the Keras
    update steps read):

    * the variables in `fresh_variable_indices` count steps from
      `fresh_since_step`: `iterations` reads `global - fresh_since_step` in
      their updates (fresh bias corrections), the global count elsewhere
      (the learning-rate schedule continues);
    * the variables in `expert_shares` ({variable index: share s}) get the
      epsilon on the scale of their gradients: Adam's `epsilon * s` (it is
      added to `sqrt(v)`), Adafactor's `epsilon_1 * s**2` (added to the
      squared gradient), so that an expert's update equals the dense one
      exactly rather than up to `eps / s`.
    """

    def __init__(
        self,
        *args,
        fresh_variable_indices=(),
        fresh_since_step=0,
        expert_shares=(),
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.fresh_variable_indices = tuple(
            int(i) for i in fresh_variable_indices
        )
        self.fresh_since_step = int(fresh_since_step)
        self.expert_shares = {int(i): float(s) for i, s in expert_shares}
        self._step_offset = None

    @property
    def iterations(self):
        iterations = super().iterations
        if self._step_offset:
            # Never below 0: a counter reset under the offset (a reused
            # optimizer) must not give a negative step (bias corrections
            # 1 - beta**t would flip sign).
            return keras.ops.maximum(iterations - self._step_offset, 0)
        return iterations

    def update_step(self, gradient, variable, learning_rate):
        index = self._get_variable_index(variable)
        share = self.expert_shares.get(index)
        saved = {}
        if share is not None:
            for attr, power in (("epsilon", 1), ("epsilon_1", 2)):
                if hasattr(self, attr):
                    saved[attr] = getattr(self, attr)
                    setattr(self, attr, saved[attr] * share**power)
        if self.fresh_since_step and index in self.fresh_variable_indices:
            self._step_offset = self.fresh_since_step
        try:
            return super().update_step(gradient, variable, learning_rate)
        finally:
            self._step_offset = None
            for attr, value in saved.items():
                setattr(self, attr, value)

    def get_config(self):
        config = super().get_config()
        config["fresh_variable_indices"] = list(self.fresh_variable_indices)
        config["fresh_since_step"] = self.fresh_since_step
        config["expert_shares"] = [
            [i, s] for i, s in sorted(self.expert_shares.items())
        ]
        return config


@keras.saving.register_keras_serializable(package="keras_moe")
class UpcycledAdam(_UpcycledMixin, keras.optimizers.Adam):
    """`keras.optimizers.Adam` with fresh step counts for listed variables."""


@keras.saving.register_keras_serializable(package="keras_moe")
class UpcycledAdamW(_UpcycledMixin, keras.optimizers.AdamW):
    """`keras.optimizers.AdamW` with fresh step counts for listed
    variables."""


@keras.saving.register_keras_serializable(package="keras_moe")
class UpcycledAdafactor(_UpcycledMixin, keras.optimizers.Adafactor):
    """`keras.optimizers.Adafactor` with fresh step counts for listed
    variables."""


@keras.saving.register_keras_serializable(package="keras_moe")
class UpcycledSGD(_UpcycledMixin, keras.optimizers.SGD):
    """`keras.optimizers.SGD` (steps do not enter its update)."""


# Most derived first: AdamW is an Adam.
_UPCYCLED = (
    (keras.optimizers.AdamW, UpcycledAdamW),
    (keras.optimizers.Adam, UpcycledAdam),
    (keras.optimizers.Adafactor, UpcycledAdafactor),
    (keras.optimizers.SGD, UpcycledSGD),
)


def expert_gradient_share(layer):
    """The expected share of the dense MLP's gradient that one expert of
    `layer` receives, at a uniform router with no drops (module doc)."""
    if not isinstance(layer, MoeLayer):
        raise ValueError(
            f"expected a keras_moe MoeLayer; received {type(layer).__name__}"
        )
    experts = layer.experts_per_router
    if layer.normalize_combine_weights:
        return 1.0 / layer.num_experts
    if layer.router_type == "tokens_choose":
        share = layer.num_selected_experts / experts**2
    else:
        factor = layer.train_capacity_factor
        # No capacity factor: every expert may take every token.
        factor = experts if factor is None else min(factor, experts)
        share = factor / experts**2
    return share / layer._num_members


def _upcycled_class(optimizer_class):
    for keras_class, upcycled in _UPCYCLED:
        if issubclass(optimizer_class, keras_class):
            return keras_class, upcycled
    return None, None


def upcycle_optimizer(
    dense_optimizer,
    dense_model,
    moe_model,
    state=RESCALE,
    expert_gradient_share=None,
):
    """A new optimizer for `moe_model` that continues `dense_optimizer`.

    See the module docstring for what `state` does and the share estimate.

    Args:
        dense_optimizer: a built Keras 3 optimizer that trained `dense_model`.
        dense_model: the dense model `moe_model` was upcycled from.
        moe_model: the result of `upcycle(dense_model, ...)`.
        state: `"rescale"` (default), `"copy"` or `"reset"`.
        expert_gradient_share: None to estimate each MoE layer's share from
            its settings, a float in (0, 1] for all, or a callable
            `MoeLayer -> float`.

    Returns:
        A new optimizer of the same config, built for
        `moe_model.trainable_variables`, at the dense step: the Keras class
        for `"copy"`; for `"rescale"` and `"reset"` its `Upcycled...`
        subclass (Adam, AdamW, Adafactor, SGD).

    Raises:
        ValueError: a `dense_optimizer` that is not a built Keras optimizer
            of `dense_model`'s weights, an unknown `state`, a share out of
            range, or `"rescale"` / `"reset"` with an optimizer class whose
            slots it does not know.
    """
    if state not in STATES:
        raise ValueError(f"state must be one of {STATES}; received {state!r}")
    _check_dense_optimizer(dense_optimizer, dense_model)
    keras_class, upcycled = _upcycled_class(type(dense_optimizer))
    config = dense_optimizer.get_config()
    step = int(dense_optimizer.iterations)
    if state == COPY:
        optimizer = type(dense_optimizer).from_config(config)
    elif upcycled is None:
        raise ValueError(
            f"state={state!r} supports {[c.__name__ for c, _ in _UPCYCLED]} "
            f"optimizers; received {type(dense_optimizer).__name__} (use "
            "state='copy')"
        )
    else:
        for key in (
            "fresh_variable_indices",
            "fresh_since_step",
            "expert_shares",
        ):
            config.pop(key, None)
        optimizer = upcycled.from_config(config)
    optimizer.build(moe_model.trainable_variables)
    optimizer.iterations.assign(dense_optimizer.iterations)
    if state == RESET:
        optimizer.fresh_variable_indices = tuple(
            range(len(moe_model.trainable_variables))
        )
        optimizer.fresh_since_step = step
        return optimizer
    shares = _expert_shares(moe_model, expert_gradient_share, state)
    fresh = _copy_slots(
        dense_optimizer, optimizer, dense_model, moe_model, shares
    )
    if state == RESCALE:
        optimizer.fresh_variable_indices = tuple(fresh)
        optimizer.fresh_since_step = step
        optimizer.expert_shares = {
            optimizer._get_variable_index(variable): shares[id(variable)]
            for variable in moe_model.trainable_variables
            if id(variable) in shares
        }
    return optimizer


def _check_dense_optimizer(dense_optimizer, dense_model):
    if not isinstance(dense_optimizer, keras.optimizers.Optimizer):
        raise ValueError(
            "dense_optimizer must be a Keras 3 optimizer; received "
            f"{type(dense_optimizer).__name__}"
        )
    if not dense_optimizer.built:
        raise ValueError(
            "dense_optimizer has no state yet (it was never built or applied); "
            "use a fresh optimizer instead"
        )
    tracked = {id(v) for v in dense_optimizer._trainable_variables}
    foreign = [
        n
        for n, v in dense_model.canonical_variables().items()
        if v.trainable and id(v) not in tracked
    ]
    if foreign:
        raise ValueError(
            "dense_optimizer does not track the weights of dense_model "
            f"(e.g. {foreign[:3]}); pass the optimizer that trained it"
        )


def _expert_shares(moe_model, override, state):
    """{id(expert variable): share} over every MoE layer of `moe_model`."""
    shares = {}
    for layer in moe_layers(moe_model):
        if state == COPY:
            share = 1.0
        elif override is None:
            share = expert_gradient_share(layer)
        elif callable(override):
            share = override(layer)
        else:
            share = override
        if (
            isinstance(share, bool)
            or not isinstance(share, (int, float))
            or not 0 < share <= 1
        ):
            raise ValueError(
                "expert_gradient_share must be a number in (0, 1]; received "
                f"{share!r} for {layer.path}"
            )
        for variable in layer.experts.trainable_variables:
            shares[id(variable)] = float(share)
    return shares


def _copy_slots(dense_optimizer, optimizer, dense_model, moe_model, shares):
    """Copies (and scales) dense slots into `optimizer`; returns the indices
    of the variables left fresh (the routers)."""
    dense_vars = dense_model.canonical_variables()
    dense_slots = _slot_lists(dense_optimizer)
    moe_slots = _slot_lists(optimizer)
    fresh = []
    for name, variable in moe_model.canonical_variables().items():
        if not variable.trainable:
            continue
        index = optimizer._get_variable_index(variable)
        share = shares.get(id(variable))
        source = dense_vars.get(name)
        if share is not None:
            block, weight = name.rsplit("/experts/", 1)
            source = dense_vars.get(f"{block}/{weight}")
        if source is None:
            fresh.append(index)  # a router: fresh state
            continue
        src_index = dense_optimizer._get_variable_index(source)
        for attr, slots in moe_slots.items():
            if slots[index] is None:
                continue
            value = _dense_slot(dense_slots, attr, src_index, slots[index])
            if share is not None:
                power = 2 if attr in _SECOND_MOMENTS else 1
                value = value * np.float32(share**power)
            slots[index].assign(value)
    return fresh


def _dense_slot(dense_slots, attr, src_index, target):
    """The dense slot value shaped for the MoE slot `target`.

    Shared weights: the same shape. Expert weights add a leading E axis:
    the dense slot is tiled. One exception: Adafactor keeps a dense bias
    <[H]> whole (its `v`, with scalar placeholders for `r` and `c`) but
    factors the expert bias <[E, H]>: `c` <[H]> then takes the dense `v`
    and `r` <[E]> its mean, so that the factored estimate
    `r / mean(r) * c` is the dense `v` for every expert.
    """
    value = keras.ops.convert_to_numpy(dense_slots[attr][src_index])
    shape = tuple(target.shape)
    if value.shape == shape:
        return value
    if attr in ("_r", "_c") and value.ndim == 0 and "_v" in dense_slots:
        dense_v = keras.ops.convert_to_numpy(dense_slots["_v"][src_index])
        if attr == "_c" and dense_v.shape == shape:
            return dense_v
        if attr == "_r" and len(shape) == 1:
            return np.full(shape, dense_v.mean(), dense_v.dtype)
    if len(shape) == value.ndim + 1 and shape[1:] == value.shape:
        return np.broadcast_to(value, shape)
    raise ValueError(
        f"cannot fit the dense optimizer slot {attr} of shape {value.shape} "
        f"to {shape}"
    )


def _slot_lists(optimizer):
    """{attribute: list of per-variable slots} of a built Keras optimizer."""
    count = len(optimizer._trainable_variables)
    return {
        attr: value
        for attr, value in vars(optimizer).items()
        if isinstance(value, list)
        and attr != "_trainable_variables"
        and len(value) == count
        and count > 0
        and all(v is None or isinstance(v, keras.Variable) for v in value)
    }
