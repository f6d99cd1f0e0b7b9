"""NumPy statements of the auxiliary losses, for tests only.

Written from the papers' equations (Switch Transformer eq. 4, ST-MoE's router
z-loss, V-MoE's importance and load losses, appendix A), independently of
`keras_moe/layers/losses.py`.
"""

import numpy as np
from scipy import stats


def np_load_balancing(probs, indices):
    num_groups, num_tokens, num_experts = probs.shape
    chosen = np.zeros_like(probs)
    for g in range(num_groups):
        for s in range(num_tokens):
            for e in indices[g, s]:
                if 0 <= e < num_experts:
                    chosen[g, s, e] = 1.0
    f = chosen.mean(axis=1)
    p = probs.mean(axis=1)
    return np.mean(num_experts * (f * p).sum(axis=-1))


def np_z_loss(logits):
    log_z = np.log(np.exp(logits.astype(np.float64)).sum(axis=-1))
    return np.mean(log_z**2)


def _np_groups(values, per_group):
    """[G, ..., E] -> [G, T, E] token sets (one set when not per group)."""
    num_experts = values.shape[-1]
    if per_group and values.ndim >= 3:
        return values.reshape(values.shape[0], -1, num_experts)
    return values.reshape(1, -1, num_experts)


def _np_mean_cv2(totals):
    return np.mean((totals.std(axis=-1, ddof=0) / totals.mean(axis=-1)) ** 2)


def np_importance(probs, per_group=True):
    return _np_mean_cv2(_np_groups(probs, per_group).sum(axis=1))


def np_load(logits, noisy, noise_std, k, per_group=True):
    threshold = np.sort(noisy, axis=-1)[..., -k]
    needed = (threshold[..., None] - logits) / noise_std
    p = 1.0 - stats.norm.cdf(needed)
    return _np_mean_cv2(_np_groups(p, per_group).sum(axis=1))
