"""Keras `fit` / `evaluate` driving an `ExpertParallelTrainer`.

`ExpertParallelModel(trainer)` is a `keras.Model` whose train and test
functions run the trainer's DTensor steps, so that Keras' own loop does
the rest: `model.fit(dataset, epochs=..., validation_data=...,
callbacks=[...])` with its progress bar, `History`, `EarlyStopping`,
`TensorBoard`, `ModelCheckpoint(save_weights_only=True)`, and
`model.evaluate(...)`. Each Keras step pulls one global batch from the
iterator Keras made, hands it to `trainer.train_step` (or `test_step`),
and logs the running mean of the losses since the epoch began (what Keras
reports for its own steps).

The trained values live in the trainer's DTensor variables; they are
copied into the wrapped Keras model (`trainer.sync_to_model()`) at the end
of every epoch, before any other callback's `on_epoch_end`, and at the end
of training, so a checkpoint callback saves this epoch's weights.

Logged, as plain `model.fit` logs them: `loss` (the step loss: the
model's loss plus the MoE auxiliary losses, as `trainer.train_step`
returns it) and the routing metrics of every MoE layer,
`<prefix>_dropped`, `<prefix>_confidence` and `<prefix>_max_load` (see
`MoeLayer`), epoch means of the step statistics; with validation data the
same with `val_`. Each trainer step runs the model with the layers'
metric variables mapped to zeros and adds what the step wrote to them to
the layers' trackers (`trainer.layer_metrics`), which Keras resets with
this model's metrics. On one device, or with the replicated layout, the
values are those of plain `fit`. With the GShard layout each device
computes its statistics over its own tokens (over those of its `batch`
column: DTensor reduces over `batch`) and the step logs their mean over
`expert`, as a tf.distribute strategy sums its replicas' metric updates:
`_dropped` and `_confidence` then equal the one-device values (every
device holds as many tokens), and so does `_max_load` when every device
fills as many expert slots (expert choice, or no token losing a choice);
otherwise `_max_load` is the mean of the devices' expert shares, which
differs from the share over all slots by the spread of the devices'
fill (3e-4 to 1.2e-3 in a test where top-2 tokens lose choices).

Example (one device; on 8 devices use a mesh such as "batch:2,expert:4"):

>>> from keras_moe.distribution.expert_parallel import ExpertParallelTrainer
>>> from keras_moe.distribution.mesh import make_mesh
>>> from keras_moe.layers.moe import MoeLayer
>>> inputs = keras.Input((4, 8))
>>> hidden = MoeLayer(num_experts=2, hidden_dim=16, name="moe")(inputs)
>>> outputs = keras.layers.Dense(3)(keras.layers.Flatten()(hidden))
>>> trainer = ExpertParallelTrainer(
...     keras.Model(inputs, outputs),
...     make_mesh(batch=1, expert=1, devices=["CPU:0"]),
...     optimizer=keras.optimizers.Adam(1e-3),
...     loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
... )
>>> x = np.random.default_rng(0).normal(size=(8, 4, 8)).astype("float32")
>>> y = np.arange(8) % 3
>>> history = ExpertParallelModel(trainer).fit(
...     x, y, batch_size=4, epochs=2, validation_data=(x, y), verbose=0
... )
>>> sorted(history.history)  # doctest: +NORMALIZE_WHITESPACE
['loss', 'moe_confidence', 'moe_dropped', 'moe_max_load', 'val_loss',
 'val_moe_confidence', 'val_moe_dropped', 'val_moe_max_load']
>>> trainer.step
4
"""

import keras

from keras_moe.distribution.expert_parallel import ExpertParallelTrainer


class _SyncToModel(keras.callbacks.Callback):
    """Copies the trainer's values into the Keras model (first callback)."""

    def __init__(self, trainer):
        super().__init__()
        self.trainer = trainer

    def on_epoch_end(self, epoch, logs=None):
        self.trainer.sync_to_model()

    def on_train_end(self, logs=None):
        self.trainer.sync_to_model()


class ExpertParallelModel(keras.Model):
    """A Keras model whose `fit` and `evaluate` run an expert-parallel
    trainer's steps.

    Args:
        trainer: an `ExpertParallelTrainer`. Its model is this model's
            only layer (`call` runs it, on one device, for `predict`).
        **kwargs: passed to `keras.Model`.

    Batches are global batches: with the GShard layout their size must be
    a multiple of the mesh's device count, so pass a `batch_size` (or a
    batched `tf.data.Dataset`, `drop_remainder=True`) that is.
    """

    def __init__(self, trainer, **kwargs):
        if not isinstance(trainer, ExpertParallelTrainer):
            raise ValueError(
                "trainer must be an ExpertParallelTrainer; received "
                f"{type(trainer).__name__}"
            )
        kwargs.setdefault("name", f"{trainer.model.name}_expert_parallel")
        super().__init__(**kwargs)
        self.trainer = trainer
        self.inner = trainer.model
        self.loss_mean = keras.metrics.Mean(name="loss")
        # The trainer needs a built model: so is this one.
        self.built = True
        # Keras' loops require a compiled model; the optimizer and loss
        # that train are the trainer's.
        self.compile(optimizer=trainer.optimizer, loss=trainer.loss)

    def call(self, inputs, training=False):
        return self.inner(inputs, training=training)

    @property
    def metrics(self):
        return [self.loss_mean, *self.trainer.layer_metrics]

    def _step_function(self, step):
        def function(iterator):
            data = next(iterator)
            x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
            if y is None:
                raise ValueError(
                    "ExpertParallelModel trains on (x, y) or "
                    "(x, y, sample_weight) batches; received inputs only"
                )
            # The step also adds its routing statistics to the MoE
            # layers' trackers, which Keras resets with this model's
            # metrics at the start of every epoch and evaluation.
            self.loss_mean.update_state(step(x, y, sample_weight))
            return self.get_metrics_result()

        return function

    def make_train_function(self, force=False):
        if self.train_function is None or force:
            self.train_function = self._step_function(self.trainer.train_step)
        return self.train_function

    def make_test_function(self, force=False):
        if self.test_function is None or force:
            self.test_function = self._step_function(self.trainer.test_step)
        return self.test_function

    def fit(self, *args, callbacks=None, **kwargs):
        callbacks = [_SyncToModel(self.trainer)] + list(callbacks or [])
        return super().fit(*args, callbacks=callbacks, **kwargs)
