"""``xformers-zoo bench loader``: is the input pipeline the bottleneck of a training step?

For each task, on a small data set at the task's LRA length and the public config's batch size
and model (``full`` unless overridden):

1. the grain pipeline alone: training batches per second with each number of loader worker
   processes (``data.loader_workers``; 0 assembles batches in the training process);
2. the jitted training step alone: steps per second on one batch kept on the device;
3. the two together: steps per second with each batch read from the pipeline and copied to
   the device, at most two steps in flight (the host prepares the next batch while the device
   runs), as the trainer runs them.

The loader is the bottleneck where (1) is below (2), and (3) then falls short of (2). A config
whose step does not fit the device memory is retried with twice the gradient accumulation (the
same batch in more micro-batches) until it fits; the table says which was used.

Writes JSON and Markdown to ``--out``. Runs as ``xformers-zoo bench loader``
(``python -m xformers_zoo bench loader``).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import gc
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from xformers_zoo import overrides as cfglib
from xformers_zoo.bench.data import batches_per_second, pipeline_config, pipeline_tasks
from xformers_zoo.bench.registry import register_benchmark
from xformers_zoo.bench.report import machine, write_results
from xformers_zoo.data.sources import effective_length
from xformers_zoo.kernels.dispatch import AttentionCall, choose_implementation
from xformers_zoo.overrides import parse_assignments
from xformers_zoo.train.step_timing import is_out_of_memory

DEFAULT_TASKS = ("image", "pathfinder32", "pathfinder64", "pathx", "listops")


def parse_overrides(items: list[str]) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """``key=value`` for every task and ``task:key=value`` for one task."""
    shared: dict[str, str] = {}
    per_task: dict[str, dict[str, str]] = collections.defaultdict(dict)
    for item in items:
        task, sep, assignment = item.partition(":")
        if sep and "=" not in task:
            per_task[task].update(parse_assignments([assignment]))
        else:
            shared.update(parse_assignments([item]))
    return shared, dict(per_task)


def attention_path(config) -> str:
    """Which implementation serves the config's full attention, and why any earlier choice was
    passed over (``n/a`` for variants without a choice of implementation)."""
    choices = getattr(config.model.attention, "implementation", None)
    if choices is None:
        return "n/a"
    length = effective_length(config.data)
    call = AttentionCall(
        backend=jax.default_backend(), dtype=config.model.dtype, batch=config.train.batch_size,
        q_len=length, k_len=length, num_heads=config.model.num_heads,
        head_dim=config.model.head_dim, has_key_mask=True, block_mask=None, causal=False,
        dropout_rate=config.model.attention_dropout, key_mask_is_prefix=True)
    impl, skipped = choose_implementation(call, choices)
    return impl.name + "".join(f" ({name} skipped: {reason})" for name, reason in skipped)


def run_steps(train_step, state, batches, seconds: float, min_steps: int, depth: int = 2):
    """Steps per second over ``seconds`` (and at least ``min_steps``) of ``train_step`` on
    device batches from ``batches``, with at most ``depth`` steps in flight; returns the
    state and the rate."""
    pending: collections.deque = collections.deque()
    count, start = 0, time.perf_counter()
    while count < min_steps or time.perf_counter() - start < seconds:
        state, metrics = train_step(state, next(batches))
        pending.append(metrics["loss"])
        count += 1
        if len(pending) > depth:
            pending.popleft().block_until_ready()
    jax.block_until_ready(state)
    return state, count / (time.perf_counter() - start)


def compiled_setup(config, batch: dict[str, np.ndarray]):
    """The trainer's setup of ``config`` with its step compiled and run twice on ``batch``,
    doubling the gradient accumulation while the step does not fit the device memory.
    Returns (setup, state, device batch, config used)."""
    from xformers_zoo.train.loop import _Setup
    from xformers_zoo.train.sharding import shard_batch

    while True:
        try:
            setup = _Setup(config)
            device_batch = shard_batch(batch, setup.mesh)
            state = setup.state
            for _ in range(2):
                state, _ = setup.train_step(state, device_batch)
            jax.block_until_ready(state)
            return setup, state, device_batch, config
        except Exception as error:  # jax raises its runtime errors under several classes
            accum = 2 * config.train.grad_accum
            if not is_out_of_memory(error) or config.train.batch_size % accum:
                raise
            print(f"{config.data.task}: out of memory at grad_accum "
                  f"{config.train.grad_accum}; retrying with {accum}", flush=True)
            setup = state = device_batch = None
            gc.collect()
            config = cfglib.replace(config, {"train.grad_accum": accum})


def bench_task(task: str, root: Path, overrides: dict[str, str], loader_workers: list[int],
               seconds: float, min_steps: int, manual_dir: Path | None = None) -> dict:
    """Loader, step and fed-step rates of ``task`` (see the module docstring)."""
    from xformers_zoo import data
    from xformers_zoo.train.sharding import shard_batch

    config = pipeline_config(task, root / task, manual_dir, overrides)
    data.prepare(config.data)
    batch_size = config.train.batch_size
    row = {"task": task, "variant": config.model.variant,
           "length": effective_length(config.data), "batch_size": batch_size,
           "attention_dropout": config.model.attention_dropout,
           "attention": attention_path(config),
           "config_loader_workers": config.data.loader_workers, "loader_batches_per_s": {}}
    for workers in loader_workers:
        row["loader_batches_per_s"][str(workers)] = batches_per_second(
            dataclasses.replace(config.data, loader_workers=workers), batch_size, seconds)
        print(f"{task}: loader, {workers} workers: "
              f"{row['loader_batches_per_s'][str(workers)]:.1f} batches/s", flush=True)
    first = next(iter(data.train_dataset(dataclasses.replace(config.data, loader_workers=0),
                                         batch_size, seed=0)))
    start = time.perf_counter()
    setup, state, device_batch, used = compiled_setup(config, first)
    row["compile_s"] = time.perf_counter() - start
    row["grad_accum"] = used.train.grad_accum
    state, row["step_per_s"] = run_steps(setup.train_step, state, itertools.repeat(device_batch),
                                         seconds, min_steps)
    print(f"{task}: step alone {row['step_per_s']:.1f} steps/s", flush=True)
    row["fed_step_per_s"] = {}
    for workers in loader_workers:
        iterator = iter(data.train_dataset(dataclasses.replace(used.data, loader_workers=workers),
                                           batch_size, seed=1))
        batches = (shard_batch(b, setup.mesh) for b in iterator)
        state, _ = run_steps(setup.train_step, state, batches, 0.0, 2)  # workers started
        state, rate = run_steps(setup.train_step, state, batches, seconds, min_steps)
        iterator.close()
        row["fed_step_per_s"][str(workers)] = rate
        print(f"{task}: step fed by the loader, {workers} workers: {rate:.1f} steps/s",
              flush=True)
    own = row["loader_batches_per_s"].get(str(config.data.loader_workers))
    row["loader_keeps_up"] = None if own is None else own >= row["step_per_s"]
    del setup, state, device_batch
    gc.collect()
    jax.clear_caches()
    print(json.dumps(row), flush=True)
    return row


def _cell(values: dict, key: str) -> str:
    return f"{values[key]:.1f}" if key in values else "-"


def write_markdown(result: dict, path: Path) -> None:
    """The result as a Markdown table."""
    m = result["machine"]
    workers = result["loader_workers"]
    lines = [f"# Input pipeline against the training step: {result['device']}, "
             f"{m['cpu']} ({m['cores']} cores)", "",
             f"Command: `{result['command']}`  ",
             f"JAX {result['jax_version']}, {result['date']}, load average at start "
             f"{m['load_average_at_start']:.1f}", "",
             "Loader: training batches/s of the grain pipeline alone, by number of loader "
             "workers. Step: the jitted training step on one batch kept on the device. Fed: "
             "the step with each batch read from the pipeline and copied to the device (at "
             "most two steps in flight). Rates are per second, after compilation and worker "
             "start-up.", "",
             "| task | length | batch | grad accum | attention | "
             + " | ".join(f"loader, {w} workers" for w in workers) + " | step | "
             + " | ".join(f"fed, {w} workers" for w in workers) + " | config's workers | "
             "loader keeps up |",
             "|---|---|---|---|---|" + "---|" * (2 * len(workers) + 3)]
    for r in result["tasks"]:
        verdict = {True: "yes", False: "no", None: "not measured"}[r["loader_keeps_up"]]
        lines.append(
            f"| {r['task']} | {r['length']} | {r['batch_size']} | {r['grad_accum']} | "
            f"{r['attention']} | "
            + " | ".join(_cell(r["loader_batches_per_s"], str(w)) for w in workers)
            + f" | {r['step_per_s']:.1f} | "
            + " | ".join(_cell(r["fed_step_per_s"], str(w)) for w in workers)
            + f" | {r['config_loader_workers']} | {verdict} |")
    path.write_text("\n".join(lines) + "\n")


@register_benchmark("loader", help="is the input pipeline the bottleneck of a training step?")
def main(argv: list[str] | None = None) -> int:
    """Runs the benchmark and writes the results; returns the exit status."""
    parser = argparse.ArgumentParser(prog="xformers-zoo bench loader", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=None,
                        help=f"default: {' '.join(DEFAULT_TASKS)} (image with --manual-dir)")
    parser.add_argument("--manual-dir", type=Path,
                        help="the official files of Text, Retrieval and Image")
    parser.add_argument("--loader-workers", type=int, nargs="+", default=[0, 4],
                        help="loader worker counts to time (0: in the training process)")
    parser.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    parser.add_argument("--min-steps", type=int, default=5,
                        help="steps per measurement at the least (slow steps)")
    parser.add_argument("--out", default="results/bench_loader",
                        help="output path without extension (.json and .md are written)")
    parser.add_argument("overrides", nargs="*",
                        help="section.field=value for every task, or task:section.field=value "
                             "for one, e.g. model.attention_dropout=0.0")
    args = parser.parse_args(argv)
    if any(w < 0 for w in args.loader_workers):
        parser.error(f"--loader-workers takes counts of 0 or more, got {args.loader_workers}")
    from xformers_zoo.task_specs import TASKS

    args.tasks = pipeline_tasks(args.tasks, list(DEFAULT_TASKS), args.manual_dir)
    for task in args.tasks:
        TASKS.get(task)  # an unknown task fails here, naming the known ones
    shared, per_task = parse_overrides(args.overrides)
    device = jax.devices()[0]
    result = {
        "command": " ".join(["xformers-zoo bench loader",
                             *(sys.argv[1:] if argv is None else argv)]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(), "device": f"{device.platform} {device.device_kind}",
        "jax_version": jax.__version__, "loader_workers": args.loader_workers,
        "overrides": {"all": shared, **per_task}, "tasks": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        for task in args.tasks:
            result["tasks"].append(bench_task(task, Path(tmp), shared | per_task.get(task, {}),
                                              args.loader_workers, args.seconds,
                                              args.min_steps, args.manual_dir))
            # after every task: a run cut short by a time limit keeps what it measured
            write_results(result, Path(args.out), write_markdown)
    return 0

