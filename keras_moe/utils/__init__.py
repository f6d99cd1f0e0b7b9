"""Helpers every stage may import: atomic file writes and argument checks.

Nothing here knows about models, data or training; it imports only the
standard library (and TensorFlow's file API is not needed yet).
"""

from keras_moe.utils.checks import check_int
from keras_moe.utils.checks import check_positive_int
from keras_moe.utils.files import atomic_directory
from keras_moe.utils.files import atomic_path
from keras_moe.utils.files import fsync_path
from keras_moe.utils.files import save_keras
from keras_moe.utils.files import write_bytes
from keras_moe.utils.files import write_json
from keras_moe.utils.files import write_text
