"""Ring attention: exact softmax attention with the sequence sharded over a mesh axis (Liu et
al. 2023, "Ring Attention with Blockwise Transformers for Near-Infinite Context").

q, k and v are split into equal blocks along the sequence over the ``seq`` axis (``shard_map``).
Each device keeps its query block and passes key/value blocks (with their key padding mask)
around the ring with ``lax.ppermute``; at every step it runs the chosen implementation's
forward pass (``BlockwiseAttention``: the Pallas kernels on GPUs, the XLA reference elsewhere)
on its query block against the visiting key block and merges the partial outputs by their
log-sum-exp. Block pairs that a block mask, mask predicate or causality leaves empty are
skipped (kernels/ring_blocks.py decides which on the host); the skip is a ``lax.switch`` on the
device's position, so a skipped pair costs no compute, only its share of the ring transfers.

Backward: a ``custom_vjp`` that runs the ring again. Each device keeps its own q, k, v, the
merged output and the log-sum-exp; key/value blocks circulate as in the forward pass together
with their gradient accumulators, each device adding its query block's share (the
implementation's backward pass given the row's whole-sequence output and LSE), and the
accumulators arrive back at their owners after a last hop. Memory per device is O(local
length): its blocks, one visiting key/value block and one dK/dV accumulator in flight, and the
implementation's own per-block memory; nothing grows with the number of devices. Transfers per
device: n - 1 key/value hops forward, n - 1 key/value and n dK/dV hops backward.

Attention dropout draws each block pair's decisions from ``fold_in(rng, i * n + j)`` (first
folded with the batch shard's index when other mesh axes split the batch): valid dropout, but
not the decisions an unsharded call with the same key would draw.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import AbstractMesh, Mesh, PartitionSpec
from jaxtyping import Array, Bool, Float

from xformers_zoo.kernels.batch_shards import batch_axes as batch_axes_of
from xformers_zoo.kernels.batch_shards import refuse_batch_predicate
from xformers_zoo.kernels.block_mask import BlockMask
from xformers_zoo.kernels.dispatch import BlockwiseAttention, attention_call, choose_and_explain
from xformers_zoo.kernels.mask_predicate import MaskPredicate, as_predicate
from xformers_zoo.kernels.ring_blocks import BlockPair, pair_blocks

SEQ_AXIS = "seq"


def _mesh(mesh: Mesh | AbstractMesh | None, axis: str) -> Mesh | AbstractMesh:
    """The explicit mesh, else the one in context; it must have ``axis``."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    if mesh.empty or axis not in mesh.axis_names:
        have = f"axes {tuple(mesh.axis_names)}" if not mesh.empty else "no mesh in context"
        raise ValueError(f"ring attention needs a mesh with a {axis!r} axis to shard the "
                         f"sequence over, found {have}; accepted: run under "
                         f"jax.set_mesh(Mesh(devices, ({axis!r}, ...))) or pass mesh=")
    return mesh


def ring_attention(
    q: Float[Array, "b q h d"],
    k: Float[Array, "b k h d"],
    v: Float[Array, "b k h d"],
    *,
    axis: str = SEQ_AXIS,
    mesh: Mesh | AbstractMesh | None = None,
    implementation: Sequence[str] = ("pallas", "xla"),
    key_mask: Bool[Array, "b k"] | None = None,
    block_mask: BlockMask | None = None,
    mask_predicate: MaskPredicate | None = None,
    scale: float | None = None,
    causal: bool = False,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    key_mask_is_prefix: bool = False,
) -> Float[Array, "b q h d"]:
    """Softmax attention with q, k, v sharded along the sequence over mesh axis ``axis`` (see
    the module docstring); options as ``dot_product_attention``, which calls this when given
    ``sequence_axis``. ``mesh``: the mesh, else the one in context (``jax.set_mesh``); other
    axes of it shard the batch when they divide it. ``implementation``: tried in order for
    each block pair; it must provide ``BlockwiseAttention`` (xla and pallas do).
    Differentiable in q, k, v."""
    mesh = _mesh(mesh, axis)
    shards = mesh.shape[axis]
    batch, q_len, heads, head_dim = q.shape
    k_len = k.shape[1]
    for name, length in (("query", q_len), ("key", k_len)):
        if length % shards:
            raise ValueError(f"ring attention: {name} length {length} is not divisible by the "
                             f"{shards} devices of mesh axis {axis!r}; accepted: multiples of "
                             f"{shards}")
    if dropout_rate > 0.0 and dropout_rng is None:
        raise ValueError("ring attention: dropout_rate > 0 needs a dropout_rng")
    if causal and q_len != k_len:
        raise ValueError(f"ring attention: causal needs equal query and key lengths, got "
                         f"{q_len} and {k_len}")
    predicate = as_predicate(mask_predicate)
    batch_axes = batch_axes_of(mesh, batch, exclude=(axis,))
    refuse_batch_predicate(predicate, batch_axes, "ring attention")
    local = jax.ShapeDtypeStruct((batch // math.prod(mesh.shape[a] for a in batch_axes),
                                  q_len // shards, heads, head_dim), q.dtype)
    options = dict(key_mask=key_mask, block_mask=block_mask, causal=causal,
                   dropout_rate=dropout_rate, key_mask_is_prefix=key_mask_is_prefix,
                   mask_predicate=predicate)
    impl, _ = choose_and_explain(attention_call(local, local, **options), implementation,
                                 blockwise=True)
    pairs = pair_blocks(shards, q_len, k_len, batch=batch, heads=heads, causal=causal,
                        block_mask=block_mask, predicate=predicate)
    scale = float(head_dim ** -0.5 if scale is None else scale)
    ring = _ring(impl.blockwise, pairs, axis, scale, float(dropout_rate), key_mask_is_prefix)
    if dropout_rate > 0.0 and batch_axes:
        # Batch shards must not draw the same decisions: each folds in its index first.
        ring = _fold_batch_shard(ring, batch_axes)

    rows = PartitionSpec(batch_axes or None, axis)
    args, specs = [q, k, v], [rows, rows, rows]
    if key_mask is not None:
        args.append(key_mask)
        specs.append(rows)
    if dropout_rate > 0.0:
        args.append(dropout_rng)
        specs.append(PartitionSpec())

    def local_ring(q, k, v, *rest):
        mask = rest[0] if key_mask is not None else None
        rng = rest[-1] if dropout_rate > 0.0 else None
        return ring(q, k, v, mask, rng)

    # check_vma off: the Pallas calls inside carry no varying-axis types. Under jit even when
    # called eagerly: the kernels' host-side tile schedules cannot be built in eager shard_map.
    return jax.jit(jax.shard_map(local_ring, mesh=mesh, in_specs=tuple(specs), out_specs=rows,
                                 check_vma=False))(*args)


def _fold_batch_shard(ring, batch_axes: tuple[str, ...]):
    """``ring`` with its dropout key folded with the device's batch shard index."""
    def folded(q, k, v, mask, rng):
        return ring(q, k, v, mask, jax.random.fold_in(rng, lax.axis_index(batch_axes)))
    return folded


def _rotate(tree, axis: str, shards: int):
    """Every block one step along the ring: device i's goes to device i + 1."""
    perm = [(i, (i + 1) % shards) for i in range(shards)]
    return jax.tree.map(lambda x: lax.ppermute(x, axis, perm), tree)


def _merge(acc: Float[Array, "b q h d"], acc_lse: Float[Array, "b h q"],
           out: Float[Array, "b q h d"], lse: Float[Array, "b h q"]):
    """Two partial attentions over disjoint keys combined by their log-sum-exp; rows with no
    visible key in either (LSE -inf) stay 0 with LSE -inf."""
    total = jnp.logaddexp(acc_lse, lse)
    shift = jnp.where(jnp.isfinite(total), total, 0.0)

    def weight(x):  # [b, h, q] -> [b, q, h, 1]
        return jnp.exp(x - shift).transpose(0, 2, 1)[..., None]

    return acc * weight(acc_lse) + out.astype(jnp.float32) * weight(lse), total


@functools.lru_cache(maxsize=64)
def _ring(blockwise: BlockwiseAttention, pairs: tuple[tuple[BlockPair, ...], ...], axis: str,
          scale: float, dropout_rate: float, key_mask_is_prefix: bool):
    """The differentiable per-device ring for one static layout, ``(q, k, v, key_mask, rng)
    -> out`` on local blocks (key_mask and rng may be None)."""
    shards = len(pairs)

    def step(s: int, pass_fn, skipped, q, k, v, mask, rng, *extra):
        """Runs ``pass_fn(pair, q, k, v, options, *extra)`` for the pair each device meets at
        ring step ``s`` (``skipped(q, k)`` for empty pairs), switching on the device."""
        me = lax.axis_index(axis)
        source = (me - s) % shards
        if rng is not None:
            rng = jax.random.fold_in(rng, me * shards + source)
        met = [pairs[i][(i - s) % shards] for i in range(shards)]
        unique = list(dict.fromkeys(met))  # pairs are compared by identity

        def branch(pair):
            def run(q, k, v, mask, rng, *extra):
                if pair.skip:
                    return skipped(q, k)
                options = dict(pair.options(), key_mask=mask, scale=scale,
                               dropout_rate=dropout_rate, dropout_rng=rng,
                               key_mask_is_prefix=key_mask_is_prefix)
                return pass_fn(q, k, v, *extra, **options)
            return run

        if len(unique) == 1:
            return branch(unique[0])(q, k, v, mask, rng, *extra)
        index = jnp.asarray(np.array([unique.index(p) for p in met], np.int32))[me]
        return lax.switch(index, [branch(p) for p in unique], q, k, v, mask, rng, *extra)

    def empty_forward(q, k):
        b, n, h, _ = q.shape
        return jnp.zeros(q.shape, q.dtype), jnp.full((b, h, n), -jnp.inf, jnp.float32)

    def forward_pass(q, k, v, **options):
        out, lse = blockwise.forward(q, k, v, **options)
        return out.astype(q.dtype), lse.astype(jnp.float32)

    def forward(q, k, v, mask, rng):
        acc = jnp.zeros(q.shape, jnp.float32)
        acc_lse = jnp.full((q.shape[0], q.shape[2], q.shape[1]), -jnp.inf, jnp.float32)
        for s in range(shards):
            if s:
                k, v, mask = _rotate((k, v, mask), axis, shards)
            out, lse = step(s, forward_pass, empty_forward, q, k, v, mask, rng)
            acc, acc_lse = _merge(acc, acc_lse, out, lse)
        return acc.astype(q.dtype), acc_lse

    def empty_backward(q, k):
        return (jnp.zeros(q.shape, jnp.float32), jnp.zeros(k.shape, jnp.float32),
                jnp.zeros(k.shape, jnp.float32))

    def backward_pass(q, k, v, out, lse, d_out, **options):
        grads = blockwise.backward(q, k, v, out, lse, d_out, **options)
        return tuple(g.astype(jnp.float32) for g in grads)

    @jax.custom_vjp
    def ring(q, k, v, mask, rng):
        return forward(q, k, v, mask, rng)[0]

    def ring_fwd(q, k, v, mask, rng):
        out, lse = forward(q, k, v, mask, rng)
        return out, (q, k, v, mask, rng, out, lse)

    def ring_bwd(residuals, d_out):
        q, k, v, mask, rng, out, lse = residuals
        d_q = jnp.zeros(q.shape, jnp.float32)
        d_k = jnp.zeros(k.shape, jnp.float32)
        d_v = jnp.zeros(v.shape, jnp.float32)
        own = (k, v, mask)
        for s in range(shards):
            if s:
                own = _rotate(own, axis, shards)
            dq_s, dk_s, dv_s = step(s, backward_pass, empty_backward, q, *own, rng, out, lse,
                                    d_out)
            # The accumulators travel with the key/value block they belong to.
            d_q, d_k, d_v = d_q + dq_s, d_k + dk_s, d_v + dv_s
            d_k, d_v = _rotate((d_k, d_v), axis, shards)
        return (d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype), None, None)

    ring.defvjp(ring_fwd, ring_bwd)
    return ring
