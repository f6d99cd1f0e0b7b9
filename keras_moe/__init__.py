"""keras_moe: sparse Mixture-of-Experts layers and upcycling for Keras 3."""

from keras_moe import checkpoints  # registers the loader of from_preset
from keras_moe import layers
from keras_moe.evaluation import metrics
from keras_moe.layers import MoeLayer
from keras_moe.models import moe_layers
from keras_moe.models import with_eval_capacity_factor
from keras_moe.upcycling import summarize
from keras_moe.upcycling import upcycle
from keras_moe.upcycling import upcycle_checkpoint
from keras_moe.upcycling import upcycle_optimizer

__version__ = "0.2.0"
