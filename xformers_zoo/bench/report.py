"""What every benchmark writes beside its figures: the machine it ran on, and the results as
JSON and Markdown."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name (Linux), else the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict:
    """The host and its load, written beside every data-layer figure."""
    return {"host": platform.node(), "cpu": cpu_model(), "cores": os.cpu_count(),
            "python": platform.python_version(),
            # other work on the machine slows every number down
            "load_average_at_start": os.getloadavg()[0]}


def write_results(result: dict, out: Path, markdown: Callable[[dict, Path], None]) -> None:
    """Writes ``result`` to ``out``.json and, through ``markdown(result, path)``, ``out``.md."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    markdown(result, out.with_suffix(".md"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
