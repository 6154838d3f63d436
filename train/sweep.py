"""``xformers-zoo sweep``: trains a grid of tasks x variants x seeds, one run directory per cell.

    xformers-zoo sweep --tasks listops pathfinder32 --models full performer --preset lra \\
        --seeds 0 1 --dir runs/lra --parallel 4 [overrides]

Each cell is ``xformers-zoo train`` in its own process, in ``<dir>/<task>-<variant>-seed<s>``
with its output in ``train.log`` there. Rerunning the command skips finished cells (a valid
``final.json`` for the configured steps) and resumes the others from their checkpoints.
``--parallel K`` runs K cells at once on each GPU (each with 0.9/K of its memory); several
GPUs share the cells round-robin, one GPU a cell. ``--gpus-per-cell N`` gives each cell N GPUs
instead (it trains data parallel over them, ``train.batch_size`` split between them). A
failed cell is reported with its exit code and the end of its log; the others go on, and the
exit status is 1 unless every cell finished. ``--stop-after S`` stops the running cells after
S seconds (for machines lent by the hour; they resume from their last checkpoint on the next
run of the command, so keep ``train.checkpoint_every`` short) with exit status 3 when nothing
failed. Text, Retrieval and Image cells without ``data.manual_dir`` are reported, not run.
``--dry-run`` prints the cells and the time the sweep would take, from a short timed probe of
each cell.

Overrides (``section.field=value``) apply to every cell, or with a prefix to one task's or one
variant's cells: ``listops:train.steps=2000``, ``performer:model.attention.num_features=128``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from xformers_zoo.overrides import ConfigError
from xformers_zoo.registry import UnknownNameError
from xformers_zoo.train.sweep_cells import (
    Cell,
    is_finished,
    latest_progress,
    make_cells,
    needs_manual_data,
    read_final,
)
from xformers_zoo.train.sweep_plan import dry_run
from xformers_zoo.train.sweep_runner import Job, detect_gpus, gpu_groups, run_jobs

MANIFEST = "sweep.json"


def build_parser() -> argparse.ArgumentParser:
    """The sweep's arguments."""
    p = argparse.ArgumentParser(prog="xformers-zoo sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", required=True)
    p.add_argument("--models", nargs="+", required=True, help="variants, or 'all'")
    p.add_argument("--seeds", nargs="+", default=["0"], help="train.seed of each run")
    p.add_argument("--preset", action="append", default=[], help="e.g. lra, tiny (repeatable)")
    p.add_argument("--dir", default="runs/sweep", help="the sweep directory")
    p.add_argument("--parallel", type=int, default=1, help="cells at once per GPU")
    p.add_argument("--gpus", default="auto",
                   help="auto (CUDA_VISIBLE_DEVICES, else nvidia-smi -L), a count, or ids 0,2")
    p.add_argument("--gpus-per-cell", type=int, default=1,
                   help="GPUs each cell trains on, data parallel (must divide the GPUs)")
    p.add_argument("--dry-run", action="store_true", help="probe each cell and estimate time")
    p.add_argument("--probe-steps", type=int, default=10, help="dry run: timed steps per cell")
    p.add_argument("--probe-seconds", type=float, default=5.0,
                   help="dry run: timed seconds per cell at the least")
    p.add_argument("--status-every", type=float, default=60.0,
                   help="seconds between progress lines")
    p.add_argument("--stop-after", type=float,
                   help="seconds: then stop the running cells (they resume on the next run of "
                        "the command) and start no more; exit status 3")
    p.add_argument("overrides", nargs="*", help="[task:|variant:]section.field=value")
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Arguments, with overrides allowed anywhere (the list options would swallow them)."""
    args = build_parser().parse_args(argv)
    for name in ("tasks", "models", "seeds"):
        values = getattr(args, name)
        args.overrides += [v for v in values if "=" in v]
        setattr(args, name, [v for v in values if "=" not in v])
    if not args.tasks or not args.models:
        raise ConfigError("--tasks and --models each need at least one name")
    try:
        args.seeds = [int(s) for s in args.seeds]
    except ValueError:
        raise ConfigError(f"--seeds takes integers, got {args.seeds}") from None
    if args.parallel < 1:
        raise ConfigError(f"--parallel takes 1 or more, got {args.parallel}")
    if args.models == ["all"]:
        from xformers_zoo.variants import VARIANTS

        args.models = VARIANTS.names()
    return args


def describe_progress(cell: Cell, total: int):
    """A function giving a cell's compact progress line from its metrics.jsonl."""

    def describe(job: Job) -> str:
        final = read_final(cell.workdir)
        if final is not None:
            return (f"test {100 * final['test_accuracy']:.2f}% (best val "
                    f"{100 * final['best_val_accuracy']:.2f}% at step {final['best_step']})")
        p = latest_progress(cell.workdir)
        step, rate = p.get("step"), p.get("steps_per_sec")
        if step is None:
            return "starting (building data or compiling)"
        line = f"step {step}/{total} ({100 * step / total:.0f}%)"
        if rate:
            line += f" {rate:.1f} steps/s, eta {(total - step) / rate / 60:.1f} min"
        if p.get("val_accuracy") is not None:
            line += f", val {100 * p['val_accuracy']:.2f}%"
        return line

    return describe


def prepare_jobs(cells: list[tuple[Cell, object]], sweep_dir: Path) -> dict[object, Job]:
    """One ``data prepare`` per distinct data config, so that cells sharing a data set do not
    build it at the same time."""
    jobs: dict[object, Job] = {}
    for cell, config in cells:
        if config.data in jobs:
            continue
        data_overrides = [o for o in cell.overrides if o.startswith("data.")]
        # overrides before the options: argparse takes the positionals as one run
        command = [sys.executable, "-m", "xformers_zoo", "data", "prepare", cell.task,
                   *data_overrides, *(a for p in cell.presets for a in ("--preset", p))]
        jobs[config.data] = Job(f"data {cell.task} #{len(jobs)}", command,
                                sweep_dir / "logs" / f"prepare-{cell.task}-{len(jobs)}.log")
    return jobs


def write_manifest(sweep_dir: Path, command: str, cells: list[Cell]) -> None:
    """Adds the cells and the command to ``sweep.json`` (a sweep directory may gather the cells
    of several commands; the table lists every cell named there)."""
    path = sweep_dir / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        manifest = {"commands": [], "cells": []}
    known = {c["name"]: c for c in manifest.get("cells", [])}
    for c in cells:
        known[c.name] = {"name": c.name, "task": c.task, "variant": c.variant, "seed": c.seed,
                         "command": c.train_command()[1:]}
    manifest = {"commands": [*manifest.get("commands", []), {
        "command": command, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}],
        "cells": list(known.values())}
    sweep_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    """Runs (or, with --dry-run, estimates) the sweep; 0 when every cell has finished."""
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        args = parse_args(argv)
        sweep_dir = Path(args.dir)
        cells = make_cells(sweep_dir, args.tasks, args.models, args.seeds, args.preset,
                           args.overrides)
    except (ConfigError, UnknownNameError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    status: dict[str, str] = {}
    todo: list[tuple[Cell, object]] = []
    for cell in cells:
        try:
            config = cell.config()
        except (ValueError, UnknownNameError) as e:  # ConfigError is a ValueError
            status[cell.name] = f"config error: {e}"
            continue
        if is_finished(cell, config):
            status[cell.name] = "finished"
        elif needs_manual_data(config):
            status[cell.name] = (f"needs data.manual_dir (add {cell.task}:data.manual_dir="
                                 "/path/to/the/archives to the command)")
        else:
            status[cell.name] = "to run"
            todo.append((cell, config))
    print(f"{len(cells)} cells in {sweep_dir}:")
    for cell in cells:
        print(f"  {cell.name:<40} {status[cell.name]}")
    try:
        gpus = gpu_groups(detect_gpus(args.gpus), args.gpus_per_cell)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        return dry_run([c for c, _ in todo], sweep_dir, gpus, args.parallel, args.probe_steps,
                       args.probe_seconds)
    write_manifest(sweep_dir, "xformers-zoo sweep " + " ".join(argv), cells)
    deadline = None if args.stop_after is None else time.monotonic() + args.stop_after
    prepared = prepare_jobs(todo, sweep_dir)
    # one at a time: each build uses every core
    run_jobs(list(prepared.values()), [], 1, deadline=deadline)
    jobs, describers = [], {}
    for cell, config in todo:
        prep = prepared[config.data]
        if prep.returncode is None:
            status[cell.name] = "stopped: time limit reached while preparing its data"
            continue
        if prep.returncode != 0:
            status[cell.name] = f"failed: data prepare exit code {prep.returncode} ({prep.log})"
            continue
        jobs.append(Job(cell.name, cell.train_command(), cell.workdir / "train.log"))
        describers[cell.name] = describe_progress(cell, config.train.steps)
    where = ("CPU" if not gpus else f"GPU over GPUs {','.join(gpus)}" if args.gpus_per_cell == 1
             else f"group of {args.gpus_per_cell} GPUs over {' '.join(gpus)}")
    print(f"training {len(jobs)} cells, {args.parallel} at once per {where}", flush=True)
    for job in run_jobs(jobs, gpus, args.parallel,
                        describe=lambda job: describers[job.name](job),
                        status_every=args.status_every, deadline=deadline):
        status[job.name] = ("finished" if job.returncode == 0 else
                            "stopped: time limit reached (rerun to resume)"
                            if job.returncode is None else
                            f"failed: exit code {job.returncode} (log {job.log})")
    code = summarize(cells, status)
    outcomes = {s.split(":")[0] for s in status.values()}
    return 3 if code and "stopped" in outcomes and not outcomes & {"failed", "config error"} \
        else code


def summarize(cells: list[Cell], status: dict[str, str]) -> int:
    """Prints each cell's outcome; 0 when every cell has finished, else 1."""
    print("\nsummary:")
    for cell in cells:
        final = read_final(cell.workdir) if status[cell.name] == "finished" else None
        outcome = (f"test {100 * final['test_accuracy']:.2f}%, best val "
                   f"{100 * final['best_val_accuracy']:.2f}%" if final else status[cell.name])
        print(f"  {cell.name:<40} {outcome}")
    unfinished = [c.name for c in cells if status[c.name] != "finished"]
    if unfinished:
        print(f"{len(unfinished)} of {len(cells)} cells not finished: {', '.join(unfinished)}")
        return 1
    print(f"all {len(cells)} cells finished")
    return 0


if __name__ == "__main__":
    sys.exit(main())
