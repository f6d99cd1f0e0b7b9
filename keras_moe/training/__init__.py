"""Training: compile and fit helpers, learning-rate schedules, callbacks and
crash-safe, resumable `fit`.

* `fit`: `compile_for_task`, `dense_model`, `pretrain_dense` and `train`
  (under a tf.distribute strategy or on an expert-parallel DTensor mesh).
* `schedules`: `LinearWarmup` and `InverseSqrtWarmup`.
* `callbacks`: `RoutingStatsLogger` (per-layer routing statistics in
  TensorBoard), `SaveTrainerEvery`.
* `resumable`: `fit_resumable` and its atomic checkpoints.
"""

from keras_moe.training.callbacks import RoutingStatsLogger
from keras_moe.training.callbacks import SaveTrainerEvery
from keras_moe.training.fit import compile_for_task
from keras_moe.training.fit import dense_model
from keras_moe.training.fit import pretrain_dense
from keras_moe.training.fit import train
from keras_moe.training.resumable import fit_resumable
from keras_moe.training.resumable import is_chief
from keras_moe.training.resumable import list_checkpoints
from keras_moe.training.resumable import restore_checkpoint
from keras_moe.training.resumable import save_checkpoint
from keras_moe.training.schedules import InverseSqrtWarmup
from keras_moe.training.schedules import LinearWarmup
