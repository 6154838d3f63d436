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
from jaxtyping import Int, UInt8

from xformers_zoo.data import pathfinder_draw as draw
from xformers_zoo.data.pathfinder_grow import Scene, grow

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
    """One drawn image with the contours it was drawn from ((row, col) pixels).

    Attributes:
      image: the image, 0..255.
      label: 1 if both markers lie on one contour, else 0.
      markers: the two marker centres (the origin, then the terminal one).
      scene: the contours (``pathfinder_grow.Scene``).
    """

    image: UInt8[np.ndarray, "s s"]
    label: int
    markers: Int[np.ndarray, "2 2"]
    scene: Scene

    @property
    def num_distractors(self) -> int:
        """Distractor contours drawn."""
        return len(self.scene.contrasts) - 2


def draw_sample(rng: np.random.Generator, p: PathfinderParams) -> Sample:
    """One Pathfinder image and its label, from the random stream ``rng``."""
    label = int(rng.integers(2))
    scene = grow(p, rng)
    marked = int(rng.integers(2))
    markers = np.stack([scene.origins[marked], scene.tips[marked if label else 1 - marked]])
    canvas = scene.render()
    for row, col in markers:
        draw.draw_marker(canvas, (int(row), int(col)), p.marker_radius, p.antialias)
    return Sample(draw.to_uint8(canvas), label, markers, scene)


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
