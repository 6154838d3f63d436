"""Contour growth for the Pathfinder generator, following Linsley et al. (2018) (the
``snakes2`` generator LRA used): where each contour's paddles go, and which fit.

A contour starts with a seed paddle and grows one paddle at a time. Each step moves a pivot
``length + 2 * margin`` px along the last direction; the next paddle's head is drawn among the
pixels on a circle of radius ``length + margin`` around the pivot, weighted by
``cos(min(continuity * turn, pi/2))^2`` times how free the occupancy mask (dilated by the margin)
is there, and the paddle runs from the head back towards the pivot. A paddle is refused if its
mask on top of the occupancy mask would exceed 1.8; the mask of a contour's latest paddle joins
the occupancy mask only once the next paddle is placed, so a contour never blocks itself.

Two target contours start ``seed_distance`` px apart, the first one at least twice that from the
borders, and grow in turn; if either gets stuck the whole pair starts again (at 64 px and up
most attempts end against a border, so an image takes hundreds). Distractor contours (a third
as long) follow, each tried a few times and skipped if it does not fit: an image keeps as many
as fitted. The loops run compiled (``pathfinder_kernels``); this module builds their sprite
tables and reads back the result.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import TYPE_CHECKING

import numpy as np
from jaxtyping import Bool, Float, Int, UInt8

from xformers_zoo.data import pathfinder_draw as draw
from xformers_zoo.data import pathfinder_kernels as kernels

if TYPE_CHECKING:
    from xformers_zoo.data.pathfinder import PathfinderParams

MAX_ATTEMPTS = 1_000_000  # target attempts before the settings are declared hopeless
SEED_DEGREES = np.arange(-180, 180)  # seed directions, sprite ids 0..359


class GrowthError(RuntimeError):
    """Two target contours did not fit after many attempts: the settings leave too little
    room."""


@dataclasses.dataclass(frozen=True)
class SpriteTables:
    """Every paddle one image can draw, by sprite id (seeds, then growth candidates)."""

    inks: UInt8[np.ndarray, "n k k"]
    masks: Float[np.ndarray, "n k k"]  # each paddle's mask values (kernels.sprite_values)
    angles: Float[np.ndarray, " n"]  # direction of each sprite's paddle
    heads: Int[np.ndarray, "c 2"]  # candidate head offsets from the pivot (row, col)
    head_angles: Float[np.ndarray, " c"]  # direction from the pivot to each candidate
    wides: Float[np.ndarray, "n w w"]  # the masks grey-dilated by the margin's disc
    seed_offsets: Int[np.ndarray, "360 o 2"]
    seed_counts: Int[np.ndarray, " 360"]
    reach: Bool[np.ndarray, " 360"]


def candidate_heads(radius: int) -> tuple[Int[np.ndarray, "c 2"], Float[np.ndarray, " c"]]:
    """Offsets of the pixels on a circle of ``radius`` around a pivot, one per pixel of arc,
    sorted (row, col) and without repeats, and their directions. The pivot is a whole pixel,
    so the offsets do not depend on it."""
    angles = np.arange(0, 360, 360.0 / (2 * radius * np.pi)) * np.pi / 180
    offsets = np.floor(radius * np.stack([np.sin(angles), np.cos(angles)], 1)).astype(np.int64)
    heads = np.unique(offsets, axis=0)
    return heads, np.arctan2(heads[:, 0], heads[:, 1])


def dilate(sprite: UInt8[np.ndarray, "k k"], footprint: Bool[np.ndarray, "d d"]
           ) -> UInt8[np.ndarray, "w w"]:
    """Grey dilation of ``sprite`` by ``footprint``, grown by its radius on every side."""
    r = footprint.shape[0] // 2
    k = sprite.shape[0]
    out = np.zeros((k + 2 * r,) * 2, sprite.dtype)
    for dy, dx in np.argwhere(footprint):  # out[p] = max of sprite within the disc around p
        np.maximum(out[dy:dy + k, dx:dx + k], sprite, out=out[dy:dy + k, dx:dx + k])
    return out


@functools.lru_cache(maxsize=16)
def sprite_tables(length: int, thickness: float, margin: int, antialias: int, size: int
                  ) -> SpriteTables:
    """The sprites of one resolution and paddle margin (drawn once per process)."""
    heads, head_angles = candidate_heads(length + margin)
    angles = np.concatenate([SEED_DEGREES * math.pi / 180,
                             [kernels.flip(float(a)) for a in head_angles]])
    pairs = [draw.paddle_sprite(length, thickness, margin, antialias, float(a)) for a in angles]
    shape = (length, thickness, margin, antialias)
    offsets = [draw.seed_offsets(*shape, float(a)) for a in angles[:360]]
    counts = np.array([len(o) for o in offsets], np.int64)
    table = np.zeros((360, max(counts), 2), np.int64)
    for i, o in enumerate(offsets):
        table[i, :len(o)] = o
    reach = np.array([draw.seed_reaches_everywhere(*shape, float(a), size)
                      for a in angles[:360]])
    return SpriteTables(
        inks=np.stack([ink for ink, _ in pairs]),
        masks=kernels.sprite_values(np.stack([m for _, m in pairs]), 1.0),
        angles=angles, heads=heads, head_angles=head_angles,
        wides=kernels.sprite_values(np.stack([dilate(m, draw.disc(margin)) for _, m in pairs]),
                                    1.0),
        seed_offsets=table, seed_counts=counts, reach=reach)


@dataclasses.dataclass
class Scene:
    """The contours of one image: each paddle's start pixel, sprite id and contour (0 and 1
    the targets), drawn with one paddle margin."""

    margin: int
    size: int
    tables: SpriteTables
    paddles: Int[np.ndarray, "p 4"]  # row, col, sprite id, contour
    contrasts: Float[np.ndarray, " c"]  # per contour

    @property
    def origins(self) -> Int[np.ndarray, "2 2"]:
        """The free ends of the two targets' seed paddles."""
        return self.paddles[:2, :2]

    @property
    def tips(self) -> Int[np.ndarray, "2 2"]:
        """The free ends of the two targets' last paddles."""
        return np.stack([self.paddles[self.paddles[:, 3] == c][-1, :2] for c in (0, 1)])

    def render(self, contours=None) -> Float[np.ndarray, "s s"]:
        """The ink of ``contours`` (default all) at their contrasts, before markers."""
        keep = self.paddles if contours is None else self.paddles[
            np.isin(self.paddles[:, 3], list(contours))]
        canvas = np.zeros((self.size, self.size))
        kernels.render(canvas, keep, len(keep), self.tables.inks, self.contrasts)
        return canvas


@functools.lru_cache(maxsize=16)
def turn_table(radius: int, continuity: float) -> Float[np.ndarray, "n c"]:
    """``kernels.turn_weights`` for the candidate heads on a circle of ``radius``
    (``length + margin``), computed once per process."""
    return kernels.turn_weights(candidate_heads(radius)[1], continuity)


def grow(p: PathfinderParams, rng: np.random.Generator) -> Scene:
    """The two targets and the distractors that fitted, drawn from ``rng``."""
    return grow_with_masks(p, rng)[0]


def grow_with_masks(p: PathfinderParams, rng: np.random.Generator
                    ) -> tuple[Scene, Float[np.ndarray, "s s"], Float[np.ndarray, "s s"]]:
    """``grow``, with the final occupancy mask and the dilation the growth kept beside it."""
    margin = int(p.paddle_margins[rng.integers(len(p.paddle_margins))])
    t = sprite_tables(p.paddle_length, p.paddle_thickness, margin, p.antialias, p.size)
    total = 2 * p.contour_length + p.num_distractors * p.distractor_length
    mask, dilated = np.zeros((p.size, p.size)), np.zeros((p.size, p.size))
    backup = np.zeros((2, p.size, p.size))
    free = np.zeros(p.size * p.size, np.int64)
    paddles = np.zeros((total, 4), np.int64)
    state = np.zeros((2 + p.num_distractors, 5), np.int64)
    angles = np.zeros(2 + p.num_distractors)
    turns = turn_table(p.paddle_length + margin, p.continuity)
    count, drawn = kernels.grow(
        rng, mask, dilated, backup, free, paddles, state, angles, t.masks, t.wides, t.heads,
        t.head_angles, turns, t.seed_offsets, t.seed_counts, t.reach, p.padding,
        p.seed_distance, p.paddle_length, margin, p.contour_length, p.num_distractors,
        p.distractor_length, p.paddle_retries, p.distractor_retries, MAX_ATTEMPTS)
    if count < 0:
        raise GrowthError(f"two {p.contour_length}-paddle target contours did not fit a "
                          f"{p.size}px image in {MAX_ATTEMPTS} attempts")
    contrasts = np.array([p.paddle_contrast * p.snake_contrast] * 2
                         + [p.snake_contrast] * drawn)
    return Scene(margin, p.size, t, paddles[:count], contrasts), mask, dilated
