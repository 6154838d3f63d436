"""The Mosaic GPU kernels (forward and fused backward) through ``pallas_attention``. They have
no interpret mode, so on CPU only their selection logic is tested; the ``gpu`` tests check
outputs and q, k, v gradients against the float64 reference, with and without attention dropout
(whose decisions must be the Triton kernels' own)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_pallas_attention import rel_err, run_and_check

from xformers_zoo.kernels.block_mask import BlockMask
from xformers_zoo.kernels.pallas_attention import pallas_attention
from xformers_zoo.kernels.pallas_mosaic_forward import mosaic_rejects


def test_mosaic_rejects_name_the_reason():
    assert mosaic_rejects("bfloat16", 64) is None
    assert mosaic_rejects("float16", 128) is None
    assert mosaic_rejects("bfloat16", 32, BlockMask(np.ones((2, 2), bool), 256, 128)) is None
    cases = {"head_dim must be one of": ("bfloat16", 48, None),
             "dtype must be one of": ("float32", 64, None),
             "block-mask tiles must be multiples of 128x128": (
                 "bfloat16", 64, BlockMask(np.ones((4, 4), bool), 64, 128))}
    for expected, (dtype, head_dim, tiles) in cases.items():
        assert expected in mosaic_rejects(dtype, head_dim, tiles)


def test_mosaic_forward_by_name_explains_refusal():
    q = jnp.zeros((1, 64, 1, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="no interpret mode"):
        pallas_attention(q, q, q, interpret=True, kernels="mosaic")
    with pytest.raises(ValueError, match="Mosaic kernels cannot serve.*dtype must be one of"):
        pallas_attention(*(x.astype(jnp.float32) for x in (q, q, q)), interpret=True,
                         kernels="mosaic", causal=True)
    with pytest.raises(ValueError, match="kernels must be one of"):
        pallas_attention(q, q, q, interpret=True, kernels="cuda")


MOSAIC_CASES = [
    dict(head_dim=32, dtype=jnp.bfloat16, q_len=600, k_len=600, lengths=(600, 77, 300)),
    dict(head_dim=16, dtype=jnp.float16, q_len=256, k_len=256, lengths=None),
    dict(head_dim=64, dtype=jnp.bfloat16, q_len=1000, k_len=1000, lengths=(1000, 333, 0)),
    dict(head_dim=128, dtype=jnp.float16, q_len=777, k_len=777, lengths=(777, 129, 1)),
    dict(head_dim=64, dtype=jnp.bfloat16, q_len=512, k_len=512, lengths=None),
    dict(head_dim=128, dtype=jnp.bfloat16, q_len=300, k_len=1100, lengths=(1100, 700, 5)),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", MOSAIC_CASES,
                         ids=lambda c: f"d{c['head_dim']}-q{c['q_len']}-k{c['k_len']}")
def test_gpu_mosaic_kernels(case):
    case = dict(case)
    lengths = case.pop("lengths")
    key_mask = None
    if lengths is not None:
        key_mask = jnp.arange(case["k_len"])[None, :] < jnp.array(lengths)[:, None]
    run_and_check(21, batch=3, heads=2, tol=2e-2, tiles=None, interpret=False,
                  key_mask=key_mask, key_mask_is_prefix=True, kernels="mosaic", **case)


MOSAIC_DROPOUT_CASES = [
    dict(head_dim=64, n=1000, lengths=(1000, 333, 0)),  # not a tile multiple; an empty sequence
    dict(head_dim=64, n=512, lengths=None),
    dict(head_dim=128, n=777, lengths=(777, 129, 1)),
    dict(head_dim=128, n=1024, lengths=None),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", MOSAIC_DROPOUT_CASES, ids=lambda c: f"d{c['head_dim']}-n{c['n']}")
def test_gpu_mosaic_dropout(case):
    """Output and q, k, v gradients of the Mosaic kernels with dropout against the float64
    reference that drops with ``keep_mask``'s decisions."""
    n, lengths = case["n"], case["lengths"]
    key_mask = None
    if lengths is not None:
        key_mask = jnp.arange(n)[None, :] < jnp.array(lengths)[:, None]
    run_and_check(23, batch=3, heads=2, head_dim=case["head_dim"], dtype=jnp.bfloat16,
                  q_len=n, k_len=n, tol=2e-2, tiles=None, interpret=False, key_mask=key_mask,
                  key_mask_is_prefix=True, kernels="mosaic", dropout_rate=0.1,
                  dropout_rng=jax.random.key(24))


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim,n", [(64, 1000), (128, 512)])
def test_gpu_dropout_same_in_both_families(head_dim, n):
    """The same seed drops the same weights in the Mosaic and the Triton kernels: outputs and
    gradients agree within bf16 rounding, while another seed moves them far outside it."""
    keys = jax.random.split(jax.random.key(25), 4)
    q, k, v, d_out = (jax.random.normal(key, (2, n, 2, head_dim), jnp.bfloat16) for key in keys)

    def results(kernels, seed):
        attend = jax.jit(lambda q, k, v: pallas_attention(
            q, k, v, dropout_rate=0.3, dropout_rng=jax.random.key(seed), kernels=kernels))
        out, vjp = jax.vjp(attend, q, k, v)
        return (out, *vjp(d_out))

    triton = results("triton", 26)
    for name, got, want in zip(("out", "dq", "dk", "dv"), results("mosaic", 26), triton,
                               strict=True):
        assert rel_err(got, np.asarray(want, np.float64)) < 2e-2, name
    other_seed = results("mosaic", 27)[0]
    assert rel_err(other_seed, np.asarray(triton[0], np.float64)) > 0.2


@pytest.mark.gpu
def test_gpu_mosaic_kernels_are_chosen_on_hopper():
    capability = str(getattr(jax.devices()[0], "compute_capability", ""))
    if not capability.startswith("9."):
        pytest.skip(f"not a Hopper GPU (compute capability {capability})")
    q = jax.random.normal(jax.random.key(0), (1, 256, 2, 64), jnp.bfloat16)
    loss = lambda q: pallas_attention(q, q, q).astype(jnp.float32).sum()
    text = jax.jit(jax.grad(loss)).lower(q).as_text()
    assert "mosaic_flash_backward" in text
    for triton_kernel in ("flash_forward", "flash_backward_dkdv", "flash_backward_dq"):
        assert triton_kernel not in text
