"""How one call of the Pallas kernels is laid out: the tiles of each pass, the host tile
schedules of block-sparse patterns (kernels/pallas_schedule.py), and the inputs padded to whole
tiles and to the kernels' head sizes with the key bias, dropout streams and key lengths beside
them (``prepare``). ``pallas_attention`` chooses the kernel family and runs the kernels.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from xformers_zoo.kernels.block_mask import BlockMask
from xformers_zoo.kernels.mask_predicate import MaskPredicate, as_predicate, tile_classes
from xformers_zoo.kernels.pallas_dropout import head_streams, seed_words
from xformers_zoo.kernels.pallas_mosaic_backward import MosaicBackwardPlan
from xformers_zoo.kernels.pallas_mosaic_forward import (
    BLOCK_K,
    BLOCK_Q,
    HEAD_DIMS,
    QUERY_TILES_PER_PROGRAM,
    MosaicPlan,
)
from xformers_zoo.kernels.pallas_mosaic_mask import MosaicMask, MosaicSchedule, mosaic_schedule
from xformers_zoo.kernels.pallas_schedule import (
    KernelPlan,
    TileSchedule,
    causal_tiles,
    schedule_from_visibility,
    tile_visibility,
)
from xformers_zoo.kernels.pallas_split import split_long_rows

# Both kernel families take the head sizes HEAD_DIMS; others run zero-padded to the next one.
KERNEL_DTYPES = ("bfloat16", "float16", "float32")  # either family; Mosaic: MOSAIC_DTYPES
# What a call may ask of the Mosaic kernels besides dense attention (``mosaic_features``).
MOSAIC_FEATURES = ("dropout", "causal", "block mask", "mask predicate", "key mask",
                   "right padding")


def kernel_head_dim(head_dim: int) -> int:
    """The kernels' head size a call of ``head_dim`` (at most ``HEAD_DIMS[-1]``) runs at,
    zero-padded."""
    return next(size for size in HEAD_DIMS if size >= head_dim)


def mosaic_features(*, causal: bool, has_block_mask: bool, has_predicate: bool,
                    has_key_mask: bool, key_mask_is_prefix: bool, dropout_rate: float,
                    k_len: int) -> frozenset[str]:
    """The names (``MOSAIC_FEATURES``) of what a call asks of the Mosaic kernels besides dense
    attention ("right padding": a prefix key mask, or keys padded to whole tiles)."""
    prefix_mask = has_key_mask and key_mask_is_prefix
    named = {"dropout": dropout_rate > 0.0, "causal": causal, "block mask": has_block_mask,
             "mask predicate": has_predicate, "key mask": has_key_mask and not key_mask_is_prefix,
             "right padding": prefix_mask or k_len % BLOCK_K != 0}
    return frozenset(name for name, wanted in named.items() if wanted)


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


def tile_part(block_mask: BlockMask | None,
               predicate: MaskPredicate | None) -> BlockMask | None:
    """The tile mask the kernel tiles must divide: the block mask, or a predicate's tiles."""
    return predicate.tiles if predicate is not None else block_mask


def input_rejects(dtype: str, head_dim: int, block_mask: BlockMask | None) -> str | None:
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


@dataclasses.dataclass(frozen=True, eq=False)
class MosaicLaunch:
    """The Mosaic kernels' plans for one call and, for causal, block-sparse and predicate
    masks, their schedules (key tiles per query tile pair; query tiles per key block)."""

    forward: MosaicPlan
    backward: MosaicBackwardPlan
    forward_schedule: MosaicSchedule | None = None
    backward_schedule: MosaicSchedule | None = None


def _mosaic_launch(pattern, *, scale: float, causal: bool, key_mask, key_mask_is_prefix: bool,
                   has_bias: bool, dropout_rate: float, batch: int, heads: int,
                   token_lengths: tuple[int, int], q_pad: int, k_pad: int) -> MosaicLaunch:
    """Plans and schedules of the Mosaic kernels: dense calls mask right padding by sequence
    lengths, every other key mask goes in as a bias; causal, block and predicate masks walk
    schedules."""
    q_len, k_len = token_lengths
    sparse = pattern is not None or causal
    lengths = has_bias and not sparse and (key_mask is None or key_mask_is_prefix)
    mask = MosaicMask(has_lengths=lengths, has_bias=has_bias and not lengths,
                      causal_offset=(k_len - q_len) if causal else None,
                      predicate=pattern if isinstance(pattern, MaskPredicate) else None,
                      token_lengths=token_lengths)
    forward = MosaicPlan(scale=scale, mask=mask, dropout_rate=dropout_rate)
    backward = MosaicBackwardPlan(scale=scale, mask=mask, dropout_rate=dropout_rate)
    if not sparse:
        return MosaicLaunch(forward, backward)
    schedules = []
    for block_q, block_k, by_key in ((forward.rows_per_program, forward.block_k, False),
                                     (backward.block_q, backward.keys_per_program, True)):
        schedules.append(mosaic_schedule(pattern, mask.causal_offset, batch, heads,
                                         token_lengths, block_q, block_k, q_pad // block_q,
                                         k_pad // block_k, by_key))
    return MosaicLaunch(
        dataclasses.replace(forward, mask=mask.with_schedule(schedules[0])),
        dataclasses.replace(backward, mask=mask.with_schedule(schedules[1])), *schedules)


@dataclasses.dataclass(frozen=True)
class PreparedCall:
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


def prepare(q, k, v, *, key_mask, block_mask, scale, causal, dropout_rate, dropout_rng,
             interpret, tiles, key_mask_is_prefix, kernels, mask_predicate, choose_mosaic,
             batch_offset=0) -> PreparedCall:
    """Checks a call and lays it out for the kernels (``pallas_attention`` documents the
    options): tile plans and host schedules, inputs padded to whole tiles, the key bias.
    ``choose_mosaic(kernels, interpret, dtype, head_dim, tiles=, features=)`` says whether the
    Mosaic kernels run it (their tiles set the padding)."""
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
    reason = input_rejects(str(q.dtype), head_dim, tile_part(block_mask, predicate))
    if reason is not None:
        raise ValueError(f"pallas attention: {reason}")
    if predicate is not None and predicate.tiles is not None:
        predicate.tiles.check_shape(q_len, k_len, heads)
    if block_mask is not None:
        block_mask.check_shape(q_len, k_len, heads)
    scale = float(head_dim ** -0.5 if scale is None else scale)
    # The kernels' head sizes; others run zero-padded to the next one.
    kernel_dim = kernel_head_dim(head_dim)
    pattern = block_mask if predicate is None else predicate
    tiles = tiles or default_tiles(kernel_dim, q.dtype, sparse=pattern is not None)
    passes = [_fit_to_mask(t, tile_part(block_mask, predicate)) for t in tiles.passes()]
    features = mosaic_features(causal=causal, has_block_mask=block_mask is not None,
                               has_predicate=predicate is not None,
                               has_key_mask=key_mask is not None,
                               key_mask_is_prefix=key_mask_is_prefix, dropout_rate=dropout_rate,
                               k_len=k_len)
    use_mosaic = choose_mosaic(kernels, interpret, str(q.dtype), kernel_dim,
                               tiles=tile_part(block_mask, predicate), features=features)
    if use_mosaic:  # its tiles set the padding of q and k/v too
        passes[0] = dataclasses.replace(passes[0], block_q=QUERY_TILES_PER_PROGRAM * BLOCK_Q,
                                        block_k=BLOCK_K)
    q_pad = _round_up(q_len, max(t.block_q for t in passes))
    k_pad = _round_up(k_len, max(t.block_k for t in passes))

    has_bias = key_mask is not None or k_pad != k_len
    mosaic = None
    if use_mosaic:
        mosaic = _mosaic_launch(pattern, scale=scale, causal=causal, key_mask=key_mask,
                                key_mask_is_prefix=key_mask_is_prefix, has_bias=has_bias,
                                dropout_rate=float(dropout_rate), batch=batch, heads=heads,
                                token_lengths=(q_len, k_len), q_pad=q_pad, k_pad=k_pad)
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
        if pattern is not None and mosaic is None:  # the Mosaic kernels walk their own
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
    if mosaic is not None and mosaic.forward.has_lengths:
        lengths = (jnp.full((batch,), k_len, jnp.int32) if key_mask is None
                   else key_mask.sum(-1).astype(jnp.int32))
    # Zero head-dim columns change no logit q . k and give zero output columns, so attention
    # over the padded q, k, v cut back to the first head_dim columns is exact.
    inputs = (jnp.pad(q, pad_q), jnp.pad(k, pad_k), jnp.pad(v, pad_k), bias, streams, lengths)
    return PreparedCall((tuple(plans), tuple(schedules), mosaic), inputs, q_len, head_dim)


def with_defaults(options: dict) -> dict:
    """``pallas_attention``'s options with its defaults filled in (``key_mask_is_prefix``,
    ``interpret`` ... as it takes them), for ``prepare``."""
    defaults = dict(key_mask=None, block_mask=None, scale=None, causal=False, dropout_rate=0.0,
                    dropout_rng=None, interpret=None, tiles=None, key_mask_is_prefix=False,
                    kernels=None, mask_predicate=None, batch_offset=0)
    unknown = set(options) - set(defaults)
    if unknown:
        raise TypeError(f"pallas attention: unknown options {sorted(unknown)}; accepted: "
                        f"{sorted(defaults)}")
    return defaults | options
