"""FlashAttention backward for Hopper GPUs in Pallas' Mosaic GPU backend, after FlashAttention-3
(Shah et al. 2024, "FlashAttention-3: Fast and Accurate Attention with Asynchrony and
Low-precision", section 3 and appendix B: the backward pass).

One launch computes all three gradients. A program owns ``2 * block_k`` keys of one (batch,
head) and runs three warpgroups:

* two consumers, each owning ``block_k`` keys: their K and V tiles stay in shared memory for the
  whole program and their dK, dV accumulators ([block_k, D] float32) stay in registers;
* a producer that streams, query tile after query tile, Q and dO ([block_q, D], swizzled) and
  the row statistics LSE and delta ([block_q] float32) into a ring of ``stages`` slots.

Per query tile each consumer works in the transposed ("keys as rows") orientation, so that the
key-side accumulators are wgmma outputs and the probabilities feed wgmma from registers::

    S^T  = K Q^T                      [block_k, block_q]
    P^T  = exp2(S^T * scale * log2(e) - lse[None, :])
    dP^T = V dO^T
    dS^T = P^T * (dP^T - delta[None, :])
    dV  += P^T dO                     (P^T from registers)
    dK  += dS^T Q                     (dS^T from registers; scaled once at the end)

dQ for the tile needs every key of the program: dQ = scale * dS K over all ``2 * block_k``
keys. Both consumers store their dS^T in shared memory and take turns computing the dQ product
(wgmma reading dS^T transposed) over both halves: the consumer whose step it is computes the
whole tile while the other goes on, so neither waits for the other (kernels/NOTES.md has the
designs measured against this one). The result is added into a zero-initialised float32 dQ in
global memory with TMA reduce-adds (``cp.reduce.async.bulk.tensor ... add``): one [block_q, D]
float32 tile per 128 keys travels to L2, as in FlashAttention-3. Five tile products per tile
pair, against seven for the two-launch Triton backward (``pallas_backward``), which
recomputes P in both launches.

Residual conventions are those of ``pallas_backward.flash_backward``: q, k, v, dO are
[b, n, h, d]; ``lse`` is the base-2 log-sum-exp of the scaled logits, [b, h, nq] float32 (what
``mosaic_forward`` returns); delta = rowsum(dO * O) is computed here in XLA. dQ is returned in
float32; the caller casts it.

Serves what the Mosaic forward serves: bf16/fp16, head_dim 16, 32, 64 or 128, and its masks
(``MosaicBackwardPlan.mask``, kernels/pallas_mosaic_mask.py); sequence lengths multiples of the
tiles (the caller pads: padded queries have dO = 0 rows, which contribute nothing). Programs whose
keys all lie past their sequence's length skip the sweep and write zero gradients. A key bias is
read once per consumer, for its own keys (the rows of its tiles). Causal, block-sparse and
predicate masks walk a schedule of the query tiles each key block sees, fully visible ones first
(the stagger rotates those only); the element mask is evaluated on the partial ones, and only
visited query tiles receive a dQ reduce-add.

Attention dropout (``MosaicBackwardPlan.dropout_rate``, keep mask Z, kept weights scaled by
``1 / (1 - rate)``) follows ``pallas_backward``: dV takes the dropped probabilities
``Z P^T / (1 - rate)``, and dP^T is masked and scaled the same way before
``dS^T = P^T * (dP^T - delta)`` (delta = rowsum(dO * O) of the dropped output). The decisions are
``pallas_dropout``'s: each consumer reads its keys' column words once from global memory, in the
row layout of the transposed tiles, and the queries' row words travel with delta (one
[2, block_q] copy per query tile, so shared memory, full at D = 128, grows by nothing). Without
dropout the kernel is traced exactly as before the option existed.

There is no interpret mode (see ``pallas_mosaic_forward``); it is tested on the GPU only.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jaxtyping import Array, Float, Int

from xformers_zoo.kernels.pallas_dropout import keep_outer, position_words
from xformers_zoo.kernels.pallas_in_kernel import LOG2_E
from xformers_zoo.kernels.pallas_mosaic_forward import (
    HEAD_DIMS,
    MOSAIC_DTYPES,
    check_launch,
    fixed_words,
    load_vector,
    swizzled,
)
from xformers_zoo.kernels.pallas_mosaic_mask import (
    MosaicMask,
    MosaicSchedule,
    ScheduleRow,
    check_mask_inputs,
    element_visible,
)

# Consumer warpgroups per program, each owning one key tile (the producer is one more).
KEY_TILES_PER_PROGRAM = 2


@dataclasses.dataclass(frozen=True)
class MosaicBackwardPlan:
    """Static facts of one Mosaic GPU backward launch."""

    scale: float
    mask: MosaicMask = MosaicMask()
    block_q: int = 64  # query rows per streamed tile (N and K of the key-side products)
    block_k: int = 64  # keys per consumer warpgroup (one wgmma M tile)
    stages: int = 2  # query-tile slots in shared memory
    # Start each key block's sweep over the query tiles at a different tile, so that the programs
    # of one head running side by side do not reduce-add into the same dQ rows at the same time.
    stagger: bool = True
    # Keep products in flight while the warpgroup computes (see _kernel's step); False awaits
    # each product group before going on.
    overlap: bool = True
    # Measured 2-5% faster than 232/40 at D = 128 (fewer spills), the same at D = 64.
    consumer_registers: int = 240
    producer_registers: int = 24
    dropout_rate: float = 0.0  # > 0: drop attention weights (the caller passes dropout streams)

    @property
    def keys_per_program(self) -> int:
        """Keys one program covers (the caller pads k to a multiple of this)."""
        return KEY_TILES_PER_PROGRAM * self.block_k

    @property
    def has_lengths(self) -> bool:
        """Whether keys are masked by per-sequence lengths (right padding)."""
        return self.mask.has_lengths


def _kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, extra: dict, dq_ref, dk_ref,
            dv_ref, scratch, *, plan: MosaicBackwardPlan, q_tiles: int, k_programs: int):
    from jax.experimental.pallas import mosaic_gpu as plgpu

    ((k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, ds_smem, dq_smem),
     (k_ready, v_ready), (q_ready, do_ready, lse_ready, delta_ready), free, ds_stored,
     keys_done) = scratch
    batch, head, block = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("k")
    wg = lax.axis_index("wg")
    block_q, block_k, stages = plan.block_q, plan.block_k, plan.stages
    dtype = k_smem.dtype
    head_dim = k_smem.shape[-1]
    program_key0 = block * plan.keys_per_program
    mask = plan.mask
    column_words_ref = extra.get("column_words")
    if mask.sparse:  # the listed query tiles, fully visible ones first
        row = ScheduleRow(mask, extra["tables"], head, block, k_programs)
        full_steps, steps = row.full, row.total
        # The stagger (see MosaicBackwardPlan.stagger) rotates the fully visible tiles.
        first = lax.rem(block, jnp.maximum(full_steps, 1)) if plan.stagger else 0

        def tile_at(i):
            if not plan.stagger:
                return row.tile(i)
            rotated = lax.rem(i + first, jnp.maximum(full_steps, 1))
            return row.tile(jnp.where(i < full_steps, rotated, i))
    else:
        if mask.has_lengths:
            length = extra["lengths"][batch]
            # No key of this program is real: skip the sweep (zero dK, dV and no dQ part).
            steps = lax.select(program_key0 < length, jnp.int32(q_tiles), jnp.int32(0))
        else:
            steps = q_tiles
        full_steps = steps
        # Query tile visited at step i (see MosaicBackwardPlan.stagger).
        first = lax.rem(block, q_tiles) if plan.stagger else 0

        def tile_at(i):
            return lax.rem(i + first, q_tiles) if plan.stagger else i

    @pl.when(wg < KEY_TILES_PER_PROGRAM)
    def _consumer():
        # The consumers hold two [block_k, D] float32 accumulators plus two [block_k, block_q]
        # score tiles; the producer only computes addresses.
        plgpu.set_max_registers(plan.consumer_registers, action="increase")
        k_tile, v_tile, dq_tile = k_smem.at[wg], v_smem.at[wg], dq_smem.at[wg]
        key0 = program_key0 + wg * block_k
        keys = (batch, pl.ds(key0, block_k), head)
        plgpu.copy_gmem_to_smem(k_ref.at[keys], k_tile, k_ready.at[wg])
        plgpu.copy_gmem_to_smem(v_ref.at[keys], v_tile, v_ready.at[wg])
        wgmma_layout = plgpu.Layout.WGMMA
        # Per-query statistics broadcast along the rows (keys) of the transposed tiles.
        column = plgpu.Layout.WGMMA.reduce(0)
        zeros_kd = plgpu.layout_cast(jnp.zeros((block_k, head_dim), jnp.float32), wgmma_layout)
        zeros_qd = plgpu.layout_cast(jnp.zeros((block_q, head_dim), jnp.float32), wgmma_layout)
        log2_scale = plan.scale * LOG2_E
        plgpu.barrier_wait(k_ready.at[wg])
        plgpu.barrier_wait(v_ready.at[wg])
        if plan.dropout_rate:  # keys are the rows of the transposed tiles
            key_words = fixed_words(column_words_ref, batch, head, key0, block_k,
                                    plgpu.Layout.WGMMA.reduce(1))
        if mask.has_bias:  # likewise the keys' bias, read once
            key_bias = load_vector(extra["bias"].at[batch, pl.ds(key0, block_k)],
                                   plgpu.Layout.WGMMA.reduce(1), optimized=False)

        def send_dq(i, dq):
            # The last reduce-add must have finished reading the staging tile (a second staging
            # tile, to skip this wait, measured no faster at D = 64 and 12% slower at D = 128).
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            dq_tile[...] = dq * plan.scale
            plgpu.commit_smem()
            rows = (batch, pl.ds(tile_at(i) * block_q, block_q), head, pl.ds(0, head_dim))
            plgpu.copy_smem_to_gmem(dq_tile, dq_ref.at[rows], reduction_op="add")

        def probabilities(s_t, slot, i, partial: bool):
            plgpu.barrier_wait(lse_ready.at[slot])
            lse = load_vector(lse_smem.at[slot], column)
            t = s_t * log2_scale
            if mask.has_bias:  # -inf on masked keys (rows) gives them zero probability
                t = t + lax.broadcast_in_dim(key_bias, t.shape, [0])
            p_t = jnp.exp2(t - lax.broadcast_in_dim(lse, s_t.shape, [1]))
            if mask.has_lengths:  # keys (rows) at or past the length are padding
                rows = plgpu.broadcasted_iota(jnp.int32, s_t.shape, 0, layout=wgmma_layout)
                p_t = jnp.where(rows < length - key0, p_t, 0.0)
            if partial:  # the element mask, queries along the columns
                k_pos = key0 + plgpu.broadcasted_iota(jnp.int32, s_t.shape, 0,
                                                      layout=wgmma_layout)
                q_pos = tile_at(i) * block_q + plgpu.broadcasted_iota(
                    jnp.int32, s_t.shape, 1, layout=wgmma_layout)
                visible = element_visible(mask, batch, head, q_pos, k_pos, row.flag(i))
                if visible is not None:
                    p_t = jnp.where(visible, p_t, 0.0)
            return p_t

        def score_grads(p_t, dp_t, slot):
            if plan.dropout_rate:  # delta came with the row words (dropout_decisions waited)
                delta = load_vector(delta_smem.at[slot, 0], column)
            else:
                plgpu.barrier_wait(delta_ready.at[slot])
                delta = load_vector(delta_smem.at[slot], column)
            return (p_t * (dp_t - lax.broadcast_in_dim(delta, dp_t.shape, [1]))).astype(dtype)

        def dropout_decisions(slot):
            """Keep decisions of this step's [block_k, block_q] transposed tile, from the
            queries' row words (stored as float32 bits beside delta) and the keys' words."""
            plgpu.barrier_wait(delta_ready.at[slot])
            words = load_vector(delta_smem.at[slot, 1], column)
            return keep_outer(key_words, lax.bitcast_convert_type(words, jnp.int32),
                              plan.dropout_rate)

        def dropped(x, keep):
            """``x`` with dropped weights zeroed and kept ones scaled by ``1 / (1 - rate)``
            (``x`` itself without dropout)."""
            if keep is None:
                return x
            return jnp.where(keep, x * (1.0 / (1.0 - plan.dropout_rate)), 0.0)

        def dq_product(dq_acc, buf):
            """The step's dQ tile from both consumers' dS^T (read transposed)."""
            for j in range(KEY_TILES_PER_PROGRAM):
                plgpu.wgmma(dq_acc, ds_smem.at[buf, j].transpose((1, 0)), k_smem.at[j])

        def share_scores(ds_t, buf):
            """Stores dS^T for the dQ product: consumer ``buf`` (= step parity) computes this
            step's dQ and waits, after its own step, for the other's half."""
            ds_smem.at[buf, wg][...] = ds_t
            plgpu.commit_smem()
            pl.when(wg != buf)(lambda: plgpu.barrier_arrive(ds_stored.at[buf]))

        def step(i, carry, *, partial: bool):
            """With ``overlap``: S^T and dP^T are issued together and P^T computed under dP^T;
            dV is issued as soon as P^T exists and runs under dS^T; dK runs while dS^T is
            exchanged, dQ after it. Without: each group is awaited before the next."""
            slot, buf = lax.rem(i, stages), lax.rem(i, 2)
            q_tile, do_tile = q_smem.at[slot], do_smem.at[slot]
            pending = 1 if plan.overlap else 0
            plgpu.barrier_wait(q_ready.at[slot])
            plgpu.barrier_wait(do_ready.at[slot])

            def body(acc_refs):
                dk_acc, dv_acc, _ = acc_refs

                def scoped(s_acc, dp_acc):
                    plgpu.wgmma(s_acc, k_tile, q_tile.transpose((1, 0)))
                    plgpu.wgmma(dp_acc, v_tile, do_tile.transpose((1, 0)))
                    s_t = plgpu.wgmma_accumulator_load(s_acc, wait_n=pending)
                    p_t = probabilities(s_t, slot, i, partial)
                    keep = dropout_decisions(slot) if plan.dropout_rate else None
                    plgpu.wgmma(dv_acc, dropped(p_t, keep).astype(dtype), do_tile)
                    dp_t = plgpu.wgmma_accumulator_load(dp_acc, wait_n=pending)
                    ds_t = score_grads(p_t, dropped(dp_t, keep), slot)
                    plgpu.wgmma(dk_acc, ds_t, q_tile)
                    if not plan.overlap:
                        plgpu.wgmma_wait(0)
                    share_scores(ds_t, buf)

                pl.run_scoped(scoped, plgpu.ACC((block_k, block_q), jnp.float32),
                              plgpu.ACC((block_k, block_q), jnp.float32))

            dk, dv = carry
            # The third accumulator is never read: it is what remains of the dQ split by columns
            # (removed). Dropping it changes the compiled module (its zeros pass through
            # wgmma fences each step), so it stays until a GPU run measures the kernel without.
            dk, dv, _ = pl.run_state(body)(
                (plgpu.ACC.init(dk), plgpu.ACC.init(dv), plgpu.ACC.init(zeros_qd)))
            plgpu.barrier_arrive(free.at[slot])  # Q, dO, LSE and delta of this slot are used

            @pl.when(wg == buf)
            def _():
                plgpu.barrier_wait(ds_stored.at[buf])
                dq = pl.run_state(lambda acc: dq_product(acc, buf))(plgpu.ACC.init(zeros_qd))
                send_dq(i, dq)
            return dk, dv

        carry = lax.fori_loop(0, full_steps, functools.partial(step, partial=False),
                              (zeros_kd, zeros_kd))
        if mask.sparse:  # the schedule's partial tiles
            carry = lax.fori_loop(full_steps, steps, functools.partial(step, partial=True),
                                  carry)
        dk, dv = carry
        v_tile[...] = dv.astype(dtype)  # V is read by this consumer only: stage dV there
        # K is read by both consumers' dQ products: stage dK there once both are done.
        plgpu.barrier_arrive(keys_done)
        plgpu.barrier_wait(keys_done)
        k_tile[...] = (dk * plan.scale).astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(k_tile, dk_ref.at[keys], commit_group=False)
        plgpu.copy_smem_to_gmem(v_tile, dv_ref.at[keys], commit_group=False)
        plgpu.commit_smem_to_gmem_group()
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == KEY_TILES_PER_PROGRAM)
    def _producer():
        plgpu.set_max_registers(plan.producer_registers, action="decrease")

        def fetch(i, slot):
            tile = tile_at(i)
            rows = (batch, pl.ds(tile * block_q, block_q), head)
            stats = (batch, head, pl.ds(tile * block_q, block_q))
            plgpu.copy_gmem_to_smem(q_ref.at[rows], q_smem.at[slot], q_ready.at[slot])
            plgpu.copy_gmem_to_smem(lse_ref.at[stats], lse_smem.at[slot], lse_ready.at[slot])
            plgpu.copy_gmem_to_smem(do_ref.at[rows], do_smem.at[slot], do_ready.at[slot])
            if plan.dropout_rate:  # delta and the row words in one copy
                stats = (batch, head, slice(None), pl.ds(tile * block_q, block_q))
            plgpu.copy_gmem_to_smem(delta_ref.at[stats], delta_smem.at[slot],
                                    delta_ready.at[slot])

        for i in range(stages):  # stages <= q_tiles (mosaic_backward clamps it)
            pl.when(i < steps)(lambda i=i: fetch(i, i))

        # One iteration per step, the refill of the slot step j freed guarded by a condition:
        # the same waits and copies in the same order as a loop over the refills alone
        # (range(stages, steps)), but measured 7-8% faster at D = 128 (16K keys: 4.802
        # against 5.216 ms; D = 64 unchanged). ptxas allocates the whole
        # kernel's registers differently with it: 80 bytes of spill stores against 100.
        @pl.loop(0, steps)
        def _(j):
            i = j + stages

            @pl.when(i < steps)
            def _():
                slot = lax.rem(i, stages)
                plgpu.barrier_wait(free.at[slot])  # both consumers are done with step j
                fetch(i, slot)


def mosaic_backward(
    q: Float[Array, "b nq h d"],
    k: Float[Array, "b nk h d"],
    v: Float[Array, "b nk h d"],
    out: Float[Array, "b nq h d"],
    lse: Float[Array, "b h nq"],
    d_out: Float[Array, "b nq h d"],
    lengths: Int[Array, " b"] | None,
    plan: MosaicBackwardPlan,
    streams: Int[Array, " bh"] | None = None,
    bias: Float[Array, "b nk"] | None = None,
    schedule: MosaicSchedule | None = None,
) -> tuple[Float[Array, "b nq h d"], Float[Array, "b nk h d"], Float[Array, "b nk h d"]]:
    """Gradients (dq float32, dk and dv in the input dtype) of softmax attention; ``nq`` a
    multiple of ``plan.block_q`` and ``nk`` of ``plan.keys_per_program``. Exactly what
    ``plan.mask`` and ``plan.dropout_rate`` ask for is passed: ``lengths`` (int32, one per
    sequence) counts each sequence's real keys; ``bias`` (float32, 0 or -inf per key) masks keys
    of any pattern; ``schedule`` (``pallas_mosaic_mask.mosaic_schedule`` by key, over
    ``block_q`` x ``keys_per_program`` tiles) lists the query tiles of each key block;
    ``streams`` are the forward's dropout streams."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    batch, q_len, heads, head_dim = q.shape
    k_len = k.shape[1]
    if str(q.dtype) not in MOSAIC_DTYPES or head_dim not in HEAD_DIMS:
        raise ValueError(f"mosaic backward: dtype must be one of {MOSAIC_DTYPES} and head_dim "
                         f"one of {HEAD_DIMS}, got {q.dtype} and {head_dim}")
    check_launch("mosaic backward", q_len, plan.block_q, k_len, plan.keys_per_program,
                 plan.has_lengths, lengths, plan.dropout_rate, streams)
    q_tiles = q_len // plan.block_q
    k_programs = k_len // plan.keys_per_program
    check_mask_inputs("mosaic backward", plan.mask, bias, schedule, k_programs)
    plan = dataclasses.replace(plan, stages=min(plan.stages, q_tiles))
    # delta = rowsum(dO * O): one fused XLA reduction (a product and sum, not a dot, which XLA
    # would hand to its GEMM emitters), [b, h, nq] float32.
    delta = (d_out.astype(jnp.float32) * out.astype(jnp.float32)).sum(-1).transpose(0, 2, 1)
    column_words = None
    if plan.dropout_rate:  # delta and the queries' row words (as float32 bits): [b, h, 2, nq]
        row_words, column_words = position_words(streams, batch, heads, q_len, k_len)
        delta = jnp.stack([delta, lax.bitcast_convert_type(row_words, jnp.float32)], axis=2)
    lse = lse.astype(jnp.float32)
    dtype = q.dtype
    tile = swizzled(head_dim, dtype)  # 128-byte swizzle for D >= 64

    args = {"lengths": None if lengths is None else lengths.astype(jnp.int32),
            "bias": None if bias is None else bias.astype(jnp.float32),
            "tables": None if schedule is None else schedule.tables(),
            "column_words": column_words}
    args = {name: value for name, value in args.items() if value is not None}

    def entry(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs):
        extra = jax.tree.unflatten(jax.tree.structure(args), refs[:-3])
        dq_ref, dk_ref, dv_ref = refs[-3:]
        buffers = (
            plgpu.SMEM((KEY_TILES_PER_PROGRAM, plan.block_k, head_dim), dtype, **tile),  # K
            plgpu.SMEM((KEY_TILES_PER_PROGRAM, plan.block_k, head_dim), dtype, **tile),  # V
            plgpu.SMEM((plan.stages, plan.block_q, head_dim), dtype, **tile),  # Q
            plgpu.SMEM((plan.stages, plan.block_q, head_dim), dtype, **tile),  # dO
            plgpu.SMEM((plan.stages, plan.block_q), jnp.float32),  # LSE
            plgpu.SMEM((plan.stages, *((2,) if plan.dropout_rate else ()), plan.block_q),
                       jnp.float32),  # delta (and the row words, with dropout)
            # dS^T of both consumers, two steps deep: one consumer may store the next step's
            # while the other still reads this step's.
            plgpu.SMEM((2, KEY_TILES_PER_PROGRAM, plan.block_k, plan.block_q), dtype, **tile),
            plgpu.SMEM((KEY_TILES_PER_PROGRAM, plan.block_q, head_dim), jnp.float32,
                       **swizzled(head_dim, jnp.float32)),  # dQ staging
        )
        kv_loaded = (plgpu.Barrier(num_barriers=KEY_TILES_PER_PROGRAM),) * 2
        q_loaded = (plgpu.Barrier(num_barriers=plan.stages),) * 4
        released = plgpu.Barrier(num_arrivals=KEY_TILES_PER_PROGRAM, num_barriers=plan.stages)
        ds_stored = plgpu.Barrier(num_arrivals=1, num_barriers=2)
        keys_done = plgpu.Barrier(num_arrivals=KEY_TILES_PER_PROGRAM)
        pl.run_scoped(
            lambda *scratch: _kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, extra,
                                     dq_ref, dk_ref, dv_ref, scratch, plan=plan,
                                     q_tiles=q_tiles, k_programs=k_programs),
            buffers, kv_loaded, q_loaded, released, ds_stored, keys_done, collective_axes="wg")

    mesh = plgpu.Mesh(grid=(heads, k_programs, batch),
                      grid_names=("heads", "k", "batch"), num_threads=KEY_TILES_PER_PROGRAM + 1,
                      thread_name="wg")
    call = pl.kernel(
        entry,
        out_type=(jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)),
        mesh=mesh, compiler_params=plgpu.CompilerParams(approx_math=True),
        name="mosaic_flash_backward")
    # dQ is summed over all key blocks by TMA reduce-adds: a zero-initialised buffer that the
    # kernel updates in place (a mutable array, aliased to the kernel's output).
    dq = jax.new_ref(jnp.zeros(q.shape, jnp.float32))
    dk, dv = call(q, k, v, d_out, lse, delta, *jax.tree.leaves(args), dq)
    return jax.freeze(dq), dk, dv
