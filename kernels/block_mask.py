"""Block masks: which (query tile, key tile) pairs of an attention matrix are computed.

Block-sparse variants (Longformer, BigBird, Local, Sparse Transformer) describe their pattern as
a ``BlockMask``; the ``pallas`` implementation skips empty tiles, the ``xla`` reference expands the
mask to elements. The mask is host data (numpy): it fixes the kernel's schedule at trace time.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class BlockMask:
    """A boolean tile mask ``[heads or 1, num_q_tiles, num_k_tiles]`` over tiles of
    ``block_q`` x ``block_k`` elements. The last tile of each axis may be partial."""

    mask: np.ndarray
    block_q: int
    block_k: int

    def __post_init__(self):
        mask = np.asarray(self.mask, dtype=bool)
        if mask.ndim == 2:
            mask = mask[None]
        if mask.ndim != 3:
            raise ValueError(f"block mask must be [q_tiles, k_tiles] or [heads, q_tiles, k_tiles], "
                             f"got shape {self.mask.shape}")
        if self.block_q <= 0 or self.block_k <= 0:
            raise ValueError(f"tile sizes must be positive, got {self.block_q}x{self.block_k}")
        object.__setattr__(self, "mask", mask)

    @property
    def num_heads(self) -> int:
        """1 for a mask shared by all heads."""
        return self.mask.shape[0]

    @property
    def density(self) -> float:
        """Fraction of tiles that are computed."""
        return float(self.mask.mean())

    def check_shape(self, q_len: int, k_len: int, num_heads: int) -> None:
        """Raises if the tile grid does not cover ``q_len`` x ``k_len`` for ``num_heads`` heads."""
        want = (-(-q_len // self.block_q), -(-k_len // self.block_k))
        if self.mask.shape[1:] != want:
            raise ValueError(
                f"block mask has {self.mask.shape[1:]} tiles but lengths {q_len}x{k_len} with "
                f"tiles {self.block_q}x{self.block_k} need {want}"
            )
        if self.num_heads not in (1, num_heads):
            raise ValueError(f"block mask has {self.num_heads} heads; expected 1 or {num_heads}")

    def to_dense(self, q_len: int, k_len: int) -> np.ndarray:
        """The element mask ``[heads or 1, q_len, k_len]`` this block mask stands for."""
        dense = np.repeat(np.repeat(self.mask, self.block_q, axis=1), self.block_k, axis=2)
        return dense[:, :q_len, :k_len]
