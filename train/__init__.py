"""The trainer: optax optimisation, jitted steps, orbax checkpoints, metrics and benchmarks."""

from xformers_zoo.train.loop import (
    RunDirectoryMismatchError,
    TrainingDivergedError,
    evaluate_run,
    run,
)

__all__ = [
    "RunDirectoryMismatchError",
    "TrainingDivergedError",
    "evaluate_run",
    "run",
]
