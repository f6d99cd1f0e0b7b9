"""Small, randomised models shared by tests of several stages."""

import keras
import numpy as np

from keras_moe.models.vit import ViT


def tiny_vit(**overrides):
    kwargs = dict(
        image_size=8,
        patch_size=2,
        num_channels=1,
        model_dim=16,
        num_heads=2,
        hidden_dim=32,
        num_layers=2,
        num_classes=10,
    )
    kwargs.update(overrides)
    keras.utils.set_random_seed(0)
    model = ViT(**kwargs)
    rng = np.random.default_rng(0)
    for weight in model.weights:  # zero heads and unit norms test little
        noise = rng.normal(scale=0.3, size=weight.shape)
        weight.assign(weight.numpy() + noise.astype("float32"))
    return model


def images(count=6, seed=1):
    return np.random.default_rng(seed).random((count, 8, 8, 1), "float32")


def random_hf_t5(config_kwargs, feed_forward_proj, tie, seed=0):
    """A tiny Hugging Face `T5ForConditionalGeneration` (eval mode) with
    weights drawn here rather than by Hugging Face's initialiser: its norms
    are ones, its v1.0 greedy outputs degenerate, and version 5 ties the
    output projection even for v1.1. Unit-variance activations with random
    norm scales catch any misplaced weight.

    Args:
        config_kwargs: `T5Config` sizes (d_model, num_layers, ...).
        feed_forward_proj: "relu" (v1.0) or "gated-gelu" (v1.1).
        tie: tie the output projection to the embeddings.
        seed: torch's seed.
    """
    import pytest

    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.T5Config(
        **config_kwargs,
        dropout_rate=0.0,
        feed_forward_proj=feed_forward_proj,
        tie_word_embeddings=tie,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    model = transformers.T5ForConditionalGeneration(config).eval()
    with torch.no_grad():
        if not tie:
            model.lm_head.weight = torch.nn.Parameter(
                torch.empty_like(model.shared.weight)
            )
            assert model.lm_head.weight is not model.shared.weight
        for name, param in model.named_parameters():
            if name.endswith("layer_norm.weight"):
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
            elif "relative_attention_bias" in name or name == "shared.weight":
                param.copy_(torch.randn_like(param))
            else:  # torch Linear [out, in]
                param.copy_(torch.randn_like(param) * param.shape[1] ** -0.5)
    return model
