"""Resolution of a run's config: task base, then the model's variant, then presets in order,
then dotted overrides; and the reverse, loading a saved config."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from xformers_zoo import overrides as cfglib
from xformers_zoo.configs.base import ExperimentConfig, ModelConfig
from xformers_zoo.configs.presets import PRESETS
from xformers_zoo.overrides import ConfigError
from xformers_zoo.task_specs import TASK_CONFIGS, TASKS
from xformers_zoo.variants import VARIANTS


def resolve_model_config(model: ModelConfig) -> ModelConfig:
    """Fills ``model.attention`` with the variant's config (defaults, or a dict of its fields)."""
    spec = VARIANTS.get(model.variant)
    attention = model.attention
    if isinstance(attention, spec.config_cls):
        return model
    if attention is None or dataclasses.is_dataclass(attention):
        # None, or another variant's config left over from a change of variant.
        attention = spec.config_cls()
    elif isinstance(attention, Mapping):
        attention = cfglib.from_dict(spec.config_cls, attention)
    else:
        raise ConfigError(f"model.attention must hold {spec.config_cls.__name__} fields, got "
                          f"{attention!r}")
    return dataclasses.replace(model, attention=attention)


def resolve_config(
    task: str,
    model: str | None = None,
    presets: Sequence[str] = (),
    overrides: Mapping[str, Any] | None = None,
) -> ExperimentConfig:
    """The config of a run of ``model`` on ``task``.

    Args:
      task: a registered task name.
      model: a registered variant name; None keeps the task's default ("full").
      presets: preset names applied in order.
      overrides: dotted field -> value (strings are parsed to the field's type), applied last.
    """
    TASKS.get(task)
    cfg = TASK_CONFIGS.get(task)()
    overrides = dict(overrides or {})
    variant = overrides.pop("model.variant", model or cfg.model.variant)
    cfg = cfglib.replace(cfg, {"model.variant": variant, "data.task": task})
    cfg = dataclasses.replace(cfg, model=resolve_model_config(cfg.model))
    for name in presets:
        cfg = cfglib.replace(cfg, PRESETS.get(name)(variant, task))
    cfg = cfglib.replace(cfg, overrides)
    if cfg.data.task != task:
        raise ConfigError(f"data.task is fixed by the task argument ({task!r})")
    return cfg


def load_config(data: Mapping[str, Any]) -> ExperimentConfig:
    """An ``ExperimentConfig`` from its ``config.to_dict`` form (as saved in a run directory)."""
    cfg = cfglib.from_dict(ExperimentConfig, data)
    return dataclasses.replace(cfg, model=resolve_model_config(cfg.model))


def load_run_config(workdir: str | Path) -> ExperimentConfig:
    """The config saved in a run directory's ``config.json``."""
    path = Path(workdir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{workdir} holds no run (no config.json)")
    return load_config(json.loads(path.read_text()))


def split_model_overrides(variant: str, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Maps plain keyword overrides of ``create_model`` to dotted config paths: a ModelConfig
    field goes to ``model.<field>``, a field of the variant's config to
    ``model.attention.<field>``; anything else raises listing both sets of names."""
    model_fields = set(cfglib.field_names(ModelConfig)) - {"attention", "variant"}
    attention_fields = set(cfglib.field_names(VARIANTS.get(variant).config_cls))
    out = {}
    for key, value in overrides.items():
        if key in model_fields:
            out[f"model.{key}"] = value
        elif key in attention_fields:
            out[f"model.attention.{key}"] = value
        else:
            raise ConfigError(
                f"unknown field {key!r} for variant {variant!r}; model fields: "
                f"{', '.join(sorted(model_fields))}; {variant} fields: "
                f"{', '.join(sorted(attention_fields)) or '(none)'}")
    return out
