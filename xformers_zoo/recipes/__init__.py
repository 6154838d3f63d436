"""Recipes: runs chained through ``train.init_from``, each stage a run directory of its own under
the recipe's workdir, run as ``xformers-zoo train --task T --model V --recipe NAME``. One module
per recipe, registered by ``@register_recipe``; ``plan`` turns a recipe and a command line into
stages, ``runner`` describes, checks and trains them."""

from xformers_zoo.recipes.base import RECIPES, Recipe, StageSpec, register_recipe
from xformers_zoo.recipes.plan import Stage, plan_recipe
from xformers_zoo.recipes.runner import (
    StageConflictError,
    StageStatus,
    check_stages,
    describe_stages,
    run_stages,
)
from xformers_zoo.registry import import_submodules

import_submodules(__name__)

__all__ = [
    "RECIPES",
    "Recipe",
    "Stage",
    "StageConflictError",
    "StageSpec",
    "StageStatus",
    "check_stages",
    "describe_stages",
    "plan_recipe",
    "register_recipe",
    "run_stages",
]
