"""Block-sparse attention variants: Local attention, Longformer (Beltagy et al. 2020), BigBird
(Zaheer et al. 2020) and the Sparse Transformer (Child et al. 2019).

Each variant is a token-level mask predicate (a ``MaskPredicate`` from ``kernels.predicates``)
over exact softmax attention, so all four share one core that hands the pattern to
``kernels.dot_product_attention``: the ``pallas`` kernels skip the tiles it leaves empty, run the
full ones unmasked and evaluate it on the partial ones only; the ``xla`` reference evaluates it
densely. Blocks of any size run on the kernels (the public LRA code's 50-token Local blocks and
the Sparse Transformer's 10-token ones included) and windows are exact token windows.

BigBird's random blocks are drawn per tile, as its paper defines them, so they are the
predicate's tile part (``MaskPredicate.tiles``): host data fixed at trace time, drawn for
``max_length``, of which shorter calls take the top-left corner. The kernels need that part's
tiles to be powers of two >= 16; a BigBird block that is not still runs through ``xla``, and the
dispatch logs why ``pallas`` was passed over.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float

from xformers_zoo.kernels import BlockMask, MaskPredicate, dot_product_attention, masks
from xformers_zoo.kernels import predicates as pred
from xformers_zoo.models.masked_softmax import dropout_key
from xformers_zoo.models.sequence_parallel import SequenceParallelConfig
from xformers_zoo.overrides import ConfigError
from xformers_zoo.variants import Capabilities, register_variant


def _num_tiles(length: int, block: int) -> int:
    return -(-length // block)


@dataclasses.dataclass(frozen=True)
class BlockSparseConfig(SequenceParallelConfig):
    """Fields every block-sparse variant shares.

    ``block``: block size in tokens (the granularity of the pattern); ``implementation``: exact
    attention implementations to try in order (the block-sparse Pallas kernels first on GPUs, the
    XLA reference elsewhere); ``sequence_axis``: ring attention over that mesh axis, skipping
    the device blocks the pattern leaves empty (``SequenceParallelConfig``).
    """

    block: int = 64
    implementation: tuple[str, ...] = ("pallas", "cudnn", "xla")

    @property
    def causal(self) -> bool:
        """Whether queries may only see earlier keys (only the Sparse Transformer offers it)."""
        return False

    @property
    def random_tiles(self) -> int:
        """Random key tiles per query tile (BigBird only); they need a seed at init."""
        return 0

    def check(self, *, max_length: int, num_heads: int, head_dim: int) -> None:
        """Raises ConfigError when the pattern cannot be built for ``max_length`` tokens."""
        del num_heads, head_dim
        if self.block <= 0:
            raise ConfigError(f"block must be a positive number of tokens, got {self.block}")
        self.check_pattern(_num_tiles(max_length, self.block))

    def check_pattern(self, num_tiles: int) -> None:
        """Variant-specific limits on a grid of ``num_tiles`` x ``num_tiles`` tiles."""

    def pattern(self, length: int, *, seed: int | None) -> MaskPredicate:
        """The mask predicate for ``length`` tokens (``seed`` fixes random tiles, if any; only
        they depend on ``length``)."""
        raise NotImplementedError


def _check_non_negative(**values: int) -> None:
    for name, value in values.items():
        if value < 0:
            raise ConfigError(f"{name} must be >= 0, got {value}")


@dataclasses.dataclass(frozen=True)
class LocalConfig(BlockSparseConfig):
    """Local attention as in the LRA paper (Tay et al. 2021, "Long Range Arena"): tokens attend
    within their own block, and to the previous block when ``look_back`` is set."""

    look_back: bool = False

    def pattern(self, length: int, *, seed: int | None) -> MaskPredicate:
        del length, seed
        return pred.local_blocks(self.block, look_back=int(self.look_back))


@dataclasses.dataclass(frozen=True)
class LongformerConfig(BlockSparseConfig):
    """Longformer (Beltagy et al. 2020, "Longformer: The Long-Document Transformer"): a sliding
    window of ``window`` tokens (``window // 2`` on either side) plus global attention for the
    first ``global_tiles`` blocks, which hold the CLS token at position 0. Globals are whole
    blocks, so the first ``block`` tokens are global, not only CLS."""

    window: int = 512
    global_tiles: int = 1

    def check_pattern(self, num_tiles: int) -> None:
        _check_non_negative(window=self.window, global_tiles=self.global_tiles)
        if self.global_tiles > num_tiles:
            raise ConfigError(f"global_tiles ({self.global_tiles}) exceeds the {num_tiles} tiles "
                              f"of the sequence")

    def pattern(self, length: int, *, seed: int | None) -> MaskPredicate:
        del length, seed
        return pred.union(pred.sliding_window(self.window),
                          pred.global_tokens(self.global_tiles * self.block))


@dataclasses.dataclass(frozen=True)
class BigBirdConfig(BlockSparseConfig):
    """BigBird (Zaheer et al. 2020, "Big Bird: Transformers for Longer Sequences"), blocked
    ITC form: each query tile sees ``window_tiles`` tiles centred on itself, the first
    ``global_tiles`` tiles (which see everything), and ``random_tiles`` random key tiles.

    The random tiles are drawn once when a layer is built, from a seed taken from its rngs (so
    layers differ and a model seed reproduces them), and kept as host numpy data: the kernel's
    tile schedule is fixed at trace time, so they cannot be redrawn per step. They are drawn
    over all tiles and may coincide with window or global tiles. The default block (16) keeps
    the pattern usable on short sequences; the ``lra`` preset sets the paper's 64."""

    block: int = 16
    window_tiles: int = 3
    global_tiles: int = 1
    num_random: int = 3

    @property
    def random_tiles(self) -> int:
        return self.num_random

    def check_pattern(self, num_tiles: int) -> None:
        _check_non_negative(window_tiles=self.window_tiles, global_tiles=self.global_tiles,
                            num_random=self.num_random)
        for name, value in (("global_tiles", self.global_tiles), ("num_random", self.num_random)):
            if value > num_tiles:
                raise ConfigError(f"{name} ({value}) exceeds the {num_tiles} tiles of "
                                  f"block {self.block} in the sequence")

    def pattern(self, length: int, *, seed: int | None) -> MaskPredicate:
        if seed is None and self.num_random:
            raise ValueError("BigBird's random tiles need a seed")
        radius = self.window_tiles // 2
        window_and_globals = pred.union(pred.block_window(self.block, radius),
                                        pred.global_tokens(self.global_tiles * self.block))
        if not self.num_random:
            return window_and_globals
        # As in the paper, random keys are drawn among the tiles the window and globals miss.
        # sliding_window keeps tiles whose nearest tokens are <= window // 2 apart: tiles r
        # apart have nearest tokens (r - 1) * block + 1 apart.
        window = 1 if radius == 0 else 2 * ((radius - 1) * self.block + 1)
        taken = masks.union(masks.sliding_window(length, window, self.block),
                            masks.global_tokens(length, self.global_tiles, self.block))
        return window_and_globals.with_tiles(masks.random_blocks(
            length, self.num_random, self.block, seed=seed, exclude=taken))


@dataclasses.dataclass(frozen=True)
class SparseTransformerConfig(BlockSparseConfig):
    """Sparse Transformer (Child et al. 2019, "Generating Long Sequences with Sparse
    Transformers"). ``pattern_kind`` "fixed": tokens see their chunk of ``stride`` tokens and the
    last ``summary`` tokens of every chunk; "strided": the previous ``stride`` tokens and every
    ``stride``-th tile back, which only looks back and so needs ``causal``. ``causal``: queries
    see only earlier keys. ``stride`` and ``summary`` must be multiples of ``block``."""

    block: int = 16
    pattern_kind: str = "fixed"
    stride: int = 64
    summary: int = 16
    causal: bool = False

    def check_pattern(self, num_tiles: int) -> None:
        del num_tiles
        if self.pattern_kind not in ("fixed", "strided"):
            raise ConfigError(f"pattern_kind must be 'fixed' or 'strided', got "
                              f"{self.pattern_kind!r}")
        if self.stride <= 0 or self.stride % self.block:
            raise ConfigError(f"stride ({self.stride}) must be a positive multiple of block "
                              f"({self.block})")
        if self.pattern_kind == "fixed" and (self.summary % self.block
                                             or not 0 < self.summary <= self.stride):
            raise ConfigError(f"summary ({self.summary}) must be a multiple of block "
                              f"({self.block}) in [block, stride={self.stride}]")
        if self.pattern_kind == "strided" and not self.causal:
            raise ConfigError("the strided pattern only looks back: set causal=True or use "
                              "pattern_kind='fixed'")

    def pattern(self, length: int, *, seed: int | None) -> MaskPredicate:
        del length, seed
        if self.pattern_kind == "strided":
            return pred.strided(self.stride)
        return pred.fixed(self.stride, self.summary)


def _host_seed(rngs: nnx.Rngs) -> int | None:
    """A host integer seed from ``rngs``; None under abstract evaluation (shapes only, e.g.
    ``nnx.eval_shape``), where no concrete draw exists."""
    seed = jax.random.randint(rngs.params(), (), 0, np.iinfo(np.int32).max)
    try:
        return int(seed)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError):
        return None


@functools.lru_cache(maxsize=64)
def _corner(pattern: MaskPredicate, num_tiles: int) -> MaskPredicate:
    """``pattern`` with the first ``num_tiles`` x ``num_tiles`` of its tiles (cached per pattern
    object and size, so a traced call rebuilds nothing and its kernel schedules stay cached)."""
    tiles = pattern.tiles
    return pattern.with_tiles(BlockMask(tiles.mask[:, :num_tiles, :num_tiles], tiles.block_q,
                                        tiles.block_k))


class BlockSparseAttention(nnx.Module):
    """Exact softmax attention restricted to a token pattern given by the variant's config (see
    the module docstring for the four papers)."""

    def __init__(self, config: BlockSparseConfig, *, num_heads: int, head_dim: int,
                 max_length: int, dropout: float, rngs: nnx.Rngs):
        config.check(max_length=max_length, num_heads=num_heads, head_dim=head_dim)
        self.config = config
        self.dropout = dropout
        self.max_length = max_length
        self.seed = _host_seed(rngs) if config.random_tiles else 0
        # None only when built abstractly without a concrete random draw.
        self.pattern = (None if self.seed is None
                        else config.pattern(max_length, seed=self.seed))

    def mask_for(self, length: int) -> MaskPredicate:
        """The mask predicate for a call of ``length`` tokens (<= max_length); the same object
        for every call of that length."""
        if self.pattern is None:
            raise ValueError("this layer was built under abstract evaluation and has no random "
                             "tiles; build it with concrete rngs to run it")
        if length > self.max_length:
            raise ValueError(f"sequence of {length} tokens exceeds max_length={self.max_length} "
                             f"that this layer's block pattern was built for")
        if length == self.max_length or self.pattern.tiles is None:
            return self.pattern
        return _corner(self.pattern, _num_tiles(length, self.config.block))

    def __call__(self, q: Float[Array, "b l h d"], k: Float[Array, "b l h d"],
                 v: Float[Array, "b l h d"], key_mask: Bool[Array, "b l"], *,
                 deterministic: bool, rngs: nnx.Rngs | None = None) -> Float[Array, "b l h d"]:
        key = dropout_key(rngs, self.dropout, deterministic)
        return dot_product_attention(
            q, k, v, key_mask=key_mask, mask_predicate=self.mask_for(q.shape[1]),
            causal=self.config.causal, dropout_rate=0.0 if key is None else self.dropout,
            dropout_rng=key, implementation=self.config.implementation, key_mask_is_prefix=True,
            sequence_axis=self.config.sequence_axis)


_BLOCK_SPARSE = Capabilities(fixed_length=True)

register_variant(
    "local", config_cls=LocalConfig, capabilities=_BLOCK_SPARSE,
    paper="Tay et al. 2021, Long Range Arena: A Benchmark for Efficient Transformers (local "
          "attention baseline)",
    lra_overrides={"model.attention.block": 50},
)(BlockSparseAttention)

register_variant(
    "longformer", config_cls=LongformerConfig, capabilities=_BLOCK_SPARSE,
    paper="Beltagy et al. 2020, Longformer: The Long-Document Transformer",
    lra_overrides={"model.attention.window": 512},
)(BlockSparseAttention)

register_variant(
    "bigbird", config_cls=BigBirdConfig, capabilities=_BLOCK_SPARSE,
    paper="Zaheer et al. 2020, Big Bird: Transformers for Longer Sequences",
    lra_overrides={"model.attention.block": 64, "model.attention.num_random": 3},
)(BlockSparseAttention)

register_variant(
    "sparse-transformer", config_cls=SparseTransformerConfig,
    capabilities=Capabilities(fixed_length=True, causal=True),
    paper="Child et al. 2019, Generating Long Sequences with Sparse Transformers",
    # Fixed pattern with chunks of 50 tokens and c = 10 summary tokens, blocks of 10.
    lra_overrides={"model.attention.pattern_kind": "fixed", "model.attention.block": 10,
                   "model.attention.stride": 50, "model.attention.summary": 10},
)(BlockSparseAttention)
