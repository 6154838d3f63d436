"""Block-mask builders for the sparse attention patterns of the block-sparse variants.

Every builder works at tile granularity (a tile is ``block`` x ``block`` tokens), as BigBird's
blocked implementation does (Zaheer et al. 2020, "Big Bird: Transformers for Longer Sequences"):
the kernels compute exactly the tiles a mask marks. Combine patterns with ``union``.

- ``sliding_window``: Longformer's local window (Beltagy et al. 2020) and the Local attention of
  the LRA paper.
- ``local_blocks``: block-local attention (own tile, optionally the tiles just before it).
- ``global_tokens``: Longformer/BigBird global tokens: the first tiles see and are seen by all.
- ``random_blocks``: BigBird's random key tiles per query tile (per head if asked).
- ``strided`` and ``fixed``: the two factorised patterns of the Sparse Transformer (Child et al.
  2019, "Generating Long Sequences with Sparse Transformers").
"""

from __future__ import annotations

import numpy as np

from xformers_zoo.kernels.block_mask import BlockMask


def _tiles(length: int, block: int) -> int:
    if length <= 0 or block <= 0:
        raise ValueError(f"length and block must be positive, got length={length}, block={block}")
    return -(-length // block)


def _tile_grid(length: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Query-tile and key-tile index grids, [n, 1] and [1, n]."""
    n = _tiles(length, block)
    return np.arange(n)[:, None], np.arange(n)[None, :]


def dense(length: int, block: int) -> BlockMask:
    """Every tile: the dense pattern, as a block mask."""
    n = _tiles(length, block)
    return BlockMask(np.ones((n, n), bool), block, block)


def sliding_window(length: int, window: int, block: int) -> BlockMask:
    """Tiles holding a (query, key) pair at most ``window // 2`` tokens apart: a band of
    ``window`` tokens around the diagonal, rounded out to whole tiles."""
    if window < 1:
        raise ValueError(f"window must be at least 1 token, got {window}")
    qi, kj = _tile_grid(length, block)
    # Nearest tokens of tiles qi and kj are (|qi - kj| - 1) * block + 1 apart (0 on the diagonal).
    gap = np.maximum(np.abs(qi - kj) * block - (block - 1), 0)
    return BlockMask(gap <= window // 2, block, block)


def global_tokens(length: int, num_global_tiles: int, block: int) -> BlockMask:
    """The first ``num_global_tiles`` tiles attend to everything and everything attends to them."""
    qi, kj = _tile_grid(length, block)
    if not 0 <= num_global_tiles <= qi.shape[0]:
        raise ValueError(f"num_global_tiles must be in [0, {qi.shape[0]}], got {num_global_tiles}")
    return BlockMask((qi < num_global_tiles) | (kj < num_global_tiles), block, block)


def random_blocks(length: int, num_random: int, block: int, *, seed: int,
                  num_heads: int = 1, exclude: BlockMask | None = None) -> BlockMask:
    """``num_random`` distinct random key tiles for each query tile (one draw per head when
    ``num_heads`` > 1); the draw is fixed by ``seed``. Tiles of ``exclude`` (e.g. BigBird's
    window and global tiles, which the paper's random keys avoid) are never drawn; a row with
    fewer free tiles gets all of them."""
    n = _tiles(length, block)
    if not 0 <= num_random <= n:
        raise ValueError(f"num_random must be in [0, {n}] tiles, got {num_random}")
    taken = np.zeros((1, n, n), bool)
    if exclude is not None:
        if (exclude.block_q, exclude.block_k) != (block, block) or exclude.mask.shape[1:] != (n, n):
            raise ValueError(f"exclude must be a {n}x{n}-tile mask of {block}-token tiles, got "
                             f"{exclude.mask.shape[1:]} tiles of {exclude.block_q}x"
                             f"{exclude.block_k}")
        taken = exclude.mask
    rng = np.random.default_rng(seed)
    mask = np.zeros((num_heads, n, n), bool)
    for h in range(num_heads):
        for i in range(n):
            free = np.flatnonzero(~taken[h % taken.shape[0], i])
            mask[h, i, rng.choice(free, size=min(num_random, free.size), replace=False)] = True
    return BlockMask(mask, block, block)


def strided(length: int, stride: int, block: int) -> BlockMask:
    """Sparse Transformer strided pattern: the previous ``stride`` tokens' tiles and every tile a
    whole number of strides back. ``stride`` must be a multiple of ``block``; causal (use with
    ``causal=True``)."""
    if stride % block:
        raise ValueError(f"stride ({stride}) must be a multiple of block ({block})")
    step = stride // block
    qi, kj = _tile_grid(length, block)
    back = qi - kj
    return BlockMask((back >= 0) & ((back < step) | (back % step == 0)), block, block)


def fixed(length: int, chunk: int, summary: int, block: int) -> BlockMask:
    """Sparse Transformer fixed pattern: tiles of the same ``chunk`` and the last ``summary``
    tokens' tiles of every chunk. ``chunk`` and ``summary`` must be multiples of ``block``."""
    if chunk % block or summary % block or not 0 < summary <= chunk:
        raise ValueError(f"chunk ({chunk}) and summary ({summary}) must be multiples of block "
                         f"({block}) with 0 < summary <= chunk")
    per_chunk, summary_tiles = chunk // block, summary // block
    qi, kj = _tile_grid(length, block)
    same_chunk = qi // per_chunk == kj // per_chunk
    is_summary = kj % per_chunk >= per_chunk - summary_tiles
    return BlockMask(same_chunk | is_summary, block, block)


def union(*masks: BlockMask) -> BlockMask:
    """Tiles marked by any of ``masks`` (same tiles; shared and per-head masks broadcast)."""
    if not masks:
        raise ValueError("union needs at least one mask")
    first = masks[0]
    if any((m.block_q, m.block_k) != (first.block_q, first.block_k) for m in masks):
        raise ValueError("union needs masks with the same tile sizes")
    return BlockMask(np.logical_or.reduce(np.broadcast_arrays(*(m.mask for m in masks))),
                     first.block_q, first.block_k)


def local_blocks(length: int, block: int, *, look_back: int = 0) -> BlockMask:
    """Local attention: each tile sees itself and the ``look_back`` tiles before it."""
    if look_back < 0:
        raise ValueError(f"look_back must be >= 0 tiles, got {look_back}")
    qi, kj = _tile_grid(length, block)
    return BlockMask((qi - kj >= 0) & (qi - kj <= look_back), block, block)
