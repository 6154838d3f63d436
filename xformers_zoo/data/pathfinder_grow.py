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
borders, and grow in turn; if either gets stuck the whole pair starts again. Distractor contours
(a third as long) follow, each tried a few times and skipped if it does not fit: an image keeps
as many as fitted.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import TYPE_CHECKING

import numpy as np
from jaxtyping import Bool, Float

from xformers_zoo.data import pathfinder_draw as draw

if TYPE_CHECKING:
    from xformers_zoo.data.pathfinder import PathfinderParams

Point = tuple[int, int]
ACCEPT_LIMIT = 1.8  # a paddle's mask plus the occupancy mask stays below this
OCCUPIED = 0.3  # occupancy above this is taken when choosing a contour's seed
MIN_FREE_SHARE = 0.01  # no distractor is seeded once less of the image is free
MIN_WEIGHT = 1e-4  # total candidate weight under which a contour is stuck


class GrowthError(RuntimeError):
    """Two target contours did not fit after many attempts: the settings leave too little
    room."""


@dataclasses.dataclass
class Contour:
    """One contour: its paddles as (start pixel, direction), all drawn at ``contrast``."""

    contrast: float
    origin: Point  # the free end of the seed paddle
    paddles: list[tuple[Point, float]]
    pivot: Point
    angle: float  # direction of growth at the tip
    tip: Point  # the free end of the latest paddle
    pending: tuple[Point, float]  # the latest paddle, whose mask is not yet in the occupancy


@functools.lru_cache(maxsize=64)
def circle_directions(radius: int) -> Float[np.ndarray, "n 2"]:
    """(sin, cos) of directions one pixel of arc apart on a circle of ``radius`` px."""
    angles = np.arange(0, 360, 360.0 / (2 * radius * np.pi)) * np.pi / 180
    return np.stack([np.sin(angles), np.cos(angles)], 1)


class Scene:
    """An image being grown: the occupancy mask and the contours placed so far, drawn with one
    paddle margin (chosen per image)."""

    def __init__(self, p: PathfinderParams, margin: int, rng: np.random.Generator):
        self.p, self.margin, self.rng, self.side = p, margin, rng, p.size
        # The mask, padded with zeros so that dilation lookups need no bounds checks.
        self.pad = margin
        self.padded = np.zeros((p.size + 2 * margin,) * 2)
        self.mask = self.padded[margin:margin + p.size, margin:margin + p.size]
        band = p.padding
        self.mask[:band], self.mask[-band:], self.mask[:, :band], self.mask[:, -band:] = 1, 1, 1, 1
        self.near = np.argwhere(draw.disc(margin)) - margin  # [k, 2] dilation offsets
        self.contours: list[Contour] = []

    def sprite(self, angle: float):
        """The ink and mask sprites of a paddle along ``angle``."""
        p = self.p
        return draw.paddle_sprite(p.paddle_length, p.paddle_thickness, self.margin,
                                  p.antialias, angle)

    def inside(self, point: Point) -> bool:
        """Whether ``point`` is a pixel of the image."""
        return 0 <= point[0] < self.side and 0 <= point[1] < self.side

    def _pivot_ok(self, tail: Point, angle: float) -> Point | None:
        """The seed paddle's pivot if both its head and pivot lie in the image."""
        head = draw.translate(tail, angle, self.p.paddle_length)
        pivot = draw.translate(head, draw.flip(angle), self.p.paddle_length + self.margin)
        return pivot if self.inside(head) and self.inside(pivot) else None

    def _random_angle(self) -> float:
        return int(self.rng.integers(-180, 180)) * math.pi / 180

    def seed(self, occupied: Bool[np.ndarray, "h w"]) -> tuple[Point, float] | None:
        """A seed paddle (start pixel, direction) whose opaque mask misses ``occupied``, uniform
        among the free starts; None if no start is free or every try leaves the image."""
        p = self.p
        for _ in range(p.paddle_retries + 1):
            angle = self._random_angle()
            shape = (p.paddle_length, p.paddle_thickness, self.margin, p.antialias, angle)
            if not draw.seed_reaches_everywhere(*shape, self.side):
                return None
            free = np.flatnonzero(draw.free_starts(occupied, draw.seed_offsets(*shape)))
            if free.size == 0:
                return None
            tail = divmod(int(free[self.rng.integers(free.size)]), self.side)
            if self._pivot_ok(tail, angle) is not None:
                return tail, angle
        return None

    def near_seed(self, first: Point) -> tuple[Point, float] | None:
        """The second target's seed, ``seed_distance`` px from ``first`` in a random direction
        (the original checks only that it stays in the image)."""
        p = self.p
        for _ in range(p.paddle_retries + 1):
            angle = self._random_angle()
            away = int(self.rng.integers(0, 360)) * math.pi / 180
            tail = (round(first[0] + p.seed_distance * math.sin(away)),
                    round(first[1] + p.seed_distance * math.cos(away)))
            if self._pivot_ok(tail, angle) is not None:
                return tail, angle
        return None

    def start(self, seed: tuple[Point, float], contrast: float) -> Contour:
        """A contour holding its seed paddle."""
        tail, angle = seed
        pivot = self._pivot_ok(tail, angle)
        return Contour(contrast, tail, [seed], pivot, angle, tail, seed)

    def settle(self, contour: Contour) -> None:
        """Adds the mask of the contour's latest paddle to the occupancy mask."""
        point, angle = contour.pending
        draw.paste_max(self.mask, self.sprite(angle)[1], point)

    def extend(self, contour: Contour) -> bool:
        """Adds the contour's next paddle; False if it is stuck."""
        p, m = self.p, self.margin
        pivot = draw.translate(contour.pivot, contour.angle, p.paddle_length + 2 * m)
        radius = p.paddle_length + m
        points = np.asarray(pivot) + radius * circle_directions(radius)  # [n, 2] float
        points = points[((points >= 0) & (points < self.side)).all(axis=1)]
        if not len(points):
            return False
        heads = np.unique(points.astype(np.int64), axis=0)  # [k, 2]
        step = heads - np.asarray(pivot)
        angles = np.arctan2(step[:, 0], step[:, 1])
        turn = np.abs(angles - contour.angle)
        turn = np.minimum(np.minimum(turn, 2 * np.pi - turn) * p.continuity, np.pi / 2)
        # occupancy dilated by the margin, read at the heads only
        near = heads[:, None, :] + self.near[None] + self.pad  # [k, d, 2]
        occupancy = self.padded[near[..., 0], near[..., 1]].max(axis=1)
        weights = (1 - occupancy) * np.maximum(np.cos(turn), 0) ** 2
        total = weights.sum()
        if total < MIN_WEIGHT:
            return False
        cumulative = np.cumsum(weights / total)
        for _ in range(p.paddle_retries + 1):
            k = int(np.argmax(cumulative > self.rng.random()))
            head, back = (int(heads[k, 0]), int(heads[k, 1])), draw.flip(float(angles[k]))
            views = draw.window(self.mask, self.sprite(back)[1], head)
            if views is None or (views[0] + views[1] / 255.0).max() < ACCEPT_LIMIT:
                self.settle(contour)
                contour.paddles.append((head, back))
                contour.pending = (head, back)
                contour.pivot, contour.angle, contour.tip = pivot, float(angles[k]), head
                return True
        return False

    def occupied(self, border: int) -> Bool[np.ndarray, "h w"]:
        """Taken pixels of the occupancy mask, with a frame ``border`` px wide."""
        taken = self.mask > OCCUPIED
        taken[:border], taken[-border:], taken[:, :border], taken[:, -border:] = (True,) * 4
        return taken

    def place_targets(self) -> bool:
        """The two target contours, grown in turn; False if either got stuck."""
        p = self.p
        contrast = p.paddle_contrast * p.snake_contrast
        first = self.seed(self.occupied(2 * p.seed_distance))
        if first is None:
            return False
        second = self.near_seed(first[0])
        if second is None:
            return False
        pair = [self.start(first, contrast), self.start(second, contrast)]
        for _ in range(p.contour_length - 1):
            for contour in pair:
                if not self.extend(contour):
                    return False
        self.settle(pair[1])  # as in the original, the first target's last mask stays out
        self.contours += pair
        return True

    def place_distractor(self) -> bool:
        """One distractor contour, or False (and no change) if it does not fit."""
        p = self.p
        if (self.mask <= OCCUPIED).mean() < MIN_FREE_SHARE:
            return False
        seed = self.seed(self.occupied(1))
        if seed is None:
            return False
        saved = self.padded.copy()
        contour = self.start(seed, p.snake_contrast)
        for _ in range(p.distractor_length - 1):
            if not self.extend(contour):
                np.copyto(self.padded, saved)
                return False
        self.settle(contour)
        self.contours.append(contour)
        return True

    def place_distractors(self) -> None:
        """Up to ``num_distractors`` distractors, each tried a few times, kept as they fit."""
        for _ in range(self.p.num_distractors):
            for _ in range(self.p.distractor_retries + 1):
                if self.place_distractor():
                    break


def grow(p: PathfinderParams, rng: np.random.Generator, max_attempts: int = 100_000) -> Scene:
    """A scene with its two targets and the distractors that fitted, from ``rng``."""
    margin = int(p.paddle_margins[rng.integers(len(p.paddle_margins))])
    for _ in range(max_attempts):
        scene = Scene(p, margin, rng)
        if scene.place_targets():
            scene.place_distractors()
            return scene
    raise GrowthError(f"two {p.contour_length}-paddle target contours did not fit a "
                      f"{p.size}px image in {max_attempts} attempts")
