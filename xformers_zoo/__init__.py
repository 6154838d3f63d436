"""xformers-zoo: efficient Transformers in JAX/Flax NNX sharing one encoder, one trainer and one
data layer, compared on Long Range Arena."""

# Importing the packages registers their variants, tasks and presets.
from xformers_zoo import configs as _configs  # noqa: F401
from xformers_zoo import models as _models  # noqa: F401
from xformers_zoo.api import (
    build_model,
    count_params,
    create_model,
    describe_variant,
    list_models,
    param_count,
)
from xformers_zoo.registry import Registry, UnknownNameError
from xformers_zoo.task_specs import TASKS, TaskSpec
from xformers_zoo.variants import VARIANTS, Capabilities, VariantSpec, register_variant

__version__ = "0.1.0"

__all__ = [
    "TASKS",
    "VARIANTS",
    "Capabilities",
    "Registry",
    "TaskSpec",
    "UnknownNameError",
    "VariantSpec",
    "build_model",
    "count_params",
    "create_model",
    "describe_variant",
    "list_models",
    "param_count",
    "register_variant",
]
