"""Linear Transformer attention (Katharopoulos et al. 2020, "Transformers are RNNs: Fast
Autoregressive Transformers with Linear Attention").

Softmax similarity is replaced by a kernel ``phi(q)^T phi(k)`` with the feature map
``phi(x) = elu(x) + 1``, so attention factorises as
``phi(Q) (phi(K)^T V) / (phi(Q) phi(K)^T 1)`` and costs O(length) instead of O(length^2).
``linear_attention`` (the factorised product for any positive feature map) is shared with the
Performer, which differs only in its feature map.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float

from xformers_zoo.overrides import ConfigError
from xformers_zoo.variants import Capabilities, register_variant


def linear_attention(
    q_features: Float[Array, "b q h m"],
    k_features: Float[Array, "b k h m"],
    v: Float[Array, "b k h d"],
    key_mask: Bool[Array, "b k"],
    *,
    causal: bool,
    eps: float,
) -> Float[Array, "b q h d"]:
    """``phi(Q) (phi(K)^T V) / (phi(Q) phi(K)^T 1 + eps)`` from non-negative features
    (Katharopoulos et al. 2020, eq. 5; eq. 8-9 for the causal prefix sums).

    Padded keys are removed by zeroing their features and values, so nothing they hold can reach
    the sums. ``causal`` keeps running sums over positions, which stores one [m, d] state per
    position (O(length * m * d) memory). A query that sees no real key returns zeros.
    """
    if causal and q_features.shape[1] != k_features.shape[1]:
        raise ValueError(f"causal linear attention needs as many queries as keys; got "
                         f"{q_features.shape[1]} queries and {k_features.shape[1]} keys")
    real = key_mask[:, :, None, None]
    k_features = jnp.where(real, k_features, 0.0)
    v = jnp.where(real, v, 0.0)
    if causal:
        kv = jnp.cumsum(jnp.einsum("bkhm,bkhd->bkhmd", k_features, v), axis=1)  # [b, k, h, m, d]
        numerator = jnp.einsum("bqhm,bqhmd->bqhd", q_features, kv)
        normaliser = jnp.einsum("bqhm,bqhm->bqh", q_features, jnp.cumsum(k_features, axis=1))
    else:
        kv = jnp.einsum("bkhm,bkhd->bhmd", k_features, v)  # [b, h, m, d]
        numerator = jnp.einsum("bqhm,bhmd->bqhd", q_features, kv)
        normaliser = jnp.einsum("bqhm,bhm->bqh", q_features, k_features.sum(axis=1))
    normaliser = (normaliser + eps)[..., None]  # [b, q, h, 1]
    # With eps = 0 a query that sees no real key would divide 0 by 0.
    seen = normaliser > 0
    return jnp.where(seen, numerator / jnp.where(seen, normaliser, 1.0), 0.0)


def elu_feature_map(x: Float[Array, "*s d"]) -> Float[Array, "*s d"]:
    """``elu(x) + 1``: positive everywhere, the paper's choice of kernel feature map."""
    return jax.nn.elu(x) + 1.0


@dataclasses.dataclass(frozen=True)
class LinearConfig:
    """Linear Transformer settings (Katharopoulos et al. 2020).

    Attributes:
      causal: autoregressive masking through prefix sums (the paper's RNN form).
      eps: added to the normaliser ``phi(q)^T sum_j phi(k_j)`` (the paper's code uses 1e-6).
    """

    causal: bool = False
    eps: float = 1e-6

    def check(self, *, max_length: int, num_heads: int, head_dim: int) -> None:
        """Rejects a negative ``eps``."""
        del max_length, num_heads, head_dim
        if self.eps < 0:
            raise ConfigError(f"linear: eps must be >= 0, got {self.eps}")


@register_variant(
    "linear", config_cls=LinearConfig,
    paper="Katharopoulos et al. 2020, Transformers are RNNs: Fast Autoregressive Transformers "
          "with Linear Attention",
    capabilities=Capabilities(causal=True, cross_attention=True),
)
class LinearAttention(nnx.Module):
    """Kernelised attention with ``phi(x) = elu(x) + 1`` (Katharopoulos et al. 2020).

    No attention matrix is formed, so there is nothing for attention dropout to drop: the
    ``dropout`` rate is not used, as in the paper. Computed in float32, returned in q's dtype.
    """

    def __init__(self, config: LinearConfig, *, num_heads: int, head_dim: int, max_length: int,
                 dropout: float, rngs: nnx.Rngs):
        del num_heads, head_dim, max_length, dropout, rngs
        self.config = config

    def __call__(self, q: Float[Array, "b q h d"], k: Float[Array, "b k h d"],
                 v: Float[Array, "b k h d"], key_mask: Bool[Array, "b k"], *,
                 deterministic: bool, rngs: nnx.Rngs | None = None) -> Float[Array, "b q h d"]:
        del deterministic, rngs
        out = linear_attention(
            elu_feature_map(q.astype(jnp.float32)), elu_feature_map(k.astype(jnp.float32)),
            v.astype(jnp.float32), key_mask, causal=self.config.causal, eps=self.config.eps)
        return out.astype(q.dtype)
