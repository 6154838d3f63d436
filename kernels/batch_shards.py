"""Attention implementations without a partitioning rule, run per batch shard.

XLA's SPMD partitioner splits plain XLA ops and custom calls that carry a partitioning rule
(cuDNN's, through ``jax.nn.dot_product_attention``), but a Pallas kernel is opaque to it: under
a jit whose batch is sharded over a mesh, it would gather q, k and v and run the kernel on the
whole batch on every device. ``call_per_batch_shard`` instead runs such an implementation
inside ``jax.shard_map`` over the mesh axes that split the batch, each device on its own rows.

The mesh is the one in context (``jax.set_mesh``; the trainer runs its steps under it): a
sharded input alone does not tell a jitted function's body which mesh it runs on. Axes already
manual (inside a ``shard_map``, e.g. ring attention's) are left alone. Dropout decisions are
the whole batch's: each shard passes its first row's index (``batch_offset``) to the kernels.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
from jax import lax
from jax.sharding import AbstractMesh, Mesh, PartitionSpec

from xformers_zoo.kernels.ring_blocks import depends_on_batch


def batch_axes(mesh: Mesh | AbstractMesh, batch: int, *, exclude: tuple[str, ...] = ()
               ) -> tuple[str, ...]:
    """The mesh axes (not manual, not in ``exclude``, of size > 1) that split ``batch`` rows
    between them, when together they divide it evenly; else none (the batch is then
    replicated over them)."""
    if mesh.empty:
        return ()
    manual = set(getattr(mesh, "manual_axes", ()))
    axes = tuple(name for name in mesh.axis_names
                 if name not in exclude and name not in manual and mesh.shape[name] > 1)
    size = math.prod(mesh.shape[name] for name in axes)
    return axes if axes and batch % size == 0 else ()


def refuse_batch_predicate(predicate, axes: tuple[str, ...], caller: str) -> None:
    """Raises when mesh ``axes`` split the batch and ``predicate`` reads its batch index (each
    device would see its local indices)."""
    if axes and predicate is not None and depends_on_batch(predicate):
        raise ValueError(f"{caller}: the mask predicate reads the batch index, which differs "
                         f"per device when mesh axes {axes} split the batch; accepted: "
                         f"predicates of (head, query, key) only")


def call_per_batch_shard(fn: Callable[..., jax.Array], q: jax.Array, k: jax.Array,
                         v: jax.Array, **options) -> jax.Array:
    """``fn(q, k, v, **options)`` (``dot_product_attention``'s options) on each device's rows
    of the batch when mesh axes in context split it (see the module docstring), else on the
    whole batch. With dropout, ``fn`` must take ``batch_offset`` (see ``pallas_attention``)."""
    mesh = jax.sharding.get_abstract_mesh()
    batch = q.shape[0]
    axes = batch_axes(mesh, batch)
    if not axes:
        return fn(q, k, v, **options)
    refuse_batch_predicate(options.get("mask_predicate"), axes, "attention")
    key_mask, dropout_rng = options.pop("key_mask"), options.pop("dropout_rng")
    dropout = options["dropout_rate"] > 0.0
    rows = PartitionSpec(axes)
    local_batch = batch // math.prod(mesh.shape[name] for name in axes)

    def local(q, k, v, key_mask, dropout_rng):
        extra = {}
        if dropout:
            extra["batch_offset"] = lax.axis_index(axes) * local_batch
        return fn(q, k, v, key_mask=key_mask, dropout_rng=dropout_rng, **options, **extra)

    specs = (rows, rows, rows, None if key_mask is None else rows,
             None if dropout_rng is None else PartitionSpec())
    # check_vma off: the Pallas calls carry no varying-axis types. Under jit even when called
    # eagerly: the kernels' host-side tile schedules cannot be built in eager shard_map.
    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=rows,
                                 check_vma=False))(q, k, v, key_mask, dropout_rng)
