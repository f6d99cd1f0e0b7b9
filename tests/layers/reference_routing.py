"""NumPy statement of the MoE routing algorithms, for tests only.

Written from the papers' definitions, independently of
`keras_moe/layers/routing.py`, and deliberately slow: plain loops that serve
one token at a time, so that each rule can be read off the code.

Shape letters: G groups, S tokens per group, E experts, K selected experts per
token (`num_selected_experts`), C slots per expert (`expert_capacity`).

- Switch Transformer (Fedus et al. 2021): each token goes to its top-1 expert;
  an expert takes tokens until its C slots are full, the rest are dropped.
- GShard (Lepikhin et al. 2020): top-2 (here top-K); every token's first
  choice is served before any token's second choice (rounds are k-major).
- V-MoE batch prioritized routing (Riquelme et al. 2021): in every round the
  tokens are served in descending order of their top-1 router probability
  (ties keep token order), instead of left to right.
- Expert Choice (Zhou et al. 2022): each expert takes its C tokens of highest
  router probability (ties: lower token index first); slot c holds the
  expert's (c+1)-th best token.

Token choice fills an expert's slots in service order: the n-th token an
expert accepts goes to slot n. Combine weight of a kept choice is the router
probability of that (token, expert) pair; with `normalize=True` it is divided
by the sum of the token's kept weights (all zeros if nothing was kept).
"""

import collections
import fractions
import math

import numpy as np

# combine: <float64>[..., S, E, C]; dispatch: <float64>[..., S, E, C] in {0, 1};
# num_dropped: python int, the number of (token, choice) pairs that found
# their expert full (token choice) -- always 0 for expert choice.
Routed = collections.namedtuple(
    "Routed", ["combine", "dispatch", "num_dropped"]
)


def expert_capacity(
    num_tokens,
    num_experts,
    capacity_factor,
    num_selected_experts=1,
    min_expert_capacity=4,
    router="tokens_choose",
):
    """Slots per expert, computed in exact rational arithmetic.

    The factor is read as the decimal the user wrote (1.1 is 11/10), so that
    ceil() sees 20 * 1.1 / 2 as exactly 11, not as 11.000000000000002.
    """
    if capacity_factor is None:
        return num_tokens
    factor = fractions.Fraction(repr(float(capacity_factor)))
    if router == "tokens_choose":
        ideal = num_selected_experts * num_tokens * factor / num_experts
    else:
        ideal = num_tokens * factor / num_experts
    return min(max(math.ceil(ideal), min_expert_capacity), num_tokens)


def top_k_experts(token_probs, k):
    """The k experts of highest probability, best first; ties: lower id."""
    num_experts = len(token_probs)
    ranked = sorted(range(num_experts), key=lambda e: (-token_probs[e], e))
    return ranked[:k]


def service_order(router_probs, batch_priority, token_mask):
    """Order in which the unmasked tokens of one group are served."""
    tokens = [s for s in range(router_probs.shape[0]) if token_mask[s]]
    if batch_priority:
        # Python's sort is stable: equal top-1 probabilities keep token order.
        tokens = sorted(tokens, key=lambda s: -np.max(router_probs[s]))
    return tokens


def _normalize_per_token(combine):
    """Divides each token's [E, C] weights by their sum (zeros stay zeros)."""
    combine = combine.copy()
    for s in range(combine.shape[0]):
        total = combine[s].sum()
        if total > 0:
            combine[s] /= total
    return combine


def tokens_choose_group(
    router_probs,
    num_selected_experts,
    expert_capacity,
    batch_priority=False,
    normalize=False,
    token_mask=None,
):
    """Token choice routing of one group; router_probs is [S, E]."""
    router_probs = np.asarray(router_probs, dtype=np.float64)
    num_tokens, num_experts = router_probs.shape
    if token_mask is None:
        token_mask = np.ones([num_tokens], dtype=bool)
    combine = np.zeros([num_tokens, num_experts, expert_capacity])
    dispatch = np.zeros([num_tokens, num_experts, expert_capacity])
    choices = [
        top_k_experts(router_probs[s], num_selected_experts)
        for s in range(num_tokens)
    ]
    order = service_order(router_probs, batch_priority, token_mask)
    fill = [0] * num_experts
    num_dropped = 0
    for k in range(num_selected_experts):
        for s in order:
            e = choices[s][k]
            if fill[e] < expert_capacity:
                c = fill[e]
                dispatch[s, e, c] = 1.0
                combine[s, e, c] = router_probs[s, e]
                fill[e] += 1
            else:
                num_dropped += 1
    if normalize:
        combine = _normalize_per_token(combine)
    return Routed(combine, dispatch, num_dropped)


def experts_choose_group(
    router_probs, expert_capacity, normalize=False, token_mask=None
):
    """Expert choice routing of one group; router_probs is [S, E]."""
    router_probs = np.asarray(router_probs, dtype=np.float64)
    num_tokens, num_experts = router_probs.shape
    if token_mask is None:
        token_mask = np.ones([num_tokens], dtype=bool)
    combine = np.zeros([num_tokens, num_experts, expert_capacity])
    dispatch = np.zeros([num_tokens, num_experts, expert_capacity])
    for e in range(num_experts):
        candidates = [s for s in range(num_tokens) if token_mask[s]]
        ranked = sorted(candidates, key=lambda s: (-router_probs[s, e], s))
        for c, s in enumerate(ranked[:expert_capacity]):
            dispatch[s, e, c] = 1.0
            combine[s, e, c] = router_probs[s, e]
    if normalize:
        combine = _normalize_per_token(combine)
    return Routed(combine, dispatch, 0)


def _stack(routed_groups):
    return Routed(
        np.stack([r.combine for r in routed_groups]),
        np.stack([r.dispatch for r in routed_groups]),
        sum(r.num_dropped for r in routed_groups),
    )


def tokens_choose(
    router_probs,
    num_selected_experts,
    expert_capacity,
    batch_priority=False,
    normalize=False,
    token_mask=None,
):
    """Token choice routing; router_probs is [G, S, E], arrays [G, S, E, C]."""
    router_probs = np.asarray(router_probs)
    return _stack(
        [
            tokens_choose_group(
                router_probs[g],
                num_selected_experts,
                expert_capacity,
                batch_priority=batch_priority,
                normalize=normalize,
                token_mask=None if token_mask is None else token_mask[g],
            )
            for g in range(router_probs.shape[0])
        ]
    )


def experts_choose(
    router_probs, expert_capacity, normalize=False, token_mask=None
):
    """Expert choice routing; router_probs is [G, S, E], arrays [G, S, E, C]."""
    router_probs = np.asarray(router_probs)
    return _stack(
        [
            experts_choose_group(
                router_probs[g],
                expert_capacity,
                normalize=normalize,
                token_mask=None if token_mask is None else token_mask[g],
            )
            for g in range(router_probs.shape[0])
        ]
    )
