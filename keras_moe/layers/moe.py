"""MoeLayer: a sparse Mixture-of-Experts replacement for the transformer MLP.

Shape letters: G groups, S tokens per group (`group_size`), E experts,
K experts per token, C expert capacity, D model dimension, H hidden dimension,
M ensemble members (1 here; see `EnsembleMoeLayer`).

Data flow of one call, for inputs <[..., D]>:

    tokens <[..., D]> -> groups <[G, S, D]>            (grouping, padding)
    router            -> RoutingInstructions <[G, E, C]>
    dispatcher        -> slots <[G, E, C, D]> -> <[E, G*C, D]>
    experts           -> <[E, G*C, D]> -> <[G, E, C, D]>
    dispatcher        -> combined <[G, S, D]> -> outputs <[..., D]>

Dropless dispatch (no capacity) replaces the middle three steps:

    router            -> DroplessRoutingInstructions <[G, S, K]>
    dispatcher        -> rows <[G*S*K, D]> sorted by expert, group sizes <[E]>
    experts           -> each expert's MLP on exactly its rows
    dispatcher        -> combined <[G, S, D]>

The router and the experts are sublayers called through Keras' `__call__`.
An E^3 ensemble (`EnsembleMoeLayer`) runs the same steps with M member-major
groups <[M*G, S, D]>, each member routing among its E/M experts; the steps
here are written for any M.

With `jit_compile=True`, routing + dispatch and the combine each run inside
a `tf.function(jit_compile=True)` (XLA), so that they compile even when the
training step cannot (MirroredStrategy with several replicas). The experts
run between them on TensorFlow's own batched-matmul kernels. Auxiliary
losses are returned from the compiled function and added with `add_loss`
outside, because `add_loss` must not run inside a nested compiled function;
the routing statistics likewise update metric trackers outside. When the
layer is already traced inside an XLA function (`compile(jit_compile=True)`)
the nested functions are skipped: XLA compiles the whole step. Dropless
dispatch cannot run there (its expert groups have run-time sizes): a layer
with `dispatcher="dropless"` reports `supports_jit = False`, so Keras'
`compile(jit_compile="auto")` (and an explicit `jit_compile=True`, with a
warning) compiles the step without XLA, and the layer raises a ValueError
when it is traced inside an XLA function anyway; `dispatcher="auto"` falls
back to capacity dispatch there.
"""

import keras
import tensorflow as tf
from keras import ops

from keras_moe.layers import dispatch as dispatch_lib
from keras_moe.layers import routing
from keras_moe.layers.experts import Experts
from keras_moe.layers.mlp import get_activation
from keras_moe.layers.routers import ExpertsChooseRouter
from keras_moe.layers.routers import TokensChooseRouter
from keras_moe.layers.routers import check_router_arguments
from keras_moe.utils.checks import check_positive_int


def _use_xla(jit_compile):
    """Whether routing and dispatch get their own XLA functions."""
    if keras.backend.backend() != "tensorflow":
        return False
    if jit_compile == "auto":
        return bool(
            tf.config.list_logical_devices("TPU")
            or tf.config.list_logical_devices("GPU")
        )
    return bool(jit_compile)


def default_dispatcher():
    """The faster capacity dispatcher for the devices TensorFlow sees.

    "einsum" on TPU (dense matmuls are what the MXU does best), "indices"
    elsewhere: on CPU and GPU gathering rows beats one-hot contractions
    whose cost grows with the group size. (`MoeLayer(dispatcher="auto")`
    also routes no-drop modes through the dropless dispatcher; see
    `MoeLayer.dispatches_dropless`.) "einsum", written with `keras.ops`
    only, on Keras' other backends.
    """
    if keras.backend.backend() != "tensorflow":
        return "einsum"
    if tf.config.list_logical_devices("TPU"):
        return "einsum"
    return "indices"


class ExpertLoad(keras.metrics.Metric):
    """Mean share of the filled slots that each expert received.

    `result()` is the scalar `max_e share_e * E` (1.0 when balanced) so that
    `fit` can log it; `usage()` is the <float32>[E] vector of shares.
    """

    def __init__(self, num_experts, name="max_load", **kwargs):
        super().__init__(name=name, **kwargs)
        self.num_experts = num_experts
        self.total = self.add_variable(
            shape=(num_experts,), initializer="zeros", name="total"
        )
        self.count = self.add_variable(
            shape=(), initializer="zeros", name="count"
        )

    def update_state(self, usage):
        self.total.assign_add(ops.cast(usage, self.dtype))
        self.count.assign_add(ops.cast(1, self.dtype))

    def usage(self):
        return self.total / ops.maximum(self.count, 1.0)

    def result(self):
        return ops.max(self.usage()) * self.num_experts

    def get_config(self):
        return {"num_experts": self.num_experts, **super().get_config()}


# Values of `to` for `MoeLayer.relayout_hook(rows, to)`.
RELAYOUT_TO_EXPERTS = "experts"
RELAYOUT_TO_TOKENS = "tokens"


@keras.saving.register_keras_serializable(package="keras_moe")
class MoeLayer(keras.layers.Layer):
    """Sparse Mixture-of-Experts MLP block.

    Tokens are split into groups of `group_size`; within each group a router
    assigns tokens to expert slots, each expert (an MLP) processes its slots,
    and the outputs are added back weighted by the router. A token that no
    expert takes gets zeros (in a transformer the residual connection carries
    it). Padding tokens (`token_mask` False, or the padding added to fill the
    last group) are never routed and take no capacity.

    Capacity per expert and group is
    `ceil(K * S * capacity_factor / E)` for token choice and
    `ceil(S * capacity_factor / E)` for expert choice, floored at
    `min_expert_capacity` and capped at S; `train_capacity_factor` applies
    when `training=True`, `eval_capacity_factor` otherwise, and a capacity
    factor of None means no token is dropped (C = S).

    Dispatch. `"einsum"` (one-hot contractions) and `"indices"` (gather and
    segment sum) fill expert slots up to the capacity and give the same
    outputs and gradients. `"dropless"` (token choice only) has no
    capacity: tokens are sorted by expert and each expert's MLP runs on
    exactly its tokens, so no token is dropped and the experts cost the
    K * tokens routed, not E * C slots; the capacity factors and
    `min_expert_capacity` are then ignored. It runs eagerly, in
    `tf.function`, in `fit` and under `tf.distribute` strategies, but not
    inside an XLA-compiled step (its expert groups have run-time sizes):
    such a layer reports `supports_jit = False`, which Keras' `compile`
    heeds, and raises a ValueError when traced under XLA anyway. The
    layer's own `jit_compile=True` still compiles routing and dispatch.
    `"auto"` (default) picks per mode (`dispatches_dropless`): dropless
    where the mode's capacity factor is None and the router is token
    choice (the same outputs as C = S slots, at the cost of the routed
    tokens instead of E times it), except under XLA, on TPU or with a
    `relayout_hook`; otherwise `"einsum"` on TPU and `"indices"` elsewhere.
    A capacity factor changes outputs (drops), so "auto" never trades it
    for speed.

    Auxiliary losses (`add_loss`, weighted): router z-loss, Switch
    load-balancing loss (token choice), V-MoE importance and load losses
    (token choice; load only with `noise_std > 0`). Routing statistics are
    tracked as metrics named `<prefix>_dropped` (fraction of real tokens
    no expert took), `<prefix>_confidence` (mean top router probability)
    and `<prefix>_max_load` (largest mean expert share times E; 1.0 is
    perfectly balanced). The prefix is the layer's position in its model
    when it is nested (`encoder_block_3_moe` for `t5/encoder/block_3/mlp`;
    `block_1_moe` in a ViT), so that `fit`'s logs and History keep one set
    per MoE layer; a layer used on its own keeps its name.
    `routing_stats()` also returns the mean share of every expert. All are
    means since the last metric reset (each epoch in `fit`). They are
    metric trackers, not variables assigned in `call`: a mirrored variable
    assignment inside a replica would be a cross-replica merge point in the
    middle of the forward pass.

    Args:
        num_experts: E.
        hidden_dim: H of each expert.
        router: `"tokens_choose"` or `"experts_choose"`. Expert choice lets a
            token's routing depend on later tokens: never use it in a causal
            decoder.
        num_selected_experts: K, token choice only (1: Switch, 2: GShard).
        batch_priority: V-MoE batch prioritized routing (token choice).
        train_capacity_factor: capacity factor when training (None: no drop).
        eval_capacity_factor: capacity factor otherwise (None: no drop).
        min_expert_capacity: lower bound on C.
        group_size: S. None makes each sequence (the second-to-last input
            axis) a group; otherwise all tokens are flattened, padded to a
            multiple of S and split.
        normalize_combine_weights: renormalise each token's combine weights
            over the experts that kept it.
        activation, use_bias, dropout_rate: of the expert MLPs (see `Mlp`).
        kernel_initializer, bias_initializer: of the expert MLPs.
        router_kernel_initializer: of the <float32>[D, E] router kernel.
        jitter_noise: Switch multiplicative router input noise (training).
        noise_std: V-MoE Gaussian noise on router logits (training); V-MoE
            uses 1 / E.
        router_z_loss_weight, load_balancing_loss_weight,
        importance_loss_weight, load_loss_weight: auxiliary loss weights.
        dispatcher: `"auto"`, `"einsum"`, `"indices"` or `"dropless"`.
        jit_compile: True to run routing, dispatch and combine in their own
            XLA functions, False for none, "auto" (default) for XLA on GPU
            and TPU only: on CPU, TensorFlow's kernels ran the layer faster
            than XLA's CPU backend (see docs/BENCHMARKS.md).
        check_numerics: in graph mode, fail the step when router logits are
            not finite (eager calls always raise a ValueError for them).
        seed: seed of the router noise.
        **kwargs: passed to `keras.layers.Layer`.

    Sublayers, made in `build`: `router` (a `TokensChooseRouter` or
    `ExpertsChooseRouter` named "router", float32 whatever the dtype
    policy) and `experts` (`Experts`, named "experts").

    `relayout_hook` (not a constructor argument, not serialised): None, or
    a callable `hook(rows, to)` applied to the expert rows <[E, G*C, D]>
    just before the experts (`to="experts"`) and just after them
    (`to="tokens"`); see `_relayout`.

    Example:

    >>> layer = MoeLayer(num_experts=4, hidden_dim=32, num_selected_experts=2)
    >>> outputs = layer(keras.random.normal((2, 16, 8)))
    >>> tuple(outputs.shape)
    (2, 16, 8)
    """

    relayout_hook = None

    def __init__(
        self,
        num_experts,
        hidden_dim,
        router=routing.TOKENS_CHOOSE,
        num_selected_experts=1,
        batch_priority=False,
        train_capacity_factor=1.25,
        eval_capacity_factor=2.0,
        min_expert_capacity=4,
        group_size=None,
        normalize_combine_weights=False,
        activation="relu",
        use_bias=False,
        dropout_rate=0.0,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        router_kernel_initializer="glorot_uniform",
        jitter_noise=0.0,
        noise_std=0.0,
        router_z_loss_weight=1e-3,
        load_balancing_loss_weight=1e-2,
        importance_loss_weight=0.0,
        load_loss_weight=0.0,
        dispatcher="auto",
        jit_compile="auto",
        check_numerics=False,
        seed=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if router not in routing.ROUTER_TYPES:
            raise ValueError(
                f"router must be one of {routing.ROUTER_TYPES}; received "
                f"router={router!r}"
            )
        if router == routing.EXPERTS_CHOOSE and num_selected_experts != 1:
            raise ValueError(
                "num_selected_experts applies to token choice only; received "
                f"num_selected_experts={num_selected_experts} with "
                "router='experts_choose'"
            )
        if group_size is not None and (
            isinstance(group_size, bool)
            or not isinstance(group_size, int)
            or group_size < 1
        ):
            raise ValueError(
                "group_size must be None or an int >= 1; received "
                f"{group_size!r}"
            )
        if dispatcher != "auto":
            dispatch_lib.get_dispatcher(dispatcher)
        backend = keras.backend.backend()
        if backend != "tensorflow" and (
            dispatcher in ("indices", dispatch_lib.DROPLESS)
            or jit_compile is True
        ):
            raise ValueError(
                f"MoeLayer(dispatcher={dispatcher!r}, jit_compile="
                f"{jit_compile!r}) needs Keras' TensorFlow backend; on the "
                f"{backend!r} backend use dispatcher='auto' or 'einsum' and "
                "jit_compile='auto' or False"
            )
        if (
            dispatcher == dispatch_lib.DROPLESS
            and router == routing.EXPERTS_CHOOSE
        ):
            raise ValueError(
                "dispatcher='dropless' needs token-choice routing: with "
                "router='experts_choose' each expert takes exactly C tokens "
                "by definition, so there is no capacity to remove and no "
                "token an expert overflows on. Use router='tokens_choose' "
                "or dispatcher='auto' / 'indices' / 'einsum'"
            )
        # The router and the experts are made in `build`; their arguments
        # are checked here so that a bad layer fails when it is constructed.
        check_router_arguments(num_experts, jitter_noise, noise_std)
        check_positive_int("hidden_dim", hidden_dim)
        get_activation(activation)
        if not 0.0 <= dropout_rate <= 1.0:
            raise ValueError(
                f"dropout_rate must be in [0, 1]; received {dropout_rate!r}"
            )
        # Validates E, K, both capacity factors and min_expert_capacity.
        for factor in (train_capacity_factor, eval_capacity_factor):
            routing.expert_capacity(
                num_tokens=1,
                num_experts=num_experts,
                capacity_factor=factor,
                num_selected_experts=num_selected_experts,
                min_expert_capacity=min_expert_capacity,
                router=router,
            )
        self.num_experts = num_experts
        self.hidden_dim = hidden_dim
        self.router_type = router
        self.num_selected_experts = num_selected_experts
        self.batch_priority = bool(batch_priority)
        self.train_capacity_factor = train_capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.min_expert_capacity = min_expert_capacity
        self.group_size = group_size
        self.normalize_combine_weights = bool(normalize_combine_weights)
        self.activation = activation
        self.use_bias = bool(use_bias)
        self.dropout_rate = float(dropout_rate)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.router_kernel_initializer = keras.initializers.get(
            router_kernel_initializer
        )
        self.jitter_noise = float(jitter_noise)
        self.noise_std = float(noise_std)
        self.router_z_loss_weight = float(router_z_loss_weight)
        self.load_balancing_loss_weight = float(load_balancing_loss_weight)
        self.importance_loss_weight = float(importance_loss_weight)
        self.load_loss_weight = float(load_loss_weight)
        for name, weight in self.loss_weights.items():
            if not weight >= 0:
                raise ValueError(
                    f"{name}_weight must be >= 0; received {weight!r}"
                )
        self.dispatcher = dispatcher
        # Read by Keras' compile(): a dropless step cannot be XLA-compiled.
        self.supports_jit = dispatcher != dispatch_lib.DROPLESS
        if jit_compile not in (True, False, "auto"):
            raise ValueError(
                "jit_compile must be True, False or 'auto'; received "
                f"{jit_compile!r}"
            )
        self.jit_compile = jit_compile
        self.check_numerics = bool(check_numerics)
        self.seed = seed

        self.dropped_tracker = keras.metrics.Mean(name=f"{self.name}_dropped")
        self.confidence_tracker = keras.metrics.Mean(
            name=f"{self.name}_confidence"
        )
        self.load_tracker = ExpertLoad(
            num_experts, name=f"{self.name}_max_load"
        )

    def routing_metrics_prefix(self):
        """The prefix of this layer's routing metrics (class docstring):
        its path inside the model, without the model's and its own name,
        joined by "_" and ending in "_moe"; its name when not nested."""
        inner = self.path.split("/")[1:-1]
        return "_".join([*inner, "moe"]) if inner else self.name

    def _name_routing_metrics(self):
        prefix = self.routing_metrics_prefix()
        for tracker, suffix in (
            (self.dropped_tracker, "dropped"),
            (self.confidence_tracker, "confidence"),
            (self.load_tracker, "max_load"),
        ):
            tracker.name = f"{prefix}_{suffix}"

    def build(self, input_shape):
        # The path is known now (the parent layer builds this one).
        self._name_routing_metrics()
        if len(input_shape) < 2:
            raise ValueError(
                "MoeLayer expects inputs of rank >= 2 <[..., D]>; received "
                f"input_shape={input_shape}"
            )
        if len(input_shape) == 2 and self.group_size is None:
            raise ValueError(
                "Rank-2 inputs <[N, D]> have no sequence axis to group by: "
                f"pass group_size; received input_shape={input_shape}"
            )
        model_dim = input_shape[-1]
        if model_dim is None:
            raise ValueError(
                "The last (model) dimension must be known; received "
                f"{input_shape}"
            )
        if self.group_size is None and input_shape[-2] is None:
            raise ValueError(
                "With group_size=None the sequence axis (-2) is the group and "
                f"must be known; received input_shape={input_shape}"
            )
        router_kwargs = dict(
            num_experts=self.num_experts,
            kernel_initializer=self.router_kernel_initializer,
            jitter_noise=self.jitter_noise,
            noise_std=self.noise_std,
            normalize_combine_weights=self.normalize_combine_weights,
            seed=self.seed,
            # Not the layer's policy: under mixed precision Keras would then
            # cast the router's inputs and kernel to the compute dtype, and
            # router maths must stay in float32.
            dtype="float32",
            name="router",
        )
        if self.router_type == routing.TOKENS_CHOOSE:
            router_kwargs.update(
                num_selected_experts=self.num_selected_experts,
                batch_priority=self.batch_priority,
            )
        self.router = self._make_router(self.router_type, router_kwargs)
        # Built here, not on its first call: that call may be traced inside
        # the XLA function of `_route_and_dispatch`, where no variable may
        # be created.
        self.router.build((None, None, model_dim))
        self.experts = Experts(
            num_experts=self.num_experts,
            hidden_dim=self.hidden_dim,
            activation=self.activation,
            use_bias=self.use_bias,
            kernel_initializer=self.kernel_initializer,
            bias_initializer=self.bias_initializer,
            dropout_rate=self.dropout_rate,
            dtype=self.dtype_policy,
            name="experts",
        )
        self.experts.build((self.num_experts, None, model_dim))
        name = self.dispatcher
        # The capacity dispatcher, for the modes that have a capacity.
        self._dispatcher_cls = dispatch_lib.get_dispatcher(
            default_dispatcher()
            if name in ("auto", dispatch_lib.DROPLESS)
            else name
        )
        if _use_xla(self.jit_compile):
            self._compiled_dispatch = tf.function(
                self._route_and_dispatch, jit_compile=True
            )
            self._compiled_combine = tf.function(
                self._combine, jit_compile=True
            )
            self._compiled_dropless_dispatch = tf.function(
                self._route_and_dispatch_dropless, jit_compile=True
            )
            self._compiled_dropless_combine = tf.function(
                self._combine_dropless, jit_compile=True
            )
        else:
            self._compiled_dispatch = self._route_and_dispatch
            self._compiled_combine = self._combine
            self._compiled_dropless_dispatch = self._route_and_dispatch_dropless
            self._compiled_dropless_combine = self._combine_dropless

    def _make_router(self, router_type, router_kwargs):
        """The router layer (a subclass may route differently)."""
        if router_type == routing.TOKENS_CHOOSE:
            return TokensChooseRouter(**router_kwargs)
        return ExpertsChooseRouter(**router_kwargs)

    @property
    def loss_weights(self):
        """{auxiliary loss name: its weight}, the names routers report."""
        return {
            "router_z_loss": self.router_z_loss_weight,
            "load_balancing_loss": self.load_balancing_loss_weight,
            "importance_loss": self.importance_loss_weight,
            "load_loss": self.load_loss_weight,
        }

    @property
    def _num_members(self):
        """M, the ensemble members whose tokens are routed apart (1 here).

        `EnsembleMoeLayer` returns its `ensemble_size`: its inputs
        <[M*B, ..., D]> hold member m's tokens in rows [m*B, (m+1)*B), and
        member m's groups are routed among experts [m*E/M, (m+1)*E/M). A
        plain layer is the one-member case of every step below.
        """
        return 1

    @property
    def experts_per_router(self):
        """E/M: the experts that one token's router chooses among."""
        return self.num_experts // self._num_members

    def capacity(self, tokens_per_group, training):
        """C for groups of S tokens (`training` picks the factor)."""
        return routing.expert_capacity(
            num_tokens=tokens_per_group,
            num_experts=self.experts_per_router,
            capacity_factor=(
                self.train_capacity_factor
                if training
                else self.eval_capacity_factor
            ),
            num_selected_experts=self.num_selected_experts,
            min_expert_capacity=self.min_expert_capacity,
            router=self.router_type,
        )

    def dispatches_dropless(self, training):
        """Whether a call in this mode (and trace context) is dropless.

        True for `dispatcher="dropless"`. For `"auto"`: True when the
        mode's capacity factor is None and the router is token choice, and
        the layer is not traced inside an XLA function, not on a TPU and
        has no `relayout_hook`; there capacity dispatch with C = S gives
        the same outputs (nothing is dropped either way) at E times the
        expert cost. False otherwise.
        """
        if self.dispatcher == dispatch_lib.DROPLESS:
            return True
        if self.dispatcher != "auto" or (
            self.router_type != routing.TOKENS_CHOOSE
        ):
            return False
        factor = (
            self.train_capacity_factor
            if training
            else self.eval_capacity_factor
        )
        return (
            factor is None
            and tf.__internal__.get_enclosing_xla_context() is None
            and self.relayout_hook is None
            and default_dispatcher() != "einsum"
        )

    def _check_dropless_context(self):
        """Raises where a dropless dispatch cannot run."""
        if tf.__internal__.get_enclosing_xla_context() is not None:
            raise ValueError(
                f"MoeLayer {self.name!r} has dispatcher='dropless', whose "
                "expert groups have sizes known only at run time, and is "
                "traced inside an XLA function (compile(jit_compile=True) "
                "or a tf.function(jit_compile=True)), which needs static "
                "shapes. Compile the step without XLA (the layer's own "
                "jit_compile=True still compiles routing and dispatch) or "
                "use dispatcher='auto', which falls back to capacity "
                "dispatch under XLA"
            )
        if self.relayout_hook is not None:
            raise ValueError(
                f"MoeLayer {self.name!r} has dispatcher='dropless', which "
                "has no fixed-size expert rows <[E, G*C, D]> for the "
                "relayout_hook (expert parallelism) to move; use "
                "dispatcher='auto', 'indices' or 'einsum' with a capacity"
            )

    def call(self, inputs, training=False, token_mask=None):
        training = bool(training)
        inputs, groups, mask, num_real, capacity = self._grouped(
            inputs, token_mask, training
        )
        if capacity is None:
            outputs, aux_losses, stats = self._moe_dropless(
                groups, mask, training
            )
        else:
            outputs, aux_losses, stats = self._moe(
                groups, mask, capacity, training
            )
        self._check_finite(stats.pop("logits_finite"))
        self.dropped_tracker.update_state(stats["dropped"])
        self.confidence_tracker.update_state(stats["confidence"])
        self.load_tracker.update_state(stats["expert_usage"])
        for name, value in aux_losses.items():
            weight = self.loss_weights[name]
            if weight > 0:
                self.add_loss(weight * value)
        return ops.reshape(self._ungroup(outputs, num_real), ops.shape(inputs))

    def _grouped(self, inputs, token_mask, training):
        """Checks inputs <[..., D]> and splits them into routing groups.

        Returns the checked inputs, member-major groups <[M*G, S, D]>, their
        mask <bool>[M*G, S], the real token count n of one member and C
        (None when this call dispatches dropless).
        """
        if inputs.shape[-1] != self.experts.wo.shape[-1]:
            raise ValueError(
                f"{type(self).__name__} was built for "
                f"D={self.experts.wo.shape[-1]}; received inputs of shape "
                f"{inputs.shape}"
            )
        inputs = self._check_inputs(inputs)
        groups, mask, num_real = self._group(inputs, token_mask)
        if self.dispatches_dropless(training):
            self._check_dropless_context()
            return inputs, groups, mask, num_real, None
        capacity = self.capacity(groups.shape[1], training)
        return inputs, groups, mask, num_real, capacity

    def _check_inputs(self, inputs):
        """Hook for input checks beyond the shape (identity here)."""
        return inputs

    def _group(self, inputs, token_mask):
        """Returns groups <[M*G, S, D]>, mask <bool>[M*G, S], n.

        Groups are member-major (groups [m*G, (m+1)*G) are member m's) and
        n is the real token count of one member. With `group_size` each
        member's n tokens are padded on their own to a multiple of S, so
        that a group never mixes members; S is `group_size / M`, the
        `group_size` counting the tokens of all M members.
        """
        members = self._num_members
        model_dim = inputs.shape[-1]
        # (M*B, ..., D) -> (M, n, D): member m's tokens in row m.
        flat = ops.reshape(inputs, (members, -1, model_dim))
        num_real = ops.shape(flat)[1]
        if token_mask is None:
            mask = ops.ones((members, num_real), dtype="bool")
        else:
            if tuple(token_mask.shape) != tuple(inputs.shape[:-1]):
                raise ValueError(
                    "token_mask must have the shape of the inputs without "
                    f"the last axis, {tuple(inputs.shape[:-1])}; received "
                    f"{tuple(token_mask.shape)}"
                )
            mask = ops.reshape(ops.cast(token_mask, "bool"), (members, -1))
        if self.group_size is None:
            group_size = inputs.shape[-2]
        else:
            group_size = self.group_size // members
            pad = (-num_real) % group_size
            flat = ops.pad(flat, ((0, 0), (0, pad), (0, 0)))
            mask = ops.pad(mask, ((0, 0), (0, pad)), constant_values=False)
        # (M, G*S, D) -> (M*G, S, D)
        groups = ops.reshape(flat, (-1, group_size, model_dim))
        return groups, ops.reshape(mask, (-1, group_size)), num_real

    def _ungroup(self, values, num_real):
        """<[M*G, S, ...]> member groups -> <[M*n, ...]> without padding."""
        trailing = values.shape[2:]
        # (M*G, S, ...) -> (M, G*S, ...) -> (M, n, ...) -> (M*n, ...)
        members = ops.reshape(values, (self._num_members, -1, *trailing))
        if not (isinstance(num_real, int) and members.shape[1] == num_real):
            # Only when there is padding: the slice's gradient is a copy.
            members = members[:, :num_real]
        return ops.reshape(members, (-1, *trailing))

    def _route_and_dispatch(self, groups, mask, capacity, training):
        """Routing and dispatch (compiled with XLA): groups -> expert rows."""
        routed = self.router(
            groups,
            expert_capacity=capacity,
            training=training,
            token_mask=mask,
        )
        slots = self._dispatcher_cls(routed.instructions).dispatch(groups)
        info = routed.instructions
        routing_tensors = (
            info.token_index,
            info.combine_weights,
            info.dispatch_mask,
        )
        stats = self._stats(routed, mask)
        expert_inputs = self._slots_to_rows(slots)
        return expert_inputs, routing_tensors, routed.aux_losses, stats

    def _combine(self, expert_outputs, routing_tensors, num_tokens):
        """Combine (compiled with XLA): expert rows -> <[M*G, S, D]>."""
        token_index, combine_weights, dispatch_mask = routing_tensors
        slots = self._rows_to_slots(expert_outputs, token_index.shape[-1])
        instructions = routing.RoutingInstructions(
            token_index=token_index,
            combine_weights=combine_weights,
            dispatch_mask=dispatch_mask,
            num_tokens=num_tokens,
        )
        return self._dispatcher_cls(instructions).combine(slots)

    def _route_and_dispatch_dropless(self, groups, mask, training):
        """Dropless routing and dispatch (XLA-safe): groups -> sorted rows.

        Returns rows <[M*G*S*K, D]> sorted by expert, the `DroplessPlan`
        (group sizes <int32>[E] and what the combine needs), the auxiliary
        losses and the routing statistics.
        """
        routed = self.router(
            groups,
            expert_capacity=None,
            training=training,
            token_mask=mask,
        )
        dispatcher = dispatch_lib.DroplessDispatcher(
            routed.instructions, num_members=self._num_members
        )
        rows = dispatcher.dispatch(groups)
        stats = self._stats(routed, mask)
        return rows, dispatcher.plan, routed.aux_losses, stats

    def _combine_dropless(self, expert_outputs, plan):
        """Dropless combine (XLA-safe): rows -> <[M*G, S, D]>."""
        return dispatch_lib.DroplessDispatcher(plan).combine(expert_outputs)

    def _moe_dropless(self, groups, mask, training):
        """Route, sort by expert, run each expert on its rows, combine."""
        rows, plan, aux, stats = self._compiled_dropless_dispatch(
            groups, mask, training
        )
        # Ragged per-expert matmuls with run-time sizes: outside XLA.
        expert_outputs = self.experts(
            rows, training=training, group_sizes=plan.group_sizes
        )
        outputs = self._compiled_dropless_combine(expert_outputs, plan)
        return outputs, aux, stats

    def _slots_to_rows(self, slots):
        """Slots <[M*G, E/M, C, D]> -> expert rows <[E, G*C, D]>.

        Expert m*E/M + j gets member m's slots of its expert j.
        """
        capacity, model_dim = slots.shape[2], slots.shape[3]
        # (M*G, E/M, C, D) -> (M, G, E/M, C, D) -> (M, E/M, G, C, D)
        #   -> (E, G*C, D)
        slots = ops.reshape(
            slots,
            (
                self._num_members,
                -1,
                self.experts_per_router,
                capacity,
                model_dim,
            ),
        )
        return ops.reshape(
            ops.transpose(slots, (0, 2, 1, 3, 4)),
            (self.num_experts, -1, model_dim),
        )

    def _rows_to_slots(self, rows, capacity):
        """Expert rows <[E, G*C, D]> -> slots <[M*G, E/M, C, D]>."""
        model_dim = rows.shape[-1]
        # (E, G*C, D) -> (M, E/M, G, C, D) -> (M, G, E/M, C, D)
        #   -> (M*G, E/M, C, D)
        rows = ops.reshape(
            rows,
            (
                self._num_members,
                self.experts_per_router,
                -1,
                capacity,
                model_dim,
            ),
        )
        return ops.reshape(
            ops.transpose(rows, (0, 2, 1, 3, 4)),
            (-1, self.experts_per_router, capacity, model_dim),
        )

    def _moe(self, groups, mask, capacity, training):
        """Route, dispatch, run the experts, combine."""
        dispatch_fn, combine_fn = (
            self._compiled_dispatch,
            self._compiled_combine,
        )
        if tf.__internal__.get_enclosing_xla_context() is not None:
            # Already inside an XLA function (e.g. compile(jit_compile=True)):
            # a nested compiled function would see the outer step's tensors
            # as constants and recompile on every step.
            dispatch_fn, combine_fn = self._route_and_dispatch, self._combine
        expert_inputs, routing_tensors, aux, stats = dispatch_fn(
            groups, mask, capacity, training
        )
        # The experts are plain batched matmuls: TensorFlow's own kernels
        # (oneDNN on CPU) run them faster than XLA's CPU backend does.
        expert_inputs = self._relayout(expert_inputs, RELAYOUT_TO_EXPERTS)
        expert_outputs = self.experts(expert_inputs, training=training)
        expert_outputs = self._relayout(expert_outputs, RELAYOUT_TO_TOKENS)
        outputs = combine_fn(expert_outputs, routing_tensors, groups.shape[1])
        return outputs, aux, stats

    def _relayout(self, rows, to):
        """Expert rows <[E, G*C, D]> through `relayout_hook`, if one is set.

        `to` is `RELAYOUT_TO_EXPERTS` before the experts and
        `RELAYOUT_TO_TOKENS` after them. The expert-parallel trainer
        (`keras_moe.distribution.expert_parallel`) sets the hook while it
        traces a step, to move the rows between the batch-sharded layout
        of the tokens and the expert-sharded layout of the expert weights
        (GShard's all-to-all); it is None otherwise and never serialised.
        """
        hook = self.relayout_hook
        return rows if hook is None else hook(rows, to)

    def _stats(self, routed, mask):
        valid = ops.cast(mask, "float32")
        num_valid = ops.maximum(ops.sum(valid), 1.0)
        coverage = routed.instructions.token_coverage()
        dropped = (
            ops.sum(ops.cast(coverage == 0, "float32") * valid) / num_valid
        )
        confidence = (
            ops.sum(ops.max(routed.router_probs, -1) * valid) / num_valid
        )
        # Filled slots (M*G, E/M) -> (M, G, E/M) -> (M, E/M) -> (E,)
        load = ops.reshape(
            routed.instructions.tokens_per_expert(),
            (self._num_members, -1, self.experts_per_router),
        )
        load = ops.reshape(ops.sum(load, axis=1), (self.num_experts,))
        usage = load / ops.maximum(ops.sum(load), 1.0)
        return {
            "dropped": dropped,
            "confidence": confidence,
            "expert_usage": usage,
            "logits_finite": ops.all(ops.isfinite(routed.router_logits)),
        }

    def _check_finite(self, finite):
        if tf.executing_eagerly():
            if not bool(finite):
                raise ValueError(
                    f"MoeLayer {self.name!r}: router logits contain NaN or "
                    "infinite values (check the layer inputs)"
                )
        elif self.check_numerics:
            tf.debugging.Assert(
                finite, [f"MoeLayer {self.name}: non-finite router logits"]
            )

    def routing_stats(self):
        """Routing statistics as NumPy values (means since the last reset)."""
        return {
            "dropped": float(self.dropped_tracker.result()),
            "confidence": float(self.confidence_tracker.result()),
            "max_load": float(self.load_tracker.result()),
            "expert_usage": ops.convert_to_numpy(self.load_tracker.usage()),
        }

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_experts": self.num_experts,
                "hidden_dim": self.hidden_dim,
                "router": self.router_type,
                "num_selected_experts": self.num_selected_experts,
                "batch_priority": self.batch_priority,
                "train_capacity_factor": self.train_capacity_factor,
                "eval_capacity_factor": self.eval_capacity_factor,
                "min_expert_capacity": self.min_expert_capacity,
                "group_size": self.group_size,
                "normalize_combine_weights": self.normalize_combine_weights,
                "activation": self.activation,
                "use_bias": self.use_bias,
                "dropout_rate": self.dropout_rate,
                "kernel_initializer": keras.initializers.serialize(
                    self.kernel_initializer
                ),
                "bias_initializer": keras.initializers.serialize(
                    self.bias_initializer
                ),
                "router_kernel_initializer": keras.initializers.serialize(
                    self.router_kernel_initializer
                ),
                "jitter_noise": self.jitter_noise,
                "noise_std": self.noise_std,
                "router_z_loss_weight": self.router_z_loss_weight,
                "load_balancing_loss_weight": self.load_balancing_loss_weight,
                "importance_loss_weight": self.importance_loss_weight,
                "load_loss_weight": self.load_loss_weight,
                "dispatcher": self.dispatcher,
                "jit_compile": self.jit_compile,
                "check_numerics": self.check_numerics,
                "seed": self.seed,
            }
        )
        return config
