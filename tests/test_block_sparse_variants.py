"""The block-sparse variants (local, longformer, bigbird, sparse-transformer) against a float64
dense masked-softmax reference built from their element masks, plus their limits: a window over
the whole sequence is full attention, BigBird's random tiles are reproducible per seed and differ
per layer, bad configs are refused, the LRA presets (blocks of 50 and 10) go to the Pallas
kernels, and tiles the kernels cannot take are explained."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx
from test_pallas_attention import SMALL_TILES
from test_pallas_attention import reference as float64_reference

import xformers_zoo as xz
from xformers_zoo.configs import resolve_config
from xformers_zoo.kernels import AttentionCall, choose_implementation, masks, pallas_layout
from xformers_zoo.kernels.pallas_attention import INTERPRET_ENV
from xformers_zoo.models.block_sparse import (
    BigBirdConfig,
    LocalConfig,
    LongformerConfig,
    SparseTransformerConfig,
)
from xformers_zoo.overrides import ConfigError

HEADS, HEAD_DIM = 2, 16

# Small blocks so that each pattern is genuinely sparse at these lengths.
SPARSE_CONFIGS = {
    "local": LocalConfig(block=16, look_back=True),
    "longformer": LongformerConfig(block=16, window=40),
    "bigbird": BigBirdConfig(block=16, window_tiles=3, global_tiles=1, num_random=2),
    "sparse-transformer": SparseTransformerConfig(block=16, stride=48, summary=16),
}


def build(name, config, max_length, seed=0):
    spec = xz.VARIANTS.get(name)
    return spec.core(config, num_heads=HEADS, head_dim=HEAD_DIM, max_length=max_length,
                     dropout=0.0, rngs=nnx.Rngs(seed))


def qkv_and_mask(length, real, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    q, k, v = (np.asarray(jax.random.normal(key, (len(real), length, HEADS, HEAD_DIM)))
               for key in keys)
    key_mask = np.arange(length)[None, :] < np.asarray(real)[:, None]
    return q, k, v, key_mask


def reference(q, k, v, allowed):
    """float64 softmax over the allowed (query, key) pairs [b or 1, h or 1, q, k]; rows that see
    no key give zeros."""
    q, k, v = (x.astype(np.float64) for x in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    logits = np.where(allowed, logits, -np.inf)
    peak = np.max(logits, axis=-1, keepdims=True)
    weights = np.exp(logits - np.where(np.isfinite(peak), peak, 0.0))
    total = weights.sum(-1, keepdims=True)
    weights = np.where(total > 0, weights / np.where(total > 0, total, 1.0), 0.0)
    return np.einsum("bhqk,bkhd->bqhd", weights, v)


def pattern_pairs(pattern, length):
    """The pattern's (query, key) pairs [h or 1, length, length], evaluated in numpy."""
    i, j = np.indices((length, length))
    pairs = np.asarray(pattern.fn(0, 0, i, j))[None]
    if pattern.tiles is not None:
        pairs = pairs | pattern.tiles.to_dense(length, length)
    return pairs


def allowed_pairs(pattern, key_mask, length, causal=False):
    allowed = pattern_pairs(pattern, length)[None] & key_mask[:, None, None, :]
    if causal:
        allowed = allowed & np.tri(length, dtype=bool)
    return allowed


@pytest.mark.parametrize("name", sorted(SPARSE_CONFIGS))
@pytest.mark.parametrize("length", [100, 70])  # 70 < max_length: the pattern's corner is used
def test_matches_dense_masked_softmax(name, length):
    core = build(name, SPARSE_CONFIGS[name], max_length=100)
    pattern = core.mask_for(length)
    assert not pattern_pairs(pattern, length).all()  # the pattern really drops pairs
    q, k, v, key_mask = qkv_and_mask(length, real=(length, length - 23))
    out = core(q, k, v, key_mask, deterministic=True)
    want = reference(q, k, v, allowed_pairs(pattern, key_mask, length))
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(SPARSE_CONFIGS))
def test_shorter_calls_use_the_pattern_of_their_length(name):
    core = build(name, SPARSE_CONFIGS[name], max_length=100)
    short = core.mask_for(70)
    assert short is core.mask_for(70)  # one object per length: kernel schedules stay cached
    if name == "bigbird":  # the random tiles drawn for 100 tokens, cut to 70
        np.testing.assert_array_equal(short.tiles.mask, core.pattern.tiles.mask[:, :5, :5])
    else:  # token predicates hold at every length
        assert short is core.pattern
    with pytest.raises(ValueError, match="exceeds max_length=100"):
        core.mask_for(101)


def test_causal_strided_pattern_matches_reference():
    config = SparseTransformerConfig(block=16, pattern_kind="strided", stride=32, causal=True)
    core = build("sparse-transformer", config, max_length=96)
    q, k, v, key_mask = qkv_and_mask(96, real=(96, 60))
    out = core(q, k, v, key_mask, deterministic=True)
    want = reference(q, k, v, allowed_pairs(core.pattern, key_mask, 96, causal=True))
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-5)


def test_window_over_whole_sequence_is_full_attention():
    length = 90
    q, k, v, key_mask = qkv_and_mask(length, real=(90, 41))
    full = xz.VARIANTS.get("full")
    full_core = full.core(full.config_cls(implementation=("xla",)), num_heads=HEADS,
                          head_dim=HEAD_DIM, max_length=length, dropout=0.0, rngs=nnx.Rngs(0))
    want = full_core(q, k, v, key_mask, deterministic=True)
    core = build("longformer", LongformerConfig(block=16, window=2 * length), max_length=length)
    assert pattern_pairs(core.pattern, length).all()
    out = core(q, k, v, key_mask, deterministic=True)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_bigbird_random_tiles_fixed_by_seed_and_distinct_per_layer():
    config = BigBirdConfig(block=16, window_tiles=1, global_tiles=0, num_random=3)

    def two_layers(seed):
        rngs = nnx.Rngs(seed)
        return [xz.VARIANTS.get("bigbird").core(config, num_heads=HEADS, head_dim=HEAD_DIM,
                                                max_length=512, dropout=0.0,
                                                rngs=rngs).pattern.tiles
                for _ in range(2)]

    first, second = two_layers(0), two_layers(0)
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a.mask, b.mask)
    assert not np.array_equal(first[0].mask, first[1].mask)
    # Each query tile gets num_random tiles, never its own (the window already has it).
    per_row = first[0].mask[0].sum(-1)
    assert (per_row == 3).all() and not np.diagonal(first[0].mask[0]).any()


def test_bigbird_window_tiles_are_the_neighbours():
    pattern = BigBirdConfig(block=16, window_tiles=3, global_tiles=0,
                            num_random=0).pattern(160, seed=0)
    i, j = np.indices((160, 160))
    np.testing.assert_array_equal(pattern_pairs(pattern, 160)[0], np.abs(i // 16 - j // 16) <= 1)


@pytest.mark.parametrize("config,match", [
    (LongformerConfig(window=-1), "window must be >= 0"),
    (LocalConfig(block=0), "block must be a positive"),
    (BigBirdConfig(block=-16), "block must be a positive"),
    (BigBirdConfig(block=16, num_random=5), r"num_random \(5\) exceeds the 4 tiles"),
    (BigBirdConfig(block=16, global_tiles=-1), "global_tiles must be >= 0"),
    (LongformerConfig(block=16, global_tiles=5), r"global_tiles \(5\) exceeds the 4 tiles"),
    (SparseTransformerConfig(block=16, stride=40), "multiple of block"),
    (SparseTransformerConfig(block=16, stride=32, summary=48), r"summary \(48\)"),
    (SparseTransformerConfig(pattern_kind="strided"), "set causal=True"),
    (SparseTransformerConfig(pattern_kind="dilated"), "'fixed' or 'strided'"),
])
def test_bad_configs_name_the_limit(config, match):
    with pytest.raises(ConfigError, match=match):
        config.check(max_length=64, num_heads=HEADS, head_dim=HEAD_DIM)
    name = {LocalConfig: "local", LongformerConfig: "longformer", BigBirdConfig: "bigbird",
            SparseTransformerConfig: "sparse-transformer"}[type(config)]
    with pytest.raises(ConfigError, match=match):
        build(name, config, max_length=64)


def test_lra_overrides_name_config_fields():
    for name in ("local", "longformer", "bigbird", "sparse-transformer"):
        spec = xz.VARIANTS.get(name)
        fields = {f.name for f in dataclasses.fields(spec.config_cls)}
        overrides = {key.removeprefix("model.attention."): value
                     for key, value in spec.lra_overrides.items()}
        assert overrides and set(overrides) <= fields
        # The LRA pattern is valid at the shortest LRA length (ListOps, 2000 tokens).
        spec.config_cls(**overrides).check(max_length=2000, num_heads=8, head_dim=64)


def call_facts(pattern, length=2000, dtype="bfloat16"):
    return AttentionCall(backend="cpu", dtype=dtype, batch=1, q_len=length, k_len=length,
                         num_heads=8, head_dim=64, has_key_mask=True, block_mask=None,
                         causal=False, dropout_rate=0.0, key_mask_is_prefix=True,
                         mask_predicate=pattern)


def lra_config(name):
    """The variant's attention config as ``--preset lra`` resolves it."""
    return resolve_config("listops", name, presets=["lra"]).model.attention


@pytest.mark.parametrize("name", ["local", "sparse-transformer", "longformer", "bigbird"])
def test_lra_presets_select_pallas(name, monkeypatch):
    """With ``--preset lra`` (Local's 50-token blocks, the Sparse Transformer's 10-token ones)
    the patterns go to the Pallas kernels where they can run: on a GPU, or here in interpret
    mode; without either, the dispatch says the kernels need a GPU."""
    config = lra_config(name)
    if name in ("local", "sparse-transformer"):
        assert config.block in (50, 10)  # the public code's blocks, no power of two
    pattern = config.pattern(2000, seed=0)
    monkeypatch.delenv(INTERPRET_ENV, raising=False)
    impl, skipped = choose_implementation(call_facts(pattern), config.implementation)
    assert impl.name == "xla" and "needs a CUDA GPU" in dict(skipped)["pallas"]
    monkeypatch.setenv(INTERPRET_ENV, "1")  # get past the GPU check on a CPU
    impl, _ = choose_implementation(call_facts(pattern), config.implementation)
    assert impl.name == "pallas"


def test_pallas_skip_reason_names_tile_rule(monkeypatch):
    """BigBird's random blocks are whole tiles of the kernels: a block that is no power of two
    >= 16 sends it to the XLA path, and the dispatch says why."""
    monkeypatch.setenv(INTERPRET_ENV, "1")
    config = BigBirdConfig(block=50, num_random=2)
    impl, skipped = choose_implementation(call_facts(config.pattern(200, seed=0), 200),
                                          config.implementation)
    assert impl.name == "xla"
    assert "powers of two >= 16, got 50x50" in dict(skipped)["pallas"]


@pytest.mark.parametrize("name,config,length", [
    ("local", LocalConfig(block=50), 130),
    ("sparse-transformer", SparseTransformerConfig(block=10, stride=50, summary=10), 130),
    ("longformer", LongformerConfig(block=16, window=21), 100),
])
def test_unaligned_patterns_run_on_kernels(name, config, length, monkeypatch):
    """LRA's token patterns (blocks of 50 and 10, exact windows) on the Pallas kernels agree
    with the reference, gradients included."""
    monkeypatch.setenv(INTERPRET_ENV, "1")
    config = dataclasses.replace(config, implementation=("pallas",))
    core = build(name, config, max_length=length)
    q, k, v, key_mask = qkv_and_mask(length, real=(length, 61), seed=5)
    monkeypatch.setattr(pallas_layout, "default_tiles", lambda *args, **kwargs: SMALL_TILES)
    d_out = np.asarray(jax.random.normal(jax.random.key(6), q.shape))
    out, vjp = jax.vjp(lambda q, k, v: core(q, k, v, key_mask, deterministic=True), q, k, v)
    want_out, want_grads = float64_reference(q, k, v, d_out, key_mask=key_mask,
                                             mask_predicate=core.pattern)
    np.testing.assert_allclose(np.asarray(out), want_out, rtol=2e-5, atol=2e-5)
    for got, want in zip(vjp(d_out), want_grads, strict=True):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("look_back", [0, 1])
def test_local_blocks_are_own_and_previous_tiles(look_back):
    bm = masks.local_blocks(130, 16, look_back=look_back)
    qi, kj = np.indices(bm.mask.shape[1:])
    np.testing.assert_array_equal(bm.mask[0], (kj <= qi) & (kj >= qi - look_back))
    with pytest.raises(ValueError, match="look_back must be >= 0"):
        masks.local_blocks(130, 16, look_back=-1)


@pytest.mark.parametrize("name", sorted(SPARSE_CONFIGS))
def test_block_sparse_kernels_serve_the_patterns(name, monkeypatch):
    """With power-of-two blocks the patterns run on the Pallas kernels (interpret mode off-GPU)
    and agree with the reference."""
    monkeypatch.setenv(INTERPRET_ENV, "1")
    config = dataclasses.replace(SPARSE_CONFIGS[name], implementation=("pallas",))
    core = build(name, config, max_length=96)
    q, k, v, key_mask = qkv_and_mask(96, real=(96, 50), seed=3)
    out = core(q, k, v, key_mask, deterministic=True)
    want = reference(q, k, v, allowed_pairs(core.pattern, key_mask, 96))
    np.testing.assert_allclose(np.asarray(out), want, rtol=2e-5, atol=2e-5)
