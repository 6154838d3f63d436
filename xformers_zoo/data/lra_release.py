"""Reader of the Pathfinder image folders of the official LRA release (Tay et al. 2020):
``pathfinderN/<level>/imgs/<batch>/sample_<i>.png`` with ``metadata/<batch>.npy`` files that are
plain text despite the name, one line per image: ``imgs/<batch> sample_<i>.png <idx> <label> ...``.

The release has no splits; like LRA we cut the images, in metadata order (batches by number),
into the first 80% for training, the next 10% for validation and the last 10% for test. Empty
(all-black) images are skipped and counted (the release has one). ListOps (``listops-1000/``)
and Retrieval (``tsv_data/``) have their own readers; all of them accept the release unpacked as
``lra_release/lra_release/``, ``lra_release/`` or directly in ``data.manual_dir``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
from jaxtyping import UInt8

from xformers_zoo.configs.base import DataConfig
from xformers_zoo.data import manual
from xformers_zoo.task_specs import TASKS

LEVEL_DIRS = {"baseline": "curv_baseline", "contour9": "curv_contour_length_9",
              "contour14": "curv_contour_length_14"}
SPLIT_FRACTIONS = {"train": (0.0, 0.8), "validation": (0.8, 0.9), "test": (0.9, 1.0)}


def pathfinder_folder(config: DataConfig, size: int) -> Path:
    """``pathfinder<size>/<level folder>`` of the release under ``data.manual_dir``."""
    level = LEVEL_DIRS[config.level]
    root = manual.manual_dir(config, f"the LRA release's pathfinder{size}/{level}/ folder")
    return manual.find(root, [f"pathfinder{size}/{level}"], release=True)


def _batch_number(path: Path) -> tuple[int, str]:
    return (int(path.stem), path.stem) if path.stem.isdigit() else (1 << 62, path.stem)


def metadata_files(folder: Path) -> list[Path]:
    """``folder/metadata/*.npy`` by batch number; raises naming the folder if there are none."""
    files = sorted((folder / "metadata").glob("*.npy"), key=_batch_number)
    if not files:
        raise FileNotFoundError(f"missing metadata: expected text files "
                                f"{folder / 'metadata'}/<batch>.npy")
    return files


def release_inputs(config: DataConfig) -> tuple[Path, list[Path]] | None:
    """What a build from the release reads, for its fingerprint: the metadata files and the
    image batch folders (whose times change when images are added, removed or renamed; an image
    rewritten in place under its name is not seen, which spares a stat of every image)."""
    if config.source != "official":
        return None
    side = TASKS.get(config.task).image_shape[0]
    folder = pathfinder_folder(config, side)
    batches = sorted(p for p in (folder / "imgs").glob("*") if p.is_dir())
    return Path(config.manual_dir).expanduser(), [*metadata_files(folder), *batches]


def read_metadata(folder: Path) -> list[tuple[Path, int, str]]:
    """(image path, label, "file:line") for every line of ``folder/metadata/*.npy``."""
    rows = []
    for file in metadata_files(folder):
        for line_no, line in enumerate(file.read_text().splitlines(), start=1):
            fields = line.split()
            if not fields:
                continue
            where = f"{file}:{line_no}"
            if len(fields) < 4:
                raise ValueError(f"{where}: expected 'imgs/<batch> sample_<i>.png <idx> <label>', "
                                 f"got {line[:80]!r}")
            rows.append((folder / fields[0] / fields[1],
                         manual.label_in_range(fields[3], 2, where), where))
    return rows


def load_image(path: Path, size: int) -> UInt8[np.ndarray, "h w"]:
    """A greyscale ``size x size`` PNG; raises naming the file if it is missing, unreadable or
    of another size."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise FileNotFoundError(f"missing image {path} (named in the metadata)")
    try:
        with Image.open(path) as image:
            image = image.convert("L")
            pixels = np.asarray(image, np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"{path} is not a readable PNG ({e})") from None
    if pixels.shape != (size, size):
        raise ValueError(f"{path} is {pixels.shape[1]}x{pixels.shape[0]}, expected "
                         f"{size}x{size} for this task")
    return pixels


def split_rows(rows: list, split: str) -> list:
    """The rows of ``split`` (80% / 10% / 10% in order)."""
    lo, hi = SPLIT_FRACTIONS[split]
    return rows[round(lo * len(rows)):round(hi * len(rows))]


def pathfinder_images(config: DataConfig, split: str, size: int
                      ) -> Iterator[tuple[np.ndarray, int]]:
    """(image, label) of ``split`` from the release, at most ``data.<split>_size``; empty
    images are skipped, counted and reported."""
    folder = pathfinder_folder(config, size)
    rows = split_rows(read_metadata(folder), split)
    limit = manual.split_limit(config, split)
    skipped = manual.Skipped(f"empty images in {folder} ({split})")
    count = 0
    for path, label, _ in rows:
        if limit is not None and count >= limit:
            break
        pixels = load_image(path, size)
        if not pixels.any():
            skipped.add(str(path.relative_to(folder)))
            continue
        count += 1
        yield pixels, label
    skipped.report()
    if count == 0:
        raise ValueError(f"{folder}: no usable images for the {split} split")
