"""``xformers-zoo bench kernels``: attention implementations side by side on one card.

For each sequence length N and head dim D (bf16, non-causal; batch x N = ``--tokens`` and
heads x D = ``--width``, as in the FlashAttention-2 paper's benchmarks) it times the forward pass
and forward + backward of ``pallas`` (kernels/pallas_*.py), ``cudnn`` (the plain call, the
baseline of every ratio), ``cudnn-lengths`` (the same with a key mask as sequence lengths),
``xla``, JAX's bundled Pallas attentions (Triton ``mha`` and Mosaic GPU ``attention_mgpu``) and,
where PyTorch is installed, PyTorch's cuDNN attention and FlexAttention (``torch_peers``, timed
in a child process as a PyTorch user would time them), reports TFLOP/s
(4 B H N^2 D forward, 2.5x that backward), the compiled program's device memory, and two floors:
FLOPs over the measured bf16 matrix rate and bytes over the measured copy bandwidth. A second
table times block-sparse ``pallas`` against mask density at one length. Writes JSON, Markdown and
a PNG plot. ``--dropout-rate`` adds rows with attention dropout for the implementations that
take it (pallas, which gives dropout to the Triton kernels, pallas_mosaic, the Mosaic kernels
asked for by name and timed with dropout only, and xla). The block-sparse table has a
``pallas_mosaic-sparse`` row too (the Mosaic kernels by name, while block masks default to the
Triton kernels). Runs as ``xformers-zoo bench kernels``
(``python -m xformers_zoo bench kernels``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from xformers_zoo.bench.kernel_impls import (
    DROPOUT_IMPLS,
    DROPOUT_ONLY_IMPLS,
    IMPLS,
    make_inputs,
    parse_tiles,
)
from xformers_zoo.bench.kernel_report import write_markdown, write_plot
from xformers_zoo.bench.registry import register_benchmark
from xformers_zoo.bench.torch_peers import DENSE_PEERS, PEERS, SPARSE_PEER, run_peers
from xformers_zoo.kernels import masks


def median_seconds(fn, args, repeats: int, sample_seconds: float = 0.02) -> float:
    """Median time per call of ``fn(*args)`` after a warm-up call. Each sample launches enough
    calls back to back to last about ``sample_seconds``, so host dispatch hides behind the
    device work, and blocks on the last result."""
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    calls = max(1, int(sample_seconds / max(time.perf_counter() - start, 1e-6)))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            result = fn(*args)
        jax.block_until_ready(result)
        times.append((time.perf_counter() - start) / calls)
    return float(np.median(times))


def device_bytes(fn, args) -> int | None:
    """Arguments + outputs + temporaries of the compiled program (what it holds at its peak)."""
    try:
        stats = jax.jit(fn).lower(*args).compile().memory_analysis()
        return int(stats.argument_size_in_bytes + stats.output_size_in_bytes
                   + stats.temp_size_in_bytes)
    except Exception:  # noqa: BLE001 - some backends give no analysis; report none
        return None


def ceilings(repeats: int) -> dict:
    """Measured bf16 matrix rate (8192^3 product) and copy bandwidth (1 GiB read + written)."""
    a = jax.random.normal(jax.random.key(0), (8192, 8192), jnp.bfloat16)
    matmul = jax.jit(lambda a: a @ a)
    t = median_seconds(matmul, (a,), repeats)
    x = jax.random.normal(jax.random.key(1), (1 << 29,), jnp.bfloat16)  # 1 GiB
    copy = jax.jit(lambda x: x * 2)
    tc = median_seconds(copy, (x,), repeats)
    return {"matmul_tflops": 2 * 8192**3 / t / 1e12, "copy_gbps": 2 * x.nbytes / tc / 1e9}


def _fwd_bwd(attend):
    def run(q, k, v, d_out):
        out, vjp = jax.vjp(attend, q, k, v)
        return out, vjp(d_out)
    return run


def work_and_bytes(b: int, n: int, h: int, d: int, density: float = 1.0) -> dict:
    """(FLOPs, bytes moved) of each mode: 4 B H N^2 D forward (times the computed tiles'
    density), 2.5x that backward; q, k, v, O once forward, and q, k, v, O, dO, dq, dk, dv
    backward (bf16)."""
    flops = 4.0 * b * h * n * n * d * density
    elem = b * n * h * d * 2  # bytes of one bf16 [b, n, h, d] tensor
    return {"fwd": (flops, 4 * elem), "fwd_bwd": (3.5 * flops, 12 * elem)}


def add_timing(row: dict, mode: str, seconds: float, memory: int | None, work: dict,
               ceil: dict) -> None:
    """Puts one mode's time, TFLOP/s, memory and floors into ``row``."""
    flops, moved = work[mode]
    row[f"{mode}_ms"] = seconds * 1e3
    row[f"{mode}_tflops"] = flops / seconds / 1e12
    row[f"{mode}_bytes"] = memory
    row[f"{mode}_floor_flops_ms"] = flops / (ceil["matmul_tflops"] * 1e12) * 1e3
    row[f"{mode}_floor_bytes_ms"] = moved / (ceil["copy_gbps"] * 1e9) * 1e3


def measure(impl: str, attend, inputs, *, work: dict, ceil: dict, repeats: int) -> dict:
    """Forward and forward+backward time, TFLOP/s, memory and floors of one implementation."""
    row: dict = {"impl": impl}
    q, k, v, d_out = inputs
    for mode, fn, args in (("fwd", jax.jit(attend), (q, k, v)),
                           ("fwd_bwd", jax.jit(_fwd_bwd(attend)), (q, k, v, d_out))):
        try:
            seconds = median_seconds(fn, args, repeats)
        except Exception as err:  # noqa: BLE001 - a failing implementation is a result
            row[f"{mode}_error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
            continue
        add_timing(row, mode, seconds, device_bytes(fn, args), work, ceil)
    return row


def peer_row(measured: dict, ceil: dict, density: float = 1.0) -> dict:
    """A PyTorch peer's row (``bench_torch``: seconds and peak bytes per mode) in the form of
    the JAX rows."""
    row = {k: v for k, v in measured.items()
           if not k.endswith(("_seconds", "_bytes"))}
    work = work_and_bytes(row["batch"], row["n"], row["heads"], row["d"], density)
    for mode in ("fwd", "fwd_bwd"):
        if f"{mode}_seconds" in measured:
            add_timing(row, mode, measured[f"{mode}_seconds"], measured.get(f"{mode}_bytes"),
                       work, ceil)
    return row


def _variants(args) -> list[tuple[str, float]]:
    """(implementation[@tiles], dropout rate) of every dense row of one shape."""
    impls = [impl for impl in args.impls if impl in IMPLS]
    plain = [(impl, 0.0) for impl in [*impls, *(f"pallas@{t}" for t in args.pallas_tiles)]
             if impl not in DROPOUT_ONLY_IMPLS]
    dropped = [(impl, args.dropout_rate) for impl in impls
               if args.dropout_rate > 0.0 and impl in DROPOUT_IMPLS]
    return plain + dropped


def dense_rows(args, ceil) -> list[dict]:
    rows = []
    for n in args.seq_lens:
        for d in args.head_dims:
            b, h = max(1, args.tokens // n), max(1, args.width // d)
            inputs = make_inputs(b, n, h, d, seed=n + d)
            work = work_and_bytes(b, n, h, d)
            for impl, rate in _variants(args):
                name, _, tiles = impl.partition("@")
                attend, skip = IMPLS[name](b=b, n=n, h=h, d=d, dropout_rate=rate,
                                           tiles=parse_tiles(tiles) if tiles else None)
                impl = f"{impl}+dropout{rate:g}" if rate else impl
                row = {"n": n, "d": d, "batch": b, "heads": h}
                if skip:
                    rows.append(row | {"impl": impl, "skipped": skip})
                    continue
                row |= measure(impl, attend, inputs, work=work, ceil=ceil, repeats=args.repeats)
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


SPARSE_BLOCK, SPARSE_GLOBAL_TILES, SPARSE_HEAD_DIM = 128, 2, 64


def sparse_mask(n: int, window: int):
    """The block-sparse pattern of the sparse table: a ``window``-token sliding window and the
    first 2 tiles global, in 128-token tiles."""
    return masks.union(masks.sliding_window(n, window, SPARSE_BLOCK),
                       masks.global_tokens(n, SPARSE_GLOBAL_TILES, SPARSE_BLOCK))


def sparse_shape(args) -> tuple[int, int, int, int]:
    """(n, d, batch, heads) of the block-sparse rows."""
    return args.sparse_len, SPARSE_HEAD_DIM, 1, max(1, args.width // SPARSE_HEAD_DIM)


def _sparse_variants(args) -> list[tuple[str, str | None, float]]:
    """(implementation, tiles, dropout rate) of every block-sparse row of one window."""
    variants = [("pallas", tiles, 0.0) for tiles in [None, *args.sparse_tiles]]
    # The Mosaic kernels by name: ``pallas`` gives block masks to the Triton kernels until the
    # Mosaic mask path has passed its GPU tests (pallas_attention.MOSAIC_VALIDATED).
    variants += [("pallas_mosaic", None, 0.0)] if "pallas_mosaic" in args.impls else []
    return variants + ([("pallas", None, args.dropout_rate)] if args.dropout_rate > 0.0 else [])


def sparse_rows(args, ceil) -> list[dict]:
    """Block-sparse pallas against density (sliding windows of growing width, 2 global tiles)."""
    n, d, b, h = sparse_shape(args)
    inputs = make_inputs(b, n, h, d, seed=5)
    rows = []
    for window in args.windows:
        bm = sparse_mask(n, window)
        work = work_and_bytes(b, n, h, d, bm.density)
        for impl, tiles, rate in _sparse_variants(args):
            attend, _ = IMPLS[impl](b=b, n=n, h=h, d=d, block_mask=bm, dropout_rate=rate,
                                    tiles=parse_tiles(tiles) if tiles else None)
            row = {"n": n, "d": d, "batch": b, "heads": h, "window": window,
                   "density": bm.density}
            name = f"{impl}-sparse" + (f"@{tiles}" if tiles else "")
            row |= measure(name + (f"+dropout{rate:g}" if rate else ""), attend, inputs,
                           work=work, ceil=ceil, repeats=args.repeats)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def add_torch_peers(args, ceil, report: dict) -> None:
    """Runs the PyTorch peer rows (``torch_peers``) in a child process and puts each after the
    JAX rows of its shape (dense) or window (block-sparse); ``report["torch"]`` says
    which PyTorch ran them, or why none did."""
    shapes = [(n, d, max(1, args.tokens // n), max(1, args.width // d))
              for n in args.seq_lens for d in args.head_dims]
    peers = [p for p in DENSE_PEERS if p in args.impls]
    print("timing the PyTorch peer rows in a child process (FlexAttention compiles per shape; "
          f"at most {args.torch_timeout:.0f} s)", flush=True)
    windows = [w for w in args.torch_windows if w in args.windows]
    sparse = SPARSE_PEER in args.impls and windows
    rows, about, reason = run_peers(
        shapes if peers else [], peers=peers, sparse_shape=sparse_shape(args) if sparse else None,
        windows=windows, block=SPARSE_BLOCK, global_tiles=SPARSE_GLOBAL_TILES,
        repeats=args.repeats, timeout=args.torch_timeout)
    report["torch"] = {"about": about, "skipped": reason}
    print(json.dumps({"torch": report["torch"]}), flush=True)
    density = {r["window"]: r["density"] for r in report["sparse"]}
    for measured in rows:
        window = measured.get("window")
        row = peer_row(measured, ceil, 1.0 if window is None else density.get(window, 1.0))
        if window is not None:
            row["density"] = density.get(window)
        print(json.dumps(row), flush=True)
        table = report["dense" if window is None else "sparse"]
        same = [i for i, r in enumerate(table) if (r["n"], r["d"], r.get("window")) ==
                (row["n"], row["d"], window)]
        table.insert(same[-1] + 1 if same else len(table), row)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="xformers-zoo bench kernels",
                                description=__doc__.split("\n")[0])
    p.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    p.add_argument("--head-dims", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--impls", nargs="+", default=[*IMPLS, *PEERS], choices=[*IMPLS, *PEERS],
                   help="rows to time; torch-* are PyTorch's (xformers_zoo/bench/torch_peers.py)")
    p.add_argument("--pallas-tiles", nargs="*", default=[],
                   help="extra pallas rows: 'q,k,warps,stages[,max_steps]' for forward/kv "
                        "grads/q grads, '/'-separated (max_steps: split block-sparse rows "
                        "longer than that; 0 never)")
    p.add_argument("--tokens", type=int, default=16384, help="batch x length per shape")
    p.add_argument("--width", type=int, default=1024, help="heads x head_dim per shape")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--sparse-len", type=int, default=16384)
    p.add_argument("--windows", type=int, nargs="*", default=[512, 1024, 2048, 4096, 8192, 16384])
    p.add_argument("--sparse-tiles", nargs="*", default=[],
                   help="extra block-sparse rows with other tiles (as --pallas-tiles)")
    p.add_argument("--dropout-rate", type=float, default=0.0,
                   help="also time pallas (Triton kernels), pallas_mosaic (Mosaic kernels) and "
                        "xla with this attention dropout (dense rows, and default-tile "
                        "block-sparse pallas rows)")
    p.add_argument("--no-torch", dest="torch", action="store_false",
                   help="leave out the PyTorch peer rows (cuDNN attention, FlexAttention)")
    p.add_argument("--torch-windows", type=int, nargs="*", default=[512],
                   help="windows (of --windows) that get a torch-flex-sparse row: each one "
                        "compiles FlexAttention anew")
    p.add_argument("--torch-timeout", type=float, default=1800.0,
                   help="seconds the PyTorch peer rows may take in all")
    p.add_argument("--out", type=Path, default=Path("results"))
    p.add_argument("--name", default="bench_kernels", help="file stem of the outputs")
    return p.parse_args(argv)


@register_benchmark("kernels", help="attention kernels side by side (forward, forward+backward)")
def main(argv: list[str] | None = None) -> int:
    """Runs the benchmark and writes ``<out>/<name>.{json,md,png}``; returns an exit status."""
    args = parse_args(argv)
    if jax.default_backend() != "gpu":
        print("bench kernels needs a CUDA GPU; backend is", jax.default_backend(), file=sys.stderr)
        return 2
    device = jax.devices()[0]
    ceil = ceilings(args.repeats)
    print(json.dumps(ceil), flush=True)
    report = {
        "device": device.device_kind, "jax": jax.__version__, "python": platform.python_version(),
        "command": " ".join(["xformers-zoo bench kernels", *(argv if argv is not None
                                                            else sys.argv[1:])]),
        "dtype": "bfloat16", "causal": False, "ceilings": ceil,
        "dense": dense_rows(args, ceil),
        "sparse": sparse_rows(args, ceil) if args.windows else [],
    }
    if args.torch and any(p in args.impls for p in PEERS):
        add_torch_peers(args, ceil, report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=1))
    write_markdown(report, args.out / f"{args.name}.md")
    write_plot(report, args.out / f"{args.name}.png")
    print((args.out / f"{args.name}.md").read_text())
    return 0

