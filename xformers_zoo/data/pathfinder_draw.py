"""Rasterisation for the Pathfinder generator, the way Linsley et al. (2018) draw: each paddle a
thin line drawn at ``antialias`` times the resolution and shrunk with a Lanczos filter, so a
paddle is a faint, soft smudge and the gaps between the paddles of a contour stay dark (the
contour is dashed); its occupancy mask the same line dilated by the paddle margin and shrunk the
same way; marker discs drawn and shrunk likewise; and the finished image rescaled so that its
brightest pixel is 255.

Coordinates are integer (row, column) pixels of the output image. A sprite depends only on the
paddle's orientation (and the resolution's settings), and orientations come from a finite set
(integer degrees, or directions between integer pixels), so sprites are cached: the cached
sprite is the very array the drawing would produce.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from jaxtyping import Bool, Float, UInt8
from PIL import Image, ImageDraw

from xformers_zoo.data.pathfinder_kernels import translate

# Lanczos-3 reaches 3 source pixels per output pixel, 6 blown-up pixels at scale 2; marker
# windows keep this many output pixels of empty margin so cropping never changes a value.
MARKER_WINDOW_MARGIN = 8


def disc(radius: float) -> Bool[np.ndarray, "k k"]:
    """The pixels within ``radius`` of a centre pixel (a dilation footprint)."""
    r = int(radius)
    y, x = np.ogrid[-r:r + 1, -r:r + 1]
    return x * x + y * y <= radius * radius


def _shrink(blown: UInt8[np.ndarray, "hb wb"], shape: tuple[int, int]
            ) -> UInt8[np.ndarray, "h w"]:
    """Lanczos shrink of an 8-bit array to ``shape`` (rows, cols)."""
    return np.asarray(Image.fromarray(blown).resize((shape[1], shape[0]), Image.LANCZOS))


def sprite_half(length: int, thickness: float, margin: int) -> int:
    """Half the side of a paddle sprite: its centre pixel to its edge."""
    return length + math.ceil(thickness) + margin


@functools.lru_cache(maxsize=1024)
def paddle_sprite(length: int, thickness: float, margin: int, antialias: int, angle: float
                  ) -> tuple[UInt8[np.ndarray, "k k"], UInt8[np.ndarray, "k k"]]:
    """A paddle starting at the centre pixel and running ``length`` px along ``angle``: its ink
    and its occupancy mask, 8-bit ``[2h+1, 2h+1]`` (h = ``sprite_half``), read-only.

    The line is drawn ``round(thickness * antialias)`` px wide on a canvas ``antialias`` times
    finer, then shrunk with Lanczos (Linsley et al. 2018); the mask is the fine line dilated by
    a disc of ``margin * antialias`` px, shrunk the same way."""
    half = sprite_half(length, thickness, margin)
    side, centre = 2 * half * antialias + 1, half * antialias
    width = round(thickness * antialias)
    if width != thickness * antialias:
        raise ValueError(f"paddle thickness {thickness} times antialias {antialias} must be a "
                         "whole number of pixels")
    head = translate(centre, centre, angle, length * antialias)
    canvas = Image.new("L", (side, side), 0)
    ImageDraw.Draw(canvas).line([(centre, centre), (head[1], head[0])], fill=255, width=width)
    line = np.asarray(canvas)
    footprint = disc(margin * antialias)
    pad = footprint.shape[0] // 2
    padded = np.pad(line, pad)
    dilated = np.zeros_like(line)
    for dy, dx in np.argwhere(footprint):  # grey dilation by the disc
        np.maximum(dilated, padded[dy:dy + side, dx:dx + side], out=dilated)
    ink, mask = _shrink(line, (2 * half + 1,) * 2), _shrink(dilated, (2 * half + 1,) * 2)
    ink.flags.writeable = mask.flags.writeable = False
    return ink, mask


@functools.lru_cache(maxsize=4096)
def seed_offsets(length: int, thickness: float, margin: int, antialias: int, angle: float
                 ) -> np.ndarray:
    """Offsets ``[n, 2]`` (rows, cols) from a candidate start pixel to the pixels where a paddle
    started there along ``angle`` would be fully opaque in its mask: the start is free only if
    none of them is occupied. As in the original, the mask is laid one pixel past the start
    (its "head-centric" structuring element) and clipped to a window of ``length + margin``."""
    reach = length + margin
    _, mask = paddle_sprite(length, thickness, margin, antialias, angle)
    half = sprite_half(length, thickness, margin)
    rows, cols = np.nonzero(mask == 255)
    offsets = np.stack([rows, cols], 1) - half + 1  # sprite centre on window pixel reach + 1
    inside = (np.abs(offsets) <= reach).all(axis=1)
    return offsets[inside]


@functools.lru_cache(maxsize=4096)
def seed_reaches_everywhere(length: int, thickness: float, margin: int, antialias: int,
                            angle: float, size: int) -> bool:
    """Whether every pixel of a ``size`` px image has a ``seed_offsets`` offset landing inside
    it. The original's dilation (OpenCV's, on a float mask) reads outside the image as the
    lowest float; a pixel whose offsets all leave the image comes out negative, and its search
    for free pixels then reports none. So a seed direction failing this finds no start at all
    (at 32 px, only directions near -135 degrees pass)."""
    offsets = seed_offsets(length, thickness, margin, antialias, angle)
    reached = np.zeros((size, size), bool)
    for dy, dx in offsets:
        reached[max(-dy, 0):size - max(dy, 0), max(-dx, 0):size - max(dx, 0)] = True
    return bool(reached.all())


def draw_marker(canvas: Float[np.ndarray, "h w"], centre: tuple[int, int], radius: float,
                antialias: int) -> None:
    """A filled disc of ``radius`` px around ``centre`` drawn ``antialias`` times finer and
    Lanczos-shrunk (soft, at most 1.0), max-combined into ``canvas`` in place. Only a window
    around the disc is drawn: everything Lanczos reads there is empty beyond it."""
    h, w = canvas.shape
    reach = math.ceil(radius) + MARKER_WINDOW_MARGIN
    r0, r1 = max(centre[0] - reach, 0), min(centre[0] + reach + 1, h)
    c0, c1 = max(centre[1] - reach, 0), min(centre[1] + reach + 1, w)
    y = np.arange(r0 * antialias, r1 * antialias)[:, None] - centre[0] * antialias
    x = np.arange(c0 * antialias, c1 * antialias)[None, :] - centre[1] * antialias
    blown = np.where(x * x + y * y <= (radius * antialias) ** 2, 255, 0).astype(np.uint8)
    small = _shrink(blown, (r1 - r0, c1 - c0))
    np.maximum(canvas[r0:r1, c0:c1], small / 255.0, out=canvas[r0:r1, c0:c1])


def to_uint8(image: Float[np.ndarray, "h w"]) -> UInt8[np.ndarray, "h w"]:
    """Rescaled to 0..255 between the image's darkest and brightest pixel, rounded half up
    (what saving a float image with scipy's ``imsave`` did to the released images)."""
    low, high = float(image.min()), float(image.max())
    scale = 255.0 / (high - low) if high > low else 1.0
    return np.floor((image - low) * scale + 0.5).clip(0, 255).astype(np.uint8)
