"""Packaging for keras_moe.

Exact versions of the whole stack live in requirements/constraints.txt; install
with `pip install -c requirements/constraints.txt -e '.[test,bench,hub]'` (or
`make venv`). Pins below are the ones the code depends on: unpinned, pip
backtracks tf-models-official to old releases and fails to resolve.
"""

import pathlib
import re

from setuptools import find_packages
from setuptools import setup

_HERE = pathlib.Path(__file__).parent
# One version source: keras_moe.__version__.
_VERSION = re.search(
    r'^__version__ = "([^"]+)"$',
    (_HERE / "keras_moe" / "__init__.py").read_text(encoding="utf-8"),
    re.M,
).group(1)

_PACKAGES = [
    "keras_moe",
    "keras_moe.*",
    "apps",
    "apps.*",
    "export",
    "export.*",
]

_KERAS_HUB = ["keras-hub==0.32.0", "kaggle==2.2.1"]

_INSTALL_REQUIRES = [
    "tensorflow==2.20.0",
    # PredictRequest protos and serving configs written by export/.
    "tensorflow-serving-api==2.20.0",
    "keras==3.15.1",
    "tensorflow-text==2.20.1",
    "tensorflow-datasets==4.9.10",
    # tensorflow-datasets imports it without declaring it.
    "importlib_resources",
    # Held at 1.4.0 by tf-models-official's dependencies.
    "absl-py==1.4.0",
    "numpy",
    "sentencepiece",
    "scikit-learn",
    "num2words",
    "safetensors",
    "matplotlib",
]

_EXTRAS_REQUIRE = {
    "test": [
        "pytest",
        "black",
        "isort",
        "ruff",
        # Reference statistics (e.g. the normal CDF) in loss tests.
        "scipy",
        # The TF peer MoE layer, used for cross-checks.
        "tf-models-official==2.20.0",
        # Reference implementations for parity tests (CPU build of torch).
        "torch==2.13.0",
        "transformers==5.24.0",
        *_KERAS_HUB,
    ],
    "bench": ["tf-models-official==2.20.0", *_KERAS_HUB],
    "hub": list(_KERAS_HUB),
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
    packages=find_packages(include=_PACKAGES),
    # The C program that loads exports through TensorFlow's C API.
    package_data={"export": ["native/*.c"]},
    install_requires=_INSTALL_REQUIRES,
    extras_require=_EXTRAS_REQUIRE,
    classifiers=[
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3.11",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
