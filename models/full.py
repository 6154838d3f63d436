"""Full softmax attention (Vaswani et al. 2017, "Attention Is All You Need"), computed by
``kernels.dot_product_attention`` through the configured implementations."""

from __future__ import annotations

import dataclasses

from flax import nnx
from jaxtyping import Array, Bool, Float

from xformers_zoo.kernels import dot_product_attention
from xformers_zoo.models.masked_softmax import dropout_key
from xformers_zoo.models.sequence_parallel import SequenceParallelConfig
from xformers_zoo.variants import Capabilities, register_variant


@dataclasses.dataclass(frozen=True)
class FullConfig(SequenceParallelConfig):
    """``implementation``: exact-attention implementations to try in order (see
    ``xformers_zoo.kernels.IMPLEMENTATIONS``): cuDNN where it serves; the Pallas kernels for what
    it cannot (attention dropout, non-prefix masks) before the dense XLA path, which holds
    N x N weights in memory; ``causal``: autoregressive masking; ``sequence_axis``: ring
    attention over that mesh axis (``SequenceParallelConfig``; cuDNN is then passed over, as it
    gives no log-sum-exp)."""

    implementation: tuple[str, ...] = ("cudnn", "pallas", "xla")
    causal: bool = False


@register_variant(
    "full", config_cls=FullConfig,
    paper="Vaswani et al. 2017, Attention Is All You Need",
    capabilities=Capabilities(causal=True, cross_attention=True, accepts_no_mask=True),
)
class FullAttention(nnx.Module):
    """Exact softmax attention over every key; quadratic in length. Without a key mask (inputs
    without padding) the implementations run unmasked: cuDNN gets its plain call, not
    sequence lengths."""

    def __init__(self, config: FullConfig, *, num_heads: int, head_dim: int, max_length: int,
                 dropout: float, rngs: nnx.Rngs):
        del num_heads, head_dim, max_length, rngs
        self.config = config
        self.dropout = dropout

    def __call__(self, q: Float[Array, "b l h d"], k: Float[Array, "b l h d"],
                 v: Float[Array, "b l h d"], key_mask: Bool[Array, "b l"] | None, *,
                 deterministic: bool, rngs: nnx.Rngs | None = None) -> Float[Array, "b l h d"]:
        key = dropout_key(rngs, self.dropout, deterministic)
        return dot_product_attention(
            q, k, v, key_mask=key_mask, causal=self.config.causal,
            dropout_rate=0.0 if key is None else self.dropout, dropout_rng=key,
            implementation=self.config.implementation, key_mask_is_prefix=True,
            sequence_axis=self.config.sequence_axis)
