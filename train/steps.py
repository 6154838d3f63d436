"""Pure train and eval steps over ``nnx.split`` state, compiled with ``jax.jit``.

The training state is a plain pytree ``TrainState`` so that it can be checkpointed, sharded and
replaced as a whole; the model's graph definition stays static.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from xformers_zoo.train.objectives import EVAL_MASK_SEED, Classification, Objective

Batch = dict[str, jax.Array]
CLASSIFICATION = Classification()


class TrainState(NamedTuple):
    """Everything that changes during training (all arrays)."""

    params: Any  # nnx.State of nnx.Param
    rest: Any  # nnx.State of the other variables (e.g. random features, fixed tables)
    opt_state: Any
    step: jax.Array  # int32 scalar
    key: jax.Array  # uint32 key data; per-step keys are folded from it


def init_state(model: nnx.Module, tx: optax.GradientTransformation, seed: int):
    """(graphdef, TrainState) of a freshly built model."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    key = jax.random.key_data(jax.random.key(seed))
    return graphdef, TrainState(params, rest, tx.init(params), jnp.zeros((), jnp.int32), key)


def _forward(graphdef, params, rest, batch, *, deterministic: bool, key=None):
    model = nnx.merge(graphdef, params, rest)
    rngs = None if deterministic else nnx.Rngs(dropout=key)
    return model(batch["inputs"], batch["mask"], deterministic=deterministic, rngs=rngs)


def _grads(graphdef, objective: Objective, state: TrainState, batch: Batch, key: jax.Array,
           grad_accum: int):
    """Loss, metric sums and gradients, accumulated over ``grad_accum`` micro-batches."""

    def micro(params, mb, k):
        mb = objective.corrupt(mb, k)
        logits = _forward(graphdef, params, state.rest, mb, deterministic=False, key=k)
        return objective.loss_and_metrics(logits, mb)

    grad_fn = jax.value_and_grad(micro, has_aux=True)
    if grad_accum == 1:
        (loss, sums), grads = grad_fn(state.params, batch, key)
        return loss, sums, grads
    # [batch, ...] -> [accum, batch / accum, ...]; micro-batch k holds rows k, k + accum, ...
    # so that every device of a data-parallel mesh holds its share of every micro-batch.
    micro_batches = jax.tree.map(
        lambda x: x.reshape(-1, grad_accum, *x.shape[1:]).swapaxes(0, 1), batch)
    keys = jax.random.split(key, grad_accum)

    def body(carry, xs):
        mb, k = xs
        (loss, sums), grads = grad_fn(state.params, mb, k)
        return jax.tree.map(jnp.add, carry, (loss, sums, grads)), None

    zeros = jax.tree.map(jnp.zeros_like, (jnp.zeros(()), {"loss_sum": jnp.zeros(()),
                         "correct": jnp.zeros(()), "count": jnp.zeros(())}, state.params))
    (loss, sums, grads), _ = jax.lax.scan(body, zeros, (micro_batches, keys))
    return loss / grad_accum, sums, jax.tree.map(lambda g: g / grad_accum, grads)


def train_step(graphdef, tx: optax.GradientTransformation, schedule, grad_accum: int,
               state: TrainState, batch: Batch, *,
               objective: Objective = CLASSIFICATION) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step. A non-finite loss or gradient leaves parameters and optimizer state
    untouched and reports ``finite = 0`` so the loop can stop with the last good state. The
    objective's corruption (masking) is drawn from the step's key."""
    key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
    loss, sums, grads = _grads(graphdef, objective, state, batch, key, grad_accum)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    def keep_if_finite(new, old):
        return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

    new_state = state._replace(params=keep_if_finite(params, state.params),
                               opt_state=keep_if_finite(opt_state, state.opt_state),
                               step=state.step + 1)
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state.step),
               "finite": finite.astype(jnp.int32), **sums}
    return new_state, metrics


def eval_step(graphdef, state: TrainState, batch: Batch, *,
              objective: Objective = CLASSIFICATION) -> dict[str, jax.Array]:
    """Metric sums of one evaluation batch (no dropout), with the weighted count of each label
    (``class_counts [classes]``; masked tokens for the masked objective) for the majority
    rate. Masks come from a fixed key, so every checkpoint is scored on the same ones."""
    batch = objective.corrupt(batch, jax.random.key(EVAL_MASK_SEED))
    logits = _forward(graphdef, state.params, state.rest, batch, deterministic=True)
    sums = objective.loss_and_metrics(logits, batch)[1]
    return {**sums, "class_counts": objective.label_counts(logits, batch)}


def compile_steps(graphdef, tx, schedule, grad_accum: int,
                  objective: Objective = CLASSIFICATION):
    """Jitted (train_step, eval_step); the train step donates the old state's buffers."""
    train = jax.jit(functools.partial(train_step, graphdef, tx, schedule, grad_accum,
                                      objective=objective), donate_argnums=(0,))
    evaluate = jax.jit(functools.partial(eval_step, graphdef, objective=objective))
    return train, evaluate
