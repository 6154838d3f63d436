"""Token-level mask predicates: the host classification of kernel tiles (empty, full, partial)
against a brute-force element mask; the Pallas kernels with a predicate (Pallas interpret mode
on CPU, realistic tiles on the ``gpu`` tests) against the float64 reference, outputs and
gradients, for LRA's Local (blocks of 50) and fixed Sparse Transformer (blocks of 10) patterns
at unaligned lengths, with key padding, fully masked rows, causal masking, dropout, per-head and
per-batch predicates and a tile part; the XLA reference with a predicate; and which kernel family
and implementation serve predicate calls, with the reasons given for the others."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_pallas_attention import SMALL_TILES, predicate_pairs, reference, run_and_check

from xformers_zoo.kernels import MaskPredicate, dot_product_attention, masks, predicates
from xformers_zoo.kernels.cudnn import cudnn_rejects
from xformers_zoo.kernels.dispatch import AttentionCall, choose_implementation
from xformers_zoo.kernels.mask_predicate import tile_classes
from xformers_zoo.kernels.pallas_attention import INTERPRET_ENV, pallas_attention
from xformers_zoo.kernels.pallas_mosaic_forward import mosaic_rejects

LRA_LOCAL = predicates.local_blocks(50)
LRA_FIXED = predicates.fixed(50, 10)  # chunks of 50 tokens, c = 10 summary tokens


def brute_force_local(n, block):
    """Local attention as the LRA paper states it: a token sees the tokens of its own block."""
    allowed = np.zeros((n, n), bool)
    for start in range(0, n, block):
        allowed[start:start + block, start:start + block] = True
    return allowed


def brute_force_fixed(n, chunk, summary):
    """Child et al.'s fixed pattern: each token's own chunk, and the last ``summary`` tokens of
    every chunk."""
    allowed = brute_force_local(n, chunk)
    for start in range(0, n, chunk):
        allowed[:, start + chunk - summary:start + chunk] = True
    return allowed


def test_lra_predicates_state_the_papers_patterns():
    n = 173
    np.testing.assert_array_equal(predicate_pairs(LRA_LOCAL, 1, 1, n, n)[0, 0],
                                  brute_force_local(n, 50))
    np.testing.assert_array_equal(predicate_pairs(LRA_FIXED, 1, 1, n, n)[0, 0],
                                  brute_force_fixed(n, 50, 10))
    i, j = np.indices((n, n))
    np.testing.assert_array_equal(predicate_pairs(predicates.sliding_window(9), 1, 1, n, n)[0, 0],
                                  np.abs(i - j) <= 4)


@pytest.mark.parametrize("predicate,batch,heads", [
    (LRA_LOCAL, 1, 1),
    (LRA_FIXED, 1, 1),
    # per head and per batch entry: the schedule must serve every batch entry
    (MaskPredicate(lambda b, h, q, k: (h == 1) | (q // 50 == k // 50) & (k < 60 + 40 * b)), 2, 2),
])
def test_tile_classes_match_brute_force(predicate, batch, heads):
    q_len, k_len, block_q, block_k = 150, 130, 32, 16
    q_tiles, k_tiles = -(-q_len // block_q), -(-k_len // block_k) + 1  # one tile of padding only
    classes = tile_classes(predicate, batch, heads, q_len, k_len, block_q, block_k, q_tiles,
                           k_tiles)
    pairs = predicate_pairs(predicate, batch, heads, q_len, k_len)
    assert classes.visible.shape[1:] == classes.partial.shape[1:] == (q_tiles, k_tiles)
    kinds = {"empty": 0, "full": 0, "partial": 0}
    for h in range(heads):
        for qi in range(q_tiles):
            for kj in range(k_tiles):
                tile = pairs[:, h, qi * block_q:(qi + 1) * block_q, kj * block_k:(kj + 1) * block_k]
                kind = ("empty" if not tile.any() else "full" if tile.all() else "partial")
                kinds[kind] += 1
                got_h = h % classes.visible.shape[0]
                assert classes.visible[got_h, qi, kj] == (kind != "empty"), (h, qi, kj)
                assert classes.partial[got_h, qi, kj] == (kind == "partial"), (h, qi, kj)
    assert min(kinds.values()) > 0  # every kind occurs, so each branch was checked


def test_tile_part_is_full_and_shared_predicates_get_one_schedule():
    tiles = masks.random_blocks(96, 1, 32, seed=0, num_heads=2)
    predicate = predicates.union(predicates.sliding_window(3), tiles=tiles)
    classes = tile_classes(predicate, 1, 2, 96, 96, 16, 16, 6, 6)
    fine = np.repeat(np.repeat(tiles.mask, 2, 1), 2, 2)
    assert classes.visible[fine].all() and not classes.partial[fine].any()
    shared = tile_classes(LRA_LOCAL, 3, 4, 96, 96, 16, 16, 6, 6)
    assert shared.visible.shape[0] == 1  # depends on neither head nor batch entry


LENGTHS = [(130, 130), (97, 130)]  # unaligned, and cross lengths


@pytest.mark.parametrize("name,predicate", [("local-50", LRA_LOCAL), ("fixed-10", LRA_FIXED)])
@pytest.mark.parametrize("q_len,k_len", LENGTHS)
def test_lra_patterns_match_reference(name, predicate, q_len, k_len):
    # The second sequence has real keys up to 77: its keys 77-129 are padding.
    key_mask = jnp.arange(k_len)[None, :] < jnp.array([k_len, 77])[:, None]
    run_and_check(40, batch=2, q_len=q_len, k_len=k_len, heads=2, head_dim=16,
                  dtype=jnp.float32, tol=1e-5, key_mask=key_mask, mask_predicate=predicate)


def test_fully_masked_rows_give_zeros():
    # Queries 60 and on see no key through the predicate; the second sequence none at all
    # through its key mask.
    predicate = MaskPredicate(lambda b, h, q, k: (q < 60) & (q // 50 == k // 50))
    key_mask = jnp.arange(100)[None, :] < jnp.array([100, 0])[:, None]
    out, grads = run_and_check(41, batch=2, q_len=100, k_len=100, heads=1, head_dim=16,
                               dtype=jnp.float32, tol=1e-5, key_mask=key_mask,
                               mask_predicate=predicate)
    assert np.all(np.asarray(out[0, 60:]) == 0.0) and np.all(np.asarray(out[1]) == 0.0)
    assert np.all(np.asarray(grads[0][0, 60:]) == 0.0)


def test_per_head_per_batch_predicate_with_causal_bfloat16():
    predicate = MaskPredicate(lambda b, h, q, k: (h == 0) | (k >= q - 20 - 30 * b))
    run_and_check(42, batch=2, q_len=90, k_len=90, heads=2, head_dim=32, dtype=jnp.bfloat16,
                  tol=2e-2, causal=True, mask_predicate=predicate)


def test_predicate_with_tiles_dropout_and_split_rows():
    # BigBird-like: a token window and global tokens, plus random tiles in whole.
    n = 100
    predicate = predicates.union(predicates.sliding_window(21), predicates.global_tokens(5),
                                 tiles=masks.random_blocks(n, 1, 16, seed=3, num_heads=2))
    key_mask = jnp.arange(n)[None, :] < jnp.array([n, 70])[:, None]
    tiles = type(SMALL_TILES)(*(type(SMALL_TILES.forward)(16, 16, max_steps=2)
                                for _ in range(3)))
    run_and_check(43, batch=2, q_len=n, k_len=n, heads=2, head_dim=16, dtype=jnp.float32,
                  tol=1e-5, tiles=tiles, key_mask=key_mask, mask_predicate=predicate,
                  dropout_rate=0.2, dropout_rng=jax.random.key(7))


def test_bare_callable_and_xla_reference():
    keys = jax.random.split(jax.random.key(44), 3)
    q, k, v = (jax.random.normal(key, (2, 61, 2, 16)) for key in keys)
    key_mask = jnp.arange(61)[None, :] < jnp.array([61, 33])[:, None]
    d_out = jnp.ones_like(q)
    want, _ = reference(q, k, v, d_out, key_mask=key_mask, mask_predicate=LRA_FIXED)
    got = dot_product_attention(q, k, v, key_mask=key_mask, implementation=("xla",),
                                mask_predicate=LRA_FIXED.fn)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    got = pallas_attention(q, k, v, key_mask=key_mask, mask_predicate=LRA_FIXED.fn,
                           tiles=SMALL_TILES, interpret=True)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def test_bad_predicate_input_is_named():
    q = jnp.zeros((1, 32, 1, 16))
    with pytest.raises(ValueError, match="block_mask or a mask_predicate, not both"):
        dot_product_attention(q, q, q, block_mask=masks.dense(32, 16),
                              mask_predicate=LRA_LOCAL, implementation=("xla",))
    with pytest.raises(TypeError, match="callable fn"):
        MaskPredicate(3)
    with pytest.raises(ValueError, match="powers of two >= 16, got 50x50"):
        pallas_attention(q, q, q, interpret=True, mask_predicate=LRA_LOCAL.with_tiles(
            masks.dense(32, 50)))


def _call(**changes):
    facts = dict(backend="cpu", dtype="bfloat16", batch=1, q_len=200, k_len=200, num_heads=2,
                 head_dim=64, has_key_mask=True, block_mask=None, causal=False,
                 dropout_rate=0.0, key_mask_is_prefix=True, mask_predicate=LRA_LOCAL)
    return AttentionCall(**(facts | changes))


def test_dispatch_sends_predicates_to_triton_kernels(monkeypatch):
    monkeypatch.setenv(INTERPRET_ENV, "1")
    assert choose_implementation(_call(), ("pallas", "xla"))[0].name == "pallas"
    assert cudnn_rejects(_call(backend="gpu")) == "mask predicates are not supported"
    tiled = LRA_LOCAL.with_tiles(masks.dense(200, 50))
    impl, skipped = choose_implementation(_call(mask_predicate=tiled), ("pallas", "xla"))
    assert impl.name == "xla" and "powers of two >= 16, got 50x50" in dict(skipped)["pallas"]
    assert mosaic_rejects("bfloat16", 64, LRA_LOCAL.tiles) is None
    assert "multiples of 128x128" in mosaic_rejects("bfloat16", 64, masks.dense(200, 64))


@pytest.mark.gpu
@pytest.mark.parametrize("name,predicate,head_dim", [("local-50", LRA_LOCAL, 64),
                                                     ("fixed-10", LRA_FIXED, 64),
                                                     ("local-50", LRA_LOCAL, 128)])
def test_gpu_lra_patterns(name, predicate, head_dim):
    n = 1000
    key_mask = jnp.arange(n)[None, :] < jnp.array([n, 777, 0])[:, None]
    run_and_check(45, batch=3, q_len=n, k_len=n, heads=2, head_dim=head_dim, dtype=jnp.bfloat16,
                  tol=2e-2, tiles=None, interpret=False, key_mask=key_mask,
                  mask_predicate=predicate)


@pytest.mark.gpu
def test_gpu_predicate_with_tiles_causal_dropout():
    n, heads = 1500, 2
    predicate = predicates.union(predicates.sliding_window(300), predicates.global_tokens(3),
                                 tiles=masks.random_blocks(n, 2, 128, seed=8, num_heads=heads))
    key_mask = jnp.arange(n)[None, :] < jnp.array([n, 1100])[:, None]
    run_and_check(46, batch=2, q_len=n, k_len=n, heads=heads, head_dim=64, dtype=jnp.bfloat16,
                  tol=2e-2, tiles=None, interpret=False, key_mask=key_mask, causal=True,
                  mask_predicate=predicate, dropout_rate=0.1, dropout_rng=jax.random.key(9))


@pytest.mark.parametrize("causal,dropout_rate", [(False, 0.0), (True, 0.1)])
def test_triton_kernels_with_predicate_lower_for_cuda(causal, dropout_rate):
    """Lowering for the "cuda" platform needs no GPU and turns the kernel bodies (the in-kernel
    predicate and its branch on partial tiles included) into Triton modules: all three kernels
    of a forward and backward pass."""
    x = jax.ShapeDtypeStruct((2, 1000, 2, 64), jnp.bfloat16)
    key_mask = jax.ShapeDtypeStruct((2, 1000), jnp.bool_)

    def forward_backward(q, k, v, key_mask):
        out, vjp = jax.vjp(lambda q, k, v: pallas_attention(
            q, k, v, key_mask=key_mask, mask_predicate=LRA_FIXED, causal=causal,
            dropout_rate=dropout_rate, dropout_rng=jax.random.key(0) if dropout_rate else None,
            interpret=False, kernels="triton"), q, k, v)
        return vjp(out)

    text = jax.jit(forward_backward).trace(x, x, x, key_mask).lower(
        lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 3
