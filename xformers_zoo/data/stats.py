"""``xformers-zoo data stats <task> [<task> ...]``: statistics of generated Pathfinder images
(intensity, ink, connected components, distractors drawn, and the best accuracy of a flood fill
between the markers), to compare with the original generator's (Linsley et al. 2018) and to
check that the task is not a flood fill. Images are drawn in this process, one core, and the
time per image is reported too. Same image options as ``data show``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from xformers_zoo.configs.base import DataConfig
from xformers_zoo.data.show import add_sample_arguments

ROWS = (  # (key, heading, format)
    ("images", "images", "{:d}"),
    ("mean", "mean", "{:.1f}"),
    ("std", "std", "{:.1f}"),
    ("above_0", "> 0", "{:.1%}"),
    ("above_64", "> 64", "{:.1%}"),
    ("above_200", "> 200", "{:.2%}"),
    ("ink_at_255", "ink at 255", "{:.2%}"),
    ("median_components_above_64", "components > 64 (median)", "{:.0f}"),
    ("distractors_mean", "distractors drawn (mean)", "{:.2f}"),
    ("distractors_requested", "distractors requested", "{:d}"),
    ("label_1_share", "label 1 share (chance: the larger class)", "{:.1%}"),
    ("flood_fill_best_accuracy", "flood fill, best threshold", "{:.1%}"),
    ("flood_fill_best_threshold", "its threshold", "{:d}"),
    ("ms_per_image", "ms per image, one core", "{:.1f}"),
)


def task_stats(task: str, *, count: int, split: str, level: str, seed: int) -> dict:
    """Draws ``count`` images of a generated Pathfinder task and measures them."""
    from xformers_zoo.data.pathfinder import draw_sample, image_rng
    from xformers_zoo.data.pathfinder_source import SIZES, params_for
    from xformers_zoo.data.pathfinder_stats import image_stats

    if task not in SIZES:
        raise ValueError(f"data stats measures the generated Pathfinder tasks "
                         f"({', '.join(SIZES)}), not {task!r}")
    p = params_for(DataConfig(task=task, level=level))
    draw_sample(image_rng(seed, split, 10**9), p)  # compile and cache before timing
    start = time.process_time()
    samples = [draw_sample(image_rng(seed, split, i), p) for i in range(count)]
    per_image = (time.process_time() - start) / count
    stats = image_stats(np.stack([s.image for s in samples]),
                        np.stack([s.markers for s in samples]),
                        np.array([s.label for s in samples]),
                        np.array([s.num_distractors for s in samples]), p.num_distractors)
    return {"task": task, "size": p.size, "level": level, "seed": seed, "split": split,
            **stats, "ms_per_image": 1000 * per_image}


def markdown(results: list[dict]) -> str:
    """A table with one column per task."""
    lines = ["| | " + " | ".join(f"{r['task']} ({r['size']} px)" for r in results) + " |",
             "|---" * (len(results) + 1) + "|"]
    for key, heading, fmt in ROWS:
        lines.append(f"| {heading} | " + " | ".join(fmt.format(r[key]) for r in results) + " |")
    shares = [" / ".join(f"{100 * s:.0f}" for s in r["distractors_share"]) for r in results]
    lines.append("| distractors drawn 0, 1, ... (%) | " + " | ".join(shares) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Prints the table (and writes JSON with ``--json``); returns the exit status."""
    parser = argparse.ArgumentParser(prog="xformers-zoo data stats", description=__doc__)
    parser.add_argument("tasks", nargs="+", help="Pathfinder tasks (pathfinder32 ... path256)")
    add_sample_arguments(parser, count=400)
    parser.add_argument("--json", default=None, help="also write the numbers to this file")
    args = parser.parse_args(argv)
    if args.count < 1:
        print(f"error: --count must be at least 1, got {args.count}", file=sys.stderr)
        return 2
    try:
        results = [task_stats(t, count=args.count, split=args.split, level=args.level,
                              seed=args.seed) for t in args.tasks]
    except (ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(markdown(results))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
