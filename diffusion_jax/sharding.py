"""Device mesh, the logical-axis rules table and helpers that place state and batches.

The mesh has two axes, ``("data", "fsdp")``. A batch is split over both (every device sees
``B / (data * fsdp)`` examples); parameters, optimiser moments and EMAs are split over
``"fsdp"`` along the axis the rules table names, and replicated over ``"data"``. With
``fsdp = 1`` this is plain data parallelism; 1 CPU, 1 GPU and a TPU pod run the same code.

Parameters carry logical axis names (``models/layers.py``: ``LOGICAL_AXIS_NAMES``) in their
``out_sharding`` metadata; `RULES` maps each name to a mesh axis or ``None`` (replicated).
Changing data parallelism into FSDP is a config change (``--config.mesh.fsdp=N``).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over every device

# The one rules table: logical parameter axis -> mesh axis (None = replicated). The output
# channel axes of convolutions, dense layers and attention projections are the largest
# axes of the UNet's parameters, so they shard over "fsdp"; everything else is replicated.
RULES: tuple[tuple[str, str | None], ...] = (
    ("conv_in", None),
    ("conv_out", "fsdp"),
    ("embed", None),
    ("mlp", "fsdp"),
    ("heads", "fsdp"),
    ("norm", None),
    ("vocab", None),
)


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``("data", "fsdp")`` mesh from ``config.mesh``.

    Args:
        mesh_cfg: ``config.mesh`` with ``data`` (-1 = all devices not used by fsdp) and ``fsdp``.
        devices: the devices to use; defaults to ``jax.devices()`` (all hosts).

    Returns:
        A `Mesh` of shape ``[data, fsdp]``.

    Raises:
        ValueError: a size is not positive (other than ``data = -1``), or
            ``data * fsdp`` differs from the device count.
    """
    devices = list(jax.devices() if devices is None else devices)
    n, data, fsdp = len(devices), int(mesh_cfg.data), int(mesh_cfg.fsdp)
    if fsdp < 1 or data == 0 or data < -1:
        raise ValueError(
            f"config.mesh: data={data} must be -1 or positive and fsdp={fsdp} positive.")
    if data == -1:
        if n % fsdp:
            raise ValueError(
                f"config.mesh.fsdp={fsdp} does not divide the {n} available devices.")
        data = n // fsdp
    if data * fsdp != n:
        raise ValueError(
            f"config.mesh: data * fsdp = {data} * {fsdp} = {data * fsdp} must equal the "
            f"number of devices ({n}); set --config.mesh.data=-1 to use all of them.")
    return jax.make_mesh(
        (data, fsdp), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2,
        devices=devices)


def logical_to_spec(names: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh,
                    rules=RULES) -> P:
    """The `PartitionSpec` of one array from its logical axis names.

    Dimension ``i`` is split over mesh axis ``rules[names[i]]`` only if that axis is not
    already used by an earlier dimension and ``shape[i]`` is divisible by the axis size;
    otherwise it is replicated. This is the single place the divisibility fallback lives.

    Args:
        names: one logical name (or None) per dimension, or None for a replicated array.
        shape: the array's shape.
        mesh: the device mesh.
        rules: ``(logical name, mesh axis or None)`` pairs.

    Returns:
        A `PartitionSpec` with one entry per dimension.

    Raises:
        ValueError: ``names`` has a name missing from ``rules``, or the wrong length.
    """
    if names is None:
        return P()
    if len(names) != len(shape):
        raise ValueError(f"logical axis names {tuple(names)} do not match shape {tuple(shape)}.")
    table = dict(rules)
    spec, used = [], set()
    for name, size in zip(names, shape):
        if name is not None and name not in table:
            raise ValueError(
                f"logical axis name {name!r} has no entry in the sharding rules {sorted(table)}.")
        axis = table.get(name) if name is not None else None
        if axis is None or axis in used or size % mesh.shape[axis]:
            spec.append(None)
        else:
            spec.append(axis)
            used.add(axis)
    return P(*spec)


def state_shardings(abstract_state: Any, mesh: Mesh, rules=RULES) -> Any:
    """`NamedSharding` for every leaf of a (possibly abstract) state pytree.

    ``nnx.Variable`` nodes (parameters, and the optimiser moments and EMAs that share
    their structure) are sharded by their ``out_sharding`` logical names through `rules`;
    every other leaf (step, PRNG key, counters) is replicated.

    Args:
        abstract_state: a pytree of arrays or ``jax.ShapeDtypeStruct``.
        mesh: the device mesh.
        rules: ``(logical name, mesh axis or None)`` pairs.

    Returns:
        A pytree of the same structure whose leaves are `NamedSharding`.
    """

    def leaf_sharding(x):
        if isinstance(x, nnx.Variable):
            names = _logical_names(x)
            return x.replace(NamedSharding(mesh, logical_to_spec(names, x.shape, mesh, rules)))
        return NamedSharding(mesh, P())

    return jax.tree.map(leaf_sharding, abstract_state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def replicated(mesh: Mesh) -> NamedSharding:
    """The fully replicated sharding on ``mesh``."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Splits dimension 0 (the batch) over every device of ``mesh``."""
    return NamedSharding(mesh, P(BATCH_AXES))


def shard_batch(host_batch: Any, mesh: Mesh) -> Any:
    """Assembles host-local numpy batches into global arrays split over the batch axis.

    Each of the P hosts passes its own ``[B / P, ...]`` slice; the result is one global
    ``[B, ...]`` `jax.Array` per leaf, sharded by `batch_sharding` (works for 1 process and
    multi-host alike).

    Args:
        host_batch: pytree of numpy arrays ``[B / P, ...]`` (this host's examples).
        mesh: the device mesh.

    Returns:
        The same pytree of global ``[B, ...]`` arrays.

    Raises:
        ValueError: the global batch is not divisible by the number of devices.
    """
    sharding = batch_sharding(mesh)
    n = mesh.size

    def put(x):
        x = np.asarray(x)
        global_b = x.shape[0] * jax.process_count()
        if global_b % n:
            raise ValueError(
                f"global batch size {global_b} must be divisible by the {n} devices of the "
                f"mesh {dict(mesh.shape)} (set train.batch_size accordingly).")
        return jax.make_array_from_process_local_data(sharding, x, (global_b,) + x.shape[1:])

    return jax.tree.map(put, host_batch)


def _logical_names(var: nnx.Variable) -> tuple[str | None, ...] | None:
    """The logical axis names stored on a variable (flax's ``out_sharding`` metadata)."""
    meta = var.get_metadata()
    for key in ("out_sharding", "sharding_names", "sharding"):
        if meta.get(key) is not None:
            return tuple(meta[key])
    return None
