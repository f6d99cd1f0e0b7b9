"""keras_moe: sparse Mixture-of-Experts layers and upcycling for Keras 3."""

from keras_moe import layers
from keras_moe.layers import MoeLayer

__version__ = "0.1.0"
