"""FlashAttention backward pass as two Pallas kernels (Dao 2023, FlashAttention-2, Algorithm 2,
with the key/value and query loops split into two launches so no program needs atomics).

Probabilities are recomputed tile by tile from the saved base-2 log-sum-exp:
``p = exp2(s - lse)``, ``dv += p^T dO``, ``dp = dO v^T``, ``ds = p (dp - delta)`` with
``delta = rowsum(dO * O)``, then ``dk += scale ds^T q`` (one program per key tile, looping over
query tiles) and ``dq += scale ds k`` (one program per query tile, looping over key tiles).

With dropout (keep mask Z, kept weights scaled by ``1 / (1 - rate)``), FlashAttention-2's
backward uses the dropped probabilities for ``dv`` and masks ``dp`` the same way; ``delta`` stays
``rowsum(dO * O)`` of the dropped output, which equals ``rowsum(p * dp)`` of the masked ``dp``.
Long rows of block-sparse schedules may be split over several programs whose partial sums are
added afterwards (kernels/pallas_split.py).
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
    LOG2_E,
    batch_and_head,
    causal_k_end,
    causal_q_start,
    dot_nn,
    dot_nt,
    dot_tn,
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
    bias_row_spec,
    grid,
    row_spec,
    whole_array_specs,
    whole_bias_spec,
    whole_spec,
)
from xformers_zoo.kernels.pallas_split import add_partial_sums, partial_outputs


def _probabilities_and_score_grads(q, k, v, do, lse, delta, q_tile, k_tile, bias, stream, plan,
                                   partial):
    """For one (query tile, key tile): the probabilities that weigh the values (dropped, with
    dropout) and the logit gradients ds, [block_q, block_k] float32 (ds without the softmax
    scale). ``partial``: whether the tile evaluates the mask predicate (None: no predicate)."""
    s = dot_nt(q, k, plan) * (plan.scale * LOG2_E)
    s = mask_logits(s, q_tile, k_tile, bias, plan, partial)
    p = jnp.exp2(s - lse[:, None])
    dp = dot_nt(do, v, plan)
    if plan.dropout_rate:
        keep = keep_tile(stream, q_tile, k_tile, plan.block_q, plan.block_k, plan.dropout_rate)
        inverse = 1.0 / (1.0 - plan.dropout_rate)
        dp = jnp.where(keep, dp * inverse, 0.0)
        return jnp.where(keep, p * inverse, 0.0), p * (dp - delta[:, None])
    return p, p * (dp - delta[:, None])


def _unpack(refs, plan: KernelPlan, heads: int):
    """Splits a backward kernel's refs into (q, k, v, dO, lse, delta), the key bias, the
    program's dropout stream word, the schedule tables and the outputs; also gives the
    program's mask-predicate site (``predicate_site``)."""
    inputs, rest = refs[:6], list(refs[6:])
    bias_ref = rest.pop(0) if plan.has_bias else None
    stream = None
    if plan.dropout_rate:
        batch, head = batch_and_head(plan)
        stream = rest.pop(0)[batch * heads + head]
    tables = [rest.pop(0) for _ in range(plan.table_count)]
    return inputs, bias_ref, stream, tables, rest, predicate_site(plan)


def _key_value_grads_kernel(*refs, plan: KernelPlan, heads: int):
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), bias_ref, stream, tables, outs, site = (
        _unpack(refs, plan, heads))
    dk_ref, dv_ref, *part_refs = outs  # part_refs: partial dk, dv of split rows
    work = locate_row(plan, plan.k_tiles, plan.block_k, tables)
    k_tile = work.tile
    k = read_own(k_ref, work.own)  # [block_k, d]
    v = read_own(v_ref, work.own)
    bias = read_own(bias_ref, work.own) if plan.has_bias else None  # [block_k]

    if plan.sparse:
        start, stop = work.steps
    else:
        start = 0 if plan.causal_offset is None else causal_q_start(k_tile, plan)
        stop = plan.q_tiles

    def visit(step, carry):
        dk, dv = carry
        q_tile = listed_tile(plan, tables, work, step)
        rows = pl.ds(pl.multiple_of(q_tile * plan.block_q, plan.block_q), plan.block_q)
        q = q_ref[rows, :]
        do = do_ref[rows, :]
        p, ds = _probabilities_and_score_grads(q, k, v, do, lse_ref[rows], delta_ref[rows],
                                               q_tile, k_tile, bias, stream, plan,
                                               listed_partial(plan, tables, work, step, site))
        dv = dv + dot_tn(p.astype(do.dtype), do, plan)
        dk = dk + dot_tn(ds.astype(q.dtype), q, plan)
        return dk, dv

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(start, stop, visit, (zeros, zeros))
    part_dk, part_dv = part_refs or (None, None)
    store_result(work, plan.block_k, dk_ref, part_dk, dk * plan.scale)
    store_result(work, plan.block_k, dv_ref, part_dv, dv)


def _query_grads_kernel(*refs, plan: KernelPlan, heads: int):
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), bias_ref, stream, tables, outs, site = (
        _unpack(refs, plan, heads))
    dq_ref, *part_refs = outs  # part_refs: partial dq of split rows
    work = locate_row(plan, plan.q_tiles, plan.block_q, tables)
    q_tile = work.tile
    q = read_own(q_ref, work.own)  # [block_q, d]
    do = read_own(do_ref, work.own)
    lse = read_own(lse_ref, work.own)
    delta = read_own(delta_ref, work.own)

    if plan.sparse:
        start, stop = work.steps
    else:
        start = 0
        stop = plan.k_tiles if plan.causal_offset is None else causal_k_end(q_tile, plan)

    def visit(step, dq):
        k_tile = listed_tile(plan, tables, work, step)
        keys = pl.ds(pl.multiple_of(k_tile * plan.block_k, plan.block_k), plan.block_k)
        k = k_ref[keys, :]
        bias = bias_ref[keys] if plan.has_bias else None
        _, ds = _probabilities_and_score_grads(q, k, v_ref[keys, :], do, lse, delta,
                                               q_tile, k_tile, bias, stream, plan,
                                               listed_partial(plan, tables, work, step, site))
        return dq + dot_nn(ds.astype(k.dtype), k, plan)

    dq = lax.fori_loop(start, stop, visit, jnp.zeros(q.shape, jnp.float32))
    store_result(work, plan.block_q, dq_ref, part_refs[0] if part_refs else None,
                 dq * plan.scale)


def _extra_inputs(plan: KernelPlan, streams, schedule: TileSchedule | None) -> list:
    """The dropout stream words and schedule tables a launch reads by scalar index."""
    return ([streams] if plan.dropout_rate else []) + (
        list(schedule.flat()) if plan.sparse else [])


def _launch(kernel, plan: KernelPlan, schedule: TileSchedule | None, streams, *, rows: int,
            block: int, in_specs: list, args: list, outputs: list[jax.ShapeDtypeStruct],
            out_spec, heads: int, name: str) -> list[jax.Array]:
    """One backward launch of ``rows`` row tiles: appends the dropout streams and schedule tables
    to the inputs and, for split schedules, float32 partial outputs that are added back into
    the ``outputs`` (all [b, n, h, d], each a row tile per program) afterwards."""
    extra = _extra_inputs(plan, streams, schedule)
    out_specs, out_shape = [out_spec] * len(outputs), list(outputs)
    if plan.split:
        size = plan.split_slots * block
        out_specs += [whole_spec(plan, size, out_spec.block_shape[-1])] * len(outputs)
        out_shape += [partial_outputs(outputs[0].shape, plan.split_slots, block)] * len(outputs)
    batch = args[0].shape[0]
    results = pl.pallas_call(
        functools.partial(kernel, plan=plan, heads=heads),
        grid=grid(plan, rows, batch, heads), in_specs=in_specs + whole_array_specs(extra),
        out_specs=out_specs, out_shape=out_shape, compiler_params=plan.compiler_params(),
        interpret=plan.interpret, name=name,
    )(*args, *extra)
    main, parts = results[: len(outputs)], results[len(outputs):]
    if plan.split:
        main = [add_partial_sums(r, p, schedule.split, block) for r, p in zip(main, parts,
                                                                               strict=True)]
    return list(main)


def flash_backward(
    q: Float[Array, "b nq h d"],
    k: Float[Array, "b nk h d"],
    v: Float[Array, "b nk h d"],
    out: Float[Array, "b nq h d"],
    lse: Float[Array, "b h nq"],
    d_out: Float[Array, "b nq h d"],
    bias: Float[Array, "b nk"] | None,
    streams: Int[Array, " bh"] | None,
    schedules: tuple[TileSchedule | None, TileSchedule | None],
    plans: tuple[KernelPlan, KernelPlan],
) -> tuple[Float[Array, "b nq h d"], Float[Array, "b nk h d"], Float[Array, "b nk h d"]]:
    """Gradients of q, k, v over tile-padded inputs. ``plans``: the key/value-gradient and
    query-gradient kernels' plans; ``schedules``: for sparse plans, their host schedules (query
    tiles per key tile, key tiles per query tile); ``streams``: dropout stream words when the
    plans drop."""
    _, q_len, heads, head_dim = q.shape
    k_len = k.shape[1]
    # delta = rowsum(dO * O): one cheap fused XLA reduction, [b, h, nq] float32.
    delta = jnp.einsum("bqhd,bqhd->bhq", d_out.astype(jnp.float32), out.astype(jnp.float32))
    (kv_plan, q_plan), (by_key, by_query) = plans, schedules

    # Key/value gradients: a program per key tile.
    plan = kv_plan
    k_spec = row_spec(plan, plan.block_k, k_len, head_dim)
    specs = [whole_spec(plan, q_len, head_dim), k_spec, k_spec, whole_spec(plan, q_len, head_dim),
             whole_spec(plan, q_len), whole_spec(plan, q_len)]
    args = [q, k, v, d_out, lse, delta]
    if plan.has_bias:
        specs.append(bias_row_spec(plan, plan.block_k, k_len))
        args.append(bias)
    dk, dv = _launch(_key_value_grads_kernel, plan, by_key, streams, rows=plan.k_tiles,
                     block=plan.block_k, in_specs=specs, args=args,
                     outputs=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                              jax.ShapeDtypeStruct(v.shape, v.dtype)],
                     out_spec=k_spec, heads=heads, name="flash_backward_dkdv")

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
    (dq,) = _launch(_query_grads_kernel, plan, by_query, streams, rows=plan.q_tiles,
                    block=plan.block_q, in_specs=specs, args=args,
                    outputs=[jax.ShapeDtypeStruct(q.shape, q.dtype)], out_spec=q_spec,
                    heads=heads, name="flash_backward_dq")
    return dq, dk, dv
