"""First GPU check of the Mosaic forward (the run in probe_first_run.log): correctness against a
float32 reference, then forward times for key tiles 64/128 and 2/3 ring slots against the
Triton forward and cuDNN. Run on a Hopper GPU: ``python3 results/mosaic_forward/probe.py``."""

import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from xformers_zoo.kernels.cudnn import cudnn_attention
from xformers_zoo.kernels.pallas_attention import pallas_attention
from xformers_zoo.kernels.pallas_mosaic_forward import MosaicPlan, mosaic_forward
from xformers_zoo.kernels.xla import xla_attention


def reference(q, k, v, lengths, scale):
    """Output and base-2 LSE in float32."""
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    mask = None if lengths is None else (jnp.arange(k.shape[1])[None] < lengths[:, None])
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if mask is not None:
        s = jnp.where(mask[:, None, None], s, -jnp.inf)
    lse = jax.nn.logsumexp(s, -1) / np.log(2)
    return xla_attention(q, k, v, key_mask=mask, scale=scale), lse


def check(d, dtype, lengths):
    b, nq, nk, h = 3, 256, 384, 2
    keys = jax.random.split(jax.random.key(d), 3)
    q, k, v = (jax.random.normal(key, (b, n, h, d), dtype)
               for key, n in zip(keys, (nq, nk, nk), strict=True))
    lens = None if lengths is None else jnp.array(lengths, jnp.int32)
    plan = MosaicPlan(scale=d**-0.5, has_lengths=lens is not None)
    out, lse = mosaic_forward(q, k, v, lens, plan)
    want, want_lse = reference(q, k, v, lens, d**-0.5)
    err = float(jnp.abs(out.astype(jnp.float32) - want).max())
    finite = np.isfinite(np.asarray(want_lse))
    lse_err = float(np.abs(np.where(finite, np.asarray(lse) - np.asarray(want_lse), 0)).max())
    empty_ok = lengths is None or bool((np.asarray(lse)[1] > 1e29).all()
                                       and (np.asarray(out[1]) == 0).all())
    print(f"D={d} {jnp.dtype(dtype).name} lengths={lengths}: out err {err:.4f} "
          f"lse err {lse_err:.4f} empty ok {empty_ok}", flush=True)


def timeit(fn, *args, n=20):
    """Milliseconds per call, back to back after one warm-up call."""
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    for _ in range(n):
        result = fn(*args)
    jax.block_until_ready(result)
    return (time.perf_counter() - start) / n * 1e3


def time_shape(n, d):
    b, h = 16384 // n, 1024 // d
    keys = jax.random.split(jax.random.key(1), 3)
    q, k, v = (jax.random.normal(key, (b, n, h, d), jnp.bfloat16) for key in keys)
    scale = d**-0.5
    times = {}
    for stages in (2, 3):
        for block_k in (64, 128):
            if d == 128 and block_k == 128 and stages == 3:
                continue  # does not fit in shared memory
            plan = MosaicPlan(scale=scale, has_lengths=False, block_k=block_k, stages=stages)
            fn = jax.jit(lambda q, k, v, plan=plan: mosaic_forward(q, k, v, None, plan)[0])
            times[f"mosaic bk{block_k} s{stages}"] = timeit(fn, q, k, v)
    lengths = jnp.full((b,), n - 100, jnp.int32)
    plan = MosaicPlan(scale=scale, has_lengths=True)
    fn = jax.jit(lambda q, k, v, lengths: mosaic_forward(q, k, v, lengths, plan)[0])
    times["mosaic len n-100"] = timeit(fn, q, k, v, lengths)
    fn = jax.jit(lambda q, k, v: pallas_attention(q, k, v, scale=scale, kernels="triton"))
    times["triton fwd"] = timeit(fn, q, k, v)
    fn = jax.jit(lambda q, k, v: cudnn_attention(q, k, v, scale=scale))
    times["cudnn fwd"] = timeit(fn, q, k, v)
    flops = 4 * b * h * n * n * d
    print(f"N={n} D={d} B={b} H={h}: " + ", ".join(
        f"{name} {t:.3f}ms ({flops / t / 1e9:.0f} TF/s)" for name, t in times.items()), flush=True)


def main():
    print(jax.__version__, jax.devices())
    for d in (64, 128):
        for dtype in (jnp.bfloat16, jnp.float16):
            for lengths in (None, [300, 0, 129]):
                try:
                    check(d, dtype, lengths)
                except Exception:
                    traceback.print_exc()
                    print(f"FAILED D={d} {dtype} {lengths}", flush=True)
    for n in (1024, 4096, 16384):
        for d in (64, 128):
            time_shape(n, d)


if __name__ == "__main__":
    main()
