"""Keras callbacks for MoE training."""

import keras
import tensorflow as tf

from keras_moe.models.moe_blocks import moe_layers


class RoutingStatsLogger(keras.callbacks.Callback):
    """Writes each MoE layer's routing statistics to TensorBoard per epoch.

    `fit` logs the MoE metric trackers by their names, `<layer name>_...`;
    the blocks of a model often share a layer name (every ViT block's MLP
    is `mlp`), so their values would overwrite each other. This callback
    writes `routing/<layer path>/{dropped, confidence, max_load}` scalars
    and the `expert_usage` histogram of every layer, read from
    `MoeLayer.routing_stats()` at the end of each epoch (the means over
    the epoch's training steps).

    Args:
        log_dir: TensorBoard directory of the summaries.
    """

    def __init__(self, log_dir):
        super().__init__()
        self.log_dir = log_dir
        self._writer = None

    def on_epoch_end(self, epoch, logs=None):
        layers = moe_layers(self.model)
        if not layers:
            return
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(self.log_dir)
        with self._writer.as_default():
            for layer in layers:
                stats = layer.routing_stats()
                for name in ("dropped", "confidence", "max_load"):
                    tf.summary.scalar(
                        f"routing/{layer.path}/{name}", stats[name], step=epoch
                    )
                tf.summary.histogram(
                    f"routing/{layer.path}/expert_usage",
                    stats["expert_usage"],
                    step=epoch,
                )
        self._writer.flush()

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class SaveTrainerEvery(keras.callbacks.Callback):
    """Saves an `ExpertParallelTrainer` checkpoint every `every` steps."""

    def __init__(self, trainer, path, every):
        super().__init__()
        self.trainer = trainer
        self.path = path
        self.every = every

    def on_train_batch_end(self, batch, logs=None):
        if self.trainer.step % self.every == 0:
            self.trainer.save(self.path)
