"""A small end-to-end run of MoeLayer on real data that ships with sklearn.

scikit-learn's 1,797 handwritten 8x8 digits are cut into 16 patches of 2x2
pixels, embedded, and classified by a two-block pre-norm transformer. The
dense model uses an `Mlp` in both blocks; the MoE model replaces the second
block's MLP with a `MoeLayer`, as sparse upcycling does for every other block.
Both train with the same seed, data split and optimizer.
"""

import time

import keras
import numpy as np
from sklearn.datasets import load_digits

from keras_moe.layers.mlp import Mlp
from keras_moe.layers.moe import MoeLayer

_PATCH = 2


def digits_patches(seed=0, test_fraction=0.2):
    """Returns ((x_train, y_train), (x_test, y_test)); x is <[N, 16, 4]>."""
    digits = load_digits()
    images = digits.images.astype("float32") / 16.0  # (N, 8, 8) in [0, 1]
    n = images.shape[0]
    # (N, 8, 8) -> (N, 4, 2, 4, 2) -> (N, 4, 4, 2, 2) -> (N, 16, 4)
    patches = images.reshape(n, 4, _PATCH, 4, _PATCH).transpose(0, 1, 3, 2, 4)
    patches = patches.reshape(n, 16, _PATCH * _PATCH)
    order = np.random.default_rng(seed).permutation(n)
    split = int(n * (1 - test_fraction))
    train, test = order[:split], order[split:]
    labels = digits.target.astype("int32")
    return (patches[train], labels[train]), (patches[test], labels[test])


def build_classifier(moe_kwargs=None, model_dim=64, hidden_dim=128, seed=0):
    """Two pre-norm transformer blocks; block 1's MLP is MoE if asked."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((16, _PATCH * _PATCH), name="patches")
    x = keras.layers.Dense(model_dim, name="embed")(inputs)
    x = x + keras.layers.Embedding(16, model_dim, name="position")(
        keras.ops.arange(16)
    )
    for i in range(2):
        h = keras.layers.LayerNormalization(name=f"block{i}_ln0")(x)
        h = keras.layers.MultiHeadAttention(
            4, model_dim // 4, name=f"block{i}_attention"
        )(h, h)
        x = x + h
        h = keras.layers.LayerNormalization(name=f"block{i}_ln1")(x)
        if i == 1 and moe_kwargs is not None:
            h = MoeLayer(hidden_dim=hidden_dim, name="moe", **moe_kwargs)(h)
        else:
            h = Mlp(hidden_dim, activation="gelu", name=f"block{i}_mlp")(h)
        x = x + h
    x = keras.layers.GlobalAveragePooling1D()(x)
    outputs = keras.layers.Dense(10, name="head")(x)
    return keras.Model(inputs, outputs)


def run(epochs=20, batch_size=64, num_experts=8, seed=0, verbose=0):
    """Trains the dense and the MoE classifier; returns a list of rows."""
    (x_train, y_train), (x_test, y_test) = digits_patches(seed)
    arms = {
        "dense": None,
        f"moe_top2_e{num_experts}": {
            "num_experts": num_experts,
            "num_selected_experts": 2,
            "activation": "gelu",
        },
        f"moe_expert_choice_e{num_experts}": {
            "num_experts": num_experts,
            "router": "experts_choose",
            "train_capacity_factor": 2.0,
            "activation": "gelu",
        },
    }
    rows = []
    for name, moe_kwargs in arms.items():
        model = build_classifier(moe_kwargs, seed=seed)
        model.compile(
            optimizer=keras.optimizers.Adam(3e-3),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
        start = time.perf_counter()
        model.fit(
            x_train,
            y_train,
            batch_size=batch_size,
            epochs=epochs,
            verbose=verbose,
        )
        seconds = time.perf_counter() - start
        results = model.evaluate(x_test, y_test, verbose=0, return_dict=True)
        row = {
            "model": name,
            "params": model.count_params(),
            "test_accuracy": round(float(results["accuracy"]), 4),
            "train_seconds": round(seconds, 1),
        }
        if moe_kwargs is not None:
            stats = model.get_layer("moe").routing_stats()
            row["eval_dropped"] = round(stats["dropped"], 4)
            row["eval_max_load"] = round(stats["max_load"], 3)
        rows.append(row)
    return rows
