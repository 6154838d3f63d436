"""PyTorch's attention kernels as peer rows of ``xformers-zoo bench kernels``: cuDNN attention
through ``torch.nn.functional.scaled_dot_product_attention`` (``torch-cudnn``), and
FlexAttention (He et al. 2024, "FlexAttention: The Flexibility of PyTorch with the Performance of
FlashAttention") compiled with ``torch.compile``, dense (``torch-flex``) and over the bench's
block-sparse pattern as a ``mask_mod`` (``torch-flex-sparse``).

They are timed as a PyTorch user would time them: bf16 ``[batch, heads, length, head_dim]``
tensors, warm-up calls first (which include the compile), then CUDA events around back-to-back
calls; forward+backward is ``torch.autograd.grad`` of the output against a fixed cotangent.

The rows run in a child process (``run_peers``), so that PyTorch's CUDA libraries (its own cuDNN
among them) never load beside JAX's. This file imports nothing of the package: the child runs it
as a script. torch is imported there only; without it, or without a CUDA device, the child says
why and the bench goes on without these rows.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
from pathlib import Path

log = logging.getLogger("xformers_zoo.bench")

DENSE_PEERS = ("torch-cudnn", "torch-flex")
SPARSE_PEER = "torch-flex-sparse"
PEERS = (*DENSE_PEERS, SPARSE_PEER)
MODES = ("fwd", "fwd_bwd")


def window_global_visible(q_idx, kv_idx, *, window: int, block: int, global_tiles: int):
    """Whether query ``q_idx`` sees key ``kv_idx`` in the bench's block-sparse pattern: tiles of
    ``block`` tokens within ``window // 2`` tokens of each other (``masks.sliding_window``),
    plus the first ``global_tiles`` tiles, which see and are seen by all
    (``masks.global_tokens``). Takes numpy arrays or torch tensors (a FlexAttention
    ``mask_mod``)."""
    q_tile, k_tile = q_idx // block, kv_idx // block
    # Nearest tokens of two tiles lie (|qi - kj| - 1) * block + 1 apart (the diagonal: 0).
    near = abs(q_tile - k_tile) * block - (block - 1) <= window // 2
    return near | (q_tile < global_tiles) | (k_tile < global_tiles)


def median_seconds(torch, fn, repeats: int, sample_seconds: float) -> float:
    """Median seconds per ``fn()`` call: three warm-up calls, then ``repeats`` samples, each
    enough back-to-back calls to last about ``sample_seconds``, timed by CUDA events."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    calls = max(1, int(sample_seconds * 1e3 / max(start.elapsed_time(end), 1e-3)))
    times = []
    for _ in range(repeats):
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    return statistics.median(times)


def peak_bytes(torch, fn) -> int:
    """Peak bytes allocated while ``fn()`` runs, the inputs (already allocated) included."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated())


def _attend_fns(torch, impl: str, d: int, block_mask):
    """``attend(q, k, v)`` of one peer row."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import flex_attention

    if impl == "torch-cudnn":
        def attend(q, k, v):
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=d**-0.5)
        return attend
    flex = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v: flex(q, k, v, block_mask=block_mask, scale=d**-0.5)


def measure_row(torch, impl: str, b: int, n: int, h: int, d: int, *, block_mask, seed: int,
                repeats: int, sample_seconds: float) -> dict:
    """Seconds and peak bytes of the forward and forward+backward of one peer at one shape."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v, d_out = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16,
                                  generator=gen) for _ in range(4))
    for x in (q, k, v):
        x.requires_grad_(True)
    attend = _attend_fns(torch, impl, d, block_mask)

    def forward():
        with torch.no_grad():
            return attend(q, k, v)

    def forward_backward():
        return torch.autograd.grad(attend(q, k, v), (q, k, v), d_out)

    row: dict = {"impl": impl, "n": n, "d": d, "batch": b, "heads": h}
    for mode, fn in zip(MODES, (forward, forward_backward), strict=True):
        try:
            row[f"{mode}_seconds"] = median_seconds(torch, fn, repeats, sample_seconds)
            row[f"{mode}_bytes"] = peak_bytes(torch, fn)
        except Exception as err:  # noqa: BLE001 - a failing kernel is a result
            row[f"{mode}_error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    return row


def _unavailable() -> tuple[object | None, str | None]:
    """(torch, None), or (None, why PyTorch cannot run the peers here)."""
    try:
        import torch
    except ImportError as err:
        return None, f"PyTorch is not importable ({err})"
    if not torch.cuda.is_available():
        return None, f"PyTorch {torch.__version__} sees no CUDA device"
    return torch, None


def _child(argv: list[str]) -> int:
    """The child process: one JSON line per row (``about`` first, or ``unavailable``)."""
    p = argparse.ArgumentParser(description="PyTorch peer rows of bench kernels")
    p.add_argument("--peers", nargs="*", default=list(DENSE_PEERS), choices=DENSE_PEERS,
                   help="dense peer rows to run")
    p.add_argument("--dense", nargs="*", default=[], help="shapes as n,d,batch,heads")
    p.add_argument("--sparse", default=None, help="n,d,batch,heads of the block-sparse rows")
    p.add_argument("--windows", type=int, nargs="*", default=[])
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--global-tiles", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--sample-seconds", type=float, default=0.02)
    args = p.parse_args(argv)
    torch, reason = _unavailable()
    if torch is None:
        print(json.dumps({"unavailable": reason}), flush=True)
        return 0
    import torch._dynamo

    # One compiled FlexAttention per shape and mode: more than dynamo's default of 8 recompiles,
    # past which it would silently fall back to eager (N x N) attention.
    for limit in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, limit):
            setattr(torch._dynamo.config, limit, 256)
    print(json.dumps({"about": {"torch": torch.__version__, "cuda": torch.version.cuda,
                                "cudnn": torch.backends.cudnn.version(),
                                "device": torch.cuda.get_device_name()}}), flush=True)
    timing = dict(repeats=args.repeats, sample_seconds=args.sample_seconds)
    for shape in args.dense:
        n, d, b, h = map(int, shape.split(","))
        for impl in args.peers:
            row = measure_row(torch, impl, b, n, h, d, block_mask=None, seed=n + d, **timing)
            print(json.dumps(row), flush=True)
    if args.sparse:
        from torch.nn.attention.flex_attention import create_block_mask

        n, d, b, h = map(int, args.sparse.split(","))
        for window in args.windows:
            def mask_mod(batch, head, q_idx, kv_idx, window=window):
                return window_global_visible(q_idx, kv_idx, window=window, block=args.block,
                                             global_tiles=args.global_tiles)

            # Compiled, so the mask is built tile by tile, never as N x N booleans.
            block_mask = create_block_mask(mask_mod, None, None, n, n, device="cuda",
                                           BLOCK_SIZE=args.block, _compile=True)
            row = measure_row(torch, SPARSE_PEER, b, n, h, d, block_mask=block_mask, seed=5,
                              **timing)
            print(json.dumps(row | {"window": window}), flush=True)
    return 0


def run_peers(dense_shapes, *, peers=DENSE_PEERS, sparse_shape=None, windows=(),
              block: int = 128, global_tiles: int = 2, repeats: int = 10,
              timeout: float = 1800.0,
              python: str = sys.executable) -> tuple[list[dict], dict | None, str | None]:
    """Runs the ``peers`` (of ``DENSE_PEERS``) at ``dense_shapes`` and, given a ``sparse_shape``
    and ``windows``, the block-sparse FlexAttention rows, in a child process. Shapes are (n, d,
    batch, heads). Returns (rows with ``<mode>_seconds`` / ``<mode>_bytes`` or
    ``<mode>_error``, the PyTorch build that ran them or None, why no rows or only some were
    measured or None)."""
    # -P keeps this file's folder (modules named data, kernels...) off the child's import path.
    cmd = [python, "-P", str(Path(__file__).resolve()), "--block", str(block),
           "--global-tiles", str(global_tiles), "--repeats", str(repeats),
           "--peers", *peers, "--dense", *(",".join(map(str, s)) for s in dense_shapes)]
    if sparse_shape is not None and windows:
        cmd += ["--sparse", ",".join(map(str, sparse_shape)), "--windows", *map(str, windows)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        rows, about, reason = _parse(done.stdout)
        if done.returncode != 0:
            tail = " | ".join(done.stderr.strip().splitlines()[-3:])
            reason = f"the PyTorch child exited with status {done.returncode}: {tail}"
    except subprocess.TimeoutExpired as err:
        rows, about, _ = _parse(err.stdout or "")
        reason = f"the PyTorch rows ran past {timeout:.0f} s (--torch-timeout)"
    if reason:
        log.warning("bench kernels: PyTorch peer rows %s: %s",
                    "cut short" if rows else "skipped", reason)
    return rows, about, reason


def _parse(stdout) -> tuple[list[dict], dict | None, str | None]:
    if isinstance(stdout, bytes):
        stdout = stdout.decode(errors="replace")
    rows, about, reason = [], None, None
    for line in stdout.splitlines():
        if not line.startswith("{"):
            continue
        record = json.loads(line)
        if "unavailable" in record:
            reason = record["unavailable"]
        elif "about" in record:
            about = record["about"]
        else:
            rows.append(record)
    return rows, about, reason


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
