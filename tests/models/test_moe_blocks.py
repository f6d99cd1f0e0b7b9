"""MOE_STACKS declarations against the models they describe, and the
helpers that read them (moe_layers, with_eval_capacity_factor)."""

import doctest
import inspect
import sys

import keras
import numpy as np
import pytest

import keras_moe
from keras_moe import models
from keras_moe.layers.moe import MoeLayer
from keras_moe.models import moe_blocks
from keras_moe.models.t5 import t5_config
from keras_moe.models.vit import ViT
from tests import tiny_models

VISION = dict(
    image_size=16,
    patch_size=8,
    num_channels=3,
    model_dim=24,
    num_heads=4,
    hidden_dim=48,
    num_layers=3,
)


def _vit():
    return models.ViT(**VISION, num_classes=5)


def _t5():
    return models.T5(**{**t5_config("t5_tiny"), "num_decoder_layers": 3})


def _vlm():
    return models.VisionLanguageModel(VISION, t5_config("t5_tiny"))


BUILDERS = {"ViT": _vit, "T5": _t5, "VisionLanguageModel": _vlm}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def upcycled(request):
    """(dense, every block of every stack upcycled) of each model class."""
    keras.utils.set_random_seed(0)
    dense = BUILDERS[request.param]()
    moe = keras_moe.upcycle(
        dense,
        num_experts=4,
        blocks="all",
        eval_capacity_factor=1.0,
        moe_kwargs={"min_expert_capacity": 1},
    )
    return dense, moe


def test_declared_keys_are_constructor_and_config_keys(upcycled):
    dense, _ = upcycled
    parameters = inspect.signature(type(dense).__init__).parameters
    config = dense.get_config()
    stacks = type(dense).MOE_STACKS
    assert len({stack.name for stack in stacks}) == len(stacks)
    for stack in stacks:
        assert stack.moe_key in parameters
        assert stack.moe_key in config
        assert stack.num_layers(config) == len(stack.block_layers(dense))


def test_moe_layers_of_each_stack_are_its_blocks_mlps(upcycled):
    dense, moe = upcycled
    assert moe_blocks.moe_layers(dense) == []
    config = moe.get_config()
    found = []
    for stack in type(moe).MOE_STACKS:
        blocks = stack.block_layers(moe)
        layers = models.moe_layers(moe, stack.name)
        assert len(layers) == stack.num_layers(config) == len(blocks)
        assert all(a is b.mlp for a, b in zip(layers, blocks, strict=True))
        assert sorted(int(i) for i in config[stack.moe_key]) == list(
            range(len(blocks))
        )
        found.extend(layers)
    assert {id(layer) for layer in found} == {
        id(layer) for layer in models.moe_layers(moe)
    }


def test_upcycling_follows_each_stacks_kind(upcycled):
    _, moe = upcycled
    for stack in type(moe).MOE_STACKS:
        for layer in models.moe_layers(moe, stack.name):
            assert layer.router_type == (
                "tokens_choose" if stack.causal else "experts_choose"
            )
            assert layer.normalize_combine_weights == (
                stack.modality == moe_blocks.VISION
            )


def test_with_eval_capacity_factor_sets_every_stack(upcycled):
    _, moe = upcycled
    rebuilt = models.with_eval_capacity_factor(moe, None)
    assert rebuilt is not moe
    assert type(rebuilt) is type(moe)
    layers = models.moe_layers(rebuilt)
    assert len(layers) == len(models.moe_layers(moe))
    assert all(layer.eval_capacity_factor is None for layer in layers)
    assert all(
        layer.eval_capacity_factor == 1.0 for layer in models.moe_layers(moe)
    )
    for name, variable in moe.canonical_variables().items():
        np.testing.assert_array_equal(
            variable.numpy(), rebuilt.canonical_variables()[name].numpy()
        )
    assert keras_moe.with_eval_capacity_factor(rebuilt, None) is rebuilt


def test_within_names_a_sub_models_stack():
    vision, encoder, decoder = models.VisionLanguageModel.MOE_STACKS
    assert (vision.name, vision.moe_key, vision.layers_config) == (
        "vision",
        "vision_moe_blocks",
        "vision_config",
    )
    assert vision.layers_key == models.ViT.MOE_STACKS[0].layers_key
    assert encoder.blocks == "language_model.encoder.blocks"
    assert decoder.causal and not encoder.causal
    assert decoder.num_layers({"text_config": {"num_decoder_layers": 7}}) == 7


def test_bad_stacks_and_models_are_refused():
    model = _vit()
    with pytest.raises(ValueError, match="has no stack 'decoder'"):
        models.moe_layers(model, "decoder")
    inputs = keras.Input((4,))
    plain = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    assert models.moe_layers(plain) == []
    with pytest.raises(ValueError, match="declares no MoE-capable stacks"):
        models.moe_stacks(plain)
    with pytest.raises(ValueError, match="modality"):
        models.MoeStack("x", "x_moe_blocks", "n", "blocks", "audio")


def test_moe_layers_of_a_plain_keras_model():
    inputs = keras.Input((3, 8))
    moe = MoeLayer(num_experts=2, hidden_dim=8, name="moe")
    model = keras.Model(inputs, moe(inputs))
    assert models.moe_layers(model) == [moe]
    assert moe in moe_blocks.sublayers(model)


def test_docstring_examples_run():
    result = doctest.testmod(moe_blocks, extraglobs={"keras": keras})
    assert result.attempted >= 8 and result.failed == 0


def _rebuilt_by_hand(vit, eval_capacity_factor):
    """`vit` rebuilt from its config with the factor in every MoE block's
    kwargs, weights copied in order."""
    config = vit.get_config()
    config["encoder_moe_blocks"] = {
        index: dict(kwargs, eval_capacity_factor=eval_capacity_factor)
        for index, kwargs in config["encoder_moe_blocks"].items()
    }
    rebuilt = ViT.from_config(config)
    for target, source in zip(rebuilt.weights, vit.weights, strict=True):
        target.assign(source.numpy())
    return rebuilt


def test_with_eval_capacity_factor_matches_a_rebuild_by_hand():
    moe = keras_moe.upcycle(
        tiny_models.tiny_vit(),
        num_experts=4,
        eval_capacity_factor=0.5,
        expert_noise=0.2,  # experts that differ
        moe_kwargs={"min_expert_capacity": 1},
        seed=3,
    )
    images = tiny_models.images()
    rebuilt = moe_blocks.with_eval_capacity_factor(moe, None)
    assert [
        layer.eval_capacity_factor for layer in moe_blocks.moe_layers(rebuilt)
    ] == [None]
    assert moe.blocks[1].mlp.eval_capacity_factor == 0.5  # left untouched
    for a, b in zip(moe.weights, rebuilt.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    # The same model built by hand from the config gives the same outputs.
    np.testing.assert_allclose(
        rebuilt(images), _rebuilt_by_hand(moe, None)(images), atol=1e-6
    )
    # Capacity 0.5 drops tokens that no-drop keeps: the outputs differ.
    assert not np.allclose(moe(images), rebuilt(images), atol=1e-4)
    assert moe_blocks.with_eval_capacity_factor(rebuilt, None) is rebuilt
    dense = tiny_models.tiny_vit()
    assert moe_blocks.with_eval_capacity_factor(dense, 2.0) is dense


def test_with_eval_capacity_factor_rejects_a_bad_factor():
    moe = keras_moe.upcycle(tiny_models.tiny_vit(), num_experts=4)
    with pytest.raises(ValueError, match="capacity_factor"):
        moe_blocks.with_eval_capacity_factor(moe, -1.0)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))
