"""Data sources: how each task's examples are produced, registered by task name.

A source yields ``(key, example)`` pairs per split; an example is
``{"inputs": int array [length], "label": int}`` plus ``"inputs2"`` for two-sequence tasks.
``build_name`` says which settings change the content, and ``inputs`` which files it is read
from, so that each distinct data set is built once under its own name (with a fingerprint of
those files) and reused afterwards, and a changed file is read anew.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np

from xformers_zoo.configs.base import DataConfig
from xformers_zoo.registry import Registry
from xformers_zoo.task_specs import TASKS

Example = dict[str, Any]
ExamplesFn = Callable[[str, DataConfig], Iterator[tuple[str, Example]]]
SPLITS = ("train", "validation", "test")


@dataclasses.dataclass(frozen=True)
class DataSource:
    """How one task's data set is made.

    Attributes:
      task: the task name this source serves.
      examples: ``(split, config) -> iterator of (key, example)``; keys are unique per split.
      build_name: ``config -> str`` naming the built data set (source, sizes, seed, length...).
      version: bumped whenever the content for the same build name changes.
      description: one line for listings.
      build_scope: optional ``config -> context manager`` held open around a whole build (all
        splits), for what the splits share, such as a pool of worker processes.
      inputs: optional ``config -> (root, files)``: the folder given by the user and the files
        under it that a build reads (None when the config generates its data). Locating them
        raises naming any that is missing.
    """

    task: str
    examples: ExamplesFn
    build_name: Callable[[DataConfig], str]
    version: str = "1.0.0"
    description: str = ""
    build_scope: Callable[[DataConfig], AbstractContextManager] | None = None
    inputs: Callable[[DataConfig], tuple[Path, Sequence[Path]] | None] | None = None

    @property
    def token_dtype(self) -> np.dtype:
        """The smallest unsigned dtype holding every token id of the task."""
        vocab = TASKS.get(self.task).vocab_size
        return np.dtype(np.uint8 if vocab <= 256 else np.uint16)


SOURCES: Registry[DataSource] = Registry("data source")


def register_source(
    *tasks: str,
    build_name: Callable[[DataConfig], str],
    version: str = "1.0.0",
    description: str = "",
    build_scope: Callable[[DataConfig], AbstractContextManager] | None = None,
    inputs: Callable[[DataConfig], tuple[Path, Sequence[Path]] | None] | None = None,
) -> Callable[[ExamplesFn], ExamplesFn]:
    """Decorator on a module's ``examples(split, config)``: registers it, with the rest of a
    ``DataSource`` (see there), as the source of each of ``tasks``."""

    def wrap(examples: ExamplesFn) -> ExamplesFn:
        for task in tasks:
            SOURCES.register(task, DataSource(
                task=task, examples=examples, build_name=build_name, version=version,
                description=description, build_scope=build_scope, inputs=inputs))
        return examples

    return wrap


def split_sizes(config: DataConfig) -> dict[str, int]:
    """Train / validation / test sizes from the config, falling back to the task's published
    ones (``TaskSpec.split_sizes``)."""
    sizes = (config.train_size, config.val_size, config.test_size)
    defaults = TASKS.get(config.task).split_sizes
    if defaults is None and None in sizes:
        raise ValueError(f"{config.task} has no published split sizes: set data.train_size, "
                         "data.val_size and data.test_size")
    out = {s: (d if n is None else n)
           for s, n, d in zip(SPLITS, sizes, defaults or sizes, strict=True)}
    for split, n in out.items():
        if n <= 0:
            raise ValueError(f"{split} size must be positive, got {n}")
    return out


def effective_length(config: DataConfig) -> int:
    """Tokens per sequence: ``data.max_length`` if set, else the task's LRA length."""
    return config.max_length or TASKS.get(config.task).max_length
