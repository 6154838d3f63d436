"""``xformers-zoo bench data``: how fast the data layer is.

1. Pathfinder generation at each resolution (32, 64, 128 = Path-X, 256 = Path-256): images per
   second on one core (in this process) and on every core (a pool of worker processes, timed
   after a warm-up so that process start-up is left out); and a build (``prepare``: generation
   plus writing, start-up included) of a set of the same size. Full 200K-image times are
   extrapolated from these rates, not measured.
2. The grain input pipeline at each task's LRA length: examples per second of training batches
   (shuffle, pad, mask, batch, assembled by the config's loader workers) read back from a small
   built data set (generated, or read from the official files in ``--manual-dir`` for Text,
   Retrieval and Image). ``bench loader`` sets these rates beside the training step on an
   accelerator.

Writes JSON and Markdown to ``--out``. Runs as ``xformers-zoo bench data``
(``python -m xformers_zoo bench data``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from xformers_zoo.bench.registry import register_benchmark
from xformers_zoo.bench.report import machine, write_results
from xformers_zoo.data.pathfinder import RESOLUTIONS, draw_images
from xformers_zoo.data.pathfinder_source import SIZES, chunk_size, generate
from xformers_zoo.task_specs import TASKS

# The Pathfinder task of each image side, and the images of its full (published) set.
TASK_OF_SIDE = {side: task for task, side in SIZES.items()}
FULL_SET = {side: sum(TASKS.get(task).split_sizes) for side, task in TASK_OF_SIDE.items()}
# Images timed per resolution: on one core, and per worker on every core.
SINGLE = {32: 300, 64: 150, 128: 150, 256: 60}
PER_WORKER = {32: 256, 64: 128, 128: 128, 256: 48}


def time_generation(size: int, workers: int, scale: float) -> dict:
    """Images per second at ``size`` px, on one core and on ``workers`` processes."""
    params = RESOLUTIONS[size]
    n_single = max(int(SINGLE[size] * scale), 4)
    draw_images((params, 0, "train", 10**7, 2))  # warm caches
    start = time.perf_counter()
    draw_images((params, 0, "train", 0, n_single))
    single = n_single / (time.perf_counter() - start)
    row = {"size": size, "tokens": size * size, "one_core_images_per_s": single,
           "one_core_images": n_single}
    if workers > 1:
        n_all = max(int(PER_WORKER[size] * scale), chunk_size(size)) * workers
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            # Warm-up: one chunk per worker, so every process has started and imported.
            list(generate(params, chunk_size(size) * workers, seed=1, split="train",
                          start=10**7, pool=pool))
            start = time.perf_counter()
            for _ in generate(params, n_all, seed=0, split="train", pool=pool):
                pass
            elapsed = time.perf_counter() - start
        row |= {"all_cores_images_per_s": n_all / elapsed, "all_cores_images": n_all,
                "workers": workers}
    best = row.get("all_cores_images_per_s", single)
    row["full_set_minutes_extrapolated"] = FULL_SET[size] / best / 60
    return row


def _build_seconds(task: str, n: int, workers: int, root: Path) -> float:
    from xformers_zoo import data
    from xformers_zoo.configs import resolve_config

    config = resolve_config(task, "full", overrides={
        "data.data_dir": str(root / f"build-{task}-{n}"), "data.train_size": n,
        "data.val_size": 8, "data.test_size": 8, "data.workers": workers})
    start = time.perf_counter()
    data.prepare(config.data)
    return time.perf_counter() - start


def time_build(size: int, workers: int, scale: float, root: Path) -> dict:
    """End-to-end ``prepare`` of a generated set at ``size`` px on ``workers`` processes
    (generation overlapped with writing the array_record files). Two builds, of n and 2n
    training images, separate the fixed cost (worker start-up) from the per-image rate, so the
    full-set estimate does not multiply the start-up by the set size."""
    task = TASK_OF_SIDE[size]
    n = max(int(PER_WORKER[size] * scale), chunk_size(size)) * max(workers, 1)
    once = _build_seconds(task, n, workers, root)
    twice = _build_seconds(task, 2 * n, workers, root)
    marginal = twice - once
    rate = n / marginal if marginal > 0 else float("nan")  # nan: too noisy to separate
    startup = once - n / rate if marginal > 0 else float("nan")
    return {"build_images_per_s": rate, "build_startup_s": startup, "build_images": 3 * n + 32,
            "build_full_set_minutes_extrapolated": (startup + FULL_SET[size] / rate) / 60}


def needs_files(task: str) -> bool:
    """Whether ``task``'s public config reads official files (``data.manual_dir``)."""
    from xformers_zoo.configs import resolve_config

    return resolve_config(task, "full").data.source == "official"


def pipeline_tasks(requested: list[str] | None, default: list[str],
                   manual_dir: Path | None) -> list[str]:
    """The tasks to time: those ``requested``, else those of ``default`` whose data can be made
    here (generated, or read from ``manual_dir``)."""
    if requested is not None:
        return requested
    skipped = [t for t in default if manual_dir is None and needs_files(t)]
    if skipped:
        print(f"skipping {', '.join(skipped)}: they read official files (pass --manual-dir)",
              flush=True)
    return [t for t in default if t not in skipped]


def pipeline_config(task: str, root: Path, manual_dir: Path | None,
                    overrides: dict | None = None):
    """The public config of ``task`` (with ``overrides``) reading a small data set at the task's
    LRA length, built under ``root``: generated, or read from the official files in
    ``manual_dir`` (a task that needs them and has none raises ValueError)."""
    from xformers_zoo.configs import resolve_config

    config = resolve_config(task, "full")
    if manual_dir is None and needs_files(task):
        raise ValueError(f"bench data: {task} reads its official files; pass --manual-dir with "
                         "them, or leave it out of --tasks")
    small = {"data.data_dir": str(root / "data"),
             "data.train_size": max(config.train.batch_size, 64 if task == "path256" else 256),
             "data.val_size": 8, "data.test_size": 8}
    if manual_dir is not None:
        small["data.manual_dir"] = str(manual_dir)
    return resolve_config(task, "full", overrides=small | (overrides or {}))


def batches_per_second(data_config, batch_size: int, seconds: float) -> float:
    """Training batches per second read from the pipeline of ``data_config`` (built), timed
    after the first batch so that loader worker start-up is left out."""
    from xformers_zoo import data

    iterator = iter(data.train_dataset(data_config, batch_size, seed=0))
    next(iterator)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        next(iterator)
        count += 1
    rate = count / (time.perf_counter() - start)
    iterator.close()  # stops loader workers
    return rate


def time_pipeline(task: str, root: Path, seconds: float, manual_dir: Path | None = None) -> dict:
    """Examples per second of ``task``'s training batches at its LRA length (with the
    config's loader workers)."""
    from xformers_zoo import data
    from xformers_zoo.data.sources import effective_length

    config = pipeline_config(task, root / task, manual_dir)
    data.prepare(config.data)
    batch_size = config.train.batch_size
    rate = batches_per_second(config.data, batch_size, seconds)
    return {"task": task, "length": effective_length(config.data), "batch_size": batch_size,
            "loader_workers": config.data.loader_workers,
            "examples_per_s": rate * batch_size, "batches_per_s": rate}


def write_markdown(result: dict, path: Path) -> None:
    """The result as Markdown tables."""
    m = result["machine"]
    lines = [f"# Data layer throughput on {m['cpu']} ({m['cores']} cores)", "",
             f"Command: `{result['command']}`  ", f"JAX {result['jax_version']}, "
             f"numpy {result['numpy_version']}, {result['date']}, load average at start "
             f"{m['load_average_at_start']:.1f}", "",
             "## Pathfinder generation", "",
             "Generation is timed after the worker processes have started. The build runs "
             "`prepare` end to end (generation overlapped with writing array_record files) "
             "for n and 2n images: their difference gives the per-image rate, the rest is "
             "start-up. Full-set (200K images) times are extrapolated from the images timed "
             "(start-up + 200K / rate), not measured.", "",
             "| size | tokens | one core (img/s) | all cores (img/s) | workers | "
             "200K generated, est. (min) | build start-up (s) | build (img/s) | "
             "200K built, est. (min) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["generation"]:
        lines.append(f"| {r['size']} | {r['tokens']} | {r['one_core_images_per_s']:.1f} | "
                     f"{r.get('all_cores_images_per_s', float('nan')):.1f} | "
                     f"{r.get('workers', 1)} | {r['full_set_minutes_extrapolated']:.1f} | "
                     f"{r['build_startup_s']:.1f} | {r['build_images_per_s']:.1f} | "
                     f"{r['build_full_set_minutes_extrapolated']:.1f} |")
    if result["pipeline"]:
        lines += ["", "## grain pipeline (training batches)", "",
                  "| task | length | batch | loader workers | examples/s | batches/s |",
                  "|---|---|---|---|---|---|"]
        for r in result["pipeline"]:
            lines.append(f"| {r['task']} | {r['length']} | {r['batch_size']} | "
                         f"{r['loader_workers']} | {r['examples_per_s']:.0f} | "
                         f"{r['batches_per_s']:.1f} |")
    path.write_text("\n".join(lines) + "\n")


@register_benchmark("data", help="Pathfinder generation and grain pipeline rates")
def main(argv: list[str] | None = None) -> int:
    """Runs the benchmark and writes the results; returns the exit status."""
    parser = argparse.ArgumentParser(prog="xformers-zoo bench data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=sorted(RESOLUTIONS),
                        choices=sorted(RESOLUTIONS))
    parser.add_argument("--workers", type=int, default=0, help="0: every core")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiplies the number of images timed")
    parser.add_argument("--tasks", nargs="*", default=None,
                        help="pipeline tasks (default: all; none to skip)")
    parser.add_argument("--seconds", type=float, default=3.0, help="pipeline time per task")
    parser.add_argument("--manual-dir", type=Path,
                        help="the official files of Text, Retrieval and Image (they are left "
                             "out of the default tasks without it)")
    parser.add_argument("--out", default="results/bench_data",
                        help="output path without extension (.json and .md are written)")
    args = parser.parse_args(argv)
    import jax

    from xformers_zoo.task_specs import TASKS

    workers = args.workers or os.cpu_count() or 1
    result = {
        "command": " ".join(["xformers-zoo bench data", *(argv or sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(),
        "jax_version": jax.__version__, "numpy_version": np.__version__,
        "generation": [], "pipeline": [],
    }
    tasks = pipeline_tasks(args.tasks, TASKS.names(), args.manual_dir)
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            row = time_generation(size, workers, args.scale)
            row |= time_build(size, workers, args.scale, Path(tmp))
            result["generation"].append(row)
            print(json.dumps(row), flush=True)
        for task in tasks:
            row = time_pipeline(task, Path(tmp), args.seconds, args.manual_dir)
            result["pipeline"].append(row)
            print(json.dumps(row), flush=True)
    write_results(result, Path(args.out), write_markdown)
    return 0

