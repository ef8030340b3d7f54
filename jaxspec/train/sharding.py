"""Data-parallel mesh and shardings (``jax.jit`` + ``NamedSharding``; no pmap).

One mesh axis ``'data'`` over all devices of all processes. Batches are split over it
(``P('data')``) and built as global arrays from each process's local slice with
``jax.make_array_from_process_local_data``; parameters and optimiser state are replicated
(``P()``). Under ``jit`` the gradient mean over the global batch is then computed by XLA's
collectives, and BatchNorm statistics are global without any ``axis_name``.

With ``space > 1`` (``config.mesh_space``) the mesh is ``('data', 'space')``: image arrays
(:data:`SPATIAL_KEYS`, NHWC) are split over ``'space'`` along H as well
(``P('data', 'space')``), so a full-resolution crop that does not fit one chip's memory is
spread over ``space`` chips; XLA's SPMD partitioner inserts the halo exchanges of the
convolutions and the gathers of global (attention, normalisation) operations, and the step
computes the same numbers as on the 1-axis mesh.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
SPACE_AXIS = "space"
#: batch entries with (B, H, W, ...) layout: split along H over ``'space'``
SPATIAL_KEYS = ("rgb", "hsi", "label", "reflectance", "lr_hsi", "hr_msi")


def make_mesh(devices=None, space: int = 1) -> jax.sharding.Mesh:
    """``('data',)`` mesh (``space == 1``) or ``('data', 'space')`` mesh of shape
    ``(n // space, space)``, with ``Auto`` axis types (Explicit, the new default of
    ``jax.make_mesh``, makes a data-parallel gradient step raise ``ShardingTypeError``)."""
    devices = list(jax.devices() if devices is None else devices)
    space = int(space)
    if space < 1 or len(devices) % space:
        raise ValueError(f"mesh_space={space} must be >= 1 and divide the {len(devices)} "
                         f"devices")
    if space == 1:
        return jax.make_mesh((len(devices),), (DATA_AXIS,),
                             axis_types=(jax.sharding.AxisType.Auto,), devices=devices)
    if jax.process_count() > 1 and jax.local_device_count() % space:
        raise ValueError(f"mesh_space={space} must divide the {jax.local_device_count()} "
                         f"devices of each process (a 'space' group stays inside a process)")
    return jax.make_mesh((len(devices) // space, space), (DATA_AXIS, SPACE_AXIS),
                         axis_types=(jax.sharding.AxisType.Auto,) * 2, devices=devices)


def data_size(mesh) -> int:
    """Devices along ``'data'`` (what the global batch is split over)."""
    shape = getattr(mesh, "shape", None)
    if isinstance(shape, Mapping) and DATA_AXIS in shape:
        return int(shape[DATA_AXIS])
    return int(mesh.devices.size)


def space_size(mesh) -> int:
    shape = getattr(mesh, "shape", None)
    return int(shape.get(SPACE_AXIS, 1)) if isinstance(shape, Mapping) else 1


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh, spatial: bool = False) -> NamedSharding:
    """``P('data')``, or for an image entry on a 2-axis mesh ``P('data', 'space')``."""
    if spatial and space_size(mesh) > 1:
        return NamedSharding(mesh, P(DATA_AXIS, SPACE_AXIS))
    return NamedSharding(mesh, P(DATA_AXIS))


def local_batch_size(global_batch_size: int, mesh) -> int:
    """Per-process batch size; the global batch must split evenly over the devices."""
    n_dev = data_size(mesh)
    if global_batch_size % n_dev:
        raise ValueError(f"batch_size={global_batch_size} is not divisible by the {n_dev} devices "
                         f"of the data mesh; use a multiple of {n_dev}")
    return global_batch_size // jax.process_count()


def process_rows(global_batch_size: int, mesh) -> tuple[int, int]:
    """``(start, stop)``: the rows of a global batch that this process's devices hold under
    :func:`batch_sharding` (what it must read; contiguous for a ``('data', ...)`` mesh)."""
    local_batch_size(global_batch_size, mesh)
    idx = batch_sharding(mesh).addressable_devices_indices_map((int(global_batch_size),))
    starts = sorted({(s[0].start or 0) for s in idx.values()})
    stops = sorted({(s[0].stop if s[0].stop is not None else global_batch_size)
                    for s in idx.values()})
    start, stop = starts[0], stops[-1]
    if stop - start != global_batch_size // jax.process_count():
        raise ValueError(f"this process's batch rows {start}:{stop} are not contiguous; build "
                         f"the mesh over jax.devices() in process order")
    return int(start), int(stop)


def shard_batch(batch: Mapping[str, Any], mesh) -> dict[str, jax.Array]:
    """Numpy process-local batch -> global arrays sharded over ``'data'`` (and image entries
    over ``'space'`` on a 2-axis mesh; non-numeric entries such as ``name`` are dropped)."""
    out = {}
    space = space_size(mesh)
    for k, v in batch.items():
        v = np.asarray(v)
        if v.dtype.kind not in "fiub":
            continue
        spatial = k in SPATIAL_KEYS and v.ndim >= 3
        if spatial and space > 1 and v.shape[1] % space:
            raise ValueError(f"batch {k!r}: height {v.shape[1]} is not divisible by "
                             f"mesh_space={space}")
        out[k] = jax.make_array_from_process_local_data(batch_sharding(mesh, spatial), v)
    return out


def replicate(tree: Any, mesh) -> Any:
    """Place every leaf of ``tree`` replicated on the mesh."""
    return jax.device_put(tree, replicated(mesh))
