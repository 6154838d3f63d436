"""Synthesizer attention (Tay et al. 2021, "Synthesizer: Rethinking Self-Attention for
Transformer Models"): attention weights synthesized without query-key dot products.

Registry design: the modes differ in what they read, so they are two registered variants with
honest capabilities rather than one variant that ignores inputs it declares:

- ``synthesizer-dense`` (modes ``dense``, ``factorized_dense``) reads one per-token vector and
  declares ``shared_qk``, so the shared layer builds a single projection whose output arrives as
  ``q`` (``k`` is the same array and is not read). The paper's two-layer token MLP
  ``W2 relu(W1 x + b1) + b2`` is that projection (W1, per head, width ``head_dim``) followed by a
  per-head ``[head_dim, max_length]`` layer here.
- ``synthesizer-random`` (modes ``random``, ``factorized_random``) reads neither q nor k and
  declares ``uses_qk=False``, so the shared layer builds no q/k projections at all.

Both need a fixed maximum length (the synthesized logits have one column per key position);
shorter sequences use the leading rows and columns. Padded keys are masked in the synthesized
logits. The paper's mixtures with dot-product attention are not provided.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float

from xformers_zoo.models.masked_softmax import attend, dropout_key
from xformers_zoo.overrides import ConfigError
from xformers_zoo.variants import Capabilities, register_variant

PAPER = "Tay et al. 2021, Synthesizer: Rethinking Self-Attention for Transformer Models"


@dataclasses.dataclass(frozen=True)
class DenseSynthesizerConfig:
    """``mode``: ``dense`` (a token MLP gives each query its row of logits) or
    ``factorized_dense`` (two narrow heads of widths ``factor`` and ceil(length / factor) whose
    tiled product gives the row)."""

    mode: Literal["dense", "factorized_dense"] = "dense"
    factor: int = 8

    def check(self, *, max_length: int, num_heads: int, head_dim: int) -> None:
        """Raises ConfigError for a factor the length cannot use."""
        del num_heads, head_dim
        if self.mode == "factorized_dense" and not 1 <= self.factor <= max_length:
            raise ConfigError(f"synthesizer factor must be in [1, max_length={max_length}], got "
                              f"{self.factor}")


@dataclasses.dataclass(frozen=True)
class RandomSynthesizerConfig:
    """``mode``: ``random`` (one [heads, length, length] logit matrix) or ``factorized_random``
    (``R1 R2^T`` with rank ``rank``); ``trainable``: learn the logits (else fixed random
    state)."""

    mode: Literal["random", "factorized_random"] = "random"
    trainable: bool = True
    rank: int = 8

    def check(self, *, max_length: int, num_heads: int, head_dim: int) -> None:
        """Raises ConfigError for a rank below 1."""
        del max_length, num_heads, head_dim
        if self.rank < 1:
            raise ConfigError(f"synthesizer rank must be >= 1, got {self.rank}")


class FixedRandomLogits(nnx.Variable):
    """Random synthesized logits that stay fixed: state, not a trained parameter."""


def synthesized_attention(logits: Float[Array, "*b h l l"], v: Float[Array, "b l h d"],
                          key_mask: Bool[Array, "b l"], *, dropout: float, deterministic: bool,
                          rngs) -> Float[Array, "b l h d"]:
    """Softmax over synthesized logits with padded keys masked, applied to the values."""
    rate = 0.0 if deterministic else dropout
    out, _ = attend(logits, jnp.swapaxes(v, 1, 2), key_mask[:, None, None, :],
                    dropout_rate=rate, dropout_rng=dropout_key(rngs, rate, deterministic))
    return jnp.swapaxes(out, 1, 2).astype(v.dtype)  # [b, h, l, d] -> [b, l, h, d]


def _check_length(length: int, max_length: int) -> None:
    if length > max_length:
        raise ValueError(f"synthesizer attention was built for at most {max_length} tokens, got "
                         f"{length}")


@register_variant(
    "synthesizer-dense", config_cls=DenseSynthesizerConfig, paper=PAPER,
    capabilities=Capabilities(shared_qk=True, fixed_length=True),
)
class DenseSynthesizer(nnx.Module):
    """Dense Synthesizer (Tay et al. 2021): each token's logits over all key positions come from
    that token alone, ``B_i = W2 relu(q_i) + b2`` per head (q_i = W1 x_i + b1, the shared
    projection); factorized: ``B_i[j] = A_i[j // n_b] * C_i[j % n_b]``."""

    def __init__(self, config: DenseSynthesizerConfig, *, num_heads: int, head_dim: int,
                 max_length: int, dropout: float, rngs: nnx.Rngs):
        config.check(max_length=max_length, num_heads=num_heads, head_dim=head_dim)
        self.config, self.max_length, self.dropout = config, max_length, dropout
        init = nnx.initializers.lecun_normal(batch_axis=(0,))

        def layer(width):  # per-head [head_dim, width] weights and [width] biases
            return (nnx.Param(init(rngs.params(), (num_heads, head_dim, width), jnp.float32)),
                    nnx.Param(jnp.zeros((num_heads, width), jnp.float32)))

        if config.mode == "dense":
            self.w_rows, self.b_rows = layer(max_length)
        else:
            self.columns_b = math.ceil(max_length / config.factor)
            self.w_a, self.b_a = layer(config.factor)
            self.w_b, self.b_b = layer(self.columns_b)

    def __call__(self, q: Float[Array, "b l h d"], k: Float[Array, "b l h d"] | None,
                 v: Float[Array, "b l h d"], key_mask: Bool[Array, "b l"], *,
                 deterministic: bool, rngs: nnx.Rngs | None = None) -> Float[Array, "b l h d"]:
        del k  # not read: the logits come from each token alone
        length = q.shape[1]
        _check_length(length, self.max_length)
        hidden = jax.nn.relu(q.astype(jnp.float32))

        def head(w, bias):  # [b, h, l, width]
            return jnp.einsum("blhd,hdw->bhlw", hidden, w[...]) + bias[...][None, :, None, :]

        if self.config.mode == "dense":
            logits = head(self.w_rows, self.b_rows)[..., :length]
        else:
            a, c = head(self.w_a, self.b_a), head(self.w_b, self.b_b)
            logits = (a[..., :, None] * c[..., None, :]).reshape(a.shape[:3] + (-1,))[..., :length]
        return synthesized_attention(logits, v, key_mask, dropout=self.dropout,
                                     deterministic=deterministic, rngs=rngs)


@register_variant(
    "synthesizer-random", config_cls=RandomSynthesizerConfig, paper=PAPER,
    capabilities=Capabilities(uses_qk=False, fixed_length=True),
)
class RandomSynthesizer(nnx.Module):
    """Random Synthesizer (Tay et al. 2021): one logit matrix per head shared by every input,
    ``softmax(R) V``, learned or fixed; factorized: ``R = R1 R2^T`` of rank ``rank``."""

    def __init__(self, config: RandomSynthesizerConfig, *, num_heads: int, head_dim: int,
                 max_length: int, dropout: float, rngs: nnx.Rngs):
        del head_dim
        self.config, self.max_length, self.dropout = config, max_length, dropout
        kind = nnx.Param if config.trainable else FixedRandomLogits
        if config.mode == "random":
            # Unit-variance logits: a random pattern with real contrast at initialisation.
            self.logits = kind(jax.random.normal(rngs.params(),
                                                 (num_heads, max_length, max_length)))
        else:
            # Each factor scaled so that R1 R2^T also has unit-variance entries.
            scale = config.rank ** -0.25
            shape = (num_heads, max_length, config.rank)
            self.left = kind(scale * jax.random.normal(rngs.params(), shape))
            self.right = kind(scale * jax.random.normal(rngs.params(), shape))

    def synthesized_logits(self, length: int) -> Float[Array, "h l l"]:
        """The per-head logits for the first ``length`` positions."""
        _check_length(length, self.max_length)
        if self.config.mode == "random":
            return self.logits[...][:, :length, :length]
        left, right = self.left[...][:, :length], self.right[...][:, :length]
        return jnp.einsum("hik,hjk->hij", left, right)

    def __call__(self, q: None, k: None, v: Float[Array, "b l h d"],
                 key_mask: Bool[Array, "b l"], *, deterministic: bool,
                 rngs: nnx.Rngs | None = None) -> Float[Array, "b l h d"]:
        del q, k  # uses_qk=False: the shared layer passes None
        return synthesized_attention(self.synthesized_logits(v.shape[1])[None], v, key_mask,
                                     dropout=self.dropout, deterministic=deterministic,
                                     rngs=rngs)
