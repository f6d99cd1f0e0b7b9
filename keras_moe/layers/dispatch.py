"""Dispatchers: move tokens into expert slots and expert outputs back.

Shape letters: G groups, S tokens per group, E experts, K experts per token,
C expert capacity, D model dimension, N = G * S * K routed choices,
M ensemble members.

The two capacity dispatchers implement the same two maps of a
`RoutingInstructions`:

    dispatch: <[G, S, D]> tokens  -> <[G, E, C, D]> slots (empty slots are 0)
    combine:  <[G, E, C, D]> slots -> <[G, S, D]> tokens, weighted sum

* `EinsumDispatcher` builds the one-hot <[G, S, E, C]> arrays and contracts
  them: O(G * S * E * C * D) work, all matmuls, the usual choice on TPU.
* `IndicesDispatcher` gathers token rows into slots and adds slot rows back
  with a segment sum: O(G * E * C * D) work, independent of the one-hot size,
  the faster choice on CPU and GPU (see `benchmarks/moe_layer.py` and
  docs/BENCHMARKS.md).

Their outputs and gradients agree to float tolerance (tests/layers).

`DroplessDispatcher` has no slots. It takes a `DroplessRoutingInstructions`
(token choice without capacity) and sorts the N choices by expert:

    dispatch: <[G, S, D]> tokens -> <[N, D]> rows, expert e's rows contiguous
    combine:  <[N, D]> rows      -> <[G, S, D]> tokens, weighted sum over K

`group_sizes` <int32>[E] says how many rows each expert owns; the experts
(`Experts.call(rows, group_sizes=...)`) compute exactly those rows, so the
cost is that of the K * G * S routed tokens, never of E * C slots, and no
token is dropped. Both maps are gathers whose gradients are gathers too
(the sort is a permutation), never scatters. Every shape is static, so
both run under XLA; only the experts' ragged split needs run-time sizes.
"""

import typing

import keras  # noqa: F401  (used by the docstring examples)
import tensorflow as tf
from keras import ops


class Dispatcher:
    """Interface: `dispatch(inputs)` and `combine(expert_outputs)`."""

    def __init__(self, instructions):
        self.instructions = instructions

    def dispatch(self, inputs):
        raise NotImplementedError

    def combine(self, expert_outputs):
        raise NotImplementedError


class EinsumDispatcher(Dispatcher):
    """Dispatch and combine as einsums with the dense one-hot arrays."""

    def dispatch(self, inputs):
        mask = ops.cast(self.instructions.dispatch_array(), inputs.dtype)
        return ops.einsum("gsec,gsd->gecd", mask, inputs)

    def combine(self, expert_outputs):
        weights = ops.cast(
            self.instructions.combine_array(), expert_outputs.dtype
        )
        return ops.einsum("gsec,gecd->gsd", weights, expert_outputs)


class IndicesDispatcher(Dispatcher):
    """Dispatch as a gather, combine as a segment sum over token rows."""

    def dispatch(self, inputs):
        info = self.instructions
        num_groups = ops.shape(inputs)[0]
        # Global row of each slot's token: (G, E, C), rows of (G*S, D).
        rows = _global_rows(info.token_index, info.num_tokens, num_groups)
        flat = ops.reshape(inputs, (-1, inputs.shape[-1]))
        slots = ops.take(flat, rows, axis=0)  # (G, E, C, D)
        return slots * ops.cast(info.dispatch_mask, inputs.dtype)[..., None]

    def combine(self, expert_outputs):
        info = self.instructions
        num_groups = ops.shape(expert_outputs)[0]
        model_dim = expert_outputs.shape[-1]
        num_rows = num_groups * info.num_tokens
        rows = _global_rows(info.token_index, info.num_tokens, num_groups)
        # Empty slots go to a spare row that is cut off below.
        rows = ops.where(info.dispatch_mask > 0, rows, num_rows)
        weighted = (
            expert_outputs
            * ops.cast(info.combine_weights, expert_outputs.dtype)[..., None]
        )
        summed = ops.segment_sum(
            ops.reshape(weighted, (-1, model_dim)),
            ops.reshape(rows, (-1,)),
            num_segments=num_rows + 1,
        )
        # (G*S, D) -> (G, S, D)
        return ops.reshape(
            summed[:num_rows], (num_groups, info.num_tokens, model_dim)
        )


class DroplessPlan(typing.NamedTuple):
    """Where every routed choice goes: the tensors dispatch and combine share.

    Rows are the N = G*S*K choices sorted by expert; choice `(g*S + s)*K + k`
    is token s of group g sent to its k-th expert. Choices of masked tokens
    are sorted after every expert's rows and never computed.

    Attributes:
        row_token: <int32>[N] token (g*S + s) of each row.
        row_choice: <int32>[N] choice of each row.
        choice_row: <int32>[N] row of each choice (the inverse permutation).
        group_sizes: <int32>[E] rows of each expert, in expert order.
        combine_weights: <float32>[G, S, K] weight of each choice.
    """

    row_token: object
    row_choice: object
    choice_row: object
    group_sizes: object
    combine_weights: object


class DroplessDispatcher(Dispatcher):
    """Sorts routed choices by expert; combines them back, nothing dropped.

    Args:
        instructions: `DroplessRoutingInstructions` of member-major groups
            <[M*G, S, ...]>, each member's over its own E/M experts, or a
            `DroplessPlan` made by an earlier dispatcher (to combine in
            another function than the one that dispatched).
        num_members: M. Group row r belongs to member r // G and its local
            expert j is expert (r // G) * E/M + j of the experts layer.

    Within an expert, rows come group by group, then round by round (every
    first choice before any second), then in service order: the order of
    the capacity dispatchers' slots, so that with no drops both feed each
    expert the same rows in the same order.

    Example:

    >>> from keras_moe.layers import routing
    >>> probs = keras.ops.softmax(keras.random.normal((2, 8, 4), seed=1))
    >>> info = routing.tokens_choose_dropless(probs, num_selected_experts=2)
    >>> dispatcher = DroplessDispatcher(info)
    >>> rows = dispatcher.dispatch(keras.ops.ones((2, 8, 16)))
    >>> tuple(rows.shape), int(keras.ops.sum(dispatcher.group_sizes))
    ((32, 16), 32)
    >>> tuple(dispatcher.combine(rows).shape)
    (2, 8, 16)
    """

    def __init__(self, instructions, num_members=1):
        super().__init__(instructions)
        if isinstance(instructions, DroplessPlan):
            self.plan = instructions
        else:
            self.plan = _dropless_plan(instructions, num_members)

    @property
    def group_sizes(self):
        """<int32>[E]: rows of each expert in the dispatched buffer."""
        return self.plan.group_sizes

    def dispatch(self, inputs):
        """Tokens <[G, S, D]> -> rows <[N, D]> sorted by expert."""
        plan = self.plan
        num_selected = plan.combine_weights.shape[-1]
        flat = ops.reshape(inputs, (-1, inputs.shape[-1]))
        # Gradient: each token sums its K rows, gathered by choice.
        return _gather_rows(flat, plan.row_token, plan.choice_row, num_selected)

    def combine(self, expert_outputs):
        """Rows <[N, D]> -> tokens <[G, S, D]>: K rows per token, weighted."""
        plan = self.plan
        weights = ops.cast(plan.combine_weights, expert_outputs.dtype)
        num_tokens, num_selected = weights.shape[1], weights.shape[2]
        model_dim = expert_outputs.shape[-1]
        # (N, D) rows -> (G*S*K, D) choices
        choices = _gather_rows(
            expert_outputs, plan.choice_row, plan.row_choice, 1
        )
        if num_selected == 1:
            # (G*S, D) -> (G, S, D): a reshape, not a slice of K (whose
            # gradient would be a copy).
            return ops.reshape(choices, (-1, num_tokens, model_dim)) * weights
        # (G*S*K, D) -> (G, S, K, D) -> (G, S, D)
        choices = ops.reshape(
            choices, (-1, num_tokens, num_selected, model_dim)
        )
        return ops.sum(choices * weights[..., None], axis=2)


def _dropless_plan(instructions, num_members):
    """The `DroplessPlan` of `DroplessRoutingInstructions`."""
    info = instructions
    experts = info.expert_index  # (M*G, S, K), local expert ids
    num_tokens, num_selected = experts.shape[1], experts.shape[2]
    num_groups = ops.shape(experts)[0]
    num_experts = info.num_experts * num_members
    if num_members > 1:
        # Local expert j of member m is expert m*E/M + j.
        member = ops.arange(num_groups, dtype="int32") // (
            num_groups // num_members
        )
        experts = experts + (member * info.num_experts)[:, None, None]
    order = info.service_order  # (M*G, S)
    # Choices in (group, round, service position) order: (M*G, K, S).
    served_experts = ops.transpose(
        ops.take_along_axis(experts, order[..., None], axis=1), (0, 2, 1)
    )
    served_valid = ops.take_along_axis(info.token_mask, order, axis=1)
    # Masked tokens' choices go to a spare bucket E, after every expert.
    bucket = ops.where(served_valid[:, None, :], served_experts, num_experts)
    bucket = ops.reshape(bucket, (-1,))
    # A stable sort keeps (group, round, service position) within an expert.
    sorted_choices = ops.cast(tf.argsort(bucket, stable=True), "int32")
    # Token and choice ids of the (M*G, K, S) list.
    group = ops.arange(num_groups, dtype="int32")[:, None, None]
    token = group * num_tokens + order[:, None, :]  # (M*G, 1, S)
    rounds = ops.arange(num_selected, dtype="int32")[None, :, None]
    choice = ops.reshape(token * num_selected + rounds, (-1,))
    token = ops.reshape(
        ops.broadcast_to(token, ops.shape(served_experts)), (-1,)
    )
    row_choice = ops.take(choice, sorted_choices, axis=0)
    # A segment sum rather than bincount, which XLA cannot compile.
    sizes = ops.segment_sum(
        ops.ones_like(bucket), bucket, num_segments=num_experts + 1
    )
    # The inverse permutation as a scatter: XLA's InvertPermutation fails
    # on shapes it cannot prove static.
    num_rows = ops.shape(row_choice)[0]
    choice_row = tf.scatter_nd(
        row_choice[:, None], tf.range(num_rows, dtype="int32"), [num_rows]
    )
    return DroplessPlan(
        row_token=ops.take(token, sorted_choices, axis=0),
        row_choice=row_choice,
        choice_row=choice_row,
        group_sizes=sizes[:num_experts],
        combine_weights=info.combine_weights,
    )


def _gather_rows(params, indices, gradient_indices, fold):
    """`params[indices]`, whose gradient is a gather, not a scatter.

    For a gather that reads every row of `params` exactly `fold` times:
    row i of `params` was read at outputs `gradient_indices[i*fold:
    (i+1)*fold]`, so its gradient is the sum of those output gradients.
    TensorFlow's own gradient of `tf.gather` is a segment sum (a scatter),
    several times slower on CPU than this gather.

    Args:
        params: <[R, D]>.
        indices: <int32>[R * fold].
        gradient_indices: <int32>[R * fold].
        fold: reads per row of `params`.
    """

    @tf.custom_gradient
    def gather(params):
        def grad(upstream):
            upstream = tf.convert_to_tensor(upstream)
            rows = tf.gather(upstream, gradient_indices)
            if fold == 1:
                return rows
            # (R*fold, D) -> (R, fold, D) -> (R, D)
            return tf.reduce_sum(
                tf.reshape(rows, (-1, fold, rows.shape[-1])), axis=1
            )

        return tf.gather(params, indices), grad

    return gather(params)


DISPATCHERS = {"einsum": EinsumDispatcher, "indices": IndicesDispatcher}
DROPLESS = "dropless"


def get_dispatcher(name):
    """The dispatcher class called `name`: "einsum", "indices", "dropless".

    "einsum" and "indices" take `RoutingInstructions` (slots, a capacity);
    "dropless" takes `DroplessRoutingInstructions` (no capacity).
    """
    if name == DROPLESS:
        return DroplessDispatcher
    if name not in DISPATCHERS:
        raise ValueError(
            f"dispatcher must be one of {(*DISPATCHERS, DROPLESS)} or "
            f"'auto'; received {name!r}"
        )
    return DISPATCHERS[name]


def _global_rows(token_index, num_tokens, num_groups):
    group = ops.arange(num_groups, dtype="int32")[:, None, None]
    return group * num_tokens + token_index
