"""The ``pallas`` implementation: FlashAttention-2 (Dao 2023) forward and backward Pallas kernels
behind ``jax.custom_vjp``, dense or block-sparse (Dao et al. 2022, "FlashAttention", section 3.3).

Inputs are padded to whole tiles (``pallas_layout.prepare``: padded keys get a -inf bias,
padded query rows are cut off), so the kernels see only whole tiles. A block mask becomes, on
the host, lists of the key tiles each query tile visits (and the transpose for the key/value
gradients): empty tiles cost nothing in either pass, and partial tiles are masked element-wise
by the key bias and causality.
Rows much longer than the typical one (global tokens) are split over several programs
(kernels/pallas_split.py). Attention dropout is applied inside the kernels from a counter-based
hash, so no mask is stored (kernels/pallas_dropout.py).

On a CUDA GPU the kernels lower through Pallas' Triton backend; on Hopper GPUs, the Mosaic GPU
kernels run instead (FlashAttention-3 structure: ``pallas_mosaic_forward``,
``pallas_mosaic_backward``; kernels/NOTES.md has the measurements behind both choices) for every
call whose features a GPU run has validated (``MOSAIC_VALIDATED``: dense, right padding). They
also serve dropout (the Triton kernels' decisions), causal masking, block masks, mask
predicates and key masks of any form (kernels/pallas_mosaic_mask.py), but those paths are
written and lowered on CPU, not yet run on a GPU, so they run only when asked for by name
(``kernels="mosaic"``) until their GPU tests pass. Elsewhere the Triton-family kernels can
run in Pallas interpret mode, which executes the same kernel bodies with ordinary XLA operations:
pass ``interpret=True``, or set ``XFORMERS_ZOO_PALLAS_INTERPRET=1`` so that
``dot_product_attention(..., implementation=("pallas", ...))`` accepts CPU calls (slow; for tests
and debugging).
"""

from __future__ import annotations

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
from xformers_zoo.kernels.mask_predicate import MaskPredicate, as_predicate
from xformers_zoo.kernels.pallas_backward import flash_backward
from xformers_zoo.kernels.pallas_forward import flash_forward
from xformers_zoo.kernels.pallas_in_kernel import EMPTY_ROW_LSE, LOG2_E
from xformers_zoo.kernels.pallas_layout import (
    FlashTiles,
    MosaicLaunch,
    input_rejects,
    kernel_head_dim,
    mosaic_features,
    prepare,
    tile_part,
    with_defaults,
)
from xformers_zoo.kernels.pallas_mosaic_backward import mosaic_backward
from xformers_zoo.kernels.pallas_mosaic_forward import mosaic_forward, mosaic_rejects
from xformers_zoo.kernels.pallas_schedule import (
    KernelPlan,
    TileSchedule,
)

INTERPRET_ENV = "XFORMERS_ZOO_PALLAS_INTERPRET"
KernelFamily = Literal["mosaic", "triton"]
KERNEL_FAMILIES: tuple[str, ...] = get_args(KernelFamily)
# Features of a call (``pallas_layout.mosaic_features``) with which the Mosaic kernels run
# on Hopper without being asked for: those whose GPU tests (tests/test_pallas_mosaic*.py) have
# passed on a GPU.
MOSAIC_VALIDATED = frozenset({"right padding"})


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
    return input_rejects(call.dtype, call.head_dim, tile_part(call.block_mask,
                                                              call.mask_predicate)) or (
        None if 0.0 <= call.dropout_rate < 1.0
        else f"dropout_rate must be in [0, 1), got {call.dropout_rate}")


def _compute_capability() -> str | None:
    """The first device's CUDA compute capability ("9.0"), or None off CUDA GPUs."""
    capability = getattr(jax.devices()[0], "compute_capability", None)
    return None if capability is None else str(capability)


@register_implementation(
    "pallas", rejects=pallas_rejects,
    description="FlashAttention-2 Pallas kernels, dense and block-sparse",
    form=lambda call: pallas_family(call),
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
    family: "mosaic" (Hopper wgmma kernels; raises naming the reason for a call they cannot
    serve), "triton", or None: Mosaic on a Hopper GPU where it serves the call with features a
    GPU run has validated (``MOSAIC_VALIDATED``), else Triton.
    ``mask_predicate`` (a ``MaskPredicate`` or a bare ``fn(b, h, q, k)``) says which pairs are
    visible, token by token; its tiles are classified on the host and only the partial ones
    evaluate it in the kernels. It replaces ``block_mask``.
    ``batch_offset``: the index of this batch's first row in a larger batch that was split
    (kernels/batch_shards.py), so that its dropout decisions are those of the whole batch's.
    """
    call = prepare(q, k, v, key_mask=key_mask, block_mask=block_mask, scale=scale,
                   causal=causal, dropout_rate=dropout_rate, dropout_rng=dropout_rng,
                   interpret=interpret, tiles=tiles, key_mask_is_prefix=key_mask_is_prefix,
                   kernels=kernels, mask_predicate=mask_predicate, batch_offset=batch_offset,
                   choose_mosaic=_use_mosaic)
    return call.cut(_flash(*call.kernels)(*call.inputs), call.q_len)


def pallas_forward_with_lse(
    q: Float[Array, "b q h d"], k: Float[Array, "b k h d"], v: Float[Array, "b k h d"],
    **options,
) -> tuple[Float[Array, "b q h d"], Float[Array, "b h q"]]:
    """The forward kernels' output and natural-log log-sum-exp of each row's scaled logits
    (-inf for rows that see no key); options as ``pallas_attention``. Not differentiable:
    ``pallas_backward_from_lse`` is its backward."""
    call = prepare(q, k, v, **with_defaults(options), choose_mosaic=_use_mosaic)
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
    call = prepare(q, k, v, **with_defaults(options), choose_mosaic=_use_mosaic)
    q_pad = call.inputs[0].shape[1]
    # Padded rows have no cotangent; an empty-row LSE gives them no probability at all.
    lse2 = jnp.where(jnp.isfinite(lse), lse * LOG2_E, EMPTY_ROW_LSE).astype(jnp.float32)
    lse2 = jnp.pad(lse2, ((0, 0), (0, 0), (0, q_pad - call.q_len)),
                   constant_values=EMPTY_ROW_LSE)
    dq, dk, dv = _backward(call.kernels, *call.inputs, call.pad_rows(out), lse2,
                           call.pad_rows(d_out))
    return call.cut(dq, call.q_len), call.cut(dk, k.shape[1]), call.cut(dv, k.shape[1])


def _mosaic_refusal(interpret: bool, dtype: str, head_dim: int, tiles) -> str | None:
    """Why the Mosaic kernels cannot run a call here at all (inputs, interpret mode, not a
    Hopper GPU), or None."""
    reason = mosaic_rejects(dtype, head_dim, tiles)
    if reason is None and interpret:
        reason = "it has no interpret mode (Hopper GPUs only)"
    if reason is None:
        capability = _compute_capability()
        if capability is None or not capability.startswith("9."):
            reason = f"it needs a Hopper GPU (compute capability 9.x), device has {capability!r}"
    return reason


def _use_mosaic(kernels: KernelFamily | None, interpret: bool, dtype: str, head_dim: int, *,
                tiles, features: frozenset[str]) -> bool:
    """Whether the Mosaic kernels run this call (else the Triton kernels). Asked for by name,
    they must serve the call or the reason is raised; by default they run it when a GPU run has
    validated each of its ``features``."""
    if kernels not in (None, *KERNEL_FAMILIES):
        raise ValueError(f"pallas attention: kernels must be one of {KERNEL_FAMILIES} or None, "
                         f"got {kernels!r}")
    if kernels == "triton":
        return False
    reason = _mosaic_refusal(interpret, dtype, head_dim, tiles)
    if reason is not None:
        if kernels == "mosaic":
            raise ValueError(f"pallas attention: the Mosaic kernels cannot serve this call: "
                             f"{reason}")
        return False
    return kernels == "mosaic" or features <= MOSAIC_VALIDATED


def pallas_family(call: AttentionCall) -> str:
    """Which kernel family ``pallas`` runs ``call`` on by default, and why not the Mosaic one
    when it does not: "mosaic", or "triton: ..." with the reason."""
    reason = _mosaic_refusal(call.backend != "gpu", call.dtype, kernel_head_dim(call.head_dim),
                             tile_part(call.block_mask, as_predicate(call.mask_predicate)))
    if reason is not None:
        return f"triton: the Mosaic kernels cannot serve it: {reason}"
    features = mosaic_features(causal=call.causal, has_block_mask=call.block_mask is not None,
                               has_predicate=call.mask_predicate is not None,
                               has_key_mask=call.has_key_mask,
                               key_mask_is_prefix=call.key_mask_is_prefix,
                               dropout_rate=call.dropout_rate, k_len=call.k_len)
    pending = sorted(features - MOSAIC_VALIDATED)
    if pending:
        return (f"triton: the Mosaic kernels are not yet validated on a GPU for "
                f"{', '.join(pending)}; kernels=\"mosaic\" runs them")
    return "mosaic"


def _forward(kernels, q, k, v, bias, streams, lengths):
    """Output and base-2 log-sum-exp from the forward kernel of ``kernels`` (plans,
    schedules, Mosaic launch or None)."""
    (fwd_plan, _, _), schedules, mosaic = kernels
    if mosaic is not None:
        return mosaic_forward(q, k, v, lengths, mosaic.forward, streams,
                              bias if mosaic.forward.mask.has_bias else None,
                              mosaic.forward_schedule)
    return flash_forward(q, k, v, bias, streams, schedules[0], fwd_plan)


def _backward(kernels, q, k, v, bias, streams, lengths, out, lse, d_out):
    """dq, dk, dv from the backward kernels of ``kernels`` given the output and base-2 LSE."""
    (_, kv_plan, q_plan), schedules, mosaic = kernels
    if mosaic is not None:
        plan = mosaic.backward
        dq, dk, dv = mosaic_backward(q, k, v, out, lse, d_out, lengths, plan, streams,
                                     bias if plan.mask.has_bias else None,
                                     mosaic.backward_schedule)
        return dq.astype(q.dtype), dk, dv
    return flash_backward(q, k, v, out, lse, d_out, bias, streams, schedules[1:],
                          (kv_plan, q_plan))


def _flash(plans: tuple[KernelPlan, ...], schedules: tuple[TileSchedule | None, ...],
           mosaic: MosaicLaunch | None):
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
