"""Task metadata: what a model and the trainer need to know about an LRA task, so that neither
has per-task code. Data builders and base configs register against these names."""

from __future__ import annotations

import dataclasses

from xformers_zoo.registry import Registry


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """An LRA task.

    Attributes:
      name: registry name ("listops", "pathfinder32", ...).
      max_length: tokens per input sequence.
      vocab_size: token ids are in [0, vocab_size).
      num_classes: number of labels.
      pooling: default pooling ("cls" or "mean").
      positional: default positional encoding.
      two_inputs: examples hold two sequences (Retrieval), classified by a dual encoder.
      image_shape: (height, width) for image tasks, flattened row by row.
      has_padding: sequences are padded (id 0 = pad); image tasks have no padding since pixel
        value 0 is a real token.
      description: one line for listings.
    """

    name: str
    max_length: int
    vocab_size: int
    num_classes: int
    pooling: str = "cls"
    positional: str = "sinusoidal"
    two_inputs: bool = False
    image_shape: tuple[int, int] | None = None
    has_padding: bool = True
    description: str = ""


TASKS: Registry[TaskSpec] = Registry("task")

# Vocabulary and sizes follow the LRA paper (Tay et al. 2020); see shared LRA facts.
TASKS.register("listops", TaskSpec(
    name="listops", max_length=2000, vocab_size=16, num_classes=10, pooling="cls",
    description="nested MIN/MAX/MED/SM expressions, 10-way (Nangia & Bowman 2018)"))
