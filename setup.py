"""Packaging for keras_moe.

`pip install .` installs one top-level package, `keras_moe`: the library,
with the repository's launchers (apps/) as `keras_moe.apps` and its
SavedModel export (export/) as `keras_moe.export`, and a `keras-moe-*` console
script per launcher. Requirements are compatible ranges; the exact versions
the project is tested with are pinned in requirements/constraints.txt (the
Makefile and CI install with `-c requirements/constraints.txt`).
"""

import pathlib
import re

from setuptools import find_packages
from setuptools import setup
from setuptools.command.build_py import build_py

_HERE = pathlib.Path(__file__).parent
# One version source: keras_moe.__version__.
_VERSION = re.search(
    r'^__version__ = "([^"]+)"$',
    (_HERE / "keras_moe" / "__init__.py").read_text(encoding="utf-8"),
    re.M,
).group(1)

# The repository keeps apps/ and export/ at its top level (a checkout runs
# `python -m apps.demo`); installed, they live under keras_moe so that no
# generic top-level name (`apps`, `export`) is claimed.
_PACKAGE_DIR = {"keras_moe.apps": "apps", "keras_moe.export": "export"}
_PACKAGES = [
    *find_packages(include=["keras_moe", "keras_moe.*"]),
    *_PACKAGE_DIR,
]
# Launchers that drive the top-level benchmarks/ package, which is not
# installed: they run from a checkout only.
_CHECKOUT_ONLY = {
    ("keras_moe.apps", "benchmark"),
    ("keras_moe.apps", "benchmark_upcycle"),
}
_CONSOLE_SCRIPTS = [
    "keras-moe-demo = keras_moe.apps.demo:cli",
    "keras-moe-evaluate = keras_moe.apps.evaluate:cli",
    "keras-moe-reproduce = keras_moe.apps.reproduce:cli",
    "keras-moe-train = keras_moe.apps.train:cli",
    "keras-moe-train-dense = keras_moe.apps.train_dense:cli",
    "keras-moe-train-vlm = keras_moe.apps.train_vlm:cli",
    "keras-moe-upcycle = keras_moe.apps.upcycle:cli",
    "keras-moe-export = keras_moe.export.export_saved_model:cli",
]


class _BuildPy(build_py):
    """build_py without the checkout-only launchers."""

    def find_package_modules(self, package, package_dir):
        modules = super().find_package_modules(package, package_dir)
        return [m for m in modules if (m[0], m[1]) not in _CHECKOUT_ONLY]


# What `import keras_moe` and the core path (layers, models, checkpoints,
# upcycling, training, evaluation, distribution) need. TensorFlow is held to
# the minor release whose DTensor, XLA and SavedModel behaviour the tests
# check.
_INSTALL_REQUIRES = [
    "tensorflow>=2.20,<2.21",
    "keras>=3.15,<4",
    "numpy>=1.26,<3",
    "h5py>=3.10",
    "safetensors>=0.4.3",
    "scikit-learn>=1.4",
    "tensorflow-datasets>=4.9.6,<5",
    # tensorflow-datasets imports it without declaring it.
    "importlib_resources>=6",
    "absl-py>=1.4",
]

_TEXT = [
    # SentencePiece in graphs; built against one TensorFlow minor release.
    "tensorflow-text>=2.20,<2.21",
    "sentencepiece>=0.2",
    "num2words>=0.5.13",
]
# PredictRequest protos and model-server configs written by export/.
_SERVING = ["tensorflow-serving-api>=2.20,<2.21"]
_PLOTS = ["matplotlib>=3.8"]
# keras-hub T5/ViT objects and presets converted by keras_moe.checkpoints.
_HUB = ["keras-hub>=0.32,<0.33"]

_EXTRAS_REQUIRE = {
    "text": _TEXT,
    "serving": _SERVING,
    "plots": _PLOTS,
    "hub": _HUB,
    # `keras-moe-demo`: train, upcycle, export and serve the ViT demo.
    "demo": [*_SERVING, *_PLOTS],
    "all": [*_TEXT, *_SERVING, *_PLOTS, *_HUB],
    # The peer MoE layer of the benchmarks (Keras 2, never mixed with Keras 3).
    "bench": ["tf-models-official>=2.20,<2.21", *_HUB],
    "test": [
        *_TEXT,
        *_SERVING,
        *_PLOTS,
        *_HUB,
        "pytest>=8",
        "black",
        "isort",
        "ruff",
        # Reference statistics (e.g. the normal CDF) in loss tests.
        "scipy",
        # The TF peer MoE layer, used for cross-checks.
        "tf-models-official>=2.20,<2.21",
        # Reference implementations for parity tests (CPU build of torch).
        "torch>=2.4",
        "transformers>=5,<6",
    ],
}

setup(
    name="keras_moe",
    version=_VERSION,
    description=(
        "Sparse Mixture-of-Experts layers and sparse upcycling for Keras 3 "
        "on TensorFlow."
    ),
    long_description=(_HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    license_files=["LICENSE"],
    python_requires=">=3.11",
    packages=_PACKAGES,
    package_dir=_PACKAGE_DIR,
    # The C program that loads exports through TensorFlow's C API.
    package_data={"keras_moe.export": ["native/*.c"]},
    cmdclass={"build_py": _BuildPy},
    entry_points={"console_scripts": _CONSOLE_SCRIPTS},
    install_requires=_INSTALL_REQUIRES,
    extras_require=_EXTRAS_REQUIRE,
    classifiers=[
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3.11",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
