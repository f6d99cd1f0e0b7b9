"""Expert-parallel training of a Keras MoE model on a DTensor mesh.

Shape letters: B examples, G groups, C expert capacity, E experts, D model
dimension, n the size of the mesh's `expert` axis, b of its `batch` axis.

Keras 3 variables cannot be DTensors, but `Model.stateless_call` accepts
DTensor values for them. `ExpertParallelTrainer` keeps the training state
outside the Keras model, in DTensor variables (`dtensor.DVariable`):

    expert weights <[E, ...]>       sharded on `expert` (E/n per device)
    other weights, optimizer state  replicated (slots follow their weight)
    inputs, labels <[B, ...]>       split over all b*n devices (B/(b*n)
                                    per device; `layout="gshard"`, the
                                    default) or over `batch` only
                                    (`layout="replicated"`)

and runs one `tf.function` per step: `stateless_call` forward (with the
MoE auxiliary losses, `return_losses=True`), `tf.GradientTape` gradients
(those of expert weights come back sharded on `expert`), and the update
of the Keras optimizer given, applied to the DTensor variables by
`DTensorOptimizer` (Keras 3's rules for SGD, Adam and AdamW, checked
against Keras by test; see its docstring for why not tf_keras' DTensor
optimizers; Adafactor too). Inside every
`MoeLayer` the dispatched rows <[E, G*C, D]> are moved to the devices of
their experts before the experts and back after them
(`MoeLayer.relayout_hook`), so that each device runs only its E/n experts.

The Keras model stays the source of truth for export: `sync_to_model()`
copies the trained values into its variables. `save` writes a checkpoint
directory: the DTensor variables (weights, optimizer state) through
`tf.train.Checkpoint`, whose DTensor save has each device write its own
slices of an expert-sharded variable (nothing is gathered to one
device), and `meta.json` (step, variable paths, optimizer and loss
configuration, mesh); it appears atomically (written under a hidden name
beside it, then renamed). `restore` / `load` read it onto any mesh, one
device included, each variable into its layout there. The npz file of
the earlier format (`keras_moe.expert_parallel.v1`) is still read.
`keras_moe.distribution.checkpointing` saves every N steps and resumes
after a crash.

Example (runs on one device; with 8 devices use `"batch:2,expert:4"`):

>>> from keras_moe.distribution.mesh import make_mesh
>>> from keras_moe.layers.moe import MoeLayer
>>> inputs = keras.Input((4, 8))
>>> hidden = MoeLayer(num_experts=2, hidden_dim=16)(inputs)
>>> outputs = keras.layers.Dense(3)(keras.layers.Flatten()(hidden))
>>> model = keras.Model(inputs, outputs)
>>> trainer = ExpertParallelTrainer(
...     model,
...     make_mesh(batch=1, expert=1, devices=["CPU:0"]),
...     optimizer=keras.optimizers.Adam(1e-3),
...     loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
... )
>>> x = np.random.default_rng(0).normal(size=(8, 4, 8)).astype("float32")
>>> y = np.arange(8) % 3
>>> dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
>>> losses = trainer.fit(dataset, steps=2)
>>> len(losses)
2
>>> trainer.sync_to_model()  # the Keras model now holds the new weights

Layouts. GShard (default): the global batch is split over all b*n
devices, device (i, j) of the mesh holding part i*n + j, so attention,
routers, embeddings and heads run on 1/(b*n) of the examples. A DTensor
layout cannot split one tensor axis over two mesh axes, so these
activations are batch-sharded DTensors nominally replicated over
`expert` whose devices along `expert` hold different examples; the
trainer crosses the expert axis explicitly (see `_spread_over_experts`):
in every MoE layer, rows <[N, E, D]> (N = G*C of a device's groups) ->
<[n, N, E, D]> with the new axis on `expert` -> all-to-all to
<[n, N, E, D]> with E on `expert` -> <[E, N*n, D]> for the experts, and
the inverse after them; the loss is the mean of the devices' losses and
the gradients of weights outside the experts are summed over `expert`
too. The routing groups of a device are its own tokens, so a model whose
`group_size` lets a group span two devices' examples routes differently
from one device (with `group_size=None`, a group is a sequence). The
batch size must be a multiple of b*n. Known DTensor limit (TensorFlow
2.20): on a `batch:1` mesh with one routing group per device (one
sequence each), a forward-only trace (`test_step`) fails in DTensor's
SPMD expansion ("The last dimensions of TopKV2Op outputs should be
UNSHARDED"; training steps expand): give each device two or more
examples there. Replicated (`layout="replicated"`,
the earlier layout, kept as a baseline): the batch is split over `batch`
and replicated over `expert`; entering the experts is a local slice and
leaving them an all-gather over `expert`, and every other layer runs
replicated over `expert`. On `batch:b,expert:1` both are plain data
parallelism.

Limits: router noise and dropout draw from the same seeds as on one
device but DTensor may split the draws differently, so such runs are not
bit-comparable with single-device training; with the GShard layout the
MoE layers' routing statistics are per-device values averaged over
`expert` (see `keras_moe.distribution.expert_parallel_fit`);
`jit_compile` is not used (DTensor ignores it on CPU); E^3 models are
refused (their `EnsembleTile` uses `tf.tile`, which DTensor cannot
partition).

DTensor defects worked around here (TensorFlow 2.20): the registered
gradient of `top_k` scatters with global indices into a batch-sharded
shard (`_dtensor_safe_top_k_gradient` swaps in a row-local one while the
step is differentiated), and a variable read right after a write in the
same step can return the old value (`DTensorOptimizer` writes each
variable once).

Several processes (multi-client DTensor: one Python process per host,
e.g. several GPU hosts, or per group of devices) train one mesh over all
their devices. Every process runs the same program:

* before any TensorFlow call, the environment: `DTENSOR_JOBS`, the
  `host:port` of every process in client order (its length is the
  number of processes; TensorFlow 2.20 does not read
  `DTENSOR_NUM_CLIENTS`), and `DTENSOR_CLIENT_ID`, this process's index
  in it (`DTENSOR_JOB_NAME` defaults to "worker");
* then `dtensor.initialize_accelerator_system(device_type)` (on CPU with
  `num_logical_cpu_devices=L` for L devices per process; every process
  must have the same number);
* the same model in every process (the same seed, or weights loaded from
  one file): each process supplies the initial values of its devices;
* the mesh as a spec (`"batch:2,expert:4"` counts every process's
  devices) or `keras_moe.distribution.mesh.make_mesh`, which builds it
  with `dtensor.create_distributed_mesh` (process c holds the global
  device ids [c*L, (c+1)*L));
* data: of every global batch of B examples each process passes only
  rows `trainer.local_batch_rows(B)` (the rows of its own devices) to
  `train_step`, `test_step` or `fit`; the global batch is never assembled
  in one process. Every process runs the same number of steps;
* checkpoints: every process calls `save` (or `CheckpointEvery`,
  `train_resumable`) with the same path on a file system they all share;
  process 0 writes `meta.json`, renames and prunes. `load` / `restore`
  read it onto any mesh, a single-process one included.

Checked: two processes on one machine (4 virtual CPUs each, gRPC over
loopback, TensorFlow 2.20) on `batch:2,expert:4` and `batch:1,expert:8`
meshes, against one device (tests/distribution/
test_expert_parallel_multihost.py); not on several machines, GPUs or TPUs.
"""

import contextlib
import io
import json
import os
import re

import keras
import numpy as np
import tensorflow as tf
from tensorflow.experimental import dtensor
from tensorflow.python.framework import ops as tf_ops

from keras_moe.distribution import mesh as mesh_lib
from keras_moe.layers.experts import Experts
from keras_moe.layers.moe import RELAYOUT_TO_EXPERTS
from keras_moe.layers.moe import RELAYOUT_TO_TOKENS
from keras_moe.layers.moe import MoeLayer
from keras_moe.models.moe_blocks import sublayers
from keras_moe.utils import files
from keras_moe.utils.checks import require_tensorflow_backend

# A checkpoint directory of `ExpertParallelTrainer.save`; the npz file of
# the earlier format is still read.
CHECKPOINT_FORMAT = "keras_moe.expert_parallel.v2"
_FORMAT_NPZ = "keras_moe.expert_parallel.v1"
# Keras 3 optimizers whose update rule `DTensorOptimizer` implements.
SUPPORTED_OPTIMIZERS = ("Adam", "AdamW", "Adafactor", "SGD")
# Token layouts of `ExpertParallelTrainer(layout=...)`.
GSHARD = "gshard"
REPLICATED = "replicated"
LAYOUTS = (GSHARD, REPLICATED)
# Options the trainer does not implement, with the values that disable them.
_UNSUPPORTED_OPTIMIZER_OPTIONS = {
    "use_ema": False,
    "loss_scale_factor": None,
    "gradient_accumulation_steps": None,
}
_META_KEY = "meta.json"
# Prefix of the TensorFlow checkpoint files in a checkpoint directory.
_STATE_PREFIX = "state"


def _topk_gradient_by_one_hot(op, grad, _):
    """Gradient of `TopKV2` without a flat `scatter_nd`.

    TensorFlow's own gradient scatters into the flattened input with
    global indices, which DTensor's SPMD expansion splits wrongly when the
    input is batch-sharded (the indices then fall outside the local
    shard). A one-hot contraction over the last axis stays local to each
    row and gives the same values.
    """
    num_classes = op.inputs[0].shape[-1]
    one_hot = tf.one_hot(op.outputs[1], num_classes, dtype=grad.dtype)
    # (..., K, 1) * (..., K, N) summed over K -> (..., N)
    return [tf.reduce_sum(grad[..., None] * one_hot, axis=-2), None]


@contextlib.contextmanager
def _dtensor_safe_top_k_gradient():
    """Uses `_topk_gradient_by_one_hot` for `TopKV2` inside the block."""
    # TensorFlow offers no public way to replace a registered gradient, and
    # the routers call `top_k` on batch-sharded router probabilities.
    entry = tf_ops._gradient_registry._registry["TopKV2"]
    previous = entry["type"]
    entry["type"] = _topk_gradient_by_one_hot
    try:
        yield
    finally:
        entry["type"] = previous


class DTensorOptimizer:
    """A Keras 3 optimizer's update applied to DTensor variables.

    Keras 3 optimizers cannot update DTensors (`stateless_apply` is not
    supported on the TensorFlow backend), and tf_keras' DTensor-aware
    optimizers (`tf_keras.dtensor.experimental.optimizers`, `mesh=`) gave
    wrong updates on meshes with a `batch` axis larger than 1: their update
    writes a slot and reads it back in the same step (`m.assign(...)`, then
    `variable.assign_add(m)`), and inside the DTensor step function that
    read returned the slot's value from before the write: with the
    gradients as `tape.gradient` returns them, their first SGD step changed
    no weight; with the gradients reduced first, SGD was right but Adam on
    an upcycled ViT drifted from the first step. This class
    computes each step functionally instead: every weight and slot is read
    once, the new values are computed as tensors, and each variable is
    written once, so no read depends on the order of writes.

    The rules are those of Keras 3 (`keras/src/optimizers/{sgd,adam}.py`
    and the base optimizer: gradient clipping by `clipnorm`,
    `global_clipnorm` or `clipvalue`, then weight decay
    `w -= w * weight_decay * lr` for the variables the Keras optimizer does
    not exclude, then the update), checked against the Keras optimizers by
    test. Slots take the layout of their weight.

    Args:
        optimizer: a Keras 3 optimizer (or its name) of a class in
            `SUPPORTED_OPTIMIZERS`, without EMA, loss scaling or gradient
            accumulation. It is used for its configuration (learning rate
            or schedule included) and its weight-decay exclusions; its own
            state is not touched.
    """

    def __init__(self, optimizer):
        optimizer = keras.optimizers.get(optimizer)
        kind = type(optimizer).__name__
        if kind not in SUPPORTED_OPTIMIZERS:
            raise ValueError(
                "optimizer must be a Keras optimizer of class "
                f"{SUPPORTED_OPTIMIZERS}; received {kind}"
            )
        config = optimizer.get_config()
        for option, default in _UNSUPPORTED_OPTIMIZER_OPTIONS.items():
            if config.get(option, default) != default:
                raise ValueError(
                    f"the expert-parallel trainer does not support {option}="
                    f"{config[option]!r} ({kind})"
                )
        self.keras_optimizer = optimizer
        self.kind = kind
        self.config = config
        learning_rate = config["learning_rate"]
        self._schedule = None
        if isinstance(learning_rate, dict):
            self._schedule = keras.optimizers.schedules.deserialize(
                learning_rate
            )
        self.slot_names = ["m", "v"] if kind in ("Adam", "AdamW") else []
        if kind == "Adafactor":
            self.slot_names = ["r", "c", "v"]
        if kind in ("Adam", "AdamW") and config["amsgrad"]:
            self.slot_names.append("v_hat")
        if kind == "SGD" and config["momentum"] != 0:
            self.slot_names = ["momentum"]
        self.iterations = None
        self.slots = []
        self._decay = []

    def build(self, keras_variables, layouts, mesh):
        """Creates the step counter and the slots (zeros) of the weights.

        Args:
            keras_variables: the model's trainable variables (for the
                weight-decay exclusions of the Keras optimizer).
            layouts: the DTensor layout of each of them.
            mesh: the mesh of the step counter.
        """
        self.iterations = dtensor.DVariable(
            dtensor.copy_to_mesh(
                tf.constant(0, "int64"), mesh_lib.replicated_layout(mesh, 0)
            ),
            trainable=False,
        )
        self.slots = [
            {
                name: dtensor.DVariable(
                    _to_mesh(tf.zeros(shape, v.dtype), slot_layout),
                    trainable=False,
                )
                for name, (shape, slot_layout) in self._slot_specs(
                    v, layout
                ).items()
            }
            for v, layout in zip(keras_variables, layouts)
        ]
        decay = self.config["weight_decay"]
        # The Keras optimizer's own rule for its exclusion lists (set with
        # `exclude_from_weight_decay`; no public accessor), asked about the
        # tf.Variable as the TensorFlow backend asks it (its name is the
        # variable's path, which `var_names` patterns are matched against).
        self._decay = [
            bool(decay) and self.keras_optimizer._use_weight_decay(v.value)
            for v in keras_variables
        ]

    def _slot_specs(self, variable, layout):
        """{slot name: (shape, layout)} of one weight's slots."""
        shape = tuple(variable.shape)
        if self.kind != "Adafactor":
            return {name: (shape, layout) for name in self.slot_names}
        specs = list(layout.sharding_specs)
        if len(shape) < 2:
            # Keras keeps scalar placeholders for r and c of such weights.
            scalar = mesh_lib.replicated_layout(layout.mesh, 0)
            return {"r": ((), scalar), "c": ((), scalar), "v": (shape, layout)}
        # r drops the last axis, c the second to last: [..., M, N] ->
        # [..., M] and [..., N], each keeping the other axes' sharding.
        row = dtensor.Layout(specs[:-1], layout.mesh)
        col = dtensor.Layout(specs[:-2] + specs[-1:], layout.mesh)
        return {
            "r": (shape[:-1], row),
            "c": (shape[:-2] + shape[-1:], col),
            "v": (shape, layout),
        }

    @property
    def variables(self):
        """The step counter, then each weight's slots, in weight order."""
        return [self.iterations] + [
            slots[name] for slots in self.slots for name in self.slot_names
        ]

    @property
    def variable_names(self):
        """Names of `variables`: "iterations", "<slot>/<weight index>"."""
        return ["iterations"] + [
            f"{name}/{i}"
            for i in range(len(self.slots))
            for name in self.slot_names
        ]

    def learning_rate(self, step):
        """The learning rate at `step` (before the step's increment)."""
        if self._schedule is not None:
            return self._schedule(step)
        return self.config["learning_rate"]

    def _clip(self, grads):
        config = self.config
        if config["clipnorm"] and config["clipnorm"] > 0:
            clip = config["clipnorm"]
            clipped = []
            for g in grads:
                # Keras' `_clip_by_norm`, NaN-safe at a zero gradient.
                l2sum = tf.reduce_sum(tf.square(g), keepdims=True)
                positive = l2sum > 0
                safe = tf.where(positive, l2sum, tf.ones_like(l2sum))
                l2norm = tf.where(positive, tf.sqrt(safe), l2sum)
                clipped.append(g * clip / tf.maximum(l2norm, clip))
            return clipped
        if config["global_clipnorm"] and config["global_clipnorm"] > 0:
            clip = config["global_clipnorm"]
            norm = tf.sqrt(
                tf.reduce_sum(tf.stack([tf.reduce_sum(g * g) for g in grads]))
            )
            scale = clip * tf.minimum(1.0 / norm, 1.0 / clip)
            return [g * (scale + (norm - norm)) for g in grads]
        if config["clipvalue"] and config["clipvalue"] > 0:
            value = config["clipvalue"]
            return [tf.clip_by_value(g, -value, value) for g in grads]
        return grads

    def apply(self, grads, variables):
        """One update of `variables` (DVariables) by `grads` (None: skip)."""
        step = self.iterations.read_value()
        learning_rate = self.learning_rate(step)
        present = [i for i, g in enumerate(grads) if g is not None]
        clipped = self._clip([grads[i] for i in present])
        for i, grad in zip(present, clipped):
            variable = variables[i]
            value = variable.read_value()
            slots = {
                name: slot.read_value() for name, slot in self.slots[i].items()
            }
            lr = tf.cast(learning_rate, value.dtype)
            grad = tf.cast(grad, value.dtype)
            if self._decay[i]:
                decay = tf.cast(self.config["weight_decay"], value.dtype)
                value = value - value * decay * lr
            if self.kind == "SGD":
                value, slots = self._sgd(value, slots, grad, lr)
            elif self.kind == "Adafactor":
                value, slots = self._adafactor(value, slots, grad, lr, step)
            else:
                value, slots = self._adam(value, slots, grad, lr, step)
            variable.assign(value)
            for name, slot_value in slots.items():
                self.slots[i][name].assign(slot_value)
        self.iterations.assign(step + 1)

    def _sgd(self, value, slots, grad, lr):
        if not slots:
            return value - grad * lr, slots
        momentum = tf.cast(self.config["momentum"], value.dtype)
        velocity = slots["momentum"] * momentum - grad * lr
        if self.config["nesterov"]:
            value = value + (velocity * momentum - grad * lr)
        else:
            value = value + velocity
        return value, {"momentum": velocity}

    def _adam(self, value, slots, grad, lr, step):
        config = self.config
        local_step = tf.cast(step + 1, value.dtype)
        beta_1_power = tf.pow(
            tf.cast(config["beta_1"], value.dtype), local_step
        )
        beta_2_power = tf.pow(
            tf.cast(config["beta_2"], value.dtype), local_step
        )
        alpha = lr * tf.sqrt(1 - beta_2_power) / (1 - beta_1_power)
        m = slots["m"] + (grad - slots["m"]) * (1 - config["beta_1"])
        v = slots["v"] + (tf.square(grad) - slots["v"]) * (1 - config["beta_2"])
        new_slots = {"m": m, "v": v}
        if config["amsgrad"]:
            v = tf.maximum(slots["v_hat"], v)
            new_slots["v_hat"] = v
        value = value - (m * alpha) / (tf.sqrt(v) + config["epsilon"])
        return value, new_slots

    def _adafactor(self, value, slots, grad, lr, step):
        """Keras 3's Adafactor: second moments factored over the last two
        axes (rows r, columns c) for weights of rank >= 2, the relative
        step size `min(lr, 1/sqrt(t))` and the update clipped by its RMS."""
        config = self.config
        dtype = value.dtype
        local_step = tf.cast(step + 1, dtype)
        if self._schedule is None and config["relative_step"]:
            lr = tf.minimum(lr, 1 / tf.sqrt(local_step))
        rho = tf.minimum(lr, 1 / tf.sqrt(local_step))
        alpha = (
            tf.maximum(tf.cast(config["epsilon_2"], dtype), _rms(value)) * rho
        )
        grad_square = tf.square(grad) + config["epsilon_1"]
        beta_2 = 1 - tf.pow(local_step, config["beta_2_decay"])
        if value.shape.rank >= 2:
            r = beta_2 * slots["r"] + (1 - beta_2) * tf.reduce_mean(
                grad_square, axis=-1
            )
            c = beta_2 * slots["c"] + (1 - beta_2) * tf.reduce_mean(
                grad_square, axis=-2
            )
            # v[..., i, j] = r[..., i] / mean(r) * c[..., j]
            v = (r / tf.reduce_mean(r, axis=-1, keepdims=True))[
                ..., None
            ] * tf.expand_dims(c, -2)
            new_slots = {"r": r, "c": c, "v": v}
        else:
            v = beta_2 * slots["v"] + (1 - beta_2) * grad_square
            new_slots = {"r": slots["r"], "c": slots["c"], "v": v}
        update = grad / tf.sqrt(v)
        update = update / tf.maximum(
            tf.cast(1.0, dtype), _rms(update) / config["clip_threshold"]
        )
        return value - alpha * update, new_slots


def _rms(x):
    return tf.sqrt(tf.reduce_mean(tf.square(x)))


def _to_mesh(value, layout):
    """A whole (host) value -> a DTensor of `layout`."""
    value = tf.convert_to_tensor(value)
    replicated = mesh_lib.replicated_layout(layout.mesh, value.shape.rank)
    return dtensor.relayout(dtensor.copy_to_mesh(value, replicated), layout)


def _to_numpy(value):
    """A DTensor -> the whole value as a NumPy array."""
    replicated = mesh_lib.replicated_layout(
        dtensor.fetch_layout(value).mesh, value.shape.rank
    )
    return dtensor.unpack(dtensor.relayout(value, replicated))[0].numpy()


class ExpertParallelTrainer:
    """Trains a built Keras MoE model with its experts sharded on a mesh.

    Args:
        model: a built `keras.Model` (e.g. an upcycled keras_moe ViT; not
            an E^3 model). Its variables give the initial values; it is not
            modified until `sync_to_model()` (or `restore`).
        mesh: a `tf.experimental.dtensor.Mesh` with the axes
            (`batch`, `expert`) (see `keras_moe.distribution.mesh`), a spec
            such as `"batch:2,expert:4"`, or a dict of the two sizes. The
            `expert` axis must divide the number of experts of every MoE
            layer.
        optimizer: a Keras optimizer or its name (see `DTensorOptimizer`
            for the supported ones).
        loss: a Keras loss (object, name or function) of
            `(y_true, y_pred)`; the MoE auxiliary losses are added to it.
        devices: devices of a mesh given as a spec or dict.
        layout: `"gshard"` (default): each global batch is split over all
            `batch * expert` devices, so every layer but the experts runs
            on 1/(b*n) of the examples, and each MoE layer moves its
            dispatched rows to the devices of their experts and back
            (two all-to-alls over `expert`); the batch size must be a
            multiple of `batch * expert`. `"replicated"`: the batch is
            split over `batch` only and replicated over `expert` (entering
            the experts is a local slice, leaving them an all-gather);
            kept as the baseline the benchmarks compare against. The two
            are the same on a mesh with `expert:1`.

    Attributes:
        model, mesh, optimizer (the Keras optimizer, kept for its config),
        loss, step (the number of steps applied).
    """

    def __init__(
        self,
        model,
        mesh,
        optimizer="adam",
        loss=None,
        devices=None,
        layout=GSHARD,
    ):
        if not isinstance(model, keras.Model):
            raise ValueError(
                f"model must be a keras.Model; received {type(model).__name__}"
            )
        if not model.built:
            raise ValueError(
                f"model {model.name!r} must be built (call it once, or build "
                "it) before its variables can be sharded"
            )
        if loss is None:
            raise ValueError("loss is required (a Keras loss or its name)")
        if layout not in LAYOUTS:
            raise ValueError(
                f"layout must be one of {LAYOUTS}; received {layout!r}"
            )
        if getattr(model, "ensemble_size", 1) > 1:
            # EnsembleTile tiles the batch with `tf.tile`, which DTensor
            # cannot expand on a batch-sharded tensor (even on one device).
            raise ValueError(
                "E^3 models (ensemble_size="
                f"{model.ensemble_size}) are not supported by the "
                "expert-parallel trainer: their EnsembleTile layer uses "
                "tf.tile, which DTensor cannot partition"
            )
        mesh = mesh_lib.as_mesh(mesh, devices=devices)
        expert_size = mesh.dim_size(mesh_lib.EXPERT_AXIS)
        self._moe_layers = []
        expert_weights = set()
        for layer in sublayers(model):
            if isinstance(layer, MoeLayer):
                self._moe_layers.append(layer)
            if isinstance(layer, Experts):
                if layer.num_experts % expert_size:
                    raise ValueError(
                        f"MoE layer {layer.path.rsplit('/', 1)[0]!r} has "
                        f"num_experts={layer.num_experts}, which the mesh's "
                        f"expert axis of size {expert_size} does not "
                        "divide: each device must hold the same number of "
                        "experts"
                    )
                expert_weights.update(id(w) for w in layer.weights)
        if not self._moe_layers:
            raise ValueError(
                f"model {model.name!r} has no MoeLayer: there are no experts "
                "to shard (train a dense model with a tf.distribute "
                "strategy, keras_moe.distribution.strategies)"
            )
        self._optimizer = DTensorOptimizer(optimizer)
        self.loss = keras.losses.get(loss)
        if not callable(self.loss):
            raise ValueError(f"unknown loss {loss!r}")
        if not isinstance(self.loss, keras.losses.Loss):
            self.loss = _FunctionLoss(self.loss)
        self._loss_config = (
            loss if isinstance(loss, str) else _serialize_loss(loss)
        )
        self.model = model
        self.mesh = mesh
        self.layout_name = layout
        # GShard spreads the batch over the expert axis too (see
        # `_spread_over_experts`); with one device on that axis the two
        # layouts are the same computation.
        self._spread = layout == GSHARD and expert_size > 1
        # <[n]> zeros sharded on `expert`: adding them to a value with a new
        # leading axis gives each device's own value a place on that axis.
        self._expert_zeros = _to_mesh(
            tf.zeros([expert_size]), mesh_lib.expert_weight_layout(mesh, 1)
        )
        self.optimizer = self._optimizer.keras_optimizer
        self.step = 0
        self._expert_weights = expert_weights
        self._layouts = [self.layout(v) for v in model.trainable_variables]
        self._trainable = [
            self._dvariable(v, trainable=True)
            for v in model.trainable_variables
        ]
        self._non_trainable = [
            self._dvariable(v, trainable=False)
            for v in model.non_trainable_variables
        ]
        self._optimizer.build(model.trainable_variables, self._layouts, mesh)
        self._train_step = tf.function(self._step)
        self._test_step = tf.function(self._eval_step)

    # Layouts ---------------------------------------------------------------

    def layout(self, variable):
        """The layout of one of the model's variables on this mesh."""
        require_tensorflow_backend("ExpertParallelTrainer (DTensor)")
        rank = len(variable.shape)
        if id(variable) in self._expert_weights:
            return mesh_lib.expert_weight_layout(self.mesh, rank)
        return mesh_lib.replicated_layout(self.mesh, rank)

    def _dvariable(self, variable, trainable):
        value = _to_mesh(variable.value, self.layout(variable))
        return dtensor.DVariable(value, trainable=trainable)

    @property
    def trainable_values(self):
        """DTensor values of `model.trainable_variables`, in that order."""
        return [v.read_value() for v in self._trainable]

    @property
    def non_trainable_values(self):
        """DTensor values of `model.non_trainable_variables`."""
        return [v.read_value() for v in self._non_trainable]

    # GShard: every device holds its own part of the batch -------------------
    #
    # A DTensor layout shards a tensor axis over one mesh axis, so a batch
    # axis cannot be split over `batch` and `expert` together, and a Keras
    # model's activations have no second axis to put `expert` on. The
    # trainer therefore gives the model batch-sharded values that are
    # nominally replicated over `expert` while each device along `expert`
    # holds a different part of the batch ("per-device" values). DTensor
    # never communicates over an axis it believes replicated, so every
    # layer runs on its device's rows alone; the trainer crosses the
    # expert axis only explicitly, where the step needs it:
    #
    #   `_spread_over_experts`   per-device <[...]> -> <[n, ...]> sharded on
    #                            `expert` (slice j: the value of devices
    #                            at expert coordinate j; no communication)
    #   `_gather_from_experts`   the inverse (no communication)
    #
    # The MoE rows go through the spread, an all-to-all over `expert` and
    # the experts, and back; the loss is averaged and the gradients of the
    # weights outside the experts are summed over the spread axis. The
    # spread and the gather are each other's gradient.

    def _spread_over_experts(self, value, specs):
        """Per-device `value` (layout `specs` on its axes) -> <[n, ...]>
        with the new axis on `expert`."""

        @tf.custom_gradient
        def spread(value):
            def grad(upstream):
                return self._gather_values(upstream, specs)

            return self._spread_values(value, specs), grad

        return spread(value)

    def _gather_from_experts(self, value, specs):
        """<[n, ...]> sharded on `expert` (layout `specs` on the other
        axes) -> the per-device value of slice j on expert coordinate j."""

        @tf.custom_gradient
        def gather(value):
            def grad(upstream):
                return self._spread_values(upstream, specs)

            return self._gather_values(value, specs), grad

        return gather(value)

    def _spread_values(self, value, specs):
        # Pin the per-device layout: DTensor would otherwise propagate the
        # sharding chosen after the spread back into the ops before it.
        value = dtensor.relayout(value, dtensor.Layout(specs, self.mesh))
        zeros = tf.reshape(
            tf.cast(self._expert_zeros, value.dtype),
            [-1] + [1] * value.shape.rank,
        )
        # (...) -> (1, ...) + (n, 1, ...): local (1, ...) on every device.
        spread = tf.expand_dims(value, 0) + zeros
        return dtensor.relayout(
            spread,
            dtensor.Layout([mesh_lib.EXPERT_AXIS] + list(specs), self.mesh),
        )

    def _gather_values(self, value, specs):
        specs = [mesh_lib.EXPERT_AXIS] + list(specs)
        value = dtensor.relayout(value, dtensor.Layout(specs, self.mesh))
        # A parted layout keeps each device's shard as it is: the sum over
        # the spread axis is then the local one-row sum, no all-reduce.
        parted = dtensor.Layout(specs, self.mesh).to_parted()
        value = tf.reduce_sum(dtensor.relayout(value, parted), axis=0)
        return dtensor.relayout(value, dtensor.Layout(specs[1:], self.mesh))

    def _gshard_rows(self, rows, to):
        """The all-to-alls of GShard around the experts.

        Before the experts: per-device rows <[E, N, D]> (N = G*C of this
        device's groups, on `batch`) -> <[E, n*N, D]> with E on `expert`:
        each device receives, from the n devices of its `batch` row, their
        rows of its E/n experts. After them, the inverse.
        """
        unsharded = dtensor.UNSHARDED
        batch, expert = mesh_lib.BATCH_AXIS, mesh_lib.EXPERT_AXIS
        if to == RELAYOUT_TO_EXPERTS:
            # (E, N, D) -> (N, E, D) -> (n, N, E, D), spread on expert
            rows = tf.transpose(rows, (1, 0, 2))
            rows = self._spread_over_experts(
                rows, [batch, unsharded, unsharded]
            )
            # All-to-all: the spread axis first, then the groups, is the
            # order whose relayout DTensor computes exactly (see tests).
            rows = dtensor.relayout(
                rows,
                dtensor.Layout(
                    [unsharded, batch, expert, unsharded], self.mesh
                ),
            )
            # (n, N, E, D) -> (E, N, n, D) -> (E, N*n, D)
            rows = tf.transpose(rows, (2, 1, 0, 3))
            return tf.reshape(rows, [rows.shape[0], -1, rows.shape[-1]])
        n = self.mesh.dim_size(expert)
        num_experts, model_dim = rows.shape[0], rows.shape[-1]
        # (E, N*n, D) -> (E, N, n, D) -> (n, N, E, D)
        rows = tf.reshape(rows, [num_experts, -1, n, model_dim])
        rows = tf.transpose(rows, (2, 1, 0, 3))
        rows = dtensor.relayout(
            rows,
            dtensor.Layout([expert, batch, unsharded, unsharded], self.mesh),
        )
        rows = self._gather_from_experts(rows, [batch, unsharded, unsharded])
        # (N, E, D) -> (E, N, D)
        return tf.transpose(rows, (1, 0, 2))

    def _relayout_rows(self, rows, to):
        """`MoeLayer.relayout_hook`: expert rows <[E, G*C, D]> between the
        token layout (N on `batch`) and the expert layout (E on `expert`,
        N on `batch`)."""
        if to not in (RELAYOUT_TO_EXPERTS, RELAYOUT_TO_TOKENS):
            raise ValueError(f"unknown relayout target {to!r}")
        if self._spread:
            return self._gshard_rows(rows, to)
        expert = dtensor.UNSHARDED
        if to == RELAYOUT_TO_EXPERTS:
            expert = mesh_lib.EXPERT_AXIS
        # N = G*C splits over `batch` like the groups it comes from; when
        # padding made G indivisible the rows stay whole along N.
        batch = dtensor.UNSHARDED
        rows_per_expert = rows.shape[1]
        if rows_per_expert is not None and not (
            rows_per_expert % self.mesh.dim_size(mesh_lib.BATCH_AXIS)
        ):
            batch = mesh_lib.BATCH_AXIS
        layout = dtensor.Layout([expert, batch, dtensor.UNSHARDED], self.mesh)
        return dtensor.relayout(rows, layout)

    @contextlib.contextmanager
    def _relayout_hooks(self):
        for layer in self._moe_layers:
            layer.relayout_hook = self._relayout_rows
        try:
            yield
        finally:
            for layer in self._moe_layers:
                layer.relayout_hook = None

    # The step -------------------------------------------------------------

    def _forward(self, trainable, non_trainable, x, training):
        """The forward pass on DTensor values, with the MoE relayouts.

        What `Model.stateless_call(..., return_losses=True)` does, with the
        MoE layers' metric variables (`layer_metrics`) mapped as well, to
        zeros: `stateless_call` maps only the model's variables, and its
        own scope would drop the metrics' updates. Returns (y_pred, new
        non-trainable values, auxiliary losses, the metric variables'
        values after the call: this call's update of each, per device).
        """
        metric_variables = self._metric_variables()
        mapping = [
            *zip(self.model.trainable_variables, trainable),
            *zip(self.model.non_trainable_variables, non_trainable),
            *(
                (v, _to_mesh(tf.zeros(v.shape, v.dtype), self._replicated(v)))
                for v in metric_variables
            ),
        ]
        with (
            self._relayout_hooks(),
            keras.StatelessScope(
                state_mapping=mapping, collect_losses=True
            ) as scope,
        ):
            y_pred = self.model.call(x, training=training)
            aux_losses = self.model.losses
        return (
            y_pred,
            [
                scope.get_current_value(v)
                for v in self.model.non_trainable_variables
            ],
            aux_losses,
            [scope.get_current_value(v) for v in metric_variables],
        )

    @property
    def layer_metrics(self):
        """The Keras metrics of the model's MoE layers (their routing
        statistic trackers), which every step updates as Keras' own steps
        do."""
        return [m for layer in self._moe_layers for m in layer.metrics]

    def _metric_variables(self):
        return [v for m in self.layer_metrics for v in m.variables]

    def _replicated(self, variable):
        return mesh_lib.replicated_layout(self.mesh, len(variable.shape))

    def _step_metrics(self, values):
        """A step's metric values -> one replicated float32 vector: on the
        GShard layout, the mean over `expert` of the devices' values (each
        device counts its own step once, so a count stays one per step, as
        on one device)."""
        if not values:
            return _to_mesh(tf.zeros([0]), self._replicated(tf.zeros([0])))
        packed = tf.concat(
            [
                tf.reshape(
                    tf.cast(
                        dtensor.relayout(v, self._replicated(v)), "float32"
                    ),
                    [-1],
                )
                for v in values
            ],
            axis=0,
        )
        if self._spread:
            packed = tf.reduce_mean(
                self._spread_over_experts(packed, [dtensor.UNSHARDED]), axis=0
            )
        return dtensor.relayout(packed, self._replicated(packed))

    def _update_metrics(self, packed):
        """Adds a step's metric values (`_step_metrics`) to the Keras
        metric variables, as the same step on one device would."""
        packed = dtensor.unpack(packed)[0].numpy()
        offset = 0
        for variable in self._metric_variables():
            size = int(np.prod(variable.shape))
            value = packed[offset : offset + size].reshape(variable.shape)
            variable.assign_add(value.astype(variable.dtype))
            offset += size

    def _total_loss(self, y, y_pred, sample_weight, aux_losses):
        loss = self.loss(y, y_pred, sample_weight=sample_weight)
        for aux in aux_losses:
            loss = loss + tf.reduce_sum(tf.cast(aux, loss.dtype))
        if self._spread:
            # Each device's loss is a mean over its equal share of the
            # batch (and of the routing groups): the step's loss is their
            # mean over the expert axis.
            loss = tf.reduce_mean(self._spread_over_experts(loss, []))
        return loss

    def _sum_over_experts(self, grads):
        """Gradients of the weights outside the experts are per-device
        (summed over `batch` only): sum them over `expert` as well."""
        if not self._spread:
            return grads
        return [
            (
                g
                if g is None or id(v) in self._expert_weights
                else tf.reduce_sum(
                    self._spread_over_experts(
                        g, [dtensor.UNSHARDED] * g.shape.rank
                    ),
                    axis=0,
                )
            )
            for g, v in zip(grads, self.model.trainable_variables)
        ]

    def _step(self, x, y, sample_weight=None):
        with tf.GradientTape() as tape:
            y_pred, non_trainable, aux_losses, metrics = self._forward(
                self.trainable_values, self.non_trainable_values, x, True
            )
            loss = self._total_loss(y, y_pred, sample_weight, aux_losses)
        with _dtensor_safe_top_k_gradient():
            grads = tape.gradient(loss, self._trainable)
        grads = self._sum_over_experts(grads)
        # Reduce the gradients of weights that the batch shards share (they
        # come back as pending sums over `batch`) into the weights' layouts.
        grads = [
            None if g is None else dtensor.relayout(g, layout)
            for g, layout in zip(grads, self._layouts)
        ]
        self._optimizer.apply(grads, self._trainable)
        for variable, value in zip(self._non_trainable, non_trainable):
            variable.assign(value)
        return loss, self._step_metrics(metrics)

    def _eval_step(self, x, y, sample_weight=None):
        y_pred, _, aux_losses, metrics = self._forward(
            self.trainable_values, self.non_trainable_values, x, False
        )
        loss = self._total_loss(y, y_pred, sample_weight, aux_losses)
        return loss, self._step_metrics(metrics)

    def _num_parts(self):
        """The parts a global batch is split into: b*n with the GShard
        layout (device (i, j) takes part i*n + j), b otherwise (device
        (i, j) takes part i)."""
        batch_size = self.mesh.dim_size(mesh_lib.BATCH_AXIS)
        if self._spread:
            return batch_size * self.mesh.dim_size(mesh_lib.EXPERT_AXIS)
        return batch_size

    def _local_parts(self):
        """(first, count, index): this process's devices take parts
        [first, first + count) of the global batch, local device d part
        index[d] (see `_num_parts`)."""
        expert_size = self.mesh.dim_size(mesh_lib.EXPERT_AXIS)
        locations = self.mesh.local_device_locations()
        if self._spread:
            index = [
                loc[mesh_lib.BATCH_AXIS] * expert_size
                + loc[mesh_lib.EXPERT_AXIS]
                for loc in locations
            ]
        else:
            index = [loc[mesh_lib.BATCH_AXIS] for loc in locations]
        first, count = min(index), max(index) - min(index) + 1
        if sorted(set(index)) != list(range(first, first + count)):
            raise ValueError(
                f"this process's devices take parts {index} of the global "
                "batch, which are not one contiguous block of rows: build "
                "the mesh with keras_moe.distribution.mesh.make_mesh or "
                "dtensor.create_distributed_mesh (each process holding "
                "consecutive device ids)"
            )
        return first, count, index

    def _indivisible(self, rows, parts):
        batch_size = self.mesh.dim_size(mesh_lib.BATCH_AXIS)
        expert_size = self.mesh.dim_size(mesh_lib.EXPERT_AXIS)
        where = (
            f"batch * expert = {batch_size} * {expert_size} = "
            f"{self._num_parts()} devices (the GShard layout splits it over "
            "every device)"
            if self._spread
            else f"batch axis of size {batch_size}"
        )
        return ValueError(
            f"a batch of {rows} examples cannot be split over the mesh's "
            f"{where}: use a batch size that is a multiple of {parts} "
            "(drop_remainder=True for tf.data)"
        )

    def local_batch_rows(self, batch_size):
        """The rows [start, stop) of every global batch of `batch_size`
        examples that this process passes to `train_step`, `test_step`
        and `fit`.

        On one process: all of them, (0, batch_size). On several (a
        multi-client DTensor mesh spanning processes) only the rows of
        this process's devices, one contiguous block: the global batch is
        never assembled in one process.

        Args:
            batch_size: the global batch size, a multiple of the parts the
                batch is split into (`batch * expert` devices with the
                GShard layout, the `batch` axis otherwise).

        Returns:
            A tuple `(start, stop)` of ints: each process passes
            `x[start:stop]`, `y[start:stop]` of a global batch `x`, `y`.
        """
        if (
            isinstance(batch_size, bool)
            or not isinstance(batch_size, (int, np.integer))
            or batch_size < 1
        ):
            raise ValueError(
                f"batch_size must be an int >= 1; received {batch_size!r}"
            )
        parts = self._num_parts()
        if batch_size % parts:
            raise self._indivisible(batch_size, parts)
        first, count, _ = self._local_parts()
        per_part = batch_size // parts
        return int(first * per_part), int((first + count) * per_part)

    def _shard_batch(self, value):
        """This process's rows of a global batch -> a DTensor sharded on
        `batch`: each local device gets its own part (see `_local_parts`).
        On one process `value` is the whole global batch <[B, ...]>; on
        several, rows `local_batch_rows(B)` of it."""
        value = tf.convert_to_tensor(value)
        if value.shape.rank == 0:
            raise ValueError("inputs and labels need a batch axis")
        first, count, index = self._local_parts()
        rows = value.shape[0]
        if dtensor.num_clients() == 1:
            if rows % self._num_parts():
                raise self._indivisible(rows, self._num_parts())
        elif rows % count:
            raise ValueError(
                f"this process was given {rows} rows, which cannot be split "
                f"into the {count} equal parts of the global batch its "
                "devices take: pass rows local_batch_rows(B) of every "
                f"global batch of B examples (B a multiple of "
                f"{self._num_parts()})"
            )
        per_part = rows // count
        shards = [
            value[(i - first) * per_part : (i - first + 1) * per_part]
            for i in index
        ]
        layout = mesh_lib.batch_layout(self.mesh, value.shape.rank)
        return dtensor.pack(shards, layout)

    def train_step(self, x, y, sample_weight=None):
        """One optimizer step on a global batch; returns the loss (float).

        The step's routing statistics are added to the MoE layers' metric
        trackers (`layer_metrics`), as a Keras training step adds them.

        Args:
            x: inputs <[B, ...]> (host arrays or tensors, or a nested
                structure of them as the model takes); B must be a multiple
                of the `batch` axis.
            y: targets <[B, ...]>.
            sample_weight: optional <[B]> weights of the loss.
        """
        args = [x, y] if sample_weight is None else [x, y, sample_weight]
        args = tf.nest.map_structure(self._shard_batch, args)
        loss, metrics = self._train_step(*args)
        self.step += 1
        self._update_metrics(metrics)
        return float(dtensor.unpack(loss)[0])

    def test_step(self, x, y, sample_weight=None):
        """The loss of a global batch with `training=False`, no update.

        The same loss as `train_step` (the model's loss plus the MoE
        auxiliary losses), with the layers in inference mode (the MoE
        layers' `eval_capacity_factor`); arguments as for `train_step`.
        Its routing statistics are added to the MoE layers' metric
        trackers, as in Keras' `evaluate`.
        """
        args = [x, y] if sample_weight is None else [x, y, sample_weight]
        args = tf.nest.map_structure(self._shard_batch, args)
        loss, metrics = self._test_step(*args)
        self._update_metrics(metrics)
        return float(dtensor.unpack(loss)[0])

    def fit(self, dataset, steps=None, callbacks=None):
        """Trains on batches of `dataset`; returns the per-step losses.

        Args:
            dataset: an iterable of `(x, y)` or `(x, y, sample_weight)`
                global batches (a batched `tf.data.Dataset`, with
                `drop_remainder=True` when the last batch would not split
                over the `batch` axis).
            steps: number of steps; None runs until `dataset` ends.
            callbacks: Keras callbacks; they get `on_train_begin`,
                `on_train_batch_begin/end` with `{"loss": ...}` and
                `on_train_end`, and stop training by setting
                `model.stop_training`. The Keras model's variables are
                updated (`sync_to_model`) before `on_train_end`.

        Returns:
            A list of floats, the loss of each step.
        """
        if steps is not None:
            if isinstance(steps, bool) or not isinstance(steps, int):
                raise ValueError(f"steps must be an int; received {steps!r}")
            if steps < 0:
                raise ValueError(f"steps must be >= 0; received {steps}")
        callbacks = keras.callbacks.CallbackList(
            callbacks, add_history=False, add_progbar=False, model=self.model
        )
        self.model.stop_training = False
        losses = []
        callbacks.on_train_begin()
        iterator = iter(dataset)
        while steps is None or len(losses) < steps:
            try:
                batch = next(iterator)
            except StopIteration:
                break
            if not isinstance(batch, (tuple, list)) or len(batch) not in (
                2,
                3,
            ):
                raise ValueError(
                    "dataset must yield (x, y) or (x, y, sample_weight) "
                    f"tuples; received {type(batch).__name__}"
                )
            callbacks.on_train_batch_begin(len(losses))
            losses.append(self.train_step(*batch))
            callbacks.on_train_batch_end(len(losses) - 1, {"loss": losses[-1]})
            if self.model.stop_training:
                break
        self.sync_to_model()
        callbacks.on_train_end({"loss": losses[-1]} if losses else {})
        return losses

    # State ----------------------------------------------------------------

    def sync_to_model(self):
        """Copies the trained (whole) values into the Keras model."""
        for variables, dvariables in (
            (self.model.trainable_variables, self._trainable),
            (self.model.non_trainable_variables, self._non_trainable),
        ):
            for variable, dvariable in zip(variables, dvariables):
                variable.assign(_to_numpy(dvariable.read_value()))

    def _state(self):
        """(tf.train.Checkpoint over the state's DVariables, meta)."""
        checkpoint = tf.train.Checkpoint(
            **{
                prefix: list(dvariables)
                for prefix, dvariables in self._state_variables().items()
            }
        )
        meta = {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "trainable": [v.path for v in self.model.trainable_variables],
            "non_trainable": [
                v.path for v in self.model.non_trainable_variables
            ],
            "optimizer": keras.optimizers.serialize(self.optimizer),
            "optimizer_variables": self._optimizer.variable_names,
            "loss": self._loss_config,
            "mesh": {
                name: self.mesh.dim_size(name) for name in mesh_lib.MESH_AXES
            },
        }
        return checkpoint, meta

    def _state_variables(self):
        """{checkpoint prefix: the DVariables saved under it}."""
        return {
            "trainable": self._trainable,
            "non_trainable": self._non_trainable,
            "optimizer": self._optimizer.variables,
        }

    def save(self, path):
        """Writes a checkpoint directory at `path`, each device its shards.

        The directory holds a TensorFlow checkpoint of the DTensor
        variables (weights, optimizer state; files `state.index` and
        `state.data-*`), written by `tf.train.Checkpoint` through
        DTensor's sharded save: each device writes its own slices of an
        expert-sharded weight, nothing is gathered to one device, and a
        replicated variable is written once. Beside it, `meta.json`: the
        step, the variables' paths, the optimizer and loss configuration
        and the mesh. The directory is written beside `path` under a
        hidden name and renamed into place (an existing checkpoint there
        is replaced), so `path` is either the old or the new checkpoint.
        `restore` / `load` read it onto any mesh, one device included.

        On several processes (a multi-client mesh) every process must call
        `save` with the same `path` on a file system they all share (NFS,
        `gs://`): all write into one hidden directory, process 0 adds
        `meta.json` and renames it into place, and no process returns
        before it is there.

        Returns:
            `path`.

        Raises:
            ValueError: `path` exists and is not a directory (a file of
                the earlier npz format is not replaced by a directory);
                on several processes, the finished checkpoint is not
                visible to this process (`path` is not shared).
        """
        _check_path(path)
        if tf.io.gfile.exists(path) and not tf.io.gfile.isdir(path):
            raise ValueError(
                f"cannot save a checkpoint to {os.fspath(path)!r}: it exists "
                "and is a file; expected a checkpoint directory or a new path"
            )
        checkpoint, meta = self._state()
        if dtensor.num_clients() > 1:
            self._save_multi_client(path, checkpoint, meta)
            return path
        with files.atomic_directory(path, overwrite=True) as temp:
            checkpoint.write(os.path.join(temp, _STATE_PREFIX))
            with open(os.path.join(temp, _META_KEY), "w") as file:
                json.dump(meta, file, indent=1)
        return path

    def _save_multi_client(self, path, checkpoint, meta):
        """`save` on several processes, every one calling it with the same
        `path` on a file system they all see (NFS, gs://).

        DTensor's checkpoint writer writes each process's slices under one
        prefix, so all processes write into one hidden directory beside
        `path` (`.<name>.tmp-clients-<step>`; a per-process one, as
        `files.atomic_directory` makes, would hold only that process's
        slices). Client 0 removes a leftover of that name first, and
        after the write adds `meta.json` and renames the directory into
        place (an existing checkpoint moved aside first, then removed).
        Barriers keep the processes in step; none returns before the
        checkpoint is in place.
        """
        path = files.absolute(path).rstrip("/")
        parent, name = os.path.split(path)
        temp = files.join(parent, f".{name}.tmp-clients-{self.step}")
        old = files.join(parent, f".{name}.old-clients-{self.step}")
        leader = dtensor.client_id() == 0
        gfile = tf.io.gfile
        if leader:
            for leftover in (temp, old):
                if gfile.exists(leftover):
                    files.remove_tree(leftover)
            # files.makedirs: a local directory gets the mode os.mkdir
            # gives (0777 less the umask).
            files.makedirs(temp)
        dtensor.barrier(self.mesh, "keras_moe-save-begin")
        checkpoint.write(files.join(temp, _STATE_PREFIX))
        dtensor.barrier(self.mesh, "keras_moe-save-written")
        if leader:
            with gfile.GFile(files.join(temp, _META_KEY), "w") as file:
                file.write(json.dumps(meta, indent=1))
            if not files.is_url(temp):
                for root, _, names in os.walk(temp):
                    for entry in names:
                        files.fsync_path(os.path.join(root, entry))
                    files.fsync_path(root)
            replaced = gfile.exists(path)
            if replaced:
                gfile.rename(path, old)
            try:
                gfile.rename(temp, path)
            except BaseException:
                if replaced:  # put the old one back
                    gfile.rename(old, path)
                raise
            if replaced:
                files.remove_tree(old)
        dtensor.barrier(self.mesh, "keras_moe-save-end")
        if not gfile.exists(files.join(path, _META_KEY)):
            raise ValueError(
                f"checkpoint {path!r} written by every process is not "
                "visible to this one: on several processes save to a "
                "path on a file system they all share (NFS, gs://)"
            )

    def load(self, path):
        """Sets this trainer's weights, optimizer state and step from a
        checkpoint written by `save` on any mesh."""
        source, meta = _read_checkpoint(path)
        self._check_checkpoint(source, meta, path)
        if isinstance(source, dict):  # the earlier npz format
            for prefix, dvariables in self._state_variables().items():
                for i, dvariable in enumerate(dvariables):
                    layout = dtensor.fetch_layout(dvariable.read_value())
                    dvariable.assign(
                        _to_mesh(source[f"{prefix}/{i:05d}"], layout)
                    )
        else:
            checkpoint, _ = self._state()
            # DTensor restores each variable into its layout on this
            # mesh, whatever mesh wrote the slices.
            checkpoint.read(files.join(path, _STATE_PREFIX)).assert_consumed()
        self.step = int(meta["step"])

    def _check_checkpoint(self, source, meta, path):
        """Raises ValueError when the checkpoint does not fit this trainer.

        Args:
            source: what `_read_checkpoint` returned with `meta`.
            meta: the checkpoint's meta.
            path: the checkpoint's path, for the messages.
        """
        specs = _saved_specs(source)
        expected = {
            "trainable": (self.model.trainable_variables, meta["trainable"]),
            "non_trainable": (
                self.model.non_trainable_variables,
                meta["non_trainable"],
            ),
        }
        # Variables are matched by position (the order of the model's
        # variable lists), not by path: Keras numbers some names per
        # process (`seed_generator_1`), so equal models can differ there.
        for prefix, (variables, saved_paths) in expected.items():
            saved = specs.get(prefix, [])
            if len(saved) != len(variables) or len(saved_paths) != len(
                variables
            ):
                raise ValueError(
                    f"checkpoint {path!r} does not fit this model: it holds "
                    f"{len(saved)} {prefix} variables, the model has "
                    f"{len(variables)}"
                )
            for i, variable in enumerate(variables):
                shape, dtype = saved[i]
                if shape != tuple(variable.shape):
                    raise ValueError(
                        f"checkpoint {path!r} does not fit this model: "
                        f"{saved_paths[i]} has shape {shape}; the model's "
                        f"{variable.path} has {tuple(variable.shape)}"
                    )
                if dtype != tf.as_dtype(variable.dtype):
                    raise ValueError(
                        f"checkpoint {path!r} does not fit this model: "
                        f"{saved_paths[i]} has dtype {dtype.name}; the "
                        f"model's {variable.path} has "
                        f"{tf.as_dtype(variable.dtype).name}"
                    )
        opt_variables = self._optimizer.variables
        saved = specs.get("optimizer", [])
        if len(saved) != len(opt_variables) or len(
            meta["optimizer_variables"]
        ) != len(opt_variables):
            raise ValueError(
                f"checkpoint {path!r} holds {len(saved)} optimizer "
                f"variables; this trainer's optimizer has "
                f"{len(opt_variables)} (a different optimizer class or "
                "options?)"
            )
        for i, variable in enumerate(opt_variables):
            shape = saved[i][0]
            if shape != tuple(variable.shape):
                raise ValueError(
                    f"checkpoint {path!r}: optimizer variable "
                    f"{meta['optimizer_variables'][i]!r} has shape {shape}; "
                    f"this trainer's is {tuple(variable.shape)}"
                )

    @classmethod
    def restore(cls, path, model, mesh, optimizer=None, loss=None, **kwargs):
        """A trainer on `mesh` resuming from a checkpoint of `save`.

        Args:
            path: the checkpoint directory (or a file of the earlier npz
                format, `keras_moe.expert_parallel.v1`).
            model: a built model of the same architecture (its variables
                are overwritten with the checkpoint's weights).
            mesh: the mesh to resume on (any shape that divides the
                experts); see `ExpertParallelTrainer`.
            optimizer: None for the checkpoint's optimizer configuration.
            loss: None for the checkpoint's loss.
            **kwargs: other `ExpertParallelTrainer` arguments.

        Returns:
            An `ExpertParallelTrainer` at the checkpoint's step.
        """
        source, meta = _read_checkpoint(path)
        if optimizer is None:
            optimizer = keras.optimizers.deserialize(meta["optimizer"])
        if loss is None:
            if meta["loss"] is None:
                raise ValueError(
                    f"checkpoint {path!r} does not record its loss; pass loss"
                )
            loss = keras.losses.deserialize(meta["loss"])
        trainer = cls(model, mesh, optimizer=optimizer, loss=loss, **kwargs)
        trainer._check_checkpoint(source, meta, path)
        trainer.load(path)
        trainer.sync_to_model()
        return trainer


class _FunctionLoss(keras.losses.Loss):
    """A loss function with Keras' default reduction, as `compile` gives it
    (mean over the batch of the weighted per-example losses)."""

    def __init__(self, function):
        super().__init__(name=getattr(function, "__name__", "loss"))
        self.function = function

    def call(self, y_true, y_pred):
        return self.function(y_true, y_pred)


def _serialize_loss(loss):
    """A Keras loss's serialization, or None for a plain function."""
    try:
        config = keras.losses.serialize(loss)
        json.dumps(config)
    except (TypeError, ValueError):
        return None
    return config


def _read_checkpoint(path):
    """(source, meta) of a checkpoint, checked for its format.

    `source` is a `tf.train.CheckpointReader` of a checkpoint directory
    (`CHECKPOINT_FORMAT`), or the dict of arrays of a file of the earlier
    npz format (`_FORMAT_NPZ`, still read).
    """
    gfile = tf.io.gfile
    _check_path(path)
    path = os.fspath(path)
    if not gfile.exists(path):
        raise ValueError(
            f"no checkpoint at {path!r} (expected a directory written by "
            "ExpertParallelTrainer.save)"
        )
    if not gfile.isdir(path):
        return _read_npz_checkpoint(path)
    meta_path = files.join(path, _META_KEY)
    if not gfile.exists(meta_path):
        raise ValueError(
            f"{path!r} is not an expert-parallel checkpoint: it has no "
            f"{_META_KEY}"
        )
    try:
        meta = json.loads(files.read_text(meta_path))
    except ValueError as error:
        raise ValueError(
            f"{path!r} is not an expert-parallel checkpoint: {error}"
        ) from None
    _check_format(path, meta, CHECKPOINT_FORMAT)
    try:
        reader = tf.train.load_checkpoint(files.join(path, _STATE_PREFIX))
    except (ValueError, tf.errors.OpError) as error:
        raise ValueError(
            f"{path!r} is not a complete expert-parallel checkpoint: {error}"
        ) from None
    return reader, meta


def _check_path(path):
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise ValueError(
            f"a checkpoint path must be a non-empty path; received {path!r}"
        )


def _read_npz_checkpoint(path):
    """(arrays, meta) of a checkpoint file of the earlier npz format."""
    with tf.io.gfile.GFile(path, "rb") as file:
        data = file.read()
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
        meta = json.loads(arrays.pop(_META_KEY).tobytes().decode("utf-8"))
    except (ValueError, KeyError, OSError) as error:
        raise ValueError(
            f"{path!r} is not an expert-parallel checkpoint: {error}"
        ) from None
    _check_format(path, meta, _FORMAT_NPZ)
    return arrays, meta


def _check_format(path, meta, expected):
    found = meta.get("format") if isinstance(meta, dict) else None
    if found != expected:
        raise ValueError(
            f"{path!r} has format {found!r}; expected {expected!r}"
        )


def _saved_specs(source):
    """{prefix: [(shape, tf.DType) of variable 0, 1, ...]} of a checkpoint
    (`_read_checkpoint`'s source)."""
    if isinstance(source, dict):
        entries = {
            key: (tuple(array.shape), tf.as_dtype(array.dtype))
            for key, array in source.items()
        }
        pattern = r"(\w+)/(\d+)"
    else:
        shapes = source.get_variable_to_shape_map()
        dtypes = source.get_variable_to_dtype_map()
        entries = {key: (tuple(shapes[key]), dtypes[key]) for key in shapes}
        pattern = r"(\w+)/(\d+)/\.ATTRIBUTES/VARIABLE_VALUE"
    by_prefix = {}
    for key, spec in entries.items():
        match = re.fullmatch(pattern, key)
        if match:
            by_prefix.setdefault(match[1], {})[int(match[2])] = spec
    # A gap in the numbering leaves the later variables out, which the
    # count checks then report.
    specs = {}
    for prefix, by_index in by_prefix.items():
        specs[prefix] = []
        while len(specs[prefix]) in by_index:
            specs[prefix].append(by_index[len(specs[prefix])])
    return specs
