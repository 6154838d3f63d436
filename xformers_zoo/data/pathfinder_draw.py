"""Rasterisation for the Pathfinder generator (Linsley et al. 2018): anti-aliased paddles and
marker discs drawn on a supersampled canvas, and the occupancy grid that keeps contours apart.

Coordinates are (x, y) in the supersampled canvas's pixel units; pixel (row r, column c) has its
centre at (c + 0.5, r + 0.5). Every function touches only the bounding box of what it draws, so
the cost of a paddle does not grow with the image.
"""

from __future__ import annotations

import numpy as np
from jaxtyping import Bool, Float, Int


def _box(canvas_shape: tuple[int, ...], lo: np.ndarray, hi: np.ndarray):
    """Row and column slices covering [lo, hi] (x, y), clipped to the canvas; None if empty."""
    h, w = canvas_shape[:2]
    c0, r0 = max(int(np.floor(lo[0])), 0), max(int(np.floor(lo[1])), 0)
    c1, r1 = min(int(np.ceil(hi[0])) + 1, w), min(int(np.ceil(hi[1])) + 1, h)
    if c0 >= c1 or r0 >= r1:
        return None
    return slice(r0, r1), slice(c0, c1)


def _segment_distance(rows: slice, cols: slice, a: np.ndarray, b: np.ndarray
                      ) -> Float[np.ndarray, "h w"]:
    """Distance from each pixel centre in the box to the segment a-b."""
    y = np.arange(rows.start, rows.stop, dtype=np.float32)[:, None] + 0.5  # [h, 1]
    x = np.arange(cols.start, cols.stop, dtype=np.float32)[None, :] + 0.5  # [1, w]
    # Python floats keep the arithmetic in float32.
    ax, ay, dx, dy = float(a[0]), float(a[1]), float(b[0] - a[0]), float(b[1] - a[1])
    length2 = dx * dx + dy * dy
    x, y = x - ax, y - ay
    if length2 == 0.0:
        return np.hypot(x, y)
    t = np.minimum(np.maximum((x * dx + y * dy) * (1.0 / length2), 0.0), 1.0)  # [h, w]
    return np.hypot(x - t * dx, y - t * dy)


def draw_segment(canvas: Float[np.ndarray, "h w"], a: np.ndarray, b: np.ndarray,
                 thickness: float) -> None:
    """Draws the segment a-b, ``thickness`` wide with round caps, into ``canvas`` (in place,
    brightest wins). The edge ramps over one pixel so that the later box average anti-aliases."""
    half = thickness / 2
    box = _box(canvas.shape, np.minimum(a, b) - half - 1, np.maximum(a, b) + half + 1)
    if box is None:
        return
    coverage = np.clip(half + 0.5 - _segment_distance(*box, a, b), 0.0, 1.0)
    np.maximum(canvas[box], coverage, out=canvas[box])


def draw_disc(canvas: Float[np.ndarray, "h w"], centre: np.ndarray, radius: float) -> None:
    """Draws a filled disc (soft one-pixel edge) into ``canvas`` in place."""
    draw_segment(canvas, centre, centre, 2 * radius)


def claim(owner: Int[np.ndarray, "h w"], a: np.ndarray, b: np.ndarray, radius: float,
          bit: int) -> None:
    """Sets ``bit`` (one bit per contour) on the cells within ``radius`` of segment a-b."""
    box = _box(owner.shape, np.minimum(a, b) - radius, np.maximum(a, b) + radius)
    if box is not None:
        owner[box] |= np.where(_segment_distance(*box, a, b) < radius, bit, 0).astype(owner.dtype)


def release(owner: Int[np.ndarray, "h w"], lo: np.ndarray, hi: np.ndarray, bits: int) -> None:
    """Clears ``bits`` on the cells of the box [lo, hi] (x, y); the caller claims what it keeps
    in that box again."""
    box = _box(owner.shape, lo, hi)
    if box is not None:
        owner[box] &= ~np.asarray(bits, owner.dtype)


def blocked(owner: Int[np.ndarray, "h w"], points: Float[np.ndarray, "*n 2"],
            bits: int) -> Bool[np.ndarray, "*n"]:
    """True where a point lies outside the canvas or on a cell carrying any of ``bits``."""
    h, w = owner.shape
    cols = np.floor(points[..., 0]).astype(np.int64)
    rows = np.floor(points[..., 1]).astype(np.int64)
    outside = (cols < 0) | (cols >= w) | (rows < 0) | (rows >= h)
    cells = owner[np.minimum(np.maximum(rows, 0), h - 1), np.minimum(np.maximum(cols, 0), w - 1)]
    return outside | ((cells & bits) != 0)


def downsample(canvas: Float[np.ndarray, "hs ws"], scale: int) -> Float[np.ndarray, "h w"]:
    """Box average over ``scale x scale`` blocks (the anti-aliasing of supersampling)."""
    h, w = canvas.shape[0] // scale, canvas.shape[1] // scale
    return canvas.reshape(h, scale, w, scale).mean(axis=(1, 3))


def to_pixels(coverage: Float[np.ndarray, "h w"], contrast: float) -> np.ndarray:
    """uint8 pixel values: coverage times ``contrast`` on a 0-255 scale, saturating."""
    return np.clip(np.rint(coverage * (255.0 * contrast)), 0, 255).astype(np.uint8)
