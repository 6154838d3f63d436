"""The attention implementations ``xformers-zoo bench kernels`` compares, each behind one
factory ``(b, n, h, d, block_mask=None, tiles=None, dropout_rate=0.0) -> (attend(q, k, v) | None,
skip reason)``."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from xformers_zoo.kernels.cudnn import cudnn_attention
from xformers_zoo.kernels.pallas_attention import pallas_attention
from xformers_zoo.kernels.pallas_layout import FlashTiles, PassTiles
from xformers_zoo.kernels.xla import xla_attention

# The dense reference materialises float32 logits and probabilities (and their gradients).
XLA_BYTES_LIMIT = 40e9
# Implementations that apply attention dropout.
DROPOUT_IMPLS = ("pallas", "pallas_mosaic", "xla")
# Timed with dropout only: without it, "pallas" already runs the Mosaic kernels on Hopper.
DROPOUT_ONLY_IMPLS = ("pallas_mosaic",)


def _dropout_key(rate: float):
    """A fixed key (timed calls stay comparable), or None without dropout."""
    return jax.random.key(0) if rate else None


def make_inputs(b: int, n: int, h: int, d: int, *, seed: int):
    """Fresh random bf16 q, k, v and output cotangent, [b, n, h, d]."""
    keys = jax.random.split(jax.random.key(seed), 4)
    return tuple(jax.random.normal(key, (b, n, h, d), jnp.bfloat16) for key in keys)


def parse_tiles(text: str) -> FlashTiles:
    """``"q,k,warps,stages/.../..."`` (forward / key-value grads / query grads) to FlashTiles."""
    passes = [PassTiles(*map(int, part.split(","))) for part in text.split("/")]
    if len(passes) != 3:
        raise ValueError(f"tiles must read 'q,k,warps,stages[,max_steps]' three times, "
                         f"'/'-separated; got {text!r}")
    return FlashTiles(*passes)


def pallas(*, b, n, h, d, block_mask=None, tiles=None, dropout_rate=0.0, kernels=None):
    """Our kernels; ``kernels`` None picks the kernel family as calls do (Mosaic on Hopper where
    it serves)."""
    del b, n, h
    return (lambda q, k, v: pallas_attention(
        q, k, v, block_mask=block_mask, tiles=tiles, scale=d**-0.5, dropout_rate=dropout_rate,
        dropout_rng=_dropout_key(dropout_rate), kernels=kernels)), None


def pallas_triton(**kwargs):
    """Our Triton kernels everywhere (the Mosaic kernels' baseline)."""
    return pallas(**kwargs, kernels="triton")


def pallas_mosaic(**kwargs):
    """Our Mosaic kernels by name: with dropout or a block mask, which ``pallas`` still gives
    to the Triton kernels (``pallas_attention.MOSAIC_VALIDATED``), the Mosaic path beside them.
    Off Hopper GPUs its rows carry the refusal as their error."""
    return pallas(**kwargs, kernels="mosaic")


def cudnn(*, b, n, h, d, **_):
    """cuDNN as a user calls it without a mask: the plain call (no sequence lengths)."""
    del b, n, h
    return (lambda q, k, v: cudnn_attention(q, k, v, scale=d**-0.5)), None


def cudnn_lengths(*, b, n, h, d, **_):
    """cuDNN with a key padding mask (all keys real), passed as per-sequence lengths: what a
    masked call pays over the plain one."""
    del h

    def attend(q, k, v):
        return cudnn_attention(q, k, v, key_mask=jnp.ones((b, n), bool), scale=d**-0.5)

    return attend, None


def xla(*, b, n, h, d, dropout_rate=0.0, **_):
    # Logits, probabilities and their gradients (plus the keep mask and dropped weights).
    need = (5 if dropout_rate else 3) * b * h * n * n * 4
    if need > XLA_BYTES_LIMIT:
        return None, f"N x N float32 intermediates need about {need / 1e9:.0f} GB"
    return (lambda q, k, v: xla_attention(
        q, k, v, scale=d**-0.5, dropout_rate=dropout_rate,
        dropout_rng=_dropout_key(dropout_rate))), None


def jax_triton(*, b, n, h, d, **_):
    """JAX's bundled Pallas Triton FlashAttention (jax.experimental.pallas.ops.gpu.attention)."""
    del b, n, h
    from jax.experimental.pallas.ops.gpu import attention

    return (lambda q, k, v: attention.mha(q, k, v, None, sm_scale=d**-0.5)), None


def jax_mgpu(*, b, n, h, d, **_):
    """JAX's bundled Pallas Mosaic GPU FlashAttention for Hopper (ops.gpu.attention_mgpu); it
    applies no softmax scale (q is pre-scaled) and takes float16."""
    del b, n, h
    from jax.experimental.pallas.ops.gpu import attention_mgpu as mgpu

    config = mgpu.TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2,
                               block_q_dkv=64, block_kv_dkv=64, block_q_dq=64, block_kv_dq=64)
    def attend(q, k, v):
        # The kernel takes float16 only: the casts are part of the timed call (a few percent).
        q, k, v = ((x * s).astype(jnp.float16) for x, s in ((q, d**-0.5), (k, 1), (v, 1)))
        return mgpu.attention(q, k, v, config).astype(jnp.bfloat16)

    return attend, None


IMPLS: dict[str, Callable] = {"pallas": pallas, "pallas_triton": pallas_triton,
                              "pallas_mosaic": pallas_mosaic, "cudnn": cudnn,
                              "cudnn-lengths": cudnn_lengths, "xla": xla,
                              "jax_triton": jax_triton, "jax_mgpu": jax_mgpu}
