"""Reformer LSH attention (Kitaev, Kaiser and Levskaya 2020, "Reformer: The Efficient
Transformer").

Queries and keys share one projection; keys are the queries scaled to unit length. Each hash
round assigns every position an angular-LSH bucket, sorts positions by (bucket, position),
cuts the sorted sequence into chunks of ``chunk_length`` and lets every query attend to its own
chunk and the one before it. A query never attends to itself unless it sees nothing else.
Rounds are combined by weighting each round's output with its share of the total softmax
mass (its log-sum-exp), after dividing each key's unnormalised weight by the number of rounds in
which that key is visible to that query, so that the result is softmax attention over the union
of the rounds' windows (the paper's multi-round attention with duplicate counting).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from xformers_zoo.models.masked_softmax import attend, dropout_key, pad_to_multiple
from xformers_zoo.overrides import ConfigError
from xformers_zoo.variants import Capabilities, register_variant

# Score given to a query's own key: far below any real score, so self-attention only wins when
# no other key is visible, yet far above masked (padded) keys, so such a query returns its own
# value rather than a padded one.
SELF_SCORE = -1e5


@dataclasses.dataclass(frozen=True)
class ReformerConfig:
    """``n_hashes``: hash rounds; ``chunk_length``: queries per chunk (each also sees the previous
    chunk); ``n_buckets``: buckets per round, 1 or even (angular LSH takes the argmax over
    ``[xR, -xR]``); None picks twice the number of chunks of the longest sequence, so an average
    bucket fills half a chunk."""

    n_hashes: int = 2
    chunk_length: int = 64
    n_buckets: int | None = None

    def check(self, *, max_length: int, num_heads: int, head_dim: int) -> None:
        """Raises ConfigError for settings the attention cannot use."""
        del max_length, num_heads, head_dim
        for name in ("n_hashes", "chunk_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"reformer {name} must be >= 1, got {getattr(self, name)}")
        nb = self.n_buckets
        if nb is not None and not (nb == 1 or (nb >= 2 and nb % 2 == 0)):
            raise ConfigError(f"reformer n_buckets must be 1 or an even number >= 2 (angular LSH "
                              f"uses n_buckets / 2 rotations), got {nb}")

    def buckets_for(self, max_length: int) -> int:
        """Buckets per round for sequences of up to ``max_length`` tokens."""
        if self.n_buckets is not None:
            return self.n_buckets
        return 2 * max(1, math.ceil(max_length / self.chunk_length))


class LshRotations(nnx.Variable):
    """Fixed random rotations of the angular LSH: state, not a trained parameter."""


@register_variant(
    "reformer", config_cls=ReformerConfig,
    paper="Kitaev, Kaiser and Levskaya 2020, Reformer: The Efficient Transformer",
    capabilities=Capabilities(shared_qk=True),
    lra_overrides={"model.attention.n_hashes": 1, "model.attention.chunk_length": 10},
)
class ReformerAttention(nnx.Module):
    """Multi-round LSH attention over shared query-keys (Kitaev et al. 2020).

    Hash randomness: the rotations are drawn once at construction and kept as non-trainable
    state (``LshRotations``), not redrawn per call. A fixed hash makes the layer a deterministic
    function of its inputs, so evaluation needs no random key, checkpoints reproduce outputs
    exactly, and the padding-invariance guarantee holds call to call; the model can also learn
    around one hash instead of having to be robust to a new one at every step.

    Key padding is exact: padded positions go to a bucket after every real bucket, so real
    tokens' sorted order and chunks never depend on padded content, and padded keys are masked.
    Lengths that are not a multiple of ``chunk_length`` are padded internally.
    """

    def __init__(self, config: ReformerConfig, *, num_heads: int, head_dim: int,
                 max_length: int, dropout: float, rngs: nnx.Rngs):
        config.check(max_length=max_length, num_heads=num_heads, head_dim=head_dim)
        self.config = config
        self.dropout = dropout
        self.n_buckets = config.buckets_for(max_length)
        # [heads, head_dim, rounds, n_buckets / 2]; one set of rotations per head and round.
        shape = (num_heads, head_dim, config.n_hashes, max(self.n_buckets // 2, 1))
        self.rotations = LshRotations(jax.random.normal(rngs.params(), shape, jnp.float32))

    def hash_buckets(self, q: Float[Array, "b l h d"],
                     key_mask: Bool[Array, "b l"]) -> Int[Array, "b h r l"]:
        """Angular-LSH bucket of every position in every round; padded positions get bucket
        ``n_buckets``, which sorts after every real bucket."""
        b, length, h, _ = q.shape
        if self.n_buckets == 1:
            buckets = jnp.zeros((b, h, self.config.n_hashes, length), jnp.int32)
        else:
            # Hashing is a discrete choice: no gradient flows through it.
            rotated = jnp.einsum("blhd,hdrk->bhrlk", jax.lax.stop_gradient(q).astype(jnp.float32),
                                 self.rotations[...])
            buckets = jnp.argmax(jnp.concatenate([rotated, -rotated], axis=-1), axis=-1)
        return jnp.where(key_mask[:, None, None, :], buckets, self.n_buckets).astype(jnp.int32)

    def __call__(self, q: Float[Array, "b l h d"], k: Float[Array, "b l h d"],
                 v: Float[Array, "b l h d"], key_mask: Bool[Array, "b l"], *,
                 deterministic: bool, rngs: nnx.Rngs | None = None) -> Float[Array, "b l h d"]:
        del k  # shared-QK: the keys are the queries, normalised below
        b, length, h, d = q.shape
        m = self.config.chunk_length
        q = pad_to_multiple(q, m, axis=1)
        v = pad_to_multiple(v, m, axis=1)
        key_mask = pad_to_multiple(key_mask, m, axis=1, value=False)
        lp = q.shape[1]
        n_chunks = lp // m

        buckets = self.hash_buckets(q, key_mask)  # [b, h, r, lp]
        positions = jnp.arange(lp, dtype=jnp.int32)
        # Unique sort keys: bucket first, position as the tie-break.
        order = jnp.argsort(buckets * lp + positions, axis=-1)  # [b, h, r, lp]
        rank = jnp.argsort(order, axis=-1)  # sorted index of each position, [b, h, r, lp]

        qf = rearrange(q.astype(jnp.float32), "b l h d -> b h 1 l d")
        keys = qf * jax.lax.rsqrt(jnp.maximum(jnp.sum(qf * qf, -1, keepdims=True), 1e-12))

        def sort_chunks(x):  # [b, h, 1, lp, ...] -> [b, h, r, n_chunks, m, ...]
            idx = order.reshape(order.shape + (1,) * (x.ndim - 4))
            x = jnp.take_along_axis(x, idx, axis=3)
            return x.reshape(x.shape[:3] + (n_chunks, m) + x.shape[4:])

        def with_previous(x):  # keys of the own chunk and the chunk before it (wrapping)
            if n_chunks == 1:
                return x
            return jnp.concatenate([x, jnp.roll(x, 1, axis=3)], axis=4)

        q_pos = order.reshape(b, h, -1, n_chunks, m)  # position of each sorted slot
        k_pos = with_previous(q_pos)  # [b, h, r, c, w]
        k_mask = with_previous(sort_chunks(key_mask[:, None, None, :].repeat(h, 1)))
        k_vec = with_previous(sort_chunks(keys))  # [b, h, r, c, w, d]
        v_vec = with_previous(sort_chunks(rearrange(v, "b l h d -> b h 1 l d")))

        scores = jnp.einsum("bhrcqd,bhrckd->bhrcqk", sort_chunks(qf), k_vec) * d ** -0.5
        scores = jnp.where(q_pos[..., :, None] == k_pos[..., None, :], SELF_SCORE, scores)
        scores = scores - jnp.log(self._visible_rounds(rank, q_pos, k_pos, m, n_chunks))

        rate = 0.0 if deterministic else self.dropout
        out, lse = attend(scores, v_vec, k_mask[..., None, :], dropout_rate=rate,
                          dropout_rng=dropout_key(rngs, rate, deterministic))
        # Back to position order: [b, h, r, lp, d] and [b, h, r, lp].
        out = jnp.take_along_axis(out.reshape(b, h, -1, lp, d), rank[..., None], axis=3)
        lse = jnp.take_along_axis(lse.reshape(b, h, -1, lp), rank, axis=3)
        weights = jax.nn.softmax(lse, axis=2)  # each round's share of the total softmax mass
        out = jnp.einsum("bhrl,bhrld->blhd", weights, out)
        return out[:, :length].astype(v.dtype)

    def _visible_rounds(self, rank, q_pos, k_pos, m: int, n_chunks: int):
        """How many rounds show each key to each query, ``[b, h, r, c, q, w]`` (>= 1)."""
        if self.config.n_hashes == 1:
            return jnp.ones((), jnp.float32)
        chunk = rearrange(rank // m, "b h r l -> b h l r")  # chunk of each position per round

        def per_slot(pos):  # [b, h, r, c, n] -> [b, h, r, c, n, rounds]
            flat = pos.reshape(pos.shape[:2] + (-1,))
            got = jnp.take_along_axis(chunk, flat[..., None], axis=2)
            return got.reshape(pos.shape + (chunk.shape[-1],))

        qc, kc = per_slot(q_pos)[..., :, None, :], per_slot(k_pos)[..., None, :, :]
        seen = qc == kc
        if n_chunks > 1:
            seen = seen | (kc == (qc - 1) % n_chunks)
        return jnp.maximum(jnp.sum(seen, axis=-1), 1).astype(jnp.float32)
