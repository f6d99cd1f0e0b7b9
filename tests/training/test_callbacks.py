"""keras_moe.training.callbacks: TensorBoard routing statistics."""

import os
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_moe
from keras_moe.training import callbacks
from tests import tiny_models


def test_routing_stats_logger_writes_every_layer(tmp_path):
    model = keras_moe.upcycle(
        tiny_models.tiny_vit(), num_experts=4, blocks="all"
    )
    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    images = tiny_models.images(8)
    model.fit(
        images,
        np.arange(8) % 10,
        epochs=2,
        batch_size=4,
        verbose=0,
        callbacks=[callbacks.RoutingStatsLogger(str(tmp_path))],
    )
    values = {}
    for name in os.listdir(tmp_path):
        for event in tf.compat.v1.train.summary_iterator(str(tmp_path / name)):
            for value in event.summary.value:
                values.setdefault(value.tag, []).append(
                    tf.make_ndarray(value.tensor)
                )
    for index in (0, 1):
        path = f"vit/block_{index}/mlp"
        # The value of the last epoch is the layer's routing_stats() now.
        stats = model.blocks[index].mlp.routing_stats()
        for name in ("dropped", "confidence", "max_load"):
            logged = values[f"routing/{path}/{name}"]
            assert len(logged) == 2
            np.testing.assert_allclose(logged[-1], stats[name], rtol=1e-6)
        assert f"routing/{path}/expert_usage" in values


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))
