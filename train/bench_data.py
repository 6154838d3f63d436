"""``xformers-zoo bench data``: how fast the data layer is.

1. Pathfinder generation at each resolution (32, 64, 128 = Path-X, 256 = Path-256): images per
   second on one core (in this process) and on every core (a pool of worker processes, timed
   after a warm-up so that process start-up is left out); and a build (``prepare``: generation
   plus writing, start-up included) of a set of the same size. Full 200K-image times are
   extrapolated from these rates, not measured.
2. The grain input pipeline at each task's LRA length: examples per second of training batches
   (shuffle, pad, mask, batch, assembled by the config's loader workers) read back from a small
   built data set (generated, or written in the official formats for Text, Retrieval and
   Image). ``bench loader`` sets these rates beside the training step on an accelerator.

Writes JSON and Markdown to ``--out``. Runs as ``python -m xformers_zoo.train.bench_data``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from xformers_zoo.data.pathfinder import RESOLUTIONS, draw_images
from xformers_zoo.data.pathfinder_source import LRA_SIZES, chunk_size, generate

FULL_SET = sum(LRA_SIZES)
# Images timed per resolution: on one core, and per worker on every core.
SINGLE = {32: 300, 64: 150, 128: 150, 256: 60}
PER_WORKER = {32: 256, 64: 128, 128: 128, 256: 48}


def cpu_model() -> str:
    """The CPU's model name (Linux), else the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


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
    row["full_set_minutes_extrapolated"] = FULL_SET / best / 60
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
    task = {32: "pathfinder32", 64: "pathfinder64", 128: "pathx", 256: "path256"}[size]
    n = max(int(PER_WORKER[size] * scale), chunk_size(size)) * max(workers, 1)
    once = _build_seconds(task, n, workers, root)
    twice = _build_seconds(task, 2 * n, workers, root)
    marginal = twice - once
    rate = n / marginal if marginal > 0 else float("nan")  # nan: too noisy to separate
    startup = once - n / rate if marginal > 0 else float("nan")
    return {"build_images_per_s": rate, "build_startup_s": startup, "build_images": 3 * n + 32,
            "build_full_set_minutes_extrapolated": (startup + FULL_SET / rate) / 60}


def machine() -> dict:
    """The host and its load, written beside every data-layer figure."""
    return {"host": platform.node(), "cpu": cpu_model(), "cores": os.cpu_count(),
            "python": platform.python_version(),
            # other work on the machine slows every number down
            "load_average_at_start": os.getloadavg()[0]}


def pipeline_config(task: str, root: Path, rng: np.random.Generator,
                    overrides: dict | None = None):
    """The public config of ``task`` (with ``overrides``) reading a small data set at the task's
    LRA length, written under ``root`` (generated, or in the official formats)."""
    from xformers_zoo.configs import resolve_config
    from xformers_zoo.data import fixtures
    from xformers_zoo.task_specs import TASKS

    length = TASKS.get(task).max_length
    manual = root / "manual"
    manual.mkdir(parents=True, exist_ok=True)
    if task == "text":
        fixtures.write_imdb(manual, {p: [(fixtures.random_text(rng, length // 2, 2 * length),
                                          i % 2) for i in range(256)] for p in ("train", "test")})
    elif task == "retrieval":
        fixtures.write_aan(manual, {s: [(i % 2, fixtures.random_text(rng, length // 2, 2 * length),
                                         fixtures.random_text(rng, length // 2, 2 * length))
                                        for i in range(256)]
                                    for s in ("train", "validation", "test")})
    elif task == "image":
        fixtures.write_cifar(manual, rng, per_batch=100, n_test=50)
    batch_size = resolve_config(task, "full").train.batch_size
    small = {"data.data_dir": str(root / "data"), "data.manual_dir": str(manual),
             "data.train_size": max(batch_size, 64 if task == "path256" else 256),
             "data.val_size": 8, "data.test_size": 8}
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


def time_pipeline(task: str, root: Path, seconds: float) -> dict:
    """Examples per second of ``task``'s training batches at its LRA length (with the
    config's loader workers)."""
    from xformers_zoo import data
    from xformers_zoo.data.sources import effective_length

    config = pipeline_config(task, root / task, np.random.default_rng(0))
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


def write_results(result: dict, out: Path, markdown) -> None:
    """Writes ``result`` to ``out``.json and, through ``markdown(result, path)``, ``out``.md."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    markdown(result, out.with_suffix(".md"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


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
    parser.add_argument("--out", default="results/bench_data",
                        help="output path without extension (.json and .md are written)")
    args = parser.parse_args(argv)
    import jax

    from xformers_zoo.task_specs import TASKS

    workers = args.workers or os.cpu_count() or 1
    result = {
        "command": " ".join(["python -m xformers_zoo.train.bench_data", *(argv or sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(),
        "jax_version": jax.__version__, "numpy_version": np.__version__,
        "generation": [], "pipeline": [],
    }
    tasks = TASKS.names() if args.tasks is None else args.tasks
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            row = time_generation(size, workers, args.scale)
            row |= time_build(size, workers, args.scale, Path(tmp))
            result["generation"].append(row)
            print(json.dumps(row), flush=True)
        for task in tasks:
            row = time_pipeline(task, Path(tmp), args.seconds)
            result["pipeline"].append(row)
            print(json.dumps(row), flush=True)
    write_results(result, Path(args.out), write_markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
