"""Helpers of the variants that compute attention themselves (Reformer's hashed chunks,
Synthesizer's synthesized logits, Sinkhorn's sorted blocks); their softmax over precomputed
logits is ``kernels.xla.softmax_attend``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array


def pad_to_multiple(x: Array, multiple: int, *, axis: int, value=0) -> Array:
    """``x`` padded with ``value`` along ``axis`` up to the next multiple of ``multiple``."""
    extra = -x.shape[axis] % multiple
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def dropout_key(rngs, rate: float, deterministic: bool) -> jax.Array | None:
    """A dropout key from ``rngs`` when dropout is active, else None."""
    if deterministic or rate == 0.0:
        return None
    if rngs is None:
        raise ValueError("deterministic=False with dropout needs rngs with a 'dropout' stream")
    return rngs.dropout()
