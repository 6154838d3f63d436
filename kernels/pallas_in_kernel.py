"""Functions called inside the Pallas FlashAttention kernel bodies (``pallas_forward``,
``pallas_backward``): which row a program works on, tile products, element masks, causal loop
bounds and result stores. The plan and schedules they read are built by ``pallas_schedule``.

Logits are kept in base 2 (``s * scale * LOG2_E``) so the kernels use ``exp2``; the log-sum-exp
residual is stored in the same base (the Mosaic kernels follow the same conventions).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from xformers_zoo.kernels.pallas_schedule import WHOLE_ROW, KernelPlan

LOG2_E = math.log2(math.e)
# Log-sum-exp stored for a row that sees no key: large enough that exp2(s - lse) is exactly zero
# for every finite logit, so the backward pass gives such rows no gradient.
EMPTY_ROW_LSE = 1e30


def batch_and_head(plan: KernelPlan):
    """This program's batch entry and head, for either grid order."""
    return pl.program_id(1), pl.program_id(0 if plan.sparse else 2)


class RowProgram(NamedTuple):
    """What one program works on: its row ``tile``; for sparse plans the row's index in the
    schedule tables (``table_row``), the slice of its rows in whole-length refs (``own``) and the
    ``steps`` (first, end) of its list to walk; for split plans the ``slot`` it writes to."""

    tile: jax.Array
    table_row: jax.Array | None = None
    own: pl.Slice | None = None
    steps: tuple | None = None
    slot: jax.Array | None = None


def locate_row(plan: KernelPlan, rows: int, block: int, tables) -> RowProgram:
    """This program's row (or row segment) from the program id and, for sparse plans, the
    schedule tables (refs, ``plan.table_count`` of them)."""
    if not plan.sparse:
        return RowProgram(pl.program_id(0))
    head = pl.program_id(0) if plan.schedule_heads > 1 else 0
    if plan.split:
        entry = (head * plan.programs + pl.program_id(2)) * 4
        programs_ref = tables[1]
        tile = programs_ref[entry]
        steps = (programs_ref[entry + 1], programs_ref[entry + 2])
        slot = programs_ref[entry + 3]
    else:
        tile = tables[2][head * rows + pl.program_id(2)]
        steps, slot = (0, tables[1][head * rows + tile]), None
    own = pl.ds(pl.multiple_of(tile * block, block), block)
    return RowProgram(tile, head * rows + tile, own, steps, slot)


def listed_tile(plan: KernelPlan, tables, work: RowProgram, step):
    """The column tile at ``step`` of the program's row list (sparse), or ``step`` (dense)."""
    return tables[0][work.table_row * plan.max_count + step] if plan.sparse else step


def store_result(work: RowProgram, block: int, ref, part_ref, value) -> None:
    """Writes a program's result: to its own row tile of ``ref``, or, for a segment of a split
    row, as a partial result to its slot of ``part_ref``; padding programs write nothing."""
    if work.slot is None:
        write_own(ref, work.own, value.astype(ref.dtype))
        return

    @pl.when(work.slot == WHOLE_ROW)
    def _():
        write_own(ref, work.own, value.astype(ref.dtype))

    @pl.when(work.slot >= 0)
    def _():
        part_ref[pl.ds(pl.multiple_of(work.slot * block, block), block)] = (
            value.astype(part_ref.dtype))


def read_own(ref, own):
    """The program's own row tile of ``ref``."""
    return ref[...] if own is None else ref[own]


def write_own(ref, own, value) -> None:
    """Stores ``value`` into the program's own row tile of ``ref``."""
    if own is None:
        ref[...] = value
    else:
        ref[own] = value


def dot_nt(a: jax.Array, b: jax.Array, plan: KernelPlan) -> jax.Array:
    """``a @ b.T`` with float32 accumulation."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=plan.precision,
                           preferred_element_type=jnp.float32)


def dot_tn(a: jax.Array, b: jax.Array, plan: KernelPlan) -> jax.Array:
    """``a.T @ b`` with float32 accumulation."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=plan.precision,
                           preferred_element_type=jnp.float32)


def dot_nn(a: jax.Array, b: jax.Array, plan: KernelPlan) -> jax.Array:
    """``a @ b`` with float32 accumulation."""
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=plan.precision,
                           preferred_element_type=jnp.float32)


class PredicateTile(NamedTuple):
    """What a tile needs to apply the mask predicate: whether it must (``partial`` nonzero) and
    the program's batch entry and head."""

    partial: jax.Array
    batch: jax.Array
    head: jax.Array


def predicate_site(plan: KernelPlan):
    """The program's (batch, head) for the mask predicate, or None without one. Read at the top
    of a kernel: interpret mode cannot evaluate program ids inside loops."""
    return batch_and_head(plan) if plan.predicate is not None else None


def listed_partial(plan: KernelPlan, tables, work: RowProgram, step,
                   site) -> PredicateTile | None:
    """The mask-predicate facts of the tile at ``step`` of the program's row list (``site``
    from ``predicate_site``), or None for plans without a predicate."""
    if plan.predicate is None:
        return None
    flag = tables[plan.table_count - 1][work.table_row * plan.max_count + step]
    return PredicateTile(flag, *site)


def _positions(s: jax.Array, q_tile, k_tile, plan: KernelPlan):
    q_pos = q_tile * plan.block_q + lax.broadcasted_iota(jnp.int32, s.shape, 0)
    k_pos = k_tile * plan.block_k + lax.broadcasted_iota(jnp.int32, s.shape, 1)
    return q_pos, k_pos


def _apply_predicate(s: jax.Array, q_tile, k_tile, tile: PredicateTile,
                     plan: KernelPlan) -> jax.Array:
    """Masks a partial tile by the plan's predicate; full tiles pass unchanged, without
    evaluating it. Padding positions are clamped to the last real token, so the predicate only
    sees real indices (padded keys are masked by the bias, padded query rows are cut off)."""
    q_len, k_len = plan.token_lengths

    def evaluate(s):
        q_pos, k_pos = _positions(s, q_tile, k_tile, plan)
        visible = plan.predicate(tile.batch, tile.head, jnp.minimum(q_pos, q_len - 1),
                                 jnp.minimum(k_pos, k_len - 1))
        return jnp.where(visible, s, -jnp.inf)

    return lax.cond(tile.partial != 0, evaluate, lambda s: s, s)


def mask_logits(s: jax.Array, q_tile, k_tile, bias: jax.Array | None,
                plan: KernelPlan, predicate_tile: PredicateTile | None = None) -> jax.Array:
    """Applies the key bias (0 or -inf per key), the causal mask and, on partial tiles (see
    ``listed_partial``), the mask predicate to a [block_q, block_k] tile of base-2 logits."""
    if bias is not None:
        s = s + bias[None, :]
    if plan.causal_offset is not None:
        q_pos, k_pos = _positions(s, q_tile, k_tile, plan)
        s = jnp.where(k_pos <= q_pos + plan.causal_offset, s, -jnp.inf)
    if plan.predicate is not None:
        s = _apply_predicate(s, q_tile, k_tile, predicate_tile, plan)
    return s


def causal_k_end(q_tile, plan: KernelPlan):
    """One past the last key tile that query tile ``q_tile`` can see under causal masking."""
    last_visible = (q_tile + 1) * plan.block_q - 1 + plan.causal_offset
    return jnp.clip(lax.div(last_visible, plan.block_k) + 1, 0, plan.k_tiles)


def causal_q_start(k_tile, plan: KernelPlan):
    """The first query tile that can see key tile ``k_tile`` under causal masking."""
    first_seeing = k_tile * plan.block_k - plan.causal_offset
    return jnp.clip(lax.div(jnp.maximum(first_seeing, 0), plan.block_q), 0, plan.q_tiles)
