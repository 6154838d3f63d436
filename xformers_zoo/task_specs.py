"""What a model, the data layer and the trainer need to know about a task, so that none of them
has per-task code: ``TaskSpec`` and the two registries a task is entered in, ``TASKS`` (its facts)
and ``TASK_CONFIGS`` (its base experiment config), both filled by ``@register_task`` on the
function that builds the base config (configs/lra_tasks.py)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

from xformers_zoo.registry import Registry

if TYPE_CHECKING:
    from xformers_zoo.configs.base import ExperimentConfig


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """A task's facts, written once: everything else reads them from here.

    Attributes:
      name: registry name ("listops", "pathfinder32", ...).
      max_length: tokens per input sequence.
      vocab_size: token ids are in [0, vocab_size).
      num_classes: number of labels.
      two_inputs: examples hold two sequences (Retrieval), classified by a dual encoder.
      image_shape: (height, width) for image tasks, flattened row by row.
      has_padding: sequences are padded (id 0 = pad); image tasks have no padding since pixel
        value 0 is a real token.
      description: one line for listings.
      min_length: the shortest ``data.max_length`` the task's data can be made at.
      split_sizes: train / validation / test examples of the published data set, for tasks
        whose data is generated (None where the official files fix them).
      family: tasks made by one data source at several sizes share it ("pathfinder").
    """

    name: str
    max_length: int
    vocab_size: int
    num_classes: int
    two_inputs: bool = False
    image_shape: tuple[int, int] | None = None
    has_padding: bool = True
    description: str = ""
    min_length: int = 1
    split_sizes: tuple[int, int, int] | None = None
    family: str = ""


TASKS: Registry[TaskSpec] = Registry("task")
TASK_CONFIGS: Registry[Callable[[], ExperimentConfig]] = Registry("task config")


def register_task(spec: TaskSpec) -> Callable[[Callable[[TaskSpec], ExperimentConfig]],
                                              Callable[[TaskSpec], ExperimentConfig]]:
    """Decorator on ``base_config(spec) -> ExperimentConfig``: enters ``spec`` in ``TASKS`` and
    the base config (called with ``spec``) in ``TASK_CONFIGS``, both under ``spec.name``."""

    def wrap(base_config: Callable[[TaskSpec], ExperimentConfig]):
        TASKS.register(spec.name, spec)
        TASK_CONFIGS.register(spec.name, functools.partial(base_config, spec))
        return base_config

    return wrap


def tasks_of_family(family: str) -> dict[str, TaskSpec]:
    """The registered tasks of ``family`` (e.g. the Pathfinder sizes), by name."""
    return {name: spec for name, spec in TASKS.items() if spec.family == family}
