"""FlashAttention forward pass as a Pallas kernel (Dao 2023, FlashAttention-2, Algorithm 1).

One program per (query tile, batch, head) keeps its query tile and a float32 accumulator on chip
and streams key/value tiles through an online softmax; it writes the output tile and the row
log-sum-exp (base 2) that the backward pass recomputes probabilities from. Nothing of size
N x N reaches device memory. Block-sparse calls visit only the key tiles their schedule lists.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jaxtyping import Array, Float

from xformers_zoo.kernels.pallas_common import (
    EMPTY_ROW_LSE,
    LOG2_E,
    KernelPlan,
    causal_k_end,
    dot_nn,
    dot_nt,
    grid,
    locate_row,
    mask_logits,
    read_own,
    row_spec,
    whole_array_specs,
    whole_bias_spec,
    whole_spec,
    write_own,
)


def _forward_kernel(*refs, plan: KernelPlan):
    q_ref, k_ref, v_ref, *rest = refs
    bias_ref = rest.pop(0) if plan.has_bias else None
    idx_ref, cnt_ref, order_ref = (rest.pop(0) for _ in range(3)) if plan.sparse else [None] * 3
    o_ref, lse_ref = rest
    q_tile, table_row, own = locate_row(plan, plan.q_tiles, plan.block_q, order_ref)

    q = read_own(q_ref, own)  # [block_q, d]
    block_q, head_dim = q.shape
    scale = plan.scale * LOG2_E
    if plan.sparse:
        start, stop = 0, cnt_ref[table_row]
    else:
        start = 0
        stop = plan.k_tiles if plan.causal_offset is None else causal_k_end(q_tile, plan)

    def visit(step, carry):
        acc, m_prev, l_prev = carry
        k_tile = idx_ref[table_row * plan.max_count + step] if plan.sparse else step
        keys = pl.ds(pl.multiple_of(k_tile * plan.block_k, plan.block_k), plan.block_k)
        s = dot_nt(q, k_ref[keys, :], plan) * scale  # [block_q, block_k]
        bias = bias_ref[keys] if plan.has_bias else None
        s = mask_logits(s, q_tile, k_tile, bias, plan)
        m_next = jnp.maximum(m_prev, s.max(axis=-1))
        # A row that has seen only masked keys keeps m = -inf; shifting by 0 instead keeps
        # exp2(-inf - m) at 0 rather than NaN.
        shift = jnp.where(m_next == -jnp.inf, 0.0, m_next) if plan.masked else m_next
        p = jnp.exp2(s - shift[:, None])
        correction = jnp.exp2(m_prev - shift)
        l_next = l_prev * correction + p.sum(axis=-1)
        v = v_ref[keys, :]
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
    write_own(o_ref, own, acc.astype(o_ref.dtype))
    write_own(lse_ref, own, lse)


def flash_forward(
    q: Float[Array, "b nq h d"],
    k: Float[Array, "b nk h d"],
    v: Float[Array, "b nk h d"],
    bias: Float[Array, "b nk"] | None,
    schedule: tuple[jax.Array, ...] | None,
    plan: KernelPlan,
) -> tuple[Float[Array, "b nq h d"], Float[Array, "b h nq"]]:
    """Output and base-2 log-sum-exp of attention over tile-padded inputs (lengths are
    multiples of the plan's tiles). ``schedule``: flat (indices, counts, order) when sparse."""
    batch, q_len, heads, head_dim = q.shape
    k_len = k.shape[1]
    q_spec = row_spec(plan, plan.block_q, q_len, head_dim)
    in_specs = [q_spec, whole_spec(plan, k_len, head_dim), whole_spec(plan, k_len, head_dim)]
    args = [q, k, v]
    if plan.has_bias:
        in_specs.append(whole_bias_spec(plan, k_len))
        args.append(bias)
    if plan.sparse:
        in_specs += whole_array_specs(schedule)  # tables read by scalar index
        args += list(schedule)
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((batch, heads, q_len), jnp.float32)]
    return pl.pallas_call(
        functools.partial(_forward_kernel, plan=plan),
        grid=grid(plan, plan.q_tiles, batch, heads), in_specs=in_specs,
        out_specs=[q_spec, row_spec(plan, plan.block_q, q_len)], out_shape=out_shape,
        compiler_params=plan.compiler_params(), interpret=plan.interpret,
        name="flash_forward",
    )(*args)
