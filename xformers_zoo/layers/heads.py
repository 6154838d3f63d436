"""Pooling and heads: CLS or mean pooling, the LRA classifier head (Dense, ReLU, Dense), the
dual-encoder features [u, v, u*v, u-v] (Tay et al. 2020) and the masked-token head of
self-pretraining (Amos et al. 2024)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float


def pool(x: Float[Array, "b l e"], key_mask: Bool[Array, "b l"], kind: str) -> Float[Array, "b e"]:
    """"cls" takes position 0 (where the model put its CLS token); "mean" averages real tokens."""
    if kind == "cls":
        return x[:, 0]
    if kind == "mean":
        weights = key_mask.astype(x.dtype)[..., None]
        total = jnp.maximum(weights.sum(axis=1), 1.0)
        return (x * weights).sum(axis=1) / total
    raise ValueError(f"unknown pooling {kind!r}; known: cls, mean")


class ClassifierHead(nnx.Module):
    """Dense(hidden) -> ReLU -> Dense(classes), logits in float32."""

    def __init__(self, in_dim: int, hidden_dim: int, num_classes: int, *, dtype, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(in_dim, hidden_dim, dtype=dtype, param_dtype=jnp.float32,
                                 rngs=rngs)
        self.logits = nnx.Linear(hidden_dim, num_classes, dtype=jnp.float32,
                                 param_dtype=jnp.float32, rngs=rngs)

    def __call__(self, x: Float[Array, "b e"]) -> Float[Array, "b c"]:
        return self.logits(jax.nn.relu(self.hidden(x)).astype(jnp.float32))


class MaskedTokenHead(nnx.Module):
    """Per-token logits over the task's vocabulary: Dense -> GELU -> LayerNorm -> Dense, the
    masked-language-model head of BERT (Devlin et al. 2019) as used for self-pretraining on the
    task's own inputs (Amos et al. 2024, "Never Train from Scratch")."""

    def __init__(self, emb_dim: int, vocab_size: int, *, dtype, rngs: nnx.Rngs):
        self.transform = nnx.Linear(emb_dim, emb_dim, dtype=dtype, param_dtype=jnp.float32,
                                    rngs=rngs)
        self.norm = nnx.LayerNorm(emb_dim, dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs)
        self.logits = nnx.Linear(emb_dim, vocab_size, dtype=jnp.float32,
                                 param_dtype=jnp.float32, rngs=rngs)

    def __call__(self, x: Float[Array, "b l e"]) -> Float[Array, "b l v"]:
        return self.logits(self.norm(jax.nn.gelu(self.transform(x)).astype(jnp.float32)))


def dual_features(u: Float[Array, "b e"], v: Float[Array, "b e"]) -> Float[Array, "b 4e"]:
    """The two-tower interaction features [u, v, u*v, u-v]."""
    return jnp.concatenate([u, v, u * v, u - v], axis=-1)
