"""Masks in the Mosaic GPU kernels: causal masking, block masks, mask predicates and key masks of
any form (kernels/pallas_mosaic_mask.py).

The kernels have no interpret mode, so on CPU three things are checked: the host schedules list
exactly the tiles with a visible pair, fully visible ones first, with flags that name what a
partial tile must evaluate; a float64 walk of those schedules, program by program and tile by
tile with the kernels' own element mask (``element_visible``), their -inf guard and their
empty-row conventions, gives the reference's outputs and q, k, v gradients; and every mask
lowers to the two Mosaic launches. The ``gpu`` tests run the kernels themselves against the
float64 reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_mask_predicates import LRA_FIXED, LRA_LOCAL
from test_pallas_attention import predicate_pairs, reference, rel_err, run_and_check
from test_pallas_mosaic_lowering import lowered_text

from xformers_zoo.kernels import masks, predicates
from xformers_zoo.kernels import pallas_attention as pallas_module
from xformers_zoo.kernels.block_mask import BlockMask
from xformers_zoo.kernels.dispatch import AttentionCall, describe_choice
from xformers_zoo.kernels.pallas_in_kernel import EMPTY_ROW_LSE, LOG2_E
from xformers_zoo.kernels.pallas_layout import (
    MOSAIC_FEATURES,
    mosaic_features,
    prepare,
    with_defaults,
)
from xformers_zoo.kernels.pallas_mosaic_mask import (
    CAUSAL_PARTIAL,
    PREDICATE_PARTIAL,
    element_visible,
    mosaic_schedule,
)


def _per_head_blocks(n: int, heads: int, seed: int) -> BlockMask:
    """Random 128-token tiles per head, one query tile row empty in head 0."""
    tiles = -(-n // 128)
    mask = np.random.default_rng(seed).random((heads, tiles, tiles)) < 0.5
    mask[0, 1] = False
    return BlockMask(mask, 128, 128)


def _key_mask(n: int, seed: int) -> jax.Array:
    """Random keys of the first sequence masked; the second sees none (its rows are empty)."""
    keep = np.random.default_rng(seed).random((2, n)) < 0.7
    keep[1] = False
    return jnp.asarray(keep)


# (name, options, q_len, k_len): every kind of mask the Mosaic kernels now take.
CASES = [
    ("causal", dict(causal=True), 300, 300),
    ("causal-cross", dict(causal=True), 200, 520),
    ("key-mask", dict(key_mask=_key_mask(390, 1)), 390, 390),
    ("local-50", dict(mask_predicate=LRA_LOCAL, key_mask=jnp.arange(600)[None] < jnp.array(
        [[600], [431]]), key_mask_is_prefix=True), 600, 600),
    ("fixed", dict(mask_predicate=LRA_FIXED), 512, 512),
    ("window-global-tiles-causal", dict(
        mask_predicate=predicates.union(predicates.sliding_window(150), predicates.global_tokens(3),
                                        tiles=masks.random_blocks(640, 1, 128, seed=8,
                                                                  num_heads=2)),
        causal=True), 640, 640),
    ("block-mask", dict(block_mask=_per_head_blocks(500, 2, 4)), 500, 500),
    ("lengths", dict(key_mask=jnp.arange(400)[None] < jnp.array([[400], [0]]),
                     key_mask_is_prefix=True), 400, 400),
]
IDS = [c[0] for c in CASES]


def _inputs(seed: int, q_len: int, k_len: int, head_dim: int = 16, heads: int = 2):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (2, q_len, heads, head_dim))
    k = jax.random.normal(keys[1], (2, k_len, heads, head_dim))
    v = jax.random.normal(keys[2], (2, k_len, heads, head_dim))
    return q, k, v, jax.random.normal(keys[3], q.shape)


def _mosaic_call(q, k, v, options):
    """The call laid out for the Mosaic kernels (chosen whatever the machine)."""
    options = with_defaults(dict(options))
    return prepare(q, k, v, **options, choose_mosaic=lambda *args, **facts: True)


def _row_plan(plan, schedule, batch, head, row, full_tiles):
    """(fully visible count, listed tiles, flags) of one program row: the schedule's, or the
    dense walk (every tile, or every tile up to the sequence's length)."""
    if plan.mask.sparse:
        entry = head if schedule.indices.shape[0] > 1 else 0
        full, steps = schedule.counts[entry, row]
        return int(full), schedule.indices[entry, row, :steps], schedule.flags[entry, row]
    return full_tiles, np.arange(full_tiles), None


def walk_forward(call):
    """The Mosaic forward's arithmetic in float64, following its launch: output and base-2
    log-sum-exp."""
    q, k, v, bias, _, lengths = (None if x is None else np.asarray(x, np.float64)
                                 for x in call.inputs)
    launch = call.kernels[2]
    plan, mask = launch.forward, launch.forward.mask
    batch, q_len, heads, _ = q.shape
    block_q, block_k, log2_scale = plan.block_q, plan.block_k, plan.scale * LOG2_E
    out, lse = np.zeros_like(q), np.zeros((batch, heads, q_len))
    for b in range(batch):
        length = k.shape[1] if lengths is None else int(lengths[b])
        for h in range(heads):
            for row in range(q_len // plan.rows_per_program):
                if mask.has_lengths:
                    full, tiles, flags = length // block_k, np.arange(-(-length // block_k)), None
                else:
                    full, tiles, flags = _row_plan(plan, launch.forward_schedule, b, h, row,
                                                   k.shape[1] // block_k)
                for half in range(2):
                    rows = slice((row * 2 + half) * block_q, (row * 2 + half + 1) * block_q)
                    m, total = np.full(block_q, -np.inf), np.zeros(block_q)
                    acc = np.zeros((block_q, q.shape[-1]))
                    for i, tile in enumerate(tiles):
                        keys = slice(tile * block_k, (tile + 1) * block_k)
                        t = q[b, rows, h] @ k[b, keys, h].T * log2_scale
                        if mask.has_bias:
                            t = t + bias[b, keys][None]
                        q_pos = np.arange(rows.start, rows.stop)[:, None]
                        k_pos = np.arange(keys.start, keys.stop)[None]
                        if i >= full and mask.has_lengths:
                            t = np.where(k_pos < length, t, -np.inf)
                        if i >= full and mask.sparse:
                            visible = element_visible(mask, b, h, q_pos, k_pos, flags[i])
                            if visible is not None:
                                t = np.where(np.asarray(visible), t, -np.inf)
                        m_next = np.maximum(m, t.max(1))
                        m_safe = np.where(m_next == -np.inf, 0.0, m_next)
                        correction, p = np.exp2(m - m_safe), np.exp2(t - m_safe[:, None])
                        acc = acc * correction[:, None] + p @ v[b, keys, h]
                        total, m = total * correction + p.sum(1), m_next
                    seen = total > 0
                    out[b, rows, h] = acc / np.where(seen, total, 1.0)[:, None]
                    lse[b, h, rows] = np.where(seen, m + np.log2(np.where(seen, total, 1.0)),
                                               EMPTY_ROW_LSE)
    return out, lse


def walk_backward(call, out, lse, d_out):
    """The Mosaic backward's arithmetic in float64, key block by key block over the query tiles
    its schedule lists (in its staggered order): dq, dk, dv."""
    q, k, v, bias, _, lengths = (None if x is None else np.asarray(x, np.float64)
                                 for x in call.inputs)
    d_out = np.asarray(call.pad_rows(d_out), np.float64)
    launch = call.kernels[2]
    plan, mask = launch.backward, launch.backward.mask
    batch, q_len, heads, _ = q.shape
    block_q, block_k, log2_scale = plan.block_q, plan.block_k, plan.scale * LOG2_E
    delta = np.einsum("bqhd,bqhd->bhq", d_out, out)
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    for b in range(batch):
        length = k.shape[1] if lengths is None else int(lengths[b])
        for h in range(heads):
            for block in range(k.shape[1] // plan.keys_per_program):
                full, tiles, flags = _row_plan(plan, launch.backward_schedule, b, h, block,
                                               q_len // block_q)
                if mask.has_lengths and block * plan.keys_per_program >= length:
                    tiles = tiles[:0]
                visited = []
                for i in range(len(tiles)):
                    # The stagger: fully visible tiles rotated by the block's index.
                    visited.append(tiles[(i + block % max(full, 1)) % full] if i < full
                                   else tiles[i])
                assert sorted(visited) == sorted(tiles)
                for half in range(2):
                    key0 = block * plan.keys_per_program + half * block_k
                    keys = slice(key0, key0 + block_k)
                    for i, tile in enumerate(visited):
                        rows = slice(tile * block_q, (tile + 1) * block_q)
                        t = k[b, keys, h] @ q[b, rows, h].T * log2_scale  # [keys, queries]
                        if mask.has_bias:
                            t = t + bias[b, keys][:, None]
                        p = np.exp2(t - lse[b, h, rows][None])
                        k_pos = np.arange(keys.start, keys.stop)[:, None]
                        q_pos = np.arange(rows.start, rows.stop)[None]
                        if mask.has_lengths:
                            p = np.where(k_pos < length, p, 0.0)
                        if i >= full and mask.sparse:
                            visible = element_visible(mask, b, h, q_pos, k_pos, flags[i])
                            if visible is not None:
                                p = np.where(np.asarray(visible), p, 0.0)
                        dp = v[b, keys, h] @ d_out[b, rows, h].T
                        ds = p * (dp - delta[b, h, rows][None])
                        dv[b, keys, h] += p @ d_out[b, rows, h]
                        dk[b, keys, h] += ds @ q[b, rows, h] * plan.scale
                        dq[b, rows, h] += ds.T @ k[b, keys, h] * plan.scale
    return dq, dk, dv


@pytest.mark.parametrize("name,options,q_len,k_len", CASES, ids=IDS)
def test_walk_of_the_mosaic_schedules_matches_the_reference(name, options, q_len, k_len):
    q, k, v, d_out = _inputs(IDS.index(name), q_len, k_len)
    call = _mosaic_call(q, k, v, options)
    out, lse = walk_forward(call)
    grads = walk_backward(call, out, lse, d_out)
    want_out, want_grads = reference(q, k, v, d_out, **{
        key: value for key, value in options.items() if key != "key_mask_is_prefix"})
    assert rel_err(call.cut(out, q_len), want_out) < 1e-12
    for axis, got, want in zip("qkv", grads, want_grads, strict=True):
        rows = q_len if axis == "q" else k_len
        assert rel_err(call.cut(got, rows), want) < 1e-12, f"d{axis}"


def _random_options(seed: int):
    """A random mask: lengths, causal or not, a random pattern builder, a random key mask."""
    rng = np.random.default_rng(seed)
    q_len, k_len = (int(n) for n in rng.integers(40, 420, size=2))
    if rng.random() < 0.5:
        k_len = q_len
    patterns = [None, predicates.local_blocks(int(rng.integers(5, 90))),
                predicates.sliding_window(int(rng.integers(0, 200))),
                predicates.fixed(int(rng.integers(8, 60)), 2),
                predicates.union(predicates.block_window(int(rng.integers(16, 64)), 1),
                                 predicates.global_tokens(int(rng.integers(0, 4)))),
                predicates.strided(int(rng.integers(3, 40)))]
    options = dict(causal=bool(rng.random() < 0.5),
                   mask_predicate=patterns[rng.integers(len(patterns))])
    if rng.random() < 0.5:
        keep = rng.random((2, k_len)) < rng.uniform(0.3, 1.0)
        options["key_mask"] = jnp.asarray(keep)
    return options, q_len, k_len


@pytest.mark.parametrize("seed", range(12))
def test_walk_of_random_masks_matches_the_reference(seed):
    """The schedules and the element mask over random lengths, patterns and key masks."""
    options, q_len, k_len = _random_options(seed)
    q, k, v, d_out = _inputs(100 + seed, q_len, k_len)
    call = _mosaic_call(q, k, v, options)
    out, lse = walk_forward(call)
    grads = walk_backward(call, out, lse, d_out)
    want_out, want_grads = reference(q, k, v, d_out, **options)
    assert rel_err(call.cut(out, q_len), want_out) < 1e-12
    for axis, got, want in zip("qkv", grads, want_grads, strict=True):
        assert rel_err(call.cut(got, q_len if axis == "q" else k_len), want) < 1e-12, f"d{axis}"


@pytest.mark.parametrize("name,options,q_len,k_len", CASES, ids=IDS)
def test_the_launch_masks_keys_the_cheapest_way(name, options, q_len, k_len):
    """Right padding of dense calls goes in as lengths, every other key mask (and the padding of
    sparse calls) as a bias; causal, block and predicate masks walk schedules."""
    q, k, v, _ = _inputs(0, q_len, k_len)
    launch = _mosaic_call(q, k, v, options).kernels[2]
    mask = launch.forward.mask
    sparse = any(options.get(key) for key in ("causal", "mask_predicate", "block_mask"))
    padded = k_len % 128 != 0 or "key_mask" in options
    right_padding = "key_mask" not in options or options.get("key_mask_is_prefix", False)
    assert mask.sparse == sparse == (launch.forward_schedule is not None)
    assert mask.has_lengths == (padded and not sparse and right_padding)
    assert mask.has_bias == (padded and not mask.has_lengths)
    assert launch.backward.mask.has_bias == mask.has_bias


def _tile_classes(visible, block_q, block_k, by_key):
    """Tiles of ``visible [heads, q, k]`` with some visible pair, and with every pair visible."""
    heads, q_len, k_len = visible.shape
    tiled = visible.reshape(heads, q_len // block_q, block_q, k_len // block_k, block_k)
    some, every = tiled.any(axis=(2, 4)), tiled.all(axis=(2, 4))
    if by_key:
        return some.transpose(0, 2, 1), every.transpose(0, 2, 1)
    return some, every


@pytest.mark.parametrize("by_key", [False, True])
@pytest.mark.parametrize("pattern,causal_offset", [
    (None, 0), (None, 320), (LRA_LOCAL, None), (LRA_FIXED, 0),
    (_per_head_blocks(512, 2, 3), 0),
    (predicates.union(predicates.global_tokens(2),
                      tiles=masks.random_blocks(512, 1, 128, seed=2, num_heads=2)), None)],
    ids=["causal", "causal-offset", "local-50", "fixed-causal", "blocks-causal", "global-tiles"])
def test_schedules_list_the_visible_tiles_full_ones_first(pattern, causal_offset, by_key):
    heads, q_len, k_len = 2, 512, 512
    block_q, block_k = (64, 128) if by_key else (128, 128)
    schedule = mosaic_schedule(pattern, causal_offset, 1, heads, (q_len, k_len), block_q,
                               block_k, q_len // block_q, k_len // block_k, by_key)
    by_pattern = np.ones((heads, q_len, k_len), bool)
    if isinstance(pattern, BlockMask):
        by_pattern = by_pattern & pattern.to_dense(q_len, k_len)
    elif pattern is not None:
        by_pattern = by_pattern & predicate_pairs(pattern, 1, heads, q_len, k_len)[0]
    by_causal = np.ones((q_len, k_len), bool)
    if causal_offset is not None:
        by_causal = np.tril(by_causal, causal_offset)
    some, every = _tile_classes(by_pattern & by_causal, block_q, block_k, by_key)
    _, pattern_every = _tile_classes(by_pattern, block_q, block_k, by_key)
    _, causal_every = _tile_classes(by_causal[None], block_q, block_k, by_key)
    for h in range(heads):
        entry = h if schedule.indices.shape[0] > 1 else 0
        for row in range(some.shape[1]):
            full, steps = schedule.counts[entry, row]
            listed = schedule.indices[entry, row, :steps]
            flags = schedule.flags[entry, row, :steps]
            assert sorted(listed) == list(np.flatnonzero(some[h, row]))
            assert list(listed[:full]) == sorted(listed[:full])
            assert all(every[h, row, listed[:full]]) and not any(flags[:full])
            for tile, flag in zip(listed[full:], flags[full:], strict=True):
                # A partial tile's flag names each mask that hides one of its pairs.
                assert flag != 0 and not every[h, row, tile]
                assert bool(flag & PREDICATE_PARTIAL) != bool(pattern_every[h, row, tile])
                assert bool(flag & CAUSAL_PARTIAL) != bool(causal_every[0, row, tile])


def test_the_element_mask_evaluates_only_what_the_flag_names():
    mask = _mosaic_call(*_inputs(0, 256, 256)[:3], dict(causal=True,
                                                        mask_predicate=LRA_LOCAL)).kernels[2]
    mask = mask.forward.mask
    q_pos, k_pos = np.arange(256)[:, None], np.arange(256)[None]
    local = np.asarray(LRA_LOCAL(0, 0, q_pos, k_pos))
    causal = k_pos <= q_pos
    cases = {0: np.ones_like(causal), PREDICATE_PARTIAL: local, CAUSAL_PARTIAL: causal,
             PREDICATE_PARTIAL | CAUSAL_PARTIAL: local & causal}
    for flag, want in cases.items():
        np.testing.assert_array_equal(np.asarray(element_visible(mask, 0, 0, q_pos, k_pos,
                                                                 flag)), want)


@pytest.mark.parametrize("name,options,q_len,k_len", CASES, ids=IDS)
@pytest.mark.parametrize("dropout_rate", [0.0, 0.1])
def test_masked_calls_lower_to_the_mosaic_kernels(monkeypatch, name, options, q_len, k_len,
                                                  dropout_rate):
    """Asked for by name on a Hopper GPU (faked: the kernels lower for "cuda" on CPU), every
    mask lowers to the Mosaic forward and fused backward, with and without dropout."""
    monkeypatch.setattr(pallas_module, "_compute_capability", lambda: "9.0")
    text = _lowered_grad(options, q_len, k_len, dropout_rate, kernels="mosaic")
    assert text.count("custom_call @mosaic_gpu_v2") == 2
    assert "xla.gpu.triton" not in text


@pytest.mark.parametrize("head_dim", [16, 32, 128])
def test_masks_lower_at_every_head_dim(monkeypatch, head_dim):
    """The fullest mask (predicate with tiles, causal, key bias from padding) and dropout fit the
    kernels' shared memory and layouts at every head size (64 is covered above)."""
    monkeypatch.setattr(pallas_module, "_compute_capability", lambda: "9.0")
    name, options, q_len, k_len = CASES[IDS.index("window-global-tiles-causal")]
    options = dict(options, key_mask=jnp.arange(k_len)[None] < jnp.array([[k_len], [300]]))
    text = _lowered_grad(options, q_len, k_len, 0.1, kernels="mosaic", head_dim=head_dim)
    assert text.count("custom_call @mosaic_gpu_v2") == 2


def _lowered_grad(options, q_len, k_len, dropout_rate, kernels, head_dim=64):
    def loss(q, k, v):
        out = pallas_module.pallas_attention(
            q, k, v, interpret=False, kernels=kernels, dropout_rate=dropout_rate,
            dropout_rng=jax.random.key(0) if dropout_rate else None, **options)
        return out.astype(jnp.float32).sum()

    q = jax.ShapeDtypeStruct((2, q_len, 2, head_dim), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, k_len, 2, head_dim), jnp.bfloat16)
    return lowered_text(jax.grad(loss, argnums=(0, 1, 2)), q, kv, kv)


@pytest.mark.parametrize("name,options,q_len,k_len", CASES[:2] + CASES[3:4], ids=IDS[:2] + IDS[3:4])
def test_unvalidated_masks_keep_the_triton_kernels_by_default(monkeypatch, name, options, q_len,
                                                             k_len):
    """Without ``kernels="mosaic"``, a call whose features have not passed their GPU tests
    (``MOSAIC_VALIDATED``) runs the Triton kernels; once validated, the Mosaic ones."""
    monkeypatch.setattr(pallas_module, "_compute_capability", lambda: "9.0")
    text = _lowered_grad(options, q_len, k_len, 0.0, kernels=None)
    assert text.count("xla.gpu.triton") == 3 and "mosaic_gpu" not in text
    monkeypatch.setattr(pallas_module, "MOSAIC_VALIDATED",
                        frozenset(["causal", "mask predicate", "right padding"]))
    text = _lowered_grad(options, q_len, k_len, 0.0, kernels=None)
    assert text.count("custom_call @mosaic_gpu_v2") == 2


def test_features_are_named_from_one_list():
    """What a call asks for, and what is validated, are names of ``MOSAIC_FEATURES``."""
    assert pallas_module.MOSAIC_VALIDATED.issubset(MOSAIC_FEATURES)
    every = mosaic_features(causal=True, has_block_mask=True, has_predicate=True,
                            has_key_mask=True, key_mask_is_prefix=False, dropout_rate=0.1,
                            k_len=250)
    assert every == set(MOSAIC_FEATURES)
    assert mosaic_features(causal=False, has_block_mask=False, has_predicate=False,
                           has_key_mask=False, key_mask_is_prefix=False, dropout_rate=0.0,
                           k_len=256) == set()


@pytest.mark.parametrize("name,options,q_len,k_len", CASES, ids=IDS)
@pytest.mark.parametrize("validated", [False, True])
def test_describe_choice_names_the_family_that_runs(monkeypatch, name, options, q_len, k_len,
                                                    validated):
    """``describe_choice`` says which kernel family ``pallas`` runs a call on, and why not the
    Mosaic one: the family it names is the one that lowers."""
    monkeypatch.setattr(pallas_module, "_compute_capability", lambda: "9.0")
    if validated:
        monkeypatch.setattr(pallas_module, "MOSAIC_VALIDATED", frozenset(MOSAIC_FEATURES))
    call = AttentionCall(
        backend="gpu", dtype="bfloat16", batch=2, q_len=q_len, k_len=k_len, num_heads=2,
        head_dim=64, has_key_mask="key_mask" in options, block_mask=options.get("block_mask"),
        causal=options.get("causal", False), dropout_rate=0.0,
        key_mask_is_prefix=options.get("key_mask_is_prefix", False),
        mask_predicate=options.get("mask_predicate"))
    family = describe_choice(call, ("pallas",))
    text = _lowered_grad(options, q_len, k_len, 0.0, kernels=None)
    if "mosaic_gpu" in text:
        assert family == "pallas (mosaic)"
    else:
        assert family.startswith("pallas (triton: the Mosaic kernels are not yet validated")
        assert not validated


def test_block_tiles_the_mosaic_kernels_cannot_refine_are_named(monkeypatch):
    monkeypatch.setattr(pallas_module, "_compute_capability", lambda: "9.0")
    q = jnp.zeros((1, 256, 1, 64), jnp.bfloat16)
    block_mask = BlockMask(np.ones((4, 4), bool), 64, 64)
    with pytest.raises(ValueError, match=r"multiples of 128x128 \(query x key\), got 64x64"):
        pallas_module.pallas_attention(q, q, q, block_mask=block_mask, interpret=False,
                                       kernels="mosaic")


# Every mask at D = 64; at D = 128 (the fullest shared memory) the ones with partial tiles.
GPU_CASES = [(64, *case) for case in CASES] + [
    (128, *CASES[IDS.index(name)]) for name in ("causal-cross", "local-50",
                                                "window-global-tiles-causal", "key-mask")]


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim,name,options,q_len,k_len", GPU_CASES,
                         ids=[f"d{c[0]}-{c[1]}" for c in GPU_CASES])
def test_gpu_mosaic_masks(head_dim, name, options, q_len, k_len):
    """The Mosaic kernels under every mask: outputs and q, k, v gradients against the float64
    reference, bf16."""
    run_and_check(60 + IDS.index(name), batch=2, q_len=q_len, k_len=k_len, heads=2,
                  head_dim=head_dim, dtype=jnp.bfloat16, tol=2e-2, tiles=None, interpret=False,
                  kernels="mosaic", **options)


@pytest.mark.gpu
@pytest.mark.parametrize("name,options,q_len,k_len", [CASES[3], CASES[5]],
                         ids=[IDS[3], IDS[5]])
def test_gpu_mosaic_masks_with_dropout(name, options, q_len, k_len):
    run_and_check(70 + IDS.index(name), batch=2, q_len=q_len, k_len=k_len, heads=2,
                  head_dim=64, dtype=jnp.bfloat16, tol=2e-2, tiles=None, interpret=False,
                  kernels="mosaic", dropout_rate=0.1, dropout_rng=jax.random.key(71), **options)
