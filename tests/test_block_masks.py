"""Block-mask builders (kernels/masks.py) against their element-level definitions, and the tile
schedules the Pallas kernels run from: they list exactly the marked tiles, so the work grows
with the number of non-empty tiles, and long rows split into segments that cover each row once."""

import numpy as np
import pytest

from xformers_zoo.kernels import masks
from xformers_zoo.kernels.block_mask import BlockMask
from xformers_zoo.kernels.pallas_schedule import (
    NO_WRITE,
    WHOLE_ROW,
    schedule_from_visibility,
    tile_visibility,
)
from xformers_zoo.kernels.pallas_split import split_long_rows, step_bound


def tiles_holding(element_mask: np.ndarray, block: int) -> np.ndarray:
    """Which block x block tiles of an element mask hold at least one True."""
    n = element_mask.shape[0]
    t = -(-n // block)
    padded = np.zeros((t * block, t * block), bool)
    padded[:n, :n] = element_mask
    return padded.reshape(t, block, t, block).any(axis=(1, 3))


@pytest.mark.parametrize("length,window,block", [(1000, 100, 64), (512, 64, 64), (300, 1, 32)])
def test_sliding_window_marks_tiles_with_an_in_window_pair(length, window, block):
    pos = np.arange(length)
    in_window = np.abs(pos[:, None] - pos[None, :]) <= window // 2
    bm = masks.sliding_window(length, window, block)
    np.testing.assert_array_equal(bm.mask[0], tiles_holding(in_window, block))
    assert bm.to_dense(length, length)[0][in_window].all()  # the window is covered


def test_global_tokens_rows_and_columns():
    bm = masks.global_tokens(500, 2, 64)
    m = bm.mask[0]
    assert m[:2].all() and m[:, :2].all() and not m[2:, 2:].any()
    with pytest.raises(ValueError, match="num_global_tiles"):
        masks.global_tokens(500, 9, 64)


def test_random_blocks_count_per_row_and_seed():
    bm = masks.random_blocks(1024, 3, 64, seed=1, num_heads=4)
    assert bm.mask.shape == (4, 16, 16)
    np.testing.assert_array_equal(bm.mask.sum(-1), 3)
    assert not np.array_equal(bm.mask[0], bm.mask[1])  # heads draw separately
    np.testing.assert_array_equal(bm.mask, masks.random_blocks(1024, 3, 64, seed=1,
                                                               num_heads=4).mask)


def test_random_blocks_avoid_excluded_tiles():
    fixed = masks.union(masks.sliding_window(1024, 192, 64), masks.global_tokens(1024, 1, 64))
    bm = masks.random_blocks(1024, 3, 64, seed=2, num_heads=2, exclude=fixed)
    assert not (bm.mask & fixed.mask).any()
    free = (~fixed.mask[0]).sum(-1)
    np.testing.assert_array_equal(bm.mask.sum(-1), np.broadcast_to(np.minimum(3, free), (2, 16)))
    assert (free == 0).any()  # the global row has no free tile and gets none
    with pytest.raises(ValueError, match="exclude must be"):
        masks.random_blocks(1024, 3, 64, seed=2, exclude=masks.dense(1024, 128))


def test_strided_pattern_matches_its_definition():
    length, stride, block = 512, 128, 32
    pos = np.arange(length)
    back = pos[:, None] - pos[None, :]
    element = (back >= 0) & ((back < stride) | (back % stride == 0))
    bm = masks.strided(length, stride, block)
    # Every element pair of the pattern lies in a marked tile.
    assert bm.to_dense(length, length)[0][element].all()
    assert not bm.mask[0][np.triu_indices(bm.mask.shape[1], 1)].any()  # causal
    with pytest.raises(ValueError, match="multiple of block"):
        masks.strided(512, 100, 32)


def test_fixed_pattern_chunks_and_summaries():
    bm = masks.fixed(512, chunk=128, summary=32, block=32)
    m = bm.mask[0]
    assert m[0, :4].all()  # own chunk
    assert m[0, 3] and m[0, 7] and m[0, 15]  # last tile of every chunk
    assert not m[0, 4] and not m[0, 6]


def test_union_broadcasts_shared_and_per_head():
    shared = masks.sliding_window(256, 32, 32)
    per_head = masks.random_blocks(256, 1, 32, seed=0, num_heads=3)
    both = masks.union(shared, per_head)
    assert both.mask.shape == (3, 8, 8)
    np.testing.assert_array_equal(both.mask, shared.mask | per_head.mask)
    with pytest.raises(ValueError, match="same tile sizes"):
        masks.union(shared, masks.dense(256, 64))


def test_schedule_lists_exactly_the_marked_tiles():
    rng = np.random.default_rng(0)
    bm = BlockMask(rng.random((2, 6, 5)) < 0.4, 64, 64)
    visible = tile_visibility(bm, 32, 64, q_tiles=12, k_tiles=5, causal_offset=None)
    assert visible.shape == (2, 12, 5)
    np.testing.assert_array_equal(visible[:, ::2], bm.mask)  # refined rows repeat their tile
    sched = schedule_from_visibility(visible)
    assert sched.counts.sum() == visible.sum()  # work is the number of non-empty tiles
    for h in range(2):
        for r in range(12):
            listed = sched.indices[h, r, : sched.counts[h, r]]
            np.testing.assert_array_equal(listed, np.flatnonzero(visible[h, r]))
        # Rows run longest first.
        assert np.all(np.diff(sched.counts[h][sched.order[h]]) <= 0)


def test_causal_visibility_drops_tiles_above_the_diagonal():
    visible = tile_visibility(masks.dense(256, 64), 64, 64, 4, 4, causal_offset=0)
    np.testing.assert_array_equal(visible[0], np.tril(np.ones((4, 4), bool)))
    with pytest.raises(ValueError, match="divide"):
        tile_visibility(masks.dense(256, 32), 64, 64, 4, 4, causal_offset=None)


def test_split_segments_cover_each_row_once():
    rng = np.random.default_rng(1)
    visible = rng.random((2, 9, 20)) < 0.15
    visible[0, 0] = True  # a global row of 20 tiles: 5 segments of 4
    visible[1, 3, :13] = True  # 13 tiles: 4 segments of at most 4
    sched = schedule_from_visibility(visible)
    split = split_long_rows(sched, max_steps=4).split
    for h in range(2):
        steps = {r: [] for r in range(9)}
        for row, first, end, slot in split.programs[h]:
            if slot != NO_WRITE:
                assert 0 < end - first <= 4 or sched.counts[h, row] == 0
                steps[row] += list(range(first, end))
        for r in range(9):
            assert sorted(steps[r]) == list(range(sched.counts[h, r]))  # once each
        split_rows = {int(r) for r in split.rows[h] if r >= 0}
        assert split_rows == {r for r in range(9) if sched.counts[h, r] > 4}
        for r, slots in zip(split.rows[h], split.parts[h], strict=True):
            programs = split.programs[h]
            listed = programs[(programs[:, 0] == r) & (programs[:, 3] != NO_WRITE)]
            if r >= 0:
                np.testing.assert_array_equal(np.sort(listed[:, 3]), slots[slots >= 0])
        used = split.programs[h][split.programs[h][:, 3] >= 0, 3]
        assert len(set(used)) == len(used) and used.max() < split.slots
        whole = split.programs[h][split.programs[h][:, 3] == WHOLE_ROW, 0]
        assert not split_rows & set(whole)
    segments = [sum(-(-int(c) // 4) for c in counts if c > 4) for counts in sched.counts]
    assert split.slots == max(segments)


def test_split_bound_leaves_even_rows_alone():
    even = schedule_from_visibility(tile_visibility(masks.sliding_window(2048, 256, 64), 64, 64,
                                                    32, 32, None))
    assert split_long_rows(even).split is None  # dense-like rows: no extra programs
    assert split_long_rows(even, max_steps=0).split is None
    assert step_bound(np.array([[0, 3, 5, 5, 40]]), None) == 20  # 4 x median of non-empty rows
    assert step_bound(np.array([[1, 1, 1, 40]]), None) == 8  # at least 8 steps
    with pytest.raises(ValueError, match="max_steps must be >= 0"):
        split_long_rows(even, max_steps=-1)
