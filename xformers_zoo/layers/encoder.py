"""The pre-LayerNorm Transformer encoder shared by every variant (Vaswani et al. 2017, with the
pre-norm placement of Xiong et al. 2020 that LRA uses)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float

from xformers_zoo.layers.attention import MultiHeadAttention
from xformers_zoo.variants import VariantSpec


class MlpBlock(nnx.Module):
    """Dense -> GELU -> dropout -> Dense."""

    def __init__(self, emb_dim: int, mlp_dim: int, *, dropout: float, dtype, rngs: nnx.Rngs):
        self.up = nnx.Linear(emb_dim, mlp_dim, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        self.down = nnx.Linear(mlp_dim, emb_dim, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        self.dropout = nnx.Dropout(dropout)

    def __call__(self, x: Float[Array, "b l e"], *, deterministic: bool,
                 rngs: nnx.Rngs | None) -> Float[Array, "b l e"]:
        h = jax.nn.gelu(self.up(x))
        h = self.dropout(h, deterministic=deterministic, rngs=rngs)
        return self.down(h)


class EncoderBlock(nnx.Module):
    """x + Dropout(Attention(LN(x))), then x + Dropout(MLP(LN(x)))."""

    def __init__(self, spec: VariantSpec, attention_config, *, emb_dim: int, qkv_dim: int,
                 mlp_dim: int, num_heads: int, max_length: int, dropout: float,
                 attention_dropout: float, dtype, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(emb_dim, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        self.attention = MultiHeadAttention(
            spec, attention_config, emb_dim=emb_dim, qkv_dim=qkv_dim, num_heads=num_heads,
            max_length=max_length, dropout=attention_dropout, dtype=dtype, rngs=rngs)
        self.norm2 = nnx.LayerNorm(emb_dim, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        self.mlp = MlpBlock(emb_dim, mlp_dim, dropout=dropout, dtype=dtype, rngs=rngs)
        self.dropout = nnx.Dropout(dropout)

    def __call__(self, x: Float[Array, "b l e"], key_mask: Bool[Array, "b l"], *,
                 deterministic: bool, rngs: nnx.Rngs | None = None) -> Float[Array, "b l e"]:
        h = self.attention(self.norm1(x), key_mask, deterministic=deterministic, rngs=rngs)
        x = x + self.dropout(h, deterministic=deterministic, rngs=rngs)
        h = self.mlp(self.norm2(x), deterministic=deterministic, rngs=rngs)
        return x + self.dropout(h, deterministic=deterministic, rngs=rngs)


def _run_block(block: EncoderBlock, x, key_mask, deterministic, rngs):
    return block(x, key_mask, deterministic=deterministic, rngs=rngs)


class Encoder(nnx.Module):
    """A stack of ``EncoderBlock`` and a final LayerNorm; ``remat`` recomputes each block's
    activations in the backward pass instead of storing them (memory for long sequences)."""

    def __init__(self, spec: VariantSpec, attention_config, *, num_layers: int, emb_dim: int,
                 qkv_dim: int, mlp_dim: int, num_heads: int, max_length: int, dropout: float,
                 attention_dropout: float, dtype, remat: bool, rngs: nnx.Rngs):
        self.blocks = nnx.List([
            EncoderBlock(spec, attention_config, emb_dim=emb_dim, qkv_dim=qkv_dim,
                         mlp_dim=mlp_dim, num_heads=num_heads, max_length=max_length,
                         dropout=dropout, attention_dropout=attention_dropout, dtype=dtype,
                         rngs=rngs)
            for _ in range(num_layers)
        ])
        self.norm = nnx.LayerNorm(emb_dim, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        self.remat = remat

    def __call__(self, x: Float[Array, "b l e"], key_mask: Bool[Array, "b l"], *,
                 deterministic: bool, rngs: nnx.Rngs | None = None) -> Float[Array, "b l e"]:
        run = nnx.remat(_run_block, static_argnums=(3,)) if self.remat else _run_block
        for block in self.blocks:
            x = run(block, x, key_mask, deterministic, rngs)
        return self.norm(x)
