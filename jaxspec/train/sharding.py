"""Data-parallel mesh and shardings (``jax.jit`` + ``NamedSharding``; no pmap).

One mesh axis ``'data'`` over all devices of all processes. Batches are split over it
(``P('data')``) and built as global arrays from each process's local slice with
``jax.make_array_from_process_local_data``; parameters and optimiser state are replicated
(``P()``). Under ``jit`` the gradient mean over the global batch is then computed by XLA's
collectives, and BatchNorm statistics are global without any ``axis_name``.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices=None) -> jax.sharding.Mesh:
    """1-D ``('data',)`` mesh with ``Auto`` axis type (Explicit, the new default of
    ``jax.make_mesh``, makes a data-parallel gradient step raise ``ShardingTypeError``)."""
    devices = list(jax.devices() if devices is None else devices)
    return jax.make_mesh((len(devices),), (DATA_AXIS,),
                         axis_types=(jax.sharding.AxisType.Auto,), devices=devices)


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def local_batch_size(global_batch_size: int, mesh) -> int:
    """Per-process batch size; the global batch must split evenly over the devices."""
    n_dev = mesh.devices.size
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
    """Numpy process-local batch -> global arrays sharded over ``'data'`` (non-numeric
    entries such as ``name`` are dropped)."""
    sharding = batch_sharding(mesh)
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        if v.dtype.kind not in "fiub":
            continue
        out[k] = jax.make_array_from_process_local_data(sharding, v)
    return out


def replicate(tree: Any, mesh) -> Any:
    """Place every leaf of ``tree`` replicated on the mesh."""
    return jax.device_put(tree, replicated(mesh))
