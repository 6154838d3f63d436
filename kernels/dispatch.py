"""``dot_product_attention``: exact (optionally block-sparse) softmax attention through the first
implementation, of those requested, that can serve the call, saying why it passed over the others.

Implementations register a ``KernelImpl`` in ``IMPLEMENTATIONS`` by decorating their attention
function with ``@register_implementation``: a ``rejects`` check that returns a reason (or None)
from static facts (backend, dtype, shapes, options) and the function itself. Those that also
expose their two passes with the log-sum-exp (``BlockwiseAttention``) can serve ring attention
over a ``seq`` mesh axis (``sequence_axis``, kernels/ring_attention.py).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence

import jax
from jaxtyping import Array, Bool, Float

from xformers_zoo.kernels.batch_shards import call_per_batch_shard
from xformers_zoo.kernels.block_mask import BlockMask
from xformers_zoo.kernels.mask_predicate import MaskPredicate, as_predicate
from xformers_zoo.registry import Registry

log = logging.getLogger("xformers_zoo.kernels")


@dataclasses.dataclass(frozen=True)
class AttentionCall:
    """The static facts of one attention call that implementations decide on."""

    backend: str
    dtype: str
    batch: int
    q_len: int
    k_len: int
    num_heads: int
    head_dim: int
    has_key_mask: bool
    block_mask: BlockMask | None
    causal: bool
    dropout_rate: float
    key_mask_is_prefix: bool = False
    mask_predicate: MaskPredicate | None = None


@dataclasses.dataclass(frozen=True)
class BlockwiseAttention:
    """An implementation's attention as the two passes that blockwise compositions (ring
    attention) chain over key blocks, with ``dot_product_attention``'s keyword options:

    ``forward(q, k, v, **options) -> (out, lse)``: the output and the natural-log log-sum-exp
    ``[b, h, q]`` of each row's scaled, masked logits (-inf for a row that sees no key), so that
    outputs over several key blocks merge by their LSE (Milakov & Gimelshein 2018, "Online
    normalizer calculation for softmax").

    ``backward(q, k, v, out, lse, d_out, **options) -> (dq, dk, dv)``: these keys' share of
    the gradients, given each row's ``out`` and ``lse`` over all the keys it attends to
    (FlashAttention-2's backward, Dao 2023, needs nothing else from the other blocks)."""

    forward: Callable[..., tuple[jax.Array, jax.Array]]
    backward: Callable[..., tuple[jax.Array, jax.Array, jax.Array]]


@dataclasses.dataclass(frozen=True)
class KernelImpl:
    """An attention implementation: ``rejects(call)`` gives a reason it cannot serve, or None;
    ``form(call)``, where given, names the way it serves a call (cuDNN: "plain" or "lengths");
    ``blockwise``, where given, its two passes for ring attention; ``partitioned``: whether
    XLA's SPMD partitioner splits it itself (plain XLA ops, or a custom call with a partitioning
    rule); if not, it runs per batch shard under a mesh (kernels/batch_shards.py)."""

    name: str
    fn: Callable[..., jax.Array]
    rejects: Callable[[AttentionCall], str | None]
    description: str = ""
    form: Callable[[AttentionCall], str] | None = None
    blockwise: BlockwiseAttention | None = None
    partitioned: bool = False


IMPLEMENTATIONS: Registry[KernelImpl] = Registry("attention implementation")


def register_implementation(
    name: str,
    *,
    rejects: Callable[[AttentionCall], str | None],
    description: str,
    form: Callable[[AttentionCall], str] | None = None,
    blockwise: BlockwiseAttention | None = None,
    partitioned: bool = False,
) -> Callable[[Callable[..., jax.Array]], Callable[..., jax.Array]]:
    """Decorator registering an attention function as implementation ``name`` (see
    ``KernelImpl`` for ``rejects``, ``form``, ``blockwise`` and ``partitioned``); returns the
    function unchanged."""

    def wrap(fn: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
        IMPLEMENTATIONS.register(name, KernelImpl(name, fn, rejects, description, form=form,
                                                  blockwise=blockwise,
                                                  partitioned=partitioned))
        return fn

    return wrap


_explained: set[tuple] = set()


class NoImplementationError(ValueError):
    """None of the requested implementations can serve a call; the message lists each reason."""


def choose_implementation(
    call: AttentionCall, implementation: Sequence[str], *, blockwise: bool = False
) -> tuple[KernelImpl, list[tuple[str, str]]]:
    """Returns the first implementation that accepts ``call`` (and, with ``blockwise``, has
    ``BlockwiseAttention`` passes) and the (name, reason) of those skipped before it; raises
    NoImplementationError when none accepts."""
    if isinstance(implementation, str):
        implementation = (implementation,)
    skipped: list[tuple[str, str]] = []
    for name in implementation:
        impl = IMPLEMENTATIONS.get(name)
        reason = impl.rejects(call)
        if reason is None and blockwise and impl.blockwise is None:
            reason = "it gives no log-sum-exp, which ring attention merges blocks by"
        if reason is None:
            return impl, skipped
        skipped.append((name, reason))
    detail = "; ".join(f"{n}: {r}" for n, r in skipped)
    raise NoImplementationError(f"no attention implementation can serve this call ({detail})")


def describe_choice(call: AttentionCall, implementation: Sequence[str]) -> str:
    """The implementation that serves ``call`` and, where it has forms, which one: e.g.
    "cudnn (plain)" for a call without a key mask, "cudnn (lengths)" with one."""
    impl, _ = choose_implementation(call, implementation)
    return impl.name if impl.form is None else f"{impl.name} ({impl.form(call)})"


def dot_product_attention(
    q: Float[Array, "b q h d"],
    k: Float[Array, "b k h d"],
    v: Float[Array, "b k h d"],
    *,
    key_mask: Bool[Array, "b k"] | None = None,
    block_mask: BlockMask | None = None,
    scale: float | None = None,
    causal: bool = False,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    implementation: Sequence[str] = ("cudnn", "xla"),
    key_mask_is_prefix: bool = False,
    mask_predicate: MaskPredicate | Callable | None = None,
    sequence_axis: str | None = None,
) -> Float[Array, "b q h d"]:
    """Softmax attention ``softmax(q k^T * scale + mask) v`` per head.

    ``key_mask`` is True at real keys; ``key_mask_is_prefix`` promises that the real keys of each
    sequence come first (padding at the end, as the project's pipelines pad), which lets
    implementations take per-sequence lengths instead of a mask. ``block_mask`` restricts which
    tiles are computed; ``mask_predicate`` (a ``MaskPredicate`` or a bare ``fn(b, h, q, k)``,
    see ``kernels.mask_predicate``) says token by token which pairs are visible, in place of a
    block mask. Rows with no visible key return zeros. ``implementation`` is tried in
    order; each skipped one is logged once with its reason (logger ``xformers_zoo.kernels``).
    ``sequence_axis`` names a mesh axis (of the mesh in context, ``jax.set_mesh``) to shard the
    sequence over and run ring attention on (kernels/ring_attention.py); None: no sharding.
    Implementations that XLA cannot partition run per batch shard when axes of the mesh in
    context split the batch (kernels/batch_shards.py).
    """
    if q.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"expected q [b, q, h, d] and k, v [b, k, h, d]; got {q.shape}, "
                         f"{k.shape}, {v.shape}")
    if key_mask is not None and key_mask.shape != (k.shape[0], k.shape[1]):
        raise ValueError(f"key_mask must be [batch, k_len]={k.shape[:2]}, got {key_mask.shape}")
    if block_mask is not None:
        block_mask.check_shape(q.shape[1], k.shape[1], q.shape[2])
    mask_predicate = as_predicate(mask_predicate)
    if mask_predicate is not None:
        if block_mask is not None:
            raise ValueError("pass a block_mask or a mask_predicate, not both (a predicate's "
                             "tile-granular part goes in its tiles)")
        if mask_predicate.tiles is not None:
            mask_predicate.tiles.check_shape(q.shape[1], k.shape[1], q.shape[2])
    if dropout_rate > 0.0 and dropout_rng is None:
        raise ValueError("dropout_rate > 0 needs a dropout_rng")
    options = dict(key_mask=key_mask, block_mask=block_mask, scale=scale, causal=causal,
                   dropout_rate=dropout_rate, dropout_rng=dropout_rng,
                   key_mask_is_prefix=key_mask_is_prefix, mask_predicate=mask_predicate)
    if isinstance(implementation, str):
        implementation = (implementation,)
    if sequence_axis is not None:
        # Imported here: the ring module builds on this one.
        from xformers_zoo.kernels.ring_attention import ring_attention
        return ring_attention(q, k, v, axis=sequence_axis, implementation=implementation,
                              **options)
    call = attention_call(q, k, **options)
    impl, _ = choose_and_explain(call, implementation)
    if impl.partitioned:
        return impl.fn(q, k, v, **options)
    return call_per_batch_shard(impl.fn, q, k, v, **options)


def attention_call(q: jax.Array, k: jax.Array, *, key_mask, block_mask, causal, dropout_rate,
                   key_mask_is_prefix, mask_predicate, **_) -> AttentionCall:
    """The static facts of attention of ``q`` over ``k`` with these options."""
    return AttentionCall(
        backend=jax.default_backend(), dtype=str(q.dtype), batch=q.shape[0], q_len=q.shape[1],
        k_len=k.shape[1], num_heads=q.shape[2], head_dim=q.shape[3],
        has_key_mask=key_mask is not None, block_mask=block_mask, causal=causal,
        dropout_rate=float(dropout_rate), key_mask_is_prefix=key_mask_is_prefix,
        mask_predicate=mask_predicate,
    )


def choose_and_explain(call: AttentionCall, implementation: Sequence[str], *,
                       blockwise: bool = False) -> tuple[KernelImpl, list[tuple[str, str]]]:
    """``choose_implementation``, logging once each implementation skipped with its reason."""
    impl, skipped = choose_implementation(call, implementation, blockwise=blockwise)
    key = (impl.name, tuple(skipped), blockwise)
    if skipped and key not in _explained:
        _explained.add(key)
        # On a GPU, passing over the first choice changes speed and memory a lot (attention
        # dropout sends cuDNN-bound runs to the pallas kernels when listed, else to the dense
        # XLA path): say so where users look. Elsewhere the GPU implementations are expected to
        # step aside.
        first_skipped = skipped[0][0] == implementation[0]
        level = logging.WARNING if first_skipped and call.backend == "gpu" else logging.INFO
        for name, reason in skipped:
            log.log(level, "attention: skipped %s (%s); using %s", name, reason, impl.name)
    return impl, skipped
