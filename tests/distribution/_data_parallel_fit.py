"""Trains upcycled tiny ViT and T5 models with `fit` under a strategy.

Run by tests/distribution/test_data_parallel_fit.py in subprocesses, since
virtual devices and MultiWorkerMirroredStrategy must be set up before
TensorFlow initialises:

    python tests/distribution/_data_parallel_fit.py --mode mirrored --out DIR
        4 virtual CPU devices; trains each model on one device and under
        MirroredStrategy over the 4; writes DIR/{one_device,mirrored}.npz.
    TF_CONFIG=... python tests/distribution/_data_parallel_fit.py \
        --mode multi_worker --out DIR
        one worker of a MultiWorkerMirroredStrategy cluster; writes
        DIR/multi_worker_<task index>.npz.

Each .npz holds, per model ("vit", "t5"): `<model>/step_loss` (the running
mean loss `fit` logs after each step), `<model>/epoch_loss`, and the final
trainable weights `<model>/weight_<i>`.

Everything that could make two runs differ besides the replica layout is
fixed: one set of initial weights for every run, no dropout, no router
noise, no shuffling, the same global batches in the same order.
"""

import argparse
import os
import sys

import numpy as np

GLOBAL_BATCH = 8
STEPS_PER_EPOCH = 4
EPOCHS = 2
NUM_EXAMPLES = GLOBAL_BATCH * STEPS_PER_EPOCH
# Large enough that the weights move well above float32 rounding, small
# enough that the loss goes down.
LEARNING_RATES = {"vit": 0.05, "t5": 0.5}


def _examples(name):
    """(inputs, targets) NumPy arrays of one epoch of examples."""
    rng = np.random.default_rng(42)
    if name == "vit":
        images = rng.normal(size=(NUM_EXAMPLES, 32, 32, 3)).astype("float32")
        labels = rng.integers(0, 10, size=(NUM_EXAMPLES,)).astype("int32")
        return images, labels
    encoder = rng.integers(2, 128, size=(NUM_EXAMPLES, 12)).astype("int32")
    # Right padding of varying length: padding takes no expert capacity.
    lengths = rng.integers(6, 13, size=(NUM_EXAMPLES,))
    encoder[np.arange(12)[None, :] >= lengths[:, None]] = 0
    targets = rng.integers(2, 128, size=(NUM_EXAMPLES, 8)).astype("int32")
    decoder = np.concatenate(
        [np.zeros((NUM_EXAMPLES, 1), "int32"), targets[:, :-1]], axis=1
    )
    inputs = {"encoder_token_ids": encoder, "decoder_token_ids": decoder}
    return inputs, targets


def _tokens_per_group_axis(name):
    """Sequence lengths seen by the MoE blocks of each model."""
    return {"vit": [17], "t5": [12, 8]}[name]


def _reference_model(name):
    """The upcycled model every run starts from: (config, class, weights)."""
    import keras

    import keras_moe
    from keras_moe.models.t5 import T5
    from keras_moe.models.vit import ViT

    keras.utils.set_random_seed(0)
    if name == "vit":
        dense = ViT.from_architecture("vit_tiny", dropout_rate=0.0)
    else:
        dense = T5.from_architecture("t5_tiny", dropout_rate=0.0)
    # Router noise is off by default (jitter_noise = noise_std = 0).
    model = keras_moe.upcycle(dense, num_experts=4, seed=0)
    return type(model), model.get_config(), model.get_weights()


def _check_grouping(model, name, per_replica_batch):
    """Fails unless splitting the batch over replicas keeps every MoE group.

    Capacity and routing are computed per group of S tokens. With
    group_size=None a group is one sequence, whatever the batch; with a
    fixed S, a replica groups the tokens of its own slice, which matches the
    single-device groups only if the slice holds a whole number of groups.
    """
    from keras_moe.models import moe_layers

    layers = moe_layers(model)
    assert layers, "the upcycled model has no MoE block"
    for layer in layers:
        if layer.group_size is None:
            continue
        for length in _tokens_per_group_axis(name):
            tokens = per_replica_batch * length
            assert tokens % layer.group_size == 0, (
                f"{layer.name}: {tokens} tokens per replica do not fill "
                f"groups of {layer.group_size}"
            )


def _train(name, strategy, reference):
    import keras
    import tensorflow as tf

    from keras_moe.distribution import check_global_batch_size
    from keras_moe.distribution import fit_distributed
    from keras_moe.distribution import prepare_dataset

    cls, config, weights = reference
    with strategy.scope():
        model = cls.from_config(config)
        model.set_weights(weights)
        # jit_compile=False: compile(jit_compile=True) fails under
        # MirroredStrategy with several replicas (a Keras bug); the
        # one-device run uses the same setting so that only the replica
        # layout differs.
        model.compile(
            # Plain SGD: an update is proportional to its gradient. (Adam's
            # first steps are about lr * sign(gradient), so a gradient
            # that is zero up to rounding could move a weight by a full lr
            # one way on one device and the other way on four.)
            optimizer=keras.optimizers.SGD(LEARNING_RATES[name]),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=False,
        )
    per_replica = check_global_batch_size(GLOBAL_BATCH, strategy)
    _check_grouping(model, name, per_replica)
    examples = tf.data.Dataset.from_tensor_slices(_examples(name))
    dataset = prepare_dataset(examples, GLOBAL_BATCH, strategy)

    step_losses = []

    class StepLoss(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            step_losses.append(float(logs["loss"]))

    history = fit_distributed(
        model,
        dataset,
        epochs=EPOCHS,
        steps_per_epoch=STEPS_PER_EPOCH,
        shuffle=False,
        callbacks=[StepLoss()],
        verbose=0,
    )
    results = {
        f"{name}/step_loss": np.array(step_losses),
        f"{name}/epoch_loss": np.array(history.history["loss"]),
    }
    for i, (start, value) in enumerate(zip(weights, model.get_weights())):
        results[f"{name}/initial_{i}"] = start
        results[f"{name}/weight_{i}"] = value
    return results


def _save(results, path):
    temp = path + ".tmp.npz"
    np.savez(temp, **results)
    os.replace(temp, path)


def main(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=("mirrored", "multi_worker"))
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    import tensorflow as tf

    if args.mode == "mirrored":
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 4
        )
    from keras_moe.distribution import get_strategy
    from keras_moe.distribution import parse_tf_config

    if args.mode == "mirrored":
        strategies = {
            "one_device": get_strategy("one_device", devices=["/cpu:0"]),
            "mirrored": get_strategy(
                "mirrored", devices=[f"/cpu:{i}" for i in range(4)]
            ),
        }
        assert strategies["mirrored"].num_replicas_in_sync == 4
    else:
        # Created first: it must exist before any other TensorFlow op runs.
        strategy = get_strategy("multi_worker", communication="ring")
        assert strategy.num_replicas_in_sync == 2
        index = parse_tf_config().task_index
        strategies = {f"multi_worker_{index}": strategy}
    references = {name: _reference_model(name) for name in ("vit", "t5")}
    for label, strategy in strategies.items():
        results = {}
        for name, reference in references.items():
            results.update(_train(name, strategy, reference))
        _save(results, os.path.join(args.out, f"{label}.npz"))
    print("done", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
