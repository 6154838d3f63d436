"""Linformer attention (Wang et al. 2020, "Linformer: Self-Attention with Linear Complexity").

Keys and values are projected along the length axis by learned matrices ``E, F: [n, k]``
(``K' = E^T K``, ``V' = F^T V``), so softmax attention runs over ``k`` mixtures of positions
instead of ``n`` positions: O(n k) time and memory. The projections have one row per position,
so the core is built for a maximum length and rejects longer inputs.

Sharing levels, as in the paper's section 4 (each includes the one before):
  "none": separate E and F for every head;
  "headwise": one E and one F shared by the heads of a layer;
  "kv": one matrix (E = F) for keys and values of a layer;
  "layerwise": one matrix for keys and values of every layer of a model. Cores built from the
    same ``nnx.Rngs`` object (as the layers of one model are) with the same (max_length, k)
    reference one ``nnx.Param``; NNX keeps a shared variable once in the state, so its gradient
    is the sum over layers and the optimiser updates the one matrix.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float

from xformers_zoo.kernels.xla import attention_dropout
from xformers_zoo.models.masked_softmax import dropout_key
from xformers_zoo.overrides import ConfigError
from xformers_zoo.variants import Capabilities, register_variant

Sharing = Literal["none", "headwise", "kv", "layerwise"]

# Projections shared across layers, per construction-time Rngs object; weak keys let a model's
# entry disappear with its Rngs.
_LAYERWISE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclasses.dataclass(frozen=True)
class LinformerConfig:
    """Linformer settings (Wang et al. 2020).

    Attributes:
      k: projected length (the paper's default 256; the public LRA code used 16).
      sharing: which projections are shared, see the module docstring.
    """

    k: int = 256
    sharing: Sharing = "headwise"

    def check(self, *, max_length: int, num_heads: int, head_dim: int) -> None:
        """Rejects a projected length below 1."""
        del max_length, num_heads, head_dim
        if self.k < 1:
            raise ConfigError(f"linformer: k must be >= 1, got {self.k}")


def _init_projection(key: jax.Array, shape: tuple[int, ...]) -> Float[Array, "*p n k"]:
    # Variance 1/n keeps a projected key, a sum of n positions, at the scale of one key.
    return jax.random.normal(key, shape, jnp.float32) * shape[-2] ** -0.5


def _shared_across_layers(rngs: nnx.Rngs, max_length: int, k: int) -> nnx.Param:
    cache = _LAYERWISE.setdefault(rngs, {})
    if (max_length, k) not in cache:
        cache[(max_length, k)] = nnx.Param(_init_projection(rngs.params(), (max_length, k)))
    return cache[(max_length, k)]


@register_variant(
    "linformer", config_cls=LinformerConfig,
    paper="Wang et al. 2020, Linformer: Self-Attention with Linear Complexity",
    capabilities=Capabilities(fixed_length=True),
    lra_overrides={"model.attention.k": 16},
)
class LinformerAttention(nnx.Module):
    """Softmax attention over length-projected keys and values (Wang et al. 2020).

    Padded keys and values are zeroed before the projection, so their content never reaches
    the projected ones; a sequence shorter than ``max_length`` uses the first rows of E and F,
    which equals zero-padding it to ``max_length``. Attention dropout acts on the [n, k] weights.
    Computed in float32, returned in q's dtype.
    """

    def __init__(self, config: LinformerConfig, *, num_heads: int, head_dim: int,
                 max_length: int, dropout: float, rngs: nnx.Rngs):
        del head_dim
        config.check(max_length=max_length, num_heads=num_heads, head_dim=0)
        self.config, self.max_length, self.dropout = config, max_length, dropout
        shape = (max_length, config.k) if config.sharing != "none" else (
            num_heads, max_length, config.k)
        if config.sharing == "layerwise":
            self.key_projection = _shared_across_layers(rngs, max_length, config.k)
        else:
            self.key_projection = nnx.Param(_init_projection(rngs.params(), shape))
        if config.sharing in ("kv", "layerwise"):
            self.value_projection = self.key_projection
        else:
            self.value_projection = nnx.Param(_init_projection(rngs.params(), shape))

    @staticmethod
    def _project(x: Float[Array, "b n h d"], projection: nnx.Param) -> Float[Array, "b k h d"]:
        n = x.shape[1]
        matrix = projection[...]
        if matrix.ndim == 3:  # one matrix per head
            return jnp.einsum("bnhd,hnk->bkhd", x, matrix[:, :n])
        return jnp.einsum("bnhd,nk->bkhd", x, matrix[:n])

    def __call__(self, q: Float[Array, "b n h d"], k: Float[Array, "b n h d"],
                 v: Float[Array, "b n h d"], key_mask: Bool[Array, "b n"], *,
                 deterministic: bool, rngs: nnx.Rngs | None = None) -> Float[Array, "b n h d"]:
        n = k.shape[1]
        if n > self.max_length:
            raise ConfigError(
                f"linformer was built for sequences of at most {self.max_length} tokens (its "
                f"projections have {self.max_length} rows), got {n}; build it with a larger "
                f"max_length")
        real = key_mask[:, :, None, None]
        k = jnp.where(real, k.astype(jnp.float32), 0.0)
        v = jnp.where(real, v.astype(jnp.float32), 0.0)
        k_low = self._project(k, self.key_projection)  # [b, k, h, d]
        v_low = self._project(v, self.value_projection)  # [b, k, h, d]
        logits = jnp.einsum("bnhd,bkhd->bhnk", q.astype(jnp.float32), k_low) * q.shape[-1] ** -0.5
        weights = jax.nn.softmax(logits, axis=-1)  # [b, h, n, k]
        key = dropout_key(rngs, self.dropout, deterministic)
        weights = attention_dropout(weights, 0.0 if key is None else self.dropout, key)
        return jnp.einsum("bhnk,bkhd->bnhd", weights, v_low).astype(q.dtype)
