"""Runs a list of commands as separate processes, several at once per GPU.

Each job gets one GPU, or a group of GPUs that it trains on data parallel
(``CUDA_VISIBLE_DEVICES``, round-robin over the GPUs or groups found), and its share of each
GPU's memory (``XLA_PYTHON_CLIENT_MEM_FRACTION`` = 0.9 / jobs per GPU, unless the
caller's environment sets it), writes its output to its own log file, and is reported with its
exit code and the last lines of its log when it fails, while the others go on. The GPUs are
counted without initialising JAX here (``nvidia-smi -L``), so the parent holds no device memory.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

MEMORY_SHARE = 0.9  # of each GPU, split between its jobs; the rest is CUDA contexts and cuDNN


@dataclasses.dataclass
class Job:
    """A command to run with its output appended to ``log``."""

    name: str
    command: list[str]
    log: Path
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    returncode: int | None = None  # None: not run to its end (stopped at the deadline)
    seconds: float = 0.0
    gpu: str | None = None


def detect_gpus(spec: str = "auto") -> list[str]:
    """GPU ids to spread jobs over: ``spec`` "auto" reads ``CUDA_VISIBLE_DEVICES`` if set, else
    counts ``nvidia-smi -L`` lines (none found: CPU, an empty list); a number N means ids
    0..N-1 (0: CPU); a comma list names the ids."""
    if spec != "auto":
        if "," in spec or not spec.isdigit():
            return [s.strip() for s in spec.split(",") if s.strip()]
        return [str(i) for i in range(int(spec))]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [s.strip() for s in visible.split(",") if s.strip() and s.strip() != "-1"]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True,
                                 timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(
        line for line in listing.splitlines() if line.startswith("GPU "))]


def gpu_groups(gpus: Sequence[str], per_cell: int) -> list[str]:
    """``gpus`` in consecutive groups of ``per_cell`` ("0,1", "2,3", ...): the GPUs one job
    sees. Raises ``ValueError`` when they do not split evenly."""
    if per_cell < 1:
        raise ValueError(f"--gpus-per-cell takes 1 or more, got {per_cell}")
    if per_cell > 1 and not gpus:
        raise ValueError(f"--gpus-per-cell {per_cell} needs GPUs, and none were found")
    if len(gpus) % per_cell:
        raise ValueError(f"--gpus-per-cell {per_cell} does not divide the {len(gpus)} GPUs "
                         f"({','.join(gpus)}): use a divisor of {len(gpus)} or name the GPUs "
                         "with --gpus")
    return [",".join(gpus[i:i + per_cell]) for i in range(0, len(gpus), per_cell)]


def job_env(gpu: str | None, per_gpu: int) -> dict[str, str]:
    """Environment of a job on ``gpu`` (an id or a comma list of ids; None: CPU) sharing it with
    ``per_gpu - 1`` others."""
    env = {"PYTHONUNBUFFERED": "1"}
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
        if per_gpu > 1 and "XLA_PYTHON_CLIENT_MEM_FRACTION" not in os.environ:
            env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{MEMORY_SHARE / per_gpu:.3f}"
    return env


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM when the runner dies, even by SIGKILL, so an
    orphaned run never trains on beside the same cell started again."""
    with contextlib.suppress(OSError, AttributeError):  # not Linux: no such guard
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def log_tail(path: Path, lines: int = 15) -> str:
    """The last ``lines`` lines of a log file, led by its last ``error:`` line when that is
    further up (shutdown noise of other threads may follow the command's own message)."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 65_536))
            text = f.read().decode(errors="replace").splitlines()
    except OSError:
        return ""
    errors = [line for line in text[:-lines] if line.startswith("error: ")]
    return "\n".join(errors[-1:] + text[-lines:])


def _say(text: str) -> None:
    print(text, flush=True)


def _stop(running: dict) -> None:
    """Terminates running jobs (a training run keeps its last checkpoint and resumes later)."""
    for _, proc, _, _ in running.values():
        proc.terminate()
    for job, proc, _, log in running.values():
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        print(f"stopped {job.name} (it resumes from its last checkpoint)", file=sys.stderr)
    running.clear()


def run_jobs(jobs: Sequence[Job], gpus: Sequence[str], per_gpu: int,
             describe: Callable[[Job], str] | None = None, status_every: float = 60.0,
             poll: float = 0.5, deadline: float | None = None) -> list[Job]:
    """Runs ``jobs`` with ``per_gpu`` at once on each of ``gpus`` (``per_gpu`` at once on the
    CPU when there are none), printing a line when each starts and ends and, every
    ``status_every`` seconds, ``describe(job)`` for each running job. At ``deadline``
    (``time.monotonic()``) running jobs are stopped and no more start; an interrupt stops them
    too. Returns the jobs with their return codes (None for those stopped or not started)."""
    slots = [g for g in gpus for _ in range(per_gpu)] if gpus else [None] * per_gpu
    free = collections.deque(slots)
    waiting = collections.deque(jobs)
    running: dict[str, tuple[Job, subprocess.Popen, float, object]] = {}
    last_status = time.monotonic()
    try:
        while waiting or running:
            if deadline is not None and time.monotonic() >= deadline:
                _say(f"time limit reached: stopping {len(running)} running, "
                     f"{len(waiting)} not started")
                _stop(running)
                break
            while waiting and free:
                job = waiting.popleft()
                job.gpu = free.popleft()
                job.log.parent.mkdir(parents=True, exist_ok=True)
                log = job.log.open("a")
                log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} "
                          f"{' '.join(job.command)}\n")
                log.flush()
                env = {**os.environ, **job.env, **job_env(job.gpu, per_gpu)}
                proc = subprocess.Popen(job.command, stdout=log, stderr=subprocess.STDOUT,
                                        env=env, preexec_fn=_die_with_parent)
                running[job.name] = (job, proc, time.monotonic(), log)
                where = "cpu" if job.gpu is None else f"gpu {job.gpu}"
                _say(f"start {job.name} on {where} (log {job.log})")
            time.sleep(poll)
            for name, (job, proc, started, log) in list(running.items()):
                if proc.poll() is None:
                    continue
                log.close()
                del running[name]
                free.append(job.gpu)
                job.returncode, job.seconds = proc.returncode, time.monotonic() - started
                if job.returncode == 0:
                    _say(f"done  {name} in {job.seconds / 60:.1f} min"
                         + (f": {describe(job)}" if describe else ""))
                else:
                    _say(f"FAILED {name}: exit code {job.returncode} after "
                         f"{job.seconds / 60:.1f} min; last lines of {job.log}:\n"
                         + "\n".join(f"    {line}" for line in log_tail(job.log).splitlines()))
            if describe and running and time.monotonic() - last_status >= status_every:
                last_status = time.monotonic()
                for job, _, started, _ in running.values():
                    _say(f"  {job.name}: {describe(job)} "
                         f"[{(time.monotonic() - started) / 60:.1f} min]")
    except BaseException:
        _stop(running)
        raise
    return list(jobs)
