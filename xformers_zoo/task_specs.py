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
      two_inputs: examples hold two sequences (Retrieval), classified by a dual encoder.
      image_shape: (height, width) for image tasks, flattened row by row.
      has_padding: sequences are padded (id 0 = pad); image tasks have no padding since pixel
        value 0 is a real token.
      min_length: the shortest ``data.max_length`` the task's data can be made at.
      description: one line for listings.
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


TASKS: Registry[TaskSpec] = Registry("task")

# Vocabulary and sizes follow the LRA paper (Tay et al. 2020); see shared LRA facts.
TASKS.register("listops", TaskSpec(
    name="listops", max_length=2000, vocab_size=16, num_classes=10, min_length=8,
    description="nested MIN/MAX/MED/SM expressions, 10-way (Nangia & Bowman 2018)"))
TASKS.register("text", TaskSpec(
    name="text", max_length=1000, vocab_size=257, num_classes=2,
    description="byte-level IMDb sentiment (id = byte + 1, 0 = pad; Maas et al. 2011)"))
TASKS.register("retrieval", TaskSpec(
    name="retrieval", max_length=4000, vocab_size=257, num_classes=2,
    two_inputs=True,
    description="byte-level AAN citation matching of two papers, dual encoder (Radev et al. 2013)"))
TASKS.register("image", TaskSpec(
    name="image", max_length=1024, vocab_size=256, num_classes=10,
    image_shape=(32, 32), has_padding=False,
    description="greyscale CIFAR-10, pixel values as tokens (Krizhevsky 2009)"))

# Pathfinder (Linsley et al. 2018): pixel values as tokens. Pooling and positions live in the
# task base configs (configs/lra_tasks.py).
for _name, _side, _what in (
        ("pathfinder32", 32, "Pathfinder 32x32"),
        ("pathfinder64", 64, "Pathfinder 64x64"),
        ("pathx", 128, "Path-X, Pathfinder 128x128"),
        ("path256", 256, "Path-256, Pathfinder 256x256")):
    TASKS.register(_name, TaskSpec(
        name=_name, max_length=_side * _side, vocab_size=256, num_classes=2,
        image_shape=(_side, _side), has_padding=False,
        description=f"{_what}: are the two marked dots on one dashed contour?"))
