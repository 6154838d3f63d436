"""Experiment configs: the tasks with their base configs (public LRA values), presets, and their
resolution. Importing this package imports every module in it, so that the tasks and presets
they register (``@register_task``, ``@PRESETS.decorator``) are known."""

from xformers_zoo.configs.base import DataConfig, ExperimentConfig, ModelConfig, TrainConfig
from xformers_zoo.configs.presets import PRESETS
from xformers_zoo.configs.resolve import (
    load_config,
    load_run_config,
    resolve_config,
    resolve_model_config,
    split_model_overrides,
)
from xformers_zoo.registry import import_submodules
from xformers_zoo.task_specs import TASK_CONFIGS

import_submodules(__name__)

__all__ = [
    "PRESETS",
    "TASK_CONFIGS",
    "DataConfig",
    "ExperimentConfig",
    "ModelConfig",
    "TrainConfig",
    "load_config",
    "load_run_config",
    "resolve_config",
    "resolve_model_config",
    "split_model_overrides",
]
