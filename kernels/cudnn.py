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
    if call.has_key_mask and not call.key_mask_is_prefix:
        return ("key masks must be right padding (key_mask_is_prefix=True): cuDNN takes "
                "sequence lengths, not a [batch, k] mask")
    return None


def cudnn_attention(q, k, v, *, key_mask=None, block_mask=None, scale=None, causal=False,
                    dropout_rate=0.0, dropout_rng=None):
    """cuDNN flash attention; a right-padding key mask becomes per-sequence key lengths."""
    del block_mask, dropout_rate, dropout_rng  # rejected above
    lengths = {}
    if key_mask is not None:
        batch, q_len = q.shape[:2]
        lengths = {"query_seq_lengths": jnp.full((batch,), q_len, jnp.int32),
                   "key_value_seq_lengths": key_mask.sum(-1).astype(jnp.int32)}
    out = jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal,
                                       implementation="cudnn", **lengths)
    if key_mask is not None:
        # Rows of an all-padding sequence see no key: return zeros as the other paths do.
        out = jnp.where(key_mask.any(-1)[:, None, None, None], out, 0)
    return out
