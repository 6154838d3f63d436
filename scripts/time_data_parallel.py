"""Data-parallel step rates: the trainer's jitted train step on the devices this process sees,
at a fixed batch per device, and the report comparing device counts.

    python3 scripts/time_data_parallel.py measure --task listops --per-device-batch 32 --out R.jsonl
    python3 scripts/time_data_parallel.py report R.jsonl --out results/data_parallel_h200

``measure`` appends one JSON line (task, devices, global batch, steps/s, examples/s, the
attention implementation chosen) for the config ``--task --model --preset`` with
``train.batch_size`` = per-device batch x device count, timed on a synthetic batch
(``train/step_timing.py``: no data loading). ``report`` writes OUT.json and OUT.md with each
count's rate beside the one-device rate times the count (the scaling efficiency).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def measure(args: argparse.Namespace) -> None:
    """Times the train step on every visible device and appends the row to ``args.out``."""
    import jax

    from xformers_zoo.bench.loader import attention_path
    from xformers_zoo.configs import resolve_config
    from xformers_zoo.overrides import parse_assignments
    from xformers_zoo.train.step_timing import time_training_steps

    devices = jax.device_count()
    overrides = {**parse_assignments(args.overrides),
                 "train.batch_size": args.per_device_batch * devices}
    config = resolve_config(args.task, args.model, presets=args.preset, overrides=overrides)
    timing = time_training_steps(config, steps=args.steps, warmup=3, min_seconds=args.seconds)
    row = {"task": args.task, "variant": config.model.variant, "presets": args.preset,
           "overrides": args.overrides, "devices": devices,
           "per_device_batch": args.per_device_batch, "batch_size": config.train.batch_size,
           "grad_accum": config.train.grad_accum, "attention": attention_path(config),
           "examples_per_sec": timing["steps_per_sec"] * config.train.batch_size, **timing}
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(f"{args.task} on {devices} device(s), batch {config.train.batch_size}: "
          f"{timing['steps_per_sec']:.2f} steps/s", flush=True)


def report(args: argparse.Namespace) -> None:
    """OUT.json (every row, with its efficiency) and OUT.md (a table per task)."""
    rows = [json.loads(line) for line in Path(args.rows).read_text().splitlines() if line]
    one = {r["task"]: r for r in rows if r["devices"] == 1}
    lines = ["| task | devices | global batch | steps/s | examples/s | vs devices x one-device "
             "rate | attention |", "|---|---:|---:|---:|---:|---:|---|"]
    for r in sorted(rows, key=lambda r: (r["task"], r["devices"])):
        base = one.get(r["task"])
        r["efficiency"] = None if base is None else (
            r["examples_per_sec"] / (r["devices"] * base["examples_per_sec"]))
        eff = "-" if r["efficiency"] is None else f"{r['efficiency']:.3f}"
        lines.append(f"| {r['task']} | {r['devices']} | {r['batch_size']} | "
                     f"{r['steps_per_sec']:.2f} | {r['examples_per_sec']:.0f} | {eff} | "
                     f"{r['attention'].split(' (')[0]} |")
    kind = rows[0]["device_kind"] if rows else "?"
    jax_version = rows[0]["jax_version"] if rows else "?"
    Path(f"{args.out}.json").write_text(json.dumps(
        {"command": " ".join(sys.argv), "device_kind": kind, "jax_version": jax_version,
         "rows": rows}, indent=2) + "\n")
    Path(f"{args.out}.md").write_text(
        f"# Data-parallel step rates ({kind}, JAX {jax_version})\n\n"
        "The trainer's train step on a synthetic batch (no data loading), the same batch per "
        "device at every device count; the efficiency is examples/s over the device count "
        "times the one-device examples/s.\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    """``measure`` or ``report`` (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("measure")
    m.add_argument("--task", required=True)
    m.add_argument("--model", default="full")
    m.add_argument("--preset", action="append", default=[])
    m.add_argument("--per-device-batch", type=int, required=True)
    m.add_argument("--steps", type=int, default=20, help="timed steps at the least")
    m.add_argument("--seconds", type=float, default=10.0, help="timed seconds at the least")
    m.add_argument("--out", required=True, help="JSON lines file to append the row to")
    m.add_argument("overrides", nargs="*", help="section.field=value")
    r = sub.add_parser("report")
    r.add_argument("rows")
    r.add_argument("--out", required=True, help="writes OUT.json and OUT.md")
    args = parser.parse_args(argv)
    (measure if args.command == "measure" else report)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
