"""Performer attention with FAVOR+ (Choromanski et al. 2021, "Rethinking Attention with
Performers").

The softmax kernel ``exp(q^T k / sqrt(d))`` is estimated without bias by positive random features
``phi(x) = exp(W x - |x|^2 / 2) / sqrt(m)`` whose rows ``W`` are drawn in orthogonal blocks, and
attention is computed in linear time through ``linear_attention``. The generalised ReLU kernel
``phi(x) = relu(W x)`` (or ``relu(x)`` without random features) is offered as an option.

The random features are state, not parameters: they live in a ``RandomFeatures`` variable, which
``nnx.state`` (and so a checkpoint) includes but an optimiser over ``nnx.Param`` never updates.
``redraw_features`` draws fresh ones for every Performer core in a model; the trainer calls it
every ``redraw_every`` steps.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx
from jaxtyping import Array, Bool, Float

from xformers_zoo.models.linear import linear_attention
from xformers_zoo.overrides import ConfigError
from xformers_zoo.variants import Capabilities, register_variant


class RandomFeatures(nnx.Variable):
    """Random projection rows of a Performer core: saved with the model, never trained."""


@functools.partial(jax.jit, static_argnums=(1, 2), static_argnames=("orthogonal",))
def draw_features(key: jax.Array, num_features: int, head_dim: int, *,
                  orthogonal: bool) -> Float[Array, "m d"]:
    """Gaussian projection rows ``[num_features, head_dim]``.

    ``orthogonal`` draws them in blocks of ``head_dim`` exactly orthogonal directions (FAVOR+'s
    orthogonal random features), each row rescaled by the norm of an independent Gaussian vector
    so that every row keeps the length distribution of an i.i.d. Gaussian row.
    """
    if not orthogonal:
        return jax.random.normal(key, (num_features, head_dim), jnp.float32)
    block_key, norm_key = jax.random.split(key)
    blocks = -(-num_features // head_dim)
    gaussian = jax.random.normal(block_key, (blocks, head_dim, head_dim), jnp.float32)
    basis, upper = jnp.linalg.qr(gaussian)
    # Fixing the signs by R's diagonal makes the basis uniformly (Haar) distributed.
    basis = basis * jnp.sign(jnp.diagonal(upper, axis1=-2, axis2=-1))[:, None, :]
    rows = rearrange(basis, "n d r -> (n r) d")[:num_features]  # columns of each Q, as rows
    lengths = jnp.linalg.norm(jax.random.normal(norm_key, (num_features, head_dim)), axis=-1)
    return rows * lengths[:, None]


def softmax_features(x: Float[Array, "b l h d"], projection: Float[Array, "m d"],
                     real: Bool[Array, "b l"] | None, *, eps: float) -> Float[Array, "b l h m"]:
    """Positive random features of the softmax kernel (FAVOR+, Lemma 1) for queries
    (``real=None``) or keys (``real`` marks the real keys).

    ``x`` is scaled by ``d^-1/4`` so that ``phi(q)^T phi(k)`` estimates ``exp(q^T k / sqrt(d))``.
    The stabiliser subtracts a maximum before ``exp``: per query over its features (the
    normalisation cancels it), and for keys one maximum over every real key and feature of a
    sequence and head (it must be common to all keys to cancel). Padded keys are left out of that
    maximum, so what they hold cannot shrink real keys' features to zero.
    """
    x = x * x.shape[-1] ** -0.25
    logits = jnp.einsum("blhd,md->blhm", x, projection) - 0.5 * jnp.sum(x * x, -1, keepdims=True)
    if real is None:
        shift = jnp.max(logits, axis=-1, keepdims=True)  # [b, l, h, 1]
    else:
        visible = jnp.where(real[:, :, None, None], logits, -jnp.inf)
        shift = jnp.max(visible, axis=(1, 3), keepdims=True)  # [b, 1, h, 1]
        shift = jnp.where(jnp.isfinite(shift), shift, 0.0)  # a sequence with no real key
    shift = jax.lax.stop_gradient(shift)
    return (jnp.exp(logits - shift) + eps) / math.sqrt(projection.shape[0])


def relu_features(x: Float[Array, "b l h d"], projection: Float[Array, "m d"] | None, *,
                  eps: float) -> Float[Array, "b l h m"]:
    """The generalised kernel with ``f = relu``: ``relu(W x) + eps``, or ``relu(x) + eps`` when
    there are no random features (the deterministic variant)."""
    if projection is not None:
        x = jnp.einsum("blhd,md->blhm", x, projection)
    return jax.nn.relu(x) + eps


@dataclasses.dataclass(frozen=True)
class PerformerConfig:
    """FAVOR+ settings (Choromanski et al. 2021).

    Attributes:
      kernel: "softmax" (positive random features estimating softmax attention) or "relu" (the
        generalised ReLU kernel).
      features: "orthogonal" (orthogonal random features), "iid" (independent Gaussian rows) or
        "deterministic" (no random projection; ReLU kernel only).
      num_features: random features per head (m).
      redraw_every: training steps between redraws of the random features; 0 never redraws.
        The paper redraws periodically without fixing an interval; 1000 is a common choice.
      eps: added to every feature, keeping the normaliser positive.
      causal: autoregressive masking through prefix sums.
    """

    kernel: Literal["softmax", "relu"] = "softmax"
    features: Literal["orthogonal", "iid", "deterministic"] = "orthogonal"
    num_features: int = 256
    redraw_every: int = 1000
    eps: float = 1e-4
    causal: bool = False

    def refresh_interval(self) -> int:
        """Steps between feature redraws during training (0: never); read by the trainer."""
        return self.redraw_every

    def check(self, *, max_length: int, num_heads: int, head_dim: int) -> None:
        """Rejects settings FAVOR+ cannot run with."""
        del max_length, num_heads, head_dim
        if self.num_features < 1:
            raise ConfigError(f"performer: num_features must be >= 1, got {self.num_features}")
        if self.redraw_every < 0:
            raise ConfigError(f"performer: redraw_every must be >= 0 (0 = never), got "
                              f"{self.redraw_every}")
        if self.eps < 0:
            raise ConfigError(f"performer: eps must be >= 0, got {self.eps}")
        if self.kernel == "softmax" and self.features == "deterministic":
            raise ConfigError("performer: the softmax kernel needs random features; use "
                              "features='orthogonal' or 'iid', or kernel='relu'")


@register_variant(
    "performer", config_cls=PerformerConfig,
    paper="Choromanski et al. 2021, Rethinking Attention with Performers",
    capabilities=Capabilities(causal=True, cross_attention=True),
    refresh=lambda model, key: redraw_features(model, key),
    # The public LRA code used the ReLU kernel on deterministic features (projection unused) with
    # a kernel epsilon of 1e-3; num_features stays 256 as it declared.
    lra_overrides={"model.attention.kernel": "relu",
                   "model.attention.features": "deterministic",
                   "model.attention.eps": 1e-3,
                   "model.attention.num_features": 256},
)
class PerformerAttention(nnx.Module):
    """FAVOR+ attention in linear time (Choromanski et al. 2021).

    One ``[num_features, head_dim]`` projection is shared by the heads of a layer and held in a
    ``RandomFeatures`` variable; ``redraw(key)`` replaces it. No attention matrix is formed, so
    the attention ``dropout`` rate is not used. Computed in float32, returned in q's dtype.
    """

    def __init__(self, config: PerformerConfig, *, num_heads: int, head_dim: int,
                 max_length: int, dropout: float, rngs: nnx.Rngs):
        del num_heads, max_length, dropout
        config.check(max_length=0, num_heads=0, head_dim=head_dim)
        self.config = config
        self.head_dim = head_dim
        self.features = (None if config.features == "deterministic" else
                         RandomFeatures(self._draw(rngs.params())))

    def _draw(self, key: jax.Array) -> Float[Array, "m d"]:
        return draw_features(key, self.config.num_features, self.head_dim,
                             orthogonal=self.config.features == "orthogonal")

    def redraw(self, key: jax.Array) -> None:
        """Replaces the random features with a fresh draw (nothing to do for deterministic
        features)."""
        if self.features is not None:
            self.features.set_value(self._draw(key))

    def __call__(self, q: Float[Array, "b q h d"], k: Float[Array, "b k h d"],
                 v: Float[Array, "b k h d"], key_mask: Bool[Array, "b k"], *,
                 deterministic: bool, rngs: nnx.Rngs | None = None) -> Float[Array, "b q h d"]:
        del deterministic, rngs
        cfg = self.config
        projection = None if self.features is None else self.features.get_value()
        q32, k32 = q.astype(jnp.float32), k.astype(jnp.float32)
        if cfg.kernel == "softmax":
            q_features = softmax_features(q32, projection, None, eps=cfg.eps)
            k_features = softmax_features(k32, projection, key_mask, eps=cfg.eps)
        else:
            q_features = relu_features(q32, projection, eps=cfg.eps)
            k_features = relu_features(k32, projection, eps=cfg.eps)
        out = linear_attention(q_features, k_features, v.astype(jnp.float32), key_mask,
                               causal=cfg.causal, eps=0.0)
        return out.astype(q.dtype)


def performer_cores(model: nnx.Module) -> list[PerformerAttention]:
    """Every Performer core inside ``model`` (each once, however often it is referenced)."""
    return [node for _, node in nnx.iter_graph(model) if isinstance(node, PerformerAttention)]


def redraw_features(model: nnx.Module, key: jax.Array, *, step: int | None = None) -> int:
    """Draws fresh random features for the Performer cores of ``model``, each from its own key.

    With ``step`` (a Python int, e.g. the trainer's step counter), only cores whose
    ``redraw_every`` is positive and divides ``step`` (step > 0) are redrawn; without it, every
    core with random features is. Call it outside ``jit`` on the model object. Returns how many
    cores were redrawn.
    """
    cores = [c for c in performer_cores(model) if c.features is not None]
    if step is not None:
        cores = [c for c in cores
                 if c.config.redraw_every > 0 and step > 0 and step % c.config.redraw_every == 0]
    for core, core_key in zip(cores, jax.random.split(key, max(len(cores), 1)), strict=False):
        core.redraw(core_key)
    return len(cores)
