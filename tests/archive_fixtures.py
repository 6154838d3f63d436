"""Small files in each official format (IMDb tarball, CIFAR-10 python tarball, AAN TSVs, LRA
release Pathfinder folders), written from given or random content, from which the tests build
their data sets."""

from __future__ import annotations

import io
import pickle
import tarfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from xformers_zoo.data import image, lra_release, retrieval, text


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def random_text(rng: np.random.Generator, lo: int, hi: int) -> bytes:
    """Printable ASCII words of ``lo..hi`` bytes."""
    letters = rng.integers(97, 123, size=int(rng.integers(lo, hi + 1)), dtype=np.uint8)
    letters[rng.random(letters.size) < 0.15] = 32
    return letters.tobytes()


def write_imdb(root: Path, reviews: dict[str, Sequence[tuple[bytes, int]]]) -> Path:
    """``root/aclImdb_v1.tar.gz`` holding ``aclImdb/<part>/<pos|neg>/<i>_<stars>.txt``."""
    path = Path(root) / text.ARCHIVE
    with tarfile.open(path, "w:gz") as tar:
        _add(tar, "aclImdb/README", b"fixture")
        for part, rows in reviews.items():
            for i, (review, label) in enumerate(rows):
                folder = "pos" if label else "neg"
                _add(tar, f"aclImdb/{part}/{folder}/{i}_{8 if label else 2}.txt", review)
    return path


def write_cifar(root: Path, rng: np.random.Generator, per_batch: int, n_test: int
                ) -> tuple[Path, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """``root/cifar-10-python.tar.gz`` with random RGB rows; returns the path and the raw
    ``(rgb rows, labels)`` of each batch file."""
    path = Path(root) / image.ARCHIVE
    raw = {}
    with tarfile.open(path, "w:gz") as tar:
        for name, n in [*((b, per_batch) for b in image.TRAIN_BATCHES),
                        (image.TEST_BATCH, n_test)]:
            rows = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
            labels = rng.integers(0, 10, size=n).tolist()
            raw[name] = (rows, np.array(labels))
            batch = {b"batch_label": name.encode(), b"labels": labels, b"data": rows,
                     b"filenames": [f"{i}.png".encode() for i in range(n)]}
            _add(tar, f"{image.FOLDER}/{name}", pickle.dumps(batch))
    return path, raw


def write_aan(root: Path, rows: dict[str, Sequence[tuple[int, bytes, bytes]]]) -> Path:
    """``root/tsv_data/new_aan_pairs.<split>.tsv`` with (label, text1, text2) rows."""
    folder = Path(root) / retrieval.FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    for split, pairs in rows.items():
        lines = [b"\t".join([f"{label}.0".encode(), f"p{i}a".encode(), f"p{i}b".encode(),
                             first, second]) for i, (label, first, second) in enumerate(pairs)]
        (folder / retrieval.FILES[split]).write_bytes(b"\n".join(lines) + b"\n")
    return folder


def write_pathfinder_release(root: Path, size: int, level: str, images: np.ndarray,
                             labels: Sequence[int], per_batch: int = 10) -> Path:
    """``root/pathfinder<size>/<level folder>/imgs/<batch>/sample_<i>.png`` and the text
    ``metadata/<batch>.npy`` files, as the release lays them out."""
    from PIL import Image

    folder = Path(root) / f"pathfinder{size}" / lra_release.LEVEL_DIRS[level]
    (folder / "metadata").mkdir(parents=True, exist_ok=True)
    for batch in range(-(-len(labels) // per_batch)):
        (folder / "imgs" / str(batch)).mkdir(parents=True, exist_ok=True)
        lines = []
        for i in range(batch * per_batch, min((batch + 1) * per_batch, len(labels))):
            Image.fromarray(images[i]).save(folder / "imgs" / str(batch) / f"sample_{i}.png")
            lines.append(f"imgs/{batch} sample_{i}.png {i} {labels[i]} 0 1 2\n")
        (folder / "metadata" / f"{batch}.npy").write_text("".join(lines))
    return folder
