"""Splitting the long rows of block-sparse tile schedules over several programs.

Rows of a block-sparse schedule can differ widely in length. With global tokens, a global query
tile visits every key tile (and in the key/value-gradient launch, a global key tile is visited by
every query tile) while the other rows list a handful: one program per row leaves a few programs
walking ~100 tiles while thousands walk ~7, and those few, slowed by the programs sharing their
multiprocessor, form the tail of the launch. Rows longer than a bound are therefore cut into
segments of near-equal length, one program each, as Flash-Decoding (Dao, Haziza, Massa and
Sizov 2023) splits the key axis; segments write float32 partial results that are combined exactly
afterwards by a few small XLA operations on the split rows only:

- forward: a segment's output is normalised by its own softmax sum and comes with its own base-2
  log-sum-exp ``lse_s``; with ``lse = log2(sum_s 2^lse_s)`` the row's output is
  ``sum_s 2^(lse_s - lse) O_s`` (the same rescaling the online softmax applies between tiles).
- backward: each segment sums the gradient over its own tiles; the sums add.

Schedules whose rows are all short keep one program per row and no extra outputs or merges.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from xformers_zoo.kernels.pallas_in_kernel import (
    EMPTY_ROW_LSE,
)
from xformers_zoo.kernels.pallas_schedule import (
    NO_WRITE,
    WHOLE_ROW,
    RowSplit,
    TileSchedule,
)

# Automatic bound: rows longer than SPLIT_FACTOR x the median non-empty row are split. A segment
# costs about one tile step extra (its own q-tile load and a float32 partial store, then the
# merge), so segments should stay several steps long; four medians keep long programs within a
# few times the typical one, short enough to hide behind the short rows that fill in around them.
SPLIT_FACTOR = 4
MIN_SPLIT_STEPS = 8


def step_bound(counts: np.ndarray, max_steps: int | None) -> int | None:
    """Most tiles one program may walk: ``max_steps`` when given (0: never split), else
    ``SPLIT_FACTOR`` x the median non-empty row length, at least ``MIN_SPLIT_STEPS``. None means
    no bound."""
    if max_steps is not None:
        if max_steps < 0:
            raise ValueError(f"max_steps must be >= 0 (0: never split rows), got {max_steps}")
        return max_steps or None
    nonzero = counts[counts > 0]
    if not nonzero.size:
        return None
    return max(MIN_SPLIT_STEPS, int(SPLIT_FACTOR * np.median(nonzero)))


def _split_head(counts: np.ndarray, order: np.ndarray, bound: int):
    """One head's programs (row, first, end, slot), longest first, and its split rows with their
    segments' slots."""
    programs, split_rows, slot = [], [], 0
    for row in order:
        count = int(counts[row])
        if count <= bound:
            programs.append((int(row), 0, count, WHOLE_ROW))
            continue
        pieces = -(-count // bound)
        size = -(-count // pieces)
        slots = list(range(slot, slot + pieces))
        programs += [(int(row), first, min(count, first + size), s)
                     for s, first in zip(slots, range(0, count, size), strict=True)]
        split_rows.append((int(row), slots))
        slot += pieces
    programs.sort(key=lambda p: p[1] - p[2])  # stable: longest first, segments stay in order
    return programs, split_rows


def split_long_rows(schedule: TileSchedule, max_steps: int | None = None) -> TileSchedule:
    """``schedule`` with every row longer than ``step_bound(counts, max_steps)`` cut into
    segments of near-equal length, or ``schedule`` itself when no row is that long."""
    bound = step_bound(schedule.counts, max_steps)
    if bound is None or schedule.counts.max(initial=0) <= bound:
        return schedule
    per_head = [_split_head(c, o, bound) for c, o in zip(schedule.counts, schedule.order,
                                                        strict=True)]
    heads = len(per_head)
    width = max(len(p) for p, _ in per_head)
    num_rows = max(1, max(len(r) for _, r in per_head))
    num_parts = max(1, max((len(s) for _, r in per_head for _, s in r), default=1))
    programs = np.tile(np.array([0, 0, 0, NO_WRITE], np.int32), (heads, width, 1))
    rows = np.full((heads, num_rows), -1, np.int32)
    parts = np.full((heads, num_rows, num_parts), -1, np.int32)
    for h, (progs, split_rows) in enumerate(per_head):
        programs[h, : len(progs)] = progs
        for r, (row, slots) in enumerate(split_rows):
            rows[h, r] = row
            parts[h, r, : len(slots)] = slots
    slots = int(parts.max(initial=-1)) + 1
    split = RowSplit(programs=programs, rows=rows, parts=parts, slots=slots)
    return dataclasses.replace(schedule, split=split)


def _head_index(heads: int) -> np.ndarray:
    return np.arange(heads)[:, None, None]


def _gather_tiles(parts: Float[Array, "b slots_n h d"], split: RowSplit,
                  block: int) -> Float[Array, "b h r s block d"]:
    """Each split row's segment results from a ``[b, slots * block, h, d]`` partial output."""
    batch, _, heads, head_dim = parts.shape
    tiles = parts.reshape(batch, -1, block, heads, head_dim)
    # The two index arrays are apart (slot axis, head axis), so their [h, r, s] dims lead.
    got = tiles[:, np.maximum(split.parts, 0), :, _head_index(heads)]  # [h, r, s, b, block, d]
    return jnp.moveaxis(got, 3, 0)


def _gather_stats(parts: Float[Array, "b h slots_n"], split: RowSplit,
                  block: int) -> Float[Array, "b h r s block"]:
    """Each split row's segment statistics from a ``[b, h, slots * block]`` partial output."""
    batch, heads, _ = parts.shape
    tiles = parts.reshape(batch, heads, -1, block)
    return tiles[:, _head_index(heads), np.maximum(split.parts, 0)]


def _row_positions(split: RowSplit, block: int, length: int) -> np.ndarray:
    """Element rows ``[heads or 1, R, block]`` of the split rows; padding entries point past
    ``length``, so writes to them are dropped."""
    rows = split.rows[..., None] * block + np.arange(block)
    return np.where(split.rows[..., None] >= 0, rows, length)


def _put_tiles(x: Float[Array, "b n h d"], values: Float[Array, "b h r block d"],
               split: RowSplit, block: int) -> Float[Array, "b n h d"]:
    rows = _row_positions(split, block, x.shape[1])
    return x.at[:, rows, _head_index(x.shape[2])].set(values.astype(x.dtype), mode="drop")


def merge_softmax_parts(
    out: Float[Array, "b n h d"],
    lse: Float[Array, "b h n"],
    part_out: Float[Array, "b slots_n h d"],
    part_lse: Float[Array, "b h slots_n"],
    split: RowSplit,
    block: int,
) -> tuple[Float[Array, "b n h d"], Float[Array, "b h n"]]:
    """Forward outputs with the split rows filled in from their segments' (O, base-2 LSE)
    partials by log-sum-exp weighting. Empty segments (LSE = ``EMPTY_ROW_LSE``) weigh nothing;
    a row all of whose segments are empty gets output 0 and ``EMPTY_ROW_LSE``."""
    valid = (split.parts >= 0)[None, ..., None]  # [1, h, r, s, 1]
    seg_lse = _gather_stats(part_lse, split, block)  # [b, h, r, s, block]
    seg_lse = jnp.where(valid & (seg_lse < EMPTY_ROW_LSE), seg_lse, -jnp.inf)
    top = seg_lse.max(axis=3)
    top = jnp.where(jnp.isfinite(top), top, 0.0)  # rows with no mass: any finite shift
    weight = jnp.exp2(seg_lse - top[:, :, :, None])  # 0 for empty and padding segments
    total = weight.sum(axis=3)  # [b, h, r, block]
    seg_out = _gather_tiles(part_out, split, block)  # [b, h, r, s, block, d]
    mixed = jnp.where(valid[..., None], weight[..., None] * seg_out, 0.0).sum(axis=3)
    seen = total > 0.0
    row_out = mixed / jnp.where(seen, total, 1.0)[..., None]
    row_lse = jnp.where(seen, top + jnp.log2(jnp.where(seen, total, 1.0)), EMPTY_ROW_LSE)
    rows = _row_positions(split, block, lse.shape[2])
    lse = lse.at[:, _head_index(lse.shape[1]), rows].set(row_lse, mode="drop")
    return _put_tiles(out, row_out, split, block), lse


def add_partial_sums(x: Float[Array, "b n h d"], parts: Float[Array, "b slots_n h d"],
                     split: RowSplit, block: int) -> Float[Array, "b n h d"]:
    """``x`` with each split row set to the sum of its segments' partial sums (gradients)."""
    valid = (split.parts >= 0)[None, ..., None, None]  # [1, h, r, s, 1, 1]
    total = jnp.where(valid, _gather_tiles(parts, split, block), 0.0).sum(axis=3)
    return _put_tiles(x, total, split, block)


def partial_outputs(shape: tuple[int, ...], split_slots: int, block: int,
                    stats: bool = False) -> jax.ShapeDtypeStruct:
    """Shape of a float32 partial output with ``split_slots`` row tiles: ``[b, slots*block, h,
    d]`` for ``shape`` [b, n, h, d], or ``[b, h, slots*block]`` statistics when ``stats``."""
    batch, _, heads, head_dim = shape
    size = split_slots * block
    return jax.ShapeDtypeStruct((batch, heads, size) if stats else (batch, size, heads, head_dim),
                                jnp.float32)
