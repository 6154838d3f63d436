"""Markdown table and PNG plot of a ``bench kernels`` report (see xformers_zoo/bench/kernels.py)."""

from __future__ import annotations

from pathlib import Path


def _fmt(value, digits=2):
    return "-" if value is None else f"{value:.{digits}f}"


def _cell(row, mode):
    if f"{mode}_ms" in row:
        return f"{row[mode + '_ms']:.3f} ({row[mode + '_tflops']:.0f})"
    return "fails" if f"{mode}_error" in row else "-"


def dense_table(report: dict) -> list[str]:
    """One line per (N, D, implementation): time (TFLOP/s), memory, ratio to cuDNN, floors."""
    lines = ["| N | D | B x H | impl | fwd ms (TFLOP/s) | fwd+bwd ms (TFLOP/s) | fwd+bwd MiB "
             "| cuDNN time / this: fwd, fwd+bwd | floors fwd: FLOP, bytes ms "
             "| floors fwd+bwd: FLOP, bytes ms |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    cudnn = {(r["n"], r["d"]): r for r in report["dense"] if r["impl"] == "cudnn"}
    for r in report["dense"]:
        base = cudnn.get((r["n"], r["d"]), {})
        if "skipped" in r:
            lines.append(f"| {r['n']} | {r['d']} | {r['batch']}x{r['heads']} | {r['impl']} | "
                         f"skipped: {r['skipped']} | | | | | |")
            continue
        ratios = [(base[f"{m}_ms"] / r[f"{m}_ms"]) if f"{m}_ms" in base and f"{m}_ms" in r
                  else None for m in ("fwd", "fwd_bwd")]
        mem = r.get("fwd_bwd_bytes")
        lines.append(
            f"| {r['n']} | {r['d']} | {r['batch']}x{r['heads']} | {r['impl']} | "
            f"{_cell(r, 'fwd')} | {_cell(r, 'fwd_bwd')} | "
            f"{_fmt(None if mem is None else mem / 2**20, 0)} | "
            f"{_fmt(ratios[0])}, {_fmt(ratios[1])} | "
            f"{_fmt(r.get('fwd_floor_flops_ms'), 3)}, {_fmt(r.get('fwd_floor_bytes_ms'), 3)} | "
            f"{_fmt(r.get('fwd_bwd_floor_flops_ms'), 3)}, "
            f"{_fmt(r.get('fwd_bwd_floor_bytes_ms'), 3)} |")
    return lines


def sparse_table(report: dict) -> list[str]:
    """Block-sparse time against density, with the speed-up over dense cuDNN at that shape."""
    if not report["sparse"]:
        return []
    first = report["sparse"][0]
    dense = next((r for r in report["dense"] if r["impl"] == "cudnn" and r["n"] == first["n"]
                  and r["d"] == first["d"] and r["heads"] == first["heads"]
                  and r["batch"] == first["batch"]), {})
    lines = [f"Block-sparse rows, N={first['n']}, D={first['d']}, B x H = "
             f"{first['batch']}x{first['heads']}, 128-token tiles, sliding window + 2 global "
             f"tiles. TFLOP/s count only computed tiles.", "",
             "| window | density | impl | fwd ms (TFLOP/s) | fwd+bwd ms (TFLOP/s) "
             "| dense cuDNN time / this: fwd, fwd+bwd |", "|---|---|---|---|---|---|"]
    for r in report["sparse"]:
        ratios = [(dense[f"{m}_ms"] / r[f"{m}_ms"]) if f"{m}_ms" in dense and f"{m}_ms" in r
                  else None for m in ("fwd", "fwd_bwd")]
        lines.append(f"| {r['window']} | {r['density']:.3f} | {r['impl']} | {_cell(r, 'fwd')} | "
                     f"{_cell(r, 'fwd_bwd')} | {_fmt(ratios[0])}, {_fmt(ratios[1])} |")
    return lines


def torch_line(report: dict) -> str:
    """Which PyTorch timed the peer rows (``torch-*``), or why there are none."""
    peers = report.get("torch")
    if peers is None:
        return "PyTorch peer rows: not asked for."
    about = peers.get("about")
    lines = []
    if about:
        lines.append(f"PyTorch peer rows (`torch-*`, CUDA events, same shapes, bf16): PyTorch "
                     f"{about['torch']}, CUDA {about['cuda']}, cuDNN {about['cudnn']}.")
    if peers.get("skipped"):
        lines.append(f"PyTorch peer rows {'cut short' if about else 'skipped'}: "
                     f"{peers['skipped']}.")
    return " ".join(lines)


def write_markdown(report: dict, path: Path) -> None:
    """The report as Markdown: provenance, ceilings, dense table, sparse table, failures."""
    ceil = report["ceilings"]
    lines = [f"# bench kernels: {report['device']}, JAX {report['jax']}", "",
             f"Command: `{report['command']}`. {report['dtype']}, non-causal. Measured ceilings: "
             f"{ceil['matmul_tflops']:.0f} TFLOP/s (bf16 8192^3 product), "
             f"{ceil['copy_gbps']:.0f} GB/s (copy, read + write). Times are medians; ratios are "
             f"against the plain cuDNN call (`cudnn`; `cudnn-lengths` passes a key mask as "
             f"sequence lengths).", "", torch_line(report), "",
             *dense_table(report), "", *sparse_table(report), ""]
    errors = [(r["impl"], r["n"], r["d"], r[k]) for r in report["dense"] + report["sparse"]
              for k in ("fwd_error", "fwd_bwd_error") if k in r]
    if errors:
        lines += ["Failures:", ""] + [f"- {i} N={n} D={d}: {e}" for i, n, d, e in errors]
    path.write_text("\n".join(lines) + "\n")


def write_plot(report: dict, path: Path) -> None:
    """Dense fwd+bwd TFLOP/s against N per head dim, and sparse time against density."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    dims = sorted({r["d"] for r in report["dense"]})
    fig, axes = plt.subplots(1, len(dims) + 1, figsize=(5 * (len(dims) + 1), 4))
    for ax, d in zip(axes, dims, strict=False):
        for impl in dict.fromkeys(r["impl"] for r in report["dense"]):
            pts = [(r["n"], r["fwd_bwd_tflops"]) for r in report["dense"]
                   if r["d"] == d and r["impl"] == impl and "fwd_bwd_tflops" in r]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=impl)
        ax.set(xscale="log", xlabel="N", ylabel="fwd+bwd TFLOP/s", title=f"D={d}")
        ax.legend(fontsize=7)
    ax = axes[-1]
    for impl in ("pallas-sparse", "pallas_mosaic-sparse", "torch-flex-sparse"):
        for mode in ("fwd", "fwd_bwd"):
            pts = [(r["density"], r[f"{mode}_ms"]) for r in report["sparse"]
                   if f"{mode}_ms" in r and r["impl"] == impl]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=f"{impl} {mode}")
    ax.set(xlabel="tile density", ylabel="ms", title="block-sparse")
    ax.legend(fontsize=7)
    fig.suptitle(f"{report['device']}, JAX {report['jax']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
