"""Attention dropout inside the Pallas kernels from a counter-based hash.

Whether attention weight (batch, head, query i, key j) is kept is a pure function of (seed,
batch, head, i, j), as in counter-based generators (Salmon et al. 2011, "Parallel random numbers:
as easy as 1, 2, 3"): the forward and both backward kernels recompute the same decisions tile by
tile, so no N x N mask is stored (FlashAttention, Dao et al. 2022, section 3.1, does the same with
Philox). MurmurHash3's 32-bit finaliser (``fmix``, Appleby; a bijection with full avalanche) gives
every (batch, head) a stream word, and within it every query row an odd key and every key column
an odd multiplier:

    stream(b, h) = fmix(fmix((b * heads + h) * C1 ^ seed0) ^ seed1)     (once per program, in XLA)
    row(i)       = fmix(stream ^ i * C2) | 1                             (once per query row)
    column(j)    = fmix(fmix(stream ^ j * C3)) | 1                       (once per key column)
    bits(i, j)   = row(i) * column(j)  (mod 2^32)                        (per element)

The weight is kept when ``bits`` (read as a signed int32, uniform over its range) reaches
``rate * 2^32 - 2^31``. The per-element product is multiply-shift hashing (Dietzfelbinger et al.
1997, "A reliable randomized algorithm for the closest-pair problem"): for a random odd
multiplier the top bits of the product are universal over keys, so decisions of different rows
under one column, and of one row under different columns, behave as independent draws (the tests
check the kept fraction, neighbour agreement and 2 x 2 patterns). One multiply, compare and select
per element replace a full hash per element, which cost more than the kernels' own per-element
work (kernels/NOTES.md, v5). Everything is int32 arithmetic with wrap-around and logical shifts
(the same bits as uint32), which Pallas' Triton lowering and interpret mode both execute exactly.
``keep_mask`` materialises the same decisions for tests.

The Mosaic GPU kernels do not hash in-kernel: they read the row and column words of every
position (``position_words``, [b, h, n] int32 computed in XLA) beside the log-sum-exp and apply
``keep_outer``, the same multiply and compare. In a wgmma accumulator layout each thread holds 32
of a 128-key tile's columns (each column replicated over 32 threads), so two ``fmix`` per column
per step would cost about three times the per-element multiply, compare and select.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Bool, Int


def _int32(value: int) -> np.int32:
    """A uint32 constant as the int32 with the same bits."""
    return np.array(value, np.uint32).view(np.int32)[()]


_FMIX_1, _FMIX_2 = _int32(0x85EBCA6B), _int32(0xC2B2AE35)
_STREAM, _ROW, _COLUMN = _int32(0x9E3779B9), _int32(0x7FEB352D), _int32(0x846CA68B)


def _shift(x, bits: int):
    return lax.shift_right_logical(x, jnp.full_like(x, bits))


def fmix(x: Int[Array, "..."]) -> Int[Array, "..."]:
    """MurmurHash3's 32-bit finaliser on int32 bits (wrapping multiplies, logical shifts)."""
    x = x ^ _shift(x, 16)
    x = x * _FMIX_1
    x = x ^ _shift(x, 13)
    x = x * _FMIX_2
    return x ^ _shift(x, 16)


def seed_words(dropout_rng: jax.Array) -> Int[Array, " 2"]:
    """Two int32 seed words drawn from a JAX PRNG key (typed or raw)."""
    return lax.bitcast_convert_type(jax.random.bits(dropout_rng, (2,), jnp.uint32), jnp.int32)


def head_streams(seed: Int[Array, " 2"], batch: int, heads: int,
                 first_row: int | Int[Array, ""] = 0) -> Int[Array, " bh"]:
    """Per (batch, head) stream words ``[batch * heads]``, entry ``b * heads + h``, for the
    rows ``first_row .. first_row + batch`` of a larger batch (a shard of it gets the words the
    whole batch's call gives those rows)."""
    index = jnp.arange(batch * heads, dtype=jnp.int32) + jnp.asarray(first_row, jnp.int32) * heads
    return fmix(fmix(index * _STREAM ^ seed[0]) ^ seed[1])


def threshold(rate: float) -> int:
    """Keep threshold on the signed 32-bit ``bits``: P(bits >= t) = 1 - (t + 2^31) / 2^32,
    within 2^-32 of 1 - rate."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1), got {rate}")
    return min(int(round(rate * 2**32)), 2**32 - 1) - 2**31


def row_words(stream, rows: Int[Array, "... q"]) -> Int[Array, "... q"]:
    """The odd row keys of query positions ``rows`` (``stream`` broadcasts against them)."""
    return fmix(stream ^ rows * _ROW) | 1


def column_words(stream, cols: Int[Array, "... k"]) -> Int[Array, "... k"]:
    """The odd column multipliers of key positions ``cols`` (``stream`` broadcasts)."""
    return fmix(fmix(stream ^ cols * _COLUMN)) | 1


def keep_outer(rows: Int[Array, " m"], cols: Int[Array, " n"], rate: float) -> Bool[Array, "m n"]:
    """Keep decisions of every (row word, column word) pair: one wrapping multiply and compare
    per element. The product commutes, so a transposed tile (keys as rows, as in the Mosaic
    backward) passes column words as ``rows``. Written with ``broadcast_in_dim`` so that Mosaic
    GPU kernels can call it on vectors in an accumulator's row and column layouts."""
    shape = (rows.shape[0], cols.shape[0])
    bits = lax.broadcast_in_dim(rows, shape, [0]) * lax.broadcast_in_dim(cols, shape, [1])
    return bits >= threshold(rate)


def keep_bits(stream, rows: Int[Array, " q"], cols: Int[Array, " k"],
              rate: float) -> Bool[Array, "q k"]:
    """Keep decisions for query positions ``rows`` x key positions ``cols`` of one stream."""
    return keep_outer(row_words(stream, rows), column_words(stream, cols), rate)  # [q, k]


def keep_tile(stream, q_tile, k_tile, block_q: int, block_k: int,
              rate: float) -> Bool[Array, "bq bk"]:
    """In-kernel keep decisions for one (query tile, key tile)."""
    rows = q_tile * block_q + lax.iota(jnp.int32, block_q)
    cols = k_tile * block_k + lax.iota(jnp.int32, block_k)
    return keep_bits(stream, rows, cols, rate)


def position_words(streams: Int[Array, " bh"], batch: int, heads: int, q_len: int,
                   k_len: int) -> tuple[Int[Array, "b h q"], Int[Array, "b h k"]]:
    """Row words of every query position and column words of every key position of every
    (batch, head) stream, ``[batch, heads, q_len]`` and ``[batch, heads, k_len]``: what the
    Mosaic kernels read beside the log-sum-exp instead of hashing in-kernel."""
    streams = streams.reshape(batch, heads, 1)
    return (row_words(streams, jnp.arange(q_len, dtype=jnp.int32)),
            column_words(streams, jnp.arange(k_len, dtype=jnp.int32)))


def keep_mask(dropout_rng: jax.Array, rate: float, batch: int, heads: int, q_len: int,
              k_len: int) -> Bool[Array, "b h q k"]:
    """The keep decisions the kernels apply for ``dropout_rng`` and ``rate``, materialised as
    ``[batch, heads, q_len, k_len]`` bool (N x N: for tests at small lengths)."""
    streams = head_streams(seed_words(dropout_rng), batch, heads).reshape(batch, heads)
    rows = jnp.arange(q_len, dtype=jnp.int32)
    cols = jnp.arange(k_len, dtype=jnp.int32)
    per_stream = jax.vmap(lambda s: keep_bits(s, rows, cols, rate))
    return per_stream(streams.reshape(-1)).reshape(batch, heads, q_len, k_len)
