"""One client of a two-process (multi-client) DTensor expert-parallel run.

Run twice by tests/distribution/test_expert_parallel_multihost.py, once per
client, each with 4 virtual CPU devices and the multi-client DTensor
environment (TensorFlow 2.20 reads `DTENSOR_JOBS`, one `host:port` per
client, and `DTENSOR_CLIENT_ID`; `DTENSOR_JOB_NAME` defaults to "worker"):

    DTENSOR_JOBS=localhost:PORT0,localhost:PORT1 DTENSOR_CLIENT_ID=0 \
        python tests/distribution/_ep_multihost.py --out=DIR &
    DTENSOR_JOBS=localhost:PORT0,localhost:PORT1 DTENSOR_CLIENT_ID=1 \
        python tests/distribution/_ep_multihost.py --out=DIR

Every run uses `ExpertParallelTrainer` as the library ships it, on meshes
over the 8 devices of both processes, and passes each client only its
own rows of every global batch (`trainer.local_batch_rows`). The model
has two MoE layers (token and expert choice, 8 experts); each run trains
3 Adam steps:

* `local_replicated`: the mesh given as the spec "batch:2,expert:4",
  `layout="replicated"`;
* `local_1x8`: GShard on `make_mesh(1, 8)`, where each client holds
  experts the other has not; its state is then saved by both clients
  into one checkpoint directory `<out>/ckpt` and loaded by both into a
  trainer on `make_mesh(2, 4)` built from other initial weights
  (`restored`);
* `resumed`: GShard on `make_mesh(2, 4)` through `train_resumable`
  (directory `<out>/resumable`, a checkpoint every step, one kept): 2
  steps, then a new trainer from other initial weights resumes and runs
  the third.

It also records what each local device receives of the first global
batch `batch_x` on `batch:2,expert:4` (GShard) when the client passes its
own rows (`packed`), the rows `local_batch_rows(16)` on each mesh and
layout (`rows/<mesh>/<layout>`), the message of the error for a row count
that does not split (`error/rows`), this client's `default_devices()`,
and its device ids and mesh locations on each mesh
(`mesh_<b>x<n>/devices`, `mesh_<b>x<n>/locations`).

Client 0 also trains the same model with plain Keras on one device
(`reference`) and records its initial weights (`initial`).

Writes `<out>/client<c>.npz`: for each run `<run>/losses` (for
`restored`, its step) and `<run>/<i>` (its trainable weights after
`sync_to_model`).
"""

import argparse
import os
import sys

import numpy as np
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
from ep_models import two_moe_layers_model  # noqa: E402

from keras_moe.distribution import mesh as mesh_lib  # noqa: E402
from keras_moe.distribution.checkpointing import train_resumable  # noqa: E402
from keras_moe.distribution.expert_parallel import (  # noqa: E402
    ExpertParallelTrainer,
)

LOSS = "sparse_categorical_crossentropy"
GLOBAL_BATCH = 16
STEPS = 3


def model(num_experts=8, seed=0):
    return two_moe_layers_model(num_experts, seed)


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


def own_rows(trainer, data):
    """This client's rows of every global batch, as a user passes them."""
    start, stop = trainer.local_batch_rows(GLOBAL_BATCH)
    return [(x[start:stop], y[start:stop]) for x, y in data]


def record(results, name, losses, keras_model):
    results[f"{name}/losses"] = np.asarray(losses, "float64")
    for i, variable in enumerate(keras_model.trainable_variables):
        results[f"{name}/{i}"] = np.asarray(variable)


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
    mesh_2x4, mesh_1x8 = mesh_lib.make_mesh(2, 4), mesh_lib.make_mesh(1, 8)
    results = {
        "num_clients": np.asarray(num_clients),
        "default_devices": np.asarray(mesh_lib.default_devices()),
    }
    for name, mesh in (("2x4", mesh_2x4), ("1x8", mesh_1x8)):
        for key, value in mesh_info(mesh).items():
            results[f"mesh_{name}/{key}"] = value
    data = batches()

    # The mesh from a spec string: it counts both clients' devices.
    trainer = ExpertParallelTrainer(
        model(), "batch:2,expert:4", adam(), loss=LOSS, layout="replicated"
    )
    for key, value in mesh_info(trainer.mesh).items():
        results[f"mesh_spec/{key}"] = value
    results["rows/2x4/replicated"] = trainer.local_batch_rows(GLOBAL_BATCH)
    losses = trainer.fit(own_rows(trainer, data))
    record(results, "local_replicated", losses, trainer.model)

    trainer = ExpertParallelTrainer(model(), mesh_1x8, adam(), loss=LOSS)
    results["rows/1x8/gshard"] = trainer.local_batch_rows(GLOBAL_BATCH)
    record(
        results,
        "local_1x8",
        trainer.fit(own_rows(trainer, data)),
        trainer.model,
    )
    # On batch:1,expert:8 each client holds experts no other client has.
    ckpt_path = trainer.save(os.path.join(args.out, "ckpt"))
    restored = ExpertParallelTrainer(model(seed=1), mesh_2x4, adam(), loss=LOSS)
    restored.load(ckpt_path)
    restored.sync_to_model()
    record(results, "restored", [restored.step], restored.model)
    results["rows/2x4/gshard"] = restored.local_batch_rows(GLOBAL_BATCH)
    # What each local device receives of the first batch.
    results["batch_x"] = data[0][0]
    start, stop = results["rows/2x4/gshard"]
    results["packed"] = np.stack(
        [
            t.numpy()
            for t in dtensor.unpack(
                restored._shard_batch(data[0][0][start:stop])
            )
        ]
    )
    try:
        restored._shard_batch(data[0][0][:6])
    except ValueError as error:
        results["error/rows"] = np.asarray(str(error))
    try:
        mesh_lib.as_mesh("batch:2,expert:2")
    except ValueError as error:
        results["error/spec"] = np.asarray(str(error))
    replicated_1x8 = ExpertParallelTrainer(
        model(), mesh_1x8, adam(), loss=LOSS, layout="replicated"
    )
    results["rows/1x8/replicated"] = replicated_1x8.local_batch_rows(
        GLOBAL_BATCH
    )

    # Crash-safe training across both clients: 2 steps, then a new
    # trainer (other initial weights) resumes from the newest checkpoint.
    directory = os.path.join(args.out, "resumable")
    trainer = ExpertParallelTrainer(model(), mesh_2x4, adam(), loss=LOSS)
    local = own_rows(trainer, data)
    losses = train_resumable(trainer, local, 2, directory, 1, max_to_keep=1)
    trainer = ExpertParallelTrainer(model(seed=1), mesh_2x4, adam(), loss=LOSS)
    losses += train_resumable(
        trainer, local, STEPS, directory, 1, max_to_keep=1
    )
    record(results, "resumed", losses, trainer.model)

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
