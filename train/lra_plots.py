"""Plots of the LRA evaluation (matplotlib, the ``plot`` extra): learning curves per task from
the runs' ``metrics.jsonl``, and the LRA chart, accuracy against training speed with peak memory
as the marker size (Tay et al. 2020, Figure 3)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from xformers_zoo.train.metrics import read_metrics_lenient


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'xformers-zoo[plot]'") from None
    return plt


def learning_curves(runs: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """One PNG per task: validation accuracy and training loss against step, one line per run
    (a colour per variant, seeds alike). Returns the files written."""
    plt = _pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for task in sorted({r["task"] for r in runs}):
        fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
        variants = sorted({r["variant"] for r in runs if r["task"] == task})
        colours = {v: plt.cm.tab20(i % 20) for i, v in enumerate(variants)}
        for run in (r for r in runs if r["task"] == task):
            records = read_metrics_lenient(Path(run["dir"]) / "metrics.jsonl")
            label = f"{run['variant']} s{run['seed']}"
            for ax, split, key in ((acc_ax, "validation", "accuracy"), (loss_ax, "train", "loss")):
                points = [(r["step"], r[key]) for r in records
                          if r.get("split") == split and key in r]
                if points:
                    steps, values = zip(*points, strict=True)
                    scale = 100 if key == "accuracy" else 1
                    ax.plot(steps, [scale * v for v in values], color=colours[run["variant"]],
                            label=label, lw=1.2)
        acc_ax.set(title=f"{task}: validation accuracy", xlabel="step", ylabel="accuracy %")
        loss_ax.set(title=f"{task}: training loss", xlabel="step", ylabel="loss")
        acc_ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        path = out_dir / f"curves_{task}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def speed_points(speed: dict[str, Any], length: int) -> dict[str, dict[str, float]]:
    """Steps/s and peak memory per variant at ``length`` from ``bench speed`` JSON (rows that
    ran; OOM and errors are left out)."""
    return {r["variant"]: r for r in speed["rows"]
            if r["length"] == length and r.get("status") == "ok"}


def lra_chart(table: dict[str, Any], speed: dict[str, Any], length: int, out: Path) -> Path:
    """Average accuracy (our table) against training steps/s at ``length`` (``bench speed``),
    marker area proportional to peak device memory (compiled memory where the device keeps no
    statistics)."""
    plt = _pyplot()
    points = speed_points(speed, length)
    fig, ax = plt.subplots(figsize=(7, 5))
    plotted = 0
    memory = {v: r.get("peak_bytes") or r.get("compiled_bytes") or 0 for v, r in points.items()}
    largest = max(memory.values(), default=0) or 1
    for row in table["rows"]:
        rate = points.get(row["variant"])
        if rate is None or row["average"]["mean"] is None:
            continue
        ax.scatter(rate["steps_per_sec"], row["average"]["mean"],
                   s=30 + 1500 * memory[row["variant"]] / largest, alpha=0.5)
        ax.annotate(row["variant"], (rate["steps_per_sec"], row["average"]["mean"]),
                    fontsize=8, xytext=(4, 4), textcoords="offset points")
        plotted += 1
    if not plotted:
        plt.close(fig)
        raise ValueError(f"no variant has both an accuracy and a speed at length {length}; "
                         f"speed lengths: {sorted({r['length'] for r in speed['rows']})}")
    tasks = sorted({t for row in table["rows"] for t in row["average"]["tasks"]})
    ax.set(xlabel=f"training steps/s (Text config, batch {speed.get('batch_size', 32)}, "
                  f"length {length})",
           ylabel=f"average test accuracy % ({', '.join(tasks)})",
           title=f"LRA: accuracy, speed and memory ({speed.get('device', '')})")
    ax.margins(0.2)
    ax.text(0.01, 0.01, f"marker area ~ peak memory (largest {largest / 2**30:.2f} GiB)",
            transform=ax.transAxes, fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
