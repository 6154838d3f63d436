"""The dry run of a sweep: a timed probe of every cell still to train, then the estimated
steps/s, time per cell and time of the whole sweep at the requested parallelism."""

from __future__ import annotations

import heapq
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from xformers_zoo.train.sweep_cells import Cell, latest_progress
from xformers_zoo.train.sweep_runner import Job, run_jobs


def probe_job(cell: Cell, out: Path, steps: int, seconds: float, barrier: Path,
              group: int) -> Job:
    """The probe process of ``cell``, writing its rates to ``out``."""
    command = [sys.executable, "-m", "xformers_zoo.train.sweep_probe", "--task", cell.task,
               "--model", cell.variant, *(a for p in cell.presets for a in ("--preset", p)),
               "--steps", str(steps), "--seconds", str(seconds), "--out", str(out),
               "--barrier", str(barrier), "--group", str(group), *cell.overrides]
    return Job(cell.name, command, out.with_suffix(".log"))


def cell_seconds(probe: dict, done_steps: int) -> float:
    """Estimated seconds to finish a cell from its probe: the training steps left at the
    probed rate, plus its evaluations when the split sizes are known."""
    left = max(probe["train_steps"] - done_steps, 0)
    seconds = left / probe["steps_per_sec"]
    if probe.get("eval_batches_per_eval"):
        evals = left // probe["eval_every"] + 1
        seconds += (evals * probe["eval_batches_per_eval"] + probe["test_batches"]) * probe[
            "seconds_per_eval_batch"]
    return seconds


def makespan(durations: Sequence[float], slots: int) -> float:
    """Wall time of running ``durations`` on ``slots`` workers, longest first, each job to the
    first free worker (how the runner schedules, up to the order)."""
    finish = [0.0] * max(slots, 1)
    for d in sorted(durations, reverse=True):
        heapq.heapreplace(finish, finish[0] + d)
    return max(finish)


def _hours(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def dry_run(cells: Sequence[Cell], sweep_dir: Path, gpus: Sequence[str], per_gpu: int,
            steps: int, seconds: float) -> int:
    """Probes ``cells`` (as many at once on each GPU as the sweep would run) and prints the
    estimates. Returns 0, or 1 if a probe failed."""
    slots = max(len(gpus), 1) * per_gpu
    probe_dir = sweep_dir / ".probe"
    shutil.rmtree(probe_dir, ignore_errors=True)
    jobs: list[Job] = []
    for start in range(0, len(cells), slots):  # in waves, so that each wave shares the GPUs
        wave = cells[start:start + slots]
        barrier = probe_dir / f"barrier{start // slots}"
        wave_jobs = [probe_job(c, probe_dir / f"{c.name}.json", steps, seconds, barrier,
                               len(wave)) for c in wave]
        jobs += run_jobs(wave_jobs, gpus, per_gpu)
    rows, failed, durations = [], 0, []
    for cell, job in zip(cells, jobs, strict=True):
        path = probe_dir / f"{cell.name}.json"
        probe = json.loads(path.read_text()) if path.exists() else {
            "error": f"exit code {job.returncode}, see {job.log}"}
        if "error" in probe:
            failed += 1
            rows.append(f"| {cell.name} | - | - | - | probe failed: {probe['error'][:200]} |")
            continue
        done = latest_progress(cell.workdir).get("step") or 0
        estimate = cell_seconds(probe, done)
        durations.append(estimate)
        note = "" if probe.get("eval_batches_per_eval") else "evaluation time not included"
        rows.append(f"| {cell.name} | {probe['train_steps'] - done} | "
                    f"{probe['steps_per_sec']:.2f} | {_hours(estimate)} | {note} |")
    gpu_count = sum(len(group.split(",")) for group in gpus)  # a slot may hold several GPUs
    device = "cpu" if not gpus else f"{gpu_count} GPU(s)"
    print(f"\nEstimates from {steps}+ timed steps per cell after compilation, {per_gpu} "
          f"probe(s) at once per {'GPU' if gpus else 'CPU'} (synthetic batches; data loading "
          "not included):\n")
    print("| cell | steps left | steps/s | est. time | note |\n|---|---:|---:|---:|---|")
    print("\n".join(rows))
    total = sum(durations)
    wall = makespan(durations, slots)
    print(f"\n{len(durations)} cells: {_hours(total)} of run time; at --parallel {per_gpu} on "
          f"{device}: about {_hours(wall)} wall, {_hours(wall * max(gpu_count, 1))} of "
          f"{'GPU' if gpus else 'machine'} time")
    return 1 if failed else 0
