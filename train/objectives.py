"""Training objectives: what a batch is turned into before the forward pass, and the loss and
metric sums of the model's output.

``Classification`` trains on the task's labels. ``MaskedDenoising`` is the self-pretraining of
Amos et al. 2024 ("Never Train from Scratch: Fair Comparison of Long-Sequence Models Requires
Data-Driven Priors"): spans of real tokens are replaced by a mask token and the model predicts
them; only masked positions count.

The mask token is a new id, ``task.vocab_size`` (the embedding holds one more row), rather than
a random real token: image tasks use all 256 pixel values, so no real id is free to mean
"hidden", and a random token would let the model tell neither which positions to predict nor
that their input is corrupt. A fine-tune drops that row (``train/warm_start.py``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Bool, Float, Int

from xformers_zoo.task_specs import TaskSpec

Batch = dict[str, jax.Array]

# Folded into the step key for the masking draw, so that dropout keeps the step key as it is.
MASK_STREAM = 0x6D61736B
# Evaluation scores every checkpoint on the same masks: drawn from this fixed key.
EVAL_MASK_SEED = 0


def span_mask(key: jax.Array, valid: Bool[Array, "b l"], rate: float,
              span: int) -> Bool[Array, "b l"]:
    """Positions to hide: spans of ``span`` consecutive tokens, about ``rate`` of the ``valid``
    ones in expectation; never an invalid (padding) position.

    Each position starts a span with probability p = 1 - (1 - rate)^(1/span), so that a
    position is left uncovered by the ``span`` starts that reach it with probability
    (1 - p)^span = 1 - rate. Spans are cut where padding begins.
    """
    start_rate = 1.0 - (1.0 - rate) ** (1.0 / span)
    starts = jax.random.bernoulli(key, start_rate, valid.shape).astype(jnp.int32)
    # A position is covered when a span starts at it or at one of the span - 1 before it.
    covered = jax.lax.reduce_window(starts, 0, jax.lax.max, (1, span), (1, 1),
                                    ((0, 0), (span - 1, 0)))
    return (covered > 0) & valid


def _sums(losses: Float[Array, "*n"], correct: Float[Array, "*n"],
          weight: Float[Array, "*n"]) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted mean loss and the sums an accuracy is computed from."""
    total = jnp.maximum(weight.sum(), 1.0)
    return (losses * weight).sum() / total, {
        "loss_sum": (losses * weight).sum(), "correct": (correct * weight).sum(),
        "count": weight.sum()}


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-item cross-entropy and whether the argmax is right."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    return losses, (jnp.argmax(logits, -1) == labels).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class Classification:
    """Cross-entropy on the task's labels; accuracy is classification accuracy."""

    name = "classify"

    def corrupt(self, batch: Batch, key: jax.Array) -> Batch:
        """The batch unchanged (classification sees its inputs as they are)."""
        del key
        return batch

    def loss_and_metrics(self, logits: Float[Array, "b c"],
                         batch: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Weighted mean cross-entropy and the sums an accuracy is computed from."""
        return _sums(*_cross_entropy(logits, batch["label"]), batch["weight"])

    def label_counts(self, logits: Float[Array, "b c"], batch: Batch) -> Float[Array, " c"]:
        """The weighted count of each label, for the majority-class rate."""
        one_hot = jax.nn.one_hot(batch["label"], logits.shape[-1])
        return (one_hot * batch["weight"][:, None]).sum(0)


@dataclasses.dataclass(frozen=True)
class MaskedDenoising:
    """Masked-token denoising on the task's own inputs (Amos et al. 2024).

    ``corrupt`` hides ``rate`` of the real tokens in spans of ``span`` and keeps the originals
    as ``targets`` with the hidden positions as ``predict``; the loss is cross-entropy at those
    positions only, and accuracy is masked-token accuracy.
    """

    vocab_size: int
    rate: float
    span: int
    name = "masked"

    @property
    def mask_id(self) -> int:
        """The mask token: the id just past the task's vocabulary."""
        return self.vocab_size

    def corrupt(self, batch: Batch, key: jax.Array) -> Batch:
        """The batch with masked inputs, ``targets`` (the original tokens) and ``predict``."""
        tokens: Int[Array, "b l"] = batch["inputs"]
        hidden = span_mask(jax.random.fold_in(key, MASK_STREAM), batch["mask"].astype(bool),
                           self.rate, self.span)
        return {**batch, "inputs": jnp.where(hidden, self.mask_id, tokens),
                "targets": tokens, "predict": hidden}

    def _weight(self, batch: Batch) -> Float[Array, "b l"]:
        # Padding examples of a last evaluation batch carry weight 0.
        return batch["predict"].astype(jnp.float32) * batch["weight"][:, None]

    def loss_and_metrics(self, logits: Float[Array, "b l v"],
                         batch: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Mean cross-entropy over masked positions, and masked-token accuracy sums."""
        return _sums(*_cross_entropy(logits, batch["targets"]), self._weight(batch))

    def label_counts(self, logits: Float[Array, "b l v"], batch: Batch) -> Float[Array, " v"]:
        """The weighted count of each hidden token, for the most-frequent-token rate."""
        counts = jnp.zeros((logits.shape[-1],), jnp.float32)
        return counts.at[batch["targets"].ravel()].add(self._weight(batch).ravel())


Objective = Classification | MaskedDenoising


def make_objective(objective: str, task: TaskSpec, *, mask_rate: float = 0.15,
                   mask_span: int = 1) -> Objective:
    """The objective named by ``train.objective`` for ``task``."""
    if objective == "classify":
        return Classification()
    if objective == "masked":
        if task.two_inputs:
            raise ValueError(f"train.objective=masked is not supported for the two-input task "
                             f"{task.name}; accepted there: train.objective=classify")
        return MaskedDenoising(task.vocab_size, mask_rate, mask_span)
    raise ValueError(f"unknown train.objective {objective!r}; accepted: classify, masked")
