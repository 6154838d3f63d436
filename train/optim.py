"""Learning-rate schedules and the optimizer of the LRA configs: Adam(0.9, 0.98, eps 1e-9) with
decoupled weight decay (Loshchilov & Hutter 2019), optional global-norm clipping."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from xformers_zoo.configs.base import TrainConfig


def make_schedule(cfg: TrainConfig) -> optax.Schedule:
    """The learning rate at each step.

    ``rsqrt``: ``lr * min(1, step / warmup) / sqrt(max(step, warmup))``, the LRA text/ListOps
    schedule (``lr`` is the constant factor, 0.05 there). ``cosine``: linear warmup to ``lr``
    then cosine decay to 0 at ``steps``. ``constant``: linear warmup then ``lr``.
    """
    warmup = max(cfg.warmup_steps, 1)
    if cfg.schedule == "rsqrt":
        def rsqrt(step):
            step = jnp.asarray(step, jnp.float32) + 1.0
            return cfg.lr * jnp.minimum(1.0, step / warmup) * jax.lax.rsqrt(
                jnp.maximum(step, warmup))
        return rsqrt
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, cfg.lr, warmup_steps=min(warmup, cfg.steps), decay_steps=max(cfg.steps, warmup))
    if cfg.schedule == "constant":
        return optax.linear_schedule(0.0, cfg.lr, warmup) if cfg.warmup_steps else (
            lambda step: cfg.lr)
    raise ValueError(f"unknown schedule {cfg.schedule!r}; known: rsqrt, cosine, constant")


def make_optimizer(cfg: TrainConfig,
                   schedule: optax.Schedule | None = None) -> optax.GradientTransformation:
    """AdamW with the configured schedule (or ``schedule``, already made from ``cfg``), betas,
    eps, weight decay and optional clipping."""
    adam = optax.adamw(schedule or make_schedule(cfg), b1=cfg.adam_b1, b2=cfg.adam_b2,
                       eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    if cfg.grad_clip is None:
        return adam
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adam)
