"""The ``cudnn`` implementation: cuDNN's fused attention through ``jax.nn.dot_product_attention``.
It serves bf16/fp16 on NVIDIA GPUs without block masks or attention dropout. Calls without a key
mask get the plain cuDNN call; masked ones pass per-sequence lengths (``cudnn_call_form``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from xformers_zoo.kernels.dispatch import AttentionCall, register_implementation


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
    if call.mask_predicate is not None:
        return "mask predicates are not supported"
    if call.dropout_rate > 0.0:
        return ("attention dropout is not supported (the pallas kernels apply it in-kernel; xla "
                "materialises the N x N weights)")
    if call.causal and call.q_len != call.k_len:
        return ("causal masks with q_len != k_len: cuDNN aligns them top-left, the other "
                "implementations bottom-right")
    if call.has_key_mask and not call.key_mask_is_prefix:
        return ("key masks must be right padding (key_mask_is_prefix=True): cuDNN takes "
                "sequence lengths, not a [batch, k] mask")
    return None


# cuDNN's fused backward pass takes lengths that are multiples of 64 only; other lengths are
# padded up to one and the padded keys masked through the sequence lengths.
_LENGTH_MULTIPLE = 64


def cudnn_takes_lengths(*, has_key_mask: bool, q_len: int, k_len: int) -> bool:
    """Whether cuDNN is called with per-sequence lengths: for a key mask, or to mask the keys
    padded up to a multiple of 64. Otherwise it gets the plain call, which runs no padding mask
    (measurably faster, and what a user of ``jax.nn.dot_product_attention`` would time)."""
    return has_key_mask or bool(q_len % _LENGTH_MULTIPLE or k_len % _LENGTH_MULTIPLE)


def cudnn_call_form(call: AttentionCall) -> str:
    """"lengths" or "plain": how ``cudnn_attention`` calls cuDNN for ``call``."""
    return "lengths" if cudnn_takes_lengths(has_key_mask=call.has_key_mask, q_len=call.q_len,
                                            k_len=call.k_len) else "plain"


@register_implementation("cudnn", rejects=cudnn_rejects, description="cuDNN fused attention",
                         form=cudnn_call_form, partitioned=True)
def cudnn_attention(q, k, v, *, key_mask=None, block_mask=None, scale=None, causal=False,
                    dropout_rate=0.0, dropout_rng=None, key_mask_is_prefix=True,
                    mask_predicate=None):
    """cuDNN flash attention. Without a key mask, and with lengths that are multiples of 64, it
    is the plain call; otherwise a right-padding key mask (any key mask is taken as right
    padding: ``cudnn_rejects`` refuses calls that do not say so) and the padding up to a
    multiple of 64 become per-sequence query and key lengths."""
    del block_mask, dropout_rate, dropout_rng, key_mask_is_prefix, mask_predicate  # rejected
    batch, q_len, _, head_dim = q.shape
    k_len = k.shape[1]
    scale = head_dim**-0.5 if scale is None else scale
    if not cudnn_takes_lengths(has_key_mask=key_mask is not None, q_len=q_len, k_len=k_len):
        return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal,
                                            implementation="cudnn")
    key_lengths = (jnp.full((batch,), k_len, jnp.int32) if key_mask is None
                   else key_mask.sum(-1).astype(jnp.int32))

    def pad(x):
        extra = -x.shape[1] % _LENGTH_MULTIPLE
        return jnp.pad(x, ((0, 0), (0, extra), (0, 0), (0, 0))) if extra else x

    out = jax.nn.dot_product_attention(
        pad(q), pad(k), pad(v), scale=scale, is_causal=causal, implementation="cudnn",
        query_seq_lengths=jnp.full((batch,), q_len, jnp.int32),
        key_value_seq_lengths=key_lengths)[:, :q_len]
    # Rows of an all-padding sequence see no key: return zeros as the other paths do.
    return jnp.where((key_lengths > 0)[:, None, None, None], out, 0).astype(q.dtype)
