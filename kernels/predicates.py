"""Mask-predicate builders for the sparse attention patterns, at token granularity (see
``kernels.mask_predicate``; ``kernels.masks`` builds the tile-granular ``BlockMask`` forms).

- ``local_blocks``: block-local attention of the LRA paper (Tay et al. 2021), blocks of any
  number of tokens (LRA's 50 included).
- ``sliding_window``: Longformer's local window (Beltagy et al. 2020), an exact token band.
- ``global_tokens``: Longformer/BigBird global tokens: the first tokens see and are seen by all.
- ``block_window``: BigBird's window of neighbouring blocks (Zaheer et al. 2020).
- ``fixed`` and ``strided``: the two factorised patterns of the Sparse Transformer (Child et al.
  2019, "Generating Long Sequences with Sparse Transformers").

Combine them with ``union``. Every builder returns a new ``MaskPredicate``: build a pattern once
and reuse the object, since derived tile schedules are cached per object.
"""

from __future__ import annotations

from xformers_zoo.kernels import masks
from xformers_zoo.kernels.block_mask import BlockMask
from xformers_zoo.kernels.mask_predicate import MaskPredicate


def _positive(**values: int) -> None:
    for name, value in values.items():
        if value <= 0:
            raise ValueError(f"{name} must be a positive number of tokens, got {value}")


def local_blocks(block: int, *, look_back: int = 0) -> MaskPredicate:
    """Tokens see the keys of their own block of ``block`` tokens and of the ``look_back``
    blocks before it."""
    _positive(block=block)
    if look_back < 0:
        raise ValueError(f"look_back must be >= 0 blocks, got {look_back}")

    def visible(b, h, q, k):
        back = q // block - k // block
        return (back >= 0) & (back <= look_back)

    return MaskPredicate(visible)


def sliding_window(window: int) -> MaskPredicate:
    """Keys at most ``window // 2`` tokens away on either side: a band of ``window`` tokens
    (``window`` 0 or 1: the diagonal)."""
    if window < 0:
        raise ValueError(f"window must be >= 0 tokens, got {window}")
    radius = window // 2
    return MaskPredicate(lambda b, h, q, k: (q - k <= radius) & (k - q <= radius))


def global_tokens(count: int) -> MaskPredicate:
    """The first ``count`` tokens attend to every key and every query attends to them."""
    if count < 0:
        raise ValueError(f"count must be >= 0 tokens, got {count}")
    return MaskPredicate(lambda b, h, q, k: (q < count) | (k < count))


def block_window(block: int, radius: int) -> MaskPredicate:
    """Keys in the blocks of ``block`` tokens at most ``radius`` blocks from the query's."""
    _positive(block=block)
    if radius < 0:
        raise ValueError(f"radius must be >= 0 blocks, got {radius}")

    def visible(b, h, q, k):
        apart = q // block - k // block
        return (apart <= radius) & (-apart <= radius)

    return MaskPredicate(visible)


def fixed(chunk: int, summary: int) -> MaskPredicate:
    """Sparse Transformer fixed pattern: keys of the query's chunk of ``chunk`` tokens, and the
    last ``summary`` tokens of every chunk (the paper's c)."""
    _positive(chunk=chunk, summary=summary)
    if summary > chunk:
        raise ValueError(f"summary ({summary}) must be at most chunk ({chunk}) tokens")

    def visible(b, h, q, k):
        return (q // chunk == k // chunk) | (k % chunk >= chunk - summary)

    return MaskPredicate(visible)


def strided(stride: int) -> MaskPredicate:
    """Sparse Transformer strided pattern: the previous ``stride`` tokens and every key a whole
    number of strides back. Looks back only (causal by construction)."""
    _positive(stride=stride)

    def visible(b, h, q, k):
        back = q - k
        return (back >= 0) & ((back < stride) | (back % stride == 0))

    return MaskPredicate(visible)


def union(*predicates: MaskPredicate, tiles: BlockMask | None = None) -> MaskPredicate:
    """Pairs any of ``predicates`` marks, plus ``tiles`` (and their own tiles) in whole."""
    if not predicates:
        raise ValueError("union needs at least one predicate")
    parts = [p.tiles for p in predicates if p.tiles is not None]
    if tiles is not None:
        parts.append(tiles)
    fns = [p.fn for p in predicates]

    def visible(b, h, q, k):
        result = fns[0](b, h, q, k)
        for fn in fns[1:]:
            result = result | fn(b, h, q, k)
        return result

    return MaskPredicate(visible, masks.union(*parts) if parts else None)
