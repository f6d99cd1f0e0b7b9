"""The layer contract, checked once for every keras_moe layer.

`run_layer_test` checks: get_config / from_config round trip, a symbolic call
in a functional model, an eager call, one `fit` step that changes the
trainable weights, a call under the mixed_bfloat16 policy, and a `.keras`
save / load round trip with identical outputs.
"""

import os

import keras
import numpy as np


def run_layer_test(
    layer_cls,
    init_kwargs,
    input_shape,
    expected_num_trainable_weights=None,
    float32_weights=(),
    tmp_path=None,
):
    """Runs the contract checks; returns the eagerly built layer."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=input_shape).astype("float32")

    # Config round trip.
    layer = layer_cls(**init_kwargs)
    config = layer.get_config()
    clone = layer_cls.from_config(config)
    assert clone.get_config() == config

    # Eager call.
    y = layer(x)
    assert tuple(y.shape) == tuple(input_shape)
    assert np.all(np.isfinite(keras.ops.convert_to_numpy(y)))
    if expected_num_trainable_weights is not None:
        assert len(layer.trainable_weights) == expected_num_trainable_weights

    # Symbolic call and one fit step.
    inputs = keras.Input(shape=input_shape[1:], batch_size=None)
    model = keras.Model(inputs, layer_cls(**init_kwargs)(inputs))
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    before = [keras.ops.convert_to_numpy(w) for w in model.trainable_weights]
    model.fit(x, np.zeros_like(x), batch_size=input_shape[0], verbose=0)
    after = [keras.ops.convert_to_numpy(w) for w in model.trainable_weights]
    assert any(not np.allclose(a, b) for a, b in zip(before, after))

    # .keras round trip.
    if tmp_path is not None:
        path = os.path.join(str(tmp_path), "model.keras")
        model.save(path)
        restored = keras.models.load_model(path)
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(model(x)),
            keras.ops.convert_to_numpy(restored(x)),
            rtol=1e-6,
            atol=1e-6,
        )

    # Mixed precision: compute in bfloat16, listed weights stay float32.
    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        mixed = layer_cls(**init_kwargs)
        y = mixed(x)
        assert keras.backend.standardize_dtype(y.dtype) == "bfloat16"
        for weight in mixed.weights:
            assert weight.dtype == "float32", weight.path
        for name in float32_weights:
            assert any(name in w.path for w in mixed.weights), name
    finally:
        keras.config.set_dtype_policy(policy)
    return layer
