"""Markdown tables of finished runs (their ``final.json``), side by side."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

COLUMNS = [
    ("task", "task", "{}"), ("variant", "variant", "{}"),
    ("test acc %", "test_accuracy", "{:.2f}"), ("majority %", "majority_rate", "{:.2f}"),
    ("best val %", "best_val_accuracy", "{:.2f}"), ("steps", "steps", "{}"),
    ("steps/s", "steps_per_sec", "{:.2f}"), ("peak GiB", "peak_memory_bytes", "{:.2f}"),
    ("params M", "params", "{:.3f}"), ("device", "device_kind", "{}"),
]
log = logging.getLogger("xformers_zoo.train")
_SCALE = {"test_accuracy": 100, "majority_rate": 100, "best_val_accuracy": 100,
          "peak_memory_bytes": 2.0**-30, "params": 1e-6}


def load_results(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """``final.json`` records from files or run directories; one that is not valid JSON (cut
    short while being copied, say) is skipped with a warning naming it."""
    out = []
    for path in map(Path, paths):
        path = path / "final.json" if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"no final.json at {path}")
        try:
            out.append(json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            log.warning("skipping %s: not valid JSON (%s); is it complete?", path, e)
    return out


def markdown_table(results: list[dict[str, Any]]) -> str:
    """One row per run; a missing value shows as a dash."""
    lines = ["| " + " | ".join(c[0] for c in COLUMNS) + " |",
             "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for r in sorted(results, key=lambda r: (r.get("task", ""), r.get("variant", ""))):
        cells = []
        for _, key, fmt in COLUMNS:
            value = r.get(key)
            if value is None:
                cells.append("-")
                continue
            cells.append(fmt.format(value * _SCALE[key] if key in _SCALE else value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_line(result: dict[str, Any]) -> str:
    """One line of a finished run's ``final.json``: test accuracy beside the majority rate,
    and the best validation step (masked-token accuracy for a self-pretraining run)."""
    masked = result.get("objective") == "masked"
    what, base = ("masked-token accuracy", "most frequent token") if masked else (
        "accuracy", "majority class")
    return (f"test {what} {100 * result['test_accuracy']:.2f}% on {result['test_examples']} "
            f"{'tokens' if masked else 'examples'} ({base} {100 * result['majority_rate']:.2f}%),"
            f" best validation {100 * result['best_val_accuracy']:.2f}% at step "
            f"{result['best_step']}")
