"""The reference implementation: plain XLA einsums with a float32 softmax. Everything is
supported (masks, block masks, causal, dropout); memory is quadratic in length."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from xformers_zoo.kernels.block_mask import BlockMask
from xformers_zoo.kernels.dispatch import BlockwiseAttention, register_implementation
from xformers_zoo.kernels.mask_predicate import MaskPredicate, as_predicate, dense_mask

# A large finite negative rather than -inf: a fully masked row then stays finite (its output is
# zeroed below) instead of turning into NaN through inf - inf.
MASKED = -1e30


def attention_dropout(
    weights: Float[Array, "*batch q k"], rate: float, rng: jax.Array | None
) -> Float[Array, "*batch q k"]:
    """Dropout on normalised attention weights (Srivastava et al. 2014, "Dropout: A Simple Way
    to Prevent Neural Networks from Overfitting"): each weight is kept with probability
    ``1 - rate`` and scaled by ``1 / (1 - rate)``; ``rate`` 0 returns ``weights`` unchanged."""
    if rate == 0.0:
        return weights
    if rng is None:
        raise ValueError("attention dropout needs a key: pass rngs with a 'dropout' stream")
    keep = jax.random.bernoulli(rng, 1.0 - rate, weights.shape)
    return jnp.where(keep, weights / (1.0 - rate), 0.0)


def attention_mask(
    q_len: int,
    k_len: int,
    *,
    key_mask: Bool[Array, "b k"] | None,
    block_mask: BlockMask | None,
    causal: bool,
    mask_predicate: MaskPredicate | None = None,
    batch: int = 1,
    heads: int = 1,
) -> Bool[Array, "b h q k"] | None:
    """The element mask [batch or 1, heads or 1, q, k] that the options stand for (None: all);
    a mask predicate is evaluated for ``batch`` entries and ``heads`` heads."""
    mask = None

    def both(a, b):
        return b if a is None else a & b

    if key_mask is not None:
        mask = key_mask[:, None, None, :]
    if block_mask is not None:
        mask = both(mask, jnp.asarray(block_mask.to_dense(q_len, k_len))[None])
    if mask_predicate is not None:
        mask = both(mask, dense_mask(mask_predicate, batch, heads, q_len, k_len))
    if causal:
        mask = both(mask, jnp.tril(jnp.ones((q_len, k_len), bool), k_len - q_len)[None, None])
    return mask


def _masked_logits(
    q: Float[Array, "b q h d"], k: Float[Array, "b k h d"], *, key_mask=None, block_mask=None,
    scale=None, causal=False, mask_predicate=None,
) -> tuple[Float[Array, "b h q k"], Bool[Array, "b h q k"] | None]:
    """Scaled float32 logits with masked pairs set to ``MASKED``, and the mask (None: all)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    mask = attention_mask(q.shape[1], k.shape[1], key_mask=key_mask, block_mask=block_mask,
                          causal=causal, mask_predicate=as_predicate(mask_predicate),
                          batch=q.shape[0], heads=q.shape[2])
    if mask is not None:
        logits = jnp.where(mask, logits, MASKED)
    return logits, mask


def xla_attention_with_lse(
    q: Float[Array, "b q h d"],
    k: Float[Array, "b k h d"],
    v: Float[Array, "b k h d"],
    *,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    key_mask_is_prefix: bool = False,
    **masks,
) -> tuple[Float[Array, "b q h d"], Float[Array, "b h q"]]:
    """``xla_attention``'s output and the natural-log log-sum-exp ``[b, h, q]`` of each row's
    scaled logits over its visible keys (-inf for a row that sees none); ``masks``: the
    key_mask, block_mask, scale, causal and mask_predicate options of ``xla_attention``."""
    del key_mask_is_prefix
    logits, mask = _masked_logits(q, k, **masks)
    # jax.nn.softmax rather than models.masked_softmax.attend's exp(logits - lse): the two
    # round differently, and attend's weights moved the tiny ListOps run (37.20% -> 35.90%).
    weights = jax.nn.softmax(logits, axis=-1)
    lse = jax.nn.logsumexp(logits, axis=-1)
    if mask is not None:
        seen = mask.any(-1)
        weights = jnp.where(seen[..., None], weights, 0.0)
        lse = jnp.where(seen, lse, -jnp.inf)
    weights = attention_dropout(weights, dropout_rate, dropout_rng)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
    return out.astype(q.dtype), lse


def xla_backward_from_lse(
    q: Float[Array, "b q h d"],
    k: Float[Array, "b k h d"],
    v: Float[Array, "b k h d"],
    out: Float[Array, "b q h d"],
    lse: Float[Array, "b h q"],
    d_out: Float[Array, "b q h d"],
    *,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    key_mask_is_prefix: bool = False,
    **masks,
) -> tuple[Float[Array, "b q h d"], Float[Array, "b k h d"], Float[Array, "b k h d"]]:
    """Gradients of q, k, v through attention over these keys given each row's output and
    log-sum-exp over all the keys it sees (``BlockwiseAttention.backward``).

    With weights ``P = exp(S - lse)`` fixed by the whole row, ``dS = P (dP - rowsum(dO O))``
    (Dao 2023, FlashAttention-2, eq. in section 2.3); that is the vector-Jacobian product of
    ``(q, k, v) -> (dropout(P) v, rowsum(P))`` with cotangents ``(dO, -rowsum(dO O))``, which
    autodiff computes here."""
    del key_mask_is_prefix
    delta = jnp.einsum("bqhd,bqhd->bhq", d_out.astype(jnp.float32), out.astype(jnp.float32))
    seen = jnp.isfinite(lse)
    shift = jnp.where(seen, lse, 0.0)[..., None]

    def shares(q, k, v):
        logits, _ = _masked_logits(q, k, **masks)
        weights = jnp.where(seen[..., None], jnp.exp(logits - shift), 0.0)
        kept = attention_dropout(weights, dropout_rate, dropout_rng)
        values = jnp.einsum("bhqk,bkhd->bqhd", kept.astype(v.dtype), v,
                            preferred_element_type=jnp.float32)
        return values, weights.sum(-1)

    _, vjp = jax.vjp(shares, q, k, v)
    return vjp((d_out.astype(jnp.float32), -delta))


@register_implementation(
    "xla", rejects=lambda call: None, description="dense XLA reference", partitioned=True,
    blockwise=BlockwiseAttention(forward=xla_attention_with_lse, backward=xla_backward_from_lse))
def xla_attention(
    q: Float[Array, "b q h d"],
    k: Float[Array, "b k h d"],
    v: Float[Array, "b k h d"],
    *,
    key_mask: Bool[Array, "b k"] | None = None,
    block_mask: BlockMask | None = None,
    scale: float | None = None,
    causal: bool = False,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    key_mask_is_prefix: bool = False,
    mask_predicate: MaskPredicate | None = None,
) -> Float[Array, "b q h d"]:
    """Softmax attention computed densely; rows with no visible key return zeros. Any key mask
    is applied as given (``key_mask_is_prefix`` changes nothing here); a mask predicate is
    evaluated for every (batch, head, query, key)."""
    return xla_attention_with_lse(
        q, k, v, key_mask=key_mask, block_mask=block_mask, scale=scale, causal=causal,
        dropout_rate=dropout_rate, dropout_rng=dropout_rng,
        key_mask_is_prefix=key_mask_is_prefix, mask_predicate=mask_predicate)[0]
