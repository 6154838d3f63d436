"""Chunked feed-forward (Kitaev et al. 2020, "Reformer: The Efficient Transformer", section 4):
the position-wise MLP applied to slices of the sequence one at a time, so that its wide hidden
activations exist for one slice at a time instead of the whole sequence."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx
from jaxtyping import Array, Float


def chunked_feed_forward(mlp: nnx.Module, x: Float[Array, "b l e"], chunks: int, *,
                         deterministic: bool, rngs: nnx.Rngs | None) -> Float[Array, "b l e"]:
    """``mlp(x)`` computed over ``chunks`` slices of the sequence axis in turn.

    The slices run in a ``lax.map`` (a loop, so one slice's hidden layer is live at a time) and
    each slice is rematerialised, so the backward pass also keeps only the slice inputs. A
    length that does not divide into ``chunks`` is padded and the padding dropped afterwards;
    the MLP is position-wise, so padding never reaches real positions. With dropout, each slice
    draws its own key folded from one key of ``rngs``.
    """
    if chunks < 1:
        raise ValueError(f"ff_chunks must be >= 1, got {chunks}")
    length = x.shape[1]
    extra = -length % chunks
    xs = rearrange(jnp.pad(x, ((0, 0), (0, extra), (0, 0))), "b (c n) e -> c b n e", c=chunks)
    graphdef, state = nnx.split(mlp)
    keys = None
    if not deterministic and rngs is not None:
        keys = jax.random.split(rngs.dropout(), chunks)

    @jax.checkpoint
    def one_slice(state, piece, key):
        slice_rngs = None if key is None else nnx.Rngs(dropout=key)
        return nnx.merge(graphdef, state)(piece, deterministic=deterministic, rngs=slice_rngs)

    ys = jax.lax.map(lambda args: one_slice(state, *args), (xs, keys))
    return rearrange(ys, "c b n e -> b (c n) e")[:, :length]
