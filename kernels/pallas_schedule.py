"""Host side of the Pallas FlashAttention kernels (Dao 2023, "FlashAttention-2: Faster
Attention with Better Parallelism and Work Partitioning"): the static plan of one launch, the tile
schedules that make block-sparse attention skip empty tiles (numpy, built once per mask and plan),
and the launch grid and block specs that hand each program its tiles. What runs inside the
kernels is in ``pallas_in_kernel``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from xformers_zoo.kernels.block_mask import BlockMask
from xformers_zoo.kernels.mask_predicate import MaskPredicate, refine_tiles


@dataclasses.dataclass(frozen=True)
class KernelPlan:
    """Static facts one kernel launch is specialised on (hashable: part of the trace key).

    ``q_tiles``/``k_tiles`` count tiles of the padded lengths; ``causal_offset`` is None for
    non-causal attention, else key ``j`` is visible from query ``i`` when ``j <= i + offset``;
    ``has_bias`` says a [batch, k_len] additive key bias (0 or -inf) is passed; ``sparse`` says tile
    schedules are passed, with ``schedule_heads`` (1: shared by heads) rows of ``max_count``.
    ``predicate``: a token mask predicate that the schedule's partial tiles evaluate, over
    ``token_lengths`` (q_len, k_len) real tokens.
    """

    block_q: int
    block_k: int
    q_tiles: int
    k_tiles: int
    scale: float
    causal_offset: int | None
    has_bias: bool
    sparse: bool
    schedule_heads: int
    max_count: int
    exact_f32: bool
    num_warps: int
    num_stages: int
    interpret: bool
    programs: int = 0
    split_slots: int = 0
    dropout_rate: float = 0.0
    predicate: MaskPredicate | None = None
    token_lengths: tuple[int, int] = (0, 0)

    @property
    def split(self) -> bool:
        """Whether programs walk segments of rows and may write partial results."""
        return self.split_slots > 0

    @property
    def table_count(self) -> int:
        """How many schedule tables the kernels take: none (dense), (indices, counts, order), or
        (indices, programs) when rows are split."""
        if not self.sparse:
            return 0
        return (2 if self.split else 3) + (self.predicate is not None)

    @property
    def masked(self) -> bool:
        """Whether some logits may be masked element-wise (so rows may see no key at all)."""
        return self.has_bias or self.causal_offset is not None or self.predicate is not None

    @property
    def precision(self):
        """float32 inputs ask for IEEE products (no tf32) so float32 results stay exact."""
        return lax.Precision.HIGHEST if self.exact_f32 else None

    def compiler_params(self):
        """Triton launch parameters; interpret mode takes none."""
        if self.interpret:
            return None
        from jax.experimental.pallas import triton as pltriton

        return pltriton.CompilerParams(num_warps=self.num_warps, num_stages=self.num_stages)


# Slot values in a split schedule's program table: the program writes its whole row's result
# directly, or it is padding (heads with fewer programs than the widest head) and writes nothing.
WHOLE_ROW = -1
NO_WRITE = -2


@dataclasses.dataclass(frozen=True, eq=False)
class RowSplit:
    """Long schedule rows cut into segments, one program each (host data, numpy).

    ``programs [heads, P, 4]``: per program (row tile, first step, end step, slot), walked in
    this order; slot ``WHOLE_ROW`` writes the row's output itself, a slot >= 0 writes partial
    results to that row tile of the extra outputs, ``NO_WRITE`` is padding. ``rows [heads, R]``:
    the split rows (-1 pads), ``parts [heads, R, S]``: their segments' slots (-1 pads).
    ``slots``: row tiles of the extra outputs.
    """

    programs: np.ndarray
    rows: np.ndarray
    parts: np.ndarray
    slots: int


@dataclasses.dataclass(frozen=True, eq=False)
class TileSchedule:
    """For each (head, row tile), the column tiles to visit: ``indices [heads, rows, max_count]``
    (unused slots repeat a valid index) and ``counts [heads, rows]``; ``order [heads, rows]``
    lists rows by falling count, so the longest rows (e.g. global tokens) start first and the
    short ones fill in behind them. ``split``: the long rows' segments, if any were cut.
    ``partial [heads, rows, max_count]`` (mask predicates only): 1 where the listed tile must
    evaluate the predicate, 0 where all its pairs are visible. Host data (numpy)."""

    indices: np.ndarray
    counts: np.ndarray
    order: np.ndarray
    split: RowSplit | None = None
    partial: np.ndarray | None = None

    @property
    def max_count(self) -> int:
        """Width of ``indices``: the most tiles any row visits (at least 1)."""
        return self.indices.shape[-1]

    @property
    def programs(self) -> int:
        """Programs per head of a launch over this schedule."""
        return self.order.shape[-1] if self.split is None else self.split.programs.shape[1]

    def flat(self) -> tuple[jax.Array, ...]:
        """The tables (``KernelPlan.table_count`` of them) as flat int32 arrays for scalar reads
        inside a kernel."""
        tables = ((self.indices, self.counts, self.order) if self.split is None
                  else (self.indices, self.split.programs))
        if self.partial is not None:
            tables += (self.partial,)
        return tuple(jnp.asarray(t.reshape(-1)) for t in tables)


def causal_tiles(block_q: int, block_k: int, q_tiles: int, k_tiles: int,
                 causal_offset: int | None) -> np.ndarray | bool:
    """``[q_tiles, k_tiles]``: tiles causal masking leaves some pair of (True where no causal
    masking)."""
    if causal_offset is None:
        return True
    last_q = np.arange(q_tiles)[:, None] * block_q + block_q - 1
    first_k = np.arange(k_tiles)[None, :] * block_k
    return first_k <= last_q + causal_offset


def tile_visibility(block_mask: BlockMask, block_q: int, block_k: int, q_tiles: int,
                    k_tiles: int, causal_offset: int | None) -> np.ndarray:
    """The block mask refined to kernel tiles, ``[heads or 1, q_tiles, k_tiles]`` bool, with tiles
    that causal masking empties removed. Kernel tiles must divide the mask's tiles."""
    fine = refine_tiles(block_mask, block_q, block_k, q_tiles, k_tiles)
    return fine & causal_tiles(block_q, block_k, q_tiles, k_tiles, causal_offset)


def schedule_from_visibility(visible: np.ndarray,
                             partial: np.ndarray | None = None) -> TileSchedule:
    """Rows of ``visible [heads, rows, cols]`` to lists of their True columns, ascending; with
    ``partial`` (same shape), the listed tiles' partial flags too."""
    heads, rows, _ = visible.shape
    counts = visible.sum(-1).astype(np.int32)
    width = max(1, int(counts.max(initial=0)))
    indices = np.zeros((heads, rows, width), np.int32)
    flags = None if partial is None else np.zeros((heads, rows, width), np.int32)
    for h in range(heads):
        for r in range(rows):
            cols = np.flatnonzero(visible[h, r])
            if cols.size:
                indices[h, r, : cols.size] = cols
                indices[h, r, cols.size:] = cols[-1]
                if flags is not None:
                    flags[h, r, : cols.size] = partial[h % partial.shape[0], r, cols]
    order = np.argsort(-counts, axis=-1, kind="stable").astype(np.int32)
    return TileSchedule(indices, counts, order, partial=flags)


def grid(plan: KernelPlan, rows: int, batch: int, heads: int) -> tuple[int, int, int]:
    """Dense launches put the row tile first (the fastest-launched axis), so the programs that
    share one head's keys run together; sparse launches put it last and walk rows (or row
    segments) in schedule order, longest first, for every head at once."""
    return (heads, batch, plan.programs) if plan.sparse else (rows, batch, heads)


def index_map(plan: KernelPlan, fn):
    """An index map written as ``fn(row_slot, batch, head)`` for the plan's grid order."""
    if plan.sparse:
        return lambda h, b, t: fn(t, b, h)
    return fn


def row_spec(plan: KernelPlan, block: int, length: int, head_dim: int | None = None):
    """Spec of a tensor the program owns a row tile of: ``[b, n, h, d]`` (``head_dim`` given),
    ``[b, h, n]`` statistics or a ``[b, n]`` key bias. Sparse plans pass it whole, since the row
    is only known inside the kernel (``locate_row``)."""
    size, tile = (length, lambda t: 0) if plan.sparse else (block, lambda t: t)
    if head_dim is not None:
        return pl.BlockSpec((None, size, None, head_dim),
                            index_map(plan, lambda t, b, h: (b, tile(t), h, 0)))
    return pl.BlockSpec((None, None, size), index_map(plan, lambda t, b, h: (b, h, tile(t))))


def bias_row_spec(plan: KernelPlan, block: int, length: int):
    """Spec of the ``[b, n]`` key bias when the program owns a key tile of it."""
    size, tile = (length, lambda t: 0) if plan.sparse else (block, lambda t: t)
    return pl.BlockSpec((None, size), index_map(plan, lambda t, b, h: (b, tile(t))))


def whole_bias_spec(plan: KernelPlan, length: int):
    """Spec handing a program its batch row's whole ``[n]`` key bias."""
    return pl.BlockSpec((None, length), index_map(plan, lambda t, b, h: (b, 0)))


def whole_spec(plan: KernelPlan, length: int, head_dim: int | None = None):
    """Spec handing a program one (batch, head)'s whole ``[n, d]`` tensor, or its ``[n]``
    statistics when ``head_dim`` is None."""
    if head_dim is not None:
        return pl.BlockSpec((None, length, None, head_dim),
                            index_map(plan, lambda t, b, h: (b, 0, h, 0)))
    return pl.BlockSpec((None, None, length), index_map(plan, lambda t, b, h: (b, h, 0)))


def whole_array_specs(arrays) -> list:
    """Block specs that hand each array to every program whole."""
    return [pl.BlockSpec(a.shape, lambda *_, zeros=(0,) * a.ndim: zeros) for a in arrays]
