"""Approximate attention variants against exact softmax attention and their closed forms:
Linformer, Performer (FAVOR+), Linear Transformer and Nystromformer."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import xformers_zoo as xz
from xformers_zoo.kernels import xla_attention
from xformers_zoo.layers.encoder import Encoder
from xformers_zoo.models.linear import LinearAttention, LinearConfig
from xformers_zoo.models.linformer import LinformerAttention, LinformerConfig
from xformers_zoo.models.nystromformer import (
    NystromAttention,
    NystromformerConfig,
    iterative_pinv,
    landmark_weights,
)
from xformers_zoo.models.performer import (
    PerformerAttention,
    PerformerConfig,
    RandomFeatures,
    draw_features,
    redraw_features,
)
from xformers_zoo.overrides import ConfigError

B, N, H, D = 2, 64, 2, 16


# Jitted once per core configuration and shape: far cheaper on a CPU than op-by-op dispatch.
apply = nnx.jit(lambda core, q, k, v, mask: core(q, k, v, mask, deterministic=True))
exact = jax.jit(xla_attention)


def build(core_cls, config, *, max_length=N, seed=0):
    return core_cls(config, num_heads=H, head_dim=D, max_length=max_length, dropout=0.0,
                    rngs=nnx.Rngs(seed))


def gaussian_qkv(seed, *, length=N, scale=1.0):
    keys = jax.random.split(jax.random.key(seed), 3)
    q, k, v = (jax.random.normal(key, (B, length, H, D)) for key in keys)
    return q * scale, k * scale, v


def smooth(key, scale, batch=B):
    """Sums of low-frequency sinusoids along the sequence: neighbouring tokens look alike, the
    structure segment-mean landmarks rely on."""
    k_freq, k_phase, k_amp = jax.random.split(key, 3)
    freq = jax.random.uniform(k_freq, (4, D), minval=0.2, maxval=3.0)
    phase = jax.random.uniform(k_phase, (4, D), maxval=2 * np.pi)
    amp = jax.random.normal(k_amp, (4, batch, H, D))
    t = jnp.linspace(0.0, 1.0, N)[:, None, None]  # [n, 1, 1]
    waves = jnp.sin(2 * np.pi * freq * t + phase)  # [n, 4, d]
    return jnp.einsum("nfd,fbhd->bnhd", waves, amp) * scale


def relative_error(out, ref):
    return float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))


def prefix_mask(real=(40, 64), length=N):
    return jnp.arange(length)[None, :] < jnp.asarray(real)[:, None]


def dense_linear_attention(phi_q, phi_k, v, mask, *, causal, eps):
    """phi(Q) phi(K)^T V / (phi(Q) phi(K)^T 1 + eps) with the [q, k] matrix written out."""
    scores = jnp.einsum("bqhm,bkhm->bhqk", phi_q, phi_k) * mask[:, None, None, :]
    if causal:
        scores = scores * jnp.tril(jnp.ones(scores.shape[-2:]))
    return jnp.einsum("bhqk,bkhd->bqhd", scores, v) / (scores.sum(-1) + eps).transpose(0, 2, 1)[
        ..., None]


# --- Linear Transformer -----------------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True])
def test_linear_equals_its_closed_form(causal):
    q, k, v = gaussian_qkv(0)
    mask = prefix_mask()
    out = apply(build(LinearAttention, LinearConfig(causal=causal)), q, k, v, mask)
    phi = lambda x: jax.nn.elu(x) + 1
    ref = dense_linear_attention(phi(q), phi(k), v, mask, causal=causal, eps=1e-6)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_linear_cross_attention_lengths():
    q, _, _ = gaussian_qkv(1, length=10)
    _, k, v = gaussian_qkv(2, length=24)
    mask = prefix_mask((17, 24), 24)
    out = apply(build(LinearAttention, LinearConfig()), q, k, v, mask)
    phi = lambda x: jax.nn.elu(x) + 1
    ref = dense_linear_attention(phi(q), phi(k), v, mask, causal=False, eps=1e-6)
    assert out.shape == q.shape
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


# --- Performer ----------------------------------------------------------------------------------

def test_performer_error_falls_with_more_features():
    # Small-norm queries and keys: the estimator's variance grows like exp(|q|^2 + |k|^2).
    errors = {}
    for m in (16, 256, 2048):
        per_seed = []
        for seed in range(4):
            q, k, v = gaussian_qkv(seed, scale=0.5)
            core = build(PerformerAttention, PerformerConfig(num_features=m), seed=100 + seed)
            mask = prefix_mask()
            per_seed.append(relative_error(apply(core, q, k, v, mask),
                                           exact(q, k, v, key_mask=mask)))
        errors[m] = np.mean(per_seed)
    assert errors[16] > 1.5 * errors[256] > 1.5 * 1.5 * errors[2048], errors
    assert errors[2048] < 0.15, errors


def test_orthogonal_features_are_orthogonal_within_blocks():
    rows = draw_features(jax.random.key(0), 40, D, orthogonal=True)
    assert rows.shape == (40, D)
    unit = rows / jnp.linalg.norm(rows, axis=-1, keepdims=True)
    for block in (unit[:D], unit[D:2 * D]):
        np.testing.assert_allclose(block @ block.T, np.eye(D), atol=1e-5)


def test_performer_relu_deterministic_equals_closed_form():
    q, k, v = gaussian_qkv(3)
    mask = prefix_mask()
    config = PerformerConfig(kernel="relu", features="deterministic", eps=1e-3)
    core = build(PerformerAttention, config)
    assert core.features is None
    phi = lambda x: jax.nn.relu(x) + 1e-3
    ref = dense_linear_attention(phi(q), phi(k), v, mask, causal=False, eps=0.0)
    np.testing.assert_allclose(apply(core, q, k, v, mask), ref, rtol=1e-4,
                               atol=1e-5)


def test_performer_softmax_kernel_needs_random_features():
    with pytest.raises(ConfigError, match="random features"):
        PerformerConfig(features="deterministic").check(max_length=N, num_heads=H, head_dim=D)


def performer_encoder(redraw_every=0):
    config = PerformerConfig(num_features=32, redraw_every=redraw_every)
    return Encoder(xz.VARIANTS.get("performer"), config, num_layers=2, emb_dim=32, qkv_dim=32,
                   mlp_dim=64, num_heads=H, max_length=N, dropout=0.0, attention_dropout=0.0,
                   dtype=jnp.float32, remat=False, rngs=nnx.Rngs(0))


def test_performer_features_are_checkpointed_state_not_params():
    enc = performer_encoder()
    params = nnx.state(enc, nnx.Param)
    features = jax.tree.leaves(nnx.state(enc, RandomFeatures))
    assert len(features) == 2 and features[0].shape == (32, 16)
    assert not any(isinstance(v, RandomFeatures)
                   for v in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable)))
    assert len(jax.tree.leaves(nnx.state(enc))) == len(jax.tree.leaves(params)) + 2

    x = jax.random.normal(jax.random.key(1), (B, N, 32))
    mask = prefix_mask()
    optimizer = nnx.Optimizer(enc, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def train_step(enc, optimizer):
        grads = nnx.grad(lambda m: jnp.mean(m(x, mask, deterministic=True) ** 2))(enc)
        optimizer.update(enc, grads)

    before = [np.asarray(f) for f in features]
    query_before = np.asarray(enc.blocks[0].attention.query.kernel[...])
    train_step(enc, optimizer)
    after = jax.tree.leaves(nnx.state(enc, RandomFeatures))
    assert not np.allclose(query_before, enc.blocks[0].attention.query.kernel[...])
    for b, a in zip(before, after, strict=True):
        np.testing.assert_array_equal(b, a)


def test_redraw_changes_features_and_same_features_give_same_output():
    enc = performer_encoder(redraw_every=10)
    x = jax.random.normal(jax.random.key(2), (B, N, 32))
    mask = prefix_mask()
    first = enc(x, mask, deterministic=True)
    np.testing.assert_array_equal(first, enc(x, mask, deterministic=True))
    before = [np.asarray(f) for f in jax.tree.leaves(nnx.state(enc, RandomFeatures))]

    assert redraw_features(enc, jax.random.key(5), step=5) == 0
    assert redraw_features(enc, jax.random.key(5), step=0) == 0
    np.testing.assert_array_equal(before[0], jax.tree.leaves(nnx.state(enc, RandomFeatures))[0])

    assert redraw_features(enc, jax.random.key(5), step=20) == 2
    after = [np.asarray(f) for f in jax.tree.leaves(nnx.state(enc, RandomFeatures))]
    for b, a in zip(before, after, strict=True):
        assert not np.allclose(b, a)
    assert not np.allclose(after[0], after[1]), "each core needs its own draw"
    second = enc(x, mask, deterministic=True)
    assert not np.allclose(first, second)
    np.testing.assert_array_equal(second, enc(x, mask, deterministic=True))

    assert redraw_features(enc, jax.random.key(6)) == 2


# --- Linformer ----------------------------------------------------------------------------------

@pytest.mark.parametrize("sharing", ["none", "headwise", "kv"])
def test_linformer_identity_projections_equal_exact_attention(sharing):
    core = build(LinformerAttention, LinformerConfig(k=N, sharing=sharing))
    for projection in {id(p): p for p in (core.key_projection, core.value_projection)}.values():
        projection.set_value(jnp.broadcast_to(jnp.eye(N), projection[...].shape))
    q, k, v = gaussian_qkv(4)
    mask = jnp.ones((B, N), bool)
    np.testing.assert_allclose(apply(core, q, k, v, mask), exact(q, k, v),
                               rtol=1e-4, atol=1e-5)


def test_linformer_short_sequence_equals_zero_padded_one():
    core = build(LinformerAttention, LinformerConfig(k=16))
    q, k, v = gaussian_qkv(5)
    short = apply(core, q[:, :40], k[:, :40], v[:, :40], jnp.ones((B, 40), bool))
    padded = apply(core, q, k, v, prefix_mask((40, 40)))
    np.testing.assert_allclose(short, padded[:, :40], rtol=1e-5, atol=1e-6)


def test_linformer_rejects_sequences_longer_than_it_was_built_for():
    core = build(LinformerAttention, LinformerConfig(k=16), max_length=32)
    q, k, v = gaussian_qkv(6)
    with pytest.raises(ConfigError, match="at most 32 tokens"):
        core(q, k, v, jnp.ones((B, N), bool), deterministic=True)


def linformer_encoder(sharing, rngs):
    config = LinformerConfig(k=8, sharing=sharing)
    return Encoder(xz.VARIANTS.get("linformer"), config, num_layers=2, emb_dim=32, qkv_dim=32,
                   mlp_dim=64, num_heads=H, max_length=N, dropout=0.0, attention_dropout=0.0,
                   dtype=jnp.float32, remat=False, rngs=rngs)


@pytest.mark.parametrize("sharing, matrices", [
    ("none", 2 * 2 * H), ("headwise", 2 * 2), ("kv", 2), ("layerwise", 1)])
def test_linformer_sharing_levels(sharing, matrices):
    enc = linformer_encoder(sharing, nnx.Rngs(0))
    state = nnx.state(enc, nnx.Param)
    sizes = [leaf.size for path, leaf in jax.tree_util.tree_leaves_with_path(state)
             if "projection" in jax.tree_util.keystr(path)]
    assert sum(sizes) == matrices * N * 8
    cores = [block.attention.core for block in enc.blocks]
    assert (cores[0].key_projection is cores[1].key_projection) == (sharing == "layerwise")
    if sharing == "layerwise":
        merged = nnx.merge(*nnx.split(enc))
        assert merged.blocks[0].attention.core.key_projection is \
            merged.blocks[1].attention.core.key_projection
        assert (linformer_encoder(sharing, nnx.Rngs(0)).blocks[0].attention.core.key_projection
                is not cores[0].key_projection), "separate models must not share"


# --- Nystromformer ------------------------------------------------------------------------------

def test_iterative_pinv_inverts_softmax_matrices():
    a = jax.nn.softmax(jax.random.normal(jax.random.key(0), (3, 16, 16)))  # invertible
    np.testing.assert_allclose(a @ iterative_pinv(a, 20), np.broadcast_to(np.eye(16), a.shape),
                               atol=1e-4)
    rank_one = jnp.full((4, 4), 0.25)  # singular: the pseudo-inverse of c 11^T is 11^T / (16 c)
    np.testing.assert_allclose(iterative_pinv(rank_one, 10), jnp.full((4, 4), 0.25), atol=1e-5)


def test_landmarks_are_segment_means_of_real_tokens():
    weights = landmark_weights(jnp.ones((1, 12), bool), 4)[0]
    np.testing.assert_allclose(weights, np.kron(np.eye(4), np.full((1, 3), 1 / 3)), atol=1e-7)
    mask = jnp.asarray([[True, False, True, True, False, True, True, False]])
    weights = landmark_weights(mask, 2)[0]
    np.testing.assert_allclose(weights, [[0.5, 0, 0.5, 0, 0, 0, 0, 0],
                                         [0, 0, 0, 1 / 3, 0, 1 / 3, 1 / 3, 0]], atol=1e-7)


def test_nystrom_with_a_landmark_per_token_is_near_exact():
    config = NystromformerConfig(num_landmarks=N, pinv_iterations=30, conv_kernel=0)
    q, k, v = gaussian_qkv(7)
    mask = jnp.ones((B, N), bool)
    out = apply(build(NystromAttention, config), q, k, v, mask)
    assert relative_error(out, exact(q, k, v)) < 1e-3


def test_nystrom_error_falls_with_more_landmarks():
    keys = jax.random.split(jax.random.key(0), 3)
    # Three batches of sequences side by side, so that one call averages over them.
    q, k = smooth(keys[0], 1.0, batch=3 * B), smooth(keys[1], 1.0, batch=3 * B)
    v = jax.random.normal(keys[2], (3 * B, N, H, D))
    mask = jnp.ones((3 * B, N), bool)
    errors = {}
    for m in (2, 8, 32):
        core = build(NystromAttention, NystromformerConfig(num_landmarks=m, conv_kernel=0))
        errors[m] = relative_error(apply(core, q, k, v, mask), exact(q, k, v))
    assert errors[2] > 2 * errors[8] > 4 * errors[32], errors
    assert errors[32] < 0.05, errors


def test_nystrom_conv_skip_is_a_per_head_depthwise_convolution():
    core = build(NystromAttention, NystromformerConfig(conv_kernel=5))
    v = jax.random.normal(jax.random.key(8), (1, 12, H, D))
    w = np.asarray(core.conv[...])  # [width, heads]
    padded = np.pad(np.asarray(v), ((0, 0), (2, 2), (0, 0), (0, 0)))
    ref = sum(w[j][None, None, :, None] * padded[:, j:j + 12] for j in range(5))
    np.testing.assert_allclose(core._conv_skip(v), ref, rtol=1e-5, atol=1e-5)


# --- all four -----------------------------------------------------------------------------------

@pytest.mark.parametrize("core_cls, config", [
    (LinearAttention, LinearConfig()),
    (LinearAttention, LinearConfig(causal=True)),
    (PerformerAttention, PerformerConfig(num_features=64)),
    (PerformerAttention, PerformerConfig(kernel="relu")),
    (LinformerAttention, LinformerConfig(k=16, sharing="none")),
    (NystromAttention, NystromformerConfig(num_landmarks=8)),
], ids=lambda p: type(p).__name__ if dataclasses.is_dataclass(p) else p.__name__)
def test_extreme_padded_content_never_reaches_real_outputs(core_cls, config):
    q, k, v = gaussian_qkv(9)
    mask = prefix_mask((23, 50))
    core = build(core_cls, config)
    noise = [jax.random.normal(jax.random.key(i), q.shape) * 1e4 for i in (10, 11, 12)]
    pad = ~mask[:, :, None, None]
    q2, k2, v2 = (jnp.where(pad, n, t) for n, t in zip(noise, (q, k, v), strict=True))
    a = apply(core, q, k, v, mask)
    b = apply(core, q2, k2, v2, mask)
    assert np.isfinite(np.asarray(b)).all()
    np.testing.assert_allclose(np.asarray(a)[np.asarray(mask)], np.asarray(b)[np.asarray(mask)],
                               rtol=1e-4, atol=1e-5)


def test_lra_overrides_name_real_fields():
    for name, field, value in [("linformer", "k", 16), ("performer", "kernel", "relu")]:
        spec = xz.VARIANTS.get(name)
        assert spec.lra_overrides[f"model.attention.{field}"] == value
        for key in spec.lra_overrides:
            assert key.removeprefix("model.attention.") in {
                f.name for f in dataclasses.fields(spec.config_cls)}
