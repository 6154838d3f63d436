"""The recipe registry: a recipe is a function ``(task, variant, presets) -> [StageSpec]`` that
names its stages in training order, registered by ``@register_recipe`` in its own module."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from xformers_zoo.registry import Registry


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """One stage of a recipe, before the user's overrides.

    Attributes:
      name: the stage's name: its run directory is ``stage<i>-<name>`` and
        ``<name>:section.field=value`` overrides reach it alone.
      task: the task the stage trains on.
      settings: dotted fields the recipe sets and the user may override (a model shape that
        every stage shares, for instance).
      fixed: dotted fields the recipe needs as they are; a user override to another value is
        refused. A stage after the first also has ``train.init_from`` fixed to the previous
        stage's run directory.
      claims: ``train.*`` fields that, given without a stage prefix, go to this stage rather
        than to the final one (self-pretraining's masking fields).
    """

    name: str
    task: str
    settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    fixed: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    claims: tuple[str, ...] = ()


StagesOf = Callable[[str, str, Sequence[str]], list[StageSpec]]


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A registered recipe: ``stages(task, variant, presets)`` lists its stages (raising
    ValueError for a task it cannot serve), ``summary`` is one line for listings and ``paper``
    the method's source."""

    stages: StagesOf
    summary: str
    paper: str


RECIPES: Registry[Recipe] = Registry("recipe")


def register_recipe(name: str, *, summary: str, paper: str) -> Callable[[StagesOf], StagesOf]:
    """``@register_recipe("curriculum", summary=..., paper=...)`` on a module's
    ``stages(task, variant, presets) -> [StageSpec]`` makes it ``--recipe curriculum``."""

    def wrap(stages: StagesOf) -> StagesOf:
        RECIPES.register(name, Recipe(stages=stages, summary=summary, paper=paper))
        return stages

    return wrap
