"""Data-parallel placement: batches split over every device of a 1-D ``data`` mesh, the train
state replicated. Several hosts join through ``jax.distributed`` before this runs."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def data_mesh() -> Mesh:
    """A mesh over all devices of all processes along one ``data`` axis."""
    return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def local_batch_size(global_batch: int, mesh: Mesh) -> int:
    """This process's share of ``global_batch``; it must split evenly over every device."""
    devices = mesh.devices.size
    if global_batch % devices:
        raise ValueError(f"train.batch_size {global_batch} must be divisible by the number of "
                         f"devices ({devices})")
    return global_batch // jax.process_count()


def replicate(tree, mesh: Mesh):
    """Places every array of ``tree`` on every device."""
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """A global array per field from this process's rows, split along the batch axis."""
    sharding = NamedSharding(mesh, PartitionSpec(DATA_AXIS))
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
