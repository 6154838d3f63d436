"""Launches the fused Mosaic backward many times, each launch (with ``--fresh``) a newly
compiled kernel, printing one line per launch, to find under which conditions a launch never
finishes (run it under ``timeout``; the last line printed says how far it got).

    timeout 60 python3 scripts/probe_mosaic_stall.py --n 1024 --d 128 --launches 15 --fresh
"""

import argparse
import time

import jax
import jax.numpy as jnp

from xformers_zoo.kernels.pallas_mosaic_backward import MosaicBackwardPlan, mosaic_backward


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--launches", type=int, default=15)
    parser.add_argument("--fresh", action="store_true", help="compile a new kernel per launch")
    parser.add_argument("--skip-dq", action="store_true", help="no dQ reduce-adds")
    parser.add_argument("--split", default=MosaicBackwardPlan.dq_split,
                        help="dq_split of the plan")
    parser.add_argument("--highest", action="store_true",
                        help="jax_default_matmul_precision=highest, as the tests set it")
    parser.add_argument("--reference", action="store_true",
                        help="feed O and LSE of an XLA reference dispatched just before, "
                             "without waiting for it, as the tests do")
    args = parser.parse_args()
    if args.highest:
        jax.config.update("jax_default_matmul_precision", "highest")
    n, d = args.n, args.d
    start = time.perf_counter()
    f = None
    for i in range(args.launches):
        # A plan that differs in its scale is a new kernel: compiled and loaded anew.
        scale = d ** -0.5 * (1.0 + (i * 1e-6 if args.fresh else 0.0))
        plan = MosaicBackwardPlan(scale=scale, dq_store="none" if args.skip_dq else "reduce",
                                  dq_split=args.split)
        if f is None or args.fresh:
            f = jax.jit(lambda *a, plan=plan: mosaic_backward(*a, None, plan))
        keys = jax.random.split(jax.random.key(i), 4)
        q, k, v, g = (jax.random.normal(kk, (2, n, 2, d), jnp.bfloat16) for kk in keys)
        if args.reference:
            s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
            lse = jax.nn.logsumexp(s, axis=-1) / jnp.log(2.0)
            out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), v.astype(jnp.float32))
            out = out.astype(q.dtype)
        else:
            lse = jnp.full((2, 2, n), 8.0, jnp.float32)
            out = q
            jax.block_until_ready((q, k, v, g, lse))
        t = time.perf_counter()
        jax.block_until_ready(f(q, k, v, out, lse, g))
        print(f"[{time.perf_counter() - start:6.1f}s] launch {i} done in "
              f"{(time.perf_counter() - t) * 1e3:.0f} ms", flush=True)


if __name__ == "__main__":
    main()
