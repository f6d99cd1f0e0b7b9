"""Distribution: tf.distribute strategies and expert parallelism on a
DTensor mesh. Crash-safe Keras `fit` is `keras_moe.training.fit_resumable`;
crash-safe expert-parallel training is `train_resumable` here
(`keras_moe.distribution.checkpointing`)."""

# DTensor expert parallelism.
from keras_moe.distribution.checkpointing import CheckpointEvery
from keras_moe.distribution.checkpointing import checkpoint_path
from keras_moe.distribution.checkpointing import list_checkpoints
from keras_moe.distribution.checkpointing import restore_latest
from keras_moe.distribution.checkpointing import train_resumable
from keras_moe.distribution.expert_parallel import SUPPORTED_OPTIMIZERS
from keras_moe.distribution.expert_parallel import DTensorOptimizer
from keras_moe.distribution.expert_parallel import ExpertParallelTrainer
from keras_moe.distribution.expert_parallel_fit import ExpertParallelModel
from keras_moe.distribution.mesh import MESH_AXES
from keras_moe.distribution.mesh import as_mesh
from keras_moe.distribution.mesh import default_devices
from keras_moe.distribution.mesh import make_mesh
from keras_moe.distribution.mesh import parse_mesh_spec

# tf.distribute data parallelism.
from keras_moe.distribution.strategies import STRATEGY_NAMES
from keras_moe.distribution.strategies import TFConfig
from keras_moe.distribution.strategies import auto_strategy_name
from keras_moe.distribution.strategies import build_for_fit
from keras_moe.distribution.strategies import check_global_batch_size
from keras_moe.distribution.strategies import fit_distributed
from keras_moe.distribution.strategies import get_strategy
from keras_moe.distribution.strategies import parse_tf_config
from keras_moe.distribution.strategies import prepare_dataset
