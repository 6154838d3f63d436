"""FlashAttention forward pass as a Pallas kernel (Dao 2023, FlashAttention-2, Algorithm 1).

One program per (query tile, batch, head) keeps its query tile and a float32 accumulator on chip
and streams key/value tiles through an online softmax; it writes the output tile and the row
log-sum-exp (base 2) that the backward pass recomputes probabilities from. Nothing of size
N x N reaches device memory. Block-sparse calls visit only the key tiles their schedule lists;
long rows may be split over several programs whose partial results are merged afterwards
(kernels/pallas_split.py). With dropout, weights are dropped after the softmax statistics, so the
log-sum-exp is that of the undropped softmax (kernels/pallas_dropout.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jaxtyping import Array, Float, Int

from xformers_zoo.kernels.pallas_dropout import keep_tile
from xformers_zoo.kernels.pallas_in_kernel import (
    EMPTY_ROW_LSE,
    LOG2_E,
    batch_and_head,
    causal_k_end,
    dot_nn,
    dot_nt,
    listed_partial,
    listed_tile,
    locate_row,
    mask_logits,
    predicate_site,
    read_own,
    store_result,
)
from xformers_zoo.kernels.pallas_schedule import (
    KernelPlan,
    TileSchedule,
    grid,
    row_spec,
    whole_array_specs,
    whole_bias_spec,
    whole_spec,
)
from xformers_zoo.kernels.pallas_split import merge_softmax_parts, partial_outputs


def _forward_kernel(*refs, plan: KernelPlan, heads: int):
    q_ref, k_ref, v_ref, *rest = refs
    bias_ref = rest.pop(0) if plan.has_bias else None
    stream_ref = rest.pop(0) if plan.dropout_rate else None
    tables = [rest.pop(0) for _ in range(plan.table_count)]
    o_ref, lse_ref, *part_refs = rest  # part_refs: partial (O, LSE) of split rows
    work = locate_row(plan, plan.q_tiles, plan.block_q, tables)
    q_tile = work.tile

    q = read_own(q_ref, work.own)  # [block_q, d]
    block_q, head_dim = q.shape
    scale = plan.scale * LOG2_E
    if plan.sparse:
        start, stop = work.steps
    else:
        start = 0
        stop = plan.k_tiles if plan.causal_offset is None else causal_k_end(q_tile, plan)
    if plan.dropout_rate:
        batch, head = batch_and_head(plan)
        stream = stream_ref[batch * heads + head]
    site = predicate_site(plan)

    def visit(step, carry):
        acc, m_prev, l_prev = carry
        k_tile = listed_tile(plan, tables, work, step)
        keys = pl.ds(pl.multiple_of(k_tile * plan.block_k, plan.block_k), plan.block_k)
        s = dot_nt(q, k_ref[keys, :], plan) * scale  # [block_q, block_k]
        bias = bias_ref[keys] if plan.has_bias else None
        tile = listed_partial(plan, tables, work, step, site)
        s = mask_logits(s, q_tile, k_tile, bias, plan, tile)
        m_next = jnp.maximum(m_prev, s.max(axis=-1))
        # A row that has seen only masked keys keeps m = -inf; shifting by 0 instead keeps
        # exp2(-inf - m) at 0 rather than NaN.
        shift = jnp.where(m_next == -jnp.inf, 0.0, m_next) if plan.masked else m_next
        p = jnp.exp2(s - shift[:, None])
        correction = jnp.exp2(m_prev - shift)
        l_next = l_prev * correction + p.sum(axis=-1)
        v = v_ref[keys, :]
        if plan.dropout_rate:  # the softmax sum above counts every weight, kept or not
            keep = keep_tile(stream, q_tile, k_tile, plan.block_q, plan.block_k,
                             plan.dropout_rate)
            p = jnp.where(keep, p, 0.0)
        acc = acc * correction[:, None] + dot_nn(p.astype(v.dtype), v, plan)
        return acc, m_next, l_next

    init = (jnp.zeros((block_q, head_dim), jnp.float32),
            jnp.full((block_q,), -jnp.inf, jnp.float32), jnp.zeros((block_q,), jnp.float32))
    acc, m, total = lax.fori_loop(start, stop, visit, init)
    if plan.masked:
        seen = total > 0.0
        total = jnp.where(seen, total, 1.0)
        acc = acc / total[:, None]
        lse = jnp.where(seen, m + jnp.log2(total), EMPTY_ROW_LSE)
    else:
        acc = acc / total[:, None]
        lse = m + jnp.log2(total)
    if plan.dropout_rate:  # kept weights scale by 1 / (1 - rate); the LSE stays undropped
        acc = acc * (1.0 / (1.0 - plan.dropout_rate))
    part_o, part_lse = part_refs or (None, None)
    store_result(work, plan.block_q, o_ref, part_o, acc)
    store_result(work, plan.block_q, lse_ref, part_lse, lse)


def flash_forward(
    q: Float[Array, "b nq h d"],
    k: Float[Array, "b nk h d"],
    v: Float[Array, "b nk h d"],
    bias: Float[Array, "b nk"] | None,
    streams: Int[Array, " bh"] | None,
    schedule: TileSchedule | None,
    plan: KernelPlan,
) -> tuple[Float[Array, "b nq h d"], Float[Array, "b h nq"]]:
    """Output and base-2 log-sum-exp of attention over tile-padded inputs (lengths are
    multiples of the plan's tiles). ``streams``: dropout stream words when the plan drops;
    ``schedule``: the host tile schedule when sparse."""
    batch, q_len, heads, head_dim = q.shape
    k_len = k.shape[1]
    q_spec = row_spec(plan, plan.block_q, q_len, head_dim)
    in_specs = [q_spec, whole_spec(plan, k_len, head_dim), whole_spec(plan, k_len, head_dim)]
    args = [q, k, v]
    if plan.has_bias:
        in_specs.append(whole_bias_spec(plan, k_len))
        args.append(bias)
    tables = ([streams] if plan.dropout_rate else []) + (
        list(schedule.flat()) if plan.sparse else [])
    in_specs += whole_array_specs(tables)  # read by scalar index
    args += tables
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((batch, heads, q_len), jnp.float32)]
    out_specs = [q_spec, row_spec(plan, plan.block_q, q_len)]
    if plan.split:
        out_shape += [partial_outputs(q.shape, plan.split_slots, plan.block_q),
                      partial_outputs(q.shape, plan.split_slots, plan.block_q, stats=True)]
        size = plan.split_slots * plan.block_q
        out_specs += [whole_spec(plan, size, head_dim), whole_spec(plan, size)]
    out, lse, *parts = pl.pallas_call(
        functools.partial(_forward_kernel, plan=plan, heads=heads),
        grid=grid(plan, plan.q_tiles, batch, heads), in_specs=in_specs,
        out_specs=out_specs, out_shape=out_shape,
        compiler_params=plan.compiler_params(), interpret=plan.interpret,
        name="flash_forward",
    )(*args)
    if plan.split:
        out, lse = merge_softmax_parts(out, lse, *parts, schedule.split, plan.block_q)
    return out, lse
