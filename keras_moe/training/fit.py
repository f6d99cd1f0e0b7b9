"""Training a dense model from scratch and continuing a keras_moe model.

    pretrain_dense  train a dense ViT or T5 from scratch and write it as a
                    checkpoint of its family's format (the stand-in for a
                    user's existing checkpoint)
    train           continue training a model under a tf.distribute
                    strategy or on an expert-parallel DTensor mesh,
                    resumably, with TensorBoard logs

Models: a `.keras` file of a keras_moe model, or a checkpoint any reader of
`keras_moe.checkpoints` takes (`keras_moe.checkpoints.load_model`). Data: a
dataset name, described by `keras_moe.data.specs`.
"""

import os

import keras

from keras_moe.checkpoints import load_model
from keras_moe.checkpoints.writers import write_dense_checkpoint
from keras_moe.data.specs import CLASSIFICATION
from keras_moe.data.specs import TRANSLATION
from keras_moe.data.specs import batches
from keras_moe.data.specs import check_model_fits_data
from keras_moe.data.specs import describe_dataset
from keras_moe.data.specs import steps_per_pass
from keras_moe.data.vocabulary import VOCAB_SIZE
from keras_moe.distribution import strategies
from keras_moe.evaluation.scoring import evaluate_model
from keras_moe.models.t5 import T5
from keras_moe.models.t5 import t5_config
from keras_moe.models.vit import ViT
from keras_moe.training.callbacks import RoutingStatsLogger
from keras_moe.training.callbacks import SaveTrainerEvery
from keras_moe.training.resumable import fit_resumable
from keras_moe.training.resumable import list_checkpoints
from keras_moe.training.resumable import progress_verbosity
from keras_moe.utils import files
from keras_moe.utils.files import save_keras
from keras_moe.utils.files import write_json

ARCHITECTURES = ("vit", "t5")
# The original T5 checkpoint format does not record the relative-position
# maximum distance; its readers assume T5's 128, so dense T5s use it too.
T5_MAX_DISTANCE = 128


def compile_for_task(
    model,
    task,
    learning_rate=None,
    optimizer=None,
    metrics=None,
    strategy=None,
    jit_compile="auto",
):
    """Compiles `model` with cross-entropy from logits for `task`.

    Args:
        model: a Keras model returning logits.
        task: `CLASSIFICATION` (the kind of a `DataSpec`): the loss is the
            mean over the batch's examples (Keras' default reduction; a
            sample weight scales an example's loss, the divisor stays the
            batch size); metric "accuracy". `TRANSLATION`: the loss is the
            mean over the real target tokens (weight 1:
            `reduction="mean_with_sample_weight"`); weighted metric
            "token_accuracy".
        learning_rate: Adam's learning rate (a float or a schedule);
            exactly one of `learning_rate` and `optimizer` is given.
        optimizer: the optimizer, e.g. one continuing another model's
            state (`keras_moe.upcycle_optimizer`).
        metrics: metrics in place of the task's unweighted ones (None: the
            task's).
        strategy: the `tf.distribute` strategy the model is built under,
            or None.
        jit_compile: `model.compile`'s; False whatever is passed under a
            strategy with more than one replica, whose step Keras cannot
            XLA-compile.

    Raises:
        ValueError: an unknown task, or not exactly one of `learning_rate`
            and `optimizer`.
    """
    if task not in (CLASSIFICATION, TRANSLATION):
        raise ValueError(
            f"task must be {CLASSIFICATION!r} or {TRANSLATION!r}; received "
            f"{task!r}"
        )
    if (learning_rate is None) == (optimizer is None):
        raise ValueError(
            "pass exactly one of learning_rate and optimizer; received "
            f"learning_rate={learning_rate!r}, optimizer={optimizer!r}"
        )
    if optimizer is None:
        optimizer = keras.optimizers.Adam(learning_rate)
    if strategy is not None and strategy.num_replicas_in_sync > 1:
        jit_compile = False
    if task == CLASSIFICATION:
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        default_metrics = ["accuracy"]
        weighted_metrics = None
    else:
        loss = keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, reduction="mean_with_sample_weight"
        )
        default_metrics = []
        weighted_metrics = [
            keras.metrics.SparseCategoricalAccuracy(name="token_accuracy")
        ]
    model.compile(
        optimizer=optimizer,
        loss=loss,
        # None rather than []: Keras then builds no metric container.
        metrics=(default_metrics if metrics is None else list(metrics)) or None,
        weighted_metrics=weighted_metrics,
        jit_compile=jit_compile,
    )


def dense_model(architecture, spec, size=None, seed=0):
    """A new dense ViT for an image dataset or T5 for `number_words`.

    Args:
        architecture: "vit" or "t5".
        spec: the `DataSpec` it will train on.
        size: {"model_dim", "num_heads", "hidden_dim", "num_layers",
            "patch_size" (ViT)}; None for the defaults (ViT: 64, 4, 128, 4,
            2; T5: the "t5_tiny" architecture's sizes).
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
        vocab_size=VOCAB_SIZE,
        relative_attention_max_distance=T5_MAX_DISTANCE,
    )
    return T5(**config)


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
            f"{output_dir} exists; pass overwrite=True to " "replace it"
        )
    spec = describe_dataset(dataset, data_dir)
    model = dense_model(architecture, spec, size, seed)
    compile_for_task(model, spec.kind, learning_rate)
    history = model.fit(
        batches(spec, "train", batch_size, seed=seed, training=True),
        epochs=epochs,
        steps_per_epoch=(
            steps_per_epoch or steps_per_pass(spec, "train", batch_size)
        ),
        verbose=progress_verbosity(verbose),
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
    files.makedirs(output_dir)
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
            verbose,
        )
    distribution = strategies.get_strategy(strategy, tpu=tpu, devices=devices)
    strategies.check_global_batch_size(batch_size, distribution)
    with distribution.scope():
        model = load_model(model_path)
        check_model_fits_data(model, spec)
        compile_for_task(model, spec.kind, learning_rate, strategy=distribution)
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
    verbose,
):
    """`train` on an expert-parallel mesh (see `train`); resumable.

    Keras `fit` of an `ExpertParallelModel`, with the progress output,
    callbacks and files of the strategy path (TensorBoard `logs/` with the
    routing metrics, `logs/routing/`, `history.json`); the checkpoint is
    the trainer's checkpoint directory (`backup/expert_parallel`, see
    `ExpertParallelTrainer.save`, every `save_every_steps` steps and after
    the last; a run resumes from it, or from the npz file
    `backup/expert_parallel.npz` of the earlier format, which the first
    finished run then removes). As in `fit_resumable`, step t trains on
    batch t of the repeated data, and a run resumed at step t = e * P + b
    (0 < b < P) first trains the rest of epoch e.
    """
    import tensorflow as tf

    from keras_moe.distribution.expert_parallel import ExpertParallelTrainer
    from keras_moe.distribution.expert_parallel_fit import ExpertParallelModel

    if spec.kind != CLASSIFICATION:
        raise ValueError(
            "expert-parallel training (mesh=...) takes image classifiers; "
            f"{spec.name!r} is a {spec.kind} dataset"
        )
    model = load_model(model_path)
    check_model_fits_data(model, spec)
    optimizer = keras.optimizers.Adam(learning_rate)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    checkpoint = files.join(output_dir, "backup", "expert_parallel")
    earlier = checkpoint + ".npz"  # the earlier single-file format
    resume_from = next(
        (path for path in (checkpoint, earlier) if files.exists(path)), None
    )
    if resume_from is not None:
        trainer = ExpertParallelTrainer.restore(
            resume_from, model, mesh, optimizer=optimizer, loss=loss
        )
    else:
        trainer = ExpertParallelTrainer(
            model, mesh, optimizer=optimizer, loss=loss
        )
    start = trainer.step
    stream = batches(spec, "train", batch_size, seed, training=True).repeat()
    steps = steps_per_epoch or steps_per_pass(spec, "train", batch_size)
    total = steps * epochs
    first_epoch, offset = divmod(start, steps)
    segments = []  # (initial epoch, end epoch, steps per epoch)
    if offset and first_epoch < epochs:
        segments.append((first_epoch, first_epoch + 1, steps - offset))
        first_epoch += 1
    if first_epoch < epochs:
        segments.append((first_epoch, epochs, steps))
    log_dir = os.path.join(output_dir, "logs")
    callbacks = [
        SaveTrainerEvery(trainer, checkpoint, save_every_steps),
        keras.callbacks.TensorBoard(log_dir),
        RoutingStatsLogger(os.path.join(log_dir, "routing")),
    ]
    wrapper = ExpertParallelModel(trainer)
    logged = {}
    for initial_epoch, end_epoch, epoch_steps in segments:
        part = wrapper.fit(
            stream.skip(trainer.step),
            epochs=end_epoch,
            initial_epoch=initial_epoch,
            steps_per_epoch=epoch_steps,
            callbacks=callbacks,
            verbose=progress_verbosity(verbose),
        )
        for key, values in part.history.items():
            logged.setdefault(key, []).extend(float(x) for x in values)
        if wrapper.stop_training:
            break
    trainer.save(checkpoint)
    if files.exists(earlier):  # superseded by the directory
        tf.io.gfile.remove(earlier)
    model_file = save_keras(model, os.path.join(output_dir, "model.keras"))
    if logged:  # empty when a finished run is started again
        write_json(os.path.join(output_dir, "history.json"), logged)
    return {
        "model": model_file,
        "logs": log_dir,
        "mesh": {
            name: trainer.mesh.dim_size(name) for name in ("batch", "expert")
        },
        "resumed_from_step": start,
        "steps": total,
        "last_epoch": {k: v[-1] for k, v in logged.items() if v},
    }
