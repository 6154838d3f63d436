"""The public Python API: build a model by variant name for a task, and list what exists."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from flax import nnx

from xformers_zoo.configs import ModelConfig, resolve_config, split_model_overrides
from xformers_zoo.models.classifier import Classifier
from xformers_zoo.task_specs import TASKS
from xformers_zoo.variants import VARIANTS


def build_model(model: ModelConfig, task: str, *, max_length: int | None = None,
                seed: int = 0, objective: str = "classify") -> Classifier:
    """A ``Classifier`` from a resolved model config (``model.attention`` filled), for the
    training objective ``objective`` ("classify" or "masked", as ``train.objective``)."""
    spec = TASKS.get(task)
    return Classifier(model, spec, max_length=max_length or spec.max_length, rngs=nnx.Rngs(seed),
                      objective=objective)


def create_model(name: str, task: str = "listops", *, seed: int = 0,
                 max_length: int | None = None, preset: str | None = None,
                 **overrides: Any) -> Classifier:
    """The classifier for ``task`` with attention variant ``name``.

    The model section starts from the task's public LRA config; ``preset`` (e.g. "tiny") and
    keyword ``overrides`` change it. An override names a model field (``num_layers=2``) or a
    field of the variant's own config (``implementation=("xla",)``).

    Example:
      >>> model = create_model("full", task="listops", num_layers=2, emb_dim=64)
      >>> logits = model(tokens, tokens != 0)   # [batch, 10]
    """
    VARIANTS.get(name)
    cfg = resolve_config(task, name, presets=[preset] if preset else (),
                         overrides=split_model_overrides(name, overrides))
    return build_model(cfg.model, task, max_length=max_length or cfg.data.max_length, seed=seed)


def list_models() -> list[str]:
    """Registered attention variant names."""
    return VARIANTS.names()


def count_params(model: nnx.Module) -> int:
    """Trainable parameters (``nnx.Param``) of a module."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def describe_variant(name: str) -> dict[str, Any]:
    """A variant's paper, capabilities and default config as plain data."""
    spec = VARIANTS.get(name)
    return {"name": name, "paper": spec.paper,
            "capabilities": dataclasses.asdict(spec.capabilities),
            "config": dataclasses.asdict(spec.config_cls())}


def param_count(name: str, task: str) -> int:
    """Parameters of variant ``name`` at the public LRA config of ``task``, without allocating
    them (shapes only)."""
    cfg = resolve_config(task, name)
    abstract = nnx.eval_shape(lambda: build_model(cfg.model, task))
    return count_params(abstract)
