"""The Mosaic GPU kernels (forward and fused backward) through ``pallas_attention``. They have
no interpret mode, so on CPU only their selection logic is tested; the ``gpu`` tests check
outputs and q, k, v gradients against the float64 reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from test_pallas_attention import run_and_check

from xformers_zoo.kernels.pallas_attention import pallas_attention
from xformers_zoo.kernels.pallas_mosaic_forward import mosaic_rejects


def test_mosaic_rejects_name_the_reason():
    ok = dict(causal=False, has_block_mask=False, has_key_mask=True, key_mask_is_prefix=True)
    assert mosaic_rejects("bfloat16", 64, **ok) is None
    assert mosaic_rejects("float16", 128, **ok) is None
    assert mosaic_rejects("bfloat16", 32, **ok) is None
    cases = {"head_dim must be one of": ("bfloat16", 48, ok),
             "dtype must be one of": ("float32", 64, ok),
             "causal": ("bfloat16", 64, ok | {"causal": True}),
             "block masks": ("bfloat16", 64, ok | {"has_block_mask": True}),
             "right padding": ("bfloat16", 64, ok | {"key_mask_is_prefix": False})}
    for expected, (dtype, head_dim, facts) in cases.items():
        assert expected in mosaic_rejects(dtype, head_dim, **facts)


def test_mosaic_forward_by_name_explains_refusal():
    q = jnp.zeros((1, 64, 1, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="no interpret mode"):
        pallas_attention(q, q, q, interpret=True, kernels="mosaic")
    with pytest.raises(ValueError, match="Mosaic kernels cannot serve.*causal"):
        pallas_attention(q, q, q, interpret=True, kernels="mosaic", causal=True)
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
