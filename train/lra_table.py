"""The LRA accuracy table of a sweep directory: variants x tasks, test accuracy on each run's
best-validation checkpoint (its ``final.json``), mean and standard deviation over seeds, the
average over the LRA tasks, and the published number beside each cell
(``configs/published_lra.py``).

A run directory is any folder under the sweep holding a ``config.json``. One without a complete
``final.json`` for its configured steps (running, killed, failed, or a file cut short) is left
out and named in the table's notes; it never stops the table. Tasks that read user-supplied
archives (Text, Retrieval, Image) show, when they have no run, the command that trains them.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from xformers_zoo.configs.published_lra import FLASH_SOURCE, LRA_SOURCE, LRA_TASKS, published
from xformers_zoo.train.sweep_cells import read_final, task_needs_manual_data

# What data.manual_dir must hold for each task that reads user-supplied files.
MANUAL_FILES = {"text": "aclImdb_v1.tar.gz", "retrieval": "tsv_data",
                "image": "cifar-10-python.tar.gz"}


def find_runs(root: Path) -> list[Path]:
    """Run directories (holding ``config.json``) under ``root``, skipping hidden folders and
    checkpoint folders."""
    return sorted(p.parent for p in root.rglob("config.json")
                  if not any(part.startswith(".") or part in ("checkpoints", "best")
                             for part in p.relative_to(root).parts[:-1]))


def planned_cells(root: Path) -> list[dict[str, Any]]:
    """The cells named in the sweep's manifest (``sweep.json``), if it has a readable one."""
    try:
        return list(json.loads((root / "sweep.json").read_text())["cells"])
    except (OSError, ValueError, KeyError, TypeError):
        return []


def collect(root: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """(finished runs, notes on the run directories left out). Each run: name, task, variant,
    seed, test accuracy %, steps/s, peak memory and its directory. Cells of the sweep's manifest
    that have no run directory yet are noted too."""
    runs, ignored = [], []
    found = find_runs(root)
    for cell in planned_cells(root):
        if root / cell["name"] not in found:
            ignored.append(f"{cell['name']}: no run yet (not started, or failed before writing "
                           "config.json; see its train.log)")
    for workdir in found:
        name = str(workdir.relative_to(root))
        try:
            config = json.loads((workdir / "config.json").read_text())
            task, variant = config["data"]["task"], config["model"]["variant"]
            seed, steps = config["train"]["seed"], config["train"]["steps"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            ignored.append(f"{name}: unreadable config.json ({e})")
            continue
        final = read_final(workdir)
        if final is None:
            why = "no final.json" if not (workdir / "final.json").exists() else (
                "final.json incomplete or unreadable")
            ignored.append(f"{name}: {why} (unfinished or failed)")
            continue
        if int(final["steps"]) < steps:
            ignored.append(f"{name}: final.json at step {final['steps']} of {steps}")
            continue
        runs.append({"name": name, "task": task, "variant": variant, "seed": seed,
                     "test_accuracy": 100 * final["test_accuracy"],
                     "best_val_accuracy": 100 * final["best_val_accuracy"],
                     "steps_per_sec": final.get("steps_per_sec"),
                     "peak_memory_bytes": final.get("peak_memory_bytes"),
                     "device_kind": final.get("device_kind"), "dir": str(workdir)})
    return runs, ignored


def _stats(values: list[float]) -> dict[str, Any]:
    return {"mean": statistics.fmean(values), "n": len(values),
            "std": statistics.stdev(values) if len(values) > 1 else None}


def _variant_order(variant: str) -> tuple[int, str]:
    return ({"full": 0, "flash": 1}.get(variant, 2), variant)


def build_table(runs: list[dict[str, Any]], ignored: Iterable[str] = (),
                sweep_dir: str = "runs/lra") -> dict[str, Any]:
    """The table as JSON-ready data: tasks (columns), one row per variant with per-task stats
    and the published number, the average, the runs left out and commands for missing data."""
    extra = sorted({r["task"] for r in runs} - set(LRA_TASKS))
    tasks = [*LRA_TASKS, *extra]
    variants = sorted({r["variant"] for r in runs}, key=_variant_order)
    rows = []
    for variant in variants:
        cells = {}
        for task in tasks:
            mine = [r for r in runs if r["variant"] == variant and r["task"] == task]
            cell: dict[str, Any] = {"paper": published(variant, task)}
            if mine:
                cell.update(_stats([r["test_accuracy"] for r in mine]))
                cell["seeds"] = sorted(r["seed"] for r in mine)
                cell["runs"] = [r["name"] for r in mine]
            cells[task] = cell
        done = [t for t in LRA_TASKS if "mean" in cells[t]]
        paper = [cells[t]["paper"] for t in done]
        rows.append({"variant": variant, "cells": cells, "average": {
            "tasks": done, "mean": statistics.fmean(cells[t]["mean"] for t in done)
            if done else None,
            "paper": statistics.fmean(paper) if done and None not in paper else None}})
    names = " ".join(variants) or "full"
    needs_data = {
        task: f"xformers-zoo sweep --tasks {task} --models {names} --preset lra --dir "
              f"{sweep_dir} data.manual_dir=/path/holding/{MANUAL_FILES.get(task, 'files')}"
        for task in tasks
        if task_needs_manual_data(task) and not any(r["task"] == task for r in runs)}
    return {"sources": [LRA_SOURCE, FLASH_SOURCE], "tasks": tasks, "rows": rows,
            "ignored": list(ignored), "needs_data": needs_data}


def _fmt(cell: dict[str, Any], needs_data: bool) -> str:
    paper = "-" if cell["paper"] is None else f"{cell['paper']:.2f}"
    if "mean" not in cell:
        return "needs data.manual_dir" if needs_data else f"- / {paper}"
    spread = "" if cell["std"] is None else f" ± {cell['std']:.2f}"
    return f"{cell['mean']:.2f}{spread} (n={cell['n']}) / {paper}"


def markdown(table: dict[str, Any]) -> str:
    """The table in Markdown, with its legend, the runs left out and the missing-data commands."""
    tasks = table["tasks"]
    lines = ["| variant | " + " | ".join(tasks) + " | average |",
             "|---|" + "---:|" * (len(tasks) + 1)]
    for row in table["rows"]:
        cells = [_fmt(row["cells"][t], t in table["needs_data"]) for t in tasks]
        avg = row["average"]
        if avg["mean"] is None:
            cells.append("-")
        else:
            paper = "-" if avg["paper"] is None else f"{avg['paper']:.2f}"
            cells.append(f"{avg['mean']:.2f} / {paper} ({len(avg['tasks'])} of "
                         f"{len(LRA_TASKS)} tasks)")
        lines.append(f"| {row['variant']} | " + " | ".join(cells) + " |")
    lines += ["", "Test accuracy % on the best-validation checkpoint: mean ± standard deviation "
              "over seeds (n runs) / published. Published: " + "; ".join(table["sources"])
              + " (FlashAttention's where LRA has no row). The average is over the LRA tasks "
              "run, the published one over the same tasks."]
    if table["needs_data"]:
        lines += ["", "Tasks without runs that need the official files in data.manual_dir:"]
        lines += [f"- {task}: `{command}`" for task, command in table["needs_data"].items()]
    if table["ignored"]:
        lines += ["", "Run directories left out:"] + [f"- {note}" for note in table["ignored"]]
    return "\n".join(lines) + "\n"


def to_csv(table: dict[str, Any]) -> str:
    """One line per variant and task: mean, std, runs, seeds and the published number."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["variant", "task", "mean", "std", "n", "seeds", "paper"])
    for row in table["rows"]:
        for task in table["tasks"]:
            c = row["cells"][task]
            writer.writerow([row["variant"], task, c.get("mean"), c.get("std"), c.get("n", 0),
                             " ".join(map(str, c.get("seeds", []))), c["paper"]])
    return out.getvalue()


def write_outputs(table: dict[str, Any], prefix: Path) -> list[Path]:
    """``prefix``.md, .csv and .json; returns the paths."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    paths = [prefix.with_suffix(s) for s in (".md", ".csv", ".json")]
    paths[0].write_text(markdown(table))
    paths[1].write_text(to_csv(table))
    paths[2].write_text(json.dumps(table, indent=2) + "\n")
    return paths


def is_sweep_dir(paths: list[str]) -> bool:
    """Whether the ``table`` arguments name one folder of runs rather than runs themselves."""
    return (len(paths) == 1 and Path(paths[0]).is_dir()
            and not (Path(paths[0]) / "config.json").exists()
            and not (Path(paths[0]) / "final.json").exists())


def table_command(args) -> int:
    """``xformers-zoo table SWEEP_DIR [--out PREFIX] [--curves DIR] [--speed JSON --chart
    PNG]``: prints the table and writes what the options ask for."""
    root = Path(args.runs[0])
    runs, ignored = collect(root)
    table = build_table(runs, ignored, sweep_dir=str(root))
    print(markdown(table), end="")
    if args.out:
        print("wrote " + ", ".join(map(str, write_outputs(table, Path(args.out)))))
    if args.curves:
        from xformers_zoo.train.lra_plots import learning_curves

        print("wrote " + ", ".join(map(str, learning_curves(runs, Path(args.curves)))))
    if args.chart:
        from xformers_zoo.train.lra_plots import lra_chart

        if not args.speed:
            raise ValueError("--chart needs --speed, the JSON written by xformers-zoo bench speed")
        speed = json.loads(Path(args.speed).read_text())
        print(f"wrote {lra_chart(table, speed, args.chart_length, Path(args.chart))}")
    return 0
