"""Checking, describing and training a recipe's stages.

Every stage is checked before any trains: a stage directory holding a run of another config is
refused with the fields that differ, so a mismatch in the last stage is found before the first
one trains for hours. A finished stage (``final.json`` for its configured steps, same config)
is reused; an unfinished one resumes from its checkpoint (the trainer resumes); a later stage
that already started from an earlier one that would now train further is refused, since its
weights came from the earlier stage's older checkpoint.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Literal

from xformers_zoo.recipes.base import RECIPES
from xformers_zoo.recipes.plan import Stage
from xformers_zoo.train.checkpoint import RunCheckpoints
from xformers_zoo.train.loop import RunDirectoryMismatchError, compare_run_config, run
from xformers_zoo.train.sweep_cells import read_final
from xformers_zoo.train.tables import summary_line


class StageConflictError(ValueError):
    """A stage directory that the recipe cannot reuse or resume as it stands."""


@dataclasses.dataclass(frozen=True)
class StageStatus:
    """Where a stage stands: ``new`` (nothing to resume), ``resume`` (from the checkpoint of
    ``step``) or ``done`` (``final`` holds its results for ``step`` steps)."""

    state: Literal["new", "resume", "done"]
    step: int | None = None
    final: dict[str, Any] | None = None


def stage_status(stage: Stage) -> StageStatus:
    """The status of one stage's run directory; a run of another config raises
    ``StageConflictError`` naming the fields that differ."""
    try:
        holds_run = compare_run_config(stage.config, stage.workdir)
    except RunDirectoryMismatchError as e:
        raise StageConflictError(f"stage {stage.index} ({stage.name}): {e}; or remove "
                                 f"{stage.workdir} to train this stage again") from None
    if not holds_run:
        return StageStatus("new")
    final = read_final(stage.workdir)
    if final is not None and int(final["steps"]) >= stage.config.train.steps:
        return StageStatus("done", int(final["steps"]), final)
    checkpoints = RunCheckpoints(stage.workdir)
    try:
        step = checkpoints.latest_step()
    finally:
        checkpoints.close()
    return StageStatus("new") if step is None else StageStatus("resume", step)


def check_stages(stages: Sequence[Stage]) -> list[StageStatus]:
    """Every stage's status, after checking that the chain can go on as it stands (see the
    module docstring); raises ``StageConflictError`` otherwise."""
    statuses = [stage_status(stage) for stage in stages]
    for earlier, status in zip(stages, statuses, strict=True):
        if status.state == "done":
            continue
        for later in stages[earlier.index:]:
            if (later.workdir / "config.json").exists():
                raise StageConflictError(
                    f"stage {later.index} ({later.name}) in {later.workdir} already started "
                    f"from stage {earlier.index} ({earlier.name}), which is not finished for "
                    f"{earlier.config.train.steps} steps and would train further; remove "
                    f"{later.workdir} to start it again from stage {earlier.index}'s new best "
                    f"checkpoint, or give stage {earlier.index} the steps it finished with")
    return statuses


def _status_text(status: StageStatus) -> str:
    if status.state == "done":
        return f"done, reused ({summary_line(status.final)})"
    if status.state == "resume":
        return f"resumes from its step-{status.step} checkpoint"
    return "to train"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _stage_lines(stage: Stage) -> list[str]:
    """The key fields of a stage's config."""
    m, t, d = stage.config.model, stage.config.train, stage.config.data
    sizes = " / ".join("default" if n is None else str(n)
                       for n in (d.train_size, d.val_size, d.test_size))
    start = "from scratch" if t.init_from is None else f"from the best checkpoint of {t.init_from}"
    masking = (f" (mask rate {t.mask_rate}, spans of {t.mask_span})"
               if t.objective == "masked" else "")
    return [f"  workdir  {stage.workdir}",
            f"  model    {m.variant}: {_count(m.num_layers, 'layer')} x "
            f"{_count(m.num_heads, 'head')}, width "
            f"{m.emb_dim}, q/k/v {m.qkv_dim}, MLP {m.mlp_dim}, {m.positional} positions, "
            f"{m.pooling} pooling, dropout {m.dropout}",
            f"  train    {t.objective}{masking}, {t.steps} steps of batch {t.batch_size}, lr "
            f"{t.lr} {t.schedule} (warmup {t.warmup_steps}), {start}",
            f"  data     {d.task} ({d.source}), train / validation / test {sizes}",
            f"  command  {stage.command}"]


def describe_stages(recipe: str, stages: Sequence[Stage],
                    statuses: Sequence[StageStatus]) -> str:
    """What the recipe will run: each stage with its status, key config fields, run directory
    and the command that trains it alone."""
    entry = RECIPES.get(recipe)
    lines = [f"recipe {recipe}: {entry.summary} ({entry.paper}); {len(stages)} stages, each "
             "from the previous stage's best checkpoint"]
    for stage, status in zip(stages, statuses, strict=True):
        task = "" if stage.task == stage.name else f" ({stage.task})"
        lines.append(f"stage {stage.index} {stage.name}{task}: {_status_text(status)}")
        lines += _stage_lines(stage)
    return "\n".join(lines)


def run_stages(stages: Sequence[Stage], *, progress: bool = True,
               echo: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Trains the stages in order, reusing finished ones and resuming unfinished ones, and
    returns each stage's results (its ``final.json``)."""
    statuses = check_stages(stages)
    results = []
    for stage, status in zip(stages, statuses, strict=True):
        if status.state == "done":
            echo(f"stage {stage.index} ({stage.name}): done, reused from {stage.workdir}")
            results.append(status.final)
            continue
        echo(f"stage {stage.index} ({stage.name}): training in {stage.workdir}")
        result = run(stage.config, stage.workdir, progress=progress)
        echo(f"stage {stage.index} ({stage.name}): {summary_line(result)}")
        results.append(result)
    return results
