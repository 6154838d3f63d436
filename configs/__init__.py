"""Experiment configs: task bases with the public LRA values, presets, and their resolution."""

from xformers_zoo.configs.base import DataConfig, ExperimentConfig, ModelConfig, TrainConfig
from xformers_zoo.configs.lra_tasks import TASK_CONFIGS
from xformers_zoo.configs.presets import PRESETS
from xformers_zoo.configs.resolve import (
    load_config,
    load_run_config,
    resolve_config,
    resolve_model_config,
    split_model_overrides,
)

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
