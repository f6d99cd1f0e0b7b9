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
