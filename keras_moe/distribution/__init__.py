"""Distributed training: tf.distribute strategies and crash-safe `fit`."""

# tf.distribute data parallelism and crash-safe training.
from keras_moe.distribution.fault_tolerance import fit_resumable
from keras_moe.distribution.fault_tolerance import is_chief
from keras_moe.distribution.fault_tolerance import list_checkpoints
from keras_moe.distribution.fault_tolerance import reproducible_shuffle
from keras_moe.distribution.fault_tolerance import restore_checkpoint
from keras_moe.distribution.fault_tolerance import save_checkpoint
from keras_moe.distribution.strategies import STRATEGY_NAMES
from keras_moe.distribution.strategies import TFConfig
from keras_moe.distribution.strategies import auto_strategy_name
from keras_moe.distribution.strategies import build_for_fit
from keras_moe.distribution.strategies import check_global_batch_size
from keras_moe.distribution.strategies import fit_distributed
from keras_moe.distribution.strategies import get_strategy
from keras_moe.distribution.strategies import parse_tf_config
from keras_moe.distribution.strategies import prepare_dataset

# DTensor expert parallelism (expert_parallel.py, mesh.py).
