"""The Pathfinder generator (Linsley et al. 2018; Kim, Linsley et al. 2020) at the settings of
the data LRA released (Tay et al. 2020): two target contours of dashed paddles, distractor
contours, two endpoint markers and a fair-coin label.

Contours grow as in ``pathfinder_grow``; they are drawn as in ``pathfinder_draw``: every paddle
a thin line shrunk with Lanczos from twice the resolution, times its contour's contrast
(targets ``paddle_contrast * snake_contrast``, distractors ``snake_contrast``), so a contour is a
dashed line of faint smudges. One marker, a soft disc, sits on the free end of a random target's
seed paddle; the other on the last paddle of the same target (label 1) or of the other one
(label 0). The image is then rescaled so that its brightest pixel is 255.

Every image is drawn from its own random stream seeded by (seed, split, index), so a data set
depends on the seed alone, never on the number of worker processes.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from jaxtyping import Float, Int, UInt8

from xformers_zoo.data import pathfinder_draw as draw
from xformers_zoo.data.pathfinder_grow import grow

LEVELS = {"baseline": 6, "contour9": 9, "contour14": 14}


@dataclasses.dataclass(frozen=True)
class PathfinderParams:
    """Drawing settings of one resolution (the original generator's arguments; lengths in
    output pixels).

    ``distractor_budget``: the numerator of ``num_distractor_snakes = budget //
    distractor_length``; ``paddle_margins``: one is drawn per image.
    """

    size: int
    paddle_length: int
    paddle_margins: tuple[int, ...]
    paddle_thickness: float
    marker_radius: float
    seed_distance: int
    continuity: float
    distractor_budget: int
    snake_contrast: float
    paddle_contrast: float = 1.0
    padding: int = 22
    contour_length: int = 14
    antialias: int = 2
    paddle_retries: int = 2
    distractor_retries: int = 4

    @property
    def distractor_length(self) -> int:
        """Paddles per distractor contour: a third of a target's."""
        return self.contour_length // 3

    @property
    def num_distractors(self) -> int:
        """Distractor contours requested (as many as fit are drawn)."""
        return self.distractor_budget // self.distractor_length

    def with_level(self, level: str) -> PathfinderParams:
        """These settings at a difficulty level ("baseline", "contour9", "contour14")."""
        if level not in LEVELS:
            raise ValueError(f"unknown Pathfinder level {level!r}; known: {', '.join(LEVELS)}")
        return dataclasses.replace(self, contour_length=LEVELS[level])


# The released data's settings: LRA's builder docstrings over the original wrapper's defaults
# (padding 22, seed distance 27, paddle contrast 1).
RESOLUTIONS = {
    32: PathfinderParams(32, paddle_length=2, paddle_margins=(1,), paddle_thickness=0.5,
                         marker_radius=1.5, seed_distance=7, continuity=1.0,
                         distractor_budget=20, snake_contrast=2.0, paddle_contrast=0.75,
                         padding=1),
    64: PathfinderParams(64, paddle_length=5, paddle_margins=(1,), paddle_thickness=1.0,
                         marker_radius=2.5, seed_distance=12, continuity=1.8,
                         distractor_budget=22, snake_contrast=0.8, padding=1),
    128: PathfinderParams(128, paddle_length=5, paddle_margins=(2, 3), paddle_thickness=1.5,
                          marker_radius=3.0, seed_distance=20, continuity=1.8,
                          distractor_budget=35, snake_contrast=0.9, padding=1),
    256: PathfinderParams(256, paddle_length=5, paddle_margins=(3,), paddle_thickness=2.0,
                          marker_radius=5.0, seed_distance=27, continuity=1.8,
                          distractor_budget=30, snake_contrast=1.0, padding=22),
}


@dataclasses.dataclass
class Sample:
    """One drawn image with the geometry it was drawn from ((row, col) pixels).

    Attributes:
      image: the image, 0..255.
      label: 1 if both markers lie on one contour, else 0.
      markers: the two marker centres.
      paddles: each paddle's start pixel and direction (radians; rows grow with sin).
      contour: the contour of each paddle (0 and 1 are the targets, the rest distractors).
      contrast: each paddle's contrast.
      margin: the image's paddle margin.
    """

    image: UInt8[np.ndarray, "s s"]
    label: int
    markers: Int[np.ndarray, "2 2"]
    paddles: Float[np.ndarray, "p 3"]
    contour: Int[np.ndarray, " p"]
    contrast: Float[np.ndarray, " p"]
    margin: int

    @property
    def num_distractors(self) -> int:
        """Distractor contours drawn."""
        return int(self.contour.max()) - 1


def render_ink(sample: Sample, p: PathfinderParams, contours=None) -> Float[np.ndarray, "s s"]:
    """The paddles of ``contours`` (default: all) at their contrasts, before markers and the
    final rescale."""
    canvas = np.zeros((p.size, p.size))
    for (row, col, angle), c, contrast in zip(sample.paddles, sample.contour, sample.contrast,
                                              strict=True):
        if contours is None or c in contours:
            ink, _ = draw.paddle_sprite(p.paddle_length, p.paddle_thickness, sample.margin,
                                        p.antialias, float(angle))
            draw.paste_max(canvas, ink, (int(row), int(col)), contrast / 255.0)
    return canvas


def draw_sample(rng: np.random.Generator, p: PathfinderParams) -> Sample:
    """One Pathfinder image and its label, from the random stream ``rng``."""
    label = int(rng.integers(2))
    scene = grow(p, rng)
    marked = int(rng.integers(2))
    targets = scene.contours[:2]
    markers = np.array([targets[marked].origin, targets[marked if label else 1 - marked].tip])
    rows = [(*point, angle, i, c.contrast) for i, c in enumerate(scene.contours)
            for point, angle in c.paddles]
    table = np.array(rows)
    sample = Sample(np.zeros((p.size, p.size), np.uint8), label, markers, table[:, :3],
                    table[:, 3].astype(np.int64), table[:, 4], scene.margin)
    canvas = render_ink(sample, p)
    for centre in markers:
        draw.draw_marker(canvas, (int(centre[0]), int(centre[1])), p.marker_radius, p.antialias)
    sample.image = draw.to_uint8(canvas)
    return sample


SPLIT_IDS = {"train": 0, "validation": 1, "test": 2}


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The random stream of image ``index`` of ``split``."""
    return np.random.default_rng(np.random.SeedSequence([seed, SPLIT_IDS[split], index]))


def draw_images(args: tuple[PathfinderParams, int, str, int, int]
                ) -> tuple[UInt8[np.ndarray, "n s s"], Int[np.ndarray, " n"]]:
    """Images ``start .. start + count - 1`` of a split, and their labels."""
    p, seed, split, start, count = args
    samples = [draw_sample(image_rng(seed, split, i), p) for i in range(start, start + count)]
    return (np.stack([s.image for s in samples]),
            np.array([s.label for s in samples], np.int64))
