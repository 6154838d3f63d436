"""The Mosaic GPU backward kernel against float32 XLA gradients (jax.vjp of plain softmax
attention), fed with reference residuals and, once, with the Mosaic forward's own (O, LSE).
GPU only: the kernel has no interpret mode."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xformers_zoo.kernels.pallas_mosaic_backward import MosaicBackwardPlan, mosaic_backward


def attention(q, k, v, scale):
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v)


def reference(q, k, v, d_out, scale):
    """Output, base-2 LSE of the scaled logits and the q, k, v gradients, all float32."""
    f32 = [x.astype(jnp.float32) for x in (q, k, v, d_out)]
    with jax.default_matmul_precision("highest"):
        out, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, scale), *f32[:3])
        grads = vjp(f32[3])
        s = jnp.einsum("bqhd,bkhd->bhqk", *f32[:2]) * scale
        lse = jax.nn.logsumexp(s, axis=-1) / math.log(2.0)
    return out, lse, grads


def rel_err(got, want):
    got = np.asarray(got, np.float64)
    assert np.isfinite(got).all(), "NaN or Inf in kernel result"
    want = np.asarray(want, np.float64)
    return np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)


def inputs(seed, n, head_dim, dtype, batch=2, heads=2):
    keys = jax.random.split(jax.random.key(seed), 4)
    return [jax.random.normal(kk, (batch, n, heads, head_dim), dtype) for kk in keys]


def check(grads, want, dtype, tol=2e-2):
    for name, got, ref in zip("qkv", grads, want, strict=True):
        assert got.shape == ref.shape
        assert got.dtype == (jnp.float32 if name == "q" else dtype), name
        err = rel_err(got, ref)
        assert err < tol, f"d{name}: relative error {err:.4f}"


CASES = [(256, 64), (1024, 64), (256, 128), (1024, 128)]


@pytest.mark.gpu
@pytest.mark.parametrize("n,head_dim", CASES, ids=lambda x: str(x))
def test_gpu_gradients(n, head_dim):
    dtype = jnp.bfloat16
    q, k, v, d_out = inputs(n + head_dim, n, head_dim, dtype)
    scale = head_dim ** -0.5
    out, lse, want = reference(q, k, v, d_out, scale)
    grads = jax.jit(mosaic_backward, static_argnums=6)(q, k, v, out.astype(dtype), lse, d_out,
                                                       scale)
    check(grads, want, dtype)


PLAN_CHANGES = [dict(overlap=False), dict(dq_swizzle=False), dict(stagger=False), dict(stages=3)]


@pytest.mark.gpu
@pytest.mark.parametrize("change", PLAN_CHANGES,
                         ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_gpu_plan_variants(change):
    dtype, n, head_dim = jnp.float16, 512, 64
    q, k, v, d_out = inputs(3, n, head_dim, dtype)
    scale = head_dim ** -0.5
    out, lse, want = reference(q, k, v, d_out, scale)
    plan = dataclasses.replace(MosaicBackwardPlan(scale=scale), **change)
    grads = jax.jit(lambda *a: mosaic_backward(*a, scale, plan))(q, k, v, out.astype(dtype), lse,
                                                                 d_out)
    check(grads, want, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_after_mosaic_forward(head_dim):
    """The forward's (O, LSE) are the residuals this backward expects."""
    from xformers_zoo.kernels.pallas_mosaic_forward import MosaicPlan, mosaic_forward

    dtype, n = jnp.bfloat16, 1024
    q, k, v, d_out = inputs(5, n, head_dim, dtype)
    scale = head_dim ** -0.5
    _, _, want = reference(q, k, v, d_out, scale)

    @jax.jit
    def both(q, k, v, d_out):
        out, lse = mosaic_forward(q, k, v, None, MosaicPlan(scale=scale, has_lengths=False))
        return mosaic_backward(q, k, v, out, lse, d_out, scale)

    check(both(q, k, v, d_out), want, dtype)
