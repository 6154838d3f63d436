"""The Pathfinder generator: labels against an independent connectivity check of the drawn
contours, markers on contour ends, class balance, determinism across worker counts, the
difficulty levels, a 128 px smoke test, and the `data show` grid."""

import numpy as np
import pytest
from scipy import ndimage

from xformers_zoo.configs.base import DataConfig
from xformers_zoo.data import pathfinder as pf
from xformers_zoo.data import pathfinder_source, show

P32 = pf.RESOLUTIONS[32]


@pytest.fixture(scope="module")
def samples32():
    return [pf.draw_sample(pf.image_rng(7, "train", i), P32) for i in range(160)]


def connected_by_ink(sample: pf.Sample, p: pf.PathfinderParams) -> bool:
    """Whether one stretch of ink joins the two markers, judged from the pixels alone: the
    paddles are rendered without markers on the supersampled canvas, and pieces of ink closer
    than the paddle margin (the gap between the dashes of a contour) are joined."""
    s = p.antialias
    pieces, n = ndimage.label(pf.render_ink(sample.paddles, p) > 0, structure=np.ones((3, 3)))
    parent = list(range(n + 1))

    def root(i):
        while parent[i] != i:
            i = parent[i]
        return i

    for k in range(1, n + 1):
        distance = ndimage.distance_transform_edt(pieces != k)  # to the nearest pixel of k
        nearest = ndimage.minimum(distance, pieces, index=np.arange(1, n + 1))
        for j in np.flatnonzero(nearest <= p.paddle_margin * s) + 1:
            parent[root(j)] = root(k)
    ids = [pieces[int(y * s), int(x * s)] for x, y in sample.markers]
    assert all(ids), "a marker does not sit on ink"
    return root(ids[0]) == root(ids[1])


def contour_ends(paddles: np.ndarray, gap: float) -> np.ndarray:
    """Paddle end points with no other paddle end within ``gap`` (the ends of dashed lines),
    found from the geometry without the generator's contour ids."""
    ends = paddles.reshape(-1, 2)  # [2p, 2]
    owner = np.repeat(np.arange(len(paddles)), 2)
    dist = np.linalg.norm(ends[:, None] - ends[None], axis=-1)
    dist[owner[:, None] == owner[None]] = np.inf
    return ends[dist.min(axis=1) > gap + 1e-6]


def test_label_agrees_with_connectivity_of_the_drawn_contours(samples32):
    for sample in samples32[:60]:
        assert connected_by_ink(sample, P32) == bool(sample.label)


def test_markers_lie_on_contour_ends(samples32):
    for sample in samples32[:60]:
        ends = contour_ends(sample.paddles, P32.paddle_margin)
        for marker in sample.markers:
            assert np.linalg.norm(ends - marker, axis=1).min() < 1e-6
        # and the marked pixels are bright in the image
        for x, y in sample.markers:
            assert sample.image[int(y), int(x)] > 100


def test_classes_balance(samples32):
    labels = np.array([s.label for s in samples32])
    # Fair coin: 160 draws stay within 4 standard deviations (sd = sqrt(160) / 2 ~ 6.3).
    assert abs(labels.sum() - 80) < 26


def test_levels_set_contour_lengths():
    for level, length in pf.LEVELS.items():
        p = P32.with_level(level)
        sample = pf.draw_sample(pf.image_rng(0, "test", 1), p)
        counts = np.bincount(sample.contour)
        assert counts[0] == counts[1] == length
        assert (counts[2:] == max(length // 3, 1)).all()
        assert len(counts) == 2 + p.num_distractors
    with pytest.raises(ValueError, match="contour9"):
        P32.with_level("hard")


def test_same_seed_same_bytes_for_any_worker_count():
    def images(workers, seed=3):
        chunks = list(pathfinder_source.generate(P32, 70, seed=seed, split="validation",
                                                 workers=workers))
        return np.concatenate([c[0] for c in chunks]), np.concatenate([c[1] for c in chunks])

    one, two = images(1), images(2)
    assert one[0].shape == (70, 32, 32) and one[0].dtype == np.uint8
    assert one[0].tobytes() == two[0].tobytes() and (one[1] == two[1]).all()
    assert images(1, seed=4)[0].tobytes() != one[0].tobytes()


def test_images_are_bright_contours_on_black():
    images, labels = pf.draw_images((P32, 0, "train", 0, 20))
    assert set(labels.tolist()) <= {0, 1}
    for im in images:
        assert im.max() == 255 and np.median(im) == 0  # contrast 2 saturates the paddles
        assert 0.05 < (im > 0).mean() < 0.6


def test_pathx_smoke():
    p = pf.RESOLUTIONS[128]
    for i in range(2):
        sample = pf.draw_sample(pf.image_rng(1, "train", i), p)
        assert sample.image.shape == (128, 128) and sample.image.max() > 0
        assert sample.image.max() == round(255 * p.contrast)
        assert connected_by_ink(sample, p) == bool(sample.label)


def test_show_writes_a_labelled_grid(tmp_path):
    from PIL import Image

    out = tmp_path / "grid.png"
    assert show.main(["pathfinder32", "--count", "6", "--columns", "3", "--out", str(out)]) == 0
    sheet = Image.open(out)
    tile = 32 * 4  # upscaled to ~128 px
    assert sheet.size == (3 * (tile + 4) + 4, 2 * (tile + show.CAPTION + 4) + 4)
    assert show.main(["listops", "--out", str(tmp_path / "x.png")]) == 2


def test_generated_source_splits_and_name():
    config = DataConfig(task="pathfinder32", train_size=6, val_size=4, test_size=5, workers=1)
    test = list(pathfinder_source.examples("test", config))
    assert [k for k, _ in test] == [f"test-{i}" for i in range(5)]
    assert test[0][1]["inputs"].shape == (1024,)
    expected = pf.draw_images((P32, 0, "test", 0, 5))[0]
    assert np.array_equal(np.stack([ex["inputs"] for _, ex in test]).reshape(5, 32, 32),
                          expected)
    assert pathfinder_source.build_name(config) == "generated_contour14_seed0_6_4_5"


def test_a_build_spawns_one_pool_for_its_three_splits(tmp_path, monkeypatch):
    from xformers_zoo import data

    spawned = []

    def counting_pool(workers):
        spawned.append(workers)
        return real_pool(workers)

    real_pool = pathfinder_source.spawn_pool
    monkeypatch.setattr(pathfinder_source, "spawn_pool", counting_pool)
    # Chunks of 2 images: every split has several jobs, so each would want a pool of its own.
    monkeypatch.setattr(pathfinder_source, "chunk_size", lambda size: 2)
    config = DataConfig(task="pathfinder32", data_dir=str(tmp_path), train_size=6, val_size=4,
                        test_size=5, workers=2)
    data.prepare(config)
    assert spawned == [2]
    assert not pathfinder_source._BUILD_POOLS  # the pool is closed with the build
    test = data.data_source(config, "test")
    # the files hold the split's images in TFDS's shuffled order
    built = sorted(np.asarray(test[i]["inputs"]).tobytes() for i in range(5))
    assert built == sorted(im.tobytes() for im in pf.draw_images((P32, 0, "test", 0, 5))[0])


def test_a_split_larger_than_the_tfds_memory_buffer_builds(tmp_path, monkeypatch):
    # Past its memory buffer TFDS shuffles through files written with TensorFlow, which the
    # project does not install; a 1 KB buffer stands for the 1 GB one that Path-X outgrows.
    from tensorflow_datasets.core import shuffle

    from xformers_zoo import data

    monkeypatch.setattr(shuffle, "MAX_MEM_BUFFER_SIZE", 1024)
    config = DataConfig(task="pathfinder32", data_dir=str(tmp_path), train_size=4, val_size=2,
                        test_size=2, workers=1)
    data.prepare(config)
    assert len(data.data_source(config, "train")) == 4
    assert shuffle.MAX_MEM_BUFFER_SIZE == 1024  # restored after the build
