"""TensorBoard event files beside a run's ``metrics.jsonl``, through tensorboardX (no
TensorFlow; the ``tensorboard`` extra), so that ``tensorboard --logdir runs/`` shows every run.

Enabled whenever tensorboardX is importable; ``XFORMERS_ZOO_TENSORBOARD=0`` turns it off. Each
numeric field of a metrics record becomes the scalar ``<split>/<field>`` at its step. A resumed
run purges the events after its restored step, as ``metrics.jsonl`` drops its records.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger("xformers_zoo.train")

NOT_SCALARS = {"step", "time"}


def tensorboard_enabled() -> bool:
    """Whether event files are written: tensorboardX importable and not turned off."""
    if os.environ.get("XFORMERS_ZOO_TENSORBOARD", "1").lower() in ("0", "false", "no"):
        return False
    try:
        import tensorboardX  # noqa: F401
    except ImportError:
        return False
    return True


class EventWriter:
    """Scalars of metrics records into event files in ``logdir``."""

    def __init__(self, logdir: str | Path, resume_step: int | None):
        from tensorboardX import SummaryWriter

        # purge_step: events at or after it, left by the interrupted process, are hidden
        self._writer = SummaryWriter(logdir=str(logdir), purge_step=(
            None if resume_step is None else resume_step + 1), flush_secs=30)

    def write(self, split: str, step: int, values: dict[str, Any]) -> None:
        """Adds every numeric, finite-or-not value of a record as ``split/name``."""
        for name, value in values.items():
            if name in NOT_SCALARS or isinstance(value, bool) or not isinstance(
                    value, int | float):
                continue
            self._writer.add_scalar(f"{split}/{name}", value, global_step=step)

    def close(self) -> None:
        """Flushes and closes the event file."""
        self._writer.close()


def open_event_writer(logdir: str | Path, resume_step: int | None) -> EventWriter | None:
    """An EventWriter when TensorBoard output is enabled, else None."""
    if not tensorboard_enabled():
        return None
    try:
        return EventWriter(logdir, resume_step)
    except OSError as e:  # a read-only or full disk must not stop training
        log.warning("no TensorBoard events for %s: %s", logdir, e)
        return None
