"""Trainer pieces: the LRA schedules, gradient accumulation and rematerialisation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xformers_zoo.api import build_model
from xformers_zoo.configs import resolve_config
from xformers_zoo.train.optim import make_optimizer, make_schedule
from xformers_zoo.train.steps import init_state, train_step

SMALL = {"model.num_layers": 2, "model.emb_dim": 16, "model.qkv_dim": 16, "model.mlp_dim": 32,
         "model.num_heads": 2, "model.dropout": 0.0, "model.attention_dropout": 0.0,
         "model.dtype": "float32", "data.max_length": 24, "train.batch_size": 8,
         # A large eps makes Adam's first update proportional to the gradient, so parameters
         # compare gradients rather than their signs.
         "train.schedule": "constant", "train.warmup_steps": 0, "train.lr": 1.0,
         "train.adam_eps": 1.0, "train.weight_decay": 0.0}


def test_rsqrt_schedule_matches_lra_formula():
    cfg = resolve_config("listops").train  # 0.05 x warmup(1000) x rsqrt
    lr = make_schedule(cfg)
    for step in (0, 499, 999, 4999):
        n = step + 1
        want = 0.05 * min(1.0, n / 1000) / np.sqrt(max(n, 1000))
        assert float(lr(step)) == pytest.approx(want, rel=1e-6)


def test_cosine_schedule_warms_up_then_decays_to_zero():
    cfg = resolve_config("listops", overrides={"train.schedule": "cosine", "train.lr": 1e-3,
                                               "train.warmup_steps": 10, "train.steps": 100}).train
    lr = make_schedule(cfg)
    assert float(lr(0)) == 0.0 and float(lr(10)) == pytest.approx(1e-3)
    assert float(lr(100)) == pytest.approx(0.0, abs=1e-9)


def _one_step(overrides):
    cfg = resolve_config("listops", "full", overrides={**SMALL, **overrides})
    assert float(make_schedule(cfg.train)(0)) == 1.0
    model = build_model(cfg.model, "listops", max_length=24, seed=0)
    tx = make_optimizer(cfg.train)
    graphdef, state = init_state(model, tx, seed=0)
    tokens = jax.random.randint(jax.random.key(1), (8, 24), 1, 16)
    mask = jnp.arange(24)[None] < jax.random.randint(jax.random.key(2), (8, 1), 5, 24)
    batch = {"inputs": jnp.where(mask, tokens, 0), "mask": mask,
             "label": jax.random.randint(jax.random.key(3), (8,), 0, 10),
             "weight": jnp.ones((8,), jnp.float32)}
    step = jax.jit(lambda s, b: train_step(graphdef, tx, make_schedule(cfg.train),
                                           cfg.train.grad_accum, s, b))
    new_state, metrics = step(state, batch)
    return new_state, metrics


@pytest.mark.parametrize("overrides", [{"train.grad_accum": 4}, {"model.remat": True}])
def test_accumulation_and_remat_give_the_plain_update(overrides):
    plain_state, plain = _one_step({})
    state, metrics = _one_step(overrides)
    assert float(metrics["loss"]) == pytest.approx(float(plain["loss"]), rel=1e-5)
    assert float(metrics["grad_norm"]) == pytest.approx(float(plain["grad_norm"]), rel=1e-4)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(plain_state.params),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
