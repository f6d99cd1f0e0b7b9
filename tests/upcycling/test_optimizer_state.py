"""keras_moe.upcycle_optimizer: step-consistent optimizer state.

The exact test: with a zero router kernel, token choice with K = E,
renormalised combine weights, no drops, no auxiliary losses and identical
experts, every expert receives exactly 1/E of the dense MLP's gradient and
the MoE block computes the dense MLP. One optimizer step from the dense
optimizer's state must then leave the upcycled model computing what the
dense model computes after the same dense step. The old behaviour (slots
copied unchanged, `state="copy"`) must fail the same comparison.
"""

import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_moe import upcycling
from keras_moe.models.moe_blocks import moe_layers
from keras_moe.upcycling import optimizer_state
from tests import tiny_models

_NO_AUX = {"router_z_loss_weight": 0.0, "load_balancing_loss_weight": 0.0}
_LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
NUM_EXPERTS = 4

OPTIMIZERS = {
    "adam": lambda: keras.optimizers.Adam(1e-2),
    "adamw": lambda: keras.optimizers.AdamW(1e-2, weight_decay=0.1),
    "adafactor": lambda: keras.optimizers.Adafactor(1e-2),
}


def _data(seed=0, count=8):
    images = tiny_models.images(count, seed=seed)
    labels = np.random.default_rng(seed).integers(0, 10, size=count)
    return images, labels


def _step(model, optimizer, images, labels):
    with tf.GradientTape() as tape:
        loss = _LOSS(labels, model(images, training=True))
        loss += sum(model.losses) if model.losses else 0.0
    variables = model.trainable_variables
    optimizer.apply(tape.gradient(loss, variables), variables)


def _pretrained(make_optimizer, steps=3):
    """A dense ViT and the optimizer that trained it for `steps` steps."""
    dense = tiny_models.tiny_vit()
    optimizer = make_optimizer()
    for step in range(steps):
        _step(dense, optimizer, *_data(seed=10 + step))
    return dense, optimizer


def _exact_case_moe(dense, **overrides):
    kwargs = dict(
        encoder_router="tokens_choose",
        num_selected_experts=NUM_EXPERTS,
        normalize_combine_weights=True,
        train_capacity_factor=None,
        eval_capacity_factor=None,
        router_kernel_initializer="zeros",
        moe_kwargs=_NO_AUX,
        blocks="all",
    )
    kwargs.update(overrides)
    return upcycling.upcycle(dense, num_experts=NUM_EXPERTS, **kwargs)


def _after_one_step(make_optimizer, state):
    """(dense outputs, upcycled outputs) after the same step from the same
    dense optimizer state."""
    dense, dense_optimizer = _pretrained(make_optimizer)
    moe = _exact_case_moe(dense)
    moe_optimizer = upcycling.upcycle_optimizer(
        dense_optimizer, dense, moe, state=state
    )
    images, labels = _data(seed=1)
    _step(moe, moe_optimizer, images, labels)
    _step(dense, dense_optimizer, images, labels)
    test_images = tiny_models.images(6, seed=2)
    return (
        keras.ops.convert_to_numpy(dense(test_images)),
        keras.ops.convert_to_numpy(moe(test_images)),
    )


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_rescaled_state_keeps_the_upcycled_step_equal_to_the_dense_step(name):
    dense_out, moe_out = _after_one_step(OPTIMIZERS[name], "rescale")
    np.testing.assert_allclose(moe_out, dense_out, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_copied_state_breaks_the_step(name):
    # The old behaviour: each expert gets 1/E of the gradient but keeps the
    # dense second moment, so it moves about 1/E as far as the dense MLP.
    dense_out, moe_out = _after_one_step(OPTIMIZERS[name], "copy")
    assert np.abs(moe_out - dense_out).max() > 1e-4


def test_shares_follow_the_routing_settings():
    dense = tiny_models.tiny_vit()
    cases = [
        (dict(normalize_combine_weights=True), 1 / 4),
        (
            dict(
                encoder_router="tokens_choose",
                num_selected_experts=2,
                normalize_combine_weights=False,
            ),
            2 / 16,
        ),
        (
            dict(
                encoder_router="experts_choose",
                train_capacity_factor=2.0,
                normalize_combine_weights=False,
            ),
            2 / 16,
        ),
        (
            dict(
                encoder_router="tokens_choose",
                num_selected_experts=1,
                normalize_combine_weights=True,
                ensemble_size=2,
            ),
            1 / 4,
        ),
    ]
    for kwargs, expected in cases:
        moe = upcycling.upcycle(dense, num_experts=4, blocks=[1], **kwargs)
        (layer,) = moe_layers(moe)
        assert optimizer_state.expert_gradient_share(layer) == pytest.approx(
            expected
        ), kwargs


def test_rescale_scales_moments_by_the_share_and_its_square():
    dense, adam = _pretrained(OPTIMIZERS["adam"])
    moe = _exact_case_moe(dense, blocks=[1])
    upcycled = upcycling.upcycle_optimizer(adam, dense, moe)
    assert isinstance(upcycled, optimizer_state.UpcycledAdam)
    assert int(upcycled.iterations) == int(adam.iterations) == 3
    dense_wi = dense.blocks[1].mlp.input_kernels[0]
    expert_wi = moe.blocks[1].mlp.experts.input_kernels[0]
    source = adam._get_variable_index(dense_wi)
    target = upcycled._get_variable_index(expert_wi)
    share = 1 / NUM_EXPERTS
    for e in range(NUM_EXPERTS):
        np.testing.assert_allclose(
            upcycled._momentums[target][e], adam._momentums[source] * share
        )
        np.testing.assert_allclose(
            upcycled._velocities[target][e],
            adam._velocities[source] * share**2,
            rtol=1e-6,
        )
    # Shared weights keep their slots; the router starts fresh.
    embed = dense.patch_embedding.kernel
    np.testing.assert_array_equal(
        upcycled._momentums[
            upcycled._get_variable_index(moe.patch_embedding.kernel)
        ],
        adam._momentums[adam._get_variable_index(embed)],
    )
    router = moe.blocks[1].mlp.router.kernel
    assert upcycled.fresh_variable_indices == (
        upcycled._get_variable_index(router),
    )
    assert upcycled.fresh_since_step == 3


def test_router_gets_the_bias_correction_of_a_fresh_optimizer():
    # Routers that learn (random kernel, noisy experts): the router's first
    # update must be that of a fresh Adam, whatever the global step.
    dense, adam = _pretrained(OPTIMIZERS["adam"], steps=5)
    kwargs = dict(
        encoder_router="tokens_choose",
        num_selected_experts=2,
        expert_noise=0.1,
        moe_kwargs=_NO_AUX,
        blocks=[1],
    )
    moe = upcycling.upcycle(dense, num_experts=NUM_EXPERTS, seed=1, **kwargs)
    router = moe.blocks[1].mlp.router.kernel
    before = keras.ops.convert_to_numpy(router)
    images, labels = _data(seed=4)
    with tf.GradientTape() as tape:
        loss = _LOSS(labels, moe(images, training=True))
    gradient = tape.gradient(loss, router)
    assert np.abs(gradient).max() > 0
    fresh = keras.optimizers.Adam(1e-2)
    fresh_var = keras.Variable(before)
    fresh.apply([gradient], [fresh_var])
    expected = keras.ops.convert_to_numpy(fresh_var) - before
    for state, should_match in (("rescale", True), ("copy", False)):
        moe_copy = upcycling.upcycle(
            dense, num_experts=NUM_EXPERTS, seed=1, **kwargs
        )
        optimizer = upcycling.upcycle_optimizer(
            adam, dense, moe_copy, state=state
        )
        _step(moe_copy, optimizer, images, labels)
        kernel = moe_copy.blocks[1].mlp.router.kernel
        delta = keras.ops.convert_to_numpy(kernel) - before
        matches = np.allclose(delta, expected, atol=1e-7, rtol=1e-4)
        assert matches == should_match, state


def test_reset_is_a_fresh_optimizer_on_a_continued_schedule():
    dense, adam = _pretrained(OPTIMIZERS["adam"])
    images, labels = _data(seed=5)
    moes = [_exact_case_moe(dense, expert_noise=0.1, seed=2) for _ in "ab"]
    reset = upcycling.upcycle_optimizer(adam, dense, moes[0], state="reset")
    assert int(reset.iterations) == 3
    for slots in (reset._momentums, reset._velocities):
        assert all(not np.any(keras.ops.convert_to_numpy(s)) for s in slots)
    _step(moes[0], reset, images, labels)
    _step(moes[1], keras.optimizers.Adam(1e-2), images, labels)
    for a, b in zip(moes[0].weights, moes[1].weights, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_a_reset_counter_never_gives_a_negative_router_step():
    # An upcycled optimizer whose state is zeroed and counter reset (a
    # trainer reused for another run) must still step finitely.
    dense, adam = _pretrained(OPTIMIZERS["adam"])
    moe = _exact_case_moe(dense, blocks=[1])
    upcycled = upcycling.upcycle_optimizer(adam, dense, moe)
    for variable in upcycled.variables:
        variable.assign(np.zeros(variable.shape, variable.dtype))
    _step(moe, upcycled, *_data(seed=7))
    assert all(np.isfinite(w).all() for w in moe.get_weights())


def test_sgd_momentum_is_scaled_by_the_share():
    dense, sgd = _pretrained(lambda: keras.optimizers.SGD(1e-2, momentum=0.9))
    moe = _exact_case_moe(dense, blocks=[1])
    upcycled = upcycling.upcycle_optimizer(sgd, dense, moe)
    source = sgd._get_variable_index(dense.blocks[1].mlp.wo)
    target = upcycled._get_variable_index(moe.blocks[1].mlp.experts.wo)
    np.testing.assert_allclose(
        upcycled.momentums[target],
        np.broadcast_to(
            sgd.momentums[source] / NUM_EXPERTS,
            upcycled.momentums[target].shape,
        ),
    )


def test_upcycled_optimizer_saves_and_loads(tmp_path):
    dense, adam = _pretrained(OPTIMIZERS["adam"])
    moe = _exact_case_moe(dense, blocks=[1])
    moe.compile(
        optimizer=upcycling.upcycle_optimizer(adam, dense, moe), loss=_LOSS
    )
    moe.fit(*_data(seed=6), batch_size=8, epochs=1, verbose=0)
    path = tmp_path / "moe.keras"
    moe.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded.optimizer, optimizer_state.UpcycledAdam)
    assert loaded.optimizer.fresh_since_step == 3
    assert (
        loaded.optimizer.fresh_variable_indices
        == moe.optimizer.fresh_variable_indices
    )
    assert int(loaded.optimizer.iterations) == 4


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"state": "tile"}, "state must be one of"),
        ({"expert_gradient_share": 0.0}, r"in \(0, 1\]"),
        ({"expert_gradient_share": 2}, r"in \(0, 1\]"),
    ],
)
def test_bad_arguments(kwargs, match):
    dense, adam = _pretrained(OPTIMIZERS["adam"], steps=1)
    moe = _exact_case_moe(dense, blocks=[1])
    with pytest.raises(ValueError, match=match):
        upcycling.upcycle_optimizer(adam, dense, moe, **kwargs)


def test_unknown_optimizer_class_only_copies():
    dense, rms = _pretrained(lambda: keras.optimizers.RMSprop(1e-3), steps=1)
    moe = _exact_case_moe(dense, blocks=[1])
    with pytest.raises(ValueError, match="use state='copy'"):
        upcycling.upcycle_optimizer(rms, dense, moe)
    copied = upcycling.upcycle_optimizer(rms, dense, moe, state="copy")
    assert type(copied) is keras.optimizers.RMSprop


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))
