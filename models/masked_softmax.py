"""Softmax attention from precomputed logits, shared by the variants whose logits do not come
from one dense ``q k^T`` (Reformer's hashed chunks, Synthesizer's synthesized logits,
Sinkhorn's sorted blocks)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from xformers_zoo.kernels.xla import MASKED, attention_dropout


def pad_to_multiple(x: Array, multiple: int, *, axis: int, value=0) -> Array:
    """``x`` padded with ``value`` along ``axis`` up to the next multiple of ``multiple``."""
    extra = -x.shape[axis] % multiple
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def attend(
    logits: Float[Array, "*batch q k"],
    values: Float[Array, "*batch k d"],
    visible: Bool[Array, "*batch q k"],
    *,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
) -> tuple[Float[Array, "*batch q d"], Float[Array, "*batch q"]]:
    """Masked softmax attention over the last axis of ``logits`` (any leading batch axes).

    Args:
      logits: attention scores; computed in float32 here whatever their dtype.
      values: one value vector per key.
      visible: which keys each query may see (broadcast against ``logits``).
      dropout_rate: dropout on the normalised weights (needs ``dropout_rng`` when > 0).

    Returns:
      The attention output (float32; zeros for a query that sees no key) and the log of its
      softmax normaliser, which callers combine across several partial attentions.
    """
    logits = jnp.where(visible, logits.astype(jnp.float32), MASKED)
    lse = jax.nn.logsumexp(logits, axis=-1)
    weights = jnp.exp(logits - lse[..., None])
    weights = jnp.where(jnp.any(visible, axis=-1, keepdims=True), weights, 0.0)
    weights = attention_dropout(weights, dropout_rate, dropout_rng)
    out = jnp.einsum("...qk,...kd->...qd", weights.astype(values.dtype), values,
                     preferred_element_type=jnp.float32)
    return out, lse


def dropout_key(rngs, rate: float, deterministic: bool) -> jax.Array | None:
    """A dropout key from ``rngs`` when dropout is active, else None."""
    if deterministic or rate == 0.0:
        return None
    if rngs is None:
        raise ValueError("deterministic=False with dropout needs rngs with a 'dropout' stream")
    return rngs.dropout()
