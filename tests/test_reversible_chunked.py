"""Reversible residual layers and chunked feed-forward (Kitaev et al. 2020) in the shared
encoder: the memory-saving forms compute exactly what the plain forms compute."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import xformers_zoo as xz
from xformers_zoo.configs import ModelConfig, resolve_model_config
from xformers_zoo.layers.chunked import chunked_feed_forward
from xformers_zoo.layers.encoder import Encoder, MlpBlock
from xformers_zoo.layers.reversible import dropout_keys, reversible_apply

LENGTH, EMB, HEADS = 12, 16, 2


# Fixed random synthesized attention: a small graph that still carries non-trainable state
# (its logits) through the reversible layers' custom VJP.
VARIANT, ATTENTION = "synthesizer-random", {"trainable": False}


def make_encoder(variant=VARIANT, *, reversible=False, ff_chunks=1, layers=2, dropout=0.1):
    cfg = resolve_model_config(ModelConfig(variant=variant, attention=ATTENTION))
    return Encoder(xz.VARIANTS.get(variant), cfg.attention, num_layers=layers, emb_dim=EMB,
                   qkv_dim=EMB, mlp_dim=2 * EMB, num_heads=HEADS, max_length=LENGTH,
                   dropout=dropout, attention_dropout=dropout, dtype=jnp.float32, remat=False,
                   rngs=nnx.Rngs(0), reversible=reversible, ff_chunks=ff_chunks)


def inputs():
    x = jax.random.normal(jax.random.key(1), (2, LENGTH, EMB))
    mask = jnp.arange(LENGTH)[None, :] < jnp.asarray([[9], [12]])
    return x, mask


def test_reversible_gradients_equal_plain_autodiff():
    """The custom VJP (inputs recomputed from outputs, dropout replayed from the same keys)
    gives the gradients that autodiff through the same reversible forward gives."""
    enc = make_encoder(reversible=True)
    x, mask = inputs()
    # An "rbg" key compiles much faster on CPU than the default threefry one.
    keys = dropout_keys(nnx.Rngs(dropout=jax.random.key(7, impl="rbg")), len(enc.blocks),
                        deterministic=False)
    graphdef, params, rest = nnx.split(enc, nnx.Param, ...)

    def loss(params, x, recompute):
        blocks = list(nnx.merge(graphdef, params, rest).blocks)
        y1, y2 = reversible_apply(blocks, x, 0.5 * x, mask, keys=keys, deterministic=False,
                                  recompute=recompute)
        return jnp.sum(jnp.sin(y1) * y2)

    value_and_grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=2)
    value, grads = value_and_grad(params, x, True)
    ref_value, ref_grads = value_and_grad(params, x, False)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    flat, ref_flat = jax.tree.leaves(grads), jax.tree.leaves(ref_grads)
    assert len(flat) == len(ref_flat) > 0
    for g, r in zip(flat, ref_flat, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=2e-4, atol=2e-5)
    assert any(np.abs(np.asarray(g)).sum() > 0 for g in flat)


def test_reversible_encoder_runs_with_dropout_and_its_keys_matter():
    enc = make_encoder(reversible=True)
    x, mask = inputs()

    @nnx.jit
    def train_out(enc, key):
        return enc(x, mask, deterministic=False, rngs=nnx.Rngs(dropout=key))

    a, b = (train_out(enc, jax.random.key(seed, impl="rbg")) for seed in (1, 2))
    assert a.shape == x.shape and np.isfinite(np.asarray(a)).all()
    assert not np.allclose(np.asarray(a), np.asarray(b))
    # Deterministic output matches a hand-written y1 = x1 + F(x2), y2 = x2 + G(y1) stack.
    x1 = x2 = x
    for block in enc.blocks:
        x1 = x1 + block.attention_branch(x2, mask, deterministic=True, rngs=None)
        x2 = x2 + block.mlp_branch(x1, deterministic=True, rngs=None)
    np.testing.assert_allclose(np.asarray(enc(x, mask, deterministic=True)),
                               np.asarray(enc.norm((x1 + x2) / 2)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunks", [3, 5])
def test_chunked_feed_forward_equals_the_plain_mlp(chunks):
    """Chunk counts that divide the length (3) and that do not (5)."""
    mlp = MlpBlock(EMB, 3 * EMB, dropout=0.0, dtype=jnp.float32, rngs=nnx.Rngs(0))
    x, _ = inputs()
    np.testing.assert_allclose(
        np.asarray(chunked_feed_forward(mlp, x, chunks, deterministic=True, rngs=None)),
        np.asarray(mlp(x, deterministic=True, rngs=None)), rtol=1e-6, atol=1e-6)

    def loss(mlp, chunked):
        y = (chunked_feed_forward(mlp, x, chunks, deterministic=True, rngs=None) if chunked
             else mlp(x, deterministic=True, rngs=None))
        return jnp.sum(y ** 2)

    g = nnx.state(nnx.grad(loss)(mlp, True), nnx.Param)
    ref = nnx.state(nnx.grad(loss)(mlp, False), nnx.Param)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_encoder_with_chunked_feed_forward_equals_unchunked():
    x, mask = inputs()
    plain = make_encoder(ff_chunks=1)(x, mask, deterministic=True)
    chunked = make_encoder(ff_chunks=4)(x, mask, deterministic=True)
    np.testing.assert_allclose(np.asarray(chunked), np.asarray(plain), rtol=1e-5, atol=1e-5)


def test_model_config_carries_the_options():
    model = xz.create_model("reformer", task="listops", num_layers=2, emb_dim=16, qkv_dim=16,
                            mlp_dim=32, num_heads=2, max_length=20, reversible=True,
                            ff_chunks=2)
    assert model.encoder.reversible and model.encoder.blocks[0].ff_chunks == 2
    with pytest.raises(ValueError, match="ff_chunks"):
        ModelConfig(ff_chunks=0)
