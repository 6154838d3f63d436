"""Token-level mask predicates: which (query, key) pairs attention may see, stated as a function
of (batch, head, query index, key index), as PyTorch FlexAttention's ``mask_mod`` states them
(Dong et al. 2024, "Flex Attention: A Programming Model for Generating Optimized Attention
Kernels").

The ``xla`` reference evaluates the predicate densely. The ``pallas`` kernels classify every
kernel tile on the host, at trace time (``tile_classes``): tiles where no pair is visible are
skipped, tiles where every pair is visible run unmasked, and only the partial ones evaluate the
predicate inside the kernel. So one statement of a pattern serves both paths, at any token
granularity (LRA's 50-token blocks included).

The predicate must be elementwise: it is called with int32 index arrays that broadcast against
each other (on the host ``b [B,1,1,1]``, ``h [1,H,1,1]``, ``q [1,1,Q,1]``, ``k [1,1,1,K]``;
inside a kernel scalars ``b``, ``h`` and ``[block_q, block_k]`` grids ``q``, ``k``) and may use
arithmetic, comparisons, ``&``, ``|``, ``~`` and ``jnp.where`` on them, but no lookups into
arrays (a kernel cannot read captured arrays). Patterns defined on tiles that need a table (e.g.
BigBird's random blocks) go in ``tiles``: a ``BlockMask`` whose marked tiles are visible in
whole, in addition to the predicate.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool

from xformers_zoo.kernels.block_mask import BlockMask

# Host evaluation walks query rows in chunks of about this many (query, key) pairs, so deriving
# the tile classes of long sequences needs no N x N array.
_CHUNK_PAIRS = 1 << 23
_NO_MESH = jax.sharding.AbstractMesh((), ())


@dataclasses.dataclass(frozen=True, eq=False)
class MaskPredicate:
    """``fn(b, h, q, k) -> bool``: True where query ``q`` of head ``h`` of batch entry ``b`` may
    see key ``k`` (see the module docstring for what ``fn`` may do); ``tiles``: tiles visible in
    whole besides, or None. Compared by identity: build it once (e.g. in a layer's ``__init__``)
    so its derived tile schedules are cached across calls."""

    fn: Callable[..., jax.Array]
    tiles: BlockMask | None = None

    def __post_init__(self):
        if not callable(self.fn):
            raise TypeError(f"a mask predicate needs a callable fn(b, h, q, k), got "
                            f"{type(self.fn).__name__}")

    def __call__(self, b, h, q, k):
        """The predicate alone (without ``tiles``), broadcast to the index arrays' shape."""
        shape = jnp.broadcast_shapes(*(jnp.shape(x) for x in (b, h, q, k)))
        return jnp.broadcast_to(jnp.asarray(self.fn(b, h, q, k), bool), shape)

    def with_tiles(self, tiles: BlockMask | None) -> MaskPredicate:
        """The same predicate with another tile part."""
        return MaskPredicate(self.fn, tiles)


def as_predicate(mask: MaskPredicate | Callable | None) -> MaskPredicate | None:
    """``mask`` as a MaskPredicate: a bare callable is wrapped (a new wrapper per call: pass a
    MaskPredicate built once to keep schedules cached)."""
    if mask is None or isinstance(mask, MaskPredicate):
        return mask
    return MaskPredicate(mask)


def _index_grids(batch: int, heads: int, rows: np.ndarray, k_len: int):
    return (np.arange(batch, dtype=np.int32)[:, None, None, None],
            np.arange(heads, dtype=np.int32)[None, :, None, None],
            rows.astype(np.int32)[None, None, :, None],
            np.arange(k_len, dtype=np.int32)[None, None, None, :])


def _evaluate(predicate: MaskPredicate, grids) -> jax.Array:
    """The predicate over 4-D index grids, ``[batch or 1, heads or 1, rows, keys]``: axes it does
    not depend on stay 1, so a pattern shared by heads and batch costs one evaluation."""
    values = jnp.asarray(predicate.fn(*(jnp.asarray(g) for g in grids)), bool)
    rows, keys = grids[2].shape[2], grids[3].shape[3]
    return jnp.broadcast_to(values, jnp.broadcast_shapes(values.shape, (1, 1, rows, keys)))


def dense_mask(predicate: MaskPredicate, batch: int, heads: int, q_len: int,
               k_len: int) -> Bool[Array, "b h q k"]:
    """The element mask ``[batch or 1, heads or 1, q_len, k_len]`` (jnp) the predicate and its
    tiles stand for: what the ``xla`` reference applies."""
    mask = _evaluate(predicate, _index_grids(batch, heads, np.arange(q_len), k_len))
    if predicate.tiles is not None:
        mask = mask | jnp.asarray(predicate.tiles.to_dense(q_len, k_len))[None]
    return mask


@dataclasses.dataclass(frozen=True, eq=False)
class TileClasses:
    """Kernel tiles ``[heads or 1, q_tiles, k_tiles]``: ``visible`` marks tiles with any visible
    pair (the others are skipped), ``partial`` those among them that must evaluate the predicate
    (the rest are fully visible). Host data (numpy)."""

    visible: np.ndarray
    partial: np.ndarray

    def transpose(self) -> TileClasses:
        """Classes of key tiles per query tile turned into query tiles per key tile."""
        return TileClasses(self.visible.transpose(0, 2, 1), self.partial.transpose(0, 2, 1))


def _tile_reduce(values: np.ndarray, block_q: int, block_k: int, reduce) -> np.ndarray:
    """``[B, H, rows, cols]`` (multiples of the tiles) reduced per tile and over the batch to
    ``[H, rows / block_q, cols / block_k]``."""
    b, h, rows, cols = values.shape
    tiled = values.reshape(b, h, rows // block_q, block_q, cols // block_k, block_k)
    return reduce(tiled, axis=(0, 3, 5))


@functools.lru_cache(maxsize=64)
def tile_classes(predicate: MaskPredicate, batch: int, heads: int, q_len: int, k_len: int,
                 block_q: int, block_k: int, q_tiles: int, k_tiles: int) -> TileClasses:
    """Classifies the ``q_tiles`` x ``k_tiles`` kernel tiles of ``block_q`` x ``block_k`` over
    ``q_len`` x ``k_len`` tokens (the grid may run past them: pairs outside are ignored, padded
    keys being masked separately). A tile is visible or full only as it is for every batch entry
    (the schedule is shared by the batch); the ``tiles`` part must be divided by the kernel tiles,
    so its tiles are full. Evaluated on the host in chunks of query rows."""
    chunk = max(1, _CHUNK_PAIRS // max(k_tiles * block_k, 1) // block_q) * block_q
    any_parts, all_parts = [], []
    for start in range(0, q_tiles * block_q, chunk):
        rows = np.arange(start, min(start + chunk, q_tiles * block_q))
        in_range = rows < q_len
        # Host evaluation, also when traced inside shard_map (ring attention): without the
        # empty mesh, concrete arrays would be placed on the manual mesh in context.
        with jax.sharding.use_abstract_mesh(_NO_MESH), jax.ensure_compile_time_eval():
            grids = _index_grids(batch, heads, np.minimum(rows, max(q_len - 1, 0)), k_len)
            values = np.asarray(_evaluate(predicate, grids))
        pad_k = ((0, 0), (0, 0), (0, 0), (0, k_tiles * block_k - k_len))
        in_range = in_range[None, None, :, None]
        seen = np.pad(values & in_range, pad_k, constant_values=False)
        full = np.pad(values | ~in_range, pad_k, constant_values=True)
        any_parts.append(_tile_reduce(seen, block_q, block_k, np.any))
        all_parts.append(_tile_reduce(full, block_q, block_k, np.all))
    visible, full = np.concatenate(any_parts, axis=1), np.concatenate(all_parts, axis=1)
    if predicate.tiles is not None:
        whole = refine_tiles(predicate.tiles, block_q, block_k, q_tiles, k_tiles)
        visible, full = visible | whole, full | whole
    heads_out = max(visible.shape[0], full.shape[0])
    visible = np.broadcast_to(visible, (heads_out, *visible.shape[1:]))
    return TileClasses(visible.copy(), (visible & ~full).copy())


def refine_tiles(block_mask: BlockMask, block_q: int, block_k: int, q_tiles: int,
                 k_tiles: int) -> np.ndarray:
    """``block_mask`` refined to kernel tiles that divide its tiles, ``[heads or 1, q_tiles,
    k_tiles]``; tiles past its grid (padding only) are False."""
    if block_mask.block_q % block_q or block_mask.block_k % block_k:
        raise ValueError(f"kernel tiles {block_q}x{block_k} must divide block-mask tiles "
                         f"{block_mask.block_q}x{block_mask.block_k}")
    fine = np.repeat(block_mask.mask, block_mask.block_q // block_q, axis=1)
    fine = np.repeat(fine, block_mask.block_k // block_k, axis=2)
    fine = fine[:, :q_tiles, :k_tiles]
    pad = ((0, 0), (0, q_tiles - fine.shape[1]), (0, k_tiles - fine.shape[2]))
    return np.pad(fine, pad)
