"""The ``pallas`` implementation: FlashAttention-2 (Dao 2023) forward and backward Pallas kernels
behind ``jax.custom_vjp``, dense or block-sparse (Dao et al. 2022, "FlashAttention", section 3.3).

Inputs are padded to whole tiles here (padded keys get a -inf bias, padded query rows are cut
off), so the kernels see only whole tiles. A block mask becomes, on the host, lists of the key
tiles each query tile visits (and the transpose for the key/value gradients): empty tiles cost
nothing in either pass, and partial tiles are masked element-wise by the key bias and causality.
Rows much longer than the typical one (global tokens) are split over several programs
(kernels/pallas_split.py). Attention dropout is applied inside the kernels from a counter-based
hash, so no mask is stored (kernels/pallas_dropout.py).

On a CUDA GPU the kernels lower through Pallas' Triton backend; on Hopper GPUs, dense
non-causal calls without dropout run instead the Mosaic GPU kernels (FlashAttention-3 structure:
``pallas_mosaic_forward``, ``pallas_mosaic_backward``; kernels/NOTES.md has the measurements
behind both choices). The Mosaic kernels also apply dropout, with the Triton kernels' decisions,
but only when asked for by name (``kernels="mosaic"``): that path is written and lowered on CPU,
not yet run on a GPU (``MOSAIC_DROPOUT_BY_DEFAULT``). Elsewhere the Triton-family kernels can
run in Pallas interpret mode, which executes the same kernel bodies with ordinary XLA operations:
pass ``interpret=True``, or set ``XFORMERS_ZOO_PALLAS_INTERPRET=1`` so that
``dot_product_attention(..., implementation=("pallas", ...))`` accepts CPU calls (slow; for tests
and debugging).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from typing import Literal, get_args

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from xformers_zoo.kernels.block_mask import BlockMask
from xformers_zoo.kernels.dispatch import (
    AttentionCall,
    BlockwiseAttention,
    register_implementation,
)
from xformers_zoo.kernels.mask_predicate import MaskPredicate, as_predicate, tile_classes
from xformers_zoo.kernels.pallas_backward import flash_backward
from xformers_zoo.kernels.pallas_dropout import head_streams, seed_words
from xformers_zoo.kernels.pallas_forward import flash_forward
from xformers_zoo.kernels.pallas_in_kernel import EMPTY_ROW_LSE, LOG2_E
from xformers_zoo.kernels.pallas_mosaic_backward import MosaicBackwardPlan, mosaic_backward
from xformers_zoo.kernels.pallas_mosaic_forward import (
    BLOCK_K,
    BLOCK_Q,
    QUERY_TILES_PER_PROGRAM,
    MosaicPlan,
    mosaic_forward,
    mosaic_rejects,
)
from xformers_zoo.kernels.pallas_schedule import (
    KernelPlan,
    TileSchedule,
    causal_tiles,
    schedule_from_visibility,
    tile_visibility,
)
from xformers_zoo.kernels.pallas_split import split_long_rows

INTERPRET_ENV = "XFORMERS_ZOO_PALLAS_INTERPRET"
KernelFamily = Literal["mosaic", "triton"]
KERNEL_FAMILIES: tuple[str, ...] = get_args(KernelFamily)
HEAD_DIMS = (16, 32, 64, 128)
KERNEL_DTYPES = ("bfloat16", "float16", "float32")  # either family; Mosaic: MOSAIC_DTYPES
# Whether calls with dropout choose the Mosaic kernels on Hopper without being asked. False
# until their GPU tests (tests/test_pallas_mosaic*.py, dropout cases) have passed on a GPU.
MOSAIC_DROPOUT_BY_DEFAULT = False


@dataclasses.dataclass(frozen=True)
class PassTiles:
    """Tile sizes and Triton launch shape of one pass. ``max_steps``: the most tiles one program
    of a block-sparse launch walks before its row is split (None: automatic, 0: never)."""

    block_q: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 2
    max_steps: int | None = None


@dataclasses.dataclass(frozen=True)
class FlashTiles:
    """Tiles of the forward pass and of the two backward kernels: key/value gradients (a program
    per key tile) and query gradients (a program per query tile)."""

    forward: PassTiles
    key_value: PassTiles
    query: PassTiles

    def passes(self) -> tuple[PassTiles, PassTiles, PassTiles]:
        """The three passes' tiles, forward first."""
        return self.forward, self.key_value, self.query


def default_tiles(head_dim: int, dtype, sparse: bool = False) -> FlashTiles:
    """Tiles measured best on an H100 (kernels/NOTES.md); float32 halves them to fit on chip.
    Block-sparse calls at head_dim <= 64 take wider key tiles: their rows are short, so fewer,
    larger steps win."""
    if jnp.dtype(dtype) == jnp.float32:
        passes = [(64, 32, 4, 2), (32, 32, 4, 2), (32, 32, 4, 2)]
    elif sparse and head_dim <= 64:
        passes = [(64, 128, 4, 3), (128, 128, 8, 2), (128, 128, 8, 2)]
    elif head_dim <= 32:
        passes = [(128, 64, 4, 3), (64, 64, 4, 3), (128, 32, 4, 2)]
    elif head_dim <= 64:
        passes = [(128, 64, 4, 3), (64, 64, 4, 2), (64, 64, 4, 2)]
    else:
        passes = [(128, 128, 8, 3), (64, 64, 4, 2), (64, 64, 4, 2)]
    return FlashTiles(*(PassTiles(*p) for p in passes))


def interpret_requested() -> bool:
    """Whether the environment asks for interpret mode off-GPU."""
    return os.environ.get(INTERPRET_ENV, "").lower() in ("1", "true", "yes")


def pallas_rejects(call: AttentionCall) -> str | None:
    """Why the Pallas kernels cannot serve ``call``, or None."""
    if call.backend != "gpu" and not interpret_requested():
        return (f"needs a CUDA GPU (backend is {call.backend}); set {INTERPRET_ENV}=1 to run the "
                f"kernels in Pallas interpret mode")
    if call.backend == "gpu":
        capability = _compute_capability()
        if capability is None:
            return "needs a CUDA GPU (the GPU backend reports no compute capability)"
        if float(capability) < 8.0:
            return f"needs compute capability 8.0 or newer, device has {capability}"
    return _input_rejects(call.dtype, call.head_dim, _tile_part(call.block_mask,
                                                                call.mask_predicate)) or (
        None if 0.0 <= call.dropout_rate < 1.0
        else f"dropout_rate must be in [0, 1), got {call.dropout_rate}")


def _compute_capability() -> str | None:
    """The first device's CUDA compute capability ("9.0"), or None off CUDA GPUs."""
    capability = getattr(jax.devices()[0], "compute_capability", None)
    return None if capability is None else str(capability)


def _tile_part(block_mask: BlockMask | None,
               predicate: MaskPredicate | None) -> BlockMask | None:
    """The tile mask the kernel tiles must divide: the block mask, or a predicate's tiles."""
    return predicate.tiles if predicate is not None else block_mask


def _input_rejects(dtype: str, head_dim: int, block_mask: BlockMask | None) -> str | None:
    """Why the kernels cannot take inputs of this dtype, head dim and tile mask, or None."""
    if dtype not in KERNEL_DTYPES:
        return f"dtype must be one of {KERNEL_DTYPES}, got {dtype}"
    if not 0 < head_dim <= HEAD_DIMS[-1]:
        return (f"head_dim must be 1 to {HEAD_DIMS[-1]} (sizes other than {HEAD_DIMS} are "
                f"zero-padded to the next of them), got {head_dim}")
    if block_mask is not None:
        for size in (block_mask.block_q, block_mask.block_k):
            if size < 16 or size & (size - 1):
                return (f"block-mask tiles must be powers of two >= 16, got "
                        f"{block_mask.block_q}x{block_mask.block_k}")
    return None


def _fit_to_mask(tiles: PassTiles, block_mask: BlockMask | None) -> PassTiles:
    """Shrinks tiles to divide the block mask's tiles (all sizes are powers of two)."""
    if block_mask is None:
        return tiles
    return dataclasses.replace(tiles, block_q=min(tiles.block_q, block_mask.block_q),
                               block_k=min(tiles.block_k, block_mask.block_k))


@functools.lru_cache(maxsize=64)
def _schedule(pattern: BlockMask | MaskPredicate, plan: KernelPlan, by_key: bool,
              max_steps: int | None, batch: int, heads: int) -> TileSchedule:
    """Host tile lists for ``plan``: key tiles per query tile, or query tiles per key tile, with
    rows longer than the bound split (``max_steps``, see PassTiles). A mask predicate's tiles
    are classified first: empty ones are left out, partial ones flagged."""
    if isinstance(pattern, BlockMask):
        visible = tile_visibility(pattern, plan.block_q, plan.block_k, plan.q_tiles,
                                  plan.k_tiles, plan.causal_offset)
        partial = None
    else:
        classes = tile_classes(pattern, batch, heads, *plan.token_lengths, plan.block_q,
                               plan.block_k, plan.q_tiles, plan.k_tiles)
        visible = classes.visible & causal_tiles(plan.block_q, plan.block_k, plan.q_tiles,
                                                 plan.k_tiles, plan.causal_offset)
        partial = classes.partial
    if by_key:
        visible = visible.transpose(0, 2, 1)
        partial = None if partial is None else partial.transpose(0, 2, 1)
    return split_long_rows(schedule_from_visibility(visible, partial), max_steps)


def _plan(tiles: PassTiles, q_len: int, k_len: int, schedule_width: int, **facts) -> KernelPlan:
    return KernelPlan(block_q=tiles.block_q, block_k=tiles.block_k,
                      q_tiles=q_len // tiles.block_q, k_tiles=k_len // tiles.block_k,
                      max_count=schedule_width, num_warps=tiles.num_warps,
                      num_stages=tiles.num_stages, **facts)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class _PreparedCall:
    """One call laid out for the kernels: ``kernels`` (plans, schedules: static), ``inputs``
    (q, k, v padded to whole tiles and kernel head sizes; key bias, dropout streams, key
    lengths) and the true ``q_len`` and ``head_dim`` to cut results back to."""

    kernels: tuple
    inputs: tuple
    q_len: int
    head_dim: int

    def pad_rows(self, x: Float[Array, "b q h d"]) -> Float[Array, "b q_pad h d_pad"]:
        """A per-query array (output, its cotangent) padded as q was."""
        q_pad, size = self.inputs[0].shape[1], self.inputs[0].shape[3]
        return jnp.pad(x, ((0, 0), (0, q_pad - x.shape[1]), (0, 0), (0, size - x.shape[3])))

    def cut(self, x: Float[Array, "b n h d_pad"], rows: int) -> Float[Array, "b rows h d"]:
        """The first ``rows`` rows and true head dims of a padded result."""
        return x[:, :rows, :, :self.head_dim]


def _prepare(q, k, v, *, key_mask, block_mask, scale, causal, dropout_rate, dropout_rng,
             interpret, tiles, key_mask_is_prefix, kernels, mask_predicate,
             batch_offset=0) -> _PreparedCall:
    """Checks a call and lays it out for the kernels (``pallas_attention`` documents the
    options): tile plans and host schedules, inputs padded to whole tiles, the key bias."""
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"pallas attention: dropout_rate must be in [0, 1), got {dropout_rate}")
    if dropout_rate > 0.0 and dropout_rng is None:
        raise ValueError("pallas attention: dropout_rate > 0 needs a dropout_rng")
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    batch, q_len, heads, head_dim = q.shape
    k_len = k.shape[1]
    predicate = as_predicate(mask_predicate)
    if predicate is not None and block_mask is not None:
        raise ValueError("pallas attention: pass a block_mask or a mask_predicate, not both (a "
                         "predicate's tile-granular part goes in its tiles)")
    reason = _input_rejects(str(q.dtype), head_dim, _tile_part(block_mask, predicate))
    if reason is not None:
        raise ValueError(f"pallas attention: {reason}")
    if predicate is not None and predicate.tiles is not None:
        predicate.tiles.check_shape(q_len, k_len, heads)
    if block_mask is not None:
        block_mask.check_shape(q_len, k_len, heads)
    scale = float(head_dim ** -0.5 if scale is None else scale)
    # The kernels' head sizes; others run zero-padded to the next one.
    kernel_dim = next(s for s in HEAD_DIMS if s >= head_dim)
    pattern = block_mask if predicate is None else predicate
    tiles = tiles or default_tiles(kernel_dim, q.dtype, sparse=pattern is not None)
    passes = [_fit_to_mask(t, _tile_part(block_mask, predicate)) for t in tiles.passes()]
    use_mosaic = _use_mosaic(kernels, interpret, str(q.dtype), kernel_dim, causal=causal,
                             block_mask=block_mask, predicate=predicate, key_mask=key_mask,
                             key_mask_is_prefix=key_mask_is_prefix, dropout_rate=dropout_rate)
    if use_mosaic:  # its tiles set the padding of q and k/v too
        passes[0] = dataclasses.replace(passes[0], block_q=QUERY_TILES_PER_PROGRAM * BLOCK_Q,
                                        block_k=BLOCK_K)
    q_pad = _round_up(q_len, max(t.block_q for t in passes))
    k_pad = _round_up(k_len, max(t.block_k for t in passes))

    has_bias = key_mask is not None or k_pad != k_len
    # Padded keys are masked by sequence lengths in the Mosaic kernels.
    mosaic = (MosaicPlan(scale=scale, has_lengths=has_bias, dropout_rate=float(dropout_rate))
              if use_mosaic else None)
    bias = None
    if has_bias:
        valid = jnp.ones((batch, k_len), bool) if key_mask is None else key_mask
        valid = jnp.pad(valid, ((0, 0), (0, k_pad - k_len)))
        bias = jnp.where(valid, 0.0, -jnp.inf).astype(jnp.float32)  # [b, k_pad]

    facts = dict(scale=scale,
                 causal_offset=(k_len - q_len) if causal else None, has_bias=has_bias,
                 sparse=pattern is not None, schedule_heads=1,
                 exact_f32=q.dtype == jnp.float32, interpret=bool(interpret),
                 dropout_rate=float(dropout_rate), predicate=predicate,
                 token_lengths=(q_len, k_len))
    plans, schedules = [], []
    for tile, by_key in zip(passes, (False, True, False), strict=True):
        plan = _plan(tile, q_pad, k_pad, 1, **facts)
        schedule = None
        if pattern is not None:
            schedule = _schedule(pattern, plan, by_key, tile.max_steps, batch, heads)
            plan = dataclasses.replace(
                plan, max_count=schedule.max_count, programs=schedule.programs,
                schedule_heads=schedule.indices.shape[0],
                split_slots=0 if schedule.split is None else schedule.split.slots)
        plans.append(plan)
        schedules.append(schedule)

    streams = None
    if dropout_rate > 0.0:
        # [b * h] int32
        streams = head_streams(seed_words(dropout_rng), batch, heads, batch_offset)
    pad_q = ((0, 0), (0, q_pad - q_len), (0, 0), (0, kernel_dim - head_dim))
    pad_k = ((0, 0), (0, k_pad - k_len), (0, 0), (0, kernel_dim - head_dim))
    lengths = None
    if mosaic is not None and mosaic.has_lengths:
        lengths = (jnp.full((batch,), k_len, jnp.int32) if key_mask is None
                   else key_mask.sum(-1).astype(jnp.int32))
    # Zero head-dim columns change no logit q . k and give zero output columns, so attention
    # over the padded q, k, v cut back to the first head_dim columns is exact.
    inputs = (jnp.pad(q, pad_q), jnp.pad(k, pad_k), jnp.pad(v, pad_k), bias, streams, lengths)
    return _PreparedCall((tuple(plans), tuple(schedules), mosaic), inputs, q_len, head_dim)


@register_implementation(
    "pallas", rejects=pallas_rejects,
    description="FlashAttention-2 Pallas kernels, dense and block-sparse",
    blockwise=BlockwiseAttention(
        forward=lambda q, k, v, **options: pallas_forward_with_lse(q, k, v, **options),
        backward=lambda *arrays, **options: pallas_backward_from_lse(*arrays, **options)))
def pallas_attention(
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
    interpret: bool | None = None,
    tiles: FlashTiles | None = None,
    key_mask_is_prefix: bool = False,
    kernels: KernelFamily | None = None,
    mask_predicate: MaskPredicate | Callable | None = None,
    batch_offset: int | jax.Array = 0,
) -> Float[Array, "b q h d"]:
    """FlashAttention through the Pallas kernels; differentiable in q, k and v.

    Rows with no visible key return zeros. ``dropout_rate`` > 0 drops attention weights with
    decisions drawn from ``dropout_rng`` (``pallas_dropout.keep_mask`` materialises them).
    ``interpret`` None means interpret mode exactly when the default backend is not a GPU;
    ``tiles`` overrides ``default_tiles`` (benchmarks). ``key_mask_is_prefix`` promises right
    padding (the Mosaic kernels then take sequence lengths). ``kernels`` picks the kernel
    family: "mosaic" (Hopper wgmma kernels, dense non-causal calls; raises naming the reason
    for a call they cannot serve), "triton", or None: Mosaic where it serves the call on a
    Hopper GPU, else Triton. Calls with dropout take the Triton kernels unless
    ``kernels="mosaic"``: the Mosaic dropout path applies the same decisions but is written
    and lowered on CPU, not yet run on a GPU.
    ``mask_predicate`` (a ``MaskPredicate`` or a bare ``fn(b, h, q, k)``) says which pairs are
    visible, token by token; its tiles are classified on the host and only the partial ones
    evaluate it in the kernels (Triton family only). It replaces ``block_mask``.
    ``batch_offset``: the index of this batch's first row in a larger batch that was split
    (kernels/batch_shards.py), so that its dropout decisions are those of the whole batch's.
    """
    call = _prepare(q, k, v, key_mask=key_mask, block_mask=block_mask, scale=scale,
                    causal=causal, dropout_rate=dropout_rate, dropout_rng=dropout_rng,
                    interpret=interpret, tiles=tiles, key_mask_is_prefix=key_mask_is_prefix,
                    kernels=kernels, mask_predicate=mask_predicate, batch_offset=batch_offset)
    return call.cut(_flash(*call.kernels)(*call.inputs), call.q_len)


def pallas_forward_with_lse(
    q: Float[Array, "b q h d"], k: Float[Array, "b k h d"], v: Float[Array, "b k h d"],
    **options,
) -> tuple[Float[Array, "b q h d"], Float[Array, "b h q"]]:
    """The forward kernels' output and natural-log log-sum-exp of each row's scaled logits
    (-inf for rows that see no key); options as ``pallas_attention``. Not differentiable:
    ``pallas_backward_from_lse`` is its backward."""
    call = _prepare(q, k, v, **_defaults(options))
    out, lse = _forward(call.kernels, *call.inputs)
    lse = lse[:, :, :call.q_len]
    return call.cut(out, call.q_len), jnp.where(lse < EMPTY_ROW_LSE, lse / LOG2_E, -jnp.inf)


def pallas_backward_from_lse(
    q: Float[Array, "b q h d"], k: Float[Array, "b k h d"], v: Float[Array, "b k h d"],
    out: Float[Array, "b q h d"], lse: Float[Array, "b h q"], d_out: Float[Array, "b q h d"],
    **options,
) -> tuple[Float[Array, "b q h d"], Float[Array, "b k h d"], Float[Array, "b k h d"]]:
    """Gradients of q, k, v through attention over these keys, given each row's output and
    natural-log log-sum-exp over all the keys it attends to (which may be more than these:
    the FlashAttention backward needs only them); options as ``pallas_attention``."""
    call = _prepare(q, k, v, **_defaults(options))
    q_pad = call.inputs[0].shape[1]
    # Padded rows have no cotangent; an empty-row LSE gives them no probability at all.
    lse2 = jnp.where(jnp.isfinite(lse), lse * LOG2_E, EMPTY_ROW_LSE).astype(jnp.float32)
    lse2 = jnp.pad(lse2, ((0, 0), (0, 0), (0, q_pad - call.q_len)),
                   constant_values=EMPTY_ROW_LSE)
    dq, dk, dv = _backward(call.kernels, *call.inputs, call.pad_rows(out), lse2,
                           call.pad_rows(d_out))
    return call.cut(dq, call.q_len), call.cut(dk, k.shape[1]), call.cut(dv, k.shape[1])


def _defaults(options: dict) -> dict:
    """``pallas_attention``'s options with its defaults filled in (``key_mask_is_prefix``,
    ``interpret`` ... as it takes them), for ``_prepare``."""
    defaults = dict(key_mask=None, block_mask=None, scale=None, causal=False, dropout_rate=0.0,
                    dropout_rng=None, interpret=None, tiles=None, key_mask_is_prefix=False,
                    kernels=None, mask_predicate=None, batch_offset=0)
    unknown = set(options) - set(defaults)
    if unknown:
        raise TypeError(f"pallas attention: unknown options {sorted(unknown)}; accepted: "
                        f"{sorted(defaults)}")
    return defaults | options


def _use_mosaic(kernels: KernelFamily | None, interpret: bool, dtype: str, head_dim: int, *,
                causal: bool, block_mask, predicate, key_mask, key_mask_is_prefix: bool,
                dropout_rate: float) -> bool:
    """Whether the Mosaic kernels run this call (else the Triton kernels). Asked for by name,
    they must serve the call or the reason is raised."""
    if kernels not in (None, *KERNEL_FAMILIES):
        raise ValueError(f"pallas attention: kernels must be one of {KERNEL_FAMILIES} or None, "
                         f"got {kernels!r}")
    if kernels == "triton":
        return False
    reason = mosaic_rejects(dtype, head_dim, causal=causal, has_block_mask=block_mask is not None,
                            has_predicate=predicate is not None,
                            has_key_mask=key_mask is not None,
                            key_mask_is_prefix=key_mask_is_prefix)
    if reason is None and interpret:
        reason = "it has no interpret mode (Hopper GPUs only)"
    if reason is None:
        capability = _compute_capability()
        if capability is None or not capability.startswith("9."):
            reason = f"it needs a Hopper GPU (compute capability 9.x), device has {capability!r}"
    if reason is not None:
        if kernels == "mosaic":
            raise ValueError(f"pallas attention: the Mosaic kernels cannot serve this call: "
                             f"{reason}")
        return False
    # Mosaic dropout runs only when asked for by name until a GPU run has validated it.
    return kernels == "mosaic" or dropout_rate == 0.0 or MOSAIC_DROPOUT_BY_DEFAULT


def _forward(kernels, q, k, v, bias, streams, lengths):
    """Output and base-2 log-sum-exp from the forward kernel of ``kernels`` (plans,
    schedules, Mosaic plan or None)."""
    (fwd_plan, _, _), schedules, mosaic = kernels
    if mosaic is not None:
        return mosaic_forward(q, k, v, lengths, mosaic, streams)
    return flash_forward(q, k, v, bias, streams, schedules[0], fwd_plan)


def _backward(kernels, q, k, v, bias, streams, lengths, out, lse, d_out):
    """dq, dk, dv from the backward kernels of ``kernels`` given the output and base-2 LSE."""
    (_, kv_plan, q_plan), schedules, mosaic = kernels
    if mosaic is not None:
        plan = MosaicBackwardPlan(scale=mosaic.scale, has_lengths=mosaic.has_lengths,
                                  dropout_rate=mosaic.dropout_rate)
        dq, dk, dv = mosaic_backward(q, k, v, out, lse, d_out, lengths, plan, streams)
        return dq.astype(q.dtype), dk, dv
    return flash_backward(q, k, v, out, lse, d_out, bias, streams, schedules[1:],
                          (kv_plan, q_plan))


def _flash(plans: tuple[KernelPlan, ...], schedules: tuple[TileSchedule | None, ...],
           mosaic: MosaicPlan | None):
    """The differentiable kernel trio for one call's plans (forward, key/value gradients, query
    gradients); schedules enter as trace-time constants, dropout streams and key lengths (the
    Mosaic kernels' key mask) as inputs. With ``mosaic``, the Mosaic kernels run both passes
    (one fused backward launch) instead."""
    kernels = (plans, schedules, mosaic)

    @jax.custom_vjp
    def attend(q, k, v, bias, streams, lengths):
        return _forward(kernels, q, k, v, bias, streams, lengths)[0]

    def attend_fwd(q, k, v, bias, streams, lengths):
        out, lse = _forward(kernels, q, k, v, bias, streams, lengths)
        return out, (q, k, v, bias, streams, lengths, out, lse)

    def attend_bwd(residuals, d_out):
        *inputs, out, lse = residuals
        dq, dk, dv = _backward(kernels, *inputs, out, lse, d_out)
        bias = inputs[3]
        return dq, dk, dv, None if bias is None else jnp.zeros_like(bias), None, None

    attend.defvjp(attend_fwd, attend_bwd)
    return attend
