"""What each (query shard, key shard) pair of ring attention computes, decided on the host.

Ring attention (kernels/ring_attention.py) splits q, k and v into ``shards`` equal blocks along
the sequence; device ``i`` holds query block ``i`` and, at ring step ``s``, key/value block
``(i - s) mod shards``. A block mask, a token-level mask predicate or causality restricts which
pairs of blocks meet: ``pair_blocks`` classifies each pair statically, from the host data of
the pattern (a block mask's tiles; a predicate evaluated on the host in chunks, as the Pallas
kernels classify their tiles), as

- ``skip``: no query of block ``i`` sees any key of block ``j``: nothing is computed,
- dense: every query sees every key of the block: attention runs unmasked (shared by all such
  pairs, so they compile once),
- partial: attention runs with the pattern restricted to the pair: a block mask sliced to its
  tiles, or the predicate shifted to the pair's global token offsets (still skipping empty
  kernel tiles inside the block).

So a Longformer or BigBird pattern costs only the blocks its window and global tokens reach.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from xformers_zoo.kernels.block_mask import BlockMask
from xformers_zoo.kernels.mask_predicate import MaskPredicate, dense_mask, tile_classes

# Tiles a predicate is classified in on the host (its evaluation is chunked by rows anyway).
_CLASSIFY_TILE = 128


@dataclasses.dataclass(frozen=True, eq=False)
class BlockPair:
    """The attention one query block computes against one key block: nothing when ``skip``,
    else attention with these options (all None/False: dense)."""

    skip: bool = False
    causal: bool = False
    block_mask: BlockMask | None = None
    mask_predicate: MaskPredicate | None = None

    def options(self) -> dict:
        """The pair's mask options, as ``dot_product_attention`` keywords."""
        return dict(causal=self.causal, block_mask=self.block_mask,
                    mask_predicate=self.mask_predicate)


SKIP = BlockPair(skip=True)
DENSE = BlockPair()
DENSE_CAUSAL = BlockPair(causal=True)


def depends_on_batch(predicate: MaskPredicate) -> bool:
    """Whether the predicate reads its batch index (it then differs between batch entries)."""
    return dense_mask(predicate.with_tiles(None), 2, 1, 1, 1).shape[0] != 1


def _shifted(predicate: MaskPredicate, q_offset: int, k_offset: int):
    """The predicate's function over a block's local indices: global token offsets added."""
    fn = predicate.fn

    def visible(b, h, q, k):
        return fn(b, h, q + q_offset, k + k_offset)

    return visible


def _tile_slice(tiles: BlockMask, i: int, j: int, q_block: int, k_block: int,
                what: str) -> np.ndarray:
    """The ``[heads or 1, ...]`` tiles of a block mask that fall in block pair (i, j)."""
    if q_block % tiles.block_q or k_block % tiles.block_k:
        raise ValueError(
            f"ring attention: the {what}'s {tiles.block_q}x{tiles.block_k}-token tiles must "
            f"divide each device's block of {q_block}x{k_block} tokens; accepted: sequence "
            f"lengths that are multiples of the tile size times the 'seq' axis size")
    rows, cols = q_block // tiles.block_q, k_block // tiles.block_k
    return tiles.mask[:, i * rows:(i + 1) * rows, j * cols:(j + 1) * cols]


def _masked_pair(tiles: np.ndarray, block_mask: BlockMask) -> BlockPair:
    if not tiles.any():
        return SKIP
    if tiles.all():
        return DENSE
    return BlockPair(block_mask=BlockMask(tiles, block_mask.block_q, block_mask.block_k))


def _predicate_pair(predicate: MaskPredicate, i: int, j: int, q_block: int, k_block: int,
                    batch: int, heads: int) -> BlockPair:
    shifted = MaskPredicate(_shifted(predicate, i * q_block, j * k_block))
    tile_q, tile_k = min(_CLASSIFY_TILE, q_block), min(_CLASSIFY_TILE, k_block)
    classes = tile_classes(shifted, batch, heads, q_block, k_block, tile_q, tile_k,
                           -(-q_block // tile_q), -(-k_block // tile_k))
    seen, full = classes.visible.any(), (classes.visible & ~classes.partial).all()
    tiles = None
    if predicate.tiles is not None:
        part = _tile_slice(predicate.tiles, i, j, q_block, k_block, "mask predicate's tile part")
        seen, full = seen or part.any(), full or part.all()
        if part.any():
            tiles = BlockMask(part, predicate.tiles.block_q, predicate.tiles.block_k)
    if not seen:
        return SKIP
    if full:
        return DENSE
    return BlockPair(mask_predicate=shifted.with_tiles(tiles))


@functools.lru_cache(maxsize=32)
def pair_blocks(shards: int, q_len: int, k_len: int, *, batch: int, heads: int, causal: bool,
                block_mask: BlockMask | None, predicate: MaskPredicate | None,
                ) -> tuple[tuple[BlockPair, ...], ...]:
    """``[i][j]``: what query block ``i`` computes against key block ``j`` of ``shards`` equal
    blocks of ``q_len`` and ``k_len`` tokens (causal needs ``q_len == k_len``). Cached per
    pattern object, so that each pair's pattern, and the kernel schedules derived from it,
    are built once."""
    q_block, k_block = q_len // shards, k_len // shards
    rows = []
    for i in range(shards):
        row = []
        for j in range(shards):
            if causal and j > i:
                pair = SKIP
            elif block_mask is not None:
                pair = _masked_pair(_tile_slice(block_mask, i, j, q_block, k_block,
                                                "block mask"), block_mask)
            elif predicate is not None:
                pair = _predicate_pair(predicate, i, j, q_block, k_block, batch, heads)
            else:
                pair = DENSE
            if causal and i == j and not pair.skip:
                pair = DENSE_CAUSAL if pair is DENSE else dataclasses.replace(pair, causal=True)
            row.append(pair)
        rows.append(tuple(row))
    return tuple(rows)
