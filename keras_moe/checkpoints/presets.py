"""Reading presets: keras_moe preset directories and hub handles.

`save_to_preset` (`keras_moe.models.presets`) writes a keras_moe preset:
`config.json` (the serialised model: `registered_name` "keras_moe>T5",
"keras_moe>ViT" or "keras_moe>VisionLanguageModel", and the constructor
config), `model.weights.h5` and `metadata.json`. keras-hub presets have the
same files, with a keras-hub class in `config.json`: the class tells them
apart. `read_keras_moe_preset` reads one back; `read_checkpoint` and
`from_preset` call it.

`local_preset(preset)` gives a local directory for what `from_preset`
takes:

* a local directory, as it is;
* `hf://org/name`: the repository's JSON, safetensors and `.weights.h5`
  files, through `huggingface_hub.snapshot_download` (its cache and
  settings: `HF_HOME`, `HF_HUB_OFFLINE`, tokens);
* `kaggle://org/model/keras/variant[/version]`: the model's files, through
  `kagglehub.model_download`;
* a path with another scheme `tf.io.gfile` knows (`gs://`, `ram://`,
  `file://`): copied to a temporary directory, removed after the read.

A handle whose package is missing or whose download fails raises a
`ValueError` naming the handle and the cause.
"""

import contextlib
import os
import shutil
import tempfile

from keras_moe.checkpoints import io
from keras_moe.checkpoints.common import config_kwargs
from keras_moe.models.presets import CONFIG_FILE
from keras_moe.models.presets import PACKAGE
from keras_moe.models.presets import WEIGHTS_FILE
from keras_moe.models.t5 import T5
from keras_moe.models.t5 import t5_config
from keras_moe.models.vit import ViT
from keras_moe.models.vit import vit_config
from keras_moe.models.vlm import VisionLanguageModel
from keras_moe.utils import files

# The classes a keras_moe preset may hold, by their registered name.
CLASSES = {
    f"{PACKAGE}>{cls.__name__}": cls for cls in (T5, ViT, VisionLanguageModel)
}
_ARCHITECTURE_CONFIGS = {T5: t5_config, ViT: vit_config}
HF_SCHEME = "hf"
KAGGLE_SCHEME = "kaggle"
# The files of a Hugging Face repository that a reader may need: configs,
# safetensors (sharded or not) and Keras weights (presets kept on the
# hub); PyTorch, TF and Flax weights are not downloaded.
HF_PATTERNS = ("*.json", "*.safetensors", "*.weights.h5")


def _saved_config(path):
    """config.json of directory `path` if it is a JSON object, else None."""
    config_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(config_path):
        return None
    saved = io.read_json(config_path)
    return saved if isinstance(saved, dict) else None


def is_keras_moe_preset(path):
    """Whether `path` is a directory whose config.json names a keras_moe
    class (as `save_to_preset` writes it)."""
    if not isinstance(path, (str, os.PathLike)) or not os.path.isdir(path):
        return False
    try:
        saved = _saved_config(path)
    except ValueError:  # an unreadable config.json: not recognisably ours
        return False
    name = saved.get("registered_name") if saved else None
    return isinstance(name, str) and name.startswith(f"{PACKAGE}>")


def read_keras_moe_preset(path, model_class=None, config=None):
    """Reads a preset directory that `save_to_preset` wrote.

    Args:
        path: the directory.
        model_class: None, or the class (or a tuple of classes) the
            preset must hold (`T5`, `ViT`, `VisionLanguageModel`), checked
            before any weight is read.
        config: None, or a dict of constructor kwargs (for `T5` and `ViT`
            also an architecture name) that the saved config must agree
            with: a preset records its whole config, so this only checks.

    Returns:
        The model, built from config.json, with the weights of
        model.weights.h5.

    Raises:
        ValueError: not a keras_moe preset, a class other than
            `model_class`, a `config` that disagrees, or a missing,
            truncated or mismatched weights file.
    """
    path = os.fspath(path)
    saved = _saved_config(path)
    if saved is None:
        raise ValueError(f"{path} is not a preset: it has no {CONFIG_FILE}")
    name = saved.get("registered_name")
    if name not in CLASSES:
        raise ValueError(
            f"{os.path.join(path, CONFIG_FILE)} describes {name!r}; a "
            f"keras_moe preset holds one of {sorted(CLASSES)}"
        )
    cls = CLASSES[name]
    if model_class is not None and not issubclass(cls, model_class):
        wanted = (
            model_class if isinstance(model_class, tuple) else [model_class]
        )
        wanted = " or ".join(c.__name__ for c in wanted)
        raise ValueError(
            f"{path} holds a {cls.__name__} preset, not a {wanted}: load it "
            f"with {cls.__name__}.from_preset"
        )
    kwargs = saved.get("config")
    if not isinstance(kwargs, dict):
        raise ValueError(
            f"{os.path.join(path, CONFIG_FILE)} has no constructor config "
            f"(a dict under 'config'); received {kwargs!r}"
        )
    _check_agrees(cls, kwargs, config, path)
    weights = os.path.join(path, WEIGHTS_FILE)
    if not os.path.isfile(weights):
        raise ValueError(f"{path} is not a complete preset: no {WEIGHTS_FILE}")
    with io.open_h5(weights) as datasets:  # also rejects a truncated file
        stored = len(datasets)
    try:
        model = cls.from_config(kwargs)
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"Cannot build the {cls.__name__} of {path}/{CONFIG_FILE}: "
            f"{error}"
        ) from error
    # Keras reports the variables a file lacks but ignores the ones it
    # holds in excess (a config with fewer blocks than the weights).
    expected = len({id(weight) for weight in model.weights})
    if stored != expected:
        raise ValueError(
            f"Cannot load {weights}: it holds {stored} variables, the "
            f"{cls.__name__} of its {CONFIG_FILE} has {expected}"
        )
    try:
        model.load_weights(weights)
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(
            f"Cannot load {weights} into the {cls.__name__} of its "
            f"{CONFIG_FILE}: {error}"
        ) from error
    return model


def _check_agrees(cls, saved, config, path):
    if config is None:
        return
    if isinstance(config, str) and cls in _ARCHITECTURE_CONFIGS:
        given = config_kwargs(config, cls, _ARCHITECTURE_CONFIGS[cls])
    elif isinstance(config, dict):
        given = dict(config)
    else:
        raise ValueError(
            f"config must be None or a dict of {cls.__name__} kwargs; "
            f"received {config!r}"
        )
    differ = {
        key: (value, saved.get(key))
        for key, value in given.items()
        if saved.get(key) != value
    }
    if differ:
        raise ValueError(
            f"config disagrees with the preset {path} (given, saved): "
            f"{differ}"
        )


def is_hub_handle(path):
    """Whether `path` is an `hf://` or `kaggle://` handle."""
    if not isinstance(path, str) or "://" not in path:
        return False
    return path.split("://", 1)[0].lower() in (HF_SCHEME, KAGGLE_SCHEME)


@contextlib.contextmanager
def local_preset(preset):
    """Yields a local directory holding `preset` (see the module docstring).

    Raises:
        ValueError: no directory there, an unknown scheme or a malformed
            handle, a missing package or a failed download.
    """
    preset = os.fspath(preset)
    if not files.is_url(preset):
        if not os.path.isdir(preset):
            raise ValueError(f"No preset directory at {preset!r}")
        yield preset
        return
    scheme, rest = preset.split("://", 1)
    scheme = scheme.lower()
    if scheme == HF_SCHEME:
        yield _hf_download(preset, rest)
    elif scheme == KAGGLE_SCHEME:
        yield _kaggle_download(preset, rest)
    elif scheme in _gfile_schemes():
        with _gfile_copy(preset) as local:
            yield local
    else:
        raise ValueError(
            f"Unknown preset scheme {scheme!r} in {preset!r}: expected "
            f"{HF_SCHEME}://org/name, {KAGGLE_SCHEME}://org/model/keras/"
            f"variant[/version], a tf.io.gfile scheme "
            f"{sorted(s for s in _gfile_schemes() if s)} or a local directory"
        )


def _hf_download(preset, repo_id):
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(parts):
        raise ValueError(
            f"A Hugging Face handle is hf://org/name; received {preset!r}"
        )
    try:
        import huggingface_hub
    except ImportError:
        raise ValueError(
            f"Loading {preset} needs the huggingface_hub package "
            "(pip install huggingface_hub)"
        ) from None
    try:
        return huggingface_hub.snapshot_download(
            repo_id=repo_id, allow_patterns=list(HF_PATTERNS)
        )
    except Exception as error:  # offline, no such repository, gated, ...
        raise ValueError(
            f"Cannot download {preset} from the Hugging Face Hub: "
            f"{type(error).__name__}: {error}"
        ) from error


def _kaggle_download(preset, handle):
    parts = handle.split("/")
    if len(parts) not in (4, 5) or not all(parts):
        raise ValueError(
            "A Kaggle handle is kaggle://org/model/keras/variant[/version]; "
            f"received {preset!r}"
        )
    try:
        import kagglehub
    except ImportError:
        raise ValueError(
            f"Loading {preset} needs the kagglehub package "
            "(pip install kagglehub)"
        ) from None
    try:
        return kagglehub.model_download(handle)
    except Exception as error:  # offline, no such model, gated, ...
        raise ValueError(
            f"Cannot download {preset} from Kaggle: "
            f"{type(error).__name__}: {error}"
        ) from error


def _gfile_schemes():
    import tensorflow as tf

    return tuple(tf.io.gfile.get_registered_schemes())


@contextlib.contextmanager
def _gfile_copy(preset):
    """Copies the directory `preset` (with a scheme) to a local temporary
    directory, removed when the block ends."""
    import tensorflow as tf

    gfile = tf.io.gfile
    if not gfile.isdir(preset):
        raise ValueError(f"No preset directory at {preset!r}")
    local = tempfile.mkdtemp(prefix="keras_moe-preset-")
    try:
        root = preset.rstrip("/")
        for directory, _, names in gfile.walk(root):
            relative = directory[len(root) :].strip("/")
            target = os.path.join(local, *relative.split("/"))
            os.makedirs(target, exist_ok=True)
            for name in names:
                gfile.copy(
                    files.join(directory, name),
                    os.path.join(target, name),
                    overwrite=True,
                )
        yield local
    finally:
        shutil.rmtree(local, ignore_errors=True)
