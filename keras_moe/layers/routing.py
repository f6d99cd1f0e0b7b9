"""Routing: which token fills which slot of which expert.

Shape letters (one glossary for the whole project):

  G: number of groups; routing decisions never cross a group.
  S: tokens per group.
  E: number of experts.
  K: experts chosen per token (`num_selected_experts`, token choice only).
  C: expert capacity, the slots each expert has per group.
  D: model dimension.

Routing functions take router probabilities `<float32>[G, S, E]` and return a
`RoutingInstructions`: for every slot `(e, c)` of every group, which token
fills it and with what combine weight. Dispatchers (`dispatch.py`) move the
data; nothing here touches activations.

Two families of routers:

* Token choice (`tokens_choose`): each token picks its top-K experts. Switch
  Transformer is K=1, GShard is K=2. With `batch_priority=True` tokens are
  served in order of their top router probability (V-MoE's Batch Prioritized
  Routing) instead of their position.
* Expert choice (`experts_choose`): each expert picks its C most probable
  tokens (Zhou et al., 2022). A token sees its whole group, so expert choice
  must not be used in causal decoders: a token's routing would depend on
  tokens that come after it.

Token choice also routes without capacity (`tokens_choose_dropless`, or
`tokens_choose(..., expert_capacity=None)`): every token keeps its K choices
(dropless MoE, as in MegaBlocks), and the result is a
`DroplessRoutingInstructions` in token form, <[G, S, K]>, instead of slots.
Expert choice has no dropless form: an expert taking its C best tokens is
the definition of the router.
"""

import dataclasses
import math

import keras
import tensorflow as tf
from keras import ops

from keras_moe.utils.checks import check_positive_int

TOKENS_CHOOSE = "tokens_choose"
EXPERTS_CHOOSE = "experts_choose"
ROUTER_TYPES = (TOKENS_CHOOSE, EXPERTS_CHOOSE)


def _stable_argsort(values):
    """argsort along the last axis; equal values keep their order.

    `keras.ops.argsort` is stable on the torch and JAX backends but not on
    TensorFlow's, where stability must be asked for.
    """
    if keras.backend.backend() == "tensorflow":
        return tf.argsort(values, axis=-1, stable=True)
    return ops.argsort(values, axis=-1)


def expert_capacity(
    num_tokens,
    num_experts,
    capacity_factor,
    num_selected_experts=1,
    min_expert_capacity=4,
    router=TOKENS_CHOOSE,
):
    """Number of slots C that each expert has in a group of S tokens.

    Token choice: `ceil(K * S * capacity_factor / E)`. Expert choice:
    `ceil(S * capacity_factor / E)`. Both are floored at `min_expert_capacity`
    and capped at S (an expert never needs more slots than there are tokens).
    `capacity_factor=None` means "drop nothing": C = S.

    Args:
        num_tokens: S, tokens per group.
        num_experts: E.
        capacity_factor: positive float, or None for no drops.
        num_selected_experts: K (token choice only).
        min_expert_capacity: lower bound on C.
        router: `"tokens_choose"` or `"experts_choose"`.

    Returns:
        The capacity C, a Python int.

    Example:

    >>> expert_capacity(num_tokens=64, num_experts=8, capacity_factor=1.25,
    ...                 num_selected_experts=2)
    20
    """
    if router not in ROUTER_TYPES:
        raise ValueError(
            f"router must be one of {ROUTER_TYPES}; received router={router!r}"
        )
    check_positive_int("num_tokens", num_tokens)
    check_positive_int("num_experts", num_experts)
    check_positive_int("num_selected_experts", num_selected_experts)
    if num_selected_experts > num_experts:
        raise ValueError(
            "num_selected_experts must be at most num_experts; received "
            f"num_selected_experts={num_selected_experts}, "
            f"num_experts={num_experts}"
        )
    if not isinstance(min_expert_capacity, int) or min_expert_capacity < 0:
        raise ValueError(
            "min_expert_capacity must be an int >= 0; received "
            f"min_expert_capacity={min_expert_capacity!r}"
        )
    if capacity_factor is None:
        return num_tokens
    if not capacity_factor > 0:
        raise ValueError(
            "capacity_factor must be > 0 (or None for no drops); received "
            f"capacity_factor={capacity_factor!r}"
        )
    choices = num_selected_experts if router == TOKENS_CHOOSE else 1
    # Round before ceil so that 2 * 8 * 1.1 / 8 does not become 2.2000000001.
    capacity = math.ceil(
        round(choices * num_tokens * capacity_factor, 6) / num_experts
    )
    return min(max(capacity, min_expert_capacity, 1), num_tokens)


@dataclasses.dataclass
class RoutingInstructions:
    """The outcome of routing one batch of groups, in slot (index) form.

    Attributes:
        token_index: <int32>[G, E, C] position, within its group, of the token
            in slot c of expert e (0 when the slot is empty).
        combine_weights: <float32>[G, E, C] weight with which the expert's
            output for that slot is added to the token's output (0 when empty).
        dispatch_mask: <float32>[G, E, C] 1.0 where the slot is filled.
        num_tokens: S, a Python int.
    """

    token_index: object
    combine_weights: object
    dispatch_mask: object
    num_tokens: int

    @property
    def num_experts(self):
        return self.token_index.shape[1]

    @property
    def expert_capacity(self):
        return self.token_index.shape[2]

    def dispatch_array(self):
        """<float32>[G, S, E, C]: 1.0 where token s fills slot (e, c)."""
        # (G, E, C) -> (G, E, C, S) -> (G, S, E, C)
        one_hot = ops.one_hot(self.token_index, self.num_tokens)
        one_hot = one_hot * self.dispatch_mask[..., None]
        return ops.transpose(one_hot, (0, 3, 1, 2))

    def combine_array(self):
        """<float32>[G, S, E, C]: combine weight of token s in slot (e, c)."""
        one_hot = ops.one_hot(self.token_index, self.num_tokens)
        one_hot = one_hot * self.combine_weights[..., None]
        return ops.transpose(one_hot, (0, 3, 1, 2))

    def tokens_per_expert(self):
        """<float32>[G, E]: filled slots of each expert."""
        return ops.sum(self.dispatch_mask, axis=-1)

    def token_coverage(self):
        """<float32>[G, S]: number of slots each token fills (0 = dropped)."""
        return _scatter_to_tokens(
            self.dispatch_mask, self.token_index, self.num_tokens
        )

    def expert_weights(self):
        """<float32>[G, S, E]: combine weight of token s for expert e."""
        return ops.sum(self.combine_array(), axis=-1)


@dataclasses.dataclass
class DroplessRoutingInstructions:
    """Token-choice routing without capacity, in token (choice) form.

    No slot exists and no choice is dropped: token s of group g is sent to
    each of its K experts. A dispatcher (`dispatch.DroplessDispatcher`) sorts
    the choices by expert and serves each expert exactly its tokens.

    Attributes:
        expert_index: <int32>[G, S, K] the experts each token chose, best
            first (ties: lower expert id).
        combine_weights: <float32>[G, S, K] weight of each choice's expert
            output in the token's output (0 for masked tokens).
        token_mask: <bool>[G, S] tokens that are routed (False: padding,
            never sent to an expert).
        service_order: <int32>[G, S] the token served i-th in each round;
            `range(S)` unless batch priority sorts tokens by their top
            router probability. Without capacity the order changes no
            output: it only orders each expert's rows.
        num_experts: E, a Python int.
    """

    expert_index: object
    combine_weights: object
    token_mask: object
    service_order: object
    num_experts: int

    @property
    def num_tokens(self):
        return self.expert_index.shape[1]

    @property
    def num_selected_experts(self):
        return self.expert_index.shape[2]

    def _choice_one_hot(self):
        """<float32>[G, S, K, E]: 1.0 where a routed choice picks expert e."""
        one_hot = ops.one_hot(self.expert_index, self.num_experts)
        valid = ops.cast(self.token_mask, "float32")
        return one_hot * valid[..., None, None]

    def tokens_per_expert(self):
        """<float32>[G, E]: tokens each expert receives."""
        num_groups = ops.shape(self.expert_index)[0]
        group = ops.arange(num_groups, dtype="int32")[:, None, None]
        # Choice (g, s, k) counts for expert g*E + e: (G, S, K) -> (G*E,)
        segment = group * self.num_experts + self.expert_index
        valid = ops.broadcast_to(
            ops.cast(self.token_mask, "float32")[..., None],
            ops.shape(self.expert_index),
        )
        counts = ops.segment_sum(
            ops.reshape(valid, (-1,)),
            ops.reshape(segment, (-1,)),
            num_segments=num_groups * self.num_experts,
        )
        return ops.reshape(counts, (num_groups, self.num_experts))

    def token_coverage(self):
        """<float32>[G, S]: experts each token is sent to (K, 0 if masked)."""
        return ops.cast(self.token_mask, "float32") * float(
            self.num_selected_experts
        )

    def expert_weights(self):
        """<float32>[G, S, E]: combine weight of token s for expert e."""
        return ops.einsum(
            "gske,gsk->gse", self._choice_one_hot(), self.combine_weights
        )


def tokens_choose(
    router_probs,
    num_selected_experts,
    expert_capacity,
    batch_priority=False,
    normalize_combine_weights=False,
    token_mask=None,
):
    """Token-choice routing: each token goes to its top-K experts.

    Every token's first choice is served before any token's second choice
    (GShard). Within a round tokens are served in their order in the group,
    or, with `batch_priority=True`, in descending order of their top router
    probability (V-MoE's BPR; ties keep token order). A choice whose expert
    already holds `expert_capacity` tokens is dropped.

    Args:
        router_probs: <float32>[G, S, E] router probabilities.
        num_selected_experts: K.
        expert_capacity: C, a Python int; None routes without capacity and
            returns `tokens_choose_dropless(...)` instead.
        batch_priority: serve confident tokens first.
        normalize_combine_weights: divide each token's combine weights by the
            sum of its kept weights (a token with no kept choice gets zeros).
        token_mask: optional <bool>[G, S]; False tokens are never routed and
            take no capacity (padding).

    Returns:
        `RoutingInstructions` (`DroplessRoutingInstructions` when
        `expert_capacity` is None).

    Example:

    >>> probs = keras.ops.softmax(keras.random.normal((2, 16, 4), seed=1))
    >>> routing = tokens_choose(probs, num_selected_experts=2,
    ...                         expert_capacity=8)
    >>> tuple(routing.combine_array().shape)
    (2, 16, 4, 8)
    """
    if expert_capacity is None:
        return tokens_choose_dropless(
            router_probs,
            num_selected_experts,
            batch_priority=batch_priority,
            normalize_combine_weights=normalize_combine_weights,
            token_mask=token_mask,
        )
    probs = _check_router_probs(router_probs)
    num_groups = ops.shape(probs)[0]
    num_tokens, num_experts = probs.shape[1], probs.shape[2]
    k = num_selected_experts
    check_positive_int("num_selected_experts", k)
    if k > num_experts:
        raise ValueError(
            "num_selected_experts must be at most the number of experts; "
            f"received num_selected_experts={k}, num_experts={num_experts}"
        )
    check_positive_int("expert_capacity", expert_capacity)
    capacity = expert_capacity
    valid = _token_mask(token_mask, probs)

    # gates, experts: (G, S, K); ties go to the lower expert id.
    gates, experts = ops.top_k(probs, k)
    experts = ops.cast(experts, "int32")

    if batch_priority:
        # service_order[g, i] = token served i-th; stable for equal gates.
        service_order = _stable_argsort(-gates[..., 0])
    else:
        service_order = ops.broadcast_to(
            ops.arange(num_tokens, dtype="int32")[None],
            (num_groups, num_tokens),
        )
    service_order = ops.cast(service_order, "int32")
    experts_in_order = ops.take_along_axis(
        experts, service_order[..., None], axis=1
    )
    valid_in_order = ops.take_along_axis(valid, service_order, axis=1)

    # Choices in service order, round-major: (G, S, K) -> (G, K, S) -> (G, K*S)
    choice_expert = ops.reshape(
        ops.transpose(experts_in_order, (0, 2, 1)), (num_groups, k * num_tokens)
    )
    choice_valid = ops.tile(valid_in_order, (1, k))
    # Position of each choice in its expert's queue: (G, K*S, E) -> (G, K*S)
    choice_one_hot = ops.one_hot(choice_expert, num_experts, dtype="int32")
    choice_one_hot = choice_one_hot * ops.cast(choice_valid, "int32")[..., None]
    position = ops.sum(
        (ops.cumsum(choice_one_hot, axis=1) - 1) * choice_one_hot, axis=-1
    )
    choice_kept = ops.logical_and(choice_valid, position < capacity)

    # Back to (G, S, K) in token order.
    kept_in_order = ops.transpose(
        ops.reshape(choice_kept, (num_groups, k, num_tokens)), (0, 2, 1)
    )
    inverse_order = ops.cast(_stable_argsort(service_order), "int32")
    kept = ops.take_along_axis(kept_in_order, inverse_order[..., None], axis=1)
    weights = gates * ops.cast(kept, "float32")
    if normalize_combine_weights:
        weights = _normalize(weights, axis=-1)

    # Slot form. A kept choice of expert e at queue position p fills slot
    # (e, p). Positions are contiguous from 0, so sorting kept choices by
    # e * C + p lists each expert's slots in order, and slot (e, c) is the
    # choice at offset[e] + c of that list when c < load[e]. Sort and gather
    # only (no scatter), which XLA and batch-sharded DTensors both keep local.
    sort_key = ops.where(
        choice_kept,
        choice_expert * capacity + position,
        num_experts * capacity,
    )
    sorted_choices = ops.cast(_stable_argsort(sort_key), "int32")
    load = ops.sum(
        choice_one_hot * ops.cast(choice_kept, "int32")[..., None], axis=1
    )  # (G, E)
    offset = ops.cumsum(load, axis=-1) - load  # exclusive cumsum, (G, E)
    slot = ops.arange(capacity, dtype="int32")
    filled = slot[None, None, :] < load[..., None]  # (G, E, C)
    flat_position = ops.minimum(
        offset[..., None] + slot[None, None, :], k * num_tokens - 1
    )
    choice_id = ops.take_along_axis(
        sorted_choices,
        ops.reshape(flat_position, (num_groups, num_experts * capacity)),
        axis=1,
    )
    choice_id = ops.reshape(choice_id, (num_groups, num_experts, capacity))
    # choice id -> (round, position in service order) -> token.
    round_index = choice_id // num_tokens
    token = ops.take_along_axis(
        service_order,
        ops.reshape(choice_id % num_tokens, (num_groups, -1)),
        axis=1,
    )
    token = ops.reshape(token, (num_groups, num_experts, capacity))
    token_index = ops.where(filled, token, 0)
    # Weight of a slot = weights[g, token, round].
    flat_weights = ops.reshape(weights, (num_groups, num_tokens * k))
    slot_weight = ops.take_along_axis(
        flat_weights,
        ops.reshape(token_index * k + round_index, (num_groups, -1)),
        axis=1,
    )
    slot_weight = ops.reshape(slot_weight, (num_groups, num_experts, capacity))
    dispatch_mask = ops.cast(filled, "float32")
    return RoutingInstructions(
        token_index=token_index,
        combine_weights=slot_weight * dispatch_mask,
        dispatch_mask=dispatch_mask,
        num_tokens=num_tokens,
    )


def tokens_choose_dropless(
    router_probs,
    num_selected_experts,
    batch_priority=False,
    normalize_combine_weights=False,
    token_mask=None,
):
    """Token-choice routing without capacity: every token keeps its top K.

    The dropless counterpart of `tokens_choose` (MegaBlocks, Gale et al.,
    2022): what `tokens_choose` returns when no expert can overflow, written
    per token instead of per slot, so that a dispatcher computes only the
    routed tokens (K per real token) instead of E * C slots. With
    `batch_priority=True` the service order is V-MoE's (descending top
    router probability, ties in token order); without a capacity it drops
    nothing and only orders each expert's work.

    Args:
        router_probs: <float32>[G, S, E] router probabilities.
        num_selected_experts: K.
        batch_priority: serve confident tokens first.
        normalize_combine_weights: divide each token's K weights by their
            sum.
        token_mask: optional <bool>[G, S]; False tokens are never routed
            (their combine weights are 0).

    Returns:
        `DroplessRoutingInstructions`.

    Example:

    >>> probs = keras.ops.softmax(keras.random.normal((2, 16, 4), seed=1))
    >>> routing = tokens_choose_dropless(probs, num_selected_experts=2)
    >>> tuple(routing.expert_index.shape)
    (2, 16, 2)
    """
    probs = _check_router_probs(router_probs)
    num_groups = ops.shape(probs)[0]
    num_tokens, num_experts = probs.shape[1], probs.shape[2]
    k = num_selected_experts
    check_positive_int("num_selected_experts", k)
    if k > num_experts:
        raise ValueError(
            "num_selected_experts must be at most the number of experts; "
            f"received num_selected_experts={k}, num_experts={num_experts}"
        )
    valid = _token_mask(token_mask, probs)
    # gates, experts: (G, S, K); ties go to the lower expert id.
    gates, experts = ops.top_k(probs, k)
    weights = gates * ops.cast(valid, "float32")[..., None]
    if normalize_combine_weights:
        weights = _normalize(weights, axis=-1)
    if batch_priority:
        # service_order[g, i] = token served i-th; stable for equal gates.
        service_order = _stable_argsort(-gates[..., 0])
    else:
        service_order = ops.broadcast_to(
            ops.arange(num_tokens, dtype="int32")[None],
            (num_groups, num_tokens),
        )
    return DroplessRoutingInstructions(
        expert_index=ops.cast(experts, "int32"),
        combine_weights=weights,
        token_mask=valid,
        service_order=ops.cast(service_order, "int32"),
        num_experts=num_experts,
    )


def experts_choose(
    router_probs,
    expert_capacity,
    normalize_combine_weights=False,
    token_mask=None,
):
    """Expert-choice routing: each expert takes its C most probable tokens.

    Every expert is exactly full, so there is nothing to balance; a token may
    be taken by several experts or by none. Expert choice must not be used in
    causal decoders (a token's routing depends on later tokens).

    Args:
        router_probs: <float32>[G, S, E] router probabilities.
        expert_capacity: C, a Python int, at most S.
        normalize_combine_weights: divide each token's combine weights by the
            sum of the weights of the experts that took it.
        token_mask: optional <bool>[G, S]; False tokens are never taken.

    Returns:
        `RoutingInstructions`.

    Example:

    >>> probs = keras.ops.softmax(keras.random.normal((2, 16, 4), seed=1))
    >>> routing = experts_choose(probs, expert_capacity=4)
    >>> tuple(routing.token_index.shape)
    (2, 4, 4)
    """
    if expert_capacity is None:
        raise ValueError(
            "expert choice has no dropless form: each expert takes exactly "
            "its expert_capacity best tokens, that is the router; pass an "
            "int expert_capacity (dropless routing is token choice only)"
        )
    probs = _check_router_probs(router_probs)
    num_tokens = probs.shape[1]
    check_positive_int("expert_capacity", expert_capacity)
    if expert_capacity > num_tokens:
        raise ValueError(
            "expert_capacity must be at most the tokens per group for expert "
            f"choice; received expert_capacity={expert_capacity}, "
            f"tokens per group={num_tokens}"
        )
    valid = ops.cast(_token_mask(token_mask, probs), "float32")
    # (G, S, E) -> (G, E, S). Masked tokens score -1, below any probability,
    # so they are only taken when an expert has more slots than real tokens.
    scores = ops.transpose(
        probs * valid[..., None] - (1.0 - valid[..., None]), (0, 2, 1)
    )
    gates, token_index = ops.top_k(scores, expert_capacity)
    token_index = ops.cast(token_index, "int32")
    dispatch_mask = ops.cast(gates >= 0.0, "float32")
    combine_weights = ops.maximum(gates, 0.0) * dispatch_mask
    if normalize_combine_weights:
        total = _scatter_to_tokens(combine_weights, token_index, num_tokens)
        total = ops.take_along_axis(
            total, ops.reshape(token_index, (ops.shape(total)[0], -1)), axis=1
        )
        total = ops.reshape(total, ops.shape(combine_weights))
        combine_weights = ops.where(total > 0, combine_weights / total, 0.0)
    return RoutingInstructions(
        token_index=token_index,
        combine_weights=combine_weights,
        dispatch_mask=dispatch_mask,
        num_tokens=num_tokens,
    )


def _scatter_to_tokens(slot_values, token_index, num_tokens):
    """Sums <float32>[G, E, C] slot values into <float32>[G, S] per token."""
    num_groups = ops.shape(token_index)[0]
    group = ops.arange(num_groups, dtype="int32")[:, None, None]
    segment = ops.reshape(group * num_tokens + token_index, (-1,))
    summed = ops.segment_sum(
        ops.reshape(slot_values, (-1,)), segment, num_groups * num_tokens
    )
    return ops.reshape(summed, (num_groups, num_tokens))


def _normalize(weights, axis):
    total = ops.sum(weights, axis=axis, keepdims=True)
    return ops.where(total > 0, weights / ops.where(total > 0, total, 1.0), 0.0)


def _token_mask(token_mask, probs):
    if token_mask is None:
        return ops.ones(ops.shape(probs)[:2], dtype="bool")
    if len(token_mask.shape) != 2:
        raise ValueError(
            "token_mask must be <bool>[G, S]; received shape "
            f"{tuple(token_mask.shape)}"
        )
    return ops.cast(token_mask, "bool")


def _check_router_probs(router_probs):
    probs = ops.cast(router_probs, "float32")
    if len(probs.shape) != 3:
        raise ValueError(
            "router_probs must be <float32>[G, S, E] (rank 3); received shape "
            f"{tuple(probs.shape)}"
        )
    if probs.shape[1] is None or probs.shape[2] is None:
        raise ValueError(
            "router_probs needs static S and E dimensions; received shape "
            f"{tuple(probs.shape)}"
        )
    if tf.executing_eagerly() and not bool(ops.all(ops.isfinite(probs))):
        raise ValueError(
            "router_probs contains NaN or infinite values; check the router "
            "logits (a NaN in the inputs or a diverged router)"
        )
    return probs
