"""The ``cudnn`` implementation: cuDNN's fused attention through ``jax.nn.dot_product_attention``.
It serves bf16/fp16 on NVIDIA GPUs without block masks or attention dropout."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from xformers_zoo.kernels.dispatch import AttentionCall


def cudnn_rejects(call: AttentionCall) -> str | None:
    """Why cuDNN cannot serve ``call``, or None."""
    if call.backend != "gpu":
        return f"needs an NVIDIA GPU, backend is {call.backend}"
    if call.dtype not in ("bfloat16", "float16"):
        return f"needs bfloat16 or float16 inputs, got {call.dtype}"
    if call.head_dim % 8 or call.head_dim > 128:
        return f"head_dim must be a multiple of 8 up to 128, got {call.head_dim}"
    if call.block_mask is not None:
        return "block masks are not supported"
    if call.dropout_rate > 0.0:
        return "attention dropout is not supported"
    return None


def cudnn_attention(q, k, v, *, key_mask=None, block_mask=None, scale=None, causal=False,
                    dropout_rate=0.0, dropout_rng=None):
    """cuDNN flash attention; the key mask becomes a broadcast [b, 1, 1, k] mask."""
    del block_mask, dropout_rate, dropout_rng  # rejected above
    mask = None if key_mask is None else key_mask[:, None, None, :]
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=causal,
                                       implementation="cudnn")
    if key_mask is not None:
        # Rows of an all-padding sequence see no key: return zeros as the other paths do.
        out = jnp.where(key_mask.any(-1)[:, None, None, None], out, 0)
    return out
