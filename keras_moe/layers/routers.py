"""Router layers: float32 router weights, noise, and auxiliary losses.

Shape letters: G groups, S tokens per group, E experts, K experts per token,
C expert capacity, D model dimension.

A router maps tokens <[G, S, D]> to logits <float32>[G, S, E], turns them into
probabilities, routes with `routing.tokens_choose` or `routing.experts_choose`
and reports its auxiliary losses (unweighted, so that the caller decides how
to add them). Router maths runs in float32 whatever the dtype policy, so the
layers are built with `dtype="float32"` by default.

A router is called like any Keras layer,
`router(groups, expert_capacity=C, training=..., token_mask=...)`, and is
built by Keras from the shape of `groups`; `route` is the same call with
the capacity allowed positionally.
"""

import dataclasses

import keras
from keras import ops

from keras_moe.layers import losses
from keras_moe.layers import routing


@dataclasses.dataclass
class RouterOutput:
    """What a router returns for a batch of groups.

    Attributes:
        instructions: `routing.RoutingInstructions`.
        router_probs: <float32>[G, S, E].
        router_logits: <float32>[G, S, E], before noise.
        aux_losses: dict name -> <float32>[] unweighted auxiliary loss.
    """

    instructions: routing.RoutingInstructions
    router_probs: object
    router_logits: object
    aux_losses: dict


def check_router_arguments(num_experts, jitter_noise, noise_std):
    """Raises a ValueError for a bad E or noise level of a `Router`.

    Also called by `MoeLayer.__init__`, which makes its router only in
    `build` but should refuse bad arguments when it is constructed.
    """
    if isinstance(num_experts, bool) or not isinstance(num_experts, int):
        raise ValueError(
            f"num_experts must be an int >= 1; received {num_experts!r}"
        )
    if num_experts < 1:
        raise ValueError(
            f"num_experts must be an int >= 1; received {num_experts}"
        )
    if not 0.0 <= jitter_noise < 1.0:
        raise ValueError(
            f"jitter_noise must be in [0, 1); received {jitter_noise!r}"
        )
    if not noise_std >= 0.0:
        raise ValueError(f"noise_std must be >= 0; received {noise_std!r}")


class Router(keras.layers.Layer):
    """Base router: a bias-free dense projection D -> E in float32.

    Args:
        num_experts: E.
        kernel_initializer: initializer of the <float32>[D, E] router kernel.
        jitter_noise: Switch Transformer's multiplicative input noise; during
            training inputs are scaled by Uniform(1 - eps, 1 + eps).
        noise_std: V-MoE's additive Gaussian noise on the logits during
            training (V-MoE uses 1 / E). Routing uses the noisy logits; the
            combine weights come from the noisy softmax, as in V-MoE.
        seed: seed of the noise.
        **kwargs: passed to `keras.layers.Layer` (`dtype` defaults to
            float32).
    """

    def __init__(
        self,
        num_experts,
        kernel_initializer="glorot_uniform",
        jitter_noise=0.0,
        noise_std=0.0,
        seed=None,
        **kwargs,
    ):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        check_router_arguments(num_experts, jitter_noise, noise_std)
        self.num_experts = num_experts
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.jitter_noise = float(jitter_noise)
        self.noise_std = float(noise_std)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def build(self, input_shape):
        model_dim = input_shape[-1]
        if model_dim is None:
            raise ValueError(
                "The last (model) dimension of the router input must be "
                f"known; received input_shape={input_shape}"
            )
        self.kernel = self.add_weight(
            name="kernel",
            shape=(model_dim, self.num_experts),
            initializer=self.kernel_initializer,
            dtype="float32",
        )

    def compute_logits(self, inputs, training=False):
        """Returns (clean logits, noisy logits), <float32>[G, S, E] each."""
        x = ops.cast(inputs, "float32")
        if training and self.jitter_noise > 0:
            x = x * keras.random.uniform(
                ops.shape(x),
                1.0 - self.jitter_noise,
                1.0 + self.jitter_noise,
                seed=self.seed_generator,
            )
        logits = self._project(x)
        noisy = logits
        if training and self.noise_std > 0:
            noisy = logits + self.noise_std * keras.random.normal(
                ops.shape(logits), seed=self.seed_generator
            )
        return logits, noisy

    def _project(self, x):
        """Tokens <float32>[G, S, D] -> logits <float32>[G, S, E]."""
        return ops.matmul(x, self.kernel)

    def call(self, inputs, expert_capacity, training=False, token_mask=None):
        """Routes <[G, S, D]> tokens; returns a `RouterOutput`.

        Args:
            inputs: groups of tokens <[G, S, D]>.
            expert_capacity: C, a Python int; None (token choice only) for
                dropless routing: every token keeps its K experts
                (`routing.tokens_choose_dropless`).
            training: whether to add the router noise.
            token_mask: optional <bool>[G, S]; False tokens (padding) are
                never routed.
        """
        logits, noisy = self.compute_logits(inputs, training)
        probs = ops.softmax(noisy, axis=-1)
        instructions = self._route(probs, expert_capacity, token_mask)
        aux = {"router_z_loss": losses.router_z_loss(noisy)}
        aux.update(self._aux_losses(logits, noisy, probs, training))
        return RouterOutput(instructions, probs, logits, aux)

    def route(self, inputs, expert_capacity, training=False, token_mask=None):
        """`self(inputs, expert_capacity=...)`: the layer call (see `call`).

        Keras' `__call__` takes only tensors positionally; this spelling
        also takes the capacity as the second positional argument.
        """
        return self(
            inputs,
            expert_capacity=expert_capacity,
            training=training,
            token_mask=token_mask,
        )

    def _route(self, probs, expert_capacity, token_mask):
        raise NotImplementedError

    def _aux_losses(self, logits, noisy, probs, training):
        return {}

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_experts": self.num_experts,
                "kernel_initializer": keras.initializers.serialize(
                    self.kernel_initializer
                ),
                "jitter_noise": self.jitter_noise,
                "noise_std": self.noise_std,
                "seed": self.seed,
            }
        )
        return config


@keras.saving.register_keras_serializable(package="keras_moe")
class TokensChooseRouter(Router):
    """Token-choice router: top-K experts per token (Switch K=1, GShard K=2).

    Auxiliary losses: `router_z_loss`, `load_balancing_loss` (Switch, on the
    chosen experts before capacity drops), `importance_loss` (V-MoE, on the
    softmax of the clean logits, as vmoe computes it) and,
    when `noise_std > 0` during training, `load_loss` (V-MoE noisy top-K).

    Args:
        num_experts: E.
        num_selected_experts: K.
        batch_priority: V-MoE batch prioritized routing.
        normalize_combine_weights: renormalise each token's kept weights.
        **kwargs: `Router` arguments.

    Example:

    >>> router = TokensChooseRouter(num_experts=4, num_selected_experts=2)
    >>> out = router(keras.random.normal((2, 8, 16)), expert_capacity=4)
    >>> tuple(out.instructions.combine_array().shape)
    (2, 8, 4, 4)
    """

    def __init__(
        self,
        num_experts,
        num_selected_experts=1,
        batch_priority=False,
        normalize_combine_weights=False,
        **kwargs,
    ):
        super().__init__(num_experts, **kwargs)
        if (
            isinstance(num_selected_experts, bool)
            or not isinstance(num_selected_experts, int)
            or not 1 <= num_selected_experts <= num_experts
        ):
            raise ValueError(
                "num_selected_experts must be an int in [1, num_experts="
                f"{num_experts}]; received {num_selected_experts!r}"
            )
        self.num_selected_experts = num_selected_experts
        self.batch_priority = bool(batch_priority)
        self.normalize_combine_weights = bool(normalize_combine_weights)

    def _route(self, probs, expert_capacity, token_mask):
        return routing.tokens_choose(
            probs,
            self.num_selected_experts,
            expert_capacity,
            batch_priority=self.batch_priority,
            normalize_combine_weights=self.normalize_combine_weights,
            token_mask=token_mask,
        )

    def _aux_losses(self, logits, noisy, probs, training):
        _, chosen = ops.top_k(probs, self.num_selected_experts)
        aux = {
            "load_balancing_loss": losses.load_balancing_loss(
                probs, ops.cast(chosen, "int32")
            ),
            # V-MoE: importance of the clean softmax, before the noise.
            "importance_loss": losses.importance_loss(
                ops.softmax(logits, axis=-1)
            ),
        }
        if training and self.noise_std > 0:
            aux["load_loss"] = losses.load_loss(
                logits, noisy, self.noise_std, self.num_selected_experts
            )
        return aux

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_selected_experts": self.num_selected_experts,
                "batch_priority": self.batch_priority,
                "normalize_combine_weights": self.normalize_combine_weights,
            }
        )
        return config


@keras.saving.register_keras_serializable(package="keras_moe")
class ExpertsChooseRouter(Router):
    """Expert-choice router: each expert takes its C most probable tokens.

    Experts are balanced by construction; the only auxiliary loss is the
    router z-loss. Must not be used in causal decoders.

    Args:
        num_experts: E.
        normalize_combine_weights: renormalise each token's weights over the
            experts that took it.
        **kwargs: `Router` arguments.

    Example:

    >>> router = ExpertsChooseRouter(num_experts=4)
    >>> out = router(keras.random.normal((2, 8, 16)), expert_capacity=2)
    >>> tuple(out.instructions.token_index.shape)
    (2, 4, 2)
    """

    def __init__(self, num_experts, normalize_combine_weights=False, **kwargs):
        super().__init__(num_experts, **kwargs)
        self.normalize_combine_weights = bool(normalize_combine_weights)

    def _route(self, probs, expert_capacity, token_mask):
        return routing.experts_choose(
            probs,
            expert_capacity,
            normalize_combine_weights=self.normalize_combine_weights,
            token_mask=token_mask,
        )

    def get_config(self):
        config = super().get_config()
        config["normalize_combine_weights"] = self.normalize_combine_weights
        return config
