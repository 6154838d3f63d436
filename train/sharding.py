"""Data- and sequence-parallel placement: batches split over the ``data`` axis of a
``data`` x ``seq`` mesh, the train state replicated, and with ``train.sequence_parallel`` > 1 each
sequence's attention sharded over the ``seq`` axis by ring attention (kernels/ring_attention.py).
Several hosts join through ``jax.distributed`` (``train/distributed.py``) before this runs.

A step's global batch holds the same examples in the same order whatever the number of devices
or hosts: the mesh orders devices by process, so that process ``p`` holds the contiguous rows
``p * local .. (p + 1) * local`` of every global batch (the rows it reads, see
``xformers_zoo.data.pipeline``), and the jitted step computes on the global array, so sums,
means and random draws (dropout, masking) do not depend on how the batch is split. The steps
run with the mesh in context (``under_mesh``), which is how attention inside them finds the
axes to shard over (kernels/batch_shards.py, kernels/ring_attention.py).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from xformers_zoo.configs.base import ModelConfig
from xformers_zoo.kernels.ring_attention import SEQ_AXIS
from xformers_zoo.models.classifier import encoder_length
from xformers_zoo.models.sequence_parallel import SequenceParallelConfig
from xformers_zoo.variants import VARIANTS

DATA_AXIS = "data"


def data_mesh(devices: list[jax.Device] | None = None, sequence_parallel: int = 1) -> Mesh:
    """A ``data`` x ``seq`` mesh over ``devices`` (default: every device of every process) with
    ``sequence_parallel`` devices along ``seq``, ordered by process so that each process's
    devices hold contiguous rows of a batch (a ``seq`` group lies within one process)."""
    devices = jax.devices() if devices is None else devices
    ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
    if len(ordered) % sequence_parallel:
        raise ValueError(f"train.sequence_parallel {sequence_parallel} does not divide the "
                         f"{len(ordered)} devices: use a divisor of {len(ordered)}")
    grid = np.asarray(ordered).reshape(-1, sequence_parallel)
    if any(len({d.process_index for d in row}) > 1 for row in grid):
        local = len([d for d in ordered if d.process_index == ordered[0].process_index])
        raise ValueError(f"train.sequence_parallel {sequence_parallel} spans several processes "
                         f"(each has {local} devices): use a divisor of {local}")
    return Mesh(grid, (DATA_AXIS, SEQ_AXIS))


def _layout(mesh: Mesh) -> str:
    processes = len({d.process_index for d in mesh.devices.flat})
    count, seq = mesh.devices.size, mesh.shape[SEQ_AXIS]
    devices = f"{count} device{'s' * (count != 1)}" + (
        f" ({processes} processes)" if processes > 1 else "")
    if seq == 1:
        return devices
    return (f"{mesh.shape[DATA_AXIS]} data-parallel groups of the {devices} "
            f"(train.sequence_parallel {seq})")


def local_batch_size(global_batch: int, mesh: Mesh, grad_accum: int = 1) -> int:
    """This process's share of ``global_batch``. The batch must split evenly over the ``data``
    axis, and with gradient accumulation each micro-batch too (every device computes on its
    rows of every micro-batch)."""
    devices = mesh.shape[DATA_AXIS]
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


def under_mesh(fn: Callable, mesh: Mesh) -> Callable:
    """``fn`` traced and run with ``mesh`` in context (``jax.set_mesh``): a jitted function's
    body sees the mesh only so, not from the shardings of its arguments. ``.lower`` (ahead of
    time) works as on the jitted function."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        with jax.set_mesh(mesh):
            return fn(*args, **kwargs)

    def lower(*args, **kwargs):  # ahead-of-time compilation (step timing) sees the mesh too
        with jax.set_mesh(mesh):
            return fn.lower(*args, **kwargs)

    call.lower = lower
    return call


def sequence_parallel_model(model: ModelConfig, sequence_parallel: int,
                            max_length: int) -> ModelConfig:
    """``model`` with its attention on ring attention over the ``seq`` axis when
    ``sequence_parallel`` > 1 (unchanged otherwise). Refuses variants without the option and
    encoder lengths (``max_length`` tokens, +1 with CLS pooling) the axis does not divide."""
    if sequence_parallel == 1:
        return model
    attention = model.attention
    if not isinstance(attention, SequenceParallelConfig):
        accepted = [name for name in VARIANTS.names()
                    if issubclass(VARIANTS.get(name).config_cls, SequenceParallelConfig)]
        raise ValueError(f"train.sequence_parallel {sequence_parallel}: variant "
                         f"{model.variant!r} has no ring attention; accepted: "
                         f"{', '.join(accepted)}")
    if attention.sequence_axis not in (None, SEQ_AXIS):
        raise ValueError(f"train.sequence_parallel shards attention over the {SEQ_AXIS!r} axis, "
                         f"but model.attention.sequence_axis is {attention.sequence_axis!r}: "
                         f"leave it unset")
    length = encoder_length(model, max_length)
    if length % sequence_parallel:
        fix = ("model.pooling=mean (CLS pooling adds a token) and " if model.pooling == "cls"
               else "")
        raise ValueError(f"train.sequence_parallel {sequence_parallel} does not divide the "
                         f"encoder length {length} ({max_length} tokens"
                         f"{' + CLS' if model.pooling == 'cls' else ''}): use {fix}a "
                         f"data.max_length that is a multiple of {sequence_parallel}")
    return dataclasses.replace(
        model, attention=dataclasses.replace(attention, sequence_axis=SEQ_AXIS))
