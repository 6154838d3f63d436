"""``xformers-zoo bench speed``: training speed and memory of every variant, the LRA Table 2
protocol (Tay et al. 2020): the byte-level Text config, batch 32, sequence lengths 1K-4K (8K and
16K with ``--long``), one full training step (forward, backward and the optimizer update: the
trainer's own jitted step, ``train/steps.py``), steps per second and peak device memory.

Each variant at each length runs in its own process, so that its peak memory is its own and a
crash or an out-of-memory error stays in its cell (recorded as ``oom``; longer lengths of that
variant are then skipped). Speeds are given relative to the dense XLA Transformer (``full-xla``:
``full`` with ``model.attention.implementation=xla``, what the LRA paper compared against) and
to the Transformer on its default kernels (``full``: cuDNN, else the Pallas kernels). Lengths are
powers of two (1K = 1024). Peak memory is the device's ``peak_bytes_in_use``; on a CPU, which
keeps no such statistics, the table gives XLA's compiled size of the step instead (arguments,
outputs and temporaries). Writes JSON, Markdown and a PNG (matplotlib) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from xformers_zoo.bench.registry import register_benchmark
from xformers_zoo.bench.report import machine, write_results

BASELINES = {"full-xla": ("full", ["model.attention.implementation=xla"])}
LENGTHS, LONG = [1024, 2048, 3072, 4096], [8192, 16384]
RESULT_PREFIX = "RESULT "


def variant_and_overrides(name: str) -> tuple[str, list[str]]:
    """The registered variant and extra overrides of a benchmark row name."""
    return BASELINES.get(name, (name, []))


def measure_one(args: argparse.Namespace) -> dict[str, Any]:
    """Times one variant at one length in this process (the child side)."""
    from xformers_zoo.bench.loader import attention_path
    from xformers_zoo.configs import resolve_config
    from xformers_zoo.overrides import parse_assignments
    from xformers_zoo.train.step_timing import is_out_of_memory, time_training_steps

    variant, extra = variant_and_overrides(args.one)
    overrides = parse_assignments([*extra, *args.overrides, f"train.batch_size={args.batch}",
                                   f"data.max_length={args.length}"])
    config = resolve_config(args.task, variant, presets=args.preset, overrides=overrides)
    row: dict[str, Any] = {"variant": args.one, "length": args.length,
                           "attention": attention_path(config)}
    try:
        row.update(time_training_steps(config, args.steps, min_seconds=args.seconds))
        row["status"] = "ok"
    except Exception as error:  # jax raises its runtime errors under several classes
        if not is_out_of_memory(error):
            raise
        row.update(status="oom", error=str(error).splitlines()[0][:300])
    return row


def run_cell(args: argparse.Namespace, name: str, length: int) -> dict[str, Any]:
    """Runs one variant at one length in a child process and returns its row."""
    command = [sys.executable, "-m", "xformers_zoo", "bench", "speed", "--one", name,
               "--length", str(length), "--task", args.task, "--batch", str(args.batch),
               "--steps", str(args.steps), "--seconds", str(args.seconds),
               *(a for p in args.preset for a in ("--preset", p)), *args.overrides]
    # the whole device for each process (JAX takes 75% by default)
    env = {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.95", **os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env,
                              timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"variant": name, "length": length, "status": "timeout",
                "error": f"no result within {args.timeout} s"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
    status = ("oom" if "RESOURCE_EXHAUSTED" in done.stderr else
              "killed" if done.returncode == -9 else "error")  # -9: e.g. host memory
    return {"variant": name, "length": length, "status": status,
            "error": f"exit code {done.returncode}: " + " | ".join(tail)[-400:]}


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Speed of each row relative to ``full-xla`` and ``full`` at the same length."""
    rate = {(r["variant"], r["length"]): r.get("steps_per_sec") for r in rows
            if r.get("status") == "ok"}
    for r in rows:
        for base, key in (("full-xla", "vs_xla"), ("full", "vs_full")):
            b = rate.get((base, r["length"]))
            r[key] = r["steps_per_sec"] / b if b and r.get("status") == "ok" else None


def _cell(r: dict[str, Any]) -> str:
    if r.get("status") != "ok":
        return r.get("status", "-").upper() if r.get("status") == "oom" else r.get("status", "-")
    memory = r.get("peak_bytes")
    where = "" if memory is not None else " (compiled)"
    memory = memory if memory is not None else r.get("compiled_bytes")
    ratios = " / ".join("-" if r.get(k) is None else f"{r[k]:.2f}x" for k in ("vs_xla", "vs_full"))
    size = "-" if memory is None else (f"{memory / 2**30:.2f} GiB" if memory >= 2**30 else
                                       f"{memory / 2**20:.0f} MiB")
    return f"{r['steps_per_sec']:.2f} ({ratios}), {size}{where}"


def write_markdown(result: dict[str, Any], path: Path) -> None:
    """The speed table: one row per variant, one column per length."""
    from xformers_zoo.configs.published_lra import LRA_SPEED, SPEED_SOURCE

    lengths = result["lengths"]
    by_key = {(r["variant"], r["length"]): r for r in result["rows"]}
    variants = list(dict.fromkeys(r["variant"] for r in result["rows"]))
    lines = [f"# Training speed and memory: {result['device']}", "",
             f"Command: `{result['command']}`  ",
             f"JAX {result['jax_version']}, {result['date']}; {result['task']} config, batch "
             f"{result['batch_size']}, presets {result['presets']}, overrides "
             f"{result['overrides'] or 'none'}", "",
             "Each cell: training steps/s (relative to the dense XLA Transformer `full-xla` / "
             "to `full` on its default kernels), peak device memory. OOM: out of device "
             "memory. LRA paper column: its 4K speed relative to its Transformer "
             f"({SPEED_SOURCE}).", "",
             "| variant | " + " | ".join(str(n) for n in lengths) + " | LRA 4K ratio | attention |",
             "|---|" + "---:|" * (len(lengths) + 1) + "---|"]
    for v in variants:
        paper = LRA_SPEED.get(variant_and_overrides(v)[0] if v != "full-xla" else "full", {})
        ratio = f"{paper[4096] / LRA_SPEED['full'][4096]:.1f}x" if paper.get(4096) else "-"
        attention = next((r.get("attention", "") for r in result["rows"]
                          if r["variant"] == v and r.get("attention")), "")
        lines.append(f"| {v} | " + " | ".join(_cell(by_key.get((v, n), {})) for n in lengths)
                     + f" | {ratio} | {attention} |")
    errors = [r for r in result["rows"] if r.get("status") not in ("ok", None) and r.get("error")]
    if errors:
        lines += ["", "Cells that did not run:"]
        lines += [f"- {r['variant']} at {r['length']}: {r['status']}: {r['error']}" for r in errors]
    path.write_text("\n".join(lines) + "\n")


def plot(result: dict[str, Any], path: Path) -> Path | None:
    """Steps/s against length per variant (log scale); None without matplotlib."""
    try:
        from xformers_zoo.train.lra_plots import _pyplot

        plt = _pyplot()
    except ImportError as e:
        print(f"no plot: {e}")
        return None
    fig, ax = plt.subplots(figsize=(7, 5))
    for v in dict.fromkeys(r["variant"] for r in result["rows"]):
        points = [(r["length"], r["steps_per_sec"]) for r in result["rows"]
                  if r["variant"] == v and r.get("status") == "ok"]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=v,
                    ls="--" if v.startswith("full") else "-")
    ax.set(xscale="log", yscale="log", xlabel="sequence length", ylabel="training steps/s",
           title=f"{result['task']} config, batch {result['batch_size']}: {result['device']}")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's arguments (``--one`` is the child's)."""
    p = argparse.ArgumentParser(prog="xformers-zoo bench speed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", help="default: full-xla and every registered variant")
    p.add_argument("--lengths", type=int, nargs="+", default=LENGTHS)
    p.add_argument("--long", action="store_true", help=f"add lengths {LONG}")
    p.add_argument("--task", default="text", help="whose config (LRA: text)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--preset", action="append", default=None,
                   help="presets (default lra: each variant's public settings)")
    p.add_argument("--steps", type=int, default=10, help="timed steps at the least")
    p.add_argument("--seconds", type=float, default=3.0, help="timed seconds at the least")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per cell")
    p.add_argument("--out", default="results/bench_speed",
                   help="output path without extension (.json, .md and .png are written)")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--length", type=int, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="section.field=value for every variant")
    return p


@register_benchmark("speed", help="training speed and memory of every variant (LRA Table 2)")
def main(argv: list[str] | None = None) -> int:
    """Runs the benchmark (or, with ``--one``, one cell) and writes the results."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.preset = ["lra"] if args.preset is None else args.preset
    if args.one:
        print(RESULT_PREFIX + json.dumps(measure_one(args)), flush=True)
        return 0
    from xformers_zoo.variants import VARIANTS

    variants = args.variants or ["full-xla", *VARIANTS.names()]
    for name in variants:
        VARIANTS.get(variant_and_overrides(name)[0])  # an unknown name fails before any run
    lengths = sorted(set(args.lengths + (LONG if args.long else [])))
    result: dict[str, Any] = {
        "command": "xformers-zoo bench speed " + " ".join(argv),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(),
        "task": args.task, "batch_size": args.batch, "presets": args.preset,
        "overrides": args.overrides, "lengths": lengths, "rows": []}
    for name in variants:
        failed_at = None
        for length in lengths:
            if failed_at is not None:
                row = {"variant": name, "length": length, "status": "skipped",
                       "error": f"out of memory at {failed_at}"}
            else:
                row = run_cell(args, name, length)
            if row["status"] == "oom":
                failed_at = length
            result["rows"].append(row)
            for key, field in (("device", "device_kind"), ("jax_version", "jax_version")):
                result[key] = result.get(key) or row.get(field)
            add_ratios(result["rows"])
            print(f"{name} at {length}: {_cell(row)}", flush=True)
            write_results(result, Path(args.out), write_markdown)  # a cut run keeps its rows
    path = plot(result, Path(args.out).with_suffix(".png"))
    if path:
        print(f"wrote {path}")
    return 0

