"""Presets: a trained model in one directory, laid out as keras-hub lays it.

`T5.from_preset(preset)`, `ViT.from_preset(preset)` and
`VisionLanguageModel.from_preset(preset)` load weights, as `from_preset`
does in keras-hub; `from_architecture(name, **overrides)` (the VLM's
`from_architectures`) builds a randomly initialised model of a named size.

`model.save_to_preset(preset_dir)` writes the layout of keras-hub's
`save_to_preset`, atomically (`keras_moe.utils.files.atomic_directory`: a
reader sees no directory or the complete one; `gs://` and other schemes
through `tf.io.gfile`):

    config.json       `keras.saving.serialize_keras_object(model)` without
                      its build and compile configs: `module`, `class_name`,
                      `registered_name` ("keras_moe>T5", ...) and `config`,
                      the constructor arguments (MoE blocks included)
    model.weights.h5  `model.save_weights`
    metadata.json     keras_version, keras_moe_version, parameter_count,
                      date_saved (UTC)

Reading a preset takes the checkpoint readers, and `keras_moe.checkpoints`
is a later stage than the models: it registers its loader here with
`register_preset_loader` when it is imported (`import keras_moe` imports
it). The loader takes, besides the directories above, keras-hub preset
directories, Hugging Face `save_pretrained` directories and hub handles
(`hf://org/name`, `kaggle://org/model/keras/variant[/version]`).
"""

import datetime
import importlib.metadata
import os

import keras

from keras_moe.utils import files

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.weights.h5"
METADATA_FILE = "metadata.json"
# The prefix of a keras_moe class's `registered_name` in config.json.
PACKAGE = "keras_moe"

# Architecture name -> the name of the class whose `from_architecture`
# takes it; filled by the model modules, read for the error that a name
# passed to `from_preset` gets.
_ARCHITECTURES = {}
_LOADER = None


def register_architectures(class_name, names):
    """Records that `class_name.from_architecture` takes `names`."""
    for name in names:
        _ARCHITECTURES[name] = class_name


def register_preset_loader(loader):
    """Sets the function `from_preset` loads with; returns it.

    Args:
        loader: `loader(preset, model_class)` -> a model, given a preset
            path or handle (a str) and the class `from_preset` was called
            on; it raises `ValueError` for anything it cannot load.
            `keras_moe.checkpoints` registers its loader at import; a
            later registration replaces an earlier one.
    """
    if not callable(loader):
        raise ValueError(
            f"loader must be callable; received {type(loader).__name__}"
        )
    global _LOADER
    _LOADER = loader
    return loader


def preset_loader():
    """The registered loader, or None."""
    return _LOADER


def load_preset(model_class, preset, **kwargs):
    """`model_class.from_preset(preset)`: see `PresetMixin.from_preset`."""
    owner = model_class.__name__
    if kwargs:
        raise ValueError(
            f"{owner}.from_preset loads a saved model and takes no "
            f"constructor arguments; received {sorted(kwargs)}. A new model "
            f"of a named size with overrides: {owner}.from_architecture"
            "(name, **overrides)."
        )
    if not isinstance(preset, (str, os.PathLike)) or not os.fspath(preset):
        raise ValueError(
            f"preset must be a directory or a hub handle (a non-empty str); "
            f"received {preset!r}"
        )
    preset = os.fspath(preset)
    if not files.is_url(preset) and not os.path.exists(preset):
        if preset in _ARCHITECTURES:
            builder = _ARCHITECTURES[preset]
            build = f"{builder}.from_architecture({preset!r})"
            if owner != builder and hasattr(model_class, "from_architectures"):
                build = f"{owner}.from_architectures(vision_name, text_name)"
            raise ValueError(
                f"{preset!r} names a {builder} architecture, not a preset "
                f"with weights: {build} builds a randomly initialised model "
                "of that size; from_preset loads weights (a directory "
                "written by save_to_preset, a keras-hub preset, a Hugging "
                "Face directory, hf://... or kaggle://...)"
            )
        raise ValueError(
            f"No preset at {preset!r}: from_preset takes a directory written "
            "by save_to_preset, a keras-hub preset, a Hugging Face "
            "directory or a hub handle (hf://org/name, "
            "kaggle://org/model/keras/variant)"
        )
    if _LOADER is None:
        raise ValueError(
            f"Cannot load {preset!r}: no preset loader is registered. "
            "`import keras_moe` (or keras_moe.checkpoints) registers the "
            "checkpoint readers that from_preset loads with."
        )
    model = _LOADER(preset, model_class)
    if not isinstance(model, model_class):
        found = type(model).__name__
        raise ValueError(
            f"{preset} holds a {found}, not a {owner}: load it with "
            f"{found}.from_preset"
        )
    return model


def _pop_recursively(config, key):
    config.pop(key, None)
    for value in config.values():
        if isinstance(value, dict):
            _pop_recursively(value, key)


def _version():
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:  # a source tree
        return None


def preset_config(model):
    """The content of a preset's config.json for `model`."""
    config = keras.saving.serialize_keras_object(model)
    for key in ("build_config", "compile_config"):
        _pop_recursively(config, key)
    return config


def save_preset(model, preset_dir, overwrite=False):
    """`model.save_to_preset(preset_dir)`: see `PresetMixin.save_to_preset`."""
    if not isinstance(preset_dir, (str, os.PathLike)) or not os.fspath(
        preset_dir
    ):
        raise ValueError(
            f"preset_dir must be a directory path; received {preset_dir!r}"
        )
    if not isinstance(overwrite, bool):
        raise ValueError(f"overwrite must be a bool; received {overwrite!r}")
    preset_dir = os.fspath(preset_dir)
    if files.exists(preset_dir) and not overwrite:
        raise ValueError(
            f"{preset_dir} exists; pass overwrite=True to replace it"
        )
    config = preset_config(model)
    metadata = {
        "keras_version": keras.version(),
        "keras_moe_version": _version(),
        "parameter_count": model.count_params(),
        "date_saved": datetime.datetime.now(datetime.timezone.utc).strftime(
            "%Y-%m-%d@%H:%M:%S"
        ),
    }
    with files.atomic_directory(preset_dir, overwrite=overwrite) as temp:
        files.write_json(os.path.join(temp, CONFIG_FILE), config)
        files.write_json(os.path.join(temp, METADATA_FILE), metadata)
        model.save_weights(os.path.join(temp, WEIGHTS_FILE))
    return files.absolute(preset_dir)


class PresetMixin:
    """`from_preset` and `save_to_preset` for a keras_moe model class."""

    @classmethod
    def from_preset(cls, preset, **kwargs):
        """Loads a model of this class, weights included, from `preset`.

        Args:
            preset: a directory written by `save_to_preset` (MoE models
                included); for `T5` and `ViT` also a keras-hub preset
                directory or a Hugging Face `save_pretrained` directory
                (safetensors and config.json); or a handle: `hf://org/name`
                (through `huggingface_hub`), `kaggle://org/model/keras/
                variant[/version]` (through `kagglehub`), or a path with a
                `tf.io.gfile` scheme (`gs://...`).
            **kwargs: none are taken; `from_architecture(name,
                **overrides)` builds a new, randomly initialised model.

        Returns:
            A built model of this class.

        Raises:
            ValueError: no preset there; an architecture name (such as
                "t5_small"), which `from_architecture` takes; a preset of
                another class (naming both); a handle whose scheme is
                unknown, whose package is missing or whose download fails;
                or no loader registered (`import keras_moe` registers it).

        Example:

        >>> import tempfile, os, keras_moe
        >>> from keras_moe.models import T5
        >>> path = os.path.join(tempfile.mkdtemp(), "t5")
        >>> _ = T5.from_architecture("t5_tiny").save_to_preset(path)
        >>> T5.from_preset(path).vocab_size
        128
        """
        return load_preset(cls, preset, **kwargs)

    def save_to_preset(self, preset_dir, overwrite=False):
        """Writes the model as a preset directory `from_preset` loads.

        The keras-hub layout (config.json, model.weights.h5,
        metadata.json; see `keras_moe.models.presets`), written
        atomically: a reader sees no directory or the complete one.

        Args:
            preset_dir: the directory to write (local, or `gs://...` and
                other `tf.io.gfile` schemes).
            overwrite: replace an existing `preset_dir`.

        Returns:
            The absolute path of `preset_dir`.

        Raises:
            ValueError: `preset_dir` exists and `overwrite` is False, or is
                not a path.
        """
        return save_preset(self, preset_dir, overwrite=overwrite)
