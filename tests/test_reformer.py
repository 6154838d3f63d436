"""Reformer LSH attention (Kitaev et al. 2020) against directly computed references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from xformers_zoo.models.reformer import SELF_SCORE, ReformerAttention, ReformerConfig
from xformers_zoo.overrides import ConfigError

HEADS, DIM = 2, 8


def make(length, **fields):
    return ReformerAttention(ReformerConfig(**fields), num_heads=HEADS, head_dim=DIM,
                             max_length=length, dropout=0.0, rngs=nnx.Rngs(0))


def qv(length, batch=2, seed=0):
    kq, kv = jax.random.split(jax.random.key(seed))
    return (jax.random.normal(kq, (batch, length, HEADS, DIM)),
            jax.random.normal(kv, (batch, length, HEADS, DIM)))


@nnx.jit
def run(core, q, v, key_mask):
    return core(q, q, v, key_mask, deterministic=True)


def lengths_mask(length, real):
    return jnp.arange(length)[None, :] < jnp.asarray(real)[:, None]


def shared_qk_reference(q, v, key_mask, visible):
    """Softmax over the visible keys with unit-length shared keys and self scored SELF_SCORE;
    ``visible``: [batch, heads, q, k]."""
    q, v, key_mask = (np.asarray(t, np.float64) for t in (q, v, key_mask))
    keys = q / np.maximum(np.linalg.norm(q, axis=-1, keepdims=True), 1e-6)
    scores = np.einsum("bqhd,bkhd->bhqk", q, keys) / np.sqrt(q.shape[-1])
    n = q.shape[1]
    scores = np.where(np.eye(n, dtype=bool), SELF_SCORE, scores)
    allowed = np.asarray(visible) & (key_mask[:, None, None, :] > 0)
    scores = np.where(allowed, scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", weights, v)


@pytest.mark.parametrize("n_hashes", [1, 3])
def test_one_bucket_one_chunk_is_full_shared_qk_attention(n_hashes):
    """One bucket and a chunk spanning the sequence: every round sees every key, so the result
    is full attention with shared, normalised keys and self-masking, whatever the round count."""
    length = 24
    core = make(length, n_hashes=n_hashes, n_buckets=1, chunk_length=length)
    q, v = qv(length)
    mask = lengths_mask(length, (15, 24))
    out = run(core, q, v, mask)
    visible = np.ones((1, 1, length, length), bool)
    ref = shared_qk_reference(q, v, mask, visible)
    real = np.asarray(mask)
    np.testing.assert_allclose(np.asarray(out)[real], ref[real], rtol=1e-5, atol=1e-5)


def union_of_windows(buckets, chunk):
    """Which keys each query sees in at least one round, from the bucket assignment: sort by
    (bucket, position), chunk, and see the own and the previous chunk; [b, h, q, k]."""
    buckets = np.asarray(buckets)
    b, h, rounds, n = buckets.shape
    n_chunks = n // chunk
    seen = np.zeros((b, h, n, n), bool)
    for bi in range(b):
        for hi in range(h):
            for r in range(rounds):
                order = np.lexsort((np.arange(n), buckets[bi, hi, r]))
                chunk_of = np.empty(n, int)
                chunk_of[order] = np.arange(n) // chunk
                same = chunk_of[None, :] == chunk_of[:, None]
                prev = chunk_of[None, :] == (chunk_of[:, None] - 1) % n_chunks
                seen[bi, hi] |= same | (prev if n_chunks > 1 else False)
    return seen


def test_multi_round_equals_softmax_over_union_of_windows():
    """Several rounds, several chunks, a length that is not a multiple of the chunk and padding:
    the log-sum-exp combination with duplicate counting is softmax over the union of windows."""
    length, chunk = 29, 4
    core = make(length, n_hashes=3, chunk_length=chunk, n_buckets=6)
    q, v = qv(length, seed=3)
    mask = lengths_mask(length, (21, 29))
    out = run(core, q, v, mask)
    padded = 32
    qp = jnp.pad(q, ((0, 0), (0, padded - length), (0, 0), (0, 0)))
    mp = jnp.pad(mask, ((0, 0), (0, padded - length)))
    visible = union_of_windows(core.hash_buckets(qp, mp), chunk)
    ref = shared_qk_reference(qp, jnp.pad(v, ((0, 0), (0, 3), (0, 0), (0, 0))), mp, visible)
    real = np.asarray(mask)
    np.testing.assert_allclose(np.asarray(out)[real], ref[:, :length][real], rtol=1e-4, atol=1e-4)
    # The hash is not trivial here: some query misses some real key.
    real_pairs = np.asarray(mp)[:, None, :, None] & np.asarray(mp)[:, None, None, :]
    assert not visible[np.broadcast_to(real_pairs, visible.shape)].all()


def test_padding_is_exact_with_many_chunks():
    length = 37
    core = make(length, n_hashes=2, chunk_length=5)
    q, v = qv(length, seed=5)
    mask = lengths_mask(length, (19, 37))
    noise_q, noise_v = qv(length, seed=6)
    keep = mask[:, :, None, None]
    a = run(core, q, v, mask)
    q2, v2 = jnp.where(keep, q, 50 * noise_q), jnp.where(keep, v, 50 * noise_v)
    b = run(core, q2, v2, mask)
    real = np.asarray(mask)
    np.testing.assert_allclose(np.asarray(a)[real], np.asarray(b)[real], rtol=1e-5, atol=1e-5)


def test_padded_positions_sort_after_real_ones():
    core = make(16, n_hashes=2, chunk_length=4)
    q, _ = qv(16)
    mask = lengths_mask(16, (9, 16))
    buckets = np.asarray(core.hash_buckets(q, mask))
    assert (buckets[0, :, :, 9:] == core.n_buckets).all()
    assert (buckets[0, :, :, :9] < core.n_buckets).all()
    assert (buckets[1] < core.n_buckets).all()


def test_rotations_are_not_trained_parameters():
    core = make(16)
    assert not jax.tree.leaves(nnx.state(core, nnx.Param))


def test_bad_bucket_count_is_rejected():
    with pytest.raises(ConfigError, match="even"):
        make(16, n_buckets=3)
