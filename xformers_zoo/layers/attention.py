"""The shared multi-head attention layer: projections in, a variant's core in the middle,
the output projection out. Every variant runs inside this one layer."""

from __future__ import annotations

import jax.numpy as jnp
from einops import rearrange
from flax import nnx
from jaxtyping import Array, Bool, Float

from xformers_zoo.variants import VariantSpec


class MultiHeadAttention(nnx.Module):
    """Projects ``x`` to per-head q, k, v, applies the variant's core, and projects back.

    Queries and keys share one projection when the variant declares ``shared_qk`` (Reformer);
    a variant that never reads q and k (``uses_qk=False``) gets no q/k projections at all.
    ``key_mask`` None (inputs without padding) reaches only cores that declare
    ``accepts_no_mask``; the others get an all-True mask.
    """

    def __init__(self, spec: VariantSpec, attention_config, *, emb_dim: int, qkv_dim: int,
                 num_heads: int, max_length: int, dropout: float, dtype, rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.shared_qk = spec.capabilities.shared_qk
        self.uses_qk = spec.capabilities.uses_qk
        self.accepts_no_mask = spec.capabilities.accepts_no_mask

        def dense(i, o):
            return nnx.Linear(i, o, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)

        self.query = dense(emb_dim, qkv_dim) if self.uses_qk else None
        self.key = dense(emb_dim, qkv_dim) if self.uses_qk and not self.shared_qk else None
        self.value = dense(emb_dim, qkv_dim)
        self.out = dense(qkv_dim, emb_dim)
        self.core = spec.core(attention_config, num_heads=num_heads, head_dim=qkv_dim // num_heads,
                              max_length=max_length, dropout=dropout, rngs=rngs)

    def __call__(self, x: Float[Array, "b l e"], key_mask: Bool[Array, "b l"] | None, *,
                 deterministic: bool, rngs: nnx.Rngs | None = None) -> Float[Array, "b l e"]:
        if key_mask is None and not self.accepts_no_mask:
            key_mask = jnp.ones(x.shape[:2], bool)

        def heads(t):
            return rearrange(t, "b l (h d) -> b l h d", h=self.num_heads)

        v = heads(self.value(x))
        if self.uses_qk:
            q = heads(self.query(x))
            k = q if self.shared_qk else heads(self.key(x))
        else:
            q = k = None
        out = self.core(q, k, v, key_mask, deterministic=deterministic, rngs=rngs)
        return self.out(rearrange(out, "b l h d -> b l (h d)"))
