"""E^3 ViT: each member is a V-MoE on its expert group, the ensemble is the
mean of the members' probabilities, M=1 is the plain model, and an E^3 ViT
upcycled from a dense one trains, evaluates and saves."""

import os
import sys

import keras
import numpy as np
import pytest

from keras_moe import upcycling
from keras_moe.evaluation import metrics
from keras_moe.layers.ensemble import EnsembleMoeLayer
from keras_moe.layers.moe import MoeLayer
from keras_moe.models.vit import ViT
from keras_moe.models.vit import vit_config

TINY = dict(vit_config("vit_tiny"), num_layers=4)  # MoE blocks 1 and 3
# No auxiliary loss and no router noise (E^3 layers default to vmoe's noisy
# top-K and importance/load losses), so members can be compared with plain
# V-MoE models in training mode too.
_NO_AUX = {
    "router_z_loss_weight": 0.0,
    "load_balancing_loss_weight": 0.0,
    "importance_loss_weight": 0.0,
    "load_loss_weight": 0.0,
    "noise_std": 0.0,
}
_LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _np(x):
    return keras.ops.convert_to_numpy(x)


def _softmax(x):
    z = np.exp(x - x.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def _images(batch=3, seed=1):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(batch, 32, 32, 3)).astype("float32")


def _randomize(model, seed=0):
    rng = np.random.default_rng(seed)
    for name, variable in model.canonical_variables().items():
        value = rng.normal(scale=0.3, size=variable.shape)
        if name.endswith("gamma"):
            value += 1.0
        if name.endswith("router/kernel"):
            value *= 5.0  # confident, distinct routing per member
        variable.assign(value.astype("float32"))
    return model


def _moe_blocks(num_experts, **kwargs):
    layer = dict(num_experts=num_experts, **_NO_AUX, **kwargs)
    return {1: dict(layer), 3: dict(layer)}


def _member_model(e3, member, **moe_kwargs):
    """A plain V-MoE ViT holding member `member`'s experts and router."""
    members = e3.ensemble_size
    per_member = e3.blocks[1].mlp.num_experts // members
    plain = ViT(
        **TINY, encoder_moe_blocks=_moe_blocks(per_member, **moe_kwargs)
    )
    group = slice(member * per_member, (member + 1) * per_member)
    source = e3.canonical_variables()
    for name, variable in plain.canonical_variables().items():
        value = _np(source[name])
        if name.endswith("router/kernel"):
            value = value[:, group]  # <[D, E]> columns of the group
        elif "/mlp/experts/" in name:
            value = value[group]  # <[E, ...]> experts of the group
        variable.assign(value)
    return plain


@pytest.mark.parametrize(
    "moe_kwargs",
    [
        {"num_selected_experts": 1},
        {"num_selected_experts": 2, "batch_priority": True},
        {"router": "experts_choose", "normalize_combine_weights": True},
    ],
)
def test_members_are_v_moes_and_the_ensemble_averages_them(moe_kwargs):
    members = 2
    e3 = _randomize(
        ViT(
            **TINY,
            encoder_moe_blocks=_moe_blocks(4 * members, **moe_kwargs),
            ensemble_size=members,
        )
    )
    assert isinstance(e3.blocks[1].mlp, EnsembleMoeLayer)
    assert not isinstance(e3.blocks[0].mlp, MoeLayer)
    images = _images()
    plain = [_member_model(e3, m, **moe_kwargs) for m in range(members)]
    for training in (False, True):
        expected = np.stack([_np(p(images, training=training)) for p in plain])
        # The members differ: the check is not about identical members.
        assert not np.allclose(expected[0], expected[1], atol=1e-3)
        np.testing.assert_allclose(
            _np(e3.member_logits(images, training=training)),
            expected,
            rtol=1e-4,
            atol=1e-4,
        )
    # Training: per-member logits, member-major rows.
    np.testing.assert_allclose(
        _np(e3(images, training=True)),
        expected.reshape(-1, expected.shape[-1]),
        rtol=1e-4,
        atol=1e-4,
    )
    # Inference: log of the mean of the members' probabilities (NumPy).
    logits = np.stack([_np(p(images)) for p in plain]).astype(np.float64)
    mean_probs = _softmax(logits).mean(axis=0)
    output = _np(e3(images))
    assert output.shape == (3, 10)
    np.testing.assert_allclose(output, np.log(mean_probs), atol=1e-4)
    np.testing.assert_allclose(
        _softmax(output.astype(np.float64)), mean_probs, atol=1e-5
    )
    np.testing.assert_allclose(
        e3.predict(images, verbose=0), output, rtol=1e-5, atol=1e-5
    )


def test_one_member_is_the_plain_moe_model():
    blocks = _moe_blocks(4, num_selected_experts=2, batch_priority=True)
    plain = _randomize(ViT(**TINY, encoder_moe_blocks=blocks))
    one = ViT(
        **TINY,
        encoder_moe_blocks={
            i: dict(kwargs, ensemble_size=1) for i, kwargs in blocks.items()
        },
        ensemble_size=1,
    )
    assert isinstance(one.blocks[1].mlp, EnsembleMoeLayer)
    names = one.canonical_variables()
    assert sorted(names) == sorted(plain.canonical_variables())
    for name, variable in plain.canonical_variables().items():
        names[name].assign(variable)
    images = _images()
    for training in (False, True):
        np.testing.assert_array_equal(
            _np(one(images, training=training)),
            _np(plain(images, training=training)),
        )


def test_canonical_names_are_those_of_the_plain_moe_model():
    blocks = _moe_blocks(4, num_selected_experts=1)
    e3 = ViT(**TINY, encoder_moe_blocks=blocks, ensemble_size=2)
    plain = ViT(**TINY, encoder_moe_blocks=blocks)
    shapes = {k: tuple(v.shape) for k, v in e3.canonical_variables().items()}
    assert shapes == {
        k: tuple(v.shape) for k, v in plain.canonical_variables().items()
    }
    assert shapes["encoder/block_1/mlp/router/kernel"] == (32, 4)
    assert len(shapes) == len(e3.weights)
    # The config keeps the user's block kwargs; the model adds M itself.
    config = e3.get_config()
    assert config["ensemble_size"] == 2
    assert "ensemble_size" not in config["encoder_moe_blocks"][1]
    assert ViT.from_config(config).get_config() == config


def test_training_loss_is_the_members_cross_entropy_on_repeated_labels():
    e3 = _randomize(
        ViT(**TINY, encoder_moe_blocks=_moe_blocks(4), ensemble_size=2)
    )
    e3.compile(optimizer="sgd", loss=_LOSS)
    images, labels = _images(4), np.array([3, 1, 4, 1])
    member_logits = _np(e3(images, training=True)).astype(np.float64)
    assert member_logits.shape == (8, 10)
    log_probs = np.log(_softmax(member_logits))
    # Rows [m*B:(m+1)*B] are member m's: labels repeat member by member.
    repeated = np.tile(labels, 2)
    expected = -np.mean(log_probs[np.arange(8), repeated])
    loss = e3.compute_loss(
        images, labels, keras.ops.convert_to_tensor(member_logits, "float32")
    )
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    # Evaluation scores the ensemble: its negative log-likelihood.
    ensemble_probs = _softmax(_np(e3(images)).astype(np.float64))
    np.testing.assert_allclose(
        e3.evaluate(images, labels, verbose=0, return_dict=True)["loss"],
        metrics.negative_log_likelihood(labels, ensemble_probs),
        rtol=1e-5,
    )


@pytest.fixture(scope="module")
def dense():
    keras.utils.set_random_seed(0)
    model = ViT(**TINY)
    head = model.canonical_variables()["head/kernel"]
    head.assign(np.random.default_rng(0).normal(size=head.shape))
    return model


def test_upcycled_members_start_as_the_dense_model(dense):
    e3 = upcycling.upcycle(
        dense,
        num_experts=4,
        ensemble_size=2,
        encoder_router="tokens_choose",
        num_selected_experts=1,
        eval_capacity_factor=None,
    )
    assert e3.ensemble_size == 2 and e3.upcycled_blocks == {"encoder": [1, 3]}
    assert all(isinstance(e3.blocks[i].mlp, EnsembleMoeLayer) for i in (1, 3))
    images = _images()
    dense_logits = _np(dense(images))
    members = _np(e3.member_logits(images))
    np.testing.assert_allclose(members[0], dense_logits, atol=1e-5)
    np.testing.assert_allclose(members[1], dense_logits, atol=1e-5)
    np.testing.assert_allclose(
        _np(e3(images)),
        np.log(_softmax(dense_logits.astype(np.float64))),
        atol=1e-5,
    )


def test_upcycled_e3_trains_evaluates_and_round_trips(dense, tmp_path):
    e3 = upcycling.upcycle(
        dense,
        num_experts=4,
        ensemble_size=2,
        encoder_router="tokens_choose",
        num_selected_experts=1,
        expert_noise=0.01,
    )
    images = np.random.default_rng(2).uniform(size=(16, 32, 32, 3))
    images = images.astype("float32")
    labels = np.arange(16) % 10
    e3.compile(
        optimizer=keras.optimizers.Adam(3e-3), loss=_LOSS, metrics=["accuracy"]
    )
    history = e3.fit(
        images,
        labels,
        batch_size=8,
        epochs=4,
        validation_data=(images[:8], labels[:8]),
        verbose=0,
    )
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert "val_loss" in history.history
    predictions = e3.predict(images, batch_size=8, verbose=0)
    assert predictions.shape == (16, 10)
    np.testing.assert_allclose(np.exp(predictions).sum(-1), 1.0, atol=1e-5)
    path = os.path.join(str(tmp_path), "e3.keras")
    e3.save(path)
    restored = keras.models.load_model(path)
    assert restored.ensemble_size == 2
    assert isinstance(restored.blocks[1].mlp, EnsembleMoeLayer)
    assert restored.get_config() == e3.get_config()
    np.testing.assert_array_equal(
        restored.predict(images, batch_size=8, verbose=0), predictions
    )


def test_mixed_precision_and_headless_e3():
    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        model = ViT(**TINY, encoder_moe_blocks=_moe_blocks(4), ensemble_size=2)
        out = model(_images())
    finally:
        keras.config.set_dtype_policy(policy)
    assert keras.backend.standardize_dtype(out.dtype) == "float32"
    assert out.shape == (3, 10) and np.all(np.isfinite(_np(out)))
    headless = ViT(
        **dict(TINY, num_classes=0),
        encoder_moe_blocks=_moe_blocks(4),
        ensemble_size=2,
    )
    assert tuple(headless(_images()).shape) == (6, 32)  # per member
    with pytest.raises(ValueError, match="needs a head"):
        headless.member_logits(_images())


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"ensemble_size": 0}, "ensemble_size must be an int >= 1"),
        ({"ensemble_size": 1.5}, "ensemble_size must be an int >= 1"),
        (
            {"ensemble_size": 2, "encoder_moe_blocks": None},
            "needs at least one MoE block",
        ),
        (
            {"ensemble_size": 3, "encoder_moe_blocks": _moe_blocks(4)},
            "num_experts must be a multiple of ensemble_size",
        ),
        (
            {
                "ensemble_size": 2,
                "encoder_moe_blocks": _moe_blocks(4, num_selected_experts=3),
            },
            "at most the experts of one member",
        ),
        (
            {
                "ensemble_size": 2,
                "encoder_moe_blocks": _moe_blocks(4, group_size=9),
            },
            "multiple of ensemble_size",
        ),
        (
            {
                "ensemble_size": 2,
                "encoder_moe_blocks": _moe_blocks(4, ensemble_size=4),
            },
            "set it once, on the ViT",
        ),
    ],
)
def test_rejects_bad_ensemble_kwargs(overrides, message):
    with pytest.raises(ValueError, match=message):
        ViT(**dict(TINY, **overrides))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_experts": 6, "ensemble_size": 4}, "multiple of ensemble_size"),
        ({"num_experts": 4, "ensemble_size": 0}, "ensemble_size must be"),
        (
            {
                "num_experts": 4,
                "ensemble_size": 2,
                "encoder_router": "tokens_choose",
                "num_selected_experts": 3,
            },
            "exceeds the experts of one ensemble member",
        ),
        (
            {"num_experts": 4, "ensemble_size": 2, "group_size": 9},
            "must be a multiple of ensemble_size",
        ),
    ],
)
def test_upcycle_rejects_bad_ensembles(dense, kwargs, message):
    with pytest.raises(ValueError, match=message):
        upcycling.upcycle(dense, **kwargs)


def test_upcycle_refuses_to_change_an_ensemble_or_non_vit(dense):
    e3 = upcycling.upcycle(dense, 4, blocks=[1], ensemble_size=2)
    with pytest.raises(ValueError, match="already an ensemble of 2"):
        upcycling.upcycle(e3, 4, blocks=[3], ensemble_size=4)
    # Upcycling more blocks of an E^3 model keeps its members.
    more = upcycling.upcycle(e3, 4, blocks=[3])
    assert more.ensemble_size == 2
    assert isinstance(more.blocks[3].mlp, EnsembleMoeLayer)

    from keras_moe.models.t5 import T5

    t5 = T5.from_architecture(
        "t5_tiny", num_encoder_layers=2, num_decoder_layers=2
    )
    with pytest.raises(ValueError, match="needs a model with an ensemble_size"):
        upcycling.upcycle(t5, 4, ensemble_size=2)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))
