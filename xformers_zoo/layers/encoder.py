"""The pre-LayerNorm Transformer encoder shared by every variant (Vaswani et al. 2017, with the
pre-norm placement of Xiong et al. 2020 that LRA uses)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float

from xformers_zoo.layers.attention import MultiHeadAttention
from xformers_zoo.layers.chunked import chunked_feed_forward
from xformers_zoo.layers.reversible import dropout_keys, reversible_apply
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
    """x + Dropout(Attention(LN(x))), then x + Dropout(MLP(LN(x))); ``ff_chunks`` > 1 applies
    the MLP to that many slices of the sequence in turn (Reformer's chunked feed-forward)."""

    def __init__(self, spec: VariantSpec, attention_config, *, emb_dim: int, qkv_dim: int,
                 mlp_dim: int, num_heads: int, max_length: int, dropout: float,
                 attention_dropout: float, dtype, rngs: nnx.Rngs, ff_chunks: int = 1):
        self.norm1 = nnx.LayerNorm(emb_dim, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        self.attention = MultiHeadAttention(
            spec, attention_config, emb_dim=emb_dim, qkv_dim=qkv_dim, num_heads=num_heads,
            max_length=max_length, dropout=attention_dropout, dtype=dtype, rngs=rngs)
        self.norm2 = nnx.LayerNorm(emb_dim, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        self.mlp = MlpBlock(emb_dim, mlp_dim, dropout=dropout, dtype=dtype, rngs=rngs)
        self.dropout = nnx.Dropout(dropout)
        self.ff_chunks = ff_chunks

    def attention_branch(self, x: Float[Array, "b l e"], key_mask: Bool[Array, "b l"] | None, *,
                         deterministic: bool, rngs: nnx.Rngs | None) -> Float[Array, "b l e"]:
        """The attention residual branch, Dropout(Attention(LN(x)))."""
        h = self.attention(self.norm1(x), key_mask, deterministic=deterministic, rngs=rngs)
        return self.dropout(h, deterministic=deterministic, rngs=rngs)

    def mlp_branch(self, x: Float[Array, "b l e"], *, deterministic: bool,
                   rngs: nnx.Rngs | None) -> Float[Array, "b l e"]:
        """The feed-forward residual branch, Dropout(MLP(LN(x)))."""
        h = self.norm2(x)
        if self.ff_chunks > 1:
            h = chunked_feed_forward(self.mlp, h, self.ff_chunks, deterministic=deterministic,
                                     rngs=rngs)
        else:
            h = self.mlp(h, deterministic=deterministic, rngs=rngs)
        return self.dropout(h, deterministic=deterministic, rngs=rngs)

    def __call__(self, x: Float[Array, "b l e"], key_mask: Bool[Array, "b l"] | None, *,
                 deterministic: bool, rngs: nnx.Rngs | None = None) -> Float[Array, "b l e"]:
        x = x + self.attention_branch(x, key_mask, deterministic=deterministic, rngs=rngs)
        return x + self.mlp_branch(x, deterministic=deterministic, rngs=rngs)


def _run_block(block: EncoderBlock, x, key_mask, deterministic, rngs):
    return block(x, key_mask, deterministic=deterministic, rngs=rngs)


class Encoder(nnx.Module):
    """A stack of ``EncoderBlock`` and a final LayerNorm; ``remat`` recomputes each block's
    activations in the backward pass instead of storing them (memory for long sequences).

    ``reversible`` runs the blocks as reversible residual layers (Reformer, Kitaev et al. 2020):
    the stream is duplicated into two halves (x1, x2) = (x, x), each block computes
    y1 = x1 + Attention branch(x2), y2 = x2 + MLP branch(y1), the stack's inputs are recomputed
    from its outputs in the backward pass (so ``remat`` has nothing left to save), and the two
    halves are averaged before the final LayerNorm. ``ff_chunks`` > 1 chunks every block's MLP
    over the sequence.
    """

    def __init__(self, spec: VariantSpec, attention_config, *, num_layers: int, emb_dim: int,
                 qkv_dim: int, mlp_dim: int, num_heads: int, max_length: int, dropout: float,
                 attention_dropout: float, dtype, remat: bool, rngs: nnx.Rngs,
                 reversible: bool = False, ff_chunks: int = 1):
        self.blocks = nnx.List([
            EncoderBlock(spec, attention_config, emb_dim=emb_dim, qkv_dim=qkv_dim,
                         mlp_dim=mlp_dim, num_heads=num_heads, max_length=max_length,
                         dropout=dropout, attention_dropout=attention_dropout, dtype=dtype,
                         rngs=rngs, ff_chunks=ff_chunks)
            for _ in range(num_layers)
        ])
        self.norm = nnx.LayerNorm(emb_dim, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        self.remat = remat
        self.reversible = reversible

    def __call__(self, x: Float[Array, "b l e"], key_mask: Bool[Array, "b l"] | None, *,
                 deterministic: bool, rngs: nnx.Rngs | None = None) -> Float[Array, "b l e"]:
        if self.reversible:
            keys = dropout_keys(rngs, len(self.blocks), deterministic=deterministic)
            x1, x2 = reversible_apply(list(self.blocks), x, x, key_mask, keys=keys,
                                      deterministic=deterministic)
            return self.norm((x1 + x2) / 2)
        run = nnx.remat(_run_block, static_argnums=(3,)) if self.remat else _run_block
        for block in self.blocks:
            x = run(block, x, key_mask, deterministic, rngs)
        return self.norm(x)
