"""E^3: an efficient ensemble of experts inside one sparse model.

"Sparse MoEs meet Efficient Ensembles" (Allingham et al., 2021,
https://arxiv.org/abs/2110.03360). The batch is tiled M times before the
first MoE block; the E experts of every MoE block are split into M groups of
E/M; member m's tokens are routed only within group m (their own softmax,
noise, top-K, capacity and auxiliary losses: the gating matrix is block
diagonal); at the head the members' predictions are averaged.

Shape letters: B batch (of one member), M ensemble members, G groups of one
member, S tokens per group of one member, E experts, E/M experts per member,
K experts per token, C expert capacity, D model dimension, N classes.

Layout of the ensemble batch, used by every layer here: member-major tiling.
A batch <[B, ...]> becomes <[M*B, ...]> and rows [m*B:(m+1)*B] are member
m's copy (`EnsembleTile`). Expert e = m*(E/M) + j is expert j of member m,
and column e of the <float32>[D, E] router kernel is its router weight, so
canonical weight names and shapes are those of a plain `MoeLayer`.

Groups. `group_size` counts the tokens of all M members, as in
google-research/vmoe: a group holds S/M tokens of each member, the same
image tokens for every member, and each member routes its S/M tokens among
its E/M experts. The capacity is therefore the plain layer's:
`ceil(K * (S/M) * factor / (E/M)) = ceil(K * S * factor / E)`, capped at
S/M. With `group_size=None` each member's sequence is a group (vmoe's S is
then M times the sequence length). Internally the member groups are laid out
member-major, <[M*G, S/M, D]>: groups [m*G:(m+1)*G] are member m's.

Pieces:

* `EnsembleTokensChooseRouter`, `EnsembleExpertsChooseRouter`: routers whose
  logits for member m's groups are the tokens times kernel columns of group
  m; they return `RouterOutput`s over E/M experts.
* `EnsembleMoeLayer`: `MoeLayer` with those routers; with M=1 it is the
  plain `MoeLayer`, output for output.
* `EnsembleTile`, `EnsembleAverage`: the tiling at the first MoE block and
  the averaging at the head.
* `block_diagonal`: member gates <[M*G, S, E/M]> -> the full <[M*G, S, E]>.
"""

import math

import keras
import tensorflow as tf
from keras import ops

from keras_moe.layers import routing
from keras_moe.layers.moe import MoeLayer
from keras_moe.layers.routers import ExpertsChooseRouter
from keras_moe.layers.routers import TokensChooseRouter
from keras_moe.utils.checks import check_positive_int
from keras_moe.utils.checks import require_tensorflow_backend

AVERAGE_MODES = ("probabilities", "log_probabilities", "logits")
# vmoe's E^3 router losses (V-MoE's importance and load losses, 0.005 each).
VMOE_LOSS_WEIGHTS = {
    "router_z_loss_weight": 0.0,
    "load_balancing_loss_weight": 0.0,
    "importance_loss_weight": 0.005,
    "load_loss_weight": 0.005,
}
# The Switch recipe (`MoeLayer`'s defaults): load balancing and z-loss.
SWITCH_LOSS_WEIGHTS = {
    "router_z_loss_weight": 1e-3,
    "load_balancing_loss_weight": 1e-2,
    "importance_loss_weight": 0.0,
    "load_loss_weight": 0.0,
}


def default_noise_std(num_experts, ensemble_size):
    """vmoe's router noise of an E^3 layer: 1 / (E/M), E/M experts a member.

    vmoe configures `noise_std=1.0` and divides it by the experts a token
    chooses among, which in E^3 are the E/M experts of its member.

    Example:

    >>> default_noise_std(num_experts=8, ensemble_size=2)
    0.25
    """
    check_positive_int("num_experts", num_experts)
    check_ensemble_size(ensemble_size, num_experts)
    return 1.0 / (num_experts // ensemble_size)


def check_ensemble_size(ensemble_size, num_experts=None):
    """Raises a ValueError unless M is an int >= 1 (dividing E if given)."""
    if (
        isinstance(ensemble_size, bool)
        or not isinstance(ensemble_size, int)
        or ensemble_size < 1
    ):
        raise ValueError(
            f"ensemble_size must be an int >= 1; received {ensemble_size!r}"
        )
    if isinstance(num_experts, int) and num_experts % ensemble_size:
        raise ValueError(
            "num_experts must be a multiple of ensemble_size (each member "
            "gets E/M experts); received num_experts="
            f"{num_experts}, ensemble_size={ensemble_size}"
        )


def block_diagonal(member_values, ensemble_size):
    """Places member m's <[M*G, S, E/M]> values in expert columns of group m.

    Args:
        member_values: <[M*G, S, E/M]>, groups laid out member-major.
        ensemble_size: M.

    Returns:
        <[M*G, S, E]>: row (g, s) of member m holds its values in columns
        [m*E/M, (m+1)*E/M) and zeros elsewhere (vmoe's block-diagonal gates).

    Example:

    >>> gates = block_diagonal(keras.ops.ones((2, 1, 2)), ensemble_size=2)
    >>> keras.ops.convert_to_numpy(gates)[:, 0].tolist()
    [[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]]
    """
    num_tokens, per_member = member_values.shape[1], member_values.shape[2]
    members = ensemble_size
    # (M*G, S, E/M) -> (M, G, S, 1, E/M)
    values = ops.reshape(
        member_values, (members, -1, num_tokens, 1, per_member)
    )
    # eye: (M, 1, 1, M, 1), 1 where the column block is the row's member.
    eye = ops.reshape(
        ops.eye(members, dtype=values.dtype), (members, 1, 1, members, 1)
    )
    # (M, G, S, M, E/M) -> (M*G, S, E)
    return ops.reshape(values * eye, (-1, num_tokens, members * per_member))


class _EnsembleRouting:
    """Member-sliced router logits; mixed into the routers of routers.py."""

    def _set_ensemble_size(self, ensemble_size):
        check_ensemble_size(ensemble_size, self.num_experts)
        self.ensemble_size = ensemble_size
        self.experts_per_member = self.num_experts // ensemble_size

    def _project(self, x):
        """<float32>[M*G, S, D] -> member logits <float32>[M*G, S, E/M]."""
        if self.ensemble_size == 1:
            # The plain router, bit for bit.
            return super()._project(x)
        members, per_member = self.ensemble_size, self.experts_per_member
        num_tokens, model_dim = x.shape[1], x.shape[2]
        # (M*G, S, D) -> (M, G*S, D)
        x = ops.reshape(x, (members, -1, model_dim))
        # (D, E) -> (D, M, E/M) -> (M, D, E/M): member m's column block.
        kernel = ops.transpose(
            ops.reshape(self.kernel, (model_dim, members, per_member)),
            (1, 0, 2),
        )
        # (M, G*S, D) @ (M, D, E/M) -> (M, G*S, E/M) -> (M*G, S, E/M)
        return ops.reshape(ops.matmul(x, kernel), (-1, num_tokens, per_member))

    def call(self, inputs, expert_capacity, training=False, token_mask=None):
        """Routes member-major groups <[M*G, S, D]> among E/M experts each.

        Returns a `RouterOutput` whose instructions, probabilities, logits
        and auxiliary losses are over E/M experts: group g of member m
        (row m*G + g) indexes expert j for expert m*(E/M) + j. Auxiliary
        losses are the mean over members of each member's losses.
        """
        num_groups = inputs.shape[0]
        if num_groups is not None and num_groups % self.ensemble_size:
            raise ValueError(
                f"{type(self).__name__} with ensemble_size="
                f"{self.ensemble_size} routes member-major groups <[M*G, S, "
                f"D]>; received {num_groups} groups, not a multiple of "
                f"{self.ensemble_size}"
            )
        return super().call(inputs, expert_capacity, training, token_mask)

    def _ensemble_config(self, config):
        config["ensemble_size"] = self.ensemble_size
        return config


@keras.saving.register_keras_serializable(package="keras_moe")
class EnsembleTokensChooseRouter(_EnsembleRouting, TokensChooseRouter):
    """Token-choice router of an E^3 ensemble (vmoe's ensemble router).

    Member m's groups are routed among experts [m*E/M, (m+1)*E/M) only, with
    a softmax over those E/M logits, its own noise, top-K and capacity.

    Args:
        num_experts: E, a multiple of `ensemble_size`.
        ensemble_size: M.
        num_selected_experts: K, at most E/M.
        **kwargs: `TokensChooseRouter` arguments.

    Example:

    >>> router = EnsembleTokensChooseRouter(num_experts=4, ensemble_size=2)
    >>> out = router(keras.random.normal((2, 8, 16)), expert_capacity=4)
    >>> tuple(out.router_probs.shape)
    (2, 8, 2)
    """

    def __init__(
        self, num_experts, ensemble_size=1, num_selected_experts=1, **kwargs
    ):
        check_ensemble_size(ensemble_size, num_experts)
        super().__init__(
            num_experts, num_selected_experts=num_selected_experts, **kwargs
        )
        if num_selected_experts > num_experts // ensemble_size:
            raise ValueError(
                "num_selected_experts must be at most the experts of one "
                f"member, num_experts / ensemble_size = "
                f"{num_experts // ensemble_size}; received "
                f"num_selected_experts={num_selected_experts}"
            )
        self._set_ensemble_size(ensemble_size)

    def get_config(self):
        return self._ensemble_config(super().get_config())


@keras.saving.register_keras_serializable(package="keras_moe")
class EnsembleExpertsChooseRouter(_EnsembleRouting, ExpertsChooseRouter):
    """Expert-choice router of an E^3 ensemble.

    Each expert of group m takes its C most probable tokens among member
    m's tokens, with probabilities from a softmax over group m's E/M logits.

    Args:
        num_experts: E, a multiple of `ensemble_size`.
        ensemble_size: M.
        **kwargs: `ExpertsChooseRouter` arguments.

    Example:

    >>> router = EnsembleExpertsChooseRouter(num_experts=4, ensemble_size=2)
    >>> out = router(keras.random.normal((2, 8, 16)), expert_capacity=2)
    >>> tuple(out.instructions.token_index.shape)
    (2, 2, 2)
    """

    def __init__(self, num_experts, ensemble_size=1, **kwargs):
        check_ensemble_size(ensemble_size, num_experts)
        super().__init__(num_experts, **kwargs)
        self._set_ensemble_size(ensemble_size)

    def get_config(self):
        return self._ensemble_config(super().get_config())


_ENSEMBLE_ROUTERS = {
    routing.TOKENS_CHOOSE: EnsembleTokensChooseRouter,
    routing.EXPERTS_CHOOSE: EnsembleExpertsChooseRouter,
}


@keras.saving.register_keras_serializable(package="keras_moe")
class EnsembleMoeLayer(MoeLayer):
    """`MoeLayer` of an E^3 ensemble: block-diagonal routing per member.

    Inputs are member-tiled <[M*B, ..., D]> (rows [m*B:(m+1)*B] are member
    m's, as `EnsembleTile` makes them). Member m's tokens are routed only to
    experts [m*E/M, (m+1)*E/M), with their own softmax, noise, top-K,
    capacity and auxiliary losses; the losses added are the means over
    members. Weights, their names and shapes are a `MoeLayer`'s (router
    kernel <float32>[D, E], experts <[E, ...]>), so E^3 upcycles and loads
    like any MoE layer. With `ensemble_size=1` it computes exactly what
    `MoeLayer` does.

    Router defaults are vmoe's E^3 configuration
    (`eee_s32_last2_ilsvrc2012_ft_cifar100`): noisy top-K gating, Gaussian
    noise of std `1 / (E/M)` on each member's E/M logits during training
    only (`noise_std=None`), and V-MoE's importance and load losses with
    weight 0.005 each (`VMOE_LOSS_WEIGHTS`); no Switch load-balancing loss
    and no z-loss. Both losses are computed per member, over the member's
    E/M experts, and averaged over members (`MoeLayer`'s routers average
    them over the member-major groups). The Switch recipe stays available:
    pass `noise_std=0.0, **SWITCH_LOSS_WEIGHTS` (MoeLayer's defaults).

    `group_size` S counts the tokens of all M members (as in vmoe) and must
    be a multiple of M: each member routes S/M tokens per group, padded per
    member like `MoeLayer` pads. With `group_size=None` each member's
    sequence (axis -2) is a group. Capacity per expert and group is
    `ceil(K * (S/M) * factor / (E/M))` (= the plain layer's
    `ceil(K * S * factor / E)`), floored at `min_expert_capacity` and capped
    at S/M.

    Args:
        num_experts: E, a multiple of `ensemble_size`.
        hidden_dim: H of each expert.
        ensemble_size: M.
        noise_std: std of the router noise (training only); None (default)
            for vmoe's `1 / (E/M)`, 0 for none.
        router_z_loss_weight, load_balancing_loss_weight,
        importance_loss_weight, load_loss_weight: auxiliary loss weights
            (defaults: `VMOE_LOSS_WEIGHTS`).
        **kwargs: `MoeLayer` arguments (`num_selected_experts` at most E/M).

    Example:

    >>> layer = EnsembleMoeLayer(num_experts=4, hidden_dim=32, ensemble_size=2)
    >>> x = EnsembleTile(2)(keras.random.normal((3, 16, 8)))
    >>> tuple(layer(x).shape)
    (6, 16, 8)
    """

    def __init__(
        self,
        num_experts,
        hidden_dim,
        ensemble_size=1,
        noise_std=None,
        router_z_loss_weight=VMOE_LOSS_WEIGHTS["router_z_loss_weight"],
        load_balancing_loss_weight=VMOE_LOSS_WEIGHTS[
            "load_balancing_loss_weight"
        ],
        importance_loss_weight=VMOE_LOSS_WEIGHTS["importance_loss_weight"],
        load_loss_weight=VMOE_LOSS_WEIGHTS["load_loss_weight"],
        **kwargs,
    ):
        # Member tiling and averaging use TensorFlow ops.
        require_tensorflow_backend("E^3 (EnsembleMoeLayer)")
        check_ensemble_size(ensemble_size, num_experts)
        if noise_std is None:
            noise_std = default_noise_std(num_experts, ensemble_size)
        kwargs.update(
            noise_std=noise_std,
            router_z_loss_weight=router_z_loss_weight,
            load_balancing_loss_weight=load_balancing_loss_weight,
            importance_loss_weight=importance_loss_weight,
            load_loss_weight=load_loss_weight,
        )
        group_size = kwargs.get("group_size")
        if (
            isinstance(group_size, int)
            and not isinstance(group_size, bool)
            and group_size >= 1
            and group_size % ensemble_size
        ):
            raise ValueError(
                "group_size counts the tokens of all ensemble members (S/M of "
                "each) and must be a multiple of ensemble_size; received "
                f"group_size={group_size}, ensemble_size={ensemble_size}"
            )
        router = kwargs.get("router", routing.TOKENS_CHOOSE)
        k = kwargs.get("num_selected_experts", 1)
        if router == routing.TOKENS_CHOOSE and (
            isinstance(k, int) and k > num_experts // ensemble_size
        ):
            raise ValueError(
                "num_selected_experts must be at most the experts of one "
                f"member, num_experts / ensemble_size = "
                f"{num_experts // ensemble_size}; received "
                f"num_selected_experts={k}"
            )
        super().__init__(num_experts, hidden_dim, **kwargs)
        self.ensemble_size = ensemble_size

    def _make_router(self, router_type, router_kwargs):
        return _ENSEMBLE_ROUTERS[router_type](
            ensemble_size=self.ensemble_size, **router_kwargs
        )

    @property
    def _num_members(self):
        return self.ensemble_size

    @property
    def experts_per_member(self):
        """E/M, the experts of one member."""
        return self.experts_per_router

    def routing_weights(self, inputs, training=False, token_mask=None):
        """Per-token gates over all E experts, for inspection and tests.

        Routes `inputs` <[M*B, ..., D]> like `call` (no loss is added and no
        statistic is updated) and returns a dict of <float32>[M*B, ..., E]:
        `"router_probs"`, the block-diagonal router softmax (member m's row
        is its E/M-way softmax in columns [m*E/M, (m+1)*E/M), zeros
        elsewhere), and `"combine_weights"`, the weight with which each
        expert's output is added to the token (0 where not routed).
        """
        inputs = ops.convert_to_tensor(inputs)
        if not self.built:
            self.build(inputs.shape)
        training = bool(training)
        inputs, groups, mask, num_real, capacity = self._grouped(
            inputs, token_mask, training
        )
        routed = self.router(
            groups,
            expert_capacity=capacity,
            training=training,
            token_mask=mask,
        )
        # Slots or, when this mode dispatches dropless, choices: (M*G, S, E/M)
        combine = routed.instructions.expert_weights()
        shape = (*ops.shape(inputs)[:-1], self.num_experts)
        return {
            name: ops.reshape(
                self._ungroup(
                    block_diagonal(values, self.ensemble_size), num_real
                ),
                shape,
            )
            for name, values in (
                ("router_probs", routed.router_probs),
                ("combine_weights", combine),
            )
        }

    def _check_inputs(self, inputs):
        """Checks that the leading axis holds M*B rows."""
        members = self.ensemble_size
        rows = inputs.shape[0]
        message = (
            f"EnsembleMoeLayer {self.name!r} with ensemble_size={members} "
            "needs member-tiled inputs <[M*B, ..., D]> (rows [m*B:(m+1)*B] "
            "are member m's; see EnsembleTile)"
        )
        if rows is not None:
            if rows % members:
                raise ValueError(
                    f"{message}; received inputs of shape "
                    f"{tuple(inputs.shape)}: {rows} rows is not a multiple "
                    f"of {members}"
                )
            return inputs
        check = tf.debugging.assert_equal(
            tf.shape(inputs)[0] % members, 0, message=message
        )
        with tf.control_dependencies([check]):
            return tf.identity(inputs)

    def get_config(self):
        config = super().get_config()
        config["ensemble_size"] = self.ensemble_size
        return config


@keras.saving.register_keras_serializable(package="keras_moe")
class EnsembleTile(keras.layers.Layer):
    """Tiles a batch for an ensemble: <[B, ...]> -> <[M*B, ...]>.

    Rows [m*B:(m+1)*B] of the output are member m's copy of the batch (the
    layout of `EnsembleMoeLayer` and `EnsembleAverage`). Put it before the
    first MoE block; layers after it see M*B rows. It also tiles labels for
    a custom training loop (`EnsembleTile(M)(labels)`), integers included.

    Args:
        ensemble_size: M.
        **kwargs: passed to `keras.layers.Layer`.

    Example:

    >>> tiled = EnsembleTile(2)(keras.ops.convert_to_tensor([[1.0], [2.0]]))
    >>> keras.ops.convert_to_numpy(tiled)[:, 0].tolist()
    [1.0, 2.0, 1.0, 2.0]
    """

    def __init__(self, ensemble_size, **kwargs):
        super().__init__(**kwargs)
        check_ensemble_size(ensemble_size)
        self.ensemble_size = ensemble_size

    def call(self, inputs):
        if len(inputs.shape) < 1:
            raise ValueError(
                "EnsembleTile needs inputs with a batch axis; received a "
                "scalar"
            )
        if self.ensemble_size == 1:
            return inputs
        repeats = (self.ensemble_size,) + (1,) * (len(inputs.shape) - 1)
        return ops.tile(inputs, repeats)

    def compute_output_shape(self, input_shape):
        rows = input_shape[0]
        return (
            None if rows is None else rows * self.ensemble_size,
            *input_shape[1:],
        )

    def get_config(self):
        config = super().get_config()
        config["ensemble_size"] = self.ensemble_size
        return config


@keras.saving.register_keras_serializable(package="keras_moe")
class EnsembleAverage(keras.layers.Layer):
    """Averages member predictions: <[M*B, ...]> -> <[B, ...]>.

    Row m*B + b of the input is member m's prediction for example b (the
    layout of `EnsembleTile`). The reduction is over members, in float32:

    * `mode="probabilities"`: inputs are member probabilities p_m; returns
      their mean, the ensemble's predictive distribution.
    * `mode="log_probabilities"`: inputs are member log-likelihoods l_m;
      returns `log(mean_m exp(l_m))` (log-mean-exp, computed stably), the
      ensemble's log-likelihood.
    * `mode="logits"`: inputs are member logits z_m; returns
      `log(mean_m softmax(z_m))` over the last axis, the log of the
      averaged probabilities. It is a valid logit vector: its softmax is the
      averaged probabilities, so a `from_logits=True` loss on it is the
      ensemble's negative log-likelihood.

    Args:
        ensemble_size: M.
        mode: "probabilities", "log_probabilities" or "logits".
        **kwargs: passed to `keras.layers.Layer`.

    Example:

    >>> probs = keras.ops.convert_to_tensor([[0.2, 0.8], [0.6, 0.4]])
    >>> keras.ops.convert_to_numpy(EnsembleAverage(2)(probs)).round(3)
    array([[0.4, 0.6]], dtype=float32)
    """

    def __init__(self, ensemble_size, mode="probabilities", **kwargs):
        super().__init__(**kwargs)
        check_ensemble_size(ensemble_size)
        if mode not in AVERAGE_MODES:
            raise ValueError(
                f"mode must be one of {AVERAGE_MODES}; received {mode!r}"
            )
        self.ensemble_size = ensemble_size
        self.mode = mode

    def call(self, inputs):
        if len(inputs.shape) < 1:
            raise ValueError(
                "EnsembleAverage needs inputs with a batch axis; received "
                "a scalar"
            )
        rows = inputs.shape[0]
        if rows is not None and rows % self.ensemble_size:
            raise ValueError(
                f"EnsembleAverage with ensemble_size={self.ensemble_size} "
                "needs member-tiled inputs <[M*B, ...]>; received shape "
                f"{tuple(inputs.shape)}: {rows} rows is not a multiple of "
                f"{self.ensemble_size}"
            )
        x = ops.cast(inputs, "float32")
        # (M*B, ...) -> (M, B, ...)
        x = ops.reshape(x, (self.ensemble_size, -1, *inputs.shape[1:]))
        if self.mode == "probabilities":
            averaged = ops.mean(x, axis=0)
        else:
            if self.mode == "logits":
                x = ops.log_softmax(x, axis=-1)
            averaged = ops.logsumexp(x, axis=0) - math.log(self.ensemble_size)
        return ops.cast(averaged, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        rows = input_shape[0]
        return (
            None if rows is None else rows // self.ensemble_size,
            *input_shape[1:],
        )

    def get_config(self):
        config = super().get_config()
        config.update({"ensemble_size": self.ensemble_size, "mode": self.mode})
        return config


def match_member_rows(values, predictions):
    """Tiles <[B, ...]> targets to the rows of <[M*B, ...]> predictions.

    The number of copies is read at run time (rows of `predictions` over rows
    of `values`), so the same code serves training steps, whose predictions
    are per member, and evaluation steps, whose predictions are averaged
    (one copy). `values` may be a nested structure; None stays None.
    """

    def tile(value):
        if value is None:
            return None
        value = tf.convert_to_tensor(value)
        copies = tf.shape(predictions)[0] // tf.shape(value)[0]
        multiples = tf.concat(
            [[copies], tf.ones([len(value.shape) - 1], "int32")], axis=0
        )
        return tf.tile(value, multiples)

    return tf.nest.map_structure(tile, values)
