"""FlashAttention backward pass as two Pallas kernels (Dao 2023, FlashAttention-2, Algorithm 2,
with the key/value and query loops split into two launches so no program needs atomics).

Probabilities are recomputed tile by tile from the saved base-2 log-sum-exp:
``p = exp2(s - lse)``, ``dv += p^T dO``, ``dp = dO v^T``, ``ds = p (dp - delta)`` with
``delta = rowsum(dO * O)``, then ``dk += scale ds^T q`` (one program per key tile, looping over
query tiles) and ``dq += scale ds k`` (one program per query tile, looping over key tiles).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jaxtyping import Array, Float

from xformers_zoo.kernels.pallas_common import (
    LOG2_E,
    KernelPlan,
    bias_row_spec,
    causal_k_end,
    causal_q_start,
    dot_nn,
    dot_nt,
    dot_tn,
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


def _probabilities_and_score_grads(q, k, v, do, lse, delta, q_tile, k_tile, bias, plan):
    """For one (query tile, key tile): probabilities p and logit gradients ds, [block_q, block_k]
    float32 (ds without the softmax scale)."""
    s = dot_nt(q, k, plan) * (plan.scale * LOG2_E)
    s = mask_logits(s, q_tile, k_tile, bias, plan)
    p = jnp.exp2(s - lse[:, None])
    dp = dot_nt(do, v, plan)
    return p, p * (dp - delta[:, None])


def _key_value_grads_kernel(*refs, plan: KernelPlan):
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest = refs
    bias_ref = rest.pop(0) if plan.has_bias else None
    idx_ref, cnt_ref, order_ref = (rest.pop(0) for _ in range(3)) if plan.sparse else [None] * 3
    dk_ref, dv_ref = rest
    k_tile, table_row, own = locate_row(plan, plan.k_tiles, plan.block_k, order_ref)
    k = read_own(k_ref, own)  # [block_k, d]
    v = read_own(v_ref, own)
    bias = read_own(bias_ref, own) if plan.has_bias else None  # [block_k]

    if plan.sparse:
        start, stop = 0, cnt_ref[table_row]
    else:
        start = 0 if plan.causal_offset is None else causal_q_start(k_tile, plan)
        stop = plan.q_tiles

    def visit(step, carry):
        dk, dv = carry
        q_tile = idx_ref[table_row * plan.max_count + step] if plan.sparse else step
        rows = pl.ds(pl.multiple_of(q_tile * plan.block_q, plan.block_q), plan.block_q)
        q = q_ref[rows, :]
        do = do_ref[rows, :]
        p, ds = _probabilities_and_score_grads(q, k, v, do, lse_ref[rows], delta_ref[rows],
                                               q_tile, k_tile, bias, plan)
        dv = dv + dot_tn(p.astype(do.dtype), do, plan)
        dk = dk + dot_tn(ds.astype(q.dtype), q, plan)
        return dk, dv

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(start, stop, visit, (zeros, zeros))
    write_own(dk_ref, own, (dk * plan.scale).astype(dk_ref.dtype))
    write_own(dv_ref, own, dv.astype(dv_ref.dtype))


def _query_grads_kernel(*refs, plan: KernelPlan):
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest = refs
    bias_ref = rest.pop(0) if plan.has_bias else None
    idx_ref, cnt_ref, order_ref = (rest.pop(0) for _ in range(3)) if plan.sparse else [None] * 3
    (dq_ref,) = rest
    q_tile, table_row, own = locate_row(plan, plan.q_tiles, plan.block_q, order_ref)
    q = read_own(q_ref, own)  # [block_q, d]
    do = read_own(do_ref, own)
    lse = read_own(lse_ref, own)
    delta = read_own(delta_ref, own)

    if plan.sparse:
        start, stop = 0, cnt_ref[table_row]
    else:
        start = 0
        stop = plan.k_tiles if plan.causal_offset is None else causal_k_end(q_tile, plan)

    def visit(step, dq):
        k_tile = idx_ref[table_row * plan.max_count + step] if plan.sparse else step
        keys = pl.ds(pl.multiple_of(k_tile * plan.block_k, plan.block_k), plan.block_k)
        k = k_ref[keys, :]
        bias = bias_ref[keys] if plan.has_bias else None
        _, ds = _probabilities_and_score_grads(q, k, v_ref[keys, :], do, lse, delta,
                                               q_tile, k_tile, bias, plan)
        return dq + dot_nn(ds.astype(k.dtype), k, plan)

    dq = lax.fori_loop(start, stop, visit, jnp.zeros(q.shape, jnp.float32))
    write_own(dq_ref, own, (dq * plan.scale).astype(dq_ref.dtype))


def flash_backward(
    q: Float[Array, "b nq h d"],
    k: Float[Array, "b nk h d"],
    v: Float[Array, "b nk h d"],
    out: Float[Array, "b nq h d"],
    lse: Float[Array, "b h nq"],
    d_out: Float[Array, "b nq h d"],
    bias: Float[Array, "b nk"] | None,
    schedules: tuple[tuple[jax.Array, ...] | None, tuple[jax.Array, ...] | None],
    plans: tuple[KernelPlan, KernelPlan],
) -> tuple[Float[Array, "b nq h d"], Float[Array, "b nk h d"], Float[Array, "b nk h d"]]:
    """Gradients of q, k, v over tile-padded inputs. ``plans``: the key/value-gradient and
    query-gradient kernels' plans; ``schedules``: for sparse plans, their flat tables (query
    tiles per key tile, key tiles per query tile)."""
    batch, q_len, heads, head_dim = q.shape
    k_len = k.shape[1]
    # delta = rowsum(dO * O): one cheap fused XLA reduction, [b, h, nq] float32.
    delta = jnp.einsum("bqhd,bqhd->bhq", d_out.astype(jnp.float32), out.astype(jnp.float32))
    (kv_plan, q_plan), (by_key, by_query) = plans, (s or () for s in schedules)

    # Key/value gradients: a program per key tile.
    plan = kv_plan
    k_spec = row_spec(plan, plan.block_k, k_len, head_dim)
    specs = [whole_spec(plan, q_len, head_dim), k_spec, k_spec, whole_spec(plan, q_len, head_dim),
             whole_spec(plan, q_len), whole_spec(plan, q_len)]
    args = [q, k, v, d_out, lse, delta]
    if plan.has_bias:
        specs.append(bias_row_spec(plan, plan.block_k, k_len))
        args.append(bias)
    specs += whole_array_specs(by_key)
    args += list(by_key)
    dk, dv = pl.pallas_call(
        functools.partial(_key_value_grads_kernel, plan=plan),
        grid=grid(plan, plan.k_tiles, batch, heads), in_specs=specs, out_specs=[k_spec, k_spec],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=plan.compiler_params(), interpret=plan.interpret,
        name="flash_backward_dkdv",
    )(*args)

    # Query gradients: a program per query tile.
    plan = q_plan
    q_spec = row_spec(plan, plan.block_q, q_len, head_dim)
    stats_spec = row_spec(plan, plan.block_q, q_len)
    specs = [q_spec, whole_spec(plan, k_len, head_dim), whole_spec(plan, k_len, head_dim), q_spec,
             stats_spec, stats_spec]
    args = [q, k, v, d_out, lse, delta]
    if plan.has_bias:
        specs.append(whole_bias_spec(plan, k_len))
        args.append(bias)
    specs += whole_array_specs(by_query)
    args += list(by_query)
    dq = pl.pallas_call(
        functools.partial(_query_grads_kernel, plan=plan),
        grid=grid(plan, plan.q_tiles, batch, heads), in_specs=specs, out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=plan.compiler_params(), interpret=plan.interpret,
        name="flash_backward_dq",
    )(*args)
    return dq, dk, dv
