"""A recipe and a command line made into stages: one resolved config and run directory each.

Who gets the user's ``section.field=value`` overrides:

- ``model.*`` and ``data.*``: every stage. Warm starting needs one architecture from stage to
  stage, and the stages read their data alike (location, split sizes, workers).
- ``train.*``: the final stage, the run the recipe is for; a field a stage claims goes to that
  stage instead (self-pretraining's ``train.mask_rate`` and ``train.mask_span``).
- ``STAGE:section.field=value``: the named stage only (``pathfinder64:train.steps=20000``).

Presets apply to every stage. A field the recipe fixes (a later stage's ``train.init_from``,
the curriculum's 2-D positions, self-pretraining's objectives) is refused if set otherwise.
"""

from __future__ import annotations

import dataclasses
import functools
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from xformers_zoo import overrides as cfglib
from xformers_zoo.configs import ExperimentConfig, resolve_config
from xformers_zoo.overrides import ConfigError, parse_assignments, parse_scoped
from xformers_zoo.recipes.base import RECIPES, StageSpec

EVERY_STAGE = ("model", "data")  # override sections that reach every stage


@dataclasses.dataclass(frozen=True)
class Stage:
    """A stage ready to train: ``config`` in ``workdir``, made by ``resolve_config(task,
    variant, presets, overrides)`` (so ``command`` trains it alone, as the recipe would)."""

    index: int  # 1-based
    name: str
    task: str
    variant: str
    presets: tuple[str, ...]
    overrides: dict[str, Any]
    workdir: Path
    config: ExperimentConfig

    @property
    def command(self) -> str:
        """The ``xformers-zoo train`` command line that trains this stage on its own."""
        words = ["xformers-zoo", "train", "--task", self.task, "--model", self.variant,
                 *(w for p in self.presets for w in ("--preset", p)),
                 "--workdir", str(self.workdir),
                 *(f"{k}={v}" for k, v in self.overrides.items())]
        return shlex.join(words)


def _field(config: Any, key: str) -> Any:
    return functools.reduce(getattr, key.split("."), config)


def _route(key: str, specs: Sequence[StageSpec]) -> list[str]:
    """The stages an override without a stage prefix goes to."""
    if key.split(".")[0] in EVERY_STAGE:
        return [s.name for s in specs]
    claimed = [s.name for s in specs if key in s.claims]
    return claimed or [specs[-1].name]


def _user_overrides(items: Sequence[str], specs: Sequence[StageSpec]) -> dict[str, dict]:
    """Each stage's share of the command line's overrides, by stage name."""
    per_stage: dict[str, dict[str, str]] = {s.name: {} for s in specs}
    for scope, item in parse_scoped(items, {"stage of this recipe": list(per_stage)}):
        ((key, value),) = parse_assignments([item]).items()
        for name in [scope] if scope else _route(key, specs):
            per_stage[name][key] = value
    return per_stage


def _resolve(spec: StageSpec, variant: str, presets: Sequence[str], user: Mapping[str, Any],
             fixed: Mapping[str, Any]) -> tuple[ExperimentConfig, dict[str, Any]]:
    """The stage's config and the overrides that make it; a user value of a fixed field that
    differs from the recipe's raises naming the field."""
    base = resolve_config(spec.task, variant, presets)
    # Settings the task's base config already has are left out of the stage's command.
    chosen = {**{k: v for k, v in spec.settings.items() if _field(base, k) != v}, **user}
    config = resolve_config(spec.task, variant, presets, chosen)
    required = cfglib.replace(config, fixed)
    for key in user.keys() & fixed.keys():
        if _field(config, key) != _field(required, key):
            raise ConfigError(f"{key}={user[key]} cannot be given: the recipe sets it to "
                              f"{_field(required, key)!r} on this stage")
    return required, {**chosen, **fixed}


def plan_recipe(recipe: str, task: str, variant: str, presets: Sequence[str],
                overrides: Sequence[str], workdir: str | Path) -> list[Stage]:
    """The stages of ``recipe`` for ``task`` with attention ``variant``, in training order,
    each in ``<workdir>/stage<i>-<name>`` with the previous stage's run directory as its
    ``train.init_from``. Raises UnknownNameError (listing the recipes) for an unknown name,
    ValueError for a task the recipe cannot serve or a bad override (naming the stage)."""
    specs = RECIPES.get(recipe).stages(task, variant, tuple(presets))
    per_stage = _user_overrides(overrides, specs)
    stages: list[Stage] = []
    for index, spec in enumerate(specs, 1):
        fixed = dict(spec.fixed)
        if stages:
            fixed["train.init_from"] = str(stages[-1].workdir)
        try:
            config, used = _resolve(spec, variant, presets, per_stage[spec.name], fixed)
        except ValueError as e:
            raise ConfigError(f"recipe {recipe}, stage {index} ({spec.name}): {e}") from None
        stages.append(Stage(index, spec.name, spec.task, config.model.variant, tuple(presets),
                            used, Path(workdir) / f"stage{index}-{spec.name}", config))
    return stages
