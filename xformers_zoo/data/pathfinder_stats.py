"""Statistics of Pathfinder images, to compare a generator with the original (Linsley et al.
2018) and to check that the task cannot be solved by a flood fill.

The flood-fill rule calls an image "connected" when its two markers lie in one 8-connected
component of the pixels brighter than a threshold. On the original's dashed contours it is at
chance at every threshold; on contours drawn as connected lines it solves the task.
"""

from __future__ import annotations

import numpy as np
from jaxtyping import Float, Int, UInt8
from scipy import ndimage

EIGHT = np.ones((3, 3), bool)  # 8-connectivity
INK_LEVELS = (0, 64, 200)  # "pixels above" thresholds reported


def joined(image: UInt8[np.ndarray, "s s"], markers: Int[np.ndarray, "2 2"], level: int) -> bool:
    """Whether both marker pixels lie in one 8-connected component of pixels >= ``level``."""
    components, _ = ndimage.label(image >= level, structure=EIGHT)
    a, b = (components[int(r), int(c)] for r, c in markers)
    return bool(a) and a == b


def bottleneck(image: UInt8[np.ndarray, "s s"], markers: Int[np.ndarray, "2 2"]) -> int:
    """The highest level at which the markers are still joined (the darkest pixel of the
    brightest path between them): the flood fill over pixels above a threshold ``t`` joins
    them exactly when ``t < bottleneck``. Joined-ness falls as the level rises, so a binary
    search finds it with eight labellings."""
    low, high = 0, 256  # joined at level 0 (every pixel); 256: nothing
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if joined(image, markers, mid) else (low, mid)
    return low


def flood_fill_accuracy(images: UInt8[np.ndarray, "n s s"], markers: Int[np.ndarray, "n 2 2"],
                        labels: Int[np.ndarray, " n"]) -> Float[np.ndarray, " 255"]:
    """Accuracy of "label 1 iff the markers are joined by pixels above t" for t = 0..254."""
    limits = np.array([bottleneck(im, m) for im, m in zip(images, markers, strict=True)])
    thresholds = np.arange(255)
    predicted = thresholds[:, None] < limits[None, :]  # [255, n]
    return (predicted == (np.asarray(labels) == 1)[None, :]).mean(axis=1)


def components(image: UInt8[np.ndarray, "s s"], level: int = 64) -> int:
    """8-connected components of the pixels above ``level``."""
    return int(ndimage.label(image > level, structure=EIGHT)[1])


def image_stats(images: UInt8[np.ndarray, "n s s"], markers: Int[np.ndarray, "n 2 2"],
                labels: Int[np.ndarray, " n"], distractors: Int[np.ndarray, " n"],
                requested: int) -> dict:
    """Intensity, ink and structure statistics of a set of generated images."""
    pixels = images.astype(np.float64)
    ink = images[images > 0]
    accuracy = flood_fill_accuracy(images, markers, labels)
    best = int(np.argmax(accuracy))
    counts = np.bincount(distractors, minlength=requested + 1)
    return {
        "images": len(images),
        "mean": float(pixels.mean()),
        "std": float(pixels.std()),
        **{f"above_{t}": float((images > t).mean()) for t in INK_LEVELS},
        "ink_at_255": float((ink == 255).mean()) if ink.size else 0.0,
        "median_components_above_64": float(np.median([components(im) for im in images])),
        "distractors_requested": requested,
        "distractors_mean": float(np.mean(distractors)),
        "distractors_share": (counts / len(images)).tolist(),
        "flood_fill_best_accuracy": float(accuracy[best]),
        "flood_fill_best_threshold": best,
        "label_1_share": float(np.mean(labels)),
    }
