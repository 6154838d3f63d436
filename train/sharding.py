"""Data-parallel placement: batches split over every device of a 1-D ``data`` mesh, the train
state replicated. Several hosts join through ``jax.distributed`` (``train/distributed.py``)
before this runs.

A step's global batch holds the same examples in the same order whatever the number of devices
or hosts: the mesh orders devices by process, so that process ``p`` holds the contiguous rows
``p * local .. (p + 1) * local`` of every global batch (the rows it reads, see
``xformers_zoo.data.pipeline``), and the jitted step computes on the global array, so sums,
means and random draws (dropout, masking) do not depend on how the batch is split.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def data_mesh(devices: list[jax.Device] | None = None) -> Mesh:
    """A mesh along one ``data`` axis over ``devices`` (default: every device of every process),
    ordered by process so that each process's devices hold contiguous rows of a batch."""
    devices = jax.devices() if devices is None else devices
    ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
    return Mesh(np.asarray(ordered), (DATA_AXIS,))


def _layout(mesh: Mesh) -> str:
    processes = len({d.process_index for d in mesh.devices.flat})
    count = mesh.devices.size
    return f"{count} device{'s' * (count != 1)}" + (
        f" ({processes} processes)" if processes > 1 else "")


def local_batch_size(global_batch: int, mesh: Mesh, grad_accum: int = 1) -> int:
    """This process's share of ``global_batch``. The batch must split evenly over every device,
    and with gradient accumulation each micro-batch too (every device computes on its rows of
    every micro-batch)."""
    devices = mesh.devices.size
    if global_batch % devices:
        raise ValueError(f"train.batch_size {global_batch} does not split over the "
                         f"{_layout(mesh)}: use a multiple of {devices}")
    if (global_batch // grad_accum) % devices:
        raise ValueError(f"train.batch_size {global_batch} / train.grad_accum {grad_accum} = "
                         f"{global_batch // grad_accum} rows per micro-batch do not split over "
                         f"the {_layout(mesh)}: lower train.grad_accum (the devices already "
                         f"split the batch) or use a batch size that is a multiple of "
                         f"{devices * grad_accum}")
    return global_batch // jax.process_count()


def replicate(tree, mesh: Mesh):
    """Places every array of ``tree`` on every device."""
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """A global array per field from this process's rows, split along the batch axis."""
    sharding = NamedSharding(mesh, PartitionSpec(DATA_AXIS))
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
