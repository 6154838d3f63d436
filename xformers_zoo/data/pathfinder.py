"""The Pathfinder generator (Linsley et al. 2018) at the settings LRA uses (Tay et al. 2020):
dashed contours grown paddle by paddle, distractors, two endpoint markers, a fair-coin label.

An image holds two target contours of ``contour_length`` paddles whose first paddles start
``seed_distance`` px apart, and distractor contours of ``contour_length // 3`` paddles. Each
contour grows from its tip: the next paddle's direction is drawn among candidate turns weighted by
cos^2(min(continuity * turn, pi/2)), and a candidate whose centre line comes within the
clearance of another contour (an occupancy grid dilated by that clearance), of the contour's own
earlier paddles, or of the border gets weight 0. A contour with no candidate left backs off a
few paddles and grows again; after too many back-offs, or with no room for a distractor, the
whole image starts again from its next random numbers. One marker sits on the start of a random
target contour, the other on the end of the same contour (label 1) or of the other one (label 0).
Everything is drawn at ``antialias`` times the resolution and box-averaged down.

Every image is drawn from its own random stream seeded by (seed, split, index), so a data set
depends on the seed alone, never on the number of worker processes.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from jaxtyping import Float, Int

from xformers_zoo.data import pathfinder_draw as draw

LEVELS = {"baseline": 6, "contour9": 9, "contour14": 14}
# Candidate directions for a contour's first paddle (uniform) and for each turn (weighted).
FIRST_CANDIDATES, TURN_CANDIDATES = 24, 16
MAX_ATTEMPTS = 2000
TARGET_BACKTRACKS = 40
MAX_BACKOFF = 6  # paddles a stuck contour gives up, drawn from 1..MAX_BACKOFF
ALL_BITS = int("01" * 31, 2)  # the ``all`` bit of every contour (see _Image)
SEED_INSET = 0.2  # fraction of the side kept between the first seed and the edges


@dataclasses.dataclass(frozen=True)
class PathfinderParams:
    """Drawing settings of one resolution; lengths in output pixels."""

    size: int
    paddle_length: float
    paddle_margin: float
    paddle_thickness: float
    marker_radius: float
    seed_distance: float
    continuity: float
    num_distractors: int
    contrast: float
    contour_length: int = 14
    antialias: int = 2

    @property
    def clearance(self) -> float:
        """Least ink-free gap between two contours: one pixel more than the gap between the
        paddles of a contour, so that the dashes of one contour are always the closest ink."""
        return self.paddle_margin + 1.0

    def with_level(self, level: str) -> PathfinderParams:
        """These settings at a difficulty level ("baseline", "contour9", "contour14")."""
        if level not in LEVELS:
            raise ValueError(f"unknown Pathfinder level {level!r}; known: {', '.join(LEVELS)}")
        return dataclasses.replace(self, contour_length=LEVELS[level])


# The released data's settings (hard level); LRA.md lists them. Path-X's margin is reported as
# 2 or 3 (we take 2); Path-256's seed distance is unpublished (we take 30, continuing 7/12/20).
RESOLUTIONS = {
    32: PathfinderParams(32, paddle_length=2, paddle_margin=1, paddle_thickness=0.5,
                         marker_radius=1.5, seed_distance=7, continuity=1.0,
                         num_distractors=5, contrast=2.0),
    64: PathfinderParams(64, paddle_length=5, paddle_margin=1, paddle_thickness=1.0,
                         marker_radius=2.5, seed_distance=12, continuity=1.8,
                         num_distractors=22 // 4, contrast=0.8),
    128: PathfinderParams(128, paddle_length=5, paddle_margin=2, paddle_thickness=1.5,
                          marker_radius=3.0, seed_distance=20, continuity=1.8,
                          num_distractors=35 // 4, contrast=0.9),
    256: PathfinderParams(256, paddle_length=5, paddle_margin=3, paddle_thickness=2.0,
                          marker_radius=5.0, seed_distance=30, continuity=1.8,
                          num_distractors=30 // 4, contrast=1.0),
}


@dataclasses.dataclass
class Sample:
    """One drawn image with the geometry it was drawn from (output-pixel coordinates).

    Attributes:
      image: uint8 ``[size, size]``.
      label: 1 if both markers lie on one contour, else 0.
      paddles: ``[P, 2, 2]`` paddle end points (x, y).
      contour: ``[P]`` contour index of each paddle (0 and 1 are the targets).
      markers: ``[2, 2]`` marker centres (x, y).
    """

    image: np.ndarray
    label: int
    paddles: Float[np.ndarray, "p 2 2"]
    contour: Int[np.ndarray, " p"]
    markers: Float[np.ndarray, "2 2"]


class _StuckError(Exception):
    """A contour found no free direction; the image starts again."""


class _Image:
    """The growing image: occupancy grid and each contour's paddles, tips and headings, in
    supersampled units.

    Contour c owns two bits of the grid: ``all`` (bit 2c) on the cells near any of its paddles,
    which blocks every other contour, and ``old`` (bit 2c + 1) near all but its latest paddle,
    which blocks the contour itself (it may not run into its own earlier paddles, but its next
    paddle is meant to lie near the latest one).
    """

    def __init__(self, p: PathfinderParams):
        s = p.antialias
        self.p, self.side = p, p.size * s
        self.length, self.margin = p.paddle_length * s, p.paddle_margin * s
        self.step = self.length + self.margin
        # Centre lines of different contours stay this far apart, so their ink keeps the gap.
        self.radius = (p.clearance + p.paddle_thickness) * s
        self.border = s  # one output pixel
        self.owner = np.zeros((self.side, self.side), np.int64)
        self.paddles: list[list[tuple[np.ndarray, np.ndarray]]] = []
        self.tips: list[list[np.ndarray]] = []
        self.headings: list[list[float | None]] = []
        samples = max(int(math.ceil(self.length / 0.75)), 2) + 1
        self.offsets = np.linspace(0.0, self.length, samples)  # sample points along a paddle
        # Claims reach past the clearance by half a cell diagonal and half a sample spacing, so
        # that checking one cell per sample point never lets a centre line come closer.
        self.claim_radius = self.radius + math.sqrt(0.5) + self.offsets[1] / 2

    def new_contour(self, start: np.ndarray) -> int:
        """Opens a contour whose first paddle will start at ``start``; returns its index."""
        if len(self.paddles) >= 31:
            raise ValueError("at most 31 contours fit the occupancy grid's 62 bits")
        self.paddles.append([])
        self.tips.append([start])
        self.headings.append([None])
        return len(self.paddles) - 1

    def _candidates(self, rng: np.random.Generator, heading: float | None):
        """Candidate directions and their curvature weights."""
        if heading is None:
            angles = rng.uniform(0, 2 * np.pi) + np.arange(FIRST_CANDIDATES) * (
                2 * np.pi / FIRST_CANDIDATES)
            return angles, np.ones(FIRST_CANDIDATES)
        # Turns spread over the range where cos^2(continuity * turn) is positive.
        limit = min(np.pi / 2 / self.p.continuity, np.pi)
        turns = (2 * (np.arange(TURN_CANDIDATES) + rng.uniform()) / TURN_CANDIDATES - 1) * limit
        weights = np.cos(np.minimum(np.abs(self.p.continuity * turns), np.pi / 2)) ** 2
        return heading + turns, weights

    @staticmethod
    def bits(contour: int) -> tuple[int, int]:
        """The ``all`` and ``old`` bits of a contour."""
        return 1 << (2 * contour), 1 << (2 * contour + 1)

    def extend(self, rng: np.random.Generator, contour: int) -> None:
        """Adds the contour's next paddle at its tip, or raises _StuckError."""
        tip = self.tips[contour][-1]
        all_bit, old_bit = self.bits(contour)
        angles, weights = self._candidates(rng, self.headings[contour][-1])
        direction = np.stack([np.cos(angles), np.sin(angles)], -1)  # [k, 2]
        starts = tip + direction * (self.margin / 2)  # [k, 2]
        points = starts[:, None] + direction[:, None] * self.offsets[None, :, None]  # [k, m, 2]
        bad = ((points < self.border) | (points > self.side - self.border)).any(axis=(1, 2))
        bad |= draw.blocked(self.owner, points, (ALL_BITS & ~all_bit) | old_bit).any(-1)
        weights = np.where(bad, 0.0, weights)
        total = weights.sum()
        if total <= 0:
            raise _StuckError
        k = rng.choice(len(angles), p=weights / total)
        a, b = starts[k], starts[k] + direction[k] * self.length
        draw.claim(self.owner, a, b, self.claim_radius, all_bit)
        if self.paddles[contour]:
            draw.claim(self.owner, *self.paddles[contour][-1], self.claim_radius, old_bit)
        self.paddles[contour].append((a, b))
        self.tips[contour].append(tip + direction[k] * self.step)
        self.headings[contour].append(float(angles[k]))

    def retract(self, contour: int, n: int) -> None:
        """Removes the contour's last ``n`` paddles (backtracking out of a dead end)."""
        if n <= 0:
            return
        all_bit, old_bit = self.bits(contour)
        paddles = self.paddles[contour]
        # Every cell whose bits change lies near a removed paddle or the new latest one.
        changed = paddles[-n - 1:]
        lo = np.min([np.minimum(a, b) for a, b in changed], axis=0) - self.claim_radius
        hi = np.max([np.maximum(a, b) for a, b in changed], axis=0) + self.claim_radius
        del paddles[-n:], self.tips[contour][-n:], self.headings[contour][-n:]
        draw.release(self.owner, lo, hi, all_bit | old_bit)
        for i, (a, b) in enumerate(paddles):  # claim again what the kept paddles hold there
            if (np.minimum(a, b) - self.claim_radius <= hi).all() and (
                    np.maximum(a, b) + self.claim_radius >= lo).all():
                draw.claim(self.owner, a, b, self.claim_radius, all_bit)
                if i < len(paddles) - 1:
                    draw.claim(self.owner, a, b, self.claim_radius, old_bit)

    def grow(self, rng: np.random.Generator, contours: list[int], n: int, budget: int) -> None:
        """Grows ``contours`` to ``n`` paddles each, one paddle at a time in turn; a stuck
        contour backs off 1-3 paddles, at most ``budget`` times before _StuckError."""
        while True:
            counts = [len(self.paddles[c]) for c in contours]
            if min(counts) >= n:
                return
            contour = contours[int(np.argmin(counts))]
            try:
                self.extend(rng, contour)
            except _StuckError:
                budget -= 1
                if budget < 0:
                    raise
                self.retract(contour, min(counts[contours.index(contour)],
                                          int(rng.integers(1, MAX_BACKOFF + 1))))

    def random_point(self, rng: np.random.Generator, inset: float = 0.0) -> np.ndarray:
        """A uniform point at least ``border + inset`` from the edges."""
        edge = self.border + inset
        return rng.uniform(edge, self.side - edge, size=2)

    def free_point(self, rng: np.random.Generator, tries: int = 64) -> np.ndarray | None:
        """A uniform point on a cell no contour has taken (None if ``tries`` draws miss)."""
        points = rng.uniform(self.border, self.side - self.border, size=(tries, 2))
        free = np.flatnonzero(~draw.blocked(self.owner, points, ALL_BITS))
        return points[free[0]] if free.size else None


def _place_targets(rng: np.random.Generator, im: _Image) -> None:
    """Two target contours seeded ``seed_distance`` apart, grown one paddle at a time in turn."""
    # Seeds away from the border leave the contours room to grow (fewer dead ends).
    first = im.random_point(rng, inset=SEED_INSET * im.side)
    angle = rng.uniform(0, 2 * np.pi)
    offset = im.p.seed_distance * im.p.antialias * np.array([np.cos(angle), np.sin(angle)])
    second = first + offset
    if ((second < im.border) | (second > im.side - im.border)).any():
        raise _StuckError
    contours = [im.new_contour(first), im.new_contour(second)]  # indices 0 and 1
    im.grow(rng, contours, im.p.contour_length, budget=TARGET_BACKTRACKS)


def _place_distractors(rng: np.random.Generator, im: _Image, tries: int = 20) -> None:
    length = max(im.p.contour_length // 3, 1)
    for _ in range(im.p.num_distractors):
        for _ in range(tries):
            start = im.free_point(rng)
            if start is None:
                continue
            contour = im.new_contour(start)
            try:
                im.grow(rng, [contour], length, budget=2)
                break
            except _StuckError:
                im.retract(contour, len(im.paddles[contour]))
                for history in (im.paddles, im.tips, im.headings):
                    history.pop()
        else:
            raise _StuckError


def draw_sample(rng: np.random.Generator, p: PathfinderParams) -> Sample:
    """One Pathfinder image and its label, from the random stream ``rng``."""
    for _ in range(MAX_ATTEMPTS):
        im = _Image(p)
        try:
            _place_targets(rng, im)
            _place_distractors(rng, im)
        except _StuckError:
            continue
        break
    else:
        raise RuntimeError(f"could not draw a {p.size}px Pathfinder image in {MAX_ATTEMPTS} "
                           "attempts; the settings leave too little room")
    label = int(rng.random() < 0.5)
    marked = int(rng.integers(2))
    start = im.paddles[marked][0][0]
    end = im.paddles[marked if label else 1 - marked][-1][1]
    scale = 1.0 / p.antialias  # a power of two: scaling back and forth is exact
    paddles = np.array([[a, b] for c in im.paddles for a, b in c]) * scale
    contour = np.array([i for i, c in enumerate(im.paddles) for _ in c], np.int64)
    canvas = render_ink(paddles, p)
    for centre in (start, end):
        draw.draw_disc(canvas, centre, p.marker_radius * p.antialias)
    image = draw.to_pixels(draw.downsample(canvas, p.antialias), p.contrast)
    return Sample(image, label, paddles, contour, np.stack([start, end]) * scale)


def render_ink(paddles: Float[np.ndarray, "p 2 2"], p: PathfinderParams
               ) -> Float[np.ndarray, "hs ws"]:
    """The paddles alone (no markers) on the supersampled canvas; for checks and figures."""
    s = p.antialias
    canvas = np.zeros((p.size * s, p.size * s), np.float32)
    for a, b in paddles * s:
        draw.draw_segment(canvas, a, b, p.paddle_thickness * s)
    return canvas


SPLIT_IDS = {"train": 0, "validation": 1, "test": 2}


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The random stream of image ``index`` of ``split``."""
    return np.random.default_rng(np.random.SeedSequence([seed, SPLIT_IDS[split], index]))


def draw_images(args: tuple[PathfinderParams, int, str, int, int]
                ) -> tuple[np.ndarray, np.ndarray]:
    """Images ``start .. start + count - 1`` of a split: uint8 ``[n, size, size]`` and labels."""
    p, seed, split, start, count = args
    samples = [draw_sample(image_rng(seed, split, i), p) for i in range(start, start + count)]
    return (np.stack([s.image for s in samples]),
            np.array([s.label for s in samples], np.int64))
