"""The work behind the command-line launchers: one function per launcher.

    pretrain_dense   apps/train_dense.py  train a dense ViT or T5 from scratch
                                          and write it as a checkpoint of its
                                          family's format (the stand-in for a
                                          user's existing checkpoint)
    upcycle_to_file  apps/upcycle.py      read a dense checkpoint of any
                                          supported format, upcycle it, save
                                          the MoE model as a .keras file
    train            apps/train.py        continue training under a
                                          tf.distribute strategy or on an
                                          expert-parallel DTensor mesh
    evaluate         apps/evaluate.py     accuracy, NLL and ECE of a
                                          classifier; loss, token accuracy
                                          and exact match of a T5

Models: a `.keras` file of a keras_moe model, or a checkpoint any reader of
`keras_moe.checkpoints` takes (`load_model`).

Data (`keras_moe.data`): by name, one of the embedded datasets or any TFDS
dataset prepared in the data directory. An image dataset (features `image`
<uint8>[H, W, C] and `label`) is a classification task for a ViT, images
scaled to [0, 1]; `number_words` is a translation task for a T5 (encoder
inputs, decoder inputs, targets; the loss and metrics skip target padding).

Shape letters: B batch, H, W, C image height, width and channels, T encoder
length, U decoder (target) length, K classes.
"""

import dataclasses
import json
import os
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf

from keras_moe import data as data_lib
from keras_moe import metrics as metrics_lib
from keras_moe.checkpoints import read_checkpoint
from keras_moe.data import registry as data_registry
from keras_moe.dense_checkpoints import write_dense_checkpoint
from keras_moe.distribution import strategies
from keras_moe.distribution.fault_tolerance import fit_resumable
from keras_moe.distribution.fault_tolerance import list_checkpoints
from keras_moe.layers.moe import MoeLayer
from keras_moe.models.t5 import T5
from keras_moe.models.t5 import t5_config
from keras_moe.models.vit import ViT
from keras_moe.upcycling import summarize
from keras_moe.upcycling import upcycle

ARCHITECTURES = ("vit", "t5")
DEFAULT_DATASETS = {"vit": "digits", "t5": "number_words"}
CLASSIFICATION = "classification"
TRANSLATION = "translation"
# The original T5 checkpoint format does not record the relative-position
# maximum distance; its readers assume T5's 128, so dense T5s use it too.
T5_MAX_DISTANCE = 128
_MOE_CONFIG_KEYS = ("encoder_moe_blocks", "decoder_moe_blocks")


# --------------------------------------------------------------------------
# Data.


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """What a dataset is for, read from its TFDS features.

    Attributes:
        name: the dataset name.
        kind: `CLASSIFICATION` or `TRANSLATION`.
        data_dir: the resolved TFDS data directory.
        image_shape: (H, W, C) of a classification dataset.
        num_classes: K of a classification dataset.
        input_length, target_length: T and U of a translation dataset.
    """

    name: str
    kind: str
    data_dir: str
    image_shape: tuple = None
    num_classes: int = None
    input_length: int = None
    target_length: int = None


def describe_dataset(name, data_dir=None, input_length=16, target_length=16):
    """The `DataSpec` of dataset `name`.

    Args:
        name: a keras_moe dataset or one prepared in `data_dir`.
        data_dir: TFDS data directory (None: `keras_moe.data`'s default).
        input_length, target_length: T and U of a translation dataset.

    Raises:
        ValueError: unknown dataset, or one that is neither an image
            classification dataset nor `number_words`.
    """
    data_dir = data_registry.resolve_data_dir(data_dir)
    if name == "number_words":
        return DataSpec(
            name,
            TRANSLATION,
            data_dir,
            input_length=input_length,
            target_length=target_length,
        )
    features = data_registry.builder(name, data_dir).info.features
    if "image" not in features or "label" not in features:
        raise ValueError(
            f"dataset {name!r} has features {sorted(features)}; keras_moe "
            "trains ViTs on image datasets (features 'image' and 'label') "
            "and T5s on 'number_words'"
        )
    shape = tuple(features["image"].shape)
    if len(shape) != 3 or None in shape:
        raise ValueError(
            f"dataset {name!r} has images of shape {shape}; a fixed "
            "[H, W, C] shape is needed"
        )
    return DataSpec(
        name,
        CLASSIFICATION,
        data_dir,
        image_shape=shape,
        num_classes=int(features["label"].num_classes),
    )


def batches(spec, split, batch_size, seed=None, training=False):
    """Batches of `spec`'s dataset for `fit` and evaluation.

    Classification: (images <float32>[B, H, W, C] in [0, 1], labels
    <int32>[B]). Translation: (inputs, targets <int32>[B, U], weights
    <float32>[B, U]), `inputs` the dict `T5` takes; the weights are 1 on
    real target tokens and 0 on padding, so that losses and metrics skip
    the padding.

    Args:
        spec: a `DataSpec`.
        split: a split of the dataset.
        batch_size: B (the global batch under a strategy).
        seed: None to keep the files' order, else the shuffle seed.
        training: an endless stream of full batches, each pass over the
            split in a new order (`keras_moe.data`'s seeded shuffle: pass
            p is shuffled by (seed, p), so the stream is the same on every
            iteration and a resumed run sees the data an uninterrupted one
            would); otherwise one pass, the last batch possibly smaller.
    """
    options = dict(
        shuffle=seed is not None,
        seed=seed,
        repeat=training,
        drop_remainder=training,
        data_dir=spec.data_dir,
    )
    if spec.kind == CLASSIFICATION:
        return data_lib.classification_dataset(
            spec.name, split, batch_size, **options
        )
    dataset = data_lib.seq2seq_dataset(
        spec.name,
        split,
        batch_size,
        spec.input_length,
        spec.target_length,
        **options,
    )
    return dataset.map(_with_weights)


def steps_per_pass(spec, split, batch_size):
    """Full batches in one pass over `split` (the steps of an epoch)."""
    info = data_registry.builder(spec.name, spec.data_dir).info
    steps = info.splits[split].num_examples // batch_size
    if steps < 1:
        raise ValueError(
            f"{spec.name!r} {split!r} has "
            f"{info.splits[split].num_examples} examples, fewer than one "
            f"batch of {batch_size}"
        )
    return steps


def _with_weights(inputs, targets):
    return inputs, targets, tf.cast(targets != data_lib.PAD_ID, tf.float32)


def check_model_fits_data(model, spec):
    """Raises a ValueError when `model` cannot take `spec`'s examples."""
    if spec.kind == CLASSIFICATION:
        if not isinstance(model, ViT):
            raise ValueError(
                f"dataset {spec.name!r} is an image classification dataset; "
                f"it needs a ViT, not a {type(model).__name__}"
            )
        want = (*model.image_hw, model.num_channels)
        if tuple(spec.image_shape) != want or (
            model.num_classes != spec.num_classes
        ):
            raise ValueError(
                f"dataset {spec.name!r} has images {spec.image_shape} and "
                f"{spec.num_classes} classes; the model takes images {want} "
                f"and has {model.num_classes} classes"
            )
    else:
        if not isinstance(model, T5):
            raise ValueError(
                f"dataset {spec.name!r} is a translation dataset; it needs a "
                f"T5, not a {type(model).__name__}"
            )
        if model.vocab_size != data_lib.VOCAB_SIZE:
            raise ValueError(
                f"dataset {spec.name!r} is tokenised with keras_moe.data's "
                f"vocabulary of {data_lib.VOCAB_SIZE} ids; the model has "
                f"vocab_size={model.vocab_size}"
            )


# --------------------------------------------------------------------------
# Models.


def load_model(path, architecture=None):
    """A keras_moe model from a `.keras` file or a dense checkpoint.

    Args:
        path: a `.keras` file, or a checkpoint `read_checkpoint` reads.
        architecture: "vit", "t5" or None (detect); checked for `.keras`.

    Raises:
        ValueError: nothing readable at `path`, or not a keras_moe ViT/T5.
    """
    path = os.fspath(path)
    if path.endswith(".keras"):
        if not os.path.isfile(path):
            raise ValueError(f"no model file at {path}")
        try:
            model = keras.saving.load_model(path, compile=False)
        except (TypeError, ValueError, OSError) as error:
            raise ValueError(f"cannot load {path}: {error}") from None
    else:
        model = read_checkpoint(path, architecture=architecture)
    if not isinstance(model, (ViT, T5)):
        raise ValueError(
            f"{path} holds a {type(model).__name__}; keras_moe launchers "
            "take its ViT and T5 models"
        )
    kind = "vit" if isinstance(model, ViT) else "t5"
    if architecture is not None and architecture != kind:
        raise ValueError(
            f"{path} holds a {kind} model; --architecture={architecture}"
        )
    return model


def moe_layers(model):
    """The `MoeLayer`s of `model`, in layer order."""
    return [
        layer
        for layer in model._flatten_layers(include_self=False)
        if isinstance(layer, MoeLayer)
    ]


def with_eval_capacity_factor(model, eval_capacity_factor):
    """A copy of `model` whose MoE blocks use `eval_capacity_factor`.

    The model is rebuilt from its config with the factor replaced in every
    MoE block's kwargs, weights copied by variable path; a model whose MoE
    layers already use it (or that has none) is returned as it is.

    Args:
        model: a keras_moe `ViT` or `T5`.
        eval_capacity_factor: None (no token dropped) or a float > 0.
    """
    layers = moe_layers(model)
    if all(
        layer.eval_capacity_factor == eval_capacity_factor for layer in layers
    ):
        return model
    config = dict(model.get_config())
    for key in _MOE_CONFIG_KEYS:
        if config.get(key):
            config[key] = {
                index: {**kwargs, "eval_capacity_factor": eval_capacity_factor}
                for index, kwargs in config[key].items()
            }
    rebuilt = type(model).from_config(config)
    targets = {weight.path: weight for weight in rebuilt.weights}
    sources = {weight.path: weight for weight in model.weights}
    if targets.keys() != sources.keys():
        raise ValueError(
            "the rebuilt model's weights differ from the original's: "
            f"{sorted(targets.keys() ^ sources.keys())[:6]}"
        )
    for path, target in targets.items():
        target.assign(sources[path].value)
    return rebuilt


def _compile(model, spec, learning_rate, strategy=None):
    """Adam, cross-entropy from logits, accuracy (masked for T5)."""
    jit = "auto"
    if strategy is not None and strategy.num_replicas_in_sync > 1:
        jit = False  # Keras cannot XLA-compile a multi-replica step.
    if spec.kind == CLASSIFICATION:
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        metrics = ["accuracy"]
    else:
        loss = keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, reduction="mean_with_sample_weight"
        )
        metrics = []
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=loss,
        metrics=metrics,
        weighted_metrics=(
            [keras.metrics.SparseCategoricalAccuracy(name="token_accuracy")]
            if spec.kind == TRANSLATION
            else None
        ),
        jit_compile=jit,
    )


def save_keras(model, path):
    """`model.save(path)` through a temporary file renamed into place."""
    path = os.path.abspath(os.fspath(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    handle, temp = tempfile.mkstemp(
        dir=os.path.dirname(path), prefix=".tmp-", suffix=".keras"
    )
    os.close(handle)
    try:
        model.save(temp)
        os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.remove(temp)
    return path


def write_json(path, value):
    """Writes `value` as JSON to `path` through a temporary file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    with os.fdopen(handle, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True, default=float)
        f.write("\n")
    os.replace(temp, path)


def dense_model(architecture, spec, size=None, seed=0):
    """A new dense ViT for an image dataset or T5 for `number_words`.

    Args:
        architecture: "vit" or "t5".
        spec: the `DataSpec` it will train on.
        size: {"model_dim", "num_heads", "hidden_dim", "num_layers",
            "patch_size" (ViT)}; None for the defaults (ViT: 64, 4, 128, 4,
            2; T5: the "t5_tiny" preset's sizes).
        seed: weight initialisation seed.
    """
    if architecture not in ARCHITECTURES:
        raise ValueError(
            f"architecture must be one of {ARCHITECTURES}; received "
            f"{architecture!r}"
        )
    size = dict(size or {})
    keras.utils.set_random_seed(seed)
    if architecture == "vit":
        if spec.kind != CLASSIFICATION:
            raise ValueError(
                f"a ViT trains on image datasets; {spec.name!r} is not one"
            )
        height, width, channels = spec.image_shape
        patch = size.pop("patch_size", 2)
        kwargs = dict(model_dim=64, num_heads=4, hidden_dim=128, num_layers=4)
        kwargs.update(size)
        return ViT(
            image_size=[height, width] if height != width else height,
            patch_size=patch,
            num_channels=channels,
            num_classes=spec.num_classes,
            **kwargs,
        )
    if spec.kind != TRANSLATION:
        raise ValueError(f"a T5 trains on 'number_words', not {spec.name!r}")
    config = t5_config("t5_tiny")
    if "num_layers" in size:
        layers = size.pop("num_layers")
        config.update(num_encoder_layers=layers, num_decoder_layers=layers)
    config.update(size)
    if "model_dim" in size or "num_heads" in size:
        config["head_dim"] = config["model_dim"] // config["num_heads"]
    config.update(
        vocab_size=data_lib.VOCAB_SIZE,
        relative_attention_max_distance=T5_MAX_DISTANCE,
    )
    return T5(**config)


# --------------------------------------------------------------------------
# The launchers' functions.


def pretrain_dense(
    architecture,
    dataset,
    output_dir,
    data_dir=None,
    size=None,
    epochs=10,
    steps_per_epoch=None,
    batch_size=64,
    learning_rate=1e-3,
    seed=0,
    overwrite=False,
    eval_examples=None,
    verbose="auto",
):
    """Trains a dense model from scratch and writes it as a checkpoint.

    The checkpoint (`write_dense_checkpoint`: Hugging Face format for a
    ViT, original T5 format for a T5) is what `upcycle_to_file` and
    `read_checkpoint` read.

    Args:
        architecture: "vit" or "t5".
        dataset: dataset name (see the module docstring).
        output_dir: the checkpoint directory to write.
        data_dir: TFDS data directory.
        size: model sizes (see `dense_model`).
        epochs, steps_per_epoch, batch_size, learning_rate: of `fit`
            (steps_per_epoch None: one pass over the train split).
        seed: initialisation and data-order seed.
        overwrite: replace an existing checkpoint directory.
        eval_examples: score this many test examples after training (None:
            the whole test split).
        verbose: `fit`'s progress output.

    Returns:
        A dict: the checkpoint path, the final training metrics and the
        held-out metrics of `evaluate_model`.
    """
    if os.path.exists(output_dir) and not overwrite:
        raise ValueError(
            f"{output_dir} exists; pass overwrite=True (--overwrite) to "
            "replace it"
        )
    spec = describe_dataset(dataset, data_dir)
    model = dense_model(architecture, spec, size, seed)
    _compile(model, spec, learning_rate)
    history = model.fit(
        batches(spec, "train", batch_size, seed=seed, training=True),
        epochs=epochs,
        steps_per_epoch=(
            steps_per_epoch or steps_per_pass(spec, "train", batch_size)
        ),
        verbose=verbose,
        shuffle=False,  # the dataset is shuffled, with a seed
    )
    path = write_dense_checkpoint(model, output_dir, overwrite=overwrite)
    results = evaluate_model(
        model, spec, batch_size=batch_size, max_examples=eval_examples
    )
    return {
        "checkpoint": path,
        "parameters": model.count_params(),
        "train": {k: float(v[-1]) for k, v in history.history.items()},
        "test": results,
    }


def upcycle_to_file(checkpoint, output, architecture=None, **options):
    """Reads a dense checkpoint, upcycles it, saves the `.keras` file.

    Args:
        checkpoint: a `.keras` file or any checkpoint `read_checkpoint`
            reads.
        output: the `.keras` file to write (atomically).
        architecture: "vit", "t5" or None to detect.
        **options: `keras_moe.upcycle` arguments (num_experts, blocks, ...).

    Returns:
        The `keras_moe.upcycling.UpcycleSummary` of the dense and the
        upcycled model.
    """
    if not os.fspath(output).endswith(".keras"):
        raise ValueError(f"output must be a .keras file; received {output!r}")
    dense = load_model(checkpoint, architecture)
    moe = upcycle(dense, **options)
    save_keras(moe, output)
    return summarize(dense, moe)


def train(
    model_path,
    dataset,
    output_dir,
    data_dir=None,
    strategy="auto",
    tpu=None,
    devices=None,
    mesh=None,
    epochs=1,
    steps_per_epoch=None,
    batch_size=64,
    learning_rate=1e-4,
    save_every_steps=100,
    seed=0,
    input_length=16,
    target_length=16,
    verbose="auto",
):
    """Continues training a model; resumable, with TensorBoard logs.

    Writes, under `output_dir`: `model.keras` (the trained model),
    `logs/` (TensorBoard: losses, metrics and the MoE routing statistics
    `<layer>_dropped`, `_confidence`, `_max_load` per epoch), `backup/`
    (checkpoints every `save_every_steps` steps: running the same command
    again after a crash resumes where it stopped) and `history.json`.

    Args:
        model_path: a `.keras` file or a dense checkpoint.
        dataset: dataset name (see the module docstring).
        output_dir: where the files go.
        data_dir: TFDS data directory.
        strategy: a `keras_moe.distribution.strategies.get_strategy` name.
        tpu: TPU address for the "tpu" strategy.
        devices: devices of the "mirrored" strategy (None: its default).
        mesh: None, or a mesh spec "batch:2,expert:4": train with the
            expert-parallel DTensor trainer instead of a strategy.
        epochs, steps_per_epoch: steps_per_epoch None is one pass over the
            train split.
        batch_size: the global batch size.
        learning_rate: Adam's learning rate.
        save_every_steps: checkpoint interval.
        seed: data-order seed.
        input_length, target_length: T5 sequence lengths.
        verbose: `fit`'s progress output.

    Returns:
        A dict: output paths and the last epoch's metrics.
    """
    spec = describe_dataset(dataset, data_dir, input_length, target_length)
    os.makedirs(output_dir, exist_ok=True)
    if mesh is not None:
        return _train_expert_parallel(
            model_path,
            spec,
            output_dir,
            mesh,
            epochs,
            steps_per_epoch,
            batch_size,
            learning_rate,
            save_every_steps,
            seed,
        )
    distribution = strategies.get_strategy(strategy, tpu=tpu, devices=devices)
    strategies.check_global_batch_size(batch_size, distribution)
    with distribution.scope():
        model = load_model(model_path)
        check_model_fits_data(model, spec)
        _compile(model, spec, learning_rate, distribution)
    dataset = batches(spec, "train", batch_size, seed, training=True)
    steps = steps_per_epoch or steps_per_pass(spec, "train", batch_size)
    backup_dir = os.path.join(output_dir, "backup")
    saved = list_checkpoints(backup_dir)
    history = fit_resumable(
        model,
        dataset,
        epochs=epochs,
        steps_per_epoch=steps,
        backup_dir=backup_dir,
        save_every_steps=save_every_steps,
        callbacks=[
            keras.callbacks.TensorBoard(os.path.join(output_dir, "logs")),
            RoutingStatsLogger(os.path.join(output_dir, "logs", "routing")),
        ],
        verbose=verbose,
    )
    model_file = save_keras(model, os.path.join(output_dir, "model.keras"))
    logged = {k: [float(x) for x in v] for k, v in history.history.items()}
    if logged:  # empty when a finished run is started again
        write_json(os.path.join(output_dir, "history.json"), logged)
    return {
        "model": model_file,
        "logs": os.path.join(output_dir, "logs"),
        "strategy": type(distribution).__name__,
        "replicas": distribution.num_replicas_in_sync,
        "resumed_from_step": saved[-1][0] if saved else 0,
        "steps": epochs * steps,
        "last_epoch": {k: v[-1] for k, v in logged.items() if v},
    }


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


class _SaveTrainerEvery(keras.callbacks.Callback):
    """Saves an `ExpertParallelTrainer` checkpoint every `every` steps."""

    def __init__(self, trainer, path, every):
        super().__init__()
        self.trainer = trainer
        self.path = path
        self.every = every

    def on_train_batch_end(self, batch, logs=None):
        if self.trainer.step % self.every == 0:
            self.trainer.save(self.path)


def _train_expert_parallel(
    model_path,
    spec,
    output_dir,
    mesh,
    epochs,
    steps_per_epoch,
    batch_size,
    learning_rate,
    save_every_steps,
    seed,
):
    """`train` on an expert-parallel mesh (see `train`); resumable."""
    from keras_moe.distribution.expert_parallel import ExpertParallelTrainer

    if spec.kind != CLASSIFICATION:
        raise ValueError(
            "expert-parallel training (--mesh) takes image classifiers; "
            f"{spec.name!r} is a {spec.kind} dataset"
        )
    model = load_model(model_path)
    check_model_fits_data(model, spec)
    optimizer = keras.optimizers.Adam(learning_rate)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    checkpoint = os.path.join(output_dir, "backup", "expert_parallel.npz")
    if os.path.exists(checkpoint):
        trainer = ExpertParallelTrainer.restore(
            checkpoint, model, mesh, optimizer=optimizer, loss=loss
        )
    else:
        trainer = ExpertParallelTrainer(
            model, mesh, optimizer=optimizer, loss=loss
        )
    start = trainer.step
    dataset = batches(spec, "train", batch_size, seed, training=True)
    steps = steps_per_epoch or steps_per_pass(spec, "train", batch_size)
    total = steps * epochs
    # Step t trains on batch t of the stream, resumed or not.
    losses = trainer.fit(
        dataset.skip(start),
        steps=max(total - start, 0),
        callbacks=[_SaveTrainerEvery(trainer, checkpoint, save_every_steps)],
    )
    trainer.save(checkpoint)
    model_file = save_keras(model, os.path.join(output_dir, "model.keras"))
    losses = [float(x) for x in losses]
    if losses:
        write_json(os.path.join(output_dir, "history.json"), {"loss": losses})
    return {
        "model": model_file,
        "mesh": {
            name: trainer.mesh.dim_size(name) for name in ("batch", "expert")
        },
        "resumed_from_step": start,
        "steps": total,
        "last_step_loss": losses[-1] if losses else None,
    }


def evaluate_model(model, spec, batch_size=64, split="test", max_examples=None):
    """Held-out metrics of a built model on `spec`'s `split`.

    Classifier: accuracy, NLL (nats), ECE (15 bins) and Brier score of the
    softmax of its logits (`keras_moe.metrics`). T5: the loss (mean
    cross-entropy per real target token), token accuracy and exact match
    of greedy generation (the generated ids up to end of sequence equal
    the target's).

    Args:
        model: a keras_moe ViT or T5.
        spec: a `DataSpec`.
        batch_size: evaluation batch size.
        split: the split to score.
        max_examples: score only the first this many examples.

    Returns:
        A dict of floats, with "examples" the count scored.
    """
    check_model_fits_data(model, spec)
    dataset = batches(spec, split, batch_size)
    if max_examples is not None:
        dataset = dataset.unbatch().take(max_examples).batch(batch_size)
    if spec.kind == CLASSIFICATION:
        return score_classifier(model, dataset)
    return score_translation(model, dataset)


def score_classifier(model, dataset):
    """Accuracy, NLL, ECE and Brier score of a classifier's softmax.

    Args:
        model: called on each batch of images, returning logits <[B, K]>.
        dataset: an iterable of (images, labels <int>[B]) batches.

    Returns:
        {"examples", "accuracy", "nll", "ece", "brier"} (floats but the
        count; `keras_moe.metrics.uncertainty_metrics`).
    """
    logits, labels = [], []
    for images, batch_labels in dataset:
        logits.append(keras.ops.convert_to_numpy(model(images)))
        labels.append(np.asarray(batch_labels))
    logits = np.concatenate(logits).astype(np.float64)
    labels = np.concatenate(labels)
    probs = np.exp(logits - _logsumexp(logits))
    results = metrics_lib.uncertainty_metrics(labels, probs)
    return {
        "examples": int(len(labels)),
        "accuracy": 1.0 - results["error"],
        "nll": results["nll"],
        "ece": results["ece"],
        "brier": results["brier"],
    }


def score_translation(model, dataset):
    """Loss, token accuracy and exact match of a T5.

    The loss is the mean cross-entropy over real target tokens (weight 1)
    with teacher forcing; token accuracy the share of them the argmax
    predicts; exact match the share of examples whose greedy generation
    (`T5.generate`, as many tokens as the targets hold) equals the target
    up to and including its end-of-sequence id.

    Args:
        model: a keras_moe T5.
        dataset: an iterable of (inputs, targets <int>[B, U], weights
            <float>[B, U]) batches (see `batches`).

    Returns:
        {"examples", "loss", "token_accuracy", "exact_match"}.
    """
    total_loss = total_tokens = correct_tokens = 0.0
    exact = count = 0
    for inputs, targets, weights in dataset:
        logits = keras.ops.convert_to_numpy(model(inputs)).astype(np.float64)
        targets, weights = np.asarray(targets), np.asarray(weights)
        log_probs = logits - _logsumexp(logits)
        picked = np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
        total_loss += float(-(picked * weights).sum())
        total_tokens += float(weights.sum())
        correct_tokens += float(
            ((logits.argmax(-1) == targets) * weights).sum()
        )
        generated = keras.ops.convert_to_numpy(
            model.generate(inputs["encoder_token_ids"], targets.shape[1] + 1)
        )[:, 1:]
        for row_generated, row_target in zip(generated, targets):
            exact += _until_eos(row_generated) == _until_eos(row_target)
            count += 1
    return {
        "examples": count,
        "loss": total_loss / max(total_tokens, 1.0),
        "token_accuracy": correct_tokens / max(total_tokens, 1.0),
        "exact_match": exact / max(count, 1),
    }


def _logsumexp(logits):
    peak = logits.max(-1, keepdims=True)
    return peak + np.log(np.exp(logits - peak).sum(-1, keepdims=True))


def _until_eos(ids):
    """Token ids up to and including the first end-of-sequence id."""
    ids = [int(i) for i in ids]
    if data_lib.EOS_ID in ids:
        ids = ids[: ids.index(data_lib.EOS_ID) + 1]
    return ids


def evaluate(
    model_path,
    dataset,
    data_dir=None,
    split="test",
    batch_size=64,
    eval_capacity_factor="keep",
    max_examples=None,
    input_length=16,
    target_length=16,
):
    """Loads a model and returns `evaluate_model`'s metrics.

    Args:
        model_path: a `.keras` file or a dense checkpoint.
        dataset: dataset name; `split` of it is scored.
        data_dir: TFDS data directory.
        split: the split.
        batch_size: evaluation batch size.
        eval_capacity_factor: "keep" (the model's), None (drop no token) or
            a float > 0 for every MoE block.
        max_examples: score only the first this many examples.
        input_length, target_length: T5 sequence lengths.
    """
    spec = describe_dataset(dataset, data_dir, input_length, target_length)
    model = load_model(model_path)
    if eval_capacity_factor != "keep":
        model = with_eval_capacity_factor(model, eval_capacity_factor)
    start = time.perf_counter()
    results = evaluate_model(model, spec, batch_size, split, max_examples)
    results["seconds"] = round(time.perf_counter() - start, 2)
    results["eval_capacity_factors"] = sorted(
        {str(layer.eval_capacity_factor) for layer in moe_layers(model)}
    )
    return results
