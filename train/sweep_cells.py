"""The cells of a sweep: one (task, variant, seed) run each, its run directory, its resolved
config, whether it has finished, and the command line that trains it.

Overrides apply to every cell (``train.steps=100``) or to the cells of one task or one variant
(``listops:train.steps=100``, ``performer:model.attention.num_features=128``).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from xformers_zoo.configs import ExperimentConfig, resolve_config
from xformers_zoo.overrides import parse_assignments, parse_scoped
from xformers_zoo.task_specs import TASK_CONFIGS, TASKS
from xformers_zoo.train.metrics import read_metrics_lenient
from xformers_zoo.variants import VARIANTS

FINAL_KEYS = ("test_accuracy", "steps", "best_val_accuracy")


@dataclasses.dataclass(frozen=True)
class Cell:
    """One run of a sweep: ``variant`` trained on ``task`` with ``seed`` in ``workdir``."""

    task: str
    variant: str
    seed: int
    presets: tuple[str, ...]
    overrides: tuple[str, ...]  # section.field=value, already narrowed to this cell
    workdir: Path

    @property
    def name(self) -> str:
        """The run directory's name: ``<task>-<variant>-seed<seed>``."""
        return self.workdir.name

    def config(self) -> ExperimentConfig:
        """The resolved config (raises ConfigError/ValueError on a bad override)."""
        overrides = parse_assignments(self.overrides)
        return resolve_config(self.task, self.variant, presets=self.presets, overrides=overrides)

    def train_command(self) -> list[str]:
        """The ``xformers-zoo train`` command line of this cell, run by the current Python."""
        return [sys.executable, "-m", "xformers_zoo", "train", "--task", self.task,
                "--model", self.variant, *(a for p in self.presets for a in ("--preset", p)),
                "--workdir", str(self.workdir), "--no-progress", *self.overrides]


def split_scoped(items: Sequence[str]) -> list[tuple[str | None, str]]:
    """``[scope:]section.field=value`` items as (scope or None, assignment); a scope must name
    a registered task or variant."""
    return parse_scoped(items, {"task": TASKS.names(), "variant": VARIANTS.names()})


def make_cells(sweep_dir: Path, tasks: Sequence[str], variants: Sequence[str],
               seeds: Sequence[int], presets: Sequence[str], overrides: Sequence[str]
               ) -> list[Cell]:
    """The grid tasks x variants x seeds in that order, each cell with the overrides that
    apply to it and ``train.seed`` set to its seed."""
    for task in tasks:
        TASKS.get(task)
    for variant in variants:
        VARIANTS.get(variant)
    scoped = split_scoped(overrides)
    return [Cell(task, variant, seed, tuple(presets),
                 (*(a for s, a in scoped if s in (None, task, variant)), f"train.seed={seed}"),
                 sweep_dir / f"{task}-{variant}-seed{seed}")
            for task in tasks for variant in variants for seed in seeds]


def read_final(workdir: Path) -> dict[str, Any] | None:
    """A run directory's ``final.json`` if it is complete JSON holding the results; None if
    it is missing, cut short or lacks a result field."""
    path = workdir / "final.json"
    try:
        final = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(final, dict) or any(final.get(k) is None for k in FINAL_KEYS):
        return None
    return final


def is_finished(cell: Cell, config: ExperimentConfig) -> bool:
    """Whether the cell's run holds a valid ``final.json`` for all of its configured steps."""
    final = read_final(cell.workdir)
    return final is not None and int(final["steps"]) >= config.train.steps


def needs_manual_data(config: ExperimentConfig) -> bool:
    """Whether the config reads files a user must supply (Text, Retrieval, Image: the official
    archives) and names no ``data.manual_dir``."""
    return config.data.source == "official" and config.data.manual_dir is None


def task_needs_manual_data(task: str) -> bool:
    """Whether the task's base config reads user-supplied files."""
    return TASK_CONFIGS.get(task)().data.source == "official"


def latest_progress(workdir: Path) -> dict[str, Any]:
    """The last train step, its steps/s and the latest validation accuracy recorded in a run's
    ``metrics.jsonl`` (empty when there is none yet; a line cut short is skipped)."""
    out: dict[str, Any] = {}
    for record in read_metrics_lenient(workdir / "metrics.jsonl"):
        if record.get("split") == "train":
            out["step"] = record.get("step")
            out["steps_per_sec"] = record.get("steps_per_sec")
        elif record.get("split") == "validation":
            out["val_accuracy"] = record.get("accuracy")
    return out
