"""Reversible residual layers (Gomez et al. 2017, "The Reversible Residual Network"), as the
Reformer uses them (Kitaev et al. 2020): a block maps a pair of activations

    y1 = x1 + F(x2),    y2 = x2 + G(y1)

with F the attention branch and G the feed-forward branch of the shared encoder block. The
inputs are recomputed from the outputs in the backward pass (x2 = y2 - G(y1), x1 = y1 - F(x2)),
so a stack of blocks keeps only its final outputs instead of every block's activations. Dropout
inside F and G draws from explicit per-block keys, so the recomputation reproduces the forward
pass's masks exactly.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float


def dropout_keys(rngs: nnx.Rngs | None, num_blocks: int, *,
                 deterministic: bool) -> jax.Array | None:
    """Two dropout keys per block (attention branch, feed-forward branch), or None when there is
    no dropout to draw."""
    if deterministic or rngs is None:
        return None
    return jax.random.split(rngs.dropout(), (num_blocks, 2))


def _branch_rngs(keys, block: int, branch: int) -> nnx.Rngs | None:
    return None if keys is None else nnx.Rngs(dropout=keys[block, branch])


def _attention_branch(graphdef, params, x, *, rest, key_mask, keys, index, deterministic):
    block = nnx.merge(graphdef, params, rest)
    return block.attention_branch(x, key_mask, deterministic=deterministic,
                                  rngs=_branch_rngs(keys, index, 0))


def _mlp_branch(graphdef, params, x, *, rest, keys, index, deterministic):
    block = nnx.merge(graphdef, params, rest)
    return block.mlp_branch(x, deterministic=deterministic, rngs=_branch_rngs(keys, index, 1))


def _forward(graphdefs, deterministic, params, rest, x1, x2, key_mask, keys):
    for i, graphdef in enumerate(graphdefs):
        x1 = x1 + _attention_branch(graphdef, params[i], x2, rest=rest[i], key_mask=key_mask,
                                    keys=keys, index=i, deterministic=deterministic)
        x2 = x2 + _mlp_branch(graphdef, params[i], x1, rest=rest[i], keys=keys, index=i,
                              deterministic=deterministic)
    return x1, x2


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _reversible(graphdefs, deterministic, params, rest, x1, x2, key_mask, keys):
    return _forward(graphdefs, deterministic, params, rest, x1, x2, key_mask, keys)


def _reversible_fwd(graphdefs, deterministic, params, rest, x1, x2, key_mask, keys):
    y1, y2 = _forward(graphdefs, deterministic, params, rest, x1, x2, key_mask, keys)
    # Only the stack's outputs are kept; every block's inputs are recomputed from them.
    return (y1, y2), (params, rest, y1, y2, key_mask, keys)


def _reversible_bwd(graphdefs, deterministic, residuals, cotangents):
    params, rest, y1, y2, key_mask, keys = residuals
    dy1, dy2 = cotangents
    dparams = [None] * len(graphdefs)
    for i in reversed(range(len(graphdefs))):
        mlp = functools.partial(_mlp_branch, graphdefs[i], rest=rest[i], keys=keys, index=i,
                                deterministic=deterministic)
        g_out, g_vjp = jax.vjp(mlp, params[i], y1)
        x2 = y2 - g_out
        dparams_g, dy1_from_g = g_vjp(dy2)
        dy1 = dy1 + dy1_from_g
        attention = functools.partial(_attention_branch, graphdefs[i], rest=rest[i],
                                      key_mask=key_mask, keys=keys, index=i,
                                      deterministic=deterministic)
        f_out, f_vjp = jax.vjp(attention, params[i], x2)
        x1 = y1 - f_out
        dparams_f, dx2_from_f = f_vjp(dy1)
        dparams[i] = jax.tree.map(jnp.add, dparams_f, dparams_g)
        y1, y2, dy2 = x1, x2, dy2 + dx2_from_f
    return tuple(dparams), jax.tree.map(_zero_cotangent, rest), dy1, dy2, None, None


_reversible.defvjp(_reversible_fwd, _reversible_bwd)


def _zero_cotangent(x):
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.zeros_like(x)
    return jnp.zeros(x.shape, jax.dtypes.float0)  # integer state has no tangent space


def reversible_apply(
    blocks: Sequence[nnx.Module],
    x1: Float[Array, "b l e"],
    x2: Float[Array, "b l e"],
    key_mask: Bool[Array, "b l"] | None,
    *,
    keys: jax.Array | None,
    deterministic: bool,
    recompute: bool = True,
) -> tuple[Float[Array, "b l e"], Float[Array, "b l e"]]:
    """Runs ``y1 = x1 + F(x2), y2 = x2 + G(y1)`` through ``blocks`` (each with
    ``attention_branch`` F and ``mlp_branch`` G).

    Args:
      keys: ``dropout_keys(...)`` for the stack, or None without dropout.
      recompute: True (the point of the layer) differentiates through a custom VJP that
        recomputes activations from outputs; False differentiates the same forward with plain
        autodiff, storing every activation (the reference the custom VJP must match).
    """
    splits = [nnx.split(block, nnx.Param, ...) for block in blocks]
    graphdefs = tuple(s[0] for s in splits)
    params = tuple(s[1] for s in splits)
    rest = tuple(s[2] for s in splits)
    run = _reversible if recompute else _forward
    return run(graphdefs, deterministic, params, rest, x1, x2, key_mask, keys)
