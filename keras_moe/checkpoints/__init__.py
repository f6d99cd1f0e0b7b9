"""Checkpoint readers: each source format into a keras_moe model.

`read_checkpoint(path)` picks the architecture and the format; the readers
of each family live in `keras_moe.checkpoints.t5` and
`keras_moe.checkpoints.vit` (`read_t5_checkpoint` and `read_vit_checkpoint`
pick the format within a family), the file handling they share in
`keras_moe.checkpoints.io`. `load_model(path)` also takes a `.keras` file.
Writers of the dense formats are in `keras_moe.checkpoints.writers`.

Importing this package registers `load_preset` as the loader of
`T5.from_preset`, `ViT.from_preset` and `VisionLanguageModel.from_preset`
(`keras_moe.models.presets`): the models cannot import the readers, which
belong to this later stage. Preset directories that `save_to_preset`
writes and hub handles are read by `keras_moe.checkpoints.presets`.
"""

import json
import os

import keras

from keras_moe.checkpoints.common import CheckpointMismatchError
from keras_moe.checkpoints.common import assign_weights
from keras_moe.checkpoints.presets import is_hub_handle
from keras_moe.checkpoints.presets import is_keras_moe_preset
from keras_moe.checkpoints.presets import local_preset
from keras_moe.checkpoints.presets import read_keras_moe_preset
from keras_moe.models.presets import register_preset_loader
from keras_moe.models.t5 import T5
from keras_moe.models.vit import ViT
from keras_moe.models.vlm import VisionLanguageModel

ARCHITECTURES = ("t5", "vit")


def read_checkpoint(path, architecture=None, **kwargs):
    """Reads a T5 or ViT checkpoint of any supported format.

    Supported: preset directories that `save_to_preset` writes (dense or
    MoE), original T5 (Mesh TensorFlow) checkpoints, Hugging Face
    safetensors directories, TF Model Garden checkpoints and keras-hub
    presets or `.weights.h5` files.

    Args:
        path: a checkpoint path (file, prefix or directory), or a hub
            handle: `hf://org/name` (Hugging Face, through
            `huggingface_hub`) or `kaggle://org/model/keras/variant`
            (keras-hub presets, through `kagglehub`).
        architecture: "t5", "vit" or None to try both (T5 first).
        **kwargs: passed to the family's `read_t5_checkpoint` or
            `read_vit_checkpoint`: `config=` (an architecture name or a
            dict of model kwargs) fixes what the format does not record
            (a `save_to_preset` directory records everything: `config`
            is checked against it).

    Returns:
        A built keras_moe `T5` or `ViT`.

    Raises:
        ValueError naming the path and why no reader accepted it.
    """
    if architecture is not None and architecture not in ARCHITECTURES:
        raise ValueError(
            f"architecture must be one of {ARCHITECTURES} or None; received "
            f"{architecture!r}"
        )
    if is_hub_handle(path):
        # hf://org/name or kaggle://org/model/keras/variant: downloaded (or
        # read from the hub's cache) into a local directory first.
        with local_preset(path) as directory:
            return read_checkpoint(directory, architecture, **kwargs)
    if isinstance(path, (str, os.PathLike)) and not os.path.exists(path):
        if not os.path.exists(os.fspath(path) + ".index"):
            raise ValueError(f"checkpoint path does not exist: {path}")
    if is_keras_moe_preset(path):
        wanted = _CLASSES[architecture] if architecture else (T5, ViT)
        return read_keras_moe_preset(path, wanted, **kwargs)
    candidates = [architecture] if architecture else _guess(path)
    errors = []
    for name in candidates:
        try:
            return _READERS[name](path, **kwargs)
        except CheckpointMismatchError:
            raise
        except ValueError as error:
            errors.append(f"as {name}: {error}")
    raise ValueError(
        f"no keras_moe reader accepts {path}: " + " | ".join(errors)
    )


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
            f"{path} holds a {type(model).__name__}; load_model "
            "takes keras_moe ViT and T5 models"
        )
    kind = "vit" if isinstance(model, ViT) else "t5"
    if architecture is not None and architecture != kind:
        raise ValueError(
            f"{path} holds a {kind} model; architecture={architecture!r} "
            "was asked for"
        )
    return model


def read_vlm_checkpoints(
    vit_path, t5_path, vit_options=None, t5_options=None, **kwargs
):
    """A `VisionLanguageModel` from a dense ViT and a dense T5 checkpoint.

    Any format `read_checkpoint` reads (Hugging Face, TF Model Garden,
    keras-hub, original T5); see `VisionLanguageModel.from_models`.

    Args:
        vit_path, t5_path: checkpoint paths.
        vit_options, t5_options: dicts of reader kwargs.
        **kwargs: `VisionLanguageModel.from_models` kwargs.
    """
    vit = read_checkpoint(vit_path, architecture="vit", **(vit_options or {}))
    t5 = read_checkpoint(t5_path, architecture="t5", **(t5_options or {}))
    return VisionLanguageModel.from_models(vit, t5, **kwargs)


def _guess(path):
    """Architectures to try, the likeliest first."""
    config = None
    if isinstance(path, (str, os.PathLike)) and os.path.isdir(path):
        config_path = os.path.join(path, "config.json")
        if os.path.isfile(config_path):
            with open(config_path) as f:
                config = f.read().lower()
    if config is not None and ("vit" in config and "t5" not in config):
        return ["vit", "t5"]
    if config is not None:
        json.loads(config)  # a clear error for a corrupt config.json
    return ["t5", "vit"]


def _read_t5(path, **kwargs):
    from keras_moe.checkpoints import t5

    return t5.read_t5_checkpoint(path, **kwargs)


def _read_vit(path, **kwargs):
    from keras_moe.checkpoints import vit

    return vit.read_vit_checkpoint(path, **kwargs)


_READERS = {"t5": _read_t5, "vit": _read_vit}
_CLASSES = {"t5": T5, "vit": ViT}


def load_preset(preset, model_class):
    """The loader of `from_preset` (registered at import; see
    `keras_moe.models.presets`).

    Args:
        preset: a local directory or a handle (`hf://`, `kaggle://`, a
            `tf.io.gfile` scheme); see `keras_moe.checkpoints.presets`.
        model_class: the class `from_preset` was called on.

    Returns:
        The model the preset holds: read by `read_keras_moe_preset` for a
        `save_to_preset` directory, else by `read_checkpoint` (keras-hub
        presets, Hugging Face directories and the other formats it reads;
        T5 and ViT only).
    """
    with local_preset(preset) as directory:
        if is_keras_moe_preset(directory):
            return read_keras_moe_preset(directory, model_class)
        if not issubclass(model_class, (T5, ViT)):
            raise ValueError(
                f"{preset} is not a preset save_to_preset wrote; "
                f"{model_class.__name__}.from_preset reads only those"
            )
        try:
            return read_checkpoint(directory)
        except CheckpointMismatchError:
            raise
        except ValueError as error:
            if directory == preset:
                raise
            raise ValueError(f"{preset} (in {directory}): {error}") from error


register_preset_loader(load_preset)
