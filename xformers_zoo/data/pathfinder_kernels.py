"""Compiled inner loops of Pathfinder contour growth (see ``pathfinder_grow`` for the method,
Linsley et al. 2018). The faithful generator throws away hundreds of target attempts per image
(two long contours rarely both fit), so the growth runs as one compiled call per image.

Sprites are given as tables indexed by a sprite id: ids 0..359 are seed paddles at integer
degrees -180..179, ids 360 + j the paddle that grows towards candidate head ``j`` (its direction
is fixed by the head's integer offset from the pivot). Mask values are the 8-bit sprites over 255
rounded to float32, as the original stored them. Random numbers come from the image's numpy
Generator, so one image is one stream whatever runs it.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

SEED_SPRITES = 360  # sprite ids of the seed paddles; candidates follow
ACCEPT_LIMIT = 1.8  # a paddle's mask plus the occupancy mask stays below this
OCCUPIED = 0.3  # occupancy above this is taken when choosing a seed
MIN_FREE_SHARE = 0.01  # no distractor is seeded once less of the image is free
MIN_WEIGHT = 1e-4  # total candidate weight under which a contour is stuck


@njit(cache=True)
def translate(row, col, angle, distance):
    """(row, col) moved ``distance`` along ``angle``, rounded up (as the original)."""
    return (math.ceil(row + distance * math.sin(angle)),
            math.ceil(col + distance * math.cos(angle)))


@njit(cache=True)
def flip(angle):
    """``angle`` turned by pi, kept in [-pi, pi)."""
    return angle + math.pi if angle < 0 else angle - math.pi


@njit(cache=True)
def turn_weights(head_angles, continuity):
    """``cos(min(continuity * turn, pi/2))^2`` for a contour heading as sprite ``s`` (its
    row) turning to candidate head ``j`` (its column): the direction part of a candidate's
    weight, the same for every image of a resolution."""
    k = head_angles.shape[0]
    table = np.zeros((SEED_SPRITES + k, k))
    for s in range(SEED_SPRITES + k):
        heading = (s - 180) * math.pi / 180 if s < SEED_SPRITES else head_angles[s - SEED_SPRITES]
        for j in range(k):
            turn = abs(head_angles[j] - heading)
            turn = min(min(turn, 2 * math.pi - turn) * continuity, 0.5 * math.pi)
            table[s, j] = max(math.cos(turn), 0.0) ** 2
    return table


@njit(cache=True)
def seed_pivot(row, col, angle, length, margin, side):
    """The pivot of a seed paddle at (row, col) along ``angle``; (-1, -1) if its head or pivot
    leaves the image."""
    hr, hc = translate(row, col, angle, length)
    pr, pc = translate(hr, hc, flip(angle), length + margin)
    if 0 <= hr < side and 0 <= hc < side and 0 <= pr < side and 0 <= pc < side:
        return pr, pc
    return -1, -1


@njit(cache=True)
def sprite_values(sprites, contrast):
    """8-bit sprites as the values they draw: ``sprite / 255 * contrast`` rounded to float32
    (the original's paddle images were float32), as float64."""
    values = np.zeros(sprites.shape)
    flat, out = sprites.reshape(-1), values.reshape(-1)
    for i in range(flat.shape[0]):
        out[i] = np.float64(np.float32(flat[i] / 255.0 * contrast))
    return values


@njit(cache=True)
def overlay(canvas, values, row, col, check):
    """Sprite ``values`` (``sprite_values``) centred on (row, col), clipped. ``check``:
    returns whether ``max(canvas + values) < ACCEPT_LIMIT`` (the original's overlap test) and
    changes nothing; otherwise max-combines the values into ``canvas`` and returns True."""
    side, half = canvas.shape[0], values.shape[0] // 2
    for a in range(values.shape[0]):
        r = row + a - half
        if not 0 <= r < side:
            continue
        for b in range(values.shape[1]):
            c = col + b - half
            value = values[a, b]
            if not (0 <= c < side and value > 0.0):
                continue
            if check:
                if canvas[r, c] + value >= ACCEPT_LIMIT:
                    return False
            elif value > canvas[r, c]:
                canvas[r, c] = value
    return True


@njit(cache=True)
def settle(mask, dilated, masks, wides, sprite, row, col):
    """Adds a paddle's mask to the occupancy mask, and its dilation by the margin to the
    mask's dilation (dilation commutes with max; near the edges the frame already fills the
    dilation, so the sprite's clipped parts never matter)."""
    overlay(mask, masks[sprite], row, col, False)
    overlay(dilated, wides[sprite], row, col, False)


@njit(cache=True)
def extend(rng, mask, dilated, state, angles, paddles, count, contour, masks, wides, heads,
           head_angles, turns, cumulative, length, margin, retries):
    """Grows ``contour`` by one paddle; returns the new paddle count, or -1 if it is stuck.

    ``state[contour]``: pivot row, col, pending paddle row, col, sprite id; ``angles[contour]``
    its direction. Candidate heads lie on a circle of ``length + margin`` around the new pivot,
    weighted by cos(min(continuity * turn, pi/2))^2 (``turns``, by the contour's sprite id and
    the head) times how free the occupancy mask dilated by the margin (``dilated``, kept in
    step with ``mask``) is there. ``cumulative``: room for one value per head."""
    side = mask.shape[0]
    pr, pc = translate(state[contour, 0], state[contour, 1], angles[contour],
                       length + 2 * margin)
    k = heads.shape[0]
    turning = turns[state[contour, 4]]
    total, first = 0.0, -1
    for j in range(k):
        hr, hc = pr + heads[j, 0], pc + heads[j, 1]
        if not (0 <= hr < side and 0 <= hc < side):
            cumulative[j] = -1.0  # not a candidate
            continue
        if first < 0:
            first = j
        weight = (1.0 - dilated[hr, hc]) * turning[j]
        cumulative[j] = weight
        total += weight
    if first < 0 or total < MIN_WEIGHT:
        return -1
    running = 0.0
    for j in range(k):
        if cumulative[j] >= 0.0:
            running += cumulative[j] / total
            cumulative[j] = running
    for _ in range(retries + 1):
        u = rng.random()
        pick = first
        for j in range(k):
            if cumulative[j] > u:
                pick = j
                break
        hr, hc = pr + heads[pick, 0], pc + heads[pick, 1]
        sprite = SEED_SPRITES + pick
        if overlay(mask, masks[sprite], hr, hc, True):
            settle(mask, dilated, masks, wides, state[contour, 4], state[contour, 2],
                   state[contour, 3])
            state[contour, 0], state[contour, 1] = pr, pc
            state[contour, 2], state[contour, 3], state[contour, 4] = hr, hc, sprite
            angles[contour] = head_angles[pick]
            paddles[count, 0], paddles[count, 1] = hr, hc
            paddles[count, 2], paddles[count, 3] = sprite, contour
            return count + 1
    return -1


@njit(cache=True)
def free_starts(mask, frame, offsets, out):
    """Writes to ``out`` the flat indices of the pixels p where no offset lands on a taken
    pixel (occupancy above OCCUPIED, or within ``frame`` px of the edge); offsets that leave the
    image are ignored. Returns how many."""
    # Marks the pixels each taken pixel rules out rather than testing every offset of every
    # pixel: taken pixels are few, so this is about ten times less work at 128 px and above.
    side = mask.shape[0]
    blocked = np.zeros(side * side, np.bool_)
    for r in range(side):
        for c in range(side):
            if (r < frame or r >= side - frame or c < frame or c >= side - frame
                    or mask[r, c] > OCCUPIED):
                for o in range(offsets.shape[0]):
                    pr, pc = r - offsets[o, 0], c - offsets[o, 1]
                    if 0 <= pr < side and 0 <= pc < side:
                        blocked[pr * side + pc] = True
    n = 0
    for i in range(side * side):
        if not blocked[i]:
            out[n] = i
            n += 1
    return n


@njit(cache=True)
def seed(rng, mask, frame, band_only, seed_offsets, seed_counts, reach, free, length, margin,
         retries):
    """A seed paddle whose opaque mask misses the taken pixels, its start uniform among the free
    ones: (row, col, sprite id, pivot row, pivot col), or row -1.

    A direction with no start (or one that ``reach`` rules out) ends the search at once, as in
    the original; a start whose paddle leaves the image is drawn again, ``retries`` times.
    ``band_only``: the mask holds nothing but the frame, so the free starts form a rectangle."""
    side = mask.shape[0]
    for _ in range(retries + 1):
        degrees = rng.integers(-180, 180)
        sprite = degrees + 180
        angle = degrees * math.pi / 180
        if not reach[sprite]:
            return -1, -1, -1, -1, -1
        offsets = seed_offsets[sprite, :seed_counts[sprite]]
        if band_only:
            r0 = frame - offsets[:, 0].min()
            c0 = frame - offsets[:, 1].min()
            rows = side - frame - offsets[:, 0].max() - r0
            cols = side - frame - offsets[:, 1].max() - c0
            if rows <= 0 or cols <= 0:
                return -1, -1, -1, -1, -1
            pick = rng.integers(0, rows * cols)
            row, col = r0 + pick // cols, c0 + pick % cols
        else:
            n = free_starts(mask, frame, offsets, free)
            if n == 0:
                return -1, -1, -1, -1, -1
            start = free[rng.integers(0, n)]
            row, col = start // side, start % side
        pr, pc = seed_pivot(row, col, angle, length, margin, side)
        if pr >= 0:
            return row, col, sprite, pr, pc
    return -1, -1, -1, -1, -1


@njit(cache=True)
def near_seed(rng, row, col, side, distance, length, margin, retries):
    """The second target's seed ``distance`` px from (row, col) in a random direction, checked
    only for staying in the image: (row, col, sprite id, pivot row, pivot col), or row -1."""
    for _ in range(retries + 1):
        degrees = rng.integers(-180, 180)
        angle = degrees * math.pi / 180
        away = rng.integers(0, 360) * math.pi / 180
        r = int(np.round(row + distance * math.sin(away)))
        c = int(np.round(col + distance * math.cos(away)))
        pr, pc = seed_pivot(r, c, angle, length, margin, side)
        if pr >= 0:
            return r, c, degrees + 180, pr, pc
    return -1, -1, -1, -1, -1


@njit(cache=True)
def start_contour(state, angles, paddles, count, contour, found):
    """Records a seed paddle ``found`` (row, col, sprite, pivot row, pivot col) as the first
    paddle of ``contour``; returns the new paddle count."""
    row, col, sprite, pr, pc = found
    state[contour, 0], state[contour, 1] = pr, pc
    state[contour, 2], state[contour, 3], state[contour, 4] = row, col, sprite
    angles[contour] = (sprite - 180) * math.pi / 180
    paddles[count, 0], paddles[count, 1] = row, col
    paddles[count, 2], paddles[count, 3] = sprite, contour
    return count + 1


@njit(cache=True)
def frame(mask, width):
    """Clears ``mask`` to a frame of ones ``width`` px wide."""
    side = mask.shape[0]
    mask[:] = 0.0
    mask[:width, :] = 1.0
    mask[side - width:, :] = 1.0
    mask[:, :width] = 1.0
    mask[:, side - width:] = 1.0


@njit(cache=True)
def unframe(mask, width, paddles, count, around):
    """Returns ``mask`` to the frame of ``frame(mask, width)`` inside the box that holds the
    first ``count`` paddles of ``paddles`` with ``around`` px about each: a failed target
    attempt touched nothing else, and clearing the box costs far less than the whole image."""
    side = mask.shape[0]
    r0, r1, c0, c1 = side, -1, side, -1
    for i in range(count):
        r0, r1 = min(r0, paddles[i, 0] - around), max(r1, paddles[i, 0] + around)
        c0, c1 = min(c0, paddles[i, 1] - around), max(c1, paddles[i, 1] + around)
    for r in range(max(r0, 0), min(r1 + 1, side)):
        edge_row = r < width or r >= side - width
        for c in range(max(c0, 0), min(c1 + 1, side)):
            mask[r, c] = 1.0 if edge_row or c < width or c >= side - width else 0.0


@njit(cache=True)
def grow(rng, mask, dilated, backup, free, paddles, state, angles, masks, wides, heads,
         head_angles, turns, seed_offsets, seed_counts, reach, padding, seed_distance, length,
         margin, contour_length, distractors, distractor_length, retries, distractor_retries,
         max_attempts):
    """Two target contours (attempts repeated until both grow to ``contour_length``), then up
    to ``distractors`` distractor contours, each tried ``distractor_retries + 1`` times and
    skipped if it does not fit. Returns (paddle count, distractors drawn); count -1 if the
    targets never fitted."""
    side = mask.shape[0]
    band = max(padding, 2 * seed_distance)
    cumulative = np.zeros(heads.shape[0])
    count = -1
    # half a sprite: every pixel a settled paddle (mask or dilation) touches lies this near it
    sprite_half = max(masks.shape[1], wides.shape[1]) // 2
    frame(mask, padding)
    frame(dilated, padding + margin)
    for _ in range(max_attempts):
        first = seed(rng, mask, band, True, seed_offsets, seed_counts, reach, free, length,
                     margin, retries)
        if first[0] < 0:
            continue
        second = near_seed(rng, first[0], first[1], side, seed_distance, length, margin,
                           retries)
        if second[0] < 0:
            continue
        count = start_contour(state, angles, paddles, 0, 0, first)
        count = start_contour(state, angles, paddles, count, 1, second)
        placed = count
        for _ in range(contour_length - 1):
            for contour in range(2):
                if count >= 0:
                    count = extend(rng, mask, dilated, state, angles, paddles, count, contour,
                                   masks, wides, heads, head_angles, turns, cumulative, length,
                                   margin, retries)
                    placed = max(placed, count)
        if count >= 0:
            break
        unframe(mask, padding, paddles, placed, sprite_half)
        unframe(dilated, padding + margin, paddles, placed, sprite_half)
    if count < 0:
        return -1, 0
    # the second target's last mask joins, as in the original; the first target's never does
    settle(mask, dilated, masks, wides, state[1, 4], state[1, 2], state[1, 3])
    drawn = 0
    for _ in range(distractors):
        for _ in range(distractor_retries + 1):
            if (mask <= OCCUPIED).mean() < MIN_FREE_SHARE:
                continue
            found = seed(rng, mask, 1, False, seed_offsets, seed_counts, reach, free, length,
                         margin, retries)
            if found[0] < 0:
                continue
            contour, kept = 2 + drawn, count
            backup[0] = mask
            backup[1] = dilated
            count = start_contour(state, angles, paddles, count, contour, found)
            for _ in range(distractor_length - 1):
                if count >= 0:
                    count = extend(rng, mask, dilated, state, angles, paddles, count, contour,
                                   masks, wides, heads, head_angles, turns, cumulative, length,
                                   margin, retries)
            if count < 0:
                mask[:] = backup[0]
                dilated[:] = backup[1]
                count = kept
                continue
            settle(mask, dilated, masks, wides, state[contour, 4], state[contour, 2],
                   state[contour, 3])
            drawn += 1
            break
    return count, drawn


@njit(cache=True)
def render(canvas, paddles, count, inks, contrasts):
    """Max-combines every paddle's ink sprite times its contour's contrast into ``canvas``."""
    for i in range(count):
        overlay(canvas, sprite_values(inks[paddles[i, 2]], contrasts[paddles[i, 3]]),
                paddles[i, 0], paddles[i, 1], False)
