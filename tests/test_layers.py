"""Shared layers: shapes, positional encodings, pooling, heads, padding invariance of the whole
classifier, and the kernel dispatch with its reasons."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import xformers_zoo as xz
from xformers_zoo.kernels import (
    NoImplementationError,
    dot_product_attention,
    xla_attention,
)
from xformers_zoo.layers.embeddings import LearnedPositions2D, SinusoidalPositions
from xformers_zoo.layers.heads import dual_features, pool
from xformers_zoo.task_specs import TaskSpec

SMALL = dict(num_layers=1, num_heads=2, emb_dim=16, qkv_dim=16, mlp_dim=32, dropout=0.0,
             attention_dropout=0.0, dtype="float32")


def test_positional_encodings():
    x = jnp.zeros((2, 10, 8))
    out = SinusoidalPositions(16, 8)(x)
    assert out.shape == (2, 10, 8)
    np.testing.assert_allclose(out[0, 0, 1::2], 1.0)  # cos(0) on odd channels
    with pytest.raises(ValueError, match="exceeds the model's max_length 16"):
        SinusoidalPositions(16, 8)(jnp.zeros((1, 17, 8)))
    grid = LearnedPositions2D(4, 4, 8, rngs=nnx.Rngs(0))
    up = grid.upsampled(8, 8)
    assert up.shape == (8, 8, 8)
    np.testing.assert_array_equal(up[2:4, 6:8], jnp.broadcast_to(grid.table[...][1, 3], (2, 2, 8)))
    with pytest.raises(ValueError, match="whole factors"):
        grid.upsampled(6, 8)


def test_pooling_mean_ignores_padding():
    x = jnp.arange(2 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 3)
    mask = jnp.array([[1, 1, 0, 0], [1, 1, 1, 1]], bool)
    np.testing.assert_allclose(pool(x, mask, "mean")[0], x[0, :2].mean(0))
    np.testing.assert_allclose(pool(x, mask, "cls"), x[:, 0])
    assert dual_features(jnp.ones((2, 3)), jnp.ones((2, 3))).shape == (2, 12)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_classifier_shapes_and_padding_invariance(pooling):
    model = xz.create_model("full", "listops", pooling=pooling, **SMALL)
    tokens = jax.random.randint(jax.random.key(0), (3, 40), 1, 16)
    mask = jnp.arange(40)[None] < jnp.array([[10], [25], [40]])
    logits = model(jnp.where(mask, tokens, 0), mask)
    assert logits.shape == (3, 10) and logits.dtype == jnp.float32
    other = model(jnp.where(mask, tokens, 7), mask)  # different content in padded positions
    np.testing.assert_allclose(logits, other, atol=1e-5)
    short = model(tokens[:1, :10], mask[:1, :10])  # the same sequence with no padding at all
    np.testing.assert_allclose(logits[0], short[0], atol=1e-5)


def test_dual_encoder_classifier():
    from xformers_zoo.configs import ModelConfig, resolve_model_config
    from xformers_zoo.models import Classifier

    task = TaskSpec(name="pairs", max_length=12, vocab_size=20, num_classes=2, two_inputs=True)
    cfg = resolve_model_config(ModelConfig(**SMALL))
    model = Classifier(cfg, task, max_length=12, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (4, 2, 12), 1, 20)
    out = model(tokens, jnp.ones_like(tokens, bool))
    assert out.shape == (4, 2)
    swapped = model(tokens[:, ::-1], jnp.ones_like(tokens, bool))
    assert not np.allclose(out, swapped)  # u - v makes the head order-aware
    with pytest.raises(ValueError, match=r"takes \[batch, 2, length\]"):
        model(tokens[:, 0], jnp.ones_like(tokens[:, 0], bool))


def reference_attention(q, k, v, mask):
    """float64 numpy softmax attention; rows without a visible key give zeros."""
    q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    logits = np.where(mask, logits, -np.inf)
    m = np.max(logits, -1, keepdims=True)
    w = np.exp(logits - np.where(np.isfinite(m), m, 0))
    w = w / np.maximum(w.sum(-1, keepdims=True), 1e-300)
    return np.einsum("bhqk,bkhd->bqhd", w, v)


def test_xla_attention_matches_reference_with_masks_and_empty_rows():
    ks = jax.random.split(jax.random.key(3), 3)
    q, k, v = (jax.random.normal(kk, (2, 13, 2, 8)) for kk in ks)
    key_mask = jnp.arange(13)[None] < jnp.array([[5], [0]])  # second sequence: all padding
    out = xla_attention(q, k, v, key_mask=key_mask)
    ref = reference_attention(q, k, v, np.asarray(key_mask)[:, None, None, :])
    assert np.isfinite(np.asarray(out)).all()
    np.testing.assert_allclose(out, ref, atol=1e-5)
    causal = xla_attention(q, k, v, causal=True)
    tril = np.tril(np.ones((13, 13), bool))[None, None]
    np.testing.assert_allclose(causal, reference_attention(q, k, v, tril), atol=1e-5)


def test_dispatch_explains_skipped_implementations(caplog, monkeypatch):
    from xformers_zoo.kernels import dispatch

    monkeypatch.setattr(dispatch, "_explained", set())  # each reason is logged once a process
    q = jnp.ones((1, 8, 2, 8), jnp.float32)
    with caplog.at_level("INFO", logger="xformers_zoo.kernels"):
        dot_product_attention(q, q, q, implementation=("cudnn", "xla"))
    if jax.default_backend() != "gpu":
        assert "skipped cudnn (needs an NVIDIA GPU" in caplog.text
    reason = "bfloat16 or float16" if jax.default_backend() == "gpu" else "an NVIDIA GPU"
    with pytest.raises(NoImplementationError, match=f"cudnn: needs {reason}"):
        dot_product_attention(q, q, q, implementation=("cudnn",))
    with pytest.raises(ValueError, match="key_mask must be"):
        dot_product_attention(q, q, q, key_mask=jnp.ones((1, 3), bool))


@pytest.mark.gpu
def test_cudnn_matches_reference_with_right_padding():
    ks = jax.random.split(jax.random.key(7), 3)
    q, k, v = (jax.random.normal(kk, (2, 300, 4, 64), jnp.bfloat16) for kk in ks)
    key_mask = jnp.arange(300)[None] < jnp.array([[100], [300]])
    out = dot_product_attention(q, k, v, key_mask=key_mask, implementation=("cudnn",),
                                key_mask_is_prefix=True)
    ref = reference_attention(q, k, v, np.asarray(key_mask)[:, None, None, :])
    err = np.linalg.norm(np.asarray(out, np.float32) - ref) / np.linalg.norm(ref)
    assert err < 2e-2
    with pytest.raises(NoImplementationError, match="right padding"):
        dot_product_attention(q, k, v, key_mask=key_mask, implementation=("cudnn",))

    def loss(impl):
        def f(q, k, v):
            out = dot_product_attention(q, k, v, key_mask=key_mask, implementation=(impl,),
                                        key_mask_is_prefix=True)
            return (out.astype(jnp.float32) ** 2).sum()
        return jax.grad(f, argnums=(0, 1, 2))

    # 300 is no multiple of 64: the cuDNN backward needs the padding done inside the wrapper.
    ref_grads = loss("xla")(*(t.astype(jnp.float32) for t in (q, k, v)))
    for got, want in zip(loss("cudnn")(q, k, v), ref_grads, strict=True):
        got, want = np.asarray(got, np.float32), np.asarray(want)
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 3e-2


def test_cudnn_rejects_what_it_would_compute_differently():
    import dataclasses

    from xformers_zoo.kernels import AttentionCall
    from xformers_zoo.kernels.cudnn import cudnn_rejects

    call = AttentionCall(backend="gpu", dtype="bfloat16", batch=2, q_len=64, k_len=64,
                         num_heads=4, head_dim=64, has_key_mask=True, block_mask=None,
                         causal=False, dropout_rate=0.0, key_mask_is_prefix=True)
    assert cudnn_rejects(call) is None
    assert "top-left" in cudnn_rejects(dataclasses.replace(call, causal=True, q_len=32))
    assert "right padding" in cudnn_rejects(dataclasses.replace(call, key_mask_is_prefix=False))
    assert "dropout" in cudnn_rejects(dataclasses.replace(call, dropout_rate=0.1))
