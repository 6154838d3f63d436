"""Times attention forward+backward on one GPU, bf16, dense non-causal, B x H = (16384 / N) x
(1024 / D): cuDNN (under jax.vjp), the Triton kernels (``pallas_attention(kernels="triton")``:
two-launch backward), and the Mosaic forward followed by the fused Mosaic backward (whose
fwd+bwd is the sum of the two launches' times; the backward includes the delta reduction and the
dQ cast). Prints compile times and the fused backward's relative gradient error against
cuDNN's. With ``--clocks`` each row also gets the mean SM clock, power and temperature that
``nvidia-smi`` sampled while it ran (sustained runs are power-capped: long shapes run at lower
clocks than short ones, and two kernels' times compare fairly only at like clocks).

    python3 scripts/time_mosaic_backward.py --n 16384 --d 64 [--plans default serial] [--clocks]

One shape per process: run shapes as separate processes under ``timeout``.
"""

import argparse
import dataclasses
import subprocess
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from xformers_zoo.kernels.cudnn import cudnn_attention
from xformers_zoo.kernels.pallas_attention import pallas_attention
from xformers_zoo.kernels.pallas_mosaic_backward import MosaicBackwardPlan, mosaic_backward
from xformers_zoo.kernels.pallas_mosaic_forward import MosaicPlan, mosaic_forward

PLANS = {
    "default": {},
    "serial": dict(overlap=False),
    "no-stagger": dict(stagger=False),
    "regs-232": dict(consumer_registers=232, producer_registers=40),
    "stages3": dict(stages=3),
}


def plan_changes(name: str) -> dict:
    """MosaicBackwardPlan fields of a plan name: one of PLANS, or several joined by '+'
    ("serial+no-stagger")."""
    changes = {}
    for part in name.split("+"):
        if part not in PLANS:
            raise SystemExit(f"unknown plan {part!r}; known: {', '.join(PLANS)}")
        changes.update(PLANS[part])
    return changes


T0 = time.perf_counter()


class ClockSampler:
    """Samples SM clock (MHz), power (W) and temperature (C) with nvidia-smi every 50 ms, each
    sample stamped with this process's perf_counter."""

    def __init__(self):
        self.samples = []
        self.proc = subprocess.Popen(
            ["nvidia-smi", "--query-gpu=clocks.sm,power.draw,temperature.gpu",
             "--format=csv,noheader,nounits", "-lms", "50"],
            stdout=subprocess.PIPE, text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            try:
                self.samples.append((time.perf_counter(), *map(float, line.split(","))))
            except ValueError:  # "[N/A]" fields
                continue

    def mean_over(self, start, end):
        """Mean (MHz, W, C) of the samples taken in [start, end], or None."""
        got = np.array([s[1:] for s in self.samples if start <= s[0] <= end])
        return got.mean(axis=0) if len(got) else None

    def stop(self):
        self.proc.terminate()


def log(msg):
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def compiled(name, f, *args):
    start = time.perf_counter()
    c = jax.jit(f).lower(*args).compile()
    log(f"compiled {name} in {time.perf_counter() - start:.1f}s")
    return c


def timeit(f, *args, repeats=20):
    """Best of three means of ``repeats`` back-to-back launches, in ms, and the (start, end)
    perf_counter window they ran in."""
    jax.block_until_ready(f(*args))
    best = float("inf")
    first = time.perf_counter()
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeats):
            r = f(*args)
        jax.block_until_ready(r)
        best = min(best, (time.perf_counter() - start) / repeats * 1e3)
    return best, (first, time.perf_counter())


def fwd_bwd(attn):
    def run(q, k, v, d_out):
        out, vjp = jax.vjp(attn, q, k, v)
        return out, vjp(d_out)
    return run


def rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=16384)
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--plans", nargs="+", default=["default"])
    parser.add_argument("--skip-triton", action="store_true")
    parser.add_argument("--repeats", type=int, default=20, help="launches per timed mean")
    parser.add_argument("--clocks", action="store_true",
                        help="report nvidia-smi's mean SM clock, power, temperature per row")
    args = parser.parse_args()
    sampler = ClockSampler() if args.clocks else None
    n, d = args.n, args.d
    b, h = max(1, 16384 // n), 1024 // d
    scale = d ** -0.5
    log(f"jax {jax.__version__} {jax.devices()[0].device_kind}: N={n} D={d} B={b} H={h}")
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v, d_out = (jax.random.normal(kk, (b, n, h, d), jnp.bfloat16) for kk in keys)
    flops_fwd = 4 * b * h * n * n * d
    work = {"fwd": flops_fwd, "bwd": 2.5 * flops_fwd, "fwd+bwd": 3.5 * flops_fwd}
    res = {}  # row name -> (ms, FLOPs, timed window or None for sums and differences)

    def measure(name, kind, f, *xs):
        """Times f as row ``name`` doing ``kind`` (a key of ``work``); returns its ms."""
        ms, window = timeit(f, *xs, repeats=args.repeats)
        res[name] = (ms, work[kind], window)
        return ms

    fplan = MosaicPlan(scale=scale)
    fwd = compiled("mosaic fwd", lambda q, k, v: mosaic_forward(q, k, v, None, fplan), q, k, v)
    fwd_ms = measure("mosaic fwd", "fwd", fwd, q, k, v)
    out, lse = fwd(q, k, v)
    bwds = {}  # plan name -> compiled backward
    for pname in args.plans:
        plan = dataclasses.replace(MosaicBackwardPlan(scale=scale), **plan_changes(pname))

        def bwd(q, k, v, o, lse, g, plan=plan):
            dq, dk, dv = mosaic_backward(q, k, v, o, lse, g, None, plan)
            return dq.astype(q.dtype), dk, dv
        bwds[pname] = compiled(f"fused bwd [{pname}]", bwd, q, k, v, out, lse, d_out)
        log(f"running fused bwd [{pname}]")
        ms = measure(f"fused bwd [{pname}]", "bwd", bwds[pname], q, k, v, out, lse, d_out)
        res[f"mosaic fwd + fused bwd [{pname}]"] = (fwd_ms + ms, work["fwd+bwd"], None)
        log(f"fused bwd [{pname}] {ms:.3f} ms")

    cudnn = lambda q, k, v: cudnn_attention(q, k, v, scale=scale)
    cudnn_fb = compiled("cudnn fwd+bwd", fwd_bwd(cudnn), q, k, v, d_out)
    measure("cudnn fwd", "fwd", compiled("cudnn fwd", cudnn, q, k, v), q, k, v)
    measure("cudnn fwd+bwd", "fwd+bwd", cudnn_fb, q, k, v, d_out)
    want = cudnn_fb(q, k, v, d_out)[1]
    for pname, bwd in bwds.items():
        got = bwd(q, k, v, out, lse, d_out)
        log(f"fused [{pname}] (after mosaic fwd) vs cuDNN grads, relative error: " + ", ".join(
            f"d{nm} {rel_err(g, w):.2e}" for nm, g, w in zip("qkv", got, want, strict=True)))
    if not args.skip_triton:
        ours = lambda q, k, v: pallas_attention(q, k, v, scale=scale, kernels="triton")
        measure("triton fwd", "fwd", compiled("triton fwd", ours, q, k, v), q, k, v)
        measure("triton fwd+bwd", "fwd+bwd",
                compiled("triton fwd+bwd", fwd_bwd(ours), q, k, v, d_out), q, k, v, d_out)
    for a in ("cudnn", "triton"):
        if f"{a} fwd+bwd" in res:
            ms = res[f"{a} fwd+bwd"][0] - res[f"{a} fwd"][0]
            res[f"{a} bwd (fwd+bwd - fwd)"] = (ms, work["bwd"], None)
    print(f"== N={n} D={d} B={b} H={h} bf16 (fwd {flops_fwd / 1e12:.2f} TFLOP; "
          f"bwd counted as 2.5x)", flush=True)
    for name, (ms, flops, window) in res.items():
        clocks = sampler.mean_over(*window) if sampler and window else None
        extra = "" if clocks is None else "  {:5.0f} MHz {:4.0f} W {:3.0f} C".format(*clocks)
        print(f"  {name:42s} {ms:8.3f} ms  {flops / ms / 1e9:5.0f} TF/s{extra}", flush=True)
    if sampler:
        sampler.stop()


if __name__ == "__main__":
    main()
