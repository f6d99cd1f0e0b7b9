"""Timing and memory harness: `MoeLayer` against a dense FFN and its peers.

Shape letters: T tokens in the batch, G groups, S tokens per group (T = G*S),
E experts, K experts per token, C expert capacity, D model dim, H hidden dim.

What one measurement is: a training step's forward and backward pass of one
layer, `loss = mean(outputs**2) + sum(layer.losses)` under a
`tf.GradientTape` over the layer's trainable variables, all inside one
`tf.function` (optionally `jit_compile=True` for the whole step). The step
returns the loss and a checksum of every gradient, so no part of the backward
pass can be pruned from the graph, and reading those two scalars waits for the
whole step, also on a GPU. The auxiliary losses are part of the loss for the
same reason: without them their forward ops would be pruned. An evaluation
configuration (`mode="eval"`, names starting `eval_`) times the forward pass
alone, `training=False`, with the MoE layer's `eval_capacity_factor=None`:
evaluation that drops no token.

Every call, warm-up and timed, gets a new standard-normal <float32>[G, S, D]
input (`Inputs`), made before the timer starts, so that a program TF
specialised on one input value cannot be reused and look fast.

The compared layers (`make_configs`):

* `moe_tc_e{E}_k{K}_{dispatcher}`: `keras_moe.layers.MoeLayer`, token-choice
  routing of each token to K of E experts of hidden size H. With the
  `dropless` dispatcher there is no capacity: the experts compute exactly
  the K * T routed tokens. `moe_tc_e{E}_k{K}_dropless_s{S}` is the same at
  another group size S (`group_sizes`); extra E values (`scaling_experts`)
  add dropless rows only, to show the cost as E grows at fixed active FLOPs.
* `moe_ec_e{E}_{dispatcher}`: the same layer with expert-choice routing, the
  like-for-like partner of the Model Garden layer (not for `dropless`, which
  is token choice only).
* `dense_k{K}`: a Keras Dense(K*H, relu) -> Dense(D) MLP: the same expert
  FLOPs per token as a top-K MoE with no token dropped.
* `eval_dense_k{K}`, `eval_moe_tc_e{E}_k{K}_{dispatcher}`: forward passes
  with `training=False` and, for the MoE layer, `eval_capacity_factor=None`
  (no drops; `eval_dispatchers`). With "indices" that means C = S slots per
  expert, E times the dense FFN's expert work; "auto" routes it through the
  dropless dispatcher.
* `mg_ec_e{E}`: Model Garden's `official.nlp.modeling.layers.moe.MoeLayer`
  with `ExpertsChooseMaskedRouter` (its only router) and relu
  `FeedForwardExperts`. It is a Keras 2 (`tf_keras`) layer: it is built and
  called with `tf_keras` objects only and never touches a Keras 3 object. Its
  experts always carry biases; its router's bias is turned off to match ours.
* `mixtral_e{E}_k2`: keras-hub's `MixtralSparseMoeBlock` (gated SiLU experts of
  hidden size H). It runs every expert on every token and weights the results,
  so its cost grows with E, not with K.

Timing (`run_benchmark`): every layer is built and warmed up first (the
first call traces and compiles; `warmup_s` is the time of all warm-up calls),
then `repeats` rounds each time every configuration once, in an order rotated
by one each round, so that slow drifts of the machine (thermal, other
processes) spread over all configurations instead of biasing the last ones.
A record reports the median wall time of its rounds.

Memory: TensorFlow's own allocator statistics,
`tf.config.experimental.get_memory_info(device)`, reset before each timed
step: `peak_step_mb` is the peak of TF-allocated bytes during the step minus
the bytes allocated just before it (weights and inputs), i.e. the step's
activations, gradients and temporaries, XLA buffers included. It counts
tensors, not process pages, so it is exact per configuration in a shared
process. On `GPU:0` the BFC allocator counts every tensor. On `CPU:0` (probed
on TF 2.20 with oneDNN) only allocations of 256 KiB or more are counted:
smaller ones come from a separate small-object pool. At the default shapes
every activation is megabytes, so the figure is the step's working set; at
`--quick` shapes it is mostly null ("unavailable": nothing large enough was
allocated). Memory allocated outside TF's allocator (oneDNN scratch pads,
XLA's compiler, Python objects) is never seen.

As a process-level cross-check, `isolate_memory=True` (CPU, Linux) also
runs each configuration in a fresh subprocess and reports
`isolated_peak_rss_mb`: the growth of the process's peak RSS (`VmHWM`, reset
through `/proc/self/clear_refs`) from before the layer is built to after
warm-up and one step, i.e. weights, gradients, step memory, tracing and
compilation. A process per configuration is needed because the peak of a
process mixes every configuration it ran. The subprocess first runs a tiny
fwd+bwd step with and without XLA, so that TensorFlow's one-time start-up
(thread pools, oneDNN, XLA: 10-50 MB here) is not charged to the layer, and
runs with glibc's mmap threshold fixed at 64 KiB, so that freed tensors go
back to the OS instead of a heap cache that would hide later peaks.
"""

import dataclasses
import fnmatch
import json
import math
import os
import pathlib
import re
import statistics
import subprocess
import sys
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from keras_moe.utils.checks import check_int
from keras_moe.utils.checks import check_positive_int

KINDS = ("moe", "dense", "model_garden", "mixtral")
DISPATCHERS = ("einsum", "indices", "dropless", "auto")
MODES = ("train", "eval")
DROPLESS = "dropless"
MIXTRAL_TOP_K = 2


@dataclasses.dataclass(frozen=True)
class Shapes:
    """Problem size shared by every configuration of one run.

    Attributes:
        tokens: T, tokens in the batch.
        group_size: S, tokens per routing group; must divide T.
        model_dim: D.
        hidden_dim: H, hidden size of one expert (and of the dense baseline
            per selected expert).
        capacity_factor: train capacity factor of the MoE layers.
    """

    tokens: int = 8192
    group_size: int = 4096
    model_dim: int = 256
    hidden_dim: int = 1024
    capacity_factor: float = 1.25

    def __post_init__(self):
        for name in ("tokens", "group_size", "model_dim", "hidden_dim"):
            value = check_int(name, getattr(self, name), minimum=None)
            if value <= 0:
                raise ValueError(f"{name} must be positive; received {value}")
        if self.tokens % self.group_size:
            raise ValueError(
                f"group_size={self.group_size} must divide "
                f"tokens={self.tokens}"
            )
        if not self.capacity_factor > 0:
            raise ValueError(
                "capacity_factor must be > 0; received "
                f"{self.capacity_factor!r}"
            )

    @property
    def num_groups(self):
        return self.tokens // self.group_size


# Tiny shapes for tests and smoke runs.
QUICK_SHAPES = Shapes(
    tokens=128, group_size=64, model_dim=16, hidden_dim=32, capacity_factor=1.25
)


@dataclasses.dataclass(frozen=True)
class Config:
    """One layer to time. `name` is unique within a run.

    `group_size` None means the run's `Shapes.group_size`; `mode` is
    "train" (forward and backward) or "eval" (forward, no drops).
    """

    name: str
    kind: str
    num_experts: int | None = None
    num_selected: int | None = None
    router: str | None = None
    dispatcher: str | None = None
    group_size: int | None = None
    mode: str = "train"


def _token_choice(e, k, d, group_size=None, mode="train"):
    prefix = "eval_" if mode == "eval" else ""
    suffix = "" if group_size is None else f"_s{group_size}"
    return Config(
        f"{prefix}moe_tc_e{e}_k{k}_{d}{suffix}",
        "moe",
        num_experts=e,
        num_selected=k,
        router="tokens_choose",
        dispatcher=d,
        group_size=group_size,
        mode=mode,
    )


def make_configs(
    num_experts,
    num_selected,
    dispatchers,
    group_sizes=(),
    eval_dispatchers=(),
    scaling_experts=(),
):
    """All configurations for the given E, K and dispatcher lists.

    Args:
        num_experts: iterable of E.
        num_selected: iterable of K for token-choice routing (and the dense
            baselines of hidden size K*H).
        dispatchers: iterable of `MoeLayer` dispatcher names.
        group_sizes: more group sizes S at which the dropless token-choice
            rows are timed (when "dropless" is among `dispatchers`).
        eval_dispatchers: dispatchers of the no-drop evaluation rows (none:
            no evaluation rows).
        scaling_experts: more E values, for dropless token-choice rows only
            (when "dropless" is among `dispatchers`).

    Returns:
        A list of `Config`, dense baselines first, then per E: token choice,
        expert choice, Model Garden and Mixtral; then the dropless rows at
        the extra group sizes, the scaling rows and the evaluation rows.
    """
    num_experts = _positive_ints("num_experts", num_experts)
    num_selected = _positive_ints("num_selected", num_selected)
    dispatchers = _dispatchers("dispatchers", dispatchers)
    if not dispatchers:
        raise ValueError("dispatchers must not be empty")
    eval_dispatchers = _dispatchers("eval_dispatchers", eval_dispatchers)
    group_sizes = _positive_ints("group_sizes", group_sizes, empty_ok=True)
    scaling_experts = [
        e
        for e in _positive_ints(
            "scaling_experts", scaling_experts, empty_ok=True
        )
        if e not in num_experts
    ]
    for e in num_experts + scaling_experts:
        for k in num_selected:
            if k > e:
                raise ValueError(
                    f"num_selected={k} is larger than num_experts={e}"
                )
    configs = [
        Config(f"dense_k{k}", "dense", num_selected=k) for k in num_selected
    ]
    for e in num_experts:
        for k in num_selected:
            for d in dispatchers:
                configs.append(_token_choice(e, k, d))
        for d in dispatchers:
            if d == DROPLESS:
                continue  # token choice only
            configs.append(
                Config(
                    f"moe_ec_e{e}_{d}",
                    "moe",
                    num_experts=e,
                    router="experts_choose",
                    dispatcher=d,
                )
            )
        configs.append(
            Config(
                f"mg_ec_e{e}",
                "model_garden",
                num_experts=e,
                router="experts_choose",
            )
        )
        if e >= MIXTRAL_TOP_K:
            configs.append(
                Config(
                    f"mixtral_e{e}_k{MIXTRAL_TOP_K}",
                    "mixtral",
                    num_experts=e,
                    num_selected=MIXTRAL_TOP_K,
                )
            )
    if DROPLESS in dispatchers:
        for s in group_sizes:
            for e in num_experts:
                for k in num_selected:
                    configs.append(_token_choice(e, k, DROPLESS, s))
        for e in scaling_experts:
            for k in num_selected:
                configs.append(_token_choice(e, k, DROPLESS))
    if eval_dispatchers:
        configs += [
            Config(f"eval_dense_k{k}", "dense", num_selected=k, mode="eval")
            for k in num_selected
        ]
        for e in num_experts:
            for k in num_selected:
                for d in eval_dispatchers:
                    configs.append(_token_choice(e, k, d, mode="eval"))
    return configs


def _dispatchers(name, values):
    values = list(dict.fromkeys(values))
    for d in values:
        if d not in DISPATCHERS:
            raise ValueError(
                f"{name} must be among {DISPATCHERS}; received {d!r}"
            )
    return values


def filter_configs(configs, patterns):
    """Keeps the configs whose name or kind matches a pattern (fnmatch).

    An empty `patterns` keeps everything. A pattern that matches nothing is an
    error, so a typo cannot silently shrink a run.
    """
    patterns = [p.strip() for p in patterns if p.strip()]
    if not patterns:
        return list(configs)
    kept, unused = [], []
    for pattern in patterns:
        if not any(_matches(c, pattern) for c in configs):
            unused.append(pattern)
    if unused:
        names = ", ".join(c.name for c in configs)
        raise ValueError(
            f"configs patterns {unused} match no configuration; "
            f"kinds: {', '.join(KINDS)}; names: {names}"
        )
    for config in configs:
        if any(_matches(config, p) for p in patterns):
            kept.append(config)
    return kept


def _matches(config, pattern):
    return config.kind == pattern or fnmatch.fnmatchcase(config.name, pattern)


def default_device():
    """`"GPU:0"` when TensorFlow sees a GPU, else `"CPU:0"`."""
    return "GPU:0" if tf.config.list_physical_devices("GPU") else "CPU:0"


# ---------------------------------------------------------------------------
# Layer builders. Each returns a `_Built`: `forward(x)` -> (outputs, aux loss)
# for x <float32>[G, S, D], the variables to differentiate, and facts for the
# record.


@dataclasses.dataclass
class _Built:
    forward: object
    variables: list
    info: dict


class SkippedConfig(Exception):
    """A peer library is missing or cannot build the layer."""


def _build_moe(config, shapes, moe_jit_compile):
    try:
        from keras_moe.layers import MoeLayer
        from keras_moe.layers.routing import expert_capacity
    except ImportError as e:
        raise SkippedConfig(f"keras_moe.layers.MoeLayer: {e}") from e
    kwargs = {}
    if moe_jit_compile is not None:
        kwargs["jit_compile"] = moe_jit_compile
    if config.router == "tokens_choose":
        kwargs["num_selected_experts"] = config.num_selected
    group_size = config.group_size or shapes.group_size
    # Evaluation rows drop no token: eval_capacity_factor=None.
    factor = shapes.capacity_factor if config.mode == "train" else None
    layer = MoeLayer(
        num_experts=config.num_experts,
        hidden_dim=shapes.hidden_dim,
        router=config.router,
        train_capacity_factor=shapes.capacity_factor,
        eval_capacity_factor=None,
        group_size=group_size,
        activation="relu",
        dispatcher=config.dispatcher,
        **kwargs,
    )
    capacity = expert_capacity(
        num_tokens=group_size,
        num_experts=config.num_experts,
        capacity_factor=factor,
        num_selected_experts=config.num_selected or 1,
        router=config.router,
    )
    dropless = layer.dispatches_dropless(training=config.mode == "train")
    info = {
        "expert_capacity": None if dropless else capacity,
        "dropless": dropless,
    }
    return _keras3_built(layer, shapes, info)


def _build_dense(config, shapes):
    layer = keras.Sequential(
        [
            keras.layers.Dense(
                config.num_selected * shapes.hidden_dim,
                activation="relu",
                use_bias=False,
                name="wi",
            ),
            keras.layers.Dense(shapes.model_dim, use_bias=False, name="wo"),
        ],
        name=config.name,
    )
    return _keras3_built(
        layer,
        shapes,
        {"ffn_hidden_dim": config.num_selected * shapes.hidden_dim},
    )


def _build_mixtral(config, shapes):
    try:
        from keras_hub.src.models.mixtral.mixtral_decoder import (
            MixtralSparseMoeBlock,
        )
    except Exception as e:  # any import failure means "not available here"
        raise SkippedConfig(f"keras_hub MixtralSparseMoeBlock: {e!r}") from e
    layer = MixtralSparseMoeBlock(
        hidden_dim=shapes.model_dim,
        intermediate_dim=shapes.hidden_dim,
        num_experts=config.num_experts,
        top_k=config.num_selected,
    )
    # It returns (outputs, router_logits); only the outputs feed the loss.
    return _keras3_built(layer, shapes, {}, first_output=True)


def _keras3_built(layer, shapes, info, first_output=False):
    layer.build((shapes.num_groups, shapes.group_size, shapes.model_dim))

    def forward(x, training=True):
        y = layer(x, training=training)
        if first_output:
            y = y[0]
        return y, _sum_losses(layer.losses)

    return _Built(forward, list(layer.trainable_variables), info)


def _build_model_garden(config, shapes):
    try:
        import tf_keras
        from official.nlp.modeling.layers import moe as mg_moe
    except Exception as e:
        raise SkippedConfig(f"official.nlp.modeling.layers.moe: {e!r}") from e
    experts = mg_moe.FeedForwardExperts(
        num_experts=config.num_experts,
        d_ff=shapes.hidden_dim,
        activation=tf_keras.activations.relu,
    )
    router = mg_moe.ExpertsChooseMaskedRouter(
        num_experts=config.num_experts, use_bias=False, export_metrics=False
    )
    # One example = one group of S tokens, as in the other layers.
    layer = mg_moe.MoeLayer(
        experts,
        router,
        train_capacity_factor=shapes.capacity_factor,
        eval_capacity_factor=shapes.capacity_factor,
        examples_per_group=1.0,
    )
    # tf_keras builds on first call; an eager call creates the variables.
    layer(
        tf.zeros((shapes.num_groups, shapes.group_size, shapes.model_dim)),
        training=True,
    )

    def forward(x, training=True):
        y = layer(x, training=training)
        return y, _sum_losses(layer.losses)

    capacity = int(
        round(shapes.capacity_factor * shapes.group_size / config.num_experts)
    )
    return _Built(
        forward, list(layer.trainable_variables), {"expert_capacity": capacity}
    )


def _sum_losses(losses):
    losses = [tf.cast(loss, tf.float32) for loss in losses]
    return tf.add_n(losses) if losses else tf.constant(0.0)


def build(config, shapes, moe_jit_compile=None):
    """Builds one configuration's layer. Raises `SkippedConfig`."""
    if config.kind == "moe":
        return _build_moe(config, shapes, moe_jit_compile)
    if config.kind == "dense":
        return _build_dense(config, shapes)
    if config.kind == "model_garden":
        return _build_model_garden(config, shapes)
    if config.kind == "mixtral":
        return _build_mixtral(config, shapes)
    raise ValueError(f"kind must be one of {KINDS}; received {config.kind!r}")


def make_step(built, jit_compile, mode="train"):
    """The timed step as one `tf.function`: forward, loss, backward
    (`mode="train"`) or the forward pass alone (`mode="eval"`)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; received {mode!r}")
    step = _Step(built) if mode == "train" else _EvalStep(built)
    return tf.function(step, jit_compile=jit_compile)


class _Step:
    """`x` -> (loss, checksum of all gradients).

    A callable object rather than a closure: TensorFlow's retracing warning
    keys on a function's code object, which every closure made here would
    share, so each configuration's single trace would count as a retrace.
    """

    def __init__(self, built):
        self.built = built

    def __call__(self, x):
        variables = self.built.variables
        with tf.GradientTape() as tape:
            y, aux = self.built.forward(x)
            loss = tf.reduce_mean(tf.square(tf.cast(y, tf.float32))) + aux
        grads = tape.gradient(loss, variables)
        sums = [
            tf.reduce_sum(tf.cast(g, tf.float32))
            for g in grads
            if g is not None
        ]
        if not sums:
            raise ValueError("the loss has no gradient for any variable")
        return loss, tf.add_n(sums)


class _EvalStep:
    """`x` -> (mean of squared outputs, twice): an inference forward pass."""

    def __init__(self, built):
        self.built = built

    def __call__(self, x):
        y, _ = self.built.forward(x, training=False)
        loss = tf.reduce_mean(tf.square(tf.cast(y, tf.float32)))
        return loss, loss


def ffn_gflop_fwd(config, shapes, capacity=None):
    """Nominal FFN matmul GFLOP of one forward pass (routing/dispatch excluded).

    Token choice counts K choices per token (no drops); expert choice and Model
    Garden count the G*E*C filled slots; Mixtral computes all E experts, each
    with three [D, H] matmuls.
    """
    t, d, h = shapes.tokens, shapes.model_dim, shapes.hidden_dim
    if config.kind == "dense" or config.router == "tokens_choose":
        work = 4 * t * config.num_selected * d * h
    elif config.kind == "mixtral":
        work = 6 * t * config.num_experts * d * h
    else:
        work = 4 * shapes.num_groups * config.num_experts * capacity * d * h
    return work / 1e9


# ---------------------------------------------------------------------------
# Running.


def _memory_info(device):
    try:
        return tf.config.experimental.get_memory_info(device)
    except (ValueError, RuntimeError, tf.errors.OpError):
        return None


def _reset_memory(device):
    try:
        tf.config.experimental.reset_memory_stats(device)
        return True
    except (ValueError, RuntimeError, tf.errors.OpError):
        return False


def _run_step(step, x):
    start = time.perf_counter()
    loss, checksum = step(x)
    # Fetching both outputs waits for the whole step, GPU included.
    loss, checksum = float(loss.numpy()), float(checksum.numpy())
    seconds = time.perf_counter() - start
    if not (math.isfinite(loss) and math.isfinite(checksum)):
        raise FloatingPointError(
            f"non-finite step outputs: loss={loss}, grad checksum={checksum}"
        )
    return seconds


class Inputs:
    """A fresh <float32>[G, S, D] standard-normal input for every call.

    Never the same tensor twice: TF may make a step's inputs compile-time
    constants of an XLA program (it does for a `jit_compile` function nested
    in another, see `run_benchmark`) and then caches one program per input
    value, constant-folded. Reusing one input would time that folded program;
    a new input makes such a step pay its recompilation, as it would in
    training. Each tensor is made before its timer starts.
    """

    def __init__(self, shapes, seed=0):
        self.shape = (shapes.num_groups, shapes.group_size, shapes.model_dim)
        self.seed = seed
        self.count = 0

    def next(self):
        self.count += 1
        return tf.random.stateless_normal(
            self.shape, seed=(self.seed, self.count)
        )


def run_benchmark(
    configs,
    shapes,
    repeats=10,
    warmup=2,
    jit_compile=False,
    moe_jit_compile=None,
    device=None,
    isolate_memory=False,
    seed=0,
):
    """Times every configuration; returns `(records, ratios)`.

    Args:
        configs: list of `Config` (see `make_configs`, `filter_configs`).
        shapes: `Shapes`.
        repeats: timed rounds; each round times every configuration once.
        warmup: untimed calls per configuration before the rounds (the first
            one traces and compiles).
        jit_compile: XLA-compile each whole step.
        moe_jit_compile: `MoeLayer(jit_compile=...)`. None keeps the layer's
            default, except under `jit_compile`, where it means False: the
            layer's own `tf.function(jit_compile=True)` nested in a
            whole-step XLA function makes TF 2.20 turn the step's inputs and
            weights into compile-time constants, so the step recompiles (and
            constant-folds the forward pass) for every new input or weight
            value. Pass True to measure exactly that.
        device: e.g. `"CPU:0"` or `"GPU:0"`; None picks `default_device()`.
        isolate_memory: also measure peak RSS of each configuration in a fresh
            subprocess (CPU only; see the module docstring).
        seed: seed of the weights and of the input.

    Returns:
        `records`: one dict per configuration, in `configs` order (a skipped
        one is `{"name": ..., "skipped": reason}`); `ratios`: see `ratios`.
    """
    if repeats < 1 or warmup < 1:
        raise ValueError(
            f"repeats and warmup must be >= 1; received repeats={repeats}, "
            f"warmup={warmup}"
        )
    names = [c.name for c in configs]
    if len(set(names)) != len(names):
        raise ValueError(f"configuration names repeat: {names}")
    for config in configs:
        if config.group_size and shapes.tokens % config.group_size:
            raise ValueError(
                f"{config.name}: group_size={config.group_size} must divide "
                f"tokens={shapes.tokens}"
            )
    device = device or default_device()
    if not re.fullmatch(r"(CPU|GPU):\d+", device):
        raise ValueError(
            f"device must look like 'CPU:0' or 'GPU:0'; received {device!r}"
        )
    if isolate_memory and device.startswith("GPU"):
        raise ValueError(
            "isolate_memory measures process RSS and is for CPU runs only; "
            "on GPU the allocator's peak is exact per configuration"
        )
    if moe_jit_compile is None and jit_compile:
        moe_jit_compile = False
    keras.utils.set_random_seed(seed)
    common = {
        "tokens": shapes.tokens,
        "group_size": shapes.group_size,
        "model_dim": shapes.model_dim,
        "hidden_dim": shapes.hidden_dim,
        "capacity_factor": shapes.capacity_factor,
        "jit_compile": bool(jit_compile),
        "moe_jit_compile": moe_jit_compile,
        "device": device,
        "repeats": repeats,
        "warmup": warmup,
    }
    records, steps = {}, {}
    with tf.device(device):
        inputs = Inputs(shapes, seed)
        for config in configs:
            try:
                if jit_compile and config.dispatcher == DROPLESS:
                    raise SkippedConfig(
                        "dropless dispatch cannot run inside a whole-step "
                        "XLA function (run-time expert group sizes)"
                    )
                built = build(config, shapes, moe_jit_compile)
            except SkippedConfig as e:
                logging.warning("skipping %s: %s", config.name, e)
                records[config.name] = {"name": config.name, "skipped": str(e)}
                continue
            step = make_step(built, jit_compile, config.mode)
            start = time.perf_counter()
            for _ in range(warmup):
                _run_step(step, inputs.next())
            warmup_s = time.perf_counter() - start
            logging.info("%s warm (%.1f s)", config.name, warmup_s)
            steps[config.name] = step
            records[config.name] = _base_record(
                config, shapes, built, common, warmup_s
            )
        timed = [c.name for c in configs if c.name in steps]
        times = {name: [] for name in timed}
        peaks = {name: [] for name in timed}
        for round_index in range(repeats):
            shift = round_index % max(len(timed), 1)
            for name in timed[shift:] + timed[:shift]:
                _reset_memory(device)
                before = _memory_info(device)
                x = inputs.next()
                times[name].append(_run_step(steps[name], x))
                after = _memory_info(device)
                if before is not None and after is not None and after["peak"]:
                    peaks[name].append(after["peak"] - before["current"])
            logging.info("round %d/%d done", round_index + 1, repeats)
    for name in timed:
        ms = [1e3 * t for t in times[name]]
        records[name].update(
            median_ms=statistics.median(ms),
            min_ms=min(ms),
            max_ms=max(ms),
            times_ms=[round(t, 3) for t in ms],
        )
        if peaks[name]:
            records[name]["peak_step_mb"] = max(peaks[name]) / 2**20
            records[name]["memory_source"] = f"tf_allocator:{device}"
        else:
            records[name]["peak_step_mb"] = None
            records[name]["memory_source"] = "unavailable"
    if isolate_memory:
        for config in configs:
            if config.name in steps:
                records[config.name]["isolated_peak_rss_mb"] = (
                    measure_isolated_rss(
                        config, shapes, jit_compile, moe_jit_compile, warmup
                    )
                )
    records = [records[c.name] for c in configs]
    return records, ratios(records)


def _base_record(config, shapes, built, common, warmup_s):
    record = {
        "name": config.name,
        "kind": config.kind,
        "router": config.router,
        "num_experts": config.num_experts,
        "num_selected": config.num_selected,
        "dispatcher": config.dispatcher,
        **common,
        "group_size": config.group_size or shapes.group_size,
        "mode": config.mode,
        **built.info,
        "params": int(sum(np.prod(v.shape) for v in built.variables)),
        "ffn_gflop_fwd": ffn_gflop_fwd(
            config, shapes, built.info.get("expert_capacity")
        ),
        "warmup_s": warmup_s,
    }
    return record


def ratios(records):
    """Time (and memory) ratios between configurations of one run.

    * every `moe_tc_e{E}_k{K}_{d}[_s{S}]` over `dense_k{K}` (equal expert
      FLOPs), and every `eval_moe_tc_e{E}_k{K}_{d}` over `eval_dense_k{K}`;
    * `mg_ec_e{E}` over `moe_ec_e{E}_{d}` (same routing and capacity);
    * `mixtral_e{E}_k2` over `moe_tc_e{E}_k2_{d}` (run's group size).

    `time` is the ratio of median times; `time_min` the ratio of the
    fastest rounds, the figure least disturbed when other processes share
    the machine for part of the run (they only ever slow a round down).
    A ratio whose two sides were not both timed is left out.
    """
    timed = {r["name"]: r for r in records if "median_ms" in r}
    pairs = []
    for r in timed.values():
        if r["kind"] != "moe":
            continue
        if r.get("mode") == "eval":
            pairs.append((r["name"], f"eval_dense_k{r['num_selected']}"))
        elif r["router"] == "tokens_choose":
            pairs.append((r["name"], f"dense_k{r['num_selected']}"))
            if r["num_selected"] == MIXTRAL_TOP_K and re.fullmatch(
                r"moe_tc_e\d+_k\d+_[a-z]+", r["name"]
            ):
                pairs.append(
                    (f"mixtral_e{r['num_experts']}_k{MIXTRAL_TOP_K}", r["name"])
                )
        else:
            pairs.append((f"mg_ec_e{r['num_experts']}", r["name"]))
    out = []
    for num, den in pairs:
        if num not in timed or den not in timed:
            continue
        line = {
            "ratio": f"{num}/{den}",
            "numerator": num,
            "denominator": den,
            "time": timed[num]["median_ms"] / timed[den]["median_ms"],
            "time_min": timed[num]["min_ms"] / timed[den]["min_ms"],
        }
        mem_num = timed[num].get("peak_step_mb")
        mem_den = timed[den].get("peak_step_mb")
        if mem_num and mem_den:
            line["memory"] = mem_num / mem_den
        out.append(line)
    return out


# ---------------------------------------------------------------------------
# Isolated peak RSS: one fresh process per configuration.


def measure_isolated_rss(config, shapes, jit_compile, moe_jit_compile, warmup):
    """Peak RSS growth (MiB) of building and stepping `config` in a new process.

    Returns None (and logs why) when the subprocess fails.
    """
    spec = {
        "config": dataclasses.asdict(config),
        "shapes": dataclasses.asdict(shapes),
        "jit_compile": bool(jit_compile),
        "moe_jit_compile": moe_jit_compile,
        "warmup": warmup,
    }
    root = pathlib.Path(__file__).resolve().parents[1]
    env = dict(os.environ)
    env.update(
        CUDA_VISIBLE_DEVICES="",
        TF_CPP_MIN_LOG_LEVEL="2",
        KERAS_BACKEND="tensorflow",
        # A fixed threshold also stops glibc from raising it as big blocks are
        # freed, which would keep freed tensors in the heap.
        MALLOC_MMAP_THRESHOLD_="65536",
        PYTHONPATH=os.pathsep.join(
            p for p in (str(root), env.get("PYTHONPATH")) if p
        ),
    )
    code = "import benchmarks.moe_layer as b; b._isolated_rss_worker()"
    result = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps(spec),
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if result.returncode != 0:
        logging.warning(
            "isolated memory run of %s failed:\n%s",
            config.name,
            result.stderr[-2000:],
        )
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def _proc_status_bytes(field):
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    raise OSError(f"no {field} in /proc/self/status")


def _isolated_rss_worker():
    spec = json.loads(sys.stdin.read())
    config = Config(**spec["config"])
    shapes = Shapes(**spec["shapes"])
    keras.utils.set_random_seed(0)
    inputs = Inputs(shapes)
    _warm_runtime()
    # Linux's per-process peak (VmHWM), reset here so that it starts from the
    # current RSS. Not getrusage's ru_maxrss: that one survives exec, so a
    # child started by a big parent inherits the parent's peak.
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")
    before = _proc_status_bytes("VmRSS")
    built = build(config, shapes, spec["moe_jit_compile"])
    step = make_step(built, spec["jit_compile"], config.mode)
    for _ in range(spec["warmup"] + 1):
        _run_step(step, inputs.next())
    peak = (_proc_status_bytes("VmHWM") - before) / 2**20
    print(json.dumps({"peak_rss_mb": peak}))


def _warm_runtime():
    """Pays TF's one-time costs (thread pools, oneDNN, XLA) before measuring.

    Without this, every isolated figure carries 10-50 MB of one-time start-up
    (measured here), which is not the configuration's memory.
    """
    dense = keras.layers.Dense(4)
    dense.build((8, 4))
    for jit_compile in (False, True):

        @tf.function(jit_compile=jit_compile)
        def tiny_step(x):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(dense(x))
            return tape.gradient(loss, dense.trainable_variables)

        tiny_step(tf.ones((8, 4)))


def _positive_ints(name, values, empty_ok=False):
    values = list(dict.fromkeys(values))
    if not values and not empty_ok:
        raise ValueError(f"{name} must not be empty")
    for value in values:
        check_positive_int(name, value)
    return values
