"""Small MoE models shared by the expert-parallel tests and their
subprocess scripts. Importing this module configures no device."""

import keras

from keras_moe.layers.moe import MoeLayer


def _router_init():
    # Large router weights: tokens spread over the experts unevenly, so
    # capacity and dropping matter.
    return keras.initializers.RandomNormal(stddev=1.0)


def one_moe_layer_model(num_experts, seed=0, head_name=None):
    """<[B, 6, 8]> -> token-choice top-2 MoeLayer "moe" -> Dense(3)
    logits."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6, 8))
    hidden = MoeLayer(
        num_experts,
        16,
        num_selected_experts=2,
        dispatcher="einsum",
        router_kernel_initializer=_router_init(),
        name="moe",
    )(inputs)
    outputs = keras.layers.Dense(3, name=head_name)(
        keras.layers.Flatten()(hidden)
    )
    return keras.Model(inputs, outputs)


def two_moe_layers_model(num_experts, seed=0):
    """<[B, 6, 8]> -> token-choice top-2 MoeLayer "moe" (einsum) ->
    expert-choice MoeLayer "moe_2" (index dispatch, biases) ->
    Dense(3, softmax)."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6, 8))
    hidden = MoeLayer(
        num_experts,
        16,
        num_selected_experts=2,
        dispatcher="einsum",
        router_kernel_initializer=_router_init(),
        name="moe",
    )(inputs)
    hidden = MoeLayer(
        num_experts,
        16,
        router="experts_choose",
        dispatcher="indices",
        use_bias=True,
        router_kernel_initializer=_router_init(),
        name="moe_2",
    )(hidden)
    outputs = keras.layers.Dense(3, activation="softmax")(
        keras.layers.Flatten()(hidden)
    )
    return keras.Model(inputs, outputs, name="model")
