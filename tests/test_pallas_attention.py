"""The Pallas FlashAttention kernels against a float64 reference: outputs and gradients of q, k
and v, on lengths that are not tile multiples, key padding (with fully padded rows), causal
masking, cross lengths, per-head block masks, block-sparse rows split over several programs, and
attention dropout (against a reference that applies the kernels' own keep mask). On CPU the
kernels run in Pallas interpret mode with small tiles; the ``gpu`` tests compile them for the GPU
at realistic tiles."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xformers_zoo.kernels import dot_product_attention, masks
from xformers_zoo.kernels.block_mask import BlockMask
from xformers_zoo.kernels.dispatch import AttentionCall, choose_implementation
from xformers_zoo.kernels.pallas_attention import INTERPRET_ENV, pallas_attention
from xformers_zoo.kernels.pallas_dropout import keep_mask
from xformers_zoo.kernels.pallas_layout import FlashTiles, PassTiles, default_tiles

SMALL_TILES = FlashTiles(PassTiles(32, 16), PassTiles(16, 32), PassTiles(32, 16))


def predicate_pairs(predicate, batch, heads, n_q, n_k):
    """A mask predicate evaluated in numpy over every (batch, head, query, key), its tiles
    added: [b, h, q, k] bool."""
    b, h, i, j = np.ix_(np.arange(batch), np.arange(heads), np.arange(n_q), np.arange(n_k))
    pairs = np.broadcast_to(predicate.fn(b, h, i, j), (batch, heads, n_q, n_k))
    if predicate.tiles is not None:
        pairs = pairs | predicate.tiles.to_dense(n_q, n_k)[None]
    return pairs


def reference(q, k, v, d_out, *, key_mask=None, block_mask=None, causal=False,
              dropout_rate=0.0, dropout_rng=None, mask_predicate=None):
    """Softmax attention and its q, k, v gradients in float64 numpy (textbook formulas); with
    dropout, the kernels' keep mask (``keep_mask``) drops the weights."""
    q, k, v, d_out = (np.asarray(x, np.float64) for x in (q, k, v, d_out))
    scale = q.shape[-1] ** -0.5
    n_q, n_k = q.shape[1], k.shape[1]
    visible = np.ones((1, 1, n_q, n_k), bool)
    if key_mask is not None:
        visible = visible & np.asarray(key_mask)[:, None, None, :]
    if block_mask is not None:
        visible = visible & block_mask.to_dense(n_q, n_k)[None]
    if causal:
        visible = visible & np.tril(np.ones((n_q, n_k), bool), n_k - n_q)
    if mask_predicate is not None:
        visible = visible & predicate_pairs(mask_predicate, q.shape[0], q.shape[2], n_q, n_k)
    s = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
    s = np.where(visible, s, -np.inf)
    m = s.max(-1, keepdims=True)
    e = np.exp(s - np.where(np.isfinite(m), m, 0.0))
    total = e.sum(-1, keepdims=True)
    p = e / np.where(total > 0, total, 1.0)  # [b, h, q, k]; rows seeing no key are 0
    kept = np.ones_like(p)  # keep mask / (1 - rate)
    if dropout_rate:
        kept = np.asarray(keep_mask(dropout_rng, dropout_rate, q.shape[0], q.shape[2], n_q, n_k),
                          np.float64) / (1.0 - dropout_rate)
    out = np.einsum("bhqk,bkhd->bqhd", p * kept, v)
    dp = np.einsum("bqhd,bkhd->bhqk", d_out, v) * kept
    ds = p * (dp - np.einsum("bqhd,bqhd->bhq", d_out, out)[..., None])
    dq = np.einsum("bhqk,bkhd->bqhd", ds, k) * scale
    dk = np.einsum("bhqk,bqhd->bkhd", ds, q) * scale
    dv = np.einsum("bhqk,bqhd->bkhd", p * kept, d_out)
    return out, (dq, dk, dv)


def rel_err(got, want):
    got = np.asarray(got, np.float64)
    assert np.isfinite(got).all(), "NaN or Inf in kernel result"
    return np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)


def run_and_check(seed, *, batch, q_len, k_len, heads, head_dim, dtype, tol, tiles=SMALL_TILES,
                  interpret=True, **options):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (batch, q_len, heads, head_dim)).astype(dtype)
    k = jax.random.normal(keys[1], (batch, k_len, heads, head_dim)).astype(dtype)
    v = jax.random.normal(keys[2], (batch, k_len, heads, head_dim)).astype(dtype)
    d_out = jax.random.normal(keys[3], q.shape).astype(dtype)

    # Options that choose kernels but do not change the result go to the kernels only.
    kernel_only = {name: options.pop(name) for name in ("key_mask_is_prefix", "kernels")
                   if name in options}

    def attend(q, k, v):
        return pallas_attention(q, k, v, interpret=interpret, tiles=tiles, **options,
                                **kernel_only)

    out, vjp = jax.vjp(jax.jit(attend), q, k, v)
    grads = vjp(d_out)
    want_out, want_grads = reference(q, k, v, d_out, **options)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel_err(out, want_out) < tol
    for name, got, want in zip("qkv", grads, want_grads, strict=True):
        assert got.dtype == dtype
        assert rel_err(got, want) < tol, f"d{name}"
    return out, grads


def test_dense_unaligned_lengths_float32():
    run_and_check(0, batch=2, q_len=40, k_len=40, heads=2, head_dim=16, dtype=jnp.float32,
                  tol=1e-5)


def test_key_padding_with_fully_padded_row():
    key_mask = jnp.arange(50)[None, :] < jnp.array([37, 0])[:, None]  # second sequence: no keys
    out, grads = run_and_check(1, batch=2, q_len=50, k_len=50, heads=2, head_dim=32,
                               dtype=jnp.float32, tol=1e-5, key_mask=key_mask)
    assert np.all(np.asarray(out[1]) == 0.0)
    assert np.all(np.asarray(grads[0][1]) == 0.0)  # no key visible: no query gradient


def test_causal_with_padding_bfloat16():
    key_mask = jnp.arange(48)[None, :] < jnp.array([48, 30])[:, None]
    run_and_check(2, batch=2, q_len=48, k_len=48, heads=1, head_dim=16, dtype=jnp.bfloat16,
                  tol=2e-2, key_mask=key_mask, causal=True)


def test_causal_cross_lengths_float16():
    run_and_check(3, batch=1, q_len=24, k_len=56, heads=2, head_dim=16, dtype=jnp.float16,
                  tol=5e-3, causal=True)


def test_per_head_block_mask_with_padding():
    rng = np.random.default_rng(4)
    tile_mask = rng.random((2, 3, 3)) < 0.5
    tile_mask[0, 1] = False  # a query tile that sees nothing in head 0
    block_mask = BlockMask(tile_mask, 32, 32)
    key_mask = jnp.arange(70)[None, :] < jnp.array([70, 45])[:, None]
    out, _ = run_and_check(4, batch=2, q_len=70, k_len=70, heads=2, head_dim=16,
                           dtype=jnp.float32, tol=1e-5, key_mask=key_mask, block_mask=block_mask)
    assert np.all(np.asarray(out[:, 32:64, 0]) == 0.0)


def test_builder_mask_with_causal_and_coarser_mask_tiles():
    # Mask tiles (32) larger than the kernel's (16): the schedule refines them.
    block_mask = masks.union(masks.sliding_window(90, 32, 32), masks.global_tokens(90, 1, 32))
    run_and_check(5, batch=1, q_len=90, k_len=90, heads=2, head_dim=16, dtype=jnp.float32,
                  tol=1e-5, block_mask=block_mask, causal=True)


def _split_tiles(max_steps: int) -> FlashTiles:
    """16 x 16 tiles in every pass, splitting rows longer than ``max_steps`` tiles."""
    return FlashTiles(*(PassTiles(16, 16, max_steps=max_steps) for _ in range(3)))


def test_split_long_rows_match_reference_and_unsplit():
    # Head 0 has a global tile (rows of 7 tiles, split into segments of 2); head 1 only a
    # window, so its launch pads with programs that write nothing. The second sequence is all
    # padding (every row, split or not, sees no key); the first ends inside a tile, so some
    # segments of the global row see no key either.
    n, block = 100, 16
    window = masks.sliding_window(n, 16, block).mask[0]
    glob = masks.global_tokens(n, 1, block).mask[0]
    block_mask = BlockMask(np.stack([window | glob, window]), block, block)
    key_mask = jnp.arange(n)[None, :] < jnp.array([70, 0])[:, None]
    options = dict(batch=2, q_len=n, k_len=n, heads=2, head_dim=16, dtype=jnp.float32, tol=1e-5,
                   key_mask=key_mask, block_mask=block_mask)
    split_out, split_grads = run_and_check(10, tiles=_split_tiles(2), **options)
    whole_out, whole_grads = run_and_check(10, tiles=_split_tiles(0), **options)
    for got, want in zip((split_out, *split_grads), (whole_out, *whole_grads), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(split_out[1]) == 0.0)


def test_dropout_matches_reference_with_padding():
    key_mask = jnp.arange(40)[None, :] < jnp.array([40, 23, 0])[:, None]
    out, grads = run_and_check(11, batch=3, q_len=40, k_len=40, heads=2, head_dim=16,
                               dtype=jnp.float32, tol=1e-5, key_mask=key_mask, dropout_rate=0.3,
                               dropout_rng=jax.random.key(0))
    assert np.all(np.asarray(out[2]) == 0.0)


def test_dropout_with_causal_split_block_sparse():
    block_mask = masks.union(masks.sliding_window(90, 16, 16), masks.global_tokens(90, 1, 16))
    run_and_check(12, batch=1, q_len=90, k_len=90, heads=2, head_dim=16, dtype=jnp.float32,
                  tol=1e-5, tiles=_split_tiles(2), block_mask=block_mask, causal=True,
                  dropout_rate=0.2, dropout_rng=jax.random.key(1))


def test_dropout_causal_cross_lengths_bfloat16():
    run_and_check(13, batch=1, q_len=24, k_len=56, heads=2, head_dim=16, dtype=jnp.bfloat16,
                  tol=2e-2, causal=True, dropout_rate=0.1,
                  dropout_rng=jax.random.key(2, impl="rbg"))


def test_dropout_keep_mask_statistics():
    rate = 0.25
    keep = np.asarray(keep_mask(jax.random.key(3), rate, 2, 3, 256, 256))
    assert keep.shape == (2, 3, 256, 256)
    # 393216 draws: the kept fraction's standard deviation is 7e-4.
    assert abs(keep.mean() - (1 - rate)) < 4e-3
    per_row = keep.mean(-1)  # 256 draws a row: deviation 0.027
    assert np.abs(per_row - (1 - rate)).max() < 0.15
    # Neighbouring decisions agree as often as independent draws would (p^2 + (1 - p)^2).
    agree = (1 - rate) ** 2 + rate**2
    assert abs((keep[..., 1:] == keep[..., :-1]).mean() - agree) < 5e-3
    assert abs((keep[..., 1:, :] == keep[..., :-1, :]).mean() - agree) < 5e-3
    # 2 x 2 neighbourhoods: all four kept as often as p^4.
    four = keep[..., 1:, 1:] & keep[..., :-1, 1:] & keep[..., 1:, :-1] & keep[..., :-1, :-1]
    assert abs(four.mean() - (1 - rate) ** 4) < 5e-3
    # Batch entries, heads and seeds draw differently.
    other_seed = np.asarray(keep_mask(jax.random.key(4), rate, 2, 3, 256, 256))
    for a, b in ((keep[0, 0], keep[1, 0]), (keep[0, 0], keep[0, 1]), (keep, other_seed)):
        assert abs((a == b).mean() - agree) < 1e-2


def test_dropout_same_seed_same_output():
    keys = jax.random.split(jax.random.key(14), 3)
    q, k, v = (jax.random.normal(key, (1, 48, 2, 16)) for key in keys)

    def attend(rng, rate=0.5):
        return np.asarray(pallas_attention(q, k, v, interpret=True, tiles=SMALL_TILES,
                                           dropout_rate=rate, dropout_rng=rng))

    first = attend(jax.random.key(5))
    np.testing.assert_array_equal(first, attend(jax.random.key(5)))
    assert not np.allclose(first, attend(jax.random.key(6)))
    assert not np.allclose(first, attend(None, rate=0.0))
    with pytest.raises(ValueError, match="needs a dropout_rng"):
        attend(None)
    with pytest.raises(ValueError, match=r"dropout_rate must be in \[0, 1\)"):
        attend(jax.random.key(5), rate=1.0)


def _call(**changes):
    facts = dict(backend="cpu", dtype="bfloat16", batch=1, q_len=64, k_len=64, num_heads=2,
                 head_dim=64, has_key_mask=False, block_mask=None, causal=False,
                 dropout_rate=0.0)
    return AttentionCall(**(facts | changes))


def test_rejects_name_the_reason(monkeypatch):
    monkeypatch.delenv(INTERPRET_ENV, raising=False)
    impl, skipped = choose_implementation(_call(), ("pallas", "xla"))
    assert impl.name == "xla" and "CUDA GPU" in skipped[0][1] and INTERPRET_ENV in skipped[0][1]
    monkeypatch.setenv(INTERPRET_ENV, "1")
    assert choose_implementation(_call(), ("pallas", "xla"))[0].name == "pallas"
    # Dropout: cuDNN steps aside (saying where dropout goes), the kernels take it.
    impl, skipped = choose_implementation(_call(dropout_rate=0.1), ("cudnn", "pallas", "xla"))
    assert impl.name == "pallas" and skipped[0][0] == "cudnn"
    cases = {"head_dim": _call(head_dim=160), "dtype": _call(dtype="int8"),
             "dropout_rate": _call(dropout_rate=1.0),
             "powers of two": _call(block_mask=BlockMask(np.ones((2, 2), bool), 48, 48))}
    for expected, call in cases.items():
        impl, skipped = choose_implementation(call, ("pallas", "xla"))
        assert impl.name == "xla" and expected in skipped[0][1]


def test_other_head_dims_run_zero_padded():
    # LRA's Pathfinder heads are 4 wide, Image's 8: padded to the next kernel size, exactly.
    key_mask = jnp.arange(40)[None] < jnp.array([40, 17])[:, None]
    for head_dim in (4, 8, 24):
        run_and_check(30 + head_dim, batch=2, q_len=40, k_len=40, heads=2, head_dim=head_dim,
                      dtype=jnp.float32, tol=1e-4, key_mask=key_mask, dropout_rate=0.1,
                      dropout_rng=jax.random.key(head_dim))


def test_direct_call_rejects_bad_input():
    q = jnp.zeros((1, 8, 1, 160))
    with pytest.raises(ValueError, match="head_dim must be 1 to 128"):
        pallas_attention(q, q, q)
    q = jnp.zeros((1, 64, 2, 16))
    with pytest.raises(ValueError, match="heads"):
        pallas_attention(q, q, q, block_mask=BlockMask(np.ones((3, 2, 2), bool), 32, 32))


def test_dispatch_runs_pallas_in_interpret_mode(monkeypatch):
    monkeypatch.setenv(INTERPRET_ENV, "1")
    keys = jax.random.split(jax.random.key(6), 3)
    q, k, v = (jax.random.normal(key, (1, 33, 1, 16)) for key in keys)
    got = dot_product_attention(q, k, v, implementation=("pallas",))
    want = dot_product_attention(q, k, v, implementation=("xla",))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


GPU_CASES = [
    dict(head_dim=32, dtype=jnp.bfloat16, q_len=1000),
    dict(head_dim=64, dtype=jnp.bfloat16, q_len=2048, causal=True),
    dict(head_dim=128, dtype=jnp.float16, q_len=777),
    dict(head_dim=16, dtype=jnp.bfloat16, q_len=300),
    dict(head_dim=64, dtype=jnp.float32, q_len=500),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"d{c['head_dim']}-n{c['q_len']}")
def test_gpu_dense(case):
    case = dict(case)
    n, dtype = case.pop("q_len"), case.pop("dtype")
    key_mask = jnp.arange(n)[None, :] < jnp.array([n, n // 3, 0])[:, None]
    tol = 1e-3 if dtype == jnp.float32 else 2e-2
    run_and_check(7, batch=3, q_len=n, k_len=n, heads=2, dtype=dtype, tol=tol, tiles=None,
                  interpret=False, key_mask=key_mask, **case)


@pytest.mark.gpu
@pytest.mark.parametrize("per_head,head_dim", [(False, 64), (True, 128), (True, 32)])
def test_gpu_block_sparse(per_head, head_dim):
    n, heads = 1500, 2
    block_mask = masks.union(masks.sliding_window(n, 256, 128), masks.global_tokens(n, 1, 128),
                             masks.random_blocks(n, 2, 128, seed=8,
                                                 num_heads=heads if per_head else 1))
    key_mask = jnp.arange(n)[None, :] < jnp.array([n, 1100])[:, None]
    run_and_check(9, batch=2, q_len=n, k_len=n, heads=heads, head_dim=head_dim, dtype=jnp.bfloat16,
                  tol=2e-2, tiles=None, interpret=False, key_mask=key_mask,
                  block_mask=block_mask)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim,causal", [(64, False), (128, True), (32, False)])
def test_gpu_dropout(head_dim, causal):
    n = 1000
    key_mask = jnp.arange(n)[None, :] < jnp.array([n, n // 3, 0])[:, None]
    run_and_check(15, batch=3, q_len=n, k_len=n, heads=2, head_dim=head_dim, dtype=jnp.bfloat16,
                  tol=2e-2, tiles=None, interpret=False, key_mask=key_mask, causal=causal,
                  dropout_rate=0.1, dropout_rng=jax.random.key(16))


@pytest.mark.gpu
@pytest.mark.parametrize("dropout_rate", [0.0, 0.1])
def test_gpu_block_sparse_split_rows(dropout_rate):
    n, heads = 1500, 2
    block_mask = masks.union(masks.sliding_window(n, 256, 128), masks.global_tokens(n, 1, 128),
                             masks.random_blocks(n, 2, 128, seed=17, num_heads=heads))
    key_mask = jnp.arange(n)[None, :] < jnp.array([n, 1100])[:, None]
    tiles = default_tiles(64, jnp.bfloat16, sparse=True)
    tiles = FlashTiles(*(dataclasses.replace(t, max_steps=2) for t in tiles.passes()))
    run_and_check(18, batch=2, q_len=n, k_len=n, heads=heads, head_dim=64, dtype=jnp.bfloat16,
                  tol=2e-2, tiles=tiles, interpret=False, key_mask=key_mask,
                  block_mask=block_mask, dropout_rate=dropout_rate,
                  dropout_rng=jax.random.key(19) if dropout_rate else None)
