"""Test-wide settings, applied before any test module imports TensorFlow.

Device configuration (virtual CPU devices, strategies) is left to the tests
that need it: it must happen before TensorFlow initialises its devices, which
a test module controls better than this file.
"""

import os

# Keras reads the backend once, at import: pin it before any test imports it.
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# Keep TensorFlow's C++ INFO/WARNING chatter out of test output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def pytest_configure(config):
    # Also declared in pyproject.toml; repeated so the marker exists when
    # pytest runs with another config file.
    config.addinivalue_line(
        "markers", "slow: long-running test (deselect with -m 'not slow')"
    )
