"""Token embeddings and positional encodings (sinusoidal, learned 1-D, learned 2-D)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float


def sinusoidal_table(length: int, dim: int) -> np.ndarray:
    """The fixed sin/cos table of Vaswani et al. (2017), ``[length, dim]``."""
    position = np.arange(length)[:, None]
    div = np.exp(np.arange(0, dim, 2) * (-math.log(10000.0) / dim))
    table = np.zeros((length, dim), np.float32)
    table[:, 0::2] = np.sin(position * div)
    table[:, 1::2] = np.cos(position * div[: dim // 2])
    return table


class SinusoidalPositions(nnx.Module):
    """Adds the fixed sinusoidal encoding; serves any length up to ``max_length``."""

    def __init__(self, max_length: int, dim: int):
        self.max_length = max_length
        self.table = nnx.Variable(jnp.asarray(sinusoidal_table(max_length, dim)))

    def __call__(self, x: Float[Array, "b l e"]) -> Float[Array, "b l e"]:
        _check_length(x.shape[1], self.max_length)
        return x + self.table[...][None, : x.shape[1]].astype(x.dtype)


class LearnedPositions(nnx.Module):
    """A learned ``[max_length, dim]`` table (LRA's learned positions), normal(0.02) init."""

    def __init__(self, max_length: int, dim: int, *, rngs: nnx.Rngs):
        self.max_length = max_length
        self.table = nnx.Param(jax.random.normal(rngs.params(), (max_length, dim)) * 0.02)

    def __call__(self, x: Float[Array, "b l e"]) -> Float[Array, "b l e"]:
        _check_length(x.shape[1], self.max_length)
        return x + self.table[...][None, : x.shape[1]].astype(x.dtype)


class LearnedPositions2D(nnx.Module):
    """A learned ``[height, width, dim]`` grid for images flattened row by row.

    ``upsampled(h, w)`` returns the table repeated on the grid to a larger image, the recipe the
    FlashAttention paper uses to move from Path-64 to Path-X (Dao et al. 2022).
    """

    def __init__(self, height: int, width: int, dim: int, *, rngs: nnx.Rngs):
        self.height, self.width = height, width
        self.table = nnx.Param(jax.random.normal(rngs.params(), (height, width, dim)) * 0.02)

    def upsampled(self, height: int, width: int) -> Float[Array, "h w e"]:
        """The grid repeated to ``height x width`` (each a multiple of the current size)."""
        return upsample_grid(self.table[...], height, width)

    def __call__(self, x: Float[Array, "b l e"]) -> Float[Array, "b l e"]:
        if x.shape[1] != self.height * self.width:
            raise ValueError(f"2-D positions expect {self.height}x{self.width}="
                             f"{self.height * self.width} tokens, got {x.shape[1]}")
        return x + self.table[...].reshape(-1, x.shape[-1])[None].astype(x.dtype)


def upsample_grid(table: Float[Array, "h w e"], height: int,
                  width: int) -> Float[Array, "H W e"]:
    """A ``[h, w, dim]`` position grid repeated to ``[height, width, dim]``: each position
    covers a ``height/h x width/w`` block, so a grid learned on a small image serves one whose
    side is a whole multiple (Path-64 -> Path-X, Dao et al. 2022, section 4)."""
    if table.ndim != 3:
        raise ValueError(f"a 2-D position grid is [height, width, dim], got shape {table.shape}")
    h, w = table.shape[:2]
    if height % h or width % w or height < h or width < w:
        raise ValueError(f"can only upsample {h}x{w} positions by whole factors, asked for "
                         f"{height}x{width}")
    return jnp.repeat(jnp.repeat(table, height // h, axis=0), width // w, axis=1)


def _check_length(length: int, max_length: int) -> None:
    if length > max_length:
        raise ValueError(f"sequence of {length} tokens exceeds the model's max_length "
                         f"{max_length}")


def make_positions(kind: str, max_length: int, dim: int, *, image_shape: tuple[int, int] | None,
                   rngs: nnx.Rngs) -> nnx.Module | None:
    """The positional encoding named by ``ModelConfig.positional``; None for "none"."""
    if kind == "sinusoidal":
        return SinusoidalPositions(max_length, dim)
    if kind == "learned":
        return LearnedPositions(max_length, dim, rngs=rngs)
    if kind == "learned_2d":
        if image_shape is None:
            raise ValueError("positional='learned_2d' needs a task with an image shape")
        return LearnedPositions2D(*image_shape, dim, rngs=rngs)
    if kind == "none":
        return None
    raise ValueError(f"unknown positional encoding {kind!r}; known: sinusoidal, learned, "
                     "learned_2d, none")
