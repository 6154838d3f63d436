"""The sweep's dry-run probe: times a few training steps of one cell's config, in its own
process, and writes the rates as JSON.

Runs as ``python -m xformers_zoo.train.sweep_probe --task T --model M [--preset P] --out F
[overrides]``. Probes that share a GPU in the dry run meet at a barrier (``--barrier DIR
--group N``) after compiling, so each is timed while the others run, as the cells will run
under ``sweep --parallel``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

BARRIER_TIMEOUT_S = 180.0


def wait_at_barrier(directory: Path, name: str, group: int, state: str = "ready") -> None:
    """Marks ``name`` as arrived (``state``: ready, or failed so that nobody waits for it) and
    waits until ``group`` probes have arrived or the timeout passes."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.{state}").touch()
    if state != "ready":
        return
    deadline = time.monotonic() + BARRIER_TIMEOUT_S
    while len(list(directory.iterdir())) < group and time.monotonic() < deadline:
        time.sleep(0.1)


def eval_batches_per_run(config) -> tuple[int, int] | None:
    """(validation batches per evaluation, test batches) of a run of ``config``; None when the
    split sizes are the task's defaults, unknown before the data is built."""
    tc, dc = config.train, config.data
    if dc.val_size is None or dc.test_size is None:
        return None
    val = math.ceil(dc.val_size / tc.batch_size)
    if tc.eval_batches is not None:
        val = min(val, tc.eval_batches)
    return val, math.ceil(dc.test_size / tc.batch_size)


def main(argv: list[str] | None = None) -> int:
    """Times the cell and writes ``--out``; exit status 0, or 1 with the error in the JSON."""
    parser = argparse.ArgumentParser(prog="python -m xformers_zoo.train.sweep_probe",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--task", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--preset", action="append", default=[])
    parser.add_argument("--steps", type=int, default=10, help="timed steps at the least")
    parser.add_argument("--seconds", type=float, default=5.0, help="timed seconds at the least")
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--barrier", help="folder where probes sharing the device meet")
    parser.add_argument("--group", type=int, default=1, help="probes meeting at the barrier")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    name = Path(args.out).stem
    barrier = Path(args.barrier) if args.barrier else None
    try:
        from xformers_zoo.configs import resolve_config
        from xformers_zoo.overrides import parse_assignments
        from xformers_zoo.train.step_timing import time_training_steps

        config = resolve_config(args.task, args.model, presets=args.preset,
                                overrides=parse_assignments(args.overrides))
        batches = eval_batches_per_run(config)
        result = time_training_steps(
            config, args.steps, min_seconds=args.seconds, eval_batches=3 if batches else 0,
            before_timing=(lambda: wait_at_barrier(barrier, name, args.group))
            if barrier else None)
        result.update({"train_steps": config.train.steps, "eval_every": config.train.eval_every,
                       "eval_batches_per_eval": batches[0] if batches else None,
                       "test_batches": batches[1] if batches else None})
        status = 0
    except Exception as error:  # reported in the JSON and by the exit status
        if barrier:
            wait_at_barrier(barrier, name, args.group, state="failed")
        result, status = {"error": f"{type(error).__name__}: {error}"}, 1
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return status


if __name__ == "__main__":
    sys.exit(main())
