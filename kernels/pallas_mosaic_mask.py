"""Masks in the Mosaic GPU kernels: causal masking, block masks, token-level mask predicates and
key masks of any form (``pallas_mosaic_forward``, ``pallas_mosaic_backward``).

A masked call walks a host schedule (``MosaicSchedule``) instead of every tile: for each row of
programs (query tiles in the forward, key blocks in the backward) the column tiles that hold a
visible pair, the fully visible ones first, then the partial ones. The kernels run the first
group with no element mask at all and evaluate, on the second group only, what the tile's flags
name: the mask predicate (``kernels.mask_predicate``, classified per tile by ``tile_classes``, as
for the Triton-family kernels) and the causal diagonal. So one statement of a pattern serves
both kernel families, and LRA's token-granular patterns (Local's 50-token blocks, the Sparse
Transformer's fixed pattern) skip their empty tiles on Hopper too.

Key masks that are not right padding, and the padding of sparse calls, travel as a per-key bias
(0 or -inf) added to every tile; right padding of dense calls stays per-sequence lengths, which
cost nothing on the tiles before the last. Rows that end up seeing no key give zeros and the
empty-row log-sum-exp, as in the Triton kernels.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from xformers_zoo.kernels.block_mask import BlockMask
from xformers_zoo.kernels.mask_predicate import MaskPredicate, refine_tiles, tile_classes

# Bits of a listed tile's flags: which masks its pairs must evaluate.
PREDICATE_PARTIAL = 1
CAUSAL_PARTIAL = 2


@dataclasses.dataclass(frozen=True)
class MosaicMask:
    """Static masking facts of one Mosaic launch (part of its plan; hashable).

    ``has_lengths``: right padding given as per-sequence key counts (dense calls only);
    ``has_bias``: a [batch, k_len] float32 key bias (0 or -inf) is passed; ``causal_offset``:
    None, or key ``j`` is visible from query ``i`` when ``j <= i + offset``; ``predicate``: the
    token mask predicate of the partial tiles, over ``token_lengths`` (q_len, k_len) real
    tokens; ``schedule_heads``: rows of the schedule tables (0: dense, no schedule; 1: shared by
    the heads) of ``width`` entries each.
    """

    has_lengths: bool = False
    has_bias: bool = False
    causal_offset: int | None = None
    predicate: MaskPredicate | None = None
    token_lengths: tuple[int, int] = (0, 0)
    schedule_heads: int = 0
    width: int = 0

    @property
    def sparse(self) -> bool:
        """Whether the launch walks a schedule (else every tile, or every tile up to a length)."""
        return self.schedule_heads > 0

    @property
    def may_empty_rows(self) -> bool:
        """Whether a row may see no key in some tile, or at all: the online softmax then guards
        its running maximum against -inf."""
        return self.has_bias or self.sparse

    def with_schedule(self, schedule: MosaicSchedule | None) -> MosaicMask:
        """These facts with the table shape of ``schedule`` (None: dense)."""
        if schedule is None:
            return dataclasses.replace(self, schedule_heads=0, width=0)
        return dataclasses.replace(self, schedule_heads=schedule.indices.shape[0],
                                   width=schedule.indices.shape[2])


@dataclasses.dataclass(frozen=True, eq=False)
class MosaicSchedule:
    """Per (head or 1, row of programs): ``indices [H, rows, width]`` the column tiles to visit,
    the fully visible ones first, each group ascending (unused entries repeat the last one);
    ``flags`` (same shape) the ``*_PARTIAL`` bits of each listed tile; ``counts [H, rows, 2]``
    (fully visible tiles, all listed tiles). Host data (numpy)."""

    indices: np.ndarray
    flags: np.ndarray
    counts: np.ndarray

    def tables(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(indices, flags, counts) as flat int32 arrays, for scalar reads inside a kernel."""
        return tuple(jnp.asarray(t.reshape(-1), jnp.int32)
                     for t in (self.indices, self.flags, self.counts))


def check_mask_inputs(kernel: str, mask: MosaicMask, bias, schedule: MosaicSchedule | None,
                      rows: int) -> None:
    """Raises unless the key ``bias`` and the ``schedule`` (``rows`` rows of programs) are given
    exactly when ``mask`` expects them, the schedule in the shape the mask was planned for."""
    if mask.has_bias != (bias is not None):
        raise ValueError(f"{kernel}: a key bias must be given exactly when the mask has one")
    if mask.sparse != (schedule is not None):
        raise ValueError(f"{kernel}: a schedule must be given exactly when the mask is sparse")
    if schedule is not None:
        want = (mask.schedule_heads, rows, mask.width)
        if schedule.indices.shape != want:
            raise ValueError(f"{kernel}: schedule of shape {schedule.indices.shape}, the plan "
                             f"expects {want} (heads, rows of programs, width)")


def tiles_rejects(tiles: BlockMask | None, block_q: int, block_k: int) -> str | None:
    """Why a tile-granular mask cannot be refined to the Mosaic tiles, or None."""
    if tiles is not None and (tiles.block_q % block_q or tiles.block_k % block_k):
        return (f"block-mask tiles must be multiples of {block_q}x{block_k} (query x key), got "
                f"{tiles.block_q}x{tiles.block_k}")
    return None


def _causal_classes(block_q: int, block_k: int, q_tiles: int, k_tiles: int, offset: int):
    """``[q_tiles, k_tiles]`` tiles with some causally visible pair, and those where every pair
    is."""
    first_q = np.arange(q_tiles)[:, None] * block_q
    first_k = np.arange(k_tiles)[None, :] * block_k
    some = first_k <= first_q + block_q - 1 + offset
    every = first_k + block_k - 1 <= first_q + offset
    return some, every


@functools.lru_cache(maxsize=64)
def mosaic_schedule(pattern: BlockMask | MaskPredicate | None, causal_offset: int | None,
                    batch: int, heads: int, token_lengths: tuple[int, int], block_q: int,
                    block_k: int, q_tiles: int, k_tiles: int, by_key: bool) -> MosaicSchedule:
    """The schedule of a launch over ``q_tiles`` x ``k_tiles`` tiles of ``block_q`` x
    ``block_k`` (``by_key``: rows are key tiles, for the backward). ``pattern``: a block mask
    (tiles a multiple of the kernel's), a mask predicate, or None (dense, e.g. causal only)."""
    shape = (1, q_tiles, k_tiles)
    if isinstance(pattern, BlockMask):
        visible = refine_tiles(pattern, block_q, block_k, q_tiles, k_tiles)
        partial = np.zeros_like(visible)
    elif pattern is not None:
        classes = tile_classes(pattern, batch, heads, *token_lengths, block_q, block_k,
                               q_tiles, k_tiles)
        visible, partial = classes.visible, classes.partial
    else:
        visible, partial = np.ones(shape, bool), np.zeros(shape, bool)
    flags = np.where(partial, PREDICATE_PARTIAL, 0)
    if causal_offset is not None:
        some, every = _causal_classes(block_q, block_k, q_tiles, k_tiles, causal_offset)
        visible = visible & some
        flags = flags | np.where(every, 0, CAUSAL_PARTIAL)
    flags = np.broadcast_to(np.where(visible, flags, 0), visible.shape)
    if by_key:
        visible, flags = visible.transpose(0, 2, 1), flags.transpose(0, 2, 1)
    return _listed(visible, flags)


def _listed(visible: np.ndarray, flags: np.ndarray) -> MosaicSchedule:
    heads, rows, _ = visible.shape
    full = visible & (flags == 0)
    counts = np.stack([full.sum(-1), visible.sum(-1)], axis=-1).astype(np.int32)
    width = max(1, int(counts[..., 1].max(initial=0)))
    indices = np.zeros((heads, rows, width), np.int32)
    listed_flags = np.zeros((heads, rows, width), np.int32)
    for h in range(heads):
        for r in range(rows):
            cols = np.concatenate([np.flatnonzero(full[h, r]),
                                   np.flatnonzero(visible[h, r] & ~full[h, r])])
            if cols.size:
                indices[h, r, : cols.size] = cols
                indices[h, r, cols.size:] = cols[-1]
                listed_flags[h, r, : cols.size] = flags[h, r, cols]
    return MosaicSchedule(indices, listed_flags, counts)


class ScheduleRow:
    """One program's row of a schedule inside a kernel: reads its counts, listed tiles and flags
    from the flat tables (global-memory refs) by scalar loads."""

    def __init__(self, mask: MosaicMask, tables, head, row, rows: int):
        self.indices_ref, self.flags_ref, self.counts_ref = tables
        self.width = mask.width
        self.entry = ((head if mask.schedule_heads > 1 else 0) * rows + row)
        self.full = self.counts_ref[self.entry * 2]
        self.total = self.counts_ref[self.entry * 2 + 1]

    def tile(self, step):
        """The column tile listed at ``step``."""
        return self.indices_ref[self.entry * self.width + step]

    def flag(self, step):
        """The ``*_PARTIAL`` bits of the tile at ``step``."""
        return self.flags_ref[self.entry * self.width + step]


def element_visible(mask: MosaicMask, batch, head, q_pos: jax.Array, k_pos: jax.Array,
                    flag) -> jax.Array | None:
    """Inside a kernel: which pairs of a partial tile are visible (``q_pos``, ``k_pos``: the
    tile's query and key indices, in the layout of the logits), evaluating only the masks that
    ``flag`` names; None when the mask has nothing to evaluate. Indices past the real tokens are
    clamped to the last one, so the predicate sees real indices only (padded keys are masked by
    the bias, padded queries are cut off)."""
    visible = None
    if mask.predicate is not None:
        q_len, k_len = mask.token_lengths
        seen = mask.predicate(batch, head, jnp.minimum(q_pos, q_len - 1),
                              jnp.minimum(k_pos, k_len - 1))
        visible = seen | ((flag & PREDICATE_PARTIAL) == 0)
    if mask.causal_offset is not None:
        seen = (k_pos <= q_pos + mask.causal_offset) | ((flag & CAUSAL_PARTIAL) == 0)
        visible = seen if visible is None else visible & seen
    return visible
