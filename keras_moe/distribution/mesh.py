"""DTensor meshes and layouts for expert parallelism.

Mesh axes: `batch` (data parallel: examples are split over it) and `expert`
(the experts of every MoE layer are split over it). A mesh of
`batch * expert` devices is written as a spec string, `"batch:2,expert:4"`.

Shape letters: B examples, E experts, D model dimension, H hidden dimension,
n the size of the `expert` axis.

Layouts (`tf.experimental.dtensor.Layout`):

    expert weights <[E, D, H]>, <[E, H, D]>, <[E, H]>, <[E, D]>
        -> sharded on `expert` along axis 0 (each device holds E/n experts)
    every other weight and optimizer slot   -> replicated
    inputs and labels <[B, ...]>            -> sharded on `batch` along axis 0

Example:

>>> axes = parse_mesh_spec("batch:1,expert:1", num_devices=1)
>>> axes
{'batch': 1, 'expert': 1}
>>> mesh = make_mesh(**axes, devices=["CPU:0"])
>>> batch_layout(mesh, rank=2).sharding_specs
['batch', 'unsharded']
"""

import re

import tensorflow as tf
from tensorflow.experimental import dtensor

BATCH_AXIS = "batch"
EXPERT_AXIS = "expert"
MESH_AXES = (BATCH_AXIS, EXPERT_AXIS)

_EXPECTED = (
    "expected 'batch:<n>,expert:<m>' (each axis at most once, sizes >= 1; an "
    "axis left out has size 1)"
)


def default_devices():
    """This process's devices a mesh uses by default: TPUs, else GPUs,
    else CPUs.

    On several processes (multi-client DTensor) TensorFlow also lists the
    other processes' devices; only this process's own are returned.

    Returns:
        A list of device names such as `["CPU:0", "CPU:1"]`.
    """
    task = dtensor.client_id()
    for device_type in ("TPU", "GPU", "CPU"):
        devices = [
            device
            for device in tf.config.list_logical_devices(device_type)
            if tf.DeviceSpec.from_string(device.name).task in (None, task)
        ]
        if devices:
            return [f"{device_type}:{i}" for i in range(len(devices))]
    raise ValueError("TensorFlow sees no TPU, GPU or CPU device")


def parse_mesh_spec(spec, num_devices=None):
    """Reads a mesh spec such as `"batch:2,expert:4"`.

    Args:
        spec: comma-separated `axis:size` pairs over the axes `batch` and
            `expert`; an axis left out has size 1 (`"expert:8"`).
        num_devices: devices the mesh must cover exactly, over all
            processes; None for the count of `default_devices()` times
            the number of DTensor clients (processes).

    Returns:
        A dict `{"batch": int, "expert": int}`, the keyword arguments of
        `make_mesh`.

    Raises:
        ValueError: for a spec that does not parse, an unknown or repeated
            axis, a size below 1, or sizes whose product is not
            `num_devices`.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"cannot parse mesh spec {spec!r}: {_EXPECTED}")
    axes = {}
    for part in spec.split(","):
        match = re.fullmatch(r"\s*(\w+)\s*:\s*(-?\d+)\s*", part)
        if match is None:
            raise ValueError(
                f"cannot parse mesh spec {spec!r} at {part!r}: {_EXPECTED}"
            )
        name, size = match[1], int(match[2])
        if name not in MESH_AXES:
            raise ValueError(
                f"mesh spec {spec!r} names an unknown axis {name!r}; the "
                f"axes are {MESH_AXES}"
            )
        if name in axes:
            raise ValueError(f"mesh spec {spec!r} names axis {name!r} twice")
        if size < 1:
            raise ValueError(
                f"mesh spec {spec!r}: axis {name!r} has size {size}; sizes "
                "must be >= 1"
            )
        axes[name] = size
    axes = {name: axes.get(name, 1) for name in MESH_AXES}
    if num_devices is None:
        num_devices = len(default_devices()) * dtensor.num_clients()
    _check_size(axes[BATCH_AXIS], axes[EXPERT_AXIS], num_devices, spec)
    return axes


def _check_size(batch, expert, num_devices, spec=None):
    if batch * expert != num_devices:
        given = f"mesh spec {spec!r}" if spec else "the mesh"
        clients = dtensor.num_clients()
        where = (
            f" ({num_devices // clients} per process x {clients} processes)"
            if clients > 1
            else ""
        )
        raise ValueError(
            f"{given} has batch * expert = {batch} * {expert} = "
            f"{batch * expert} devices but {num_devices} are available"
            f"{where}: the mesh must use every device exactly once"
        )


def make_mesh(batch, expert, devices=None):
    """A DTensor mesh with axes (`batch`, `expert`).

    On one process the mesh is made of `devices`. On several (a
    multi-client DTensor cluster, every process calling this alike) it
    spans every process's devices, built by
    `dtensor.create_distributed_mesh`: process c holds the global device
    ids [c*L, (c+1)*L) for its L local devices (consecutive in the
    row-major order of (`batch`, `expert`)). Every process must have the
    same number of devices.

    Args:
        batch: size of the `batch` (data parallel) axis.
        expert: size of the `expert` axis.
        devices: this process's device names (`"CPU:0"`, `"GPU:1"`,
            `"TPU:3"`); None for `default_devices()`. Their number times
            the number of processes must be `batch * expert`; global
            device `i` sits at mesh coordinates `(i // expert, i % expert)`.

    Returns:
        A `tf.experimental.dtensor.Mesh`.
    """
    for name, size in ((BATCH_AXIS, batch), (EXPERT_AXIS, expert)):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(
                f"mesh axis {name!r} must be an int >= 1; received {size!r}"
            )
    devices = list(default_devices() if devices is None else devices)
    clients = dtensor.num_clients()
    _check_size(batch, expert, len(devices) * clients)
    if len(set(devices)) != len(devices):
        raise ValueError(f"devices must be distinct; received {devices}")
    axes = [(BATCH_AXIS, batch), (EXPERT_AXIS, expert)]
    if clients == 1:
        return dtensor.create_mesh(axes, devices=devices)
    types = sorted({tf.DeviceSpec.from_string(d).device_type for d in devices})
    if len(types) != 1:
        raise ValueError(
            f"the devices of a mesh must be of one type; received {devices}"
        )
    return dtensor.create_distributed_mesh(
        axes, local_devices=devices, device_type=types[0]
    )


def as_mesh(mesh, devices=None):
    """A mesh from a `Mesh`, a spec string or a dict of axis sizes.

    Args:
        mesh: a `tf.experimental.dtensor.Mesh` with the axes `batch` and
            `expert` (returned as is), a spec for `parse_mesh_spec` or a
            dict `{"batch": int, "expert": int}`.
        devices: this process's devices for a spec or dict (None:
            `default_devices()`).

    Returns:
        A `tf.experimental.dtensor.Mesh`.
    """
    if isinstance(mesh, dtensor.Mesh):
        if tuple(mesh.dim_names) != MESH_AXES:
            raise ValueError(
                f"the mesh must have the axes {MESH_AXES}; received one with "
                f"{tuple(mesh.dim_names)}"
            )
        return mesh
    if isinstance(mesh, str):
        count = None
        if devices is not None:
            count = len(devices) * dtensor.num_clients()
        mesh = parse_mesh_spec(mesh, num_devices=count)
    if not isinstance(mesh, dict) or set(mesh) != set(MESH_AXES):
        raise ValueError(
            "mesh must be a dtensor Mesh, a spec string or a dict with the "
            f"keys {MESH_AXES}; received {mesh!r}"
        )
    return make_mesh(mesh[BATCH_AXIS], mesh[EXPERT_AXIS], devices=devices)


def axis_size(mesh, name):
    """The size of mesh axis `name`."""
    return mesh.dim_size(name)


def replicated_layout(mesh, rank):
    """Every device holds the whole tensor."""
    return dtensor.Layout.replicated(mesh, rank=rank)


def batch_layout(mesh, rank):
    """Axis 0 split over `batch`; replicated over `expert`."""
    return dtensor.Layout.batch_sharded(mesh, BATCH_AXIS, rank=rank)


def expert_weight_layout(mesh, rank):
    """Axis 0 (E) split over `expert`; replicated over `batch`."""
    return dtensor.Layout(
        [EXPERT_AXIS] + [dtensor.UNSHARDED] * (rank - 1), mesh
    )
