"""Times attention forward+backward on one GPU, bf16, dense non-causal, B x H = (16384 / N) x
(1024 / D): cuDNN (under jax.vjp), the Triton kernels (``pallas_attention(kernels="triton")``:
two-launch backward), and the Mosaic forward followed by the fused Mosaic backward (whose
fwd+bwd is the sum of the two launches' times; the backward includes the delta reduction and the
dQ cast). Prints compile times and the fused backward's relative gradient error against
cuDNN's.

    python3 scripts/time_mosaic_backward.py --n 16384 --d 64 [--plans default no-dq]

One shape per process: run shapes as separate processes under ``timeout``.
"""

import argparse
import dataclasses
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
    "3-stages": dict(stages=3),
    "regs-232": dict(consumer_registers=232, producer_registers=40),
    "columns": dict(dq_split="columns"),
    "stages3": dict(stages=3),
    "steps": dict(dq_split="steps"),
    "no-dq": dict(skip_dq_store=True),  # diagnostic: wrong dQ, measures the reduce-adds' cost
}
T0 = time.perf_counter()


def log(msg):
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def compiled(name, f, *args):
    start = time.perf_counter()
    c = jax.jit(f).lower(*args).compile()
    log(f"compiled {name} in {time.perf_counter() - start:.1f}s")
    return c


def timeit(f, *args, repeats=20):
    jax.block_until_ready(f(*args))
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeats):
            r = f(*args)
        jax.block_until_ready(r)
        best = min(best, (time.perf_counter() - start) / repeats * 1e3)
    return best


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
    args = parser.parse_args()
    n, d = args.n, args.d
    b, h = max(1, 16384 // n), 1024 // d
    scale = d ** -0.5
    log(f"jax {jax.__version__} {jax.devices()[0].device_kind}: N={n} D={d} B={b} H={h}")
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v, d_out = (jax.random.normal(kk, (b, n, h, d), jnp.bfloat16) for kk in keys)
    flops_fwd = 4 * b * h * n * n * d
    res = {}

    fplan = MosaicPlan(scale=scale, has_lengths=False)
    fwd = compiled("mosaic fwd", lambda q, k, v: mosaic_forward(q, k, v, None, fplan), q, k, v)
    res["mosaic fwd"] = timeit(fwd, q, k, v)
    out, lse = fwd(q, k, v)
    bwds = {}
    for pname in args.plans:
        plan = dataclasses.replace(MosaicBackwardPlan(scale=scale), **PLANS[pname])

        def bwd(q, k, v, o, lse, g, plan=plan):
            dq, dk, dv = mosaic_backward(q, k, v, o, lse, g, None, plan)
            return dq.astype(q.dtype), dk, dv
        bwds[pname] = compiled(f"fused bwd [{pname}]", bwd, q, k, v, out, lse, d_out)
        log(f"running fused bwd [{pname}]")
        res[f"fused bwd [{pname}]"] = timeit(bwds[pname], q, k, v, out, lse, d_out)
        res[f"mosaic fwd + fused bwd [{pname}]"] = res["mosaic fwd"] + res[f"fused bwd [{pname}]"]
        log(f"fused bwd [{pname}] {res[f'fused bwd [{pname}]']:.3f} ms")

    cudnn = lambda q, k, v: cudnn_attention(q, k, v, scale=scale)
    cudnn_fb = compiled("cudnn fwd+bwd", fwd_bwd(cudnn), q, k, v, d_out)
    res["cudnn fwd"] = timeit(compiled("cudnn fwd", cudnn, q, k, v), q, k, v)
    res["cudnn fwd+bwd"] = timeit(cudnn_fb, q, k, v, d_out)
    if "default" in bwds:
        got = bwds["default"](q, k, v, out, lse, d_out)
        want = cudnn_fb(q, k, v, d_out)[1]
        log("fused (after mosaic fwd) vs cuDNN grads, relative error: " + ", ".join(
            f"d{nm} {rel_err(g, w):.2e}" for nm, g, w in zip("qkv", got, want, strict=True)))
    if not args.skip_triton:
        ours = lambda q, k, v: pallas_attention(q, k, v, scale=scale, kernels="triton")
        res["triton fwd"] = timeit(compiled("triton fwd", ours, q, k, v), q, k, v)
        res["triton fwd+bwd"] = timeit(compiled("triton fwd+bwd", fwd_bwd(ours), q, k, v,
                                                 d_out), q, k, v, d_out)
    for a, base in (("cudnn", "cudnn fwd"), ("triton", "triton fwd")):
        if f"{a} fwd+bwd" in res:
            res[f"{a} bwd (fwd+bwd - fwd)"] = res[f"{a} fwd+bwd"] - res[base]
    print(f"== N={n} D={d} B={b} H={h} bf16 (fwd {flops_fwd / 1e12:.2f} TFLOP; "
          f"bwd counted as 2.5x)", flush=True)
    for name, t in res.items():
        if "fwd+bwd" in name or "fwd + fused" in name:
            work = 3.5 * flops_fwd
        elif "bwd" in name:
            work = 2.5 * flops_fwd
        else:
            work = flops_fwd
        print(f"  {name:42s} {t:8.3f} ms  {work / t / 1e9:5.0f} TF/s", flush=True)


if __name__ == "__main__":
    main()
