"""Nystromformer attention (Xiong et al. 2021, "Nystromformer: A Nystrom-Based Algorithm for
Approximating Self-Attention").

Softmax attention ``S V`` is approximated through ``m`` landmarks, the means of ``m`` contiguous
segments of the queries and keys:
``S V ~ softmax(Q K~^T) pinv(softmax(Q~ K~^T)) (softmax(Q~ K^T) V)``,
with the pseudo-inverse computed by the paper's iteration (eq. 16), and an optional depthwise
convolution of the values added as a skip connection. Cost O(n m) instead of O(n^2).

Padding: segments are taken over the real tokens only (by their rank among the real tokens), so
the landmarks and every softmax read nothing from padded positions; padded keys are masked out
of ``softmax(Q~ K^T)`` and padded values are zeroed before the convolution.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from einops import repeat
from flax import nnx
from jaxtyping import Array, Bool, Float

from xformers_zoo.kernels.xla import MASKED
from xformers_zoo.overrides import ConfigError
from xformers_zoo.variants import Capabilities, register_variant


def landmark_weights(key_mask: Bool[Array, "b n"], num_landmarks: int) -> Float[Array, "b m n"]:
    """Averaging weights that turn a sequence into its segment means over real tokens.

    The r real tokens, in order, are cut into ``num_landmarks`` contiguous segments of
    ``floor``-rounded equal size (exactly the paper's segments when r is a multiple of m).
    With fewer real tokens than landmarks a segment holds one token, repeated; a sequence
    without real tokens gets all-zero weights.
    """
    rank = jnp.cumsum(key_mask, axis=-1) - 1  # [b, n] position among the real tokens
    real = key_mask.sum(axis=-1, keepdims=True)  # [b, 1]
    index = jnp.arange(num_landmarks)[None, :]  # [1, m]
    start = index * real // num_landmarks  # [b, m]
    end = jnp.maximum((index + 1) * real // num_landmarks, start + 1)
    inside = ((rank[:, None, :] >= start[..., None]) & (rank[:, None, :] < end[..., None])
              & key_mask[:, None, :])  # [b, m, n]
    counts = inside.sum(axis=-1, keepdims=True)
    return inside / jnp.maximum(counts, 1)


def iterative_pinv(a: Float[Array, "*s m m"], iterations: int) -> Float[Array, "*s m m"]:
    """Moore-Penrose pseudo-inverse by the iteration of Xiong et al. 2021 (eq. 16):
    ``Z <- Z (13 I - A Z (15 I - A Z (7 I - A Z))) / 4`` from
    ``Z0 = A^T / (|A|_1 |A|_inf)``, with the norms of each matrix."""
    eye = jnp.eye(a.shape[-1], dtype=a.dtype)
    abs_a = jnp.abs(a)
    norm_1 = jnp.max(abs_a.sum(axis=-2), axis=-1)[..., None, None]  # largest column sum
    norm_inf = jnp.max(abs_a.sum(axis=-1), axis=-1)[..., None, None]  # largest row sum
    z = jnp.swapaxes(a, -1, -2) / (norm_1 * norm_inf)
    for _ in range(iterations):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


@dataclasses.dataclass(frozen=True)
class NystromformerConfig:
    """Nystromformer settings (Xiong et al. 2021).

    Attributes:
      num_landmarks: landmarks m (the paper uses 64 in most experiments).
      pinv_iterations: iterations of the pseudo-inverse (the paper uses 6).
      conv_kernel: width of the depthwise convolution skip on the values (one filter per head,
        over the length); 0 turns it off.
    """

    num_landmarks: int = 64
    pinv_iterations: int = 6
    conv_kernel: int = 33

    def check(self, *, max_length: int, num_heads: int, head_dim: int) -> None:
        """Rejects settings the approximation cannot run with."""
        del max_length, num_heads, head_dim
        if self.num_landmarks < 1:
            raise ConfigError(f"nystromformer: num_landmarks must be >= 1, got "
                              f"{self.num_landmarks}")
        if self.pinv_iterations < 1:
            raise ConfigError(f"nystromformer: pinv_iterations must be >= 1, got "
                              f"{self.pinv_iterations}")
        if self.conv_kernel < 0 or (self.conv_kernel and self.conv_kernel % 2 == 0):
            raise ConfigError(f"nystromformer: conv_kernel must be 0 (off) or an odd width, got "
                              f"{self.conv_kernel}")


@register_variant(
    "nystromformer", config_cls=NystromformerConfig,
    paper="Xiong et al. 2021, Nystromformer: A Nystrom-Based Algorithm for Approximating "
          "Self-Attention",
    capabilities=Capabilities(),
)
class NystromAttention(nnx.Module):
    """Nystrom approximation of softmax attention through segment-mean landmarks.

    As in the paper, no attention dropout is applied (the ``dropout`` rate is not used).
    Computed in float32, returned in q's dtype.
    """

    def __init__(self, config: NystromformerConfig, *, num_heads: int, head_dim: int,
                 max_length: int, dropout: float, rngs: nnx.Rngs):
        del max_length, dropout
        config.check(max_length=0, num_heads=num_heads, head_dim=head_dim)
        self.config = config
        if config.conv_kernel:
            bound = config.conv_kernel ** -0.5
            self.conv = nnx.Param(jax.random.uniform(
                rngs.params(), (config.conv_kernel, num_heads), jnp.float32, -bound, bound))
        else:
            self.conv = None

    def _conv_skip(self, v: Float[Array, "b n h d"]) -> Float[Array, "b n h d"]:
        b, n, h, d = v.shape
        kernel = repeat(self.conv[...], "w h -> w 1 (h d)", d=d)  # one filter per head
        out = jax.lax.conv_general_dilated(
            v.reshape(b, n, h * d), kernel, window_strides=(1,), padding="SAME",
            dimension_numbers=("NWC", "WIO", "NWC"), feature_group_count=h * d)
        return out.reshape(b, n, h, d)

    def __call__(self, q: Float[Array, "b n h d"], k: Float[Array, "b n h d"],
                 v: Float[Array, "b n h d"], key_mask: Bool[Array, "b n"], *,
                 deterministic: bool, rngs: nnx.Rngs | None = None) -> Float[Array, "b n h d"]:
        del deterministic, rngs
        dtype = q.dtype
        real = key_mask[:, :, None, None]
        q, k, v = (jnp.where(real, t.astype(jnp.float32), 0.0) for t in (q, k, v))
        scale = q.shape[-1] ** -0.5
        weights = landmark_weights(key_mask, self.config.num_landmarks)  # [b, m, n]
        q_land = jnp.einsum("bmn,bnhd->bmhd", weights, q)
        k_land = jnp.einsum("bmn,bnhd->bmhd", weights, k)
        kernel_1 = jax.nn.softmax(jnp.einsum("bnhd,bmhd->bhnm", q, k_land) * scale)
        kernel_2 = jax.nn.softmax(jnp.einsum("bmhd,bphd->bhmp", q_land, k_land) * scale)
        logits_3 = jnp.einsum("bmhd,bnhd->bhmn", q_land, k) * scale
        kernel_3 = jax.nn.softmax(jnp.where(key_mask[:, None, None, :], logits_3, MASKED))
        # Right to left, so every product is [n, m] or [m, m] by a vector, never [n, n].
        context = jnp.einsum("bhmn,bnhd->bhmd", kernel_3, v)
        context = iterative_pinv(kernel_2, self.config.pinv_iterations) @ context
        out = jnp.einsum("bhnm,bhmd->bnhd", kernel_1, context)
        if self.conv is not None:
            out = out + self._conv_skip(v)
        return out.astype(dtype)
