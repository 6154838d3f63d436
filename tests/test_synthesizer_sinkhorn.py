"""Synthesizer (Tay et al. 2021) and Sparse Sinkhorn attention (Tay et al. 2020) against
directly computed references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import xformers_zoo as xz
from xformers_zoo.models.sinkhorn import SinkhornAttention, SinkhornConfig, sinkhorn_log
from xformers_zoo.models.synthesizer import (
    DenseSynthesizer,
    DenseSynthesizerConfig,
    FixedRandomLogits,
    RandomSynthesizer,
    RandomSynthesizerConfig,
)

HEADS, DIM = 2, 4


def tensors(length, batch=2, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return tuple(jax.random.normal(k, (batch, length, HEADS, DIM)) for k in keys)


@nnx.jit
def run(core, q, k, v, key_mask):
    return core(q, k, v, key_mask, deterministic=True)


def lengths_mask(length, real):
    return jnp.arange(length)[None, :] < jnp.asarray(real)[:, None]


def softmax_reference(logits, v, key_mask):
    """softmax over real keys of [b or 1, h, q, k] logits, applied to v: [b, k, h, d]."""
    logits = np.where(np.asarray(key_mask)[:, None, None, :], np.asarray(logits, np.float64),
                      -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", w, np.asarray(v, np.float64))


def build(cls, config, length, dropout=0.0):
    return cls(config, num_heads=HEADS, head_dim=DIM, max_length=length, dropout=dropout,
               rngs=nnx.Rngs(0))


@pytest.mark.parametrize("mode", ["random", "factorized_random"])
def test_random_synthesizer_is_softmax_of_its_matrix_times_v(mode):
    max_length, length = 12, 10  # a shorter call uses the leading rows and columns
    core = build(RandomSynthesizer, RandomSynthesizerConfig(mode=mode, rank=3), max_length)
    _, _, v = tensors(length)
    mask = lengths_mask(length, (7, 10))
    out = run(core, None, None, v, mask)
    if mode == "random":
        r = np.asarray(core.logits[...])[:, :length, :length]
    else:
        left, right = (np.asarray(t[...])[:, :length] for t in (core.left, core.right))
        r = np.einsum("hik,hjk->hij", left, right)
    ref = softmax_reference(np.broadcast_to(r, (2,) + r.shape), v, mask)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)


def test_fixed_random_synthesizer_has_no_trained_logits():
    core = build(RandomSynthesizer, RandomSynthesizerConfig(trainable=False), 8)
    assert isinstance(core.logits, FixedRandomLogits)
    assert not jax.tree.leaves(nnx.state(core, nnx.Param))


@pytest.mark.parametrize("mode", ["dense", "factorized_dense"])
def test_dense_synthesizer_logits_come_from_each_token(mode):
    length = 10
    core = build(DenseSynthesizer, DenseSynthesizerConfig(mode=mode, factor=3), length)
    q, _, v = tensors(length, seed=1)
    mask = lengths_mask(length, (6, 10))
    out = run(core, q, q, v, mask)
    hidden = np.maximum(np.asarray(q, np.float64), 0)

    def head(w, b):
        return np.einsum("blhd,hdw->bhlw", hidden, np.asarray(w[...])) + np.asarray(
            b[...])[None, :, None]

    if mode == "dense":
        logits = head(core.w_rows, core.b_rows)
    else:
        a, c = head(core.w_a, core.b_a), head(core.w_b, core.b_b)  # widths 3 and 4
        j = np.arange(length)
        logits = a[..., j // 4] * c[..., j % 4]
    ref = softmax_reference(logits, v, mask)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-4, atol=1e-5)


def test_synthesizer_registry_declares_what_it_reads():
    dense, random = xz.VARIANTS.get("synthesizer-dense"), xz.VARIANTS.get("synthesizer-random")
    assert dense.capabilities.shared_qk and dense.capabilities.fixed_length
    assert not random.capabilities.uses_qk and random.capabilities.fixed_length


def test_synthesizer_rejects_longer_inputs():
    core = build(RandomSynthesizer, RandomSynthesizerConfig(), 8)
    _, _, v = tensors(9)
    with pytest.raises(ValueError, match="at most 8"):
        run(core, None, None, v, jnp.ones((2, 9), bool))


def test_sinkhorn_normalisation_is_doubly_stochastic():
    scores = jax.random.normal(jax.random.key(0), (3, 5, 5)) * 3
    p = np.exp(np.asarray(sinkhorn_log(scores, 50)))
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-4)
    np.testing.assert_allclose(p.sum(-2), 1.0, atol=1e-4)
    assert (p >= 0).all()


def test_sinkhorn_single_block_is_twice_full_attention():
    """With one block the permutation is [[1]]: both the local and the sorted attention are
    full attention over the real keys, and their outputs are summed."""
    length = 12
    core = build(SinkhornAttention, SinkhornConfig(block_size=16), length)
    q, k, v = tensors(length, seed=2)
    mask = lengths_mask(length, (5, 12))
    out = run(core, q, k, v, mask)
    logits = np.einsum("bqhd,bkhd->bhqk", np.asarray(q, np.float64), np.asarray(k)) / 2.0
    ref = 2 * softmax_reference(logits, v, mask)
    real = np.asarray(mask)
    np.testing.assert_allclose(np.asarray(out)[real], ref[real], rtol=1e-5, atol=1e-5)


def test_sinkhorn_sorted_blocks_match_a_dense_reference():
    """Several blocks and a ragged length: the output equals local block attention plus
    attention over the permutation-mixed key and value blocks, computed densely."""
    length, block = 10, 4
    core = build(SinkhornAttention, SinkhornConfig(block_size=block, iterations=20), length)
    q, k, v = tensors(length, batch=1, seed=3)
    mask = jnp.ones((1, length), bool)

    def padded(x):  # [1, 12, h, d] -> [h, blocks, block, d]
        x = np.pad(np.asarray(x, np.float64), ((0, 0), (0, 2), (0, 0), (0, 0)))
        return x[0].reshape(3, block, HEADS, DIM).transpose(2, 0, 1, 3)

    qb, kb, vb = padded(q), padded(k), padded(v)
    real = np.arange(12).reshape(3, block) < length

    @nnx.jit
    def out_and_permutation(core, q, k, v, blocks, real):
        perm = core.block_permutation(blocks, real, deterministic=True)
        return core(q, k, v, mask, deterministic=True), perm

    out, perm = out_and_permutation(core, q, k, v, jnp.asarray(kb, jnp.float32)[None],
                                    jnp.asarray(real)[None])
    out, perm = np.asarray(out), np.asarray(perm)[0]
    np.testing.assert_allclose(perm.sum(-1), 1.0, atol=1e-3)
    np.testing.assert_allclose(perm.sum(-2), 1.0, atol=1e-3)

    def block_attention(keys, values, visible):
        s = np.einsum("hnqd,hnkd->hnqk", qb, keys) / 2.0
        s = np.where(visible[None, :, None, :], s, -np.inf)
        w = np.exp(s - s.max(-1, keepdims=True))
        return np.einsum("hnqk,hnkd->hnqd", w / w.sum(-1, keepdims=True), values)

    sorted_visible = np.einsum("hji,is->hjs", perm, real.astype(float))[0] > 0
    ref = (block_attention(kb, vb, real)
           + block_attention(np.einsum("hji,hisd->hjsd", perm, kb),
                             np.einsum("hji,hisd->hjsd", perm, vb), sorted_visible))
    ref = ref.transpose(1, 2, 0, 3).reshape(12, HEADS, DIM)[:length]
    np.testing.assert_allclose(out[0], ref, rtol=1e-4, atol=1e-4)


def test_sinkhorn_padding_is_exact_with_many_blocks():
    length = 22
    core = build(SinkhornAttention, SinkhornConfig(block_size=4), length)
    q, k, v = tensors(length, seed=4)
    mask = lengths_mask(length, (9, 22))
    noise = tensors(length, seed=5)
    keep = mask[:, :, None, None]
    a = run(core, q, k, v, mask)
    b = run(core, *(jnp.where(keep, t, 30 * n) for t, n in zip((q, k, v), noise, strict=True)),
            mask)
    real = np.asarray(mask)
    np.testing.assert_allclose(np.asarray(a)[real], np.asarray(b)[real], rtol=1e-5, atol=1e-5)


def test_sinkhorn_gumbel_noise_needs_and_uses_rngs():
    core = build(SinkhornAttention, SinkhornConfig(block_size=4), 16)
    q, k, v = tensors(16, seed=6)
    mask = jnp.ones((2, 16), bool)
    with pytest.raises(ValueError, match="rngs"):
        core(q, k, v, mask, deterministic=False)
    # "rbg" keys compile much faster on CPU than the default threefry ones.
    a, b = (core(q, k, v, mask, deterministic=False,
                 rngs=nnx.Rngs(dropout=jax.random.key(seed, impl="rbg"))) for seed in (1, 2))
    assert not np.allclose(np.asarray(a), np.asarray(b))
