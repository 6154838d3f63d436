"""Per-run metrics as JSON lines (one record per log, eval or test event)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from xformers_zoo.train.tensorboard import open_event_writer


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic | np.ndarray):
        return value.item() if np.ndim(value) == 0 else value.tolist()
    return value


class MetricsLog:
    """Appends records to ``metrics.jsonl``; on resume, records after the restored step (and
    test records) are dropped so that the file reads as one uninterrupted run. An inactive log
    (every process of a multi-process run but the first) writes nothing."""

    def __init__(self, path: str | Path, resume_step: int | None, active: bool = True):
        self.path = Path(path)
        self._file = self._events = None
        if not active:
            return
        if self.path.exists():
            keep = []
            if resume_step is not None:
                for line in self.path.read_text().splitlines():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut short by a crash
                    # A test record comes from a run killed before it wrote final.json.
                    if record.get("step", 0) <= resume_step and record.get("split") != "test":
                        keep.append(line)
            self.path.write_text("".join(f"{line}\n" for line in keep))
        self._file = self.path.open("a")
        # TensorBoard events beside the file when tensorboardX is installed (train/tensorboard.py)
        self._events = open_event_writer(self.path.parent, resume_step)

    def write(self, split: str, step: int, **values: Any) -> None:
        """Appends one record and flushes it."""
        if self._file is None:
            return
        record = {"split": split, "step": int(step), "time": time.time()}
        record.update({k: _plain(v) for k, v in values.items()})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._events is not None:
            self._events.write(split, int(step), record)

    def close(self) -> None:
        """Closes the file (and the event file)."""
        if self._file is not None:
            self._file.close()
        if self._events is not None:
            self._events.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl``."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def read_metrics_lenient(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` that may be in use or cut short by a kill: a missing
    file reads as none, a line that is not complete JSON is skipped."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out
