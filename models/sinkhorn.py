"""Sparse Sinkhorn attention (Tay et al. 2020, "Sparse Sinkhorn Attention").

The sequence is cut into blocks. A sorting network reads a summary of every key block (the
sum of its real keys) and scores, for each query block, every key block; Sinkhorn
normalisation of those scores (in log space, after dividing by a temperature, optionally with
Gumbel noise while training) gives a soft block permutation. Keys and values are permuted
block-wise by it, and each query block attends within its own block and within the block sorted
to it. As in the public code of the paper's authors, the two attentions are normalised
separately and their outputs summed.

Key padding is exact: block summaries sum real keys only, padded keys and values are zeroed
before blocks are mixed, a query block with real tokens is only matched to key blocks with real
tokens (and padding-only blocks among themselves), and padded keys are masked in both
attentions. Lengths that are not a multiple of the block size are padded internally.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx
from jaxtyping import Array, Bool, Float

from xformers_zoo.kernels.xla import MASKED
from xformers_zoo.models.masked_softmax import attend, dropout_key, pad_to_multiple
from xformers_zoo.overrides import ConfigError
from xformers_zoo.variants import Capabilities, register_variant


@dataclasses.dataclass(frozen=True)
class SinkhornConfig:
    """``block_size``: tokens per block; ``sort_activation``: ``sinkhorn`` (balanced soft
    permutation) or ``softmax`` (row normalisation only, as the public LRA code defaulted to);
    ``iterations``: Sinkhorn row+column normalisation rounds; ``temperature``: divides the
    sorting scores; ``gumbel_noise``: add Gumbel noise to the scores while training
    (Gumbel-Sinkhorn); ``sort_hidden``: width of the sorting network's hidden layer (None:
    head_dim)."""

    block_size: int = 64
    sort_activation: Literal["sinkhorn", "softmax"] = "sinkhorn"
    iterations: int = 7
    temperature: float = 0.75
    gumbel_noise: bool = True
    sort_hidden: int | None = None

    def check(self, *, max_length: int, num_heads: int, head_dim: int) -> None:
        """Raises ConfigError for settings the attention cannot use."""
        del max_length, num_heads, head_dim
        for name in ("block_size", "iterations"):
            if getattr(self, name) < 1:
                raise ConfigError(f"sinkhorn {name} must be >= 1, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ConfigError(f"sinkhorn temperature must be > 0, got {self.temperature}")


def sinkhorn_log(log_alpha: Float[Array, "*b n n"], iterations: int) -> Float[Array, "*b n n"]:
    """Sinkhorn balancing in log space (Sinkhorn 1964; Adams and Zemel 2011): alternately
    normalise rows and columns; ``exp`` of the result tends to a doubly-stochastic matrix."""
    for _ in range(iterations):
        log_alpha = log_alpha - jax.nn.logsumexp(log_alpha, axis=-1, keepdims=True)
        log_alpha = log_alpha - jax.nn.logsumexp(log_alpha, axis=-2, keepdims=True)
    return log_alpha


@register_variant(
    "sinkhorn", config_cls=SinkhornConfig,
    paper="Tay, Bahri, Yang, Metzler and Juan 2020, Sparse Sinkhorn Attention",
    capabilities=Capabilities(fixed_length=True),
    lra_overrides={"model.attention.block_size": 50,
                   "model.attention.sort_activation": "softmax"},
)
class SinkhornAttention(nnx.Module):
    """Block-sorted local attention with a learned Sinkhorn sorting network (Tay et al. 2020).

    The sorting network is the paper's two-layer ReLU MLP, per head, over block summaries; it
    reads the key blocks (a per-head linear map of the layer input) since the core receives
    projected heads. Its output has one score per key block, so the maximum length is fixed.
    """

    def __init__(self, config: SinkhornConfig, *, num_heads: int, head_dim: int,
                 max_length: int, dropout: float, rngs: nnx.Rngs):
        config.check(max_length=max_length, num_heads=num_heads, head_dim=head_dim)
        self.config, self.dropout = config, dropout
        self.max_blocks = math.ceil(max_length / config.block_size)
        hidden = config.sort_hidden or head_dim
        init = nnx.initializers.lecun_normal(batch_axis=(0,))
        self.sort_w1 = nnx.Param(init(rngs.params(), (num_heads, head_dim, hidden)))
        self.sort_b1 = nnx.Param(jnp.zeros((num_heads, hidden)))
        self.sort_w2 = nnx.Param(init(rngs.params(), (num_heads, hidden, self.max_blocks)))
        self.sort_b2 = nnx.Param(jnp.zeros((num_heads, self.max_blocks)))

    def block_permutation(self, k_blocks: Float[Array, "b h n s d"],
                          mask_blocks: Bool[Array, "b n s"], *, deterministic: bool,
                          rngs: nnx.Rngs | None = None) -> Float[Array, "b h n n"]:
        """Soft permutation ``P[query block, key block]`` from the sorting network."""
        n = k_blocks.shape[2]
        if n > self.max_blocks:
            raise ValueError(f"sinkhorn attention was built for at most {self.max_blocks} blocks "
                             f"of {self.config.block_size}, got {n}")
        summary = jnp.einsum("bhnsd,bns->bhnd", k_blocks.astype(jnp.float32),
                             mask_blocks.astype(jnp.float32))
        hidden = jax.nn.relu(jnp.einsum("bhnd,hdk->bhnk", summary, self.sort_w1[...])
                             + self.sort_b1[...][None, :, None])
        scores = (jnp.einsum("bhnk,hkm->bhnm", hidden, self.sort_w2[...])
                  + self.sort_b2[...][None, :, None])[..., :n]
        if self.config.gumbel_noise and not deterministic:
            if rngs is None:
                raise ValueError("sinkhorn gumbel_noise in training needs rngs (the 'dropout' "
                                 "stream draws the noise)")
            scores = scores + jax.random.gumbel(rngs.dropout(), scores.shape)
        has_real = jnp.any(mask_blocks, axis=-1)  # [b, n]
        allowed = has_real[:, None, :, None] == has_real[:, None, None, :]
        scores = jnp.where(allowed, scores / self.config.temperature, MASKED)
        if self.config.sort_activation == "softmax":
            return jax.nn.softmax(scores, axis=-1)
        return jnp.exp(sinkhorn_log(scores, self.config.iterations))

    def __call__(self, q: Float[Array, "b l h d"], k: Float[Array, "b l h d"],
                 v: Float[Array, "b l h d"], key_mask: Bool[Array, "b l"], *,
                 deterministic: bool, rngs: nnx.Rngs | None = None) -> Float[Array, "b l h d"]:
        length, s = q.shape[1], self.config.block_size
        key_mask = pad_to_multiple(key_mask, s, axis=1, value=False)
        mask_blocks = rearrange(key_mask, "b (n s) -> b n s", s=s)

        def blocks(x):  # [b, l, h, d] -> [b, h, n, s, d], padded content zeroed
            x = jnp.where(key_mask[..., None, None], pad_to_multiple(x, s, axis=1), 0)
            return rearrange(x, "b (n s) h d -> b h n s d", s=s)

        qb, kb, vb = blocks(q), blocks(k), blocks(v)
        perm = self.block_permutation(kb, mask_blocks, deterministic=deterministic, rngs=rngs)
        sorted_k = jnp.einsum("bhji,bhisd->bhjsd", perm, kb.astype(jnp.float32))
        sorted_v = jnp.einsum("bhji,bhisd->bhjsd", perm, vb.astype(jnp.float32))
        sorted_mask = jnp.einsum("bhji,bis->bhjs", perm, mask_blocks.astype(jnp.float32)) > 0

        scale = q.shape[-1] ** -0.5
        rate = 0.0 if deterministic else self.dropout
        outs = []
        for keys, values, visible in ((kb, vb, mask_blocks[:, None]),
                                      (sorted_k, sorted_v, sorted_mask)):
            scores = jnp.einsum("bhnqd,bhnkd->bhnqk", qb, keys.astype(qb.dtype),
                                preferred_element_type=jnp.float32) * scale
            out, _ = attend(scores, values.astype(v.dtype), visible[..., None, :],
                            dropout_rate=rate, dropout_rng=dropout_key(rngs, rate, deterministic))
            outs.append(out)
        out = rearrange(outs[0] + outs[1], "b h n s d -> b (n s) h d")
        return out[:, :length].astype(v.dtype)
