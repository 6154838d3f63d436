"""Readers of the official files, end to end through the TFDS builder: byte-level IMDb, CIFAR-10,
AAN pairs and the LRA release's Pathfinder folders (both layouts), built from tiny fixtures in
each format; and their errors for missing, truncated or wrong input."""

import io
import logging
import pickle
import tarfile

import archive_fixtures as fixtures
import numpy as np
import pytest

from xformers_zoo import data
from xformers_zoo.configs.base import DataConfig
from xformers_zoo.data import image, listops, lra_release, text
from xformers_zoo.data import pathfinder as pf


def read_split(config: DataConfig, split: str) -> list[dict]:
    source = data.data_source(config, split)
    examples = [source[i] for i in range(len(source))]
    # TFDS stores examples in its own (hashed) order; sort by content for comparisons.
    return sorted(examples, key=lambda ex: bytes(np.asarray(ex["inputs"]).tobytes()))


def tokens(raw: bytes, length: int) -> list[int]:
    return [b + 1 for b in raw[:length]]


# --- Text --------------------------------------------------------------------------------------

REVIEWS = {
    "train": [(b"great film", 1), ("caf\u00e9 cr\u00e8me br\u00fbl\u00e9e".encode(), 1),
              (b"dull and far too long, " * 5, 0), (b"bad", 0)],
    "test": [(b"loved it", 1), (b"hated it", 0), (b"meh", 0)],
}


def text_config(tmp_path, **kw) -> DataConfig:
    return DataConfig(task="text", source="official", manual_dir=str(tmp_path / "manual"),
                      data_dir=str(tmp_path / "data"), max_length=16, **kw)


def test_imdb_bytes_labels_and_splits(tmp_path):
    (tmp_path / "manual").mkdir()
    fixtures.write_imdb(tmp_path / "manual", REVIEWS)
    config = text_config(tmp_path)
    train = read_split(config, "train")
    expected = sorted([(tokens(r, 16), label) for r, label in REVIEWS["train"]])
    assert sorted((list(ex["inputs"]), int(ex["label"])) for ex in train) == expected
    # non-ASCII UTF-8 stays as its bytes, each + 1; 0 is never a token
    ids = np.concatenate([ex["inputs"] for ex in train])
    assert ids.max() > 128 and ids.min() > 0
    # LRA validates on the test reviews
    assert len(read_split(config, "validation")) == len(read_split(config, "test")) == 3
    # size limits keep a leading subset of the fixed shuffle, with both classes
    limited = text_config(tmp_path, train_size=2)
    assert len(read_split(limited, "train")) == 2
    name = data.dataset_builder(limited).builder_config.name
    assert name.startswith("official_len16_2_all_all_src") and name.endswith("_f2")


def test_imdb_missing_and_truncated_archives(tmp_path):
    (tmp_path / "manual").mkdir()
    with pytest.raises(FileNotFoundError, match=r"missing aclImdb_v1.tar.gz: expected .*manual"):
        list(text.examples("train", text_config(tmp_path)))
    path = fixtures.write_imdb(tmp_path / "manual", REVIEWS)
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        list(text.examples("train", text_config(tmp_path)))
    with pytest.raises(ValueError, match="needs data.manual_dir"):
        list(text.examples("train", DataConfig(task="text", source="official")))


def test_imdb_without_reviews_is_refused(tmp_path):
    (tmp_path / "manual").mkdir()
    fixtures.write_imdb(tmp_path / "manual", {"train": REVIEWS["train"], "test": []})
    with pytest.raises(ValueError, match="no test/pos"):
        list(text.examples("test", text_config(tmp_path)))


# --- Image -------------------------------------------------------------------------------------

def test_cifar_greyscale_tokens_and_45k_5k_split(tmp_path):
    _, raw = fixtures.write_cifar(tmp_path, np.random.default_rng(0), per_batch=10, n_test=6)
    config = DataConfig(task="image", source="official", manual_dir=str(tmp_path),
                        data_dir=str(tmp_path / "data"))
    sizes = {s: len(data.data_source(config, s)) for s in ("train", "validation", "test")}
    assert sizes == {"train": 45, "validation": 5, "test": 6}
    rows, labels = raw["data_batch_5"]
    r, g, b = (rows[-1].reshape(3, 32, 32) / 1.0)
    grey = np.rint(0.2989 * r + 0.5870 * g + 0.1140 * b).astype(np.uint8).reshape(-1)
    val = data.data_source(config, "validation")
    match = [ex for ex in (val[i] for i in range(5)) if np.array_equal(ex["inputs"], grey)]
    assert len(match) == 1 and match[0]["label"] == labels[-1]
    assert match[0]["inputs"].shape == (1024,)


def test_cifar_bad_batches(tmp_path):
    good = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 9]}
    image.parse_batch(pickle.dumps(good), "ok")
    with pytest.raises(ValueError, match="3x32x32=3072"):
        image.parse_batch(pickle.dumps({**good, b"data": np.zeros((2, 1024), np.uint8)}), "b")
    with pytest.raises(ValueError, match="label 10 is not a class"):
        image.parse_batch(pickle.dumps({**good, b"labels": [0, 10]}), "b")
    with pytest.raises(ValueError, match="not a readable CIFAR-10 batch"):
        image.parse_batch(b"garbage", "b")
    with tarfile.open(tmp_path / image.ARCHIVE, "w:gz"):
        pass
    with pytest.raises(ValueError, match="lacks cifar-10-batches-py/data_batch_1"):
        image.read_cifar(tmp_path / image.ARCHIVE)


class _RunsCode:
    """Pickles as a call of os.system, as a crafted batch would."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        import os

        return (os.system, (self.command,))


def test_cifar_reader_refuses_pickles_that_would_run_code(tmp_path):
    marker = tmp_path / "ran"
    crafted = pickle.dumps({b"data": _RunsCode(f"touch {marker}"), b"labels": [0]})
    with pytest.raises(ValueError, match=r"b: not a readable CIFAR-10 batch .*refused "
                                         r"(posix|os|nt)\.system"):
        image.parse_batch(crafted, "b")
    assert not marker.exists()
    # through the archive reader as well, naming the batch file
    (tmp_path / "manual").mkdir()
    fixtures.write_cifar(tmp_path / "manual", np.random.default_rng(0), per_batch=2, n_test=2)
    archive = tmp_path / "manual" / image.ARCHIVE
    with tarfile.open(archive, "w:gz") as tar:
        for name in (*image.TRAIN_BATCHES, image.TEST_BATCH):
            info = tarfile.TarInfo(f"{image.FOLDER}/{name}")
            info.size = len(crafted)
            tar.addfile(info, io.BytesIO(crafted))
    with pytest.raises(ValueError, match="data_batch_1: not a readable CIFAR-10 batch"):
        image.read_cifar(archive)
    assert not marker.exists()


def test_cifar_reader_admits_python2_numpy_pickles():
    import pathlib

    # numpy's own test data: an array pickled by Python 2 (numpy.core.multiarray._reconstruct,
    # byte strings), the form of the official batches.
    path = pathlib.Path(np.__file__).parent / "_core" / "tests" / "data" / "astype_copy.pkl"
    if not path.is_file():
        pytest.skip("numpy's test data is not installed")
    array = image.load_batch(path.read_bytes())
    assert isinstance(array, np.ndarray) and array.size > 0


# --- Retrieval ---------------------------------------------------------------------------------

PAIRS = {"train": [(1, b"paper one", b"paper two"), (0, b"alpha", b"beta gamma")],
         "validation": [(1, b"x", b"y")], "test": [(0, b"left text", b"right")]}


def test_aan_pairs_two_sequences(tmp_path):
    fixtures.write_aan(tmp_path / "lra_release" / "lra_release", PAIRS)
    config = DataConfig(task="retrieval", source="official", manual_dir=str(tmp_path),
                        data_dir=str(tmp_path / "data"), max_length=6)
    train = read_split(config, "train")
    got = sorted((list(ex["inputs"]), list(ex["inputs2"]), int(ex["label"])) for ex in train)
    assert got == sorted((tokens(a, 6), tokens(b, 6), label) for label, a, b in PAIRS["train"])
    batch = next(iter(data.eval_batches(config, "train", 4)))
    assert batch["inputs"].shape == (4, 2, 6) and batch["mask"].shape == (4, 2, 6)
    assert batch["weight"].tolist() == [1, 1, 0, 0]


def test_aan_bad_rows_name_their_line(tmp_path):
    folder = fixtures.write_aan(tmp_path, PAIRS)
    path = folder / "new_aan_pairs.train.tsv"
    path.write_bytes(path.read_bytes() + b"1\tonly\tthree\n")
    config = DataConfig(task="retrieval", source="official", manual_dir=str(tmp_path))
    from xformers_zoo.data import retrieval
    with pytest.raises(ValueError, match=r"train.tsv:3: expected 5 tab-separated"):
        list(retrieval.examples("train", config))
    path.write_bytes(b"2\ta\tb\tc\td\n")
    with pytest.raises(ValueError, match=r"train.tsv:1: label '2' is not a class in 0..1"):
        list(retrieval.examples("train", config))
    with pytest.raises(FileNotFoundError, match="new_aan_pairs.eval.tsv"):
        (folder / "new_aan_pairs.eval.tsv").unlink()
        list(retrieval.examples("validation", config))


# --- LRA release: Pathfinder folders and ListOps -----------------------------------------------

@pytest.mark.parametrize("layout", ["lra_release/lra_release", ""])
def test_release_pathfinder_folders(tmp_path, layout, caplog):
    images, labels = pf.draw_images((pf.RESOLUTIONS[32], 5, "train", 0, 20))
    images[3] = 0  # an empty image, as the release has one
    fixtures.write_pathfinder_release(tmp_path / layout, 32, "baseline", images, labels,
                                      per_batch=8)
    config = DataConfig(task="pathfinder32", source="official", level="baseline",
                        manual_dir=str(tmp_path), data_dir=str(tmp_path / "data"))
    with caplog.at_level(logging.WARNING, logger="xformers_zoo.data"):
        train = list(lra_release.pathfinder_images(config, "train", 32))
    assert "skipped 1 empty images" in caplog.text and "sample_3.png" in caplog.text
    keep = [i for i in range(16) if i != 3]  # the first 80% of 20, less the empty one
    assert np.array_equal(np.stack([im for im, _ in train]), images[keep])
    assert [label for _, label in train] == labels[keep].tolist()
    sizes = {s: len(data.data_source(config, s)) for s in ("train", "validation", "test")}
    assert sizes == {"train": 15, "validation": 2, "test": 2}


def test_release_pathfinder_errors(tmp_path):
    images, labels = pf.draw_images((pf.RESOLUTIONS[32], 5, "train", 0, 10))
    folder = fixtures.write_pathfinder_release(tmp_path, 32, "contour14", images, labels)
    config = DataConfig(task="pathfinder32", source="official", manual_dir=str(tmp_path))
    fixtures.write_pathfinder_release(tmp_path, 64, "contour14", images, labels)  # 32 px!
    with pytest.raises(ValueError, match=r"sample_0.png is 32x32, expected 64x64"):
        list(lra_release.pathfinder_images(config, "train", 64))
    metadata = folder / "metadata" / "0.npy"
    lines = metadata.read_text().splitlines()
    lines[4] = "imgs/0 sample_4.png 4 3 0"
    metadata.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"0.npy:5: label '3' is not a class in 0..1"):
        list(lra_release.pathfinder_images(config, "train", 32))
    with pytest.raises(FileNotFoundError, match=r"curv_baseline"):
        list(lra_release.pathfinder_images(DataConfig(
            task="pathfinder32", source="official", manual_dir=str(tmp_path),
            level="baseline"), "train", 32))


def test_release_listops_layout(tmp_path):
    folder = tmp_path / "lra_release" / "lra_release" / "listops-1000"
    folder.mkdir(parents=True)
    (folder / "basic_test.tsv").write_text("Source\tTarget\n( ( [MAX 2 ) 9 ] )\t9\n")
    path = listops.official_file(str(tmp_path), "test")
    assert [label for _, label in listops.read_tsv(path)] == [9]
    with pytest.raises(FileNotFoundError, match=r"missing listops-1000/basic_val.tsv"):
        listops.official_file(str(tmp_path), "validation")


def test_official_listops_keeps_the_size_limits(tmp_path):
    folder = tmp_path / "manual" / "listops-1000"
    folder.mkdir(parents=True)
    for name in listops.OFFICIAL_FILES.values():
        rows = "".join(f"{listops.to_official_string(('[MAX', [i, 9]))}\t9\n" for i in range(6))
        (folder / name).write_text("Source\tTarget\n" + rows)
    config = DataConfig(task="listops", source="official", manual_dir=str(tmp_path / "manual"),
                        data_dir=str(tmp_path / "data"), train_size=3, val_size=2, test_size=4)
    assert [len(data.data_source(config, s)) for s in ("train", "validation", "test")] == [3, 2, 4]
    assert data.dataset_builder(config).builder_config.name.startswith("official_3_2_4_src")


def test_builds_are_keyed_by_their_source_files(tmp_path):
    import dataclasses

    (tmp_path / "manual").mkdir()
    archive = fixtures.write_imdb(tmp_path / "manual", REVIEWS)
    config = text_config(tmp_path)
    first = data.prepare(config)
    assert data.prepare(config).data_dir == first.data_dir  # unchanged files: reused
    # a truncated archive after a good build is read again (and refused), never the old build
    payload = archive.read_bytes()
    archive.write_bytes(payload[:len(payload) // 2])
    with pytest.raises(ValueError, match=f"{archive} is truncated or corrupt"):
        data.prepare(config)
    archive.unlink()
    with pytest.raises(FileNotFoundError, match=f"expected {archive}"):
        data.prepare(config)
    # another manual_dir with other reviews: another build, of those reviews
    (tmp_path / "other").mkdir()
    fixtures.write_imdb(tmp_path / "other", {"train": REVIEWS["train"][:2],
                                              "test": REVIEWS["test"]})
    moved = dataclasses.replace(config, manual_dir=str(tmp_path / "other"))
    assert data.prepare(moved).data_dir != first.data_dir
    assert len(read_split(moved, "train")) == 2
    assert not list((tmp_path / "data").rglob("incomplete.*"))


def test_archives_are_parsed_once_until_replaced(tmp_path):
    import os

    from xformers_zoo.data.manual import parsed_once

    calls = []

    @parsed_once
    def read(path):
        calls.append(path)
        return open(path).read()

    path = tmp_path / "archive.txt"
    path.write_text("one")
    assert read(path) == "one" and read(str(path)) == "one" and len(calls) == 1
    path.write_text("three")
    os.utime(path, ns=(1, 1))  # a different modification time and size: a new archive
    assert read(path) == "three" and len(calls) == 2
