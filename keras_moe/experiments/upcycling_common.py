"""The protocol shared by `upcycle_vit` and `upcycle_t5`.

A dense model is pre-trained once per seed for P FLOPs (its training steps
times `keras_moe.models.flops.training_step_flops` times the batch size),
with its learning curve recorded (`_pretrain`). Then, for each extra budget
b (a fraction of P), every arm of `ConvergedTask.arms()` trains until it
has used (1 + b) * P FLOPs in all (`run_seed_converged`):

* `dense`: the dense model keeps training, its optimizer state kept and
  its learning-rate schedule continued at the dense step (b * P more);
* `dense_rewarm`: the same with the schedule re-started at step 0 (a new
  warm-up to the peak), so that optimizer state and learning rate are
  separate factors (optional);
* `upcycled`: `keras_moe.upcycle(dense)` with the paper's recipe (every
  other MLP block, E experts, expert choice with capacity factor 2 in
  encoders, token-choice top-2 in decoders, renormalised combine weights
  in vision), its optimizer state from `keras_moe.upcycle_optimizer`
  (`Settings.optimizer_state`, "rescale" by default), schedule continued
  (an MoE step costs more, so it takes fewer steps);
* `upcycled_rewarm`: the same, schedule re-warmed (optional);
* `upcycled_reset`: upcycled with the state reset, schedule continued:
  the paper's language recipe (optional);
* `dense_tiled`: "dense upcycling" by depth tiling (Rae et al., 2021, the
  paper's dense baseline): a deeper dense model whose block j starts as a
  copy of pre-trained block floor(j * L / L') (A B C D -> A A B C C D),
  with L' chosen so that its step costs as close as possible to the
  upcycled model's, the dense optimizer state tiled the same way,
  schedule continued (optional);
* `moe_scratch`: the upcycled architecture, randomly initialised and
  trained from scratch for the whole (1 + b) * P (the sunk dense compute
  spent on the MoE instead).

Each arm is one run evaluated at every budget along the way (budgets
sorted; the steps of a budget are `round(flops / step_flops)`, within half
a step of the target). Every evaluation is of a branched copy cooled down
for `cooldown_fraction` of P FLOPs (learning rate decaying linearly from
the arm's current rate to 0), the same for every arm and outside the
budgets; the arm then goes on from before the cooldown. A convergence gate
(`convergence_gate`) reports how much +50% dense training lowered the
held-out metric. Every arm uses Adam with global gradient-norm clipping
at 1 and T5's schedule (linear warm-up, then inverse square-root decay);
the learning rate is driven from Python (`Trainer.learning_rate_fn`), so
one traced step serves every schedule, and steps are traced once per
architecture (`TrainerPool`). The loss adds the MoE auxiliary losses
(`model.losses`). Results are paired by seed (`paired_differences`).

Options (`SUPPORTED_OPTIONS`, see `parse_options`) change the MoE arms:
num_experts, capacity_factor, router and moe_blocks change every MoE arm
(and so the tiled depth); expert_noise, reinit_fraction,
reuse_optimizer_state and optimizer_state change how the upcycled arm
starts; budgets the extra budgets.
"""

import dataclasses
import functools
import json
import math
import os
import random
import re
import time

import keras
import numpy as np
import tensorflow as tf

from keras_moe import experiments
from keras_moe import upcycling
from keras_moe.experiments import common
from keras_moe.layers import routing
from keras_moe.training.schedules import InverseSqrtWarmup
from keras_moe.training.schedules import LinearWarmup
from keras_moe.utils.checks import check_int
from keras_moe.utils.files import write_text

SUPPORTED_OPTIONS = experiments.OPTION_NAMES
DEFAULT_BUDGETS = (0.1, 0.25, 0.5, 1.0)
ROUTERS = (routing.EXPERTS_CHOOSE, routing.TOKENS_CHOOSE)
# Token-choice MoE blocks route each token to this many experts (the
# paper's top-2 decoders), at most E.
TOKENS_CHOOSE_K = 2


# --------------------------------------------------------------------------
# Options.


@dataclasses.dataclass(frozen=True)
class Settings:
    """The MoE recipe and budgets of one run (the defaults are the paper's).

    Attributes:
        num_experts: E of every MoE block.
        capacity_factor: train and eval capacity factor of every MoE block.
        router: router of encoder (and ViT) MoE blocks; decoders always use
            token choice.
        moe_blocks: "every_other", "all" or "last_n:<n>".
        expert_noise: multiplicative noise std on the upcycled experts.
        reinit_fraction: fraction of each upcycled expert's hidden units
            re-drawn (Drop-Upcycling).
        reuse_optimizer_state: whether the upcycled arm continues the dense
            optimizer's state (`keras_moe.upcycle_optimizer`).
        optimizer_state: how it continues it: `upcycle_optimizer`'s
            `state` ("rescale", "copy" or "reset").
        normalize_combine_weights: None for the paper's choice (vision
            only), or a bool for every MoE block.
        budgets: sorted extra budgets, fractions of the dense pre-training
            FLOPs.
    """

    num_experts: int = 8
    capacity_factor: float = 2.0
    router: str = routing.EXPERTS_CHOOSE
    moe_blocks: str = "every_other"
    expert_noise: float = 0.0
    reinit_fraction: float = 0.0
    reuse_optimizer_state: bool = True
    optimizer_state: str = "rescale"
    normalize_combine_weights: object = None
    budgets: tuple = DEFAULT_BUDGETS

    def upcycle_kwargs(self, seed, moe_kwargs=None):
        """`keras_moe.upcycle` keyword arguments of this recipe."""
        blocks, last_n = experiments.parse_moe_blocks(self.moe_blocks)
        return {
            "num_experts": self.num_experts,
            "blocks": blocks,
            "last_n": last_n,
            "encoder_router": self.router,
            "num_selected_experts": min(TOKENS_CHOOSE_K, self.num_experts),
            "train_capacity_factor": self.capacity_factor,
            "eval_capacity_factor": self.capacity_factor,
            "expert_noise": self.expert_noise,
            "reinit_fraction": self.reinit_fraction,
            "normalize_combine_weights": self.normalize_combine_weights,
            "moe_kwargs": dict(moe_kwargs or {}),
            "seed": seed,
        }

    def describe(self):
        """One line naming every setting, for the results page."""
        budgets = ", ".join(f"{b:g}" for b in self.budgets)
        normalized = (
            ""
            if self.normalize_combine_weights is None
            else ", combine weights normalised "
            f"{self.normalize_combine_weights}"
        )
        return (
            f"E={self.num_experts}, capacity factor {self.capacity_factor:g}, "
            f"router {self.router}, MoE blocks {self.moe_blocks}, expert "
            f"noise {self.expert_noise:g}, re-initialised fraction "
            f"{self.reinit_fraction:g}, optimizer state "
            f"{self.optimizer_state if self.reuse_optimizer_state else 'fresh'}"
            f"{normalized}, budgets {budgets}"
        )


def _is_number(value):
    return isinstance(value, (int, float, np.number)) and not isinstance(
        value, bool
    )


def parse_options(experiment, options, stack_layers):
    """Validates the `options` of `run` into `Settings`, before any work.

    Args:
        experiment: the experiment's name, for messages.
        options: None or {option name: value} with names from
            `SUPPORTED_OPTIONS`.
        stack_layers: {stack name: number of blocks} of the dense model, to
            check `moe_blocks` against.

    Returns:
        `Settings`.

    Raises:
        ValueError: an unknown option, or a value out of range; the message
            names the option and what it accepts.
    """
    options = experiments.check_options(experiment, options, SUPPORTED_OPTIONS)
    values = {}
    for name, value in options.items():
        values[name] = _check_option(name, value)
    if "moe_blocks" in values:
        blocks, last_n = experiments.parse_moe_blocks(values["moe_blocks"])
        for stack, num_layers in stack_layers.items():
            try:
                upcycling.select_blocks(blocks, num_layers, last_n)
            except ValueError as e:
                raise ValueError(
                    f"option moe_blocks={values['moe_blocks']!r} does not "
                    f"fit the {stack} of {num_layers} blocks: {e}"
                ) from None
    return Settings(**values)


def _check_option(name, value):
    """One option's value, validated and normalised."""
    if name == "num_experts":
        if isinstance(value, np.integer):  # from a NumPy array of options
            value = int(value)
        return check_int("option num_experts", value)
    if name == "capacity_factor":
        if not _is_number(value) or not math.isfinite(value) or value <= 0:
            raise ValueError(
                "option capacity_factor must be a number > 0; received "
                f"{value!r}"
            )
        return float(value)
    if name == "router":
        if value not in ROUTERS:
            raise ValueError(
                f"option router must be one of {ROUTERS}; received {value!r}"
            )
        return value
    if name == "moe_blocks":
        try:
            experiments.parse_moe_blocks(value)
        except ValueError as e:
            raise ValueError(f"option {e}") from None
        return value
    if name in ("expert_noise", "reinit_fraction"):
        high = 1.0 if name == "reinit_fraction" else math.inf
        if not _is_number(value) or not 0.0 <= value <= high:
            bounds = "in [0, 1]" if high == 1.0 else ">= 0"
            raise ValueError(
                f"option {name} must be a number {bounds}; received {value!r}"
            )
        return float(value)
    if name == "reuse_optimizer_state":
        if not isinstance(value, (bool, np.bool_)):
            raise ValueError(
                "option reuse_optimizer_state must be a bool; received "
                f"{value!r}"
            )
        return bool(value)
    if name == "optimizer_state":
        if value not in ("rescale", "copy", "reset"):
            raise ValueError(
                "option optimizer_state must be one of rescale, copy, reset; "
                f"received {value!r}"
            )
        return value
    if name == "normalize_combine_weights":
        if not isinstance(value, (bool, np.bool_)):
            raise ValueError(
                "option normalize_combine_weights must be a bool; received "
                f"{value!r}"
            )
        return bool(value)
    if name == "budgets":
        return _check_budgets(value)
    raise ValueError(f"unknown option {name!r}")  # check_options stops it.


def _check_budgets(value):
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(
            "option budgets must be a list of fractions > 0 (e.g. [0.1, "
            f"0.5]); received {value!r}"
        )
    budgets = tuple(value)
    if not budgets or not all(
        _is_number(b) and math.isfinite(b) and b > 0 for b in budgets
    ):
        raise ValueError(
            "option budgets must be a non-empty list of fractions > 0; "
            f"received {value!r}"
        )
    budgets = tuple(sorted(float(b) for b in budgets))
    if len(set(budgets)) != len(budgets):
        raise ValueError(f"option budgets repeats a value: {value!r}")
    return budgets


# --------------------------------------------------------------------------
# Training.


def make_optimizer(learning_rate, warmup_steps, decay_steps=None):
    """Adam with global gradient-norm clipping at 1.

    Args:
        learning_rate: the peak learning rate.
        warmup_steps: steps of linear warm-up.
        decay_steps: None for `InverseSqrtWarmup` (training), or the step
            at which `LinearWarmup`'s linear decay reaches 0 (fine-tuning).
    """
    if decay_steps is None:
        schedule = InverseSqrtWarmup(learning_rate, warmup_steps)
    else:
        schedule = LinearWarmup(learning_rate, warmup_steps, decay_steps)
    return keras.optimizers.Adam(learning_rate=schedule, global_clipnorm=1.0)


class Trainer:
    """Trains `model` with `optimizer` in a compiled step; counts FLOPs.

    The step and the inference call (`forward`) are traced once per model;
    `load` puts another model's weights and optimizer state into this one
    (same architecture), so that a new arm or seed reuses the traced
    functions: tracing a T5 step costs seconds to tens of seconds here.

    Args:
        model: a Keras model.
        optimizer: a Keras optimizer; built here if it is not.
        loss_fn: `loss_fn(model, inputs, targets) -> scalar` of the task;
            the MoE auxiliary losses (`model.losses`) are added to it.
        step_flops: FLOPs of one training step (batch included).
        jit_compile: whether the step is compiled with XLA.
    """

    def __init__(self, model, optimizer, loss_fn, step_flops, jit_compile):
        if not optimizer.built:
            optimizer.build(model.trainable_variables)
        self.model = model
        self.optimizer = optimizer
        self.step_flops = int(step_flops)
        self.steps = 0
        self.seconds = 0.0
        # Set by the caller to drive the learning rate from Python:
        # `learning_rate_fn(schedule_step)` is assigned to the optimizer's
        # (float) learning rate before each step, and `schedule_step`
        # counts the steps since the caller last set it.
        self.learning_rate_fn = None
        self.schedule_step = 0

        # No AutoGraph: the step has no tensor-dependent Python control
        # flow, and AutoGraph would re-read the source files at trace time.
        @tf.function(jit_compile=jit_compile, autograph=False)
        def train_step(inputs, targets):
            variables = model.trainable_variables
            with tf.GradientTape() as tape:
                loss = loss_fn(model, inputs, targets)
                total = loss
                if model.losses:
                    total = total + tf.add_n(model.losses)
            gradients = tape.gradient(total, variables)
            optimizer.apply_gradients(
                [(g, v) for g, v in zip(gradients, variables) if g is not None]
            )
            return loss

        self._train_step = train_step
        self.forward = tf.function(
            lambda inputs: model(inputs, training=False), autograph=False
        )
        # Pooled pre-logit features of models that have them (ViT).
        self.features = None
        if hasattr(model, "encode") and hasattr(model, "pool"):
            self.features = tf.function(
                lambda inputs: model.pool(model.encode(inputs)),
                autograph=False,
            )

    @property
    def flops(self):
        """FLOPs of the steps this trainer ran."""
        return self.steps * self.step_flops

    def load(self, model, optimizer):
        """Copies `model`'s weights and `optimizer`'s state (built here if
        it is not) into this trainer's, and zeroes the step count."""
        if architecture_key(model.get_config()) != architecture_key(
            self.model.get_config()
        ):
            raise ValueError(
                f"cannot load a {type(model).__name__} into this trainer's "
                f"{type(self.model).__name__}: the architectures differ"
            )
        self.model.set_weights(model.get_weights())
        if not optimizer.built:
            optimizer.build(model.trainable_variables)
        _assign_all(self.optimizer.variables, optimizer.variables)
        self.steps = 0
        self.seconds = 0.0

    def snapshot(self):
        """The weights, optimizer state, counters and learning-rate driver,
        for `restore`."""
        return (
            self.model.get_weights(),
            [v.numpy() for v in self.optimizer.variables],
            self.steps,
            self.seconds,
            self.learning_rate_fn,
            self.schedule_step,
        )

    def restore(self, snapshot):
        """Returns to a `snapshot`."""
        weights, state, self.steps, self.seconds = snapshot[:4]
        self.learning_rate_fn, self.schedule_step = snapshot[4:]
        self.model.set_weights(weights)
        _assign_all(self.optimizer.variables, state)

    def train(self, batches, num_steps):
        """Runs `num_steps` steps on `(inputs, targets)` from `batches`.

        Returns:
            The mean task loss of those steps (NaN for none).
        """
        start = time.perf_counter()
        losses = []
        rate = None
        if self.learning_rate_fn is not None:
            rate = self.optimizer._learning_rate
            if not isinstance(rate, keras.Variable):
                raise ValueError(
                    "learning_rate_fn needs an optimizer built with a float "
                    f"learning rate; this one has {type(rate).__name__}"
                )
        for _ in range(num_steps):
            if rate is not None:
                rate.assign(self.learning_rate_fn(self.schedule_step))
            inputs, targets = next(batches)
            losses.append(self._train_step(inputs, targets))
            self.schedule_step += 1
        self.steps += num_steps
        self.seconds += time.perf_counter() - start
        if not losses:
            return float("nan")
        return float(np.mean([float(x) for x in losses]))


def _assign_all(variables, values):
    """Assigns `values` (arrays or variables) to `variables`, in order."""
    if len(variables) != len(values):
        raise ValueError(
            f"cannot copy {len(values)} values into {len(variables)} "
            "variables: the architectures differ"
        )
    for variable, value in zip(variables, values):
        if tuple(variable.shape) != tuple(value.shape):
            raise ValueError(
                f"cannot copy a value of shape {tuple(value.shape)} into "
                f"{variable.path} of shape {tuple(variable.shape)}"
            )
        variable.assign(value)


# Config entries that do not change what a model computes once its
# weights are loaded: its name and the seeds of its initialisers (MoE
# routers draw no noise in these experiments).
_NOT_ARCHITECTURE = ("seed", "router_kernel_initializer")


def architecture_key(config):
    """A string equal for configs that differ only in name and seeds.

    Example:

    >>> a = {"name": "vit", "moe": {"seed": 0, "num_experts": 8}}
    >>> b = {"name": "vit_1", "moe": {"seed": 1, "num_experts": 8}}
    >>> architecture_key(a) == architecture_key(b)
    True
    """

    def strip(value):
        if isinstance(value, dict):
            return {
                k: strip(v)
                for k, v in value.items()
                if k not in _NOT_ARCHITECTURE
            }
        if isinstance(value, (list, tuple)):
            return [strip(v) for v in value]
        return value

    config = {k: v for k, v in config.items() if k != "name"}
    return json.dumps(strip(config), sort_keys=True, default=str)


class TrainerPool:
    """One `Trainer` per architecture (model config), reused across arms
    and seeds.

    Args:
        loss_fn: the task loss (see `Trainer`).
        step_flops_fn: `fn(model) -> FLOPs of one training step`.
        jit_compile: XLA for the training steps.
    """

    def __init__(self, loss_fn, step_flops_fn, jit_compile):
        self.loss_fn = loss_fn
        self.step_flops_fn = step_flops_fn
        self.jit_compile = jit_compile
        self._trainers = {}

    def trainer(self, model, optimizer):
        """A trainer holding `model`'s weights and `optimizer`'s state.

        The first model of an architecture becomes the trainer's own; later
        ones are copied into it (`Trainer.load`).
        """
        # The optimizer's config is part of the key: a traced step bakes in
        # its class and per-variable settings (an upcycled optimizer's
        # fresh router steps and expert epsilons), which a fresh optimizer
        # loaded into the same trainer must not inherit.
        key = (
            architecture_key(model.get_config()),
            type(optimizer).__name__,
            json.dumps(_per_variable_settings(optimizer), sort_keys=True),
        )
        trainer = self._trainers.get(key)
        if trainer is None:
            trainer = Trainer(
                model,
                optimizer,
                self.loss_fn,
                self.step_flops_fn(model),
                self.jit_compile,
            )
            self._trainers[key] = trainer
        else:
            trainer.load(model, optimizer)
        return trainer


def _per_variable_settings(optimizer):
    """The config entries of `keras_moe.upcycle_optimizer`'s optimizers
    (empty for a plain Keras optimizer)."""
    config = optimizer.get_config()
    return {
        key: config[key]
        for key in (
            "fresh_variable_indices",
            "fresh_since_step",
            "expert_shares",
        )
        if key in config
    }


def steps_for_flops(flops, step_flops):
    """Training steps whose FLOPs are nearest to `flops` (half-step error).

    Example:

    >>> steps_for_flops(1000, 300), steps_for_flops(1000, 450)
    (3, 2)
    """
    if not step_flops > 0:
        raise ValueError(f"step_flops must be > 0; received {step_flops!r}")
    if flops < 0:
        raise ValueError(f"flops must be >= 0; received {flops!r}")
    return int(math.floor(flops / step_flops + 0.5))


def reset_optimizer(optimizer):
    """Zeroes every variable of a built optimizer (state and step count)."""
    for variable in optimizer.variables:
        variable.assign(keras.ops.zeros(variable.shape, variable.dtype))


# --------------------------------------------------------------------------
# Dense upcycling by depth tiling.

_BLOCK = re.compile(r"^(?P<stack>[a-z_]+)/block_(?P<index>\d+)/(?P<rest>.+)$")


def tiled_sources(num_layers, new_num_layers):
    """Source block of each block of a stack tiled to `new_num_layers`.

    Block j copies block floor(j * L / L'): every block repeated in place,
    in order (for L' = 2L, each block twice).

    Example:

    >>> tiled_sources(4, 6)
    [0, 0, 1, 2, 2, 3]
    """
    if new_num_layers < num_layers:
        raise ValueError(
            f"a tiled stack cannot be shallower: {new_num_layers} < "
            f"{num_layers}"
        )
    return [j * num_layers // new_num_layers for j in range(new_num_layers)]


def _stacks(model):
    """{stack name: config key of its block count} of a ViT or T5."""
    _, stacks = upcycling.architecture(model)
    return {stack.name: stack.layers_key for stack in stacks}


def stack_layers(model):
    """{stack name: number of blocks} of a keras_moe ViT or T5."""
    config = model.get_config()
    return {name: config[key] for name, key in _stacks(model).items()}


def tiled_config(model, extra_layers):
    """`model`'s config with `extra_layers` more blocks in every stack."""
    config = model.get_config()
    for key in _stacks(model).values():
        config[key] = config[key] + extra_layers
    return config


def depth_tile(model, extra_layers):
    """A deeper dense copy of `model`, blocks tiled (see `tiled_sources`).

    Args:
        model: a dense keras_moe `ViT` or `T5`.
        extra_layers: blocks added to every stack (>= 0).

    Returns:
        `(tiled model, {tiled canonical name: source canonical name})`.
    """
    layers = stack_layers(model)
    tiled = type(model).from_config(tiled_config(model, extra_layers))
    sources = {
        stack: tiled_sources(count, count + extra_layers)
        for stack, count in layers.items()
    }
    source_variables = model.canonical_variables()
    name_map = {}
    for name, variable in tiled.canonical_variables().items():
        match = _BLOCK.match(name)
        source = name
        if match and match["stack"] in sources:
            index = sources[match["stack"]][int(match["index"])]
            source = f"{match['stack']}/block_{index}/{match['rest']}"
        if source not in source_variables:
            raise ValueError(
                f"depth_tile found no weight {source!r} for {name!r} in "
                f"{type(model).__name__}"
            )
        variable.assign(source_variables[source])
        name_map[name] = source
    return tiled, name_map


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
        and all(isinstance(v, keras.Variable) for v in value)
    }


def tile_optimizer(dense_optimizer, dense_model, tiled_model, name_map):
    """A new optimizer for `tiled_model` continuing `dense_optimizer`.

    Every slot (Adam's moments) of a tiled weight is the slot of its source
    weight; the step counter is copied.

    Args:
        dense_optimizer: the built optimizer that trained `dense_model`.
        dense_model: the dense model.
        tiled_model: the result of `depth_tile(dense_model, ...)`.
        name_map: its {tiled name: source name}.
    """
    optimizer = dense_optimizer.__class__.from_config(
        dense_optimizer.get_config()
    )
    optimizer.build(tiled_model.trainable_variables)
    optimizer.iterations.assign(dense_optimizer.iterations)
    source_slots = _slot_lists(dense_optimizer)
    target_slots = _slot_lists(optimizer)
    sources = dense_model.canonical_variables()
    for name, variable in tiled_model.canonical_variables().items():
        if not variable.trainable:
            continue
        src = dense_optimizer._get_variable_index(sources[name_map[name]])
        dst = optimizer._get_variable_index(variable)
        for attr, slots in target_slots.items():
            slots[dst].assign(source_slots[attr][src])
    return optimizer


def matched_extra_layers(dense_model, target_flops, step_flops_fn):
    """Blocks to add per stack so that a step costs closest to
    `target_flops` (at least one block).

    Args:
        dense_model: the dense model.
        target_flops: step FLOPs to match (the upcycled model's).
        step_flops_fn: `fn(model) -> step FLOPs`.
    """
    best = None
    for extra in range(1, 1 + 3 * max(stack_layers(dense_model).values())):
        model = type(dense_model).from_config(tiled_config(dense_model, extra))
        gap = abs(step_flops_fn(model) - target_flops)
        if best is not None and gap >= best[0]:
            break  # FLOPs grow with depth: the gap only widens from here.
        best = (gap, extra)
    return best[1]


# --------------------------------------------------------------------------
# The protocol.


def _format_metrics(metrics):
    """ "name value, ..." of the measured (not None) metrics."""
    return ", ".join(
        f"{k} {v:.4f}" for k, v in metrics.items() if v is not None
    )


def _print_row(task, seed, arm, budget, row, loss, metrics, label, timed):
    """One progress line for an evaluated arm."""
    shown = _format_metrics(metrics)
    print(
        f"[{task.name} seed {seed}] {arm} +{budget:.0%}: "
        f"{row['steps']} steps (train loss {loss:.4f}), {label}{shown} "
        f"({row['eval_seconds']:.1f} s {timed})",
        flush=True,
    )


@dataclasses.dataclass
class Task:
    """What an experiment plugs into `run_seed`.

    Attributes:
        name: the experiment name, for progress lines.
        build_dense: `fn() -> dense model` (randomly initialised).
        loss_fn: `fn(model, inputs, targets) -> scalar` (see `Trainer`).
        batches: `fn(stream, seed) -> iterator of (inputs, targets)`;
            stream "pretrain", "continue" (shared by the three continuing
            arms, so they see the same batches) or "scratch".
        step_flops: `fn(model) -> FLOPs of one training step`.
        evaluate: `fn(trainer, seed, budget, arm) -> {metric: float}` of
            `trainer.model` (`trainer.forward` is its compiled inference
            call) of arm `arm` (a key of `CONVERGED_ARMS`) at extra
            budget `budget`.
        pretrain_steps: dense pre-training steps.
        learning_rate: peak learning rate of every arm.
        warmup_steps: linear warm-up of every fresh optimizer.
        moe_kwargs: extra `MoeLayer` kwargs of the MoE arms.
        jit_compile: XLA for the training steps.
    """

    name: str
    build_dense: object
    loss_fn: object
    batches: object
    step_flops: object
    evaluate: object
    pretrain_steps: int
    learning_rate: float
    warmup_steps: int
    moe_kwargs: dict = dataclasses.field(default_factory=dict)
    jit_compile: bool = False


def seed_everything(seed):
    """Seeds Python's and NumPy's generators, which fix every unseeded
    Keras initializer (each draws its seed from Python's `random`).

    `keras.utils.set_random_seed` would also call `tf.random.set_seed`,
    which clears TensorFlow's kernel cache: every traced step would then
    be instantiated again (seconds each), and TensorFlow Text tokenizer
    resources created before would be gone. Data order and noise use
    explicit seeds.
    """
    random.seed(seed)
    np.random.seed(seed)


def type_of_config(config):
    """The keras_moe model class a `get_config()` dict belongs to."""
    from keras_moe.models.t5 import T5
    from keras_moe.models.vit import ViT

    return T5 if "vocab_size" in config else ViT


# --------------------------------------------------------------------------
# Results.


def summarize(rows, metrics, arms=None):
    """Mean and sample std (ddof=1; 0 for one seed) of `metrics` over
    seeds, per arm and budget, arms in `arms` order.

    A metric missing from (or None in) every row of a group is None in the
    summary (e.g. the T5 fine-tune, run at some budgets only).
    """
    arms = CONVERGED_ARMS if arms is None else arms
    groups = {}
    for row in rows:
        groups.setdefault((row["arm"], row["budget"]), []).append(row)
    order = {arm: i for i, arm in enumerate(arms)}
    summary = []
    for (arm, budget), members in sorted(
        groups.items(), key=lambda item: (order[item[0][0]], item[0][1])
    ):
        out = {"arm": arm, "budget": budget, "n": len(members)}
        for metric in (*metrics, "compute_ratio"):
            values = [
                float(r[metric]) for r in members if r.get(metric) is not None
            ]
            out[metric] = float(np.mean(values)) if values else None
            out[f"{metric}_std"] = (
                float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
            )
        summary.append(out)
    return summary


def results_table(summary, metrics, digits=4, arms=None, labels=None):
    """Markdown table: one row per budget, one column per arm and metric
    (`labels`: {arm: column title}, default `ARM_LABELS`)."""
    arms = CONVERGED_ARMS if arms is None else arms
    labels = CONVERGED_LABELS if labels is None else labels
    budgets = sorted({row["budget"] for row in summary})
    cells = {(row["arm"], row["budget"]): row for row in summary}
    lines = []
    for metric in metrics:
        table_rows = []
        for budget in budgets:
            out = {"budget": f"+{budget:.0%}"}
            for arm in arms:
                row = cells.get((arm, budget))
                out[arm] = (
                    common.format_mean_std(
                        row[metric], row[f"{metric}_std"], digits
                    )
                    if row and row[metric] is not None
                    else "—"
                )
            table_rows.append(out)
        lines.append(f"**{metric}** (mean ± std over seeds)\n")
        lines.append(
            common.markdown_table(
                table_rows,
                ("budget", *arms),
                ("extra compute", *(labels[a] for a in arms)),
            )
        )
    return "\n".join(lines)


def plot_against_compute(summary, metrics, path, title, arms=None, labels=None):
    """Each metric against extra compute, one line per arm, std bars.

    Args:
        summary: rows of `summarize`.
        metrics: {metric key: axis label}, one panel each.
        path: the .png path.
        title: the figure title.
        arms: the arms to draw, in order.
        labels: {arm: legend label}, default `ARM_LABELS`.
    """
    arms = CONVERGED_ARMS if arms is None else arms
    labels = CONVERGED_LABELS if labels is None else labels
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(
        1, len(metrics), figsize=(5.0 * len(metrics), 3.9), squeeze=False
    )
    for axis, (metric, label) in zip(axes[0], metrics.items()):
        for i, arm in enumerate(arms):
            points = [
                r for r in summary if r["arm"] == arm and r[metric] is not None
            ]
            if not points:
                continue
            axis.errorbar(
                [100.0 * r["budget"] for r in points],
                [r[metric] for r in points],
                yerr=[r[f"{metric}_std"] for r in points],
                marker="o",
                markersize=4,
                capsize=3,
                color=f"C{i}",
                label=labels[arm],
            )
        _zoom(axis, summary, metric, arms, labels)
        axis.set_xlabel(
            "extra training compute (% of dense pre-training FLOPs)"
        )
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    common.save_figure(figure, path)


def _zoom(axis, summary, metric, arms=None, labels=None):
    """Fits the y axis to the points after extra training.

    A starting point (budget 0) more than the trained points' spread away
    from them, such as a freshly tiled model, would squash the comparison:
    it is left out of the axis range and its value written at the edge.
    """
    arms = CONVERGED_ARMS if arms is None else arms
    trained = [
        r[metric] for r in summary if r["budget"] > 0 and r[metric] is not None
    ]
    if not trained:
        return
    low, high = min(trained), max(trained)
    spread = (high - low) or 0.1 * abs(high) or 0.1
    outliers = []
    for r in summary:
        value = r[metric]
        if r["budget"] != 0 or value is None:
            continue
        if low - spread <= value <= high + spread:
            low, high = min(low, value), max(high, value)
        else:
            outliers.append(r)
    labels = CONVERGED_LABELS if labels is None else labels
    pad = 0.08 * (high - low or spread)
    low, high = low - pad, high + pad
    for r in outliers:
        above = r[metric] > high
        axis.annotate(
            f"{labels[r['arm']]} at +0%: {r[metric]:.3g}",
            (1.0, high if above else low),
            fontsize=7,
            va="top" if above else "bottom",
            color=f"C{arms.index(r['arm'])}",
        )
    axis.set_ylim(low, high)


def check_compute_matched(rows):
    """Raises if arms of one seed and budget differ by more than one step's
    FLOPs in total compute (a self-check run before results are written)."""
    groups = {}
    for row in rows:
        groups.setdefault((row["seed"], row["budget"]), []).append(row)
    for (seed, budget), members in groups.items():
        totals = [r["total_flops"] for r in members]
        step = max(r["step_flops"] for r in members)
        if max(totals) - min(totals) > step:
            raise RuntimeError(
                f"seed {seed}, budget {budget}: arms used {totals} FLOPs, "
                f"more than one step ({step}) apart"
            )


def arm_table(rows, arms=None, labels=None):
    """Markdown table of each arm's size and step cost (seed-independent)."""
    arms = CONVERGED_ARMS if arms is None else arms
    labels = CONVERGED_LABELS if labels is None else labels
    seen = {}
    for row in rows:
        seen.setdefault(row["arm"], row)
    table = [
        {
            "arm": labels[arm],
            "params": f"{seen[arm]['params']:,}",
            "step": common.format_flops(seen[arm]["step_flops"]),
            "ratio": "{:.2f}".format(
                seen[arm]["step_flops"] / seen["dense"]["step_flops"]
            ),
        }
        for arm in arms
        if arm in seen
    ]
    return common.markdown_table(
        table,
        ("arm", "params", "step", "ratio"),
        ("arm", "parameters", "FLOPs per training step", "x dense step"),
    )


# --------------------------------------------------------------------------
# The converged protocol: {dense, upcycled} x {schedule continued, schedule
# re-warmed}, a cooldown before every evaluation, a convergence gate.

CONVERGED_ARMS = (
    "dense",
    "dense_rewarm",
    "upcycled",
    "upcycled_rewarm",
    "upcycled_reset",
    "dense_tiled",
    "moe_scratch",
)
CONVERGED_LABELS = {
    "dense": "dense, schedule continued",
    "dense_rewarm": "dense, schedule re-warmed",
    "upcycled": "upcycled, schedule continued",
    "upcycled_rewarm": "upcycled, schedule re-warmed",
    "upcycled_reset": "upcycled (state reset), schedule continued",
    "dense_tiled": "depth-tiled dense, schedule continued",
    "moe_scratch": "MoE from scratch",
}
# Paired differences reported (arm, baseline): the same seed, data and
# compute, one factor changed.
CONVERGED_PAIRS = (
    ("upcycled", "dense"),
    ("upcycled_rewarm", "dense_rewarm"),
    ("upcycled_rewarm", "dense"),
    ("upcycled_reset", "dense"),
    ("dense_rewarm", "dense"),
    ("upcycled", "moe_scratch"),
    ("upcycled", "upcycled_reset"),
    ("upcycled", "dense_tiled"),
)
# The dense model counts as converged if +50% more dense training lowers
# its (cooled-down) held-out NLL by at most this fraction.
GATE_BUDGET = 0.5
GATE_MAX_DROP = 0.15


def inverse_sqrt_rate(peak, warmup_steps, step):
    """`InverseSqrtWarmup(peak, warmup_steps)(step)` as a Python float.

    Example:

    >>> round(inverse_sqrt_rate(1.0, 100, 399), 6)
    0.5
    """
    t = step + 1.0
    return peak * min(t / warmup_steps, math.sqrt(warmup_steps / t))


def cooldown_rate(start_rate, num_steps, step):
    """Linear decay from `start_rate` at step 0 towards 0 at `num_steps`.

    Example:

    >>> [cooldown_rate(1.0, 4, i) for i in range(4)]
    [1.0, 0.75, 0.5, 0.25]
    """
    return start_rate * max(0.0, 1.0 - step / num_steps)


@dataclasses.dataclass
class ConvergedTask(Task):
    """What an experiment plugs into `run_seed_converged`.

    A `Task` (same attributes; `batches` also serves the streams
    "cooldown/<i>", the cooldown before the i-th evaluation, shared by every
    arm; `pretrain_steps` is P; `warmup_steps` warms up every schedule that
    starts or re-starts at step 0), plus:

    Attributes:
        cooldown_fraction: FLOPs of each cooldown, as a fraction of P.
        curve_points: evaluations (without cooldown) along the dense
            pre-training, for its learning curve.
        reset_arm: whether to run `upcycled_reset` (state "reset").
        rewarm_arms: whether to run the re-warmed arms.
        tiled_arm: whether to run `dense_tiled` (depth tiling, matched to
            the upcycled step's FLOPs; state and schedule continued).
        gate_metric: the held-out metric of the convergence gate (lower
            is better).
    """

    cooldown_fraction: float = 0.03
    curve_points: int = 5
    reset_arm: bool = False
    rewarm_arms: bool = True
    tiled_arm: bool = False
    gate_metric: str = "nll"

    def rate(self, step):
        """The schedule's learning rate at `step` (from its start)."""
        return inverse_sqrt_rate(self.learning_rate, self.warmup_steps, step)

    def arms(self):
        """The arms this task runs, in `CONVERGED_ARMS` order."""
        skipped = set()
        if not self.reset_arm:
            skipped.add("upcycled_reset")
        if not self.rewarm_arms:
            skipped.update(("dense_rewarm", "upcycled_rewarm"))
        if not self.tiled_arm:
            skipped.add("dense_tiled")
        return tuple(a for a in CONVERGED_ARMS if a not in skipped)


def describe_converged_protocol(task):
    """The schedules and cooldown of `task`, in words."""
    rewarm = (
        " Schedule re-warmed: the schedule starts again at step 0 (a new "
        "warm-up to the peak), the optimizer state is kept."
        if task.rewarm_arms
        else ""
    )
    return (
        "Adam with gradient-norm clipping at 1; learning rate warmed up "
        f"linearly to {task.learning_rate:g} over {task.warmup_steps} "
        "steps, then inverse square-root decay. Schedule continued: the "
        f"dense step count goes on (no second warm-up).{rewarm} Before "
        "every evaluation a branched copy of the arm is cooled down for "
        f"{task.cooldown_fraction:.0%} of P FLOPs (the same for every "
        "arm, outside the budget), its learning rate decaying linearly "
        "from the arm's current rate to 0, on batches shared by every arm "
        "at that budget; the arm then goes on from before the cooldown"
    )


def _fresh_optimizer():
    """Adam with clipping; its float rate is driven by `Trainer`."""
    return keras.optimizers.Adam(learning_rate=0.0, global_clipnorm=1.0)


def run_seed_converged(task, settings, seed, cache):
    """Pre-trains the dense model of one seed and trains every arm of
    `task.arms()` through `settings.budgets`.

    Args:
        task: the `ConvergedTask`.
        settings: the `Settings` (its `optimizer_state` is the upcycled
            arms' state; `reuse_optimizer_state=False` gives them a fresh
            Adam).
        seed: the seed of initialisation, routers and data.
        cache: a dict kept across the seeds (the `TrainerPool`).

    Returns:
        `(rows, curve)`: result rows (one per arm and evaluated budget;
        the re-warmed arms start at +10%, their +0% being the continued
        arms') and the pre-training curve rows.
    """
    pool = cache.setdefault(
        "pool", TrainerPool(task.loss_fn, task.step_flops, task.jit_compile)
    )
    seed_everything(seed)
    trainer = pool.trainer(task.build_dense(), _fresh_optimizer())
    trainer.learning_rate_fn, trainer.schedule_step = task.rate, 0
    curve = _pretrain(task, trainer, seed)
    sunk = trainer.flops
    pretrain_steps = trainer.steps
    context = dict(task=task, settings=settings, seed=seed, sunk=sunk)

    def continued(step):
        return task.rate(pretrain_steps + step)

    dense_start = trainer.snapshot()
    rows = _converged_arm("dense", trainer, continued, **context)
    gate = convergence_gate(rows, task.gate_metric)
    print(f"[{task.name} seed {seed}] {gate['message']}", flush=True)
    trainer.restore(dense_start)
    if task.rewarm_arms:
        rows += _converged_arm(
            "dense_rewarm", trainer, task.rate, **context, start_budget=False
        )
        trainer.restore(dense_start)
    dense = trainer.model
    dense_optimizer = trainer.optimizer

    # Each trainer of the pool owns the first model it was given, so
    # every MoE arm starts from a model of its own.
    moe = upcycling.upcycle(
        dense, **settings.upcycle_kwargs(seed, task.moe_kwargs)
    )
    moe_config = moe.get_config()
    if settings.reuse_optimizer_state:
        moe_optimizer = upcycling.upcycle_optimizer(
            dense_optimizer, dense, moe, state=settings.optimizer_state
        )
    else:
        moe_optimizer = _fresh_optimizer()
    moe_trainer = pool.trainer(moe, moe_optimizer)
    moe_start = moe_trainer.snapshot()
    rows += _converged_arm("upcycled", moe_trainer, continued, **context)
    if task.rewarm_arms:
        moe_trainer.restore(moe_start)
        rows += _converged_arm(
            "upcycled_rewarm",
            moe_trainer,
            task.rate,
            **context,
            start_budget=False,
        )
    del moe, moe_optimizer, moe_start
    if task.reset_arm:
        moe = upcycling.upcycle(
            dense, **settings.upcycle_kwargs(seed, task.moe_kwargs)
        )
        moe_optimizer = upcycling.upcycle_optimizer(
            dense_optimizer, dense, moe, state="reset"
        )
        rows += _converged_arm(
            "upcycled_reset",
            pool.trainer(moe, moe_optimizer),
            continued,
            **context,
        )
        del moe, moe_optimizer
    if task.tiled_arm:
        if "extra_layers" not in cache:
            cache["extra_layers"] = matched_extra_layers(
                dense, moe_trainer.step_flops, task.step_flops
            )
        tiled, name_map = depth_tile(dense, cache["extra_layers"])
        tiled_optimizer = tile_optimizer(
            dense_optimizer, dense, tiled, name_map
        )
        rows += _converged_arm(
            "dense_tiled",
            pool.trainer(tiled, tiled_optimizer),
            continued,
            **context,
        )
        del tiled, tiled_optimizer

    seed_everything(seed + 10_000)
    scratch = pool.trainer(
        type_of_config(moe_config).from_config(moe_config), _fresh_optimizer()
    )
    rows += _converged_arm(
        "moe_scratch",
        scratch,
        task.rate,
        **dict(context, sunk=0),
        pretrain_flops=sunk,
    )
    for row in rows:
        row["gate_drop"] = gate["drop"]
    return rows, curve


def run_seeds_converged(task, settings, seeds):
    """`run_seed_converged` for every seed, one `TrainerPool` for all.

    Returns:
        `(rows, curve)` of every seed.
    """
    cache, rows, curve = {}, [], []
    for seed in seeds:
        tic = time.perf_counter()
        seed_rows, seed_curve = run_seed_converged(task, settings, seed, cache)
        rows += seed_rows
        curve += seed_curve
        print(
            f"[{task.name}] seed {seed} done in "
            f"{time.perf_counter() - tic:.0f} s",
            flush=True,
        )
    return rows, curve


def _pretrain(task, trainer, seed):
    """Dense pre-training with `task.curve_points` evaluations along the
    way (no cooldown): train loss of the interval and held-out metrics."""
    batches = task.batches("pretrain", seed)
    points = max(1, task.curve_points)
    ends = [
        round(task.pretrain_steps * (i + 1) / points) for i in range(points)
    ]
    curve = []
    for end in ends:
        loss = trainer.train(batches, end - trainer.steps)
        metrics = task.evaluate(trainer, seed, -1.0, "dense")
        curve.append(
            {"seed": seed, "step": trainer.steps, "train_loss": loss, **metrics}
        )
        shown = _format_metrics(metrics)
        print(
            f"[{task.name} seed {seed}] dense pre-training step "
            f"{trainer.steps}: train loss {loss:.4f}, held-out {shown} "
            f"({trainer.seconds:.0f} s)",
            flush=True,
        )
    return curve


def _converged_arm(
    arm,
    trainer,
    schedule,
    task,
    settings,
    seed,
    sunk,
    pretrain_flops=None,
    start_budget=True,
):
    """Trains one arm through every budget, evaluating a cooled-down copy
    at each.

    `schedule(i)` is the arm's learning rate at its own step i. `sunk` is
    the compute the arm inherits (P for continuing arms, 0 from scratch);
    its own steps make up the rest of (1 + budget) * P.
    """
    pretrain_flops = sunk if pretrain_flops is None else pretrain_flops
    trainer.learning_rate_fn, trainer.schedule_step = schedule, 0
    batches = task.batches(
        "scratch" if arm == "moe_scratch" else "continue", seed
    )
    start_steps = trainer.steps
    budgets = ((0.0,) if start_budget else ()) + tuple(settings.budgets)
    rows = []
    done = 0
    for budget in budgets:
        own = (1.0 + budget) * pretrain_flops - sunk
        target = steps_for_flops(own, trainer.step_flops)
        loss = trainer.train(batches, target - done)
        done = target
        index = (0.0, *settings.budgets).index(budget)
        tic = time.perf_counter()
        metrics, cooldown_steps = cooled_evaluation(
            trainer, task, seed, budget, arm, index, pretrain_flops
        )
        arm_flops = (trainer.steps - start_steps) * trainer.step_flops
        row = {
            "seed": seed,
            "arm": arm,
            "budget": budget,
            "steps": trainer.steps - start_steps,
            "step_flops": trainer.step_flops,
            "arm_flops": arm_flops,
            "total_flops": sunk + arm_flops,
            "pretrain_flops": pretrain_flops,
            "compute_ratio": (sunk + arm_flops) / pretrain_flops,
            "cooldown_steps": cooldown_steps,
            "cooldown_flops": cooldown_steps * trainer.step_flops,
            "params": trainer.model.count_params(),
            # The mean training loss since the previous evaluation.
            "train_loss": None if math.isnan(loss) else loss,
            **metrics,
            "train_seconds": round(trainer.seconds, 2),
            "eval_seconds": round(time.perf_counter() - tic, 2),
        }
        rows.append(row)
        _print_row(
            task,
            seed,
            arm,
            budget,
            row,
            loss,
            metrics,
            "cooled down: ",
            "cooldown and eval",
        )
    return rows


def cooled_evaluation(trainer, task, seed, budget, arm, index, pretrain_flops):
    """Evaluates a cooled-down branch of `trainer`, then restores it.

    The branch trains for `task.cooldown_fraction * pretrain_flops` FLOPs
    on the "cooldown/<index>" batches, its learning rate decaying linearly
    from the arm's current rate to 0.

    Returns:
        `(metrics, cooldown steps)`.
    """
    saved = trainer.snapshot()
    start_rate = trainer.learning_rate_fn(trainer.schedule_step)
    steps = steps_for_flops(
        task.cooldown_fraction * pretrain_flops, trainer.step_flops
    )
    trainer.learning_rate_fn = functools.partial(
        cooldown_rate, start_rate, max(steps, 1)
    )
    trainer.schedule_step = 0
    trainer.train(task.batches(f"cooldown/{index}", seed), steps)
    metrics = task.evaluate(trainer, seed, budget, arm)
    trainer.restore(saved)
    return metrics, steps


def convergence_gate(dense_rows, metric="nll"):
    """The convergence gate of one seed from its dense-continued rows.

    Returns:
        {"drop": relative drop of `metric` from +0% to +`GATE_BUDGET`
        (None if either is missing), "passed": drop <= `GATE_MAX_DROP`,
        "message": a line for the log}.
    """
    by_budget = {
        r["budget"]: r[metric] for r in dense_rows if r["arm"] == "dense"
    }
    start, later = by_budget.get(0.0), by_budget.get(GATE_BUDGET)
    if start is None or later is None:
        return {
            "drop": None,
            "passed": None,
            "message": f"CONVERGENCE GATE NOT MEASURED: no +0% and "
            f"+{GATE_BUDGET:.0%} dense evaluations",
        }
    drop = (start - later) / start
    passed = drop <= GATE_MAX_DROP
    verdict = (
        "PASSED" if passed else "FAILED (the dense model is NOT converged)"
    )
    return {
        "drop": drop,
        "passed": passed,
        "message": (
            f"CONVERGENCE GATE {verdict}: +{GATE_BUDGET:.0%} dense training "
            f"moved held-out {metric} {start:.4f} -> {later:.4f} "
            f"({-drop:+.1%}; the gate allows a drop of at most "
            f"{GATE_MAX_DROP:.0%})"
        ),
    }


def paired_differences(rows, metric, arm, baseline, lower_is_better):
    """`arm` minus `baseline` of `metric`, paired by seed, per budget.

    Args:
        rows: result rows.
        metric: a metric key.
        arm, baseline: arm names.
        lower_is_better: whether a negative difference is a win of `arm`.

    Returns:
        One dict per budget where both arms have a value for some seed:
        {"budget", "n", "mean", "std" (ddof=1; 0 for one seed),
        "per_seed": [(seed, difference)], "wins": seeds where `arm` is
        better}.
    """
    values = {}
    for row in rows:
        if row["arm"] in (arm, baseline) and row.get(metric) is not None:
            values[(row["arm"], row["budget"], row["seed"])] = float(
                row[metric]
            )
    out = []
    for budget in sorted({key[1] for key in values}):
        per_seed = [
            (
                seed,
                values[(arm, budget, seed)] - values[(baseline, budget, seed)],
            )
            for seed in sorted({key[2] for key in values})
            if (arm, budget, seed) in values
            and (baseline, budget, seed) in values
        ]
        if not per_seed:
            continue
        diffs = np.array([d for _, d in per_seed])
        wins = int(np.sum(diffs < 0 if lower_is_better else diffs > 0))
        out.append(
            {
                "budget": budget,
                "n": len(diffs),
                "mean": float(diffs.mean()),
                "std": float(diffs.std(ddof=1)) if len(diffs) > 1 else 0.0,
                "per_seed": per_seed,
                "wins": wins,
            }
        )
    return out


def paired_table(rows, metric, pairs, lower_is_better, labels, digits=4):
    """Markdown tables of `paired_differences`, one per (arm, baseline)."""
    lines = []
    for arm, baseline in pairs:
        diffs = paired_differences(rows, metric, arm, baseline, lower_is_better)
        if not diffs:
            continue
        table = [
            {
                "budget": f"+{d['budget']:.0%}",
                "mean": common.format_mean_std(d["mean"], d["std"], digits),
                "per_seed": ", ".join(
                    f"{s}: {v:+.{digits}f}" for s, v in d["per_seed"]
                ),
                "wins": f"{d['wins']} of {d['n']}",
            }
            for d in diffs
        ]
        better = "lower" if lower_is_better else "higher"
        lines.append(
            f"**{metric}: {labels[arm]} − {labels[baseline]}** (paired by "
            f"seed; a win is a {better} {metric} for the first)\n"
        )
        lines.append(
            common.markdown_table(
                table,
                ("budget", "mean", "per_seed", "wins"),
                ("extra compute", "mean ± std", "per seed", "wins"),
            )
        )
    return "\n".join(lines)


def cooldown_index(stream):
    """i of a stream name "cooldown/<i>".

    Example:

    >>> cooldown_index("cooldown/3")
    3
    """
    prefix = "cooldown/"
    if isinstance(stream, str) and stream.startswith(prefix):
        index = stream[len(prefix) :]
        if index.isdigit():
            return int(index)
    raise ValueError(
        f"stream must be 'pretrain', 'continue', 'scratch' or "
        f"'cooldown/<i>'; received {stream!r}"
    )


def gates(rows, metric="nll"):
    """{seed: `convergence_gate`} of the dense-continued rows."""
    return {
        seed: convergence_gate([r for r in rows if r["seed"] == seed], metric)
        for seed in sorted({r["seed"] for r in rows})
    }


def curve_table(curve, metrics):
    """Markdown table of the pre-training curve (train loss and `metrics`
    {key: title}), mean ± std over seeds."""
    steps = sorted({row["step"] for row in curve})
    keys = ("train_loss", *metrics)
    table = []
    for step in steps:
        at = [row for row in curve if row["step"] == step]
        cells = {"step": str(step)}
        for key in keys:
            values = np.array([row[key] for row in at], np.float64)
            std = values.std(ddof=1) if len(values) > 1 else 0.0
            cells[key] = common.format_mean_std(values.mean(), std, 4)
        table.append(cells)
    return common.markdown_table(
        table,
        ("step", *keys),
        ("dense step", "train loss (mean of the interval)", *metrics.values()),
    )


def write_converged_outputs(
    output_dir,
    name,
    rows,
    curve,
    task,
    metrics,
    lower_is_better,
    header,
    plot_metrics,
    wall_seconds,
):
    """Writes results.csv, pretrain_curve.csv, results.md and `<name>.png`
    of a `run_seed_converged` experiment.

    Args:
        output_dir: an existing directory.
        name: the experiment name.
        rows, curve: result and pre-training curve rows of every seed.
        task: the `ConvergedTask`.
        metrics: {metric key: title} tabulated (and paired).
        lower_is_better: the metric keys for which lower is better.
        header: Markdown put above the tables (what was run).
        plot_metrics: metric keys plotted (and shown in the curve table).
        wall_seconds: the run's wall time.

    Returns:
        {"files", "summary", "gates"}.
    """
    check_compute_matched(rows)
    arms = task.arms()
    labels = CONVERGED_LABELS
    summary = summarize(rows, tuple(metrics), arms)
    seeds = sorted({row["seed"] for row in rows})
    plot = f"{name}.png"
    paths = [
        f"{output_dir}/results.csv",
        f"{output_dir}/pretrain_curve.csv",
        f"{output_dir}/results.md",
        f"{output_dir}/{plot}",
    ]
    plot_against_compute(
        summary,
        {k: metrics[k] for k in plot_metrics},
        paths[3],
        f"{name}: quality against extra compute, cooled down "
        f"(mean ± std over {len(seeds)} seed(s))",
        arms=arms,
        labels=labels,
    )
    common.write_csv(paths[0], rows)
    common.write_csv(paths[1], curve)
    seed_gates = gates(rows, task.gate_metric)
    gate_lines = [
        f"- seed {seed}: {gate['message']}" for seed, gate in seed_gates.items()
    ]
    failed = [s for s, g in seed_gates.items() if g["passed"] is False]
    if failed:
        gate_lines.insert(
            0,
            f"**WARNING: the convergence gate FAILED for seed(s) {failed}: "
            "the dense model was still improving, so these results do not "
            "test the converged regime.**\n",
        )
    paired = [
        paired_table(
            rows,
            metric,
            [p for p in CONVERGED_PAIRS if set(p) <= set(arms)],
            metric in lower_is_better,
            labels,
        )
        for metric in metrics
    ]
    text = "\n".join(
        [
            f"# {name}\n",
            header,
            f"Seeds: {seeds}. Wall time: {wall_seconds:.0f} s on "
            f"{os.cpu_count()} CPU core(s).\n",
            "## Convergence gate\n",
            "\n".join(gate_lines) + "\n",
            "## Dense pre-training (no cooldown)\n",
            curve_table(curve, {k: metrics[k] for k in plot_metrics}),
            "## Arms\n",
            arm_table(rows, arms, labels),
            "## Results (cooled down)\n",
            results_table(summary, tuple(metrics), arms=arms, labels=labels),
            "## Paired differences\n",
            "\n".join(paired),
            f"![{name}]({plot})\n",
        ]
    )
    write_text(paths[2], text)
    return {"files": paths, "summary": summary, "gates": seed_gates}
