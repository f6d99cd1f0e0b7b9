"""A NumPy MoeLayer (relu experts, groups = sequences), for tests only.

Routes with the loop-based statements of `reference_routing`, runs every
expert on every token and lets the combine array pick and weigh.
"""

import keras
import numpy as np

from tests.layers import reference_routing as ref


def _np(x):
    return keras.ops.convert_to_numpy(x)


def route(layer, probs, capacity, token_mask=None):
    """The reference routing of `layer`'s router type and settings."""
    if layer.router_type == "tokens_choose":
        return ref.tokens_choose(
            probs,
            layer.num_selected_experts,
            capacity,
            batch_priority=layer.batch_priority,
            normalize=layer.normalize_combine_weights,
            token_mask=token_mask,
        )
    return ref.experts_choose(
        probs,
        capacity,
        normalize=layer.normalize_combine_weights,
        token_mask=token_mask,
    )


def np_moe(layer, x, training):
    """NumPy MoeLayer for relu experts, groups = sequences (group_size None)."""
    kernel = _np(layer.router.kernel).astype(np.float64)
    wi = _np(layer.experts.input_kernels[0]).astype(np.float64)
    wo = _np(layer.experts.wo).astype(np.float64)
    probs = np.exp(x @ kernel)
    probs /= probs.sum(-1, keepdims=True)
    capacity = layer.capacity(x.shape[1], training)
    routed = route(layer, probs, capacity)
    # Every expert on every token, then the combine array picks and weighs.
    expert_out = np.einsum(
        "gseh,ehd->gsed", np.maximum(np.einsum("gsd,edh->gseh", x, wi), 0), wo
    )
    return np.einsum("gsec,gsed->gsd", routed.combine, expert_out), routed
