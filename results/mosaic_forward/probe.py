import time, sys, traceback
import jax, jax.numpy as jnp, numpy as np
from xformers_zoo.kernels.pallas_mosaic_forward import MosaicPlan, mosaic_forward
from xformers_zoo.kernels.pallas_forward import flash_forward
from xformers_zoo.kernels.xla import xla_attention
from xformers_zoo.kernels.cudnn import cudnn_attention
print(jax.__version__, jax.devices())

def ref(q, k, v, lengths, scale):
    f = lambda x: x.astype(jnp.float32)
    mask = None if lengths is None else (jnp.arange(k.shape[1])[None] < lengths[:, None])
    s = jnp.einsum("bqhd,bkhd->bhqk", f(q), f(k)) * scale
    if mask is not None: s = jnp.where(mask[:, None, None], s, -jnp.inf)
    lse = jax.nn.logsumexp(s, -1) / np.log(2)
    return xla_attention(f(q), f(k), f(v), key_mask=mask, scale=scale), lse

for d in (64, 128):
  for dtype in (jnp.bfloat16, jnp.float16):
    for lengths in (None, [300, 0, 129]):
      try:
        b, nq, nk, h = 3, 256, 384, 2
        ks = jax.random.split(jax.random.key(d), 3)
        q, k, v = (jax.random.normal(kk, (b, n, h, d), dtype) for kk, n in zip(ks, (nq, nk, nk)))
        L = None if lengths is None else jnp.array(lengths, jnp.int32)
        out, lse = mosaic_forward(q, k, v, L, MosaicPlan(scale=d**-0.5, has_lengths=L is not None))
        r, rl = ref(q, k, v, L, d**-0.5)
        err = float(jnp.abs(out.astype(jnp.float32) - r).max())
        finite = np.isfinite(np.asarray(rl))
        lerr = float(np.abs(np.where(finite, np.asarray(lse) - np.asarray(rl), 0)).max())
        empty_ok = True if lengths is None else bool((np.asarray(lse)[1] > 1e29).all() and (np.asarray(out[1]) == 0).all())
        print(f"D={d} {jnp.dtype(dtype).name} lengths={lengths}: out err {err:.4f} lse err {lerr:.4f} empty ok {empty_ok}", flush=True)
      except Exception:
        traceback.print_exc(); print(f"FAILED D={d} {dtype} {lengths}", flush=True)

def timeit(f, *a, n=20):
    r = f(*a); jax.block_until_ready(r)
    t = time.perf_counter()
    for _ in range(n): r = f(*a)
    jax.block_until_ready(r)
    return (time.perf_counter() - t) / n * 1e3

for n in (1024, 4096, 16384):
  for d in (64, 128):
    b, h = 16384 // n, 1024 // d
    ks = jax.random.split(jax.random.key(1), 3)
    q, k, v = (jax.random.normal(kk, (b, n, h, d), jnp.bfloat16) for kk in ks)
    flops = 4 * b * h * n * n * d
    res = {}
    for stages in (2, 3):
      for bk in (64, 128):
        if d == 128 and bk == 128 and stages == 3: continue
        try:
          f = jax.jit(lambda q, k, v, bk=bk, st=stages: mosaic_forward(q, k, v, None, MosaicPlan(scale=d**-0.5, has_lengths=False, block_k=bk, stages=st))[0])
          res[f"mosaic bk{bk} s{stages}"] = timeit(f, q, k, v)
        except Exception as e:
          res[f"mosaic bk{bk} s{stages}"] = float("nan"); print("ERR", str(e)[:300])
    try:
      L = jnp.full((b,), n - 100, jnp.int32)
      f = jax.jit(lambda q, k, v, L: mosaic_forward(q, k, v, L, MosaicPlan(scale=d**-0.5, has_lengths=True))[0])
      res["mosaic len n-100"] = timeit(f, q, k, v, L)
    except Exception as e:
      print("ERR", str(e)[:300])
    from xformers_zoo.kernels.pallas_attention import pallas_attention
    res["triton fwd"] = timeit(jax.jit(lambda q, k, v: pallas_attention(q, k, v, scale=d**-0.5)), q, k, v)
    res["cudnn fwd"] = timeit(jax.jit(lambda q, k, v: cudnn_attention(q, k, v, scale=d**-0.5)), q, k, v)
    print(f"N={n} D={d} B={b} H={h}: " + ", ".join(f"{kk} {t:.3f}ms ({flops/t/1e9:.0f} TF/s)" for kk, t in res.items()), flush=True)
