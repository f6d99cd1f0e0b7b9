"""One client of a two-process (multi-client) DTensor expert-parallel run.

Run twice by tests/distribution/test_expert_parallel_multihost.py, once per
client, each with 4 virtual CPU devices and the multi-client DTensor
environment (TensorFlow 2.20 reads `DTENSOR_JOBS`, one `host:port` per
client, and `DTENSOR_CLIENT_ID`; `DTENSOR_JOB_NAME` defaults to "worker"):

    DTENSOR_JOBS=localhost:PORT0,localhost:PORT1 DTENSOR_CLIENT_ID=0 \
        python tests/distribution/_ep_multihost.py --out=DIR &
    DTENSOR_JOBS=localhost:PORT0,localhost:PORT1 DTENSOR_CLIENT_ID=1 \
        python tests/distribution/_ep_multihost.py --out=DIR

Both clients build one `batch:2,expert:4` mesh over the 8 devices of the
two processes (`dtensor.create_distributed_mesh`; client c holds the
devices of batch row c) and train a model with two MoE layers (token and
expert choice, 8 experts) for 3 Adam steps:

* `global`: `ExpertParallelTrainer` as it is, each client given the whole
  global batch (`_shard_batch` packs only its own devices' rows);
* `local_replicated`: `_MultiClientTrainer` with `layout="replicated"`,
  each client given only its own rows of the global batch (rows
  [c*B/2, (c+1)*B/2), its devices' parts on this mesh);
* `local_1x8`: the same with the GShard layout on a `batch:1,expert:8`
  mesh, where each client holds experts the other has not; its state is
  then saved by both clients into one checkpoint directory `<out>/ckpt`
  (`_MultiClientTrainer.save`) and loaded by both into a trainer on the
  `batch:2,expert:4` mesh built from other initial weights (`restored`).

and records what each local device receives of the first global batch
`batch_x` on `batch:2,expert:4` (GShard), packed from the whole batch by
`ExpertParallelTrainer` (`packed/global`) and from the client's own rows
by `_MultiClientTrainer` (`packed/local`).

Client 0 also trains the same model with plain Keras on one device
(`reference`) and records its initial weights (`initial`).

Writes `<out>/client<c>.npz`: for each run `<run>/losses` (for
`restored`, its step) and `<run>/<i>` (its trainable weights after
`sync_to_model`), and the client's device ids and mesh locations on each
mesh (`mesh_<b>x<n>/devices`, `mesh_<b>x<n>/locations`).
"""

import argparse
import json
import os
import shutil
import sys

import numpy as np
import tensorflow as tf
from tensorflow.experimental import dtensor

NUM_LOCAL_DEVICES = 4
# Before anything else touches TensorFlow: the local virtual CPUs and the
# gRPC server of this client.
dtensor.initialize_accelerator_system(
    "CPU", num_logical_cpu_devices=NUM_LOCAL_DEVICES
)

sys.path.insert(
    0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
)

import keras  # noqa: E402

from keras_moe.distribution import mesh as mesh_lib  # noqa: E402
from keras_moe.distribution.expert_parallel import (  # noqa: E402
    ExpertParallelTrainer,
)
from keras_moe.layers.moe import MoeLayer  # noqa: E402

LOSS = "sparse_categorical_crossentropy"
GLOBAL_BATCH = 16
STEPS = 3


class _MultiClientTrainer(ExpertParallelTrainer):
    """The trainer with a multi-client input path and checkpoint writer.

    `_shard_batch`: each client passes only the rows of the global batch
    that its devices hold. They form one contiguous block (true of
    `create_distributed_mesh` meshes, whose clients hold consecutive
    device ids), and each local device gets its own part of it; on one
    client the block is the whole batch, as in `ExpertParallelTrainer`.

    `save`: every client calls it with the same `path` on a file system
    they share. DTensor's sharded save writes each client's slices under
    one prefix and merges them on client 0 (with barriers), so every
    client writes into the same temporary directory; client 0 then adds
    `meta.json` and renames it into place.
    """

    def _shard_batch(self, value):
        value = tf.convert_to_tensor(value)
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
        first = min(index)
        count = max(index) - first + 1
        if sorted(set(index)) != list(range(first, first + count)):
            raise ValueError(f"local parts {index} are not contiguous")
        if value.shape[0] % count:
            raise ValueError(
                f"{value.shape[0]} rows do not split into {count} parts"
            )
        per_shard = value.shape[0] // count
        shards = [
            value[(i - first) * per_shard : (i - first + 1) * per_shard]
            for i in index
        ]
        layout = mesh_lib.batch_layout(self.mesh, value.shape.rank)
        return dtensor.pack(shards, layout)

    def save(self, path):
        checkpoint, meta = self._state()
        path = os.path.abspath(path)
        parent, name = os.path.split(path)
        # The same name on every client: they all write into it.
        temp = os.path.join(parent, f".{name}.tmp-step{self.step}")
        leader = dtensor.client_id() == 0
        if leader and os.path.exists(temp):
            shutil.rmtree(temp)
        dtensor.barrier(self.mesh, "save-begin")
        checkpoint.write(os.path.join(temp, "state"))
        if leader:
            with open(os.path.join(temp, "meta.json"), "w") as file:
                json.dump(meta, file)
            old = os.path.join(parent, f".{name}.old")
            if os.path.exists(path):
                os.rename(path, old)
            os.rename(temp, path)
            if os.path.exists(old):
                shutil.rmtree(old)
        dtensor.barrier(self.mesh, "save-end")
        return path


def model(num_experts=8, seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6, 8))
    hidden = MoeLayer(
        num_experts,
        16,
        num_selected_experts=2,
        dispatcher="einsum",
        router_kernel_initializer=keras.initializers.RandomNormal(stddev=1.0),
        name="moe",
    )(inputs)
    hidden = MoeLayer(
        num_experts,
        16,
        router="experts_choose",
        dispatcher="indices",
        use_bias=True,
        router_kernel_initializer=keras.initializers.RandomNormal(stddev=1.0),
        name="moe_2",
    )(hidden)
    outputs = keras.layers.Dense(3, activation="softmax")(
        keras.layers.Flatten()(hidden)
    )
    return keras.Model(inputs, outputs, name="model")


def adam():
    return keras.optimizers.Adam(0.01)


def batches():
    rng = np.random.default_rng(1)
    return [
        (
            rng.normal(size=(GLOBAL_BATCH, 6, 8)).astype("float32"),
            rng.integers(0, 3, size=(GLOBAL_BATCH,)).astype("int32"),
        )
        for _ in range(STEPS)
    ]


def own_rows(data, client, num_clients):
    size = GLOBAL_BATCH // num_clients
    rows = slice(client * size, (client + 1) * size)
    return [(x[rows], y[rows]) for x, y in data]


def record(results, name, losses, keras_model):
    results[f"{name}/losses"] = np.asarray(losses, "float64")
    for i, variable in enumerate(keras_model.trainable_variables):
        results[f"{name}/{i}"] = np.asarray(variable)


def packed(trainer, x):
    """<[4, B/8, ...]>: the rows of `x` each local device receives."""
    return np.stack(
        [t.numpy() for t in dtensor.unpack(trainer._shard_batch(x))]
    )


def mesh_info(mesh):
    return {
        "devices": np.asarray(mesh.local_device_ids()),
        "locations": np.asarray(
            [
                [loc[axis] for axis in mesh_lib.MESH_AXES]
                for loc in mesh.local_device_locations()
            ]
        ),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    client, num_clients = dtensor.client_id(), dtensor.num_clients()
    mesh_2x4, mesh_1x8 = [
        dtensor.create_distributed_mesh(
            [(mesh_lib.BATCH_AXIS, b), (mesh_lib.EXPERT_AXIS, n)],
            device_type="CPU",
        )
        for b, n in ((2, 4), (1, 8))
    ]
    results = {"num_clients": np.asarray(num_clients)}
    for name, mesh in (("2x4", mesh_2x4), ("1x8", mesh_1x8)):
        for key, value in mesh_info(mesh).items():
            results[f"mesh_{name}/{key}"] = value
    data = batches()
    local = own_rows(data, client, num_clients)

    trainer = ExpertParallelTrainer(model(), mesh_2x4, adam(), loss=LOSS)
    record(results, "global", trainer.fit(data), trainer.model)
    # What each local device receives of the first batch, packed from the
    # whole batch and from the client's own rows.
    results["batch_x"] = data[0][0]
    results["packed/global"] = packed(trainer, data[0][0])
    trainer = _MultiClientTrainer(model(), mesh_2x4, adam(), loss=LOSS)
    results["packed/local"] = packed(trainer, local[0][0])
    trainer = _MultiClientTrainer(
        model(), mesh_2x4, adam(), loss=LOSS, layout="replicated"
    )
    record(results, "local_replicated", trainer.fit(local), trainer.model)
    trainer = _MultiClientTrainer(model(), mesh_1x8, adam(), loss=LOSS)
    record(results, "local_1x8", trainer.fit(local), trainer.model)
    # On batch:1,expert:8 each client holds experts no other client has.
    ckpt_path = trainer.save(os.path.join(args.out, "ckpt"))
    restored = _MultiClientTrainer(model(seed=1), mesh_2x4, adam(), loss=LOSS)
    restored.load(ckpt_path)
    restored.sync_to_model()
    record(results, "restored", [restored.step], restored.model)

    if client == 0:
        # Once: the clients' runs are compared with client 0's reference.
        record(results, "initial", [], model())
        reference = model()
        reference.compile(optimizer=adam(), loss=LOSS, jit_compile=False)
        losses = [
            float(reference.train_on_batch(x, y, return_dict=True)["loss"])
            for x, y in data
        ]
        record(results, "reference", losses, reference)
    np.savez(os.path.join(args.out, f"client{client}.npz"), **results)


if __name__ == "__main__":
    main()
