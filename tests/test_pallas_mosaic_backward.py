"""The fused Mosaic GPU backward kernel on its own, against float64 gradients (the numpy
reference of ``test_pallas_attention``, with a key padding mask and, for dropout, the keep
decisions of ``pallas_dropout.keep_mask``), fed with reference residuals and, once, with the
Mosaic forward's own (O, LSE); every plan option that changes the kernel's code is run, with and
without dropout. GPU only: the kernel has no interpret mode (``test_pallas_mosaic`` covers it
through ``pallas_attention``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_pallas_attention import reference as float64_reference
from test_pallas_attention import rel_err

from xformers_zoo.kernels.pallas_dropout import head_streams, seed_words
from xformers_zoo.kernels.pallas_mosaic_backward import MosaicBackwardPlan, mosaic_backward
from xformers_zoo.kernels.pallas_mosaic_mask import MosaicMask

DROPOUT_RNG = jax.random.key(31)


def reference(q, k, v, d_out, lengths, dropout_rate=0.0):
    """Output (dropped with ``DROPOUT_RNG``'s decisions when ``dropout_rate`` > 0), base-2 LSE
    of the scaled logits (float32, undropped) and the q, k, v gradients (float64)."""
    key_mask = None
    if lengths is not None:
        key_mask = np.arange(k.shape[1])[None, :] < np.asarray(lengths)[:, None]
    out, grads = float64_reference(q, k, v, d_out, key_mask=key_mask, dropout_rate=dropout_rate,
                                   dropout_rng=DROPOUT_RNG if dropout_rate else None)
    q64, k64 = (np.asarray(x, np.float64) for x in (q, k))
    s = np.einsum("bqhd,bkhd->bhqk", q64, k64) * q.shape[-1] ** -0.5
    if key_mask is not None:
        s = np.where(key_mask[:, None, None, :], s, -np.inf)
    m = s.max(-1)
    lse = (m + np.log(np.exp(s - m[..., None]).sum(-1))) / np.log(2.0)
    return out, jnp.asarray(lse, jnp.float32), grads


def inputs(seed, n, head_dim, dtype, batch=2, heads=2):
    keys = jax.random.split(jax.random.key(seed), 4)
    return [jax.random.normal(kk, (batch, n, heads, head_dim), dtype) for kk in keys]


def run(n, head_dim, dtype=jnp.bfloat16, lengths=None, seed=0, dropout_rate=0.0,
        **plan_changes):
    q, k, v, d_out = inputs(seed + n + head_dim, n, head_dim, dtype)
    scale = head_dim ** -0.5
    if lengths is not None:
        lengths = jnp.array(lengths, jnp.int32)
    out, lse, want = reference(q, k, v, d_out, lengths, dropout_rate)
    plan = MosaicBackwardPlan(scale=scale, mask=MosaicMask(has_lengths=lengths is not None),
                              dropout_rate=dropout_rate, **plan_changes)
    streams = None
    if dropout_rate:
        streams = head_streams(seed_words(DROPOUT_RNG), q.shape[0], q.shape[2])
    grads = jax.jit(lambda *a: mosaic_backward(*a, plan, streams))(
        q, k, v, jnp.asarray(out, dtype), lse, d_out, lengths)
    for name, got, ref in zip("qkv", grads, want, strict=True):
        assert got.shape == ref.shape
        assert got.dtype == (jnp.float32 if name == "q" else dtype), name
        err = rel_err(got, ref)
        assert err < 2e-2, f"d{name}: relative error {err:.4f}"
    return grads


@pytest.mark.gpu
@pytest.mark.parametrize("n,head_dim", [(256, 16), (512, 32), (256, 64), (1024, 64), (256, 128),
                                        (1024, 128)],
                         ids=lambda x: str(x))
def test_gpu_gradients(n, head_dim):
    run(n, head_dim)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_key_lengths(head_dim):
    """Keys past each sequence's length get no gradient and give none; a program whose keys
    all lie past the length (the second sequence's last key blocks) skips its sweep."""
    dq, dk, dv = run(512, head_dim, dtype=jnp.float16, lengths=[512, 131])
    assert np.all(np.asarray(dk[1, 131:]) == 0.0) and np.all(np.asarray(dv[1, 131:]) == 0.0)


PLAN_CHANGES = [(128, dict(lengths=[512, 200])), (64, dict(overlap=False)),
                (64, dict(stagger=False)), (64, dict(stages=3)),
                (128, dict(consumer_registers=232, producer_registers=40))]


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim,change", PLAN_CHANGES,
                         ids=[f"d{d}-" + ",".join(f"{k}={v}" for k, v in c.items())
                              for d, c in PLAN_CHANGES])
def test_gpu_plan_variants(head_dim, change):
    run(512, head_dim, dtype=jnp.float16, **change)


@pytest.mark.gpu
@pytest.mark.parametrize("n,head_dim,change", [(512, 64, {}), (1024, 128, {}),
                                               *((512, d, c) for d, c in PLAN_CHANGES)],
                         ids=lambda x: str(x))
def test_gpu_dropout(n, head_dim, change):
    """Dropout: dV from the dropped probabilities, dP masked and scaled, the decisions those of
    ``keep_mask`` (the float64 reference drops with them)."""
    run(n, head_dim, dtype=jnp.float16, dropout_rate=0.2, **change)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_after_mosaic_forward(head_dim):
    """The forward's (O, LSE) are the residuals this backward expects."""
    from xformers_zoo.kernels.pallas_mosaic_forward import MosaicPlan, mosaic_forward

    dtype, n = jnp.bfloat16, 1024
    q, k, v, d_out = inputs(5, n, head_dim, dtype)
    scale = head_dim ** -0.5
    _, _, want = reference(q, k, v, d_out, None)

    @jax.jit
    def both(q, k, v, d_out):
        out, lse = mosaic_forward(q, k, v, None, MosaicPlan(scale=scale))
        return mosaic_backward(q, k, v, out, lse, d_out, None,
                               MosaicBackwardPlan(scale=scale))

    for name, got, ref in zip("qkv", both(q, k, v, d_out), want, strict=True):
        assert rel_err(got, ref) < 2e-2, f"d{name}"


def test_rejects_unaligned_lengths_and_missing_lengths():
    q = jnp.zeros((1, 100, 1, 64), jnp.bfloat16)
    lse = jnp.zeros((1, 1, 100), jnp.float32)
    with pytest.raises(ValueError, match="multiple of 64"):
        mosaic_backward(q, q, q, q, lse, q, None, MosaicBackwardPlan(scale=1.0))
    q = jnp.zeros((1, 128, 1, 64), jnp.bfloat16)
    lse = jnp.zeros((1, 1, 128), jnp.float32)
    with pytest.raises(ValueError, match="lengths must be given"):
        mosaic_backward(q, q, q, q, lse, q, None,
                        MosaicBackwardPlan(scale=1.0, mask=MosaicMask(has_lengths=True)))
    with pytest.raises(ValueError, match="head_dim one of"):
        x = jnp.zeros((1, 128, 1, 48), jnp.bfloat16)
        mosaic_backward(x, x, x, x, lse, x, None, MosaicBackwardPlan(scale=1.0))
