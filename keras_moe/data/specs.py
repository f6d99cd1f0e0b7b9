"""What a dataset is for, read from its TFDS features, and its batches.

An image dataset (features `image` <uint8>[H, W, C] and `label`) is a
classification task for a ViT, images scaled to [0, 1]; `number_words` is a
translation task for a T5 (encoder inputs, decoder inputs, targets; the loss
and metrics skip target padding).

Shape letters: B batch, H, W, C image height, width and channels, T encoder
length, U decoder (target) length, K classes.
"""

import dataclasses

import tensorflow as tf

from keras_moe.data import pipelines
from keras_moe.data import registry as data_registry
from keras_moe.data.vocabulary import PAD_ID
from keras_moe.data.vocabulary import VOCAB_SIZE
from keras_moe.models.t5 import T5
from keras_moe.models.vit import ViT

DEFAULT_DATASETS = {"vit": "digits", "t5": "number_words"}
CLASSIFICATION = "classification"
TRANSLATION = "translation"


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
            split in a new order (`keras_moe.data.reproducible_shuffle`: pass
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
        return pipelines.classification_dataset(
            spec.name, split, batch_size, **options
        )
    dataset = pipelines.seq2seq_dataset(
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
    return inputs, targets, tf.cast(targets != PAD_ID, tf.float32)


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
        if model.vocab_size != VOCAB_SIZE:
            raise ValueError(
                f"dataset {spec.name!r} is tokenised with keras_moe.data's "
                f"vocabulary of {VOCAB_SIZE} ids; the model has "
                f"vocab_size={model.vocab_size}"
            )
