"""Ring attention on 8 simulated CPU devices against unsharded attention; run as a script by
tests/test_ring_attention.py (the device count must be set before JAX starts, and the rest of
the suite runs on one device). Prints one JSON object: case name -> the largest absolute
differences of the output and of dq, dk, dv (or, for refusals, the error message)."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8")
os.environ["XFORMERS_ZOO_PALLAS_INTERPRET"] = "1"

import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

from xformers_zoo.kernels import BlockMask, dot_product_attention, masks  # noqa: E402
from xformers_zoo.kernels import predicates as pred  # noqa: E402
from xformers_zoo.kernels.ring_blocks import pair_blocks  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

DEVICES = np.array(jax.devices())
SEQ_8 = Mesh(DEVICES, ("seq",))
DATA_2_SEQ_4 = Mesh(DEVICES.reshape(2, 4), ("data", "seq"))
SEQ_2 = Mesh(DEVICES[:2], ("seq",))

LONGFORMER = pred.union(pred.sliding_window(12), pred.global_tokens(8))
# BigBird-like: a window of blocks, a global block and random 16-token tiles.
BIGBIRD = pred.union(pred.block_window(16, 1), pred.global_tokens(16)).with_tiles(
    masks.random_blocks(128, 2, 16, seed=3))


def inputs(batch=2, length=128, heads=2, head_dim=16, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    q, k, v, d_out = (jax.random.normal(x, (batch, length, heads, head_dim), jnp.float32)
                      for x in keys)
    lengths = jnp.array([length, length // 2 - 5] + [length - 3] * (batch - 2))[:batch]
    key_mask = jnp.arange(length)[None] < lengths[:, None]
    return q, k, v, d_out, key_mask


def differences(mesh, options, *, length=128, implementation=("xla",), reference=None):
    """Largest |ring - unsharded| of the output and the q, k, v gradients (a cotangent drawn
    at random), the ring run under jit with ``mesh`` in context."""
    q, k, v, d_out, key_mask = inputs(length=length)
    options = dict(options)
    if options.pop("key_mask", False):
        options["key_mask"] = key_mask

    def attend(axis, impl):
        return lambda q, k, v: dot_product_attention(q, k, v, implementation=impl,
                                                     sequence_axis=axis, **options)

    with jax.set_mesh(mesh):
        out, vjp = jax.vjp(jax.jit(attend("seq", implementation)), q, k, v)
        grads = vjp(d_out)
    want, vjp = jax.vjp(reference or attend(None, ("xla",)), q, k, v)
    want_grads = vjp(d_out)
    return {name: float(jnp.abs(a - b).max())
            for name, a, b in zip(("out", "dq", "dk", "dv"), (out, *grads), (want, *want_grads),
                                  strict=True)}


def dropout_reference(rate, rng, shards, batch_shards=1):
    """Dense attention dropping weights with the decisions ring attention draws: pair (i, j)
    of blocks takes them from fold_in(rng, i * shards + j), after folding in the batch shard's
    index when the batch is split."""
    def attend(q, k, v):
        b, n, h, _ = q.shape
        size, local = n // shards, b // batch_shards
        keep = []
        for d in range(batch_shards):
            key = jax.random.fold_in(rng, d) if batch_shards > 1 else rng
            keep.append(jnp.block([[jax.random.bernoulli(
                jax.random.fold_in(key, i * shards + j), 1.0 - rate, (local, h, size, size))
                for j in range(shards)] for i in range(shards)]))
        keep = jnp.concatenate(keep, axis=0)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
        weights = jnp.where(keep, jax.nn.softmax(logits, -1) / (1.0 - rate), 0.0)
        return jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    return attend


def lowered_for_cuda():
    """Forward and backward of ring attention with the Triton-family kernels (not interpreted)
    lowered for CUDA on a 4-device ring with a Longformer pattern: how many kernel launches,
    ring transfers and switch branches the program holds."""
    import dataclasses

    from xformers_zoo.kernels import IMPLEMENTATIONS, BlockwiseAttention, ring_attention
    from xformers_zoo.kernels.pallas_attention import (
        pallas_backward_from_lse,
        pallas_forward_with_lse,
    )

    compiled = dict(interpret=False, kernels="triton")
    pallas = IMPLEMENTATIONS.get("pallas")
    IMPLEMENTATIONS.register("pallas-cuda", dataclasses.replace(
        pallas, name="pallas-cuda", rejects=lambda call: None, blockwise=BlockwiseAttention(
            forward=lambda *a, **o: pallas_forward_with_lse(*a, **compiled, **o),
            backward=lambda *a, **o: pallas_backward_from_lse(*a, **compiled, **o))))
    mesh = Mesh(DEVICES[:4], ("seq",))
    x = jnp.zeros((2, 1024, 2, 64), jnp.bfloat16)
    key_mask = jnp.ones((2, 1024), bool)
    pattern = pred.union(pred.sliding_window(128), pred.global_tokens(64))

    def forward_backward(q, k, v, key_mask):
        out, vjp = jax.vjp(lambda q, k, v: ring_attention(
            q, k, v, mesh=mesh, key_mask=key_mask, implementation=("pallas-cuda",),
            mask_predicate=pattern), q, k, v)
        return vjp(out)

    text = jax.jit(forward_backward).trace(x, x, x, key_mask).lower(
        lowering_platforms=("cuda",)).as_text()
    # Each ring step runs one branch per distinct non-empty pair the devices meet there: a
    # forward launch and two backward launches (dK/dV, dQ) each.
    pairs = pair_blocks(4, 1024, 1024, batch=2, heads=2, causal=False, block_mask=None,
                        predicate=pattern)
    branches = sum(len({id(p) for i, row in enumerate(pairs) for p in [row[(i - s) % 4]]
                        if not p.skip}) for s in range(4))
    return {"kernels": text.count("__gpu$xla.gpu.triton"), "expected_kernels": 3 * branches,
            "transfers": text.count("collective_permute"),
            "skipped_pairs": sum(p.skip for row in pairs for p in row)}


def refusal(mesh, length, implementation=("xla",), **options):
    """The error message of a ring attention call that must be refused."""
    q = inputs(length=length)[0]
    try:
        with jax.set_mesh(mesh):
            dot_product_attention(q, q, q, implementation=implementation, sequence_axis="seq",
                                  **options)
    except ValueError as error:
        return str(error)
    return "accepted"


def model_differences(variant, **attention):
    """A two-layer model with ring attention against the same weights without it: logits and
    every parameter gradient of a loss (the largest difference relative to the largest gradient);
    mean
    pooling, as a CLS token would make the length odd."""
    from flax import nnx

    from xformers_zoo.api import create_model

    tokens = jax.random.randint(jax.random.key(1), (4, 64), 1, 10)
    mask = jnp.arange(64)[None] < jnp.array([64, 50, 33, 64])[:, None]

    def logits_and_grads(axis):
        model = create_model(variant, "listops", preset="tiny", max_length=64, pooling="mean",
                             implementation=("xla",), sequence_axis=axis, **attention)
        graph, params = nnx.split(model)

        def loss(params):
            logits = nnx.merge(graph, params)(tokens, mask)
            return (logits * jnp.arange(logits.shape[-1])).sum(), logits

        return jax.jit(jax.grad(loss, has_aux=True))(params)

    with jax.set_mesh(DATA_2_SEQ_4):
        grads, logits = logits_and_grads("seq")
    want_grads, want = logits_and_grads(None)
    largest = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(want_grads))
    differs = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()),
                                               grads, want_grads)))
    return {"out": float(jnp.abs(logits - want).max()), "grads": differs / largest}


def main(names):
    tiles_32 = BlockMask(np.random.default_rng(0).random((2, 4, 4)) < 0.5, 32, 32)
    rng = jax.random.key(7)
    cases = {
        "dense": lambda: differences(SEQ_8, {}),
        "key_padding_data_parallel": lambda: differences(DATA_2_SEQ_4, {"key_mask": True}),
        "causal": lambda: differences(DATA_2_SEQ_4, {"causal": True, "key_mask": True}),
        "block_mask": lambda: differences(DATA_2_SEQ_4, {"block_mask": tiles_32,
                                                         "key_mask": True}),
        "longformer_predicate": lambda: differences(DATA_2_SEQ_4, {
            "mask_predicate": LONGFORMER, "key_mask": True}),
        "bigbird_predicate_tiles": lambda: differences(DATA_2_SEQ_4, {
            "mask_predicate": BIGBIRD, "key_mask": True}),
        "dropout_data_parallel": lambda: differences(
            DATA_2_SEQ_4, {"dropout_rate": 0.25, "dropout_rng": rng},
            reference=dropout_reference(0.25, rng, 4, batch_shards=2)),
        "pallas_key_padding": lambda: differences(SEQ_2, {"key_mask": True}, length=64,
                                                  implementation=("pallas",)),
        "pallas_longformer_predicate": lambda: differences(
            SEQ_2, {"mask_predicate": LONGFORMER, "key_mask": True}, length=64,
            implementation=("pallas",)),
        "model_longformer": lambda: model_differences("longformer", block=16, window=24),
        "lowered_for_cuda": lowered_for_cuda,
        "refuse_length": lambda: refusal(SEQ_8, 100),
        "refuse_no_seq_axis": lambda: refusal(Mesh(DEVICES, ("data",)), 128),
        "refuse_tiles": lambda: refusal(SEQ_8, 128, block_mask=BlockMask(
            np.ones((2, 2), bool), 64, 64)),
        "refuse_cudnn_only": lambda: refusal(SEQ_8, 128, implementation=("cudnn",)),
    }
    results = {}
    for name in names or cases:
        start = time.perf_counter()
        results[name] = cases[name]()
        print(f"{name}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1:])
