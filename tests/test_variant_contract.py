"""Contract tests every registered attention variant must pass: shapes, jit, finite gradients,
padding invariance and bf16, through the shared encoder."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import xformers_zoo as xz
from xformers_zoo.configs import ModelConfig, resolve_model_config
from xformers_zoo.layers.encoder import Encoder

LENGTH, EMB, HEADS = 64, 32, 4


def make_encoder(name: str, dtype=jnp.float32, length: int = LENGTH) -> Encoder:
    spec = xz.VARIANTS.get(name)
    cfg = resolve_model_config(ModelConfig(variant=name, num_heads=HEADS, emb_dim=EMB,
                                           qkv_dim=EMB, mlp_dim=2 * EMB))
    spec.check(cfg.attention, max_length=length, num_heads=HEADS, head_dim=EMB // HEADS)
    return Encoder(spec, cfg.attention, num_layers=2, emb_dim=EMB, qkv_dim=EMB, mlp_dim=2 * EMB,
                   num_heads=HEADS, max_length=length, dropout=0.1, attention_dropout=0.1,
                   dtype=dtype, remat=False, rngs=nnx.Rngs(0))


def inputs(seed: int, batch: int = 2, length: int = LENGTH, real: tuple[int, ...] = (40, 64)):
    x = jax.random.normal(jax.random.key(seed), (batch, length, EMB))
    mask = jnp.arange(length)[None, :] < jnp.asarray(real)[:, None]
    return x, mask


VARIANT_NAMES = xz.list_models()


@pytest.mark.parametrize("name", VARIANT_NAMES)
def test_shape_and_jit(name):
    enc = make_encoder(name)
    x, mask = inputs(1)
    eager = enc(x, mask, deterministic=True)
    assert eager.shape == x.shape
    jitted = nnx.jit(lambda m, x, mask: m(x, mask, deterministic=True))(enc, x, mask)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=2e-4, atol=2e-4)
    assert np.isfinite(np.asarray(eager)).all()


@pytest.mark.parametrize("name", VARIANT_NAMES)
def test_finite_gradients(name):
    enc = make_encoder(name)
    x, mask = inputs(2)

    def loss(m):
        out = m(x, mask, deterministic=False, rngs=nnx.Rngs(dropout=3))
        return jnp.mean(jnp.where(mask[..., None], out, 0.0) ** 2)

    grads = nnx.grad(loss)(enc)
    leaves = jax.tree.leaves(nnx.state(grads, nnx.Param))
    assert leaves and all(np.isfinite(np.asarray(g)).all() for g in leaves)
    assert any(np.abs(np.asarray(g)).sum() > 0 for g in leaves)


@pytest.mark.parametrize("name", VARIANT_NAMES)
def test_padding_invariance(name):
    """Changing what sits in padded positions never changes outputs at real positions."""
    if not xz.VARIANTS.get(name).capabilities.key_padding_mask:
        pytest.skip(f"{name} declares no key padding mask support")
    enc = make_encoder(name)
    x, mask = inputs(4, real=(23, 50))
    noise = jax.random.normal(jax.random.key(5), x.shape) * 10
    x_other = jnp.where(mask[..., None], x, noise)
    a = enc(x, mask, deterministic=True)
    b = enc(x_other, mask, deterministic=True)
    real = np.asarray(mask)
    np.testing.assert_allclose(np.asarray(a)[real], np.asarray(b)[real], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", VARIANT_NAMES)
def test_bf16(name):
    enc = make_encoder(name, dtype=jnp.bfloat16)
    x, mask = inputs(6)
    out = enc(x, mask, deterministic=True)
    assert out.dtype == jnp.bfloat16
    assert np.isfinite(np.asarray(out, np.float32)).all()
    ref = make_encoder(name, dtype=jnp.float32)(x, mask, deterministic=True)
    err = np.linalg.norm(np.asarray(out, np.float32) - np.asarray(ref)) / np.linalg.norm(ref)
    assert err < 0.1, f"bf16 output drifts from float32 by {err:.3f}"


@pytest.mark.parametrize("name", VARIANT_NAMES)
def test_config_is_typed_and_frozen(name):
    spec = xz.VARIANTS.get(name)
    cfg = spec.config_cls()
    assert dataclasses.is_dataclass(cfg)
    field = dataclasses.fields(cfg)[0].name if dataclasses.fields(cfg) else None
    if field:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(cfg, field, None)
    assert spec.paper
