"""Auxiliary losses of sparse Mixture-of-Experts routers.

Shape letters (the glossary of docs/ARCHITECTURE.md):

    G  groups
    S  tokens per group
    E  experts
    K  num_selected_experts
    ...  any number of leading token axes

Every loss is a pure function written with `keras.ops`. Inputs are cast to
float32 whatever the compute dtype (selective precision), the result is a
float32 scalar, and every function is XLA-safe: it runs inside
`tf.function(jit_compile=True)` on computed tensors (counts are taken with
`one_hot` and a reduction, never with `bincount`). Shapes are checked
statically, so a wrong input fails when the function is traced.

References:

- Switch Transformers: Fedus, Zoph and Shazeer, 2021,
  https://arxiv.org/abs/2101.03961.
- ST-MoE: Zoph et al., 2022, https://arxiv.org/abs/2202.08906.
- V-MoE: Riquelme et al., 2021, https://arxiv.org/abs/2106.05974.
"""

import math
import numbers

import keras
import numpy as np
import tensorflow as tf
from keras import ops

__all__ = [
    "importance_loss",
    "load_balancing_loss",
    "load_loss",
    "router_z_loss",
]


def load_balancing_loss(router_probs, expert_indices):
    """Switch Transformer load-balancing loss (Fedus et al. 2021, eq. 4).

    For each group g, with f[g, e] the fraction of the group's tokens that
    chose expert e among their top K and P[g, e] the mean router probability
    of expert e over the group's tokens,

        loss = mean_g ( E * sum_e f[g, e] * P[g, e] ).

    Only P carries a gradient. With K = 1, perfectly uniform routing gives
    1.0; with K > 1 a token counts once for each expert it chose, so uniform
    routing gives K.

    Args:
        router_probs: <float>[G, S, E] router probabilities (softmax of the
            router logits). E must be known statically.
        expert_indices: <int>[G, S, K] experts chosen by each token, before
            any capacity drop. An index outside [0, E) (e.g. -1 for a padding
            token) selects no expert.

    Returns:
        <float32>[] the loss.

    Raises:
        ValueError: if a rank, the expert count or the [G, S] axes of the two
            inputs are wrong, or `expert_indices` is not an integer tensor.

    Example:

    >>> probs = [[[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.8, 0.2]]]
    >>> chosen = [[[0], [0], [1], [0]]]
    >>> round(float(load_balancing_loss(probs, chosen)), 4)
    1.15
    """
    probs = _as_float32(router_probs)
    shape = _checked_shape(probs, "router_probs", "[G, S, E]", rank=3)
    num_experts = _known_num_experts(shape, "router_probs")
    indices = ops.convert_to_tensor(expert_indices)
    dtype = keras.backend.standardize_dtype(indices.dtype)
    if "int" not in dtype:
        raise ValueError(
            f"expert_indices must be an integer tensor <int>[G, S, K]; "
            f"got dtype {dtype}."
        )
    index_shape = _checked_shape(indices, "expert_indices", "[G, S, K]", rank=3)
    for axis, letter in ((0, "G"), (1, "S")):
        if None not in (shape[axis], index_shape[axis]) and (
            shape[axis] != index_shape[axis]
        ):
            raise ValueError(
                f"expert_indices {index_shape} and router_probs {shape} "
                f"must agree on axis {axis} ({letter})."
            )
    num_selected = index_shape[-1]
    if num_selected is not None and not 1 <= num_selected <= num_experts:
        raise ValueError(
            f"expert_indices has last axis K = {num_selected}; expected "
            f"1 <= K <= E = {num_experts} (router_probs {shape})."
        )

    # [G, S, K] -> [G, S, K, E] -> [G, S, E]: 1 where e is one of the token's
    # choices. `max` rather than `sum` so a repeated index counts once.
    chosen = ops.max(ops.one_hot(indices, num_experts, dtype="float32"), -2)
    # [G, S, E] -> [G, E]
    fraction_routed = ops.mean(chosen, axis=1)
    mean_prob = ops.mean(probs, axis=1)
    per_group = num_experts * ops.sum(fraction_routed * mean_prob, axis=-1)
    return ops.mean(per_group)


def router_z_loss(router_logits):
    """ST-MoE router z-loss (Zoph et al. 2022, eq. 5).

        loss = mean over all G * S tokens of ( logsumexp_e logits )^2.

    It keeps router logits small, which stabilises training; zero logits give
    log(E)^2.

    Args:
        router_logits: <float>[G, S, E] router logits, before the softmax.

    Returns:
        <float32>[] the loss.

    Raises:
        ValueError: if `router_logits` is not of rank 3.

    Example:

    >>> round(float(router_z_loss([[[0.0, 0.0], [0.0, 0.0]]])), 4)
    0.4805
    """
    logits = _as_float32(router_logits)
    _checked_shape(logits, "router_logits", "[G, S, E]", rank=3)
    # [G, S, E] -> [G, S]
    log_z = ops.logsumexp(logits, axis=-1)
    return ops.mean(ops.square(log_z))


def importance_loss(router_probs, *, per_group=True):
    """V-MoE importance loss (Riquelme et al. 2021, appendix A.2).

    With importance[e] the sum of the router probabilities of expert e over
    a set of tokens,

        loss = ( std_e(importance) / mean_e(importance) )^2,

    the squared coefficient of variation, with the population (ddof=0)
    standard deviation. It is computed as var / mean^2, which has the same
    value and, unlike std, a gradient where all experts are equally
    important. Uniform router probabilities give 0.

    The set of tokens, as in google-research/vmoe: with `per_group=True`
    (default) axis 0 of a rank >= 3 input is the group axis, the loss is
    computed on each group's tokens and averaged over groups; a rank-2
    input is one group. With `per_group=False` all leading axes are pooled
    into one set of tokens.

    Args:
        router_probs: <float>[G, ..., E] (or [S, E]) router probabilities,
            before any noise is added. E must be known statically.
        per_group: keyword only; see above.

    Returns:
        <float32>[] the loss.

    Raises:
        ValueError: if `router_probs` has rank < 2 or an unknown E.

    Example:

    >>> probs = [[[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.8, 0.2]]]
    >>> round(float(importance_loss(probs)), 4)
    0.09
    """
    probs = _as_float32(router_probs)
    shape = _checked_shape(probs, "router_probs", "[G, ..., E]", min_rank=2)
    _known_num_experts(shape, "router_probs")
    return _mean_squared_cv(_sum_over_tokens(probs, per_group))


def load_loss(
    router_logits,
    noisy_router_logits,
    noise_std,
    num_selected_experts,
    *,
    per_group=True,
):
    """V-MoE load loss (Riquelme et al. 2021, appendix A.2).

    For token t, the threshold is the K-th largest of its noisy logits, the
    same threshold for every expert, whether the expert is inside or outside
    the token's top K (as in the paper and google-research/vmoe; Shazeer et
    al. 2017 instead leave the expert itself out of the ranking). The
    probability that expert e would be selected if the noise were drawn
    again is

        p[t, e] = P(logit[t, e] + eps >= threshold[t]),  eps ~ N(0, noise_std)
                = 1 - Phi((threshold[t] - logit[t, e]) / noise_std),

    load[e] = sum_t p[t, e], and loss = ( std_e(load) / mean_e(load) )^2
    (ddof=0, computed as var / mean^2). Gradients reach the clean logits
    directly and through the threshold (noisy = clean + noise).

    Tokens are grouped as in `importance_loss` (`per_group`).

    Args:
        router_logits: <float>[G, ..., E] (or [S, E]) clean router logits.
        noisy_router_logits: <float>, same shape: `router_logits` plus the
            noise the router drew, the logits that chose the experts.
        noise_std: positive float (or float32 scalar tensor), the standard
            deviation of that noise (V-MoE uses 1 / E).
        num_selected_experts: python int K, 1 <= K <= E.
        per_group: keyword only; see `importance_loss`.

    Returns:
        <float32>[] the loss.

    Raises:
        ValueError: if the shapes differ, the rank is < 2, E is unknown,
            `noise_std` is not positive or K is out of range.

    Example:

    >>> logits = [[1.0, 0.5, 0.0]]
    >>> noisy = [[1.2, 0.5, 0.1]]
    >>> round(float(load_loss(logits, noisy, 0.5, 2)), 4)
    0.3107
    """
    logits = _as_float32(router_logits)
    noisy = _as_float32(noisy_router_logits)
    shape = _checked_shape(logits, "router_logits", "[G, ..., E]", min_rank=2)
    noisy_shape = tuple(noisy.shape)
    if len(noisy_shape) != len(shape) or any(
        None not in (a, b) and a != b for a, b in zip(shape, noisy_shape)
    ):
        raise ValueError(
            f"noisy_router_logits {noisy_shape} must have the shape of "
            f"router_logits {shape}."
        )
    num_experts = _known_num_experts(shape, "router_logits")
    if (
        isinstance(num_selected_experts, bool)
        or not isinstance(num_selected_experts, numbers.Integral)
        or not 1 <= num_selected_experts <= num_experts
    ):
        raise ValueError(
            f"num_selected_experts must be an int with 1 <= K <= E = "
            f"{num_experts}; got {num_selected_experts!r}."
        )
    _check_noise_std(noise_std)
    noise_std = ops.cast(noise_std, "float32")

    # [..., E] -> [..., K] -> [...]: the K-th largest noisy logit per token.
    top_values, _ = ops.top_k(noisy, int(num_selected_experts), sorted=True)
    threshold = top_values[..., -1]
    # [..., E] noise each expert would need to reach its token's threshold.
    needed = (ops.expand_dims(threshold, -1) - logits) / noise_std
    # P(eps / std >= needed) = 1 - Phi(needed) = erfc(needed / sqrt 2) / 2;
    # erfc keeps its precision far in the upper tail, 1 - Phi does not.
    p_selected = 0.5 * ops.erfc(needed / math.sqrt(2.0))
    return _mean_squared_cv(_sum_over_tokens(p_selected, per_group))


def _as_float32(x):
    return ops.cast(ops.convert_to_tensor(x), "float32")


def _checked_shape(x, name, expected, rank=None, min_rank=None):
    """Returns the static shape of `x` as a tuple, checking its rank."""
    # TensorShape of unknown rank has no length.
    if getattr(x.shape, "rank", 0) is None:
        raise ValueError(f"{name} must have a known rank; expected {expected}.")
    shape = tuple(x.shape)
    if (rank is not None and len(shape) != rank) or (
        min_rank is not None and len(shape) < min_rank
    ):
        wanted = f"rank {rank}" if rank is not None else f"rank >= {min_rank}"
        raise ValueError(
            f"{name} must be {expected} ({wanted}); got rank {len(shape)}, "
            f"shape {shape}."
        )
    return shape


def _known_num_experts(shape, name):
    num_experts = shape[-1]
    if num_experts is None or num_experts < 1:
        raise ValueError(
            f"{name} must have a statically known number of experts E >= 1 "
            f"on its last axis; got shape {shape}."
        )
    return num_experts


def _check_noise_std(noise_std):
    # keras.ops cannot read a tensor's value while tracing; tf.get_static_value
    # does, for Python numbers, eager tensors and constants alike (None if the
    # value is only known at run time).
    value = tf.get_static_value(noise_std)
    if value is None:
        return
    value = np.asarray(value)
    if value.ndim != 0 or not np.isfinite(value) or value <= 0:
        raise ValueError(
            f"noise_std must be a finite scalar > 0; got {noise_std!r}."
        )


def _sum_over_tokens(values, per_group):
    """Sums <float32>[G, ..., E] over its tokens -> [G, E] (or [1, E])."""
    rank = len(values.shape)
    if per_group and rank >= 3:
        # [G, ..., E] -> [G, E]
        return ops.sum(values, axis=tuple(range(1, rank - 1)))
    # [..., E] -> [1, E]: all tokens form one set.
    return ops.sum(values, axis=tuple(range(rank - 1)))[None, :]


def _mean_squared_cv(totals):
    """Mean over rows of var/mean^2 along the last axis of <float32>[G, E]."""
    variance = ops.var(totals, axis=-1)
    mean = ops.mean(totals, axis=-1)
    return ops.mean(variance / ops.square(mean))
