"""FlashAttention forward for Hopper GPUs in Pallas' Mosaic GPU backend, after FlashAttention-3
(Shah et al. 2024, "FlashAttention-3: Fast and Accurate Attention with Asynchrony and
Low-precision", sections 3.1-3.2).

One program (thread block) serves two query tiles of one (batch, head) with three warpgroups:
a producer streams key/value tiles by TMA into a ring of shared-memory slots, and two consumers
each own a query tile, multiply on the tensor cores (wgmma) and keep the online softmax in
registers. The consumers take turns through a two-party barrier so that one's softmax (the
exponentials) runs while the other's matrix products are in flight ("ping-pong" scheduling).

It serves bf16/fp16 at head_dim 16, 32, 64 or 128. Masks (``MosaicPlan.mask``,
kernels/pallas_mosaic_mask.py): right padding as per-sequence lengths (key tiles past a
sequence's length are not visited), any other key mask as a streamed per-key bias, and causal
masking, block masks and token-level mask predicates by a host schedule that lists each query
tile pair's visible key tiles, fully visible ones first: those run as unmasked tiles, and only
the partial ones evaluate the element mask. Its outputs (O and the base-2 log-sum-exp) match
``pallas_forward``'s, so the same backward kernels follow it. ``pallas_attention`` decides when it
runs (kernels/NOTES.md).

Attention dropout (``MosaicPlan.dropout_rate``) takes the decisions of ``pallas_dropout``: each
consumer reads its query rows' words once from global memory, in the accumulator's row layout,
and the producer streams each key tile's column words beside the keys; per element one multiply
and compare (``keep_outer``). As in ``pallas_forward``, the softmax sum counts every weight, the
dropped ones are zeroed before the value product, and the output is scaled by
``1 / (1 - rate)``, so the log-sum-exp is that of the undropped softmax. Without dropout the
kernel is traced exactly as before the option existed.

There is no interpret mode: Pallas' GPU interpreter (JAX 0.10-0.11) evaluates neither wgmma on a
transposed shared-memory operand nor accumulators seeded from registers, so this kernel is
tested on the GPU only (``gpu`` marker).
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
from xformers_zoo.kernels.pallas_in_kernel import EMPTY_ROW_LSE, LOG2_E
from xformers_zoo.kernels.pallas_mosaic_mask import (
    MosaicMask,
    MosaicSchedule,
    ScheduleRow,
    check_mask_inputs,
    element_visible,
    tiles_rejects,
)

HEAD_DIMS = (16, 32, 64, 128)
MOSAIC_DTYPES = ("bfloat16", "float16")
# Consumer warpgroups per program, each owning one query tile (the producer is one more).
QUERY_TILES_PER_PROGRAM = 2
BLOCK_Q = 64  # query rows per consumer warpgroup (one wgmma M tile)
BLOCK_K = 128  # keys per streamed tile (64 measured 12-20% slower)


@dataclasses.dataclass(frozen=True)
class MosaicPlan:
    """Static facts of one Mosaic GPU forward launch."""

    scale: float
    mask: MosaicMask = MosaicMask()
    block_q: int = BLOCK_Q
    block_k: int = BLOCK_K
    stages: int = 2  # key/value slots in shared memory
    dropout_rate: float = 0.0  # > 0: drop attention weights (the caller passes dropout streams)

    @property
    def rows_per_program(self) -> int:
        """Query rows one program covers (the wrapper pads q to a multiple of this)."""
        return QUERY_TILES_PER_PROGRAM * self.block_q

    @property
    def has_lengths(self) -> bool:
        """Whether keys are masked by per-sequence lengths (right padding)."""
        return self.mask.has_lengths


def swizzled(columns: int, dtype) -> dict:
    """Tiling and swizzle transforms for a shared-memory tile whose rows (or the column groups
    read separately) hold ``columns`` elements: the widest swizzle (<= 128 bytes) that they
    fill, the layout wgmma reads without bank conflicts."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    itemsize = jnp.dtype(dtype).itemsize
    swizzle = min(128, columns * itemsize)
    return dict(transforms=(plgpu.TilingTransform((8, swizzle // itemsize)),
                            plgpu.SwizzleTransform(swizzle)))


def check_launch(kernel: str, q_len: int, q_multiple: int, k_len: int, k_multiple: int,
                 has_lengths: bool, lengths, dropout_rate: float = 0.0, streams=None) -> None:
    """Raises unless q and k lengths are whole multiples of a Mosaic kernel's tiles and
    ``lengths`` is given exactly when the plan expects it (the caller pads), and likewise
    dropout ``streams`` exactly when the plan drops (at a rate in [0, 1))."""
    if q_len % q_multiple or k_len % k_multiple:
        raise ValueError(f"{kernel}: q length {q_len} must be a multiple of {q_multiple} and "
                         f"k length {k_len} of {k_multiple}")
    if has_lengths != (lengths is not None):
        raise ValueError(f"{kernel}: lengths must be given exactly when the plan has them")
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"{kernel}: dropout_rate must be in [0, 1), got {dropout_rate}")
    if (dropout_rate > 0.0) != (streams is not None):
        raise ValueError(f"{kernel}: dropout streams must be given exactly when the plan's "
                         f"dropout_rate is above 0")


def load_vector(ref, layout, *, optimized: bool = True):
    """Loads a whole vector ref in ``layout`` (JAX 0.10 takes an index argument, 0.11
    deprecates it). Global-memory refs need ``optimized=False`` (element-wise loads)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    try:
        return plgpu.load(ref, layout=layout, optimized=optimized)
    except TypeError:
        return plgpu.load(ref, (), layout=layout, optimized=optimized)


def fixed_words(words_ref, batch, head, start, size: int, layout):
    """The dropout words of one (batch, head)'s positions ``start .. start + size`` that a
    consumer uses for its whole sweep, read once from global memory straight into ``layout``
    (the kernels' shared memory is kept for what streams)."""
    return load_vector(words_ref.at[batch, head, pl.ds(start, size)], layout, optimized=False)


def mosaic_rejects(dtype: str, head_dim: int, tiles=None) -> str | None:
    """Why the Mosaic kernels cannot serve a call (the Triton kernels then do), or None:
    ``tiles`` is its tile-granular mask (a block mask or a predicate's tiles), which must
    refine to both passes' tiles. Dropout and every other mask are served; whether they run
    here by default is ``pallas_attention``'s choice."""
    if dtype not in MOSAIC_DTYPES:
        return f"dtype must be one of {MOSAIC_DTYPES}, got {dtype}"
    if head_dim not in HEAD_DIMS:
        return f"head_dim must be one of {HEAD_DIMS}, got {head_dim}"
    return tiles_rejects(tiles, QUERY_TILES_PER_PROGRAM * BLOCK_Q, BLOCK_K)


def _kernel(q_ref, k_ref, v_ref, extra: dict, o_ref, lse_ref, scratch, *, plan: MosaicPlan,
            k_tiles: int, q_programs: int):
    from jax.experimental.pallas import mosaic_gpu as plgpu

    (q_smem, k_smem, v_smem, lse_smem), (q_ready, k_ready, v_ready), (k_free, v_free), turn = (
        scratch[:4])
    streamed = list(scratch[4:])  # rings filled beside the keys: dropout words, key bias
    if plan.dropout_rate:  # row and column words of the dropout decisions; the column ring
        (row_words_ref, column_words_ref), (column_smem, column_ready) = (extra["words"],
                                                                         streamed.pop(0))
    mask = plan.mask
    if mask.has_bias:  # the key bias ring
        bias_ref, (bias_smem, bias_ready) = extra["bias"], streamed.pop(0)
    batch, head = lax.axis_index("batch"), lax.axis_index("heads")
    wg = lax.axis_index("wg")
    block_q, block_k, stages = plan.block_q, plan.block_k, plan.stages
    dtype = q_smem.dtype
    key_tile = lambda i: i  # noqa: E731 - dense: step i visits key tile i
    if mask.sparse:  # the listed key tiles, fully visible ones first
        row = ScheduleRow(mask, extra["tables"], head, lax.axis_index("q"), q_programs)
        full_steps, steps, key_tile = row.full, row.total, row.tile
    elif mask.has_lengths:
        length = extra["lengths"][batch]
        full_steps = lax.div(length, block_k)
        steps = lax.div(length + block_k - 1, block_k)
    else:
        full_steps = steps = k_tiles

    def take_turn():
        plgpu.barrier_arrive(turn)
        plgpu.barrier_wait(turn)

    @pl.when(wg < QUERY_TILES_PER_PROGRAM)
    def _consumer():
        # The producer needs few registers; the consumers hold accumulators and probabilities.
        plgpu.set_max_registers(232, action="increase")
        q_tile, lse_tile = q_smem.at[wg], lse_smem.at[wg]
        row0 = (lax.axis_index("q") * QUERY_TILES_PER_PROGRAM + wg) * block_q
        plgpu.copy_gmem_to_smem(q_ref.at[batch, pl.ds(row0, block_q), head], q_tile,
                                q_ready.at[wg])
        plgpu.barrier_wait(q_ready.at[wg])
        head_dim = q_tile.shape[-1]
        row_layout = plgpu.Layout.WGMMA.reduce(1)
        m = plgpu.layout_cast(jnp.full((block_q,), -jnp.inf, jnp.float32), row_layout)
        total = plgpu.layout_cast(jnp.zeros((block_q,), jnp.float32), row_layout)
        acc = plgpu.layout_cast(jnp.zeros((block_q, head_dim), jnp.float32),
                                plgpu.Layout.WGMMA)
        log2_scale = plan.scale * LOG2_E  # logits in base-2 units, as pallas_forward's
        if plan.dropout_rate:
            row_words = fixed_words(row_words_ref, batch, head, row0, block_q, row_layout)

        @pl.when(steps > 0)
        def _():
            plgpu.barrier_wait(k_ready.at[0])

        # The second consumer starts one turn late, so the two alternate from here on.
        pl.when(wg == 1)(take_turn)

        def masked_logits(s, i, bias, partial: bool):
            """Base-2 logits of a tile under the key bias and, on partial tiles, the element
            mask; a row may be -inf throughout."""
            t = s * log2_scale
            if bias is not None:
                t = t + lax.broadcast_in_dim(bias, t.shape, [1])
            if partial:
                q_pos = row0 + plgpu.broadcasted_iota(jnp.int32, s.shape, 0,
                                                      layout=plgpu.Layout.WGMMA)
                k_pos = key_tile(i) * block_k + plgpu.broadcasted_iota(
                    jnp.int32, s.shape, 1, layout=plgpu.Layout.WGMMA)
                visible = element_visible(mask, batch, head, q_pos, k_pos, row.flag(i))
                if visible is not None:
                    t = jnp.where(visible, t, -jnp.inf)
            return t

        def step(i, carry, *, partial: bool):
            acc, m, total = carry
            slot = lax.rem(i, stages)

            def logits(acc_ref):
                plgpu.wgmma(acc_ref, q_tile, k_smem.at[slot].transpose((1, 0)))
                take_turn()  # the other consumer's exponentials run under this product
                return acc_ref[...]

            s = pl.run_scoped(logits, plgpu.ACC((block_q, block_k), jnp.float32))  # [bq, bk]
            if plan.dropout_rate:  # in registers before the slot is released with the keys
                plgpu.barrier_wait(column_ready.at[slot])
                column_words = load_vector(column_smem.at[slot], plgpu.Layout.WGMMA.reduce(0))
            bias = None
            if mask.has_bias:  # likewise the keys' bias
                plgpu.barrier_wait(bias_ready.at[slot])
                bias = load_vector(bias_smem.at[slot], plgpu.Layout.WGMMA.reduce(0))
            plgpu.barrier_arrive(k_free.at[slot])
            if mask.has_bias or (partial and mask.sparse):  # rows may see no key here
                t = masked_logits(s, i, bias, partial)
                m_next = jnp.maximum(m, t.max(axis=1))
                # A row with no visible key yet keeps m = -inf; exponentials against 0 give
                # it zero weights instead of NaN.
                m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)
                correction = jnp.exp2(m - m_safe)
                p = jnp.exp2(t - lax.broadcast_in_dim(m_safe, t.shape, [0]))
            else:
                if partial:  # the one tile that holds the sequence's last keys
                    cols = plgpu.broadcasted_iota(jnp.int32, s.shape, 1,
                                                  layout=plgpu.Layout.WGMMA)
                    s = jnp.where(cols + i * block_k < length, s, -jnp.inf)
                m_next = jnp.maximum(m, s.max(axis=1) * log2_scale)
                correction = jnp.exp2(m - m_next)
                p = jnp.exp2(s * log2_scale - lax.broadcast_in_dim(m_next, s.shape, [0]))
            acc = acc * lax.broadcast_in_dim(correction, acc.shape, [0])
            total = total * correction + p.sum(axis=1)
            if plan.dropout_rate:  # the sum above counts every weight, kept or not
                p = jnp.where(keep_outer(row_words, column_words, plan.dropout_rate), p, 0.0)
            p_in = p.astype(dtype)
            # Pin the softmax before the turn hand-over: measured faster in FA-3 style kernels.
            acc, total, m_next, p_in = lax.optimization_barrier((acc, total, m_next, p_in))
            plgpu.barrier_arrive(turn)
            plgpu.barrier_wait(v_ready.at[slot])
            plgpu.barrier_wait(turn)

            def wait_next_keys():
                @pl.when(i + 1 < steps)
                def _():
                    plgpu.barrier_wait(k_ready.at[lax.rem(i + 1, stages)])

            def values(acc_ref):
                plgpu.wgmma(acc_ref, p_in, v_smem.at[slot])
                wait_next_keys()

            acc = pl.run_state(values)(plgpu.ACC.init(acc))
            plgpu.barrier_arrive(v_free.at[slot])
            return acc, m_next, total

        carry = lax.fori_loop(0, full_steps, functools.partial(step, partial=False),
                              (acc, m, total))
        if mask.has_lengths or mask.sparse:  # the last tile, or the schedule's partial tiles
            carry = lax.fori_loop(full_steps, steps, functools.partial(step, partial=True),
                                  carry)
        acc, m, total = carry
        pl.when(wg == 0)(take_turn)  # balances the second consumer's early turn

        if mask.has_lengths or mask.may_empty_rows:  # rows that saw no key: output 0, empty LSE
            seen = total > 0.0
            total = jnp.where(seen, total, 1.0)
            lse = jnp.where(seen, m + jnp.log(total) * LOG2_E, EMPTY_ROW_LSE)
        else:
            lse = m + jnp.log(total) * LOG2_E
        if plan.dropout_rate:  # kept weights scale by 1 / (1 - rate); the LSE stays undropped
            total = total * (1.0 - plan.dropout_rate)
        acc = acc / lax.broadcast_in_dim(total, acc.shape, [0])
        q_tile[...] = acc.astype(dtype)  # the query tile's slot is free: stage O there
        lse_tile[...] = lse
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_tile, o_ref.at[batch, pl.ds(row0, block_q), head])
        plgpu.copy_smem_to_gmem(lse_tile, lse_ref.at[batch, head, pl.ds(row0, block_q)])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == QUERY_TILES_PER_PROGRAM)
    def _producer():
        plgpu.set_max_registers(40, action="decrease")

        def fetch_keys(i, slot):
            first = key_tile(i) * block_k
            keys = (batch, pl.ds(first, block_k), head)
            plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smem.at[slot], k_ready.at[slot])
            if plan.dropout_rate:  # the tile's column words share the keys' slot
                plgpu.copy_gmem_to_smem(column_words_ref.at[batch, head, pl.ds(first, block_k)],
                                        column_smem.at[slot], column_ready.at[slot])
            if mask.has_bias:  # and so does its bias
                plgpu.copy_gmem_to_smem(bias_ref.at[batch, pl.ds(first, block_k)],
                                        bias_smem.at[slot], bias_ready.at[slot])
            return keys

        def fetch(i, slot):
            keys = fetch_keys(i, slot)
            plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem.at[slot], v_ready.at[slot])

        for i in range(stages):
            pl.when(i < steps)(functools.partial(fetch, i, i))

        @pl.loop(stages, jnp.maximum(steps, stages))
        def _(i):
            slot = lax.rem(i, stages)
            # Both consumers must have released the slot (keys and values separately, so the
            # next keys land while the last values are still being read).
            plgpu.barrier_wait(k_free.at[slot])
            keys = fetch_keys(i, slot)
            plgpu.barrier_wait(v_free.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem.at[slot], v_ready.at[slot])


def mosaic_forward(
    q: Float[Array, "b nq h d"],
    k: Float[Array, "b nk h d"],
    v: Float[Array, "b nk h d"],
    lengths: Int[Array, " b"] | None,
    plan: MosaicPlan,
    streams: Int[Array, " bh"] | None = None,
    bias: Float[Array, "b nk"] | None = None,
    schedule: MosaicSchedule | None = None,
) -> tuple[Float[Array, "b nq h d"], Float[Array, "b h nq"]]:
    """Output and base-2 log-sum-exp of attention; ``nq`` a multiple of
    ``plan.rows_per_program`` and ``nk`` of ``plan.block_k``. Exactly what ``plan.mask`` and
    ``plan.dropout_rate`` ask for is passed: ``lengths`` (int32, one per sequence) counts the
    real keys of each sequence (the rest are padding); ``bias`` (float32, 0 or -inf per key)
    masks keys of any pattern; ``schedule`` (``pallas_mosaic_mask.mosaic_schedule`` over
    ``rows_per_program`` x ``block_k`` tiles) lists the key tiles of each query tile pair;
    ``streams`` (``pallas_dropout.head_streams``) seed the dropout decisions."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    batch, q_len, heads, head_dim = q.shape
    k_len = k.shape[1]
    check_launch("mosaic forward", q_len, plan.rows_per_program, k_len, plan.block_k,
                 plan.has_lengths, lengths, plan.dropout_rate, streams)
    q_programs = q_len // plan.rows_per_program
    check_mask_inputs("mosaic forward", plan.mask, bias, schedule, q_programs)
    k_tiles = k_len // plan.block_k
    plan = dataclasses.replace(plan, stages=min(plan.stages, k_tiles))
    tile = swizzled(head_dim, q.dtype)  # 128-byte swizzle for D >= 64
    args = {"lengths": None if lengths is None else lengths.astype(jnp.int32),
            "bias": None if bias is None else bias.astype(jnp.float32),
            "tables": None if schedule is None else schedule.tables(),
            "words": (position_words(streams, batch, heads, q_len, k_len)
                      if plan.dropout_rate else None)}
    args = {name: value for name, value in args.items() if value is not None}

    def entry(q_ref, k_ref, v_ref, *refs):
        extra = jax.tree.unflatten(jax.tree.structure(args), refs[:-2])
        o_ref, lse_ref = refs[-2:]
        buffers = (plgpu.SMEM((QUERY_TILES_PER_PROGRAM, plan.block_q, head_dim), q.dtype, **tile),
                   plgpu.SMEM((plan.stages, plan.block_k, head_dim), k.dtype, **tile),
                   plgpu.SMEM((plan.stages, plan.block_k, head_dim), v.dtype, **tile),
                   plgpu.SMEM((QUERY_TILES_PER_PROGRAM, plan.block_q), jnp.float32))
        loaded = (plgpu.Barrier(num_barriers=QUERY_TILES_PER_PROGRAM),
                  plgpu.Barrier(num_barriers=plan.stages),
                  plgpu.Barrier(num_barriers=plan.stages))
        released = (plgpu.Barrier(num_arrivals=QUERY_TILES_PER_PROGRAM,
                                  num_barriers=plan.stages),) * 2
        turn = plgpu.Barrier(num_arrivals=QUERY_TILES_PER_PROGRAM)
        rings = []  # one slot per key tile in flight: dropout column words, key bias
        for dtype, wanted in ((jnp.int32, plan.dropout_rate), (jnp.float32, plan.mask.has_bias)):
            if wanted:
                rings.append((plgpu.SMEM((plan.stages, plan.block_k), dtype),
                              plgpu.Barrier(num_barriers=plan.stages)))
        pl.run_scoped(
            lambda *scratch: _kernel(q_ref, k_ref, v_ref, extra, o_ref, lse_ref, scratch,
                                     plan=plan, k_tiles=k_tiles, q_programs=q_programs),
            buffers, loaded, released, turn, *rings, collective_axes="wg")

    call = plgpu.kernel(
        entry,
        out_type=(jax.ShapeDtypeStruct(q.shape, q.dtype),
                  jax.ShapeDtypeStruct((batch, heads, q_len), jnp.float32)),
        grid=(heads, q_programs, batch), grid_names=("heads", "q", "batch"),
        num_threads=QUERY_TILES_PER_PROGRAM + 1, thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True))
    return call(q, k, v, *jax.tree.leaves(args))
