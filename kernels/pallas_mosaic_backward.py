"""FlashAttention backward for Hopper GPUs in Pallas' Mosaic GPU backend, after FlashAttention-3
(Shah et al. 2024, "FlashAttention-3: Fast and Accurate Attention with Asynchrony and
Low-precision", section 3 and appendix B: the backward pass).

One launch computes all three gradients. A program owns a key block of ``2 * block_k`` keys of
one (batch, head) and runs three warpgroups:

* two consumers, each owning ``block_k`` keys: their K and V tiles stay in shared memory for the
  whole program and their dK, dV accumulators ([block_k, D] float32) stay in registers;
* a producer that streams, query tile after query tile, Q and dO ([block_q, D], 128-byte swizzled)
  and the row statistics LSE and delta ([block_q] float32) into a ring of ``stages`` slots.

Per query tile each consumer works in the transposed ("keys as rows") orientation, so that the
key-side accumulators are wgmma outputs and the probabilities can feed wgmma from registers::

    S^T  = K Q^T                      [block_k, block_q]
    P^T  = exp2(S^T * scale * log2(e) - lse[None, :])
    dP^T = V dO^T
    dS^T = P^T * (dP^T - delta[None, :])
    dV  += P^T dO                     (P^T from registers)
    dK  += dS^T Q                     (dS^T from registers; scaled once at the end)
    dQ_i = scale * (dS^T)^T K         (dS^T from shared memory, read transposed by wgmma)

That is five tile products per tile pair, against seven for the two-launch Triton backward
(``pallas_backward``), which recomputes P in both launches. dQ is not owned by any program: each
consumer adds its [block_q, D] float32 part into a zero-initialised global dQ with a TMA
reduce-add (``cp.reduce.async.bulk.tensor ... add``), one bulk operation per tile instead of the
per-element atomics that made a fused Triton design slow. dQ is returned in float32; the caller
casts it.

Residual conventions are those of ``pallas_backward.flash_backward``: q, k, v, dO are
[b, n, h, d]; ``lse`` is the base-2 log-sum-exp of the scaled logits, [b, h, nq] float32 (what
``mosaic_forward`` returns); delta = rowsum(dO * O) is computed here in XLA.

It serves the dense case only: bf16/fp16, head_dim 64 or 128, non-causal, no masks, sequence
lengths multiples of the tiles (the caller pads; padded keys would need a mask, padded queries
need dO = 0 rows, which give zero contributions).

There is no interpret mode (see ``pallas_mosaic_forward``); it is tested on the GPU only. Not yet
used by ``pallas_attention``: kernels/NOTES.md (v7) has its timings and an unexplained
intermittent stall seen in the small GPU test cases.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jaxtyping import Array, Float

HEAD_DIMS = (64, 128)
CONSUMERS = 2  # key tiles (warpgroups) per program
_LOG2E = 1.0 / math.log(2.0)


@dataclasses.dataclass(frozen=True)
class MosaicBackwardPlan:
    """Static facts of one Mosaic GPU backward launch."""

    scale: float
    block_q: int = 64  # query rows per streamed tile (N and K of the key-side products)
    block_k: int = 64  # keys per consumer warpgroup (one wgmma M tile)
    stages: int = 2  # query-tile slots in shared memory
    # Swizzle the float32 dQ staging tile: the WGMMA register layout stores into an unswizzled
    # [block_q, D] float32 tile with 8-way bank conflicts.
    dq_swizzle: bool = True
    # Start each key block's sweep over the query tiles at a different tile, so that the programs
    # of one head running side by side do not reduce-add into the same dQ rows at the same time.
    stagger: bool = True
    # Keep products in flight while the warpgroup computes (see _kernel's step_overlapped);
    # False awaits each of three product groups per step before going on.
    overlap: bool = True
    # Timing diagnostic only (gives a wrong dQ): skip the dQ reduce-adds, to measure their cost.
    skip_dq_store: bool = False
    consumer_registers: int = 232
    producer_registers: int = 40

    @property
    def keys_per_program(self) -> int:
        return CONSUMERS * self.block_k


def _load(ref, layout):
    """Loads a whole shared-memory vector in ``layout`` (JAX 0.10 takes an index argument,
    0.11 deprecates it)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    try:
        return plgpu.load(ref, layout=layout)
    except TypeError:
        return plgpu.load(ref, (), layout=layout)


def _kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, dk_ref, dv_ref, scratch, *,
            plan: MosaicBackwardPlan, q_tiles: int):
    from jax.experimental.pallas import mosaic_gpu as plgpu

    ((k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, ds_smem, dq_smem),
     (k_ready, v_ready), (q_ready, do_ready, lse_ready, delta_ready), free) = scratch
    batch, head, block = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("k")
    wg = lax.axis_index("wg")
    block_q, block_k, stages = plan.block_q, plan.block_k, plan.stages
    dtype = k_smem.dtype
    # Query tile visited at step i (see MosaicBackwardPlan.stagger).
    first = lax.rem(block, q_tiles) if plan.stagger else 0

    def tile_at(i):
        return lax.rem(i + first, q_tiles) if plan.stagger else i

    @pl.when(wg < CONSUMERS)
    def _consumer():
        # The consumers hold two [block_k, D] float32 accumulators plus two [block_k, block_q]
        # score tiles; the producer only computes addresses.
        plgpu.set_max_registers(plan.consumer_registers, action="increase")
        k_tile, v_tile = k_smem.at[wg], v_smem.at[wg]
        ds_tile, dq_tile = ds_smem.at[wg], dq_smem.at[wg]
        key0 = (block * CONSUMERS + wg) * block_k
        keys = (batch, pl.ds(key0, block_k), head)
        plgpu.copy_gmem_to_smem(k_ref.at[keys], k_tile, k_ready.at[wg])
        plgpu.copy_gmem_to_smem(v_ref.at[keys], v_tile, v_ready.at[wg])
        head_dim = k_tile.shape[-1]
        wgmma_layout = plgpu.Layout.WGMMA
        # Per-query statistics broadcast along the rows (keys) of the transposed tiles.
        column = plgpu.Layout.WGMMA.reduce(0)
        zeros_kd = plgpu.layout_cast(jnp.zeros((block_k, head_dim), jnp.float32), wgmma_layout)
        zeros_kq = plgpu.layout_cast(jnp.zeros((block_k, block_q), jnp.float32), wgmma_layout)
        zeros_qd = plgpu.layout_cast(jnp.zeros((block_q, head_dim), jnp.float32), wgmma_layout)
        log2_scale = plan.scale * _LOG2E
        plgpu.barrier_wait(k_ready.at[wg])
        plgpu.barrier_wait(v_ready.at[wg])

        def send_dq(i, dq):
            if plan.skip_dq_store:
                return
            # The last reduce-add must have finished reading the staging tile.
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            dq_tile[...] = dq * plan.scale
            plgpu.commit_smem()
            rows = (batch, pl.ds(tile_at(i) * block_q, block_q), head)
            plgpu.copy_smem_to_gmem(dq_tile, dq_ref.at[rows], reduction_op="add")

        def probabilities(s_t, slot):
            plgpu.barrier_wait(lse_ready.at[slot])
            lse = _load(lse_smem.at[slot], column)
            return jnp.exp2(s_t * log2_scale - lax.broadcast_in_dim(lse, s_t.shape, [1]))

        def score_grads(p_t, dp_t, slot):
            plgpu.barrier_wait(delta_ready.at[slot])
            delta = _load(delta_smem.at[slot], column)
            ds_t = (p_t * (dp_t - lax.broadcast_in_dim(delta, dp_t.shape, [1]))).astype(dtype)
            # dQ needs dS (queries as rows): wgmma reads the stored dS^T tile transposed. The
            # previous step's dQ product has completed (its result was read), so the tile is free.
            ds_tile[...] = ds_t
            plgpu.commit_smem()
            return ds_t

        def step_serial(i, carry):
            """Three wgmma groups per step, each awaited before the next: S; dV and dP; dK and
            dQ."""
            dk, dv = carry
            slot = lax.rem(i, stages)
            q_tile, do_tile = q_smem.at[slot], do_smem.at[slot]
            plgpu.barrier_wait(q_ready.at[slot])

            def scores(acc_ref):
                plgpu.wgmma(acc_ref, k_tile, q_tile.transpose((1, 0)))
                return acc_ref[...]

            s_t = pl.run_scoped(scores, plgpu.ACC((block_k, block_q), jnp.float32))
            p_t = probabilities(s_t, slot)
            p_in = p_t.astype(dtype)
            plgpu.barrier_wait(do_ready.at[slot])

            def values(refs):
                dv_acc, dp_acc = refs
                plgpu.wgmma(dv_acc, p_in, do_tile)
                plgpu.wgmma(dp_acc, v_tile, do_tile.transpose((1, 0)))

            dv, dp_t = pl.run_state(values)((plgpu.ACC.init(dv), plgpu.ACC.init(zeros_kq)))
            ds_t = score_grads(p_t, dp_t, slot)

            def grads(refs):
                dk_acc, dq_acc = refs
                plgpu.wgmma(dk_acc, ds_t, q_tile)
                plgpu.wgmma(dq_acc, ds_tile.transpose((1, 0)), k_tile)

            dk, dq = pl.run_state(grads)((plgpu.ACC.init(dk), plgpu.ACC.init(zeros_qd)))
            plgpu.barrier_arrive(free.at[slot])  # Q, dO, LSE and delta of this slot are used
            send_dq(i, dq)
            return dk, dv

        def step_overlapped(i, carry):
            """The products in flight while the warpgroup computes: S^T and dP^T are issued
            together and P^T is computed under dP^T; dV is issued as soon as P^T exists and
            runs under dS^T; dK and dQ are issued together."""
            slot = lax.rem(i, stages)
            q_tile, do_tile = q_smem.at[slot], do_smem.at[slot]
            plgpu.barrier_wait(q_ready.at[slot])
            plgpu.barrier_wait(do_ready.at[slot])

            def body(acc_refs):
                dk_acc, dv_acc, dq_acc = acc_refs

                def scoped(s_acc, dp_acc):
                    plgpu.wgmma(s_acc, k_tile, q_tile.transpose((1, 0)))
                    plgpu.wgmma(dp_acc, v_tile, do_tile.transpose((1, 0)))
                    # Wait for S^T only: dP^T stays in flight under the exponentials.
                    p_t = probabilities(plgpu.wgmma_accumulator_load(s_acc, wait_n=1), slot)
                    plgpu.wgmma(dv_acc, p_t.astype(dtype), do_tile)
                    dp_t = plgpu.wgmma_accumulator_load(dp_acc, wait_n=1)  # dV may still run
                    ds_t = score_grads(p_t, dp_t, slot)
                    plgpu.wgmma(dk_acc, ds_t, q_tile)
                    plgpu.wgmma(dq_acc, ds_tile.transpose((1, 0)), k_tile)

                pl.run_scoped(scoped, plgpu.ACC((block_k, block_q), jnp.float32),
                              plgpu.ACC((block_k, block_q), jnp.float32))

            dk, dv = carry
            dk, dv, dq = pl.run_state(body)(
                (plgpu.ACC.init(dk), plgpu.ACC.init(dv), plgpu.ACC.init(zeros_qd)))
            plgpu.barrier_arrive(free.at[slot])
            send_dq(i, dq)
            return dk, dv

        step = step_overlapped if plan.overlap else step_serial
        dk, dv = lax.fori_loop(0, q_tiles, step, (zeros_kd, zeros_kd))
        # K and V tiles are no longer read: stage the results there.
        k_tile[...] = (dk * plan.scale).astype(dtype)
        v_tile[...] = dv.astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(k_tile, dk_ref.at[keys], commit_group=False)
        plgpu.copy_smem_to_gmem(v_tile, dv_ref.at[keys], commit_group=False)
        plgpu.commit_smem_to_gmem_group()
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == CONSUMERS)
    def _producer():
        plgpu.set_max_registers(plan.producer_registers, action="decrease")

        def fetch(i, slot):
            tile = tile_at(i)
            rows = (batch, pl.ds(tile * block_q, block_q), head)
            stats = (batch, head, pl.ds(tile * block_q, block_q))
            plgpu.copy_gmem_to_smem(q_ref.at[rows], q_smem.at[slot], q_ready.at[slot])
            plgpu.copy_gmem_to_smem(lse_ref.at[stats], lse_smem.at[slot], lse_ready.at[slot])
            plgpu.copy_gmem_to_smem(do_ref.at[rows], do_smem.at[slot], do_ready.at[slot])
            plgpu.copy_gmem_to_smem(delta_ref.at[stats], delta_smem.at[slot],
                                    delta_ready.at[slot])

        for i in range(stages):  # stages <= q_tiles (mosaic_backward clamps it)
            fetch(i, i)

        @pl.loop(stages, q_tiles)
        def _(i):
            slot = lax.rem(i, stages)
            plgpu.barrier_wait(free.at[slot])  # both consumers are done with the slot
            fetch(i, slot)


def mosaic_backward(
    q: Float[Array, "b nq h d"],
    k: Float[Array, "b nk h d"],
    v: Float[Array, "b nk h d"],
    out: Float[Array, "b nq h d"],
    lse: Float[Array, "b h nq"],
    d_out: Float[Array, "b nq h d"],
    scale: float,
    plan: MosaicBackwardPlan | None = None,
) -> tuple[Float[Array, "b nq h d"], Float[Array, "b nk h d"], Float[Array, "b nk h d"]]:
    """Gradients (dq float32, dk and dv in the input dtype) of dense non-causal softmax attention;
    ``nq`` a multiple of ``plan.block_q`` and ``nk`` of ``plan.keys_per_program``."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    plan = plan or MosaicBackwardPlan(scale=scale)
    plan = dataclasses.replace(plan, scale=scale)
    batch, q_len, heads, head_dim = q.shape
    k_len = k.shape[1]
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"mosaic backward: head_dim must be one of {HEAD_DIMS}, got {head_dim}")
    if q_len % plan.block_q or k_len % plan.keys_per_program:
        raise ValueError(f"mosaic backward: q length {q_len} must be a multiple of "
                         f"{plan.block_q} and k length {k_len} of {plan.keys_per_program}")
    q_tiles = q_len // plan.block_q
    plan = dataclasses.replace(plan, stages=min(plan.stages, q_tiles))
    # delta = rowsum(dO * O): one fused XLA reduction, [b, h, nq] float32.
    delta = jnp.einsum("bqhd,bqhd->bhq", d_out.astype(jnp.float32), out.astype(jnp.float32))
    lse = lse.astype(jnp.float32)

    # 128-byte swizzled tiles: the layout wgmma reads from shared memory without bank conflicts.
    swizzled = dict(transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)))
    dq_transforms = (dict(transforms=(plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(128)))
                     if plan.dq_swizzle else {})
    dtype = q.dtype

    def entry(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, dk_ref, dv_ref):
        buffers = (
            plgpu.SMEM((CONSUMERS, plan.block_k, head_dim), dtype, **swizzled),  # K
            plgpu.SMEM((CONSUMERS, plan.block_k, head_dim), dtype, **swizzled),  # V
            plgpu.SMEM((plan.stages, plan.block_q, head_dim), dtype, **swizzled),  # Q
            plgpu.SMEM((plan.stages, plan.block_q, head_dim), dtype, **swizzled),  # dO
            plgpu.SMEM((plan.stages, plan.block_q), jnp.float32),  # LSE
            plgpu.SMEM((plan.stages, plan.block_q), jnp.float32),  # delta
            plgpu.SMEM((CONSUMERS, plan.block_k, plan.block_q), dtype, **swizzled),  # dS^T
            plgpu.SMEM((CONSUMERS, plan.block_q, head_dim), jnp.float32, **dq_transforms),  # dQ
        )
        kv_loaded = (plgpu.Barrier(num_barriers=CONSUMERS),) * 2
        q_loaded = (plgpu.Barrier(num_barriers=plan.stages),) * 4
        released = plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=plan.stages)
        pl.run_scoped(
            lambda *scratch: _kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref,
                                     dk_ref, dv_ref, scratch, plan=plan, q_tiles=q_tiles),
            buffers, kv_loaded, q_loaded, released, collective_axes="wg")

    mesh = plgpu.Mesh(grid=(heads, k_len // plan.keys_per_program, batch),
                      grid_names=("heads", "k", "batch"), num_threads=CONSUMERS + 1,
                      thread_name="wg")
    call = pl.kernel(
        entry,
        out_type=(jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)),
        mesh=mesh, compiler_params=plgpu.CompilerParams(approx_math=True),
        name="mosaic_flash_backward")
    # dQ is summed over all key blocks by TMA reduce-adds: a zero-initialised buffer that the
    # kernel updates in place (a mutable array, aliased to the kernel's output).
    dq = jax.new_ref(jnp.zeros(q.shape, jnp.float32))
    dk, dv = call(q, k, v, d_out, lse, delta, dq)
    return jax.freeze(dq), dk, dv
