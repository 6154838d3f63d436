"""LRA Image (Tay et al. 2020): CIFAR-10 (Krizhevsky 2009) in greyscale, each pixel value a
token (no normalisation), 32 x 32 = 1024 tokens row by row; 45K train, the last 5K of the
training batches as validation, the 10K test batch as test.

Read from the official ``cifar-10-python.tar.gz`` (or its unpacked ``cifar-10-batches-py/``
folder) in ``data.manual_dir``. The batches are Python pickles, as CIFAR-10 ships them; they are
read with an unpickler that admits only what the official batches hold, so a crafted file is
refused rather than run.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from jaxtyping import Int, UInt8

from xformers_zoo.configs.base import DataConfig
from xformers_zoo.data import manual
from xformers_zoo.data.sources import register_source

ARCHIVE, FOLDER = "cifar-10-python.tar.gz", "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
SIDE, CLASSES = 32, 10
# ITU-R 601 luma weights, as tf.image.rgb_to_grayscale (used by LRA) applies them.
LUMA = np.array([0.2989, 0.5870, 0.1140])


def greyscale(rgb: UInt8[np.ndarray, "n 3072"]) -> UInt8[np.ndarray, "n 32 32"]:
    """Greyscale images from CIFAR rows (1024 red, 1024 green, then 1024 blue values)."""
    planes = rgb.reshape(-1, 3, SIDE, SIDE).astype(np.float64)
    grey = np.einsum("c,nchw->nhw", LUMA, planes)
    return np.clip(np.rint(grey), 0, 255).astype(np.uint8)


# The only globals a CIFAR-10 batch refers to: numpy array reconstruction (numpy.core before
# numpy 2, numpy._core after). Dicts, lists, bytes, strings and ints are pickle opcodes.
ALLOWED_GLOBALS = frozenset({("numpy.core.multiarray", "_reconstruct"),
                             ("numpy._core.multiarray", "_reconstruct"),
                             ("numpy", "ndarray"), ("numpy", "dtype")})


class BatchUnpickler(pickle.Unpickler):
    """Unpickles a CIFAR-10 batch, refusing any global outside ``ALLOWED_GLOBALS`` (a pickle
    can otherwise call any function, e.g. ``os.system``, while it loads)."""

    def find_class(self, module: str, name: str):
        if (module, name) not in ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(
                f"refused {module}.{name}: a CIFAR-10 batch holds only dicts, lists, bytes, "
                "strings, ints and numpy arrays")
        if module == "numpy.core.multiarray" and hasattr(np, "_core"):
            module = "numpy._core.multiarray"  # numpy 2 warns on the old name
        return super().find_class(module, name)


def load_batch(raw: bytes):
    """The object in one pickled batch (Python 2 strings read as bytes, as they were written),
    through ``BatchUnpickler``."""
    return BatchUnpickler(io.BytesIO(raw), encoding="bytes").load()


def parse_batch(raw: bytes, where: str) -> tuple[UInt8[np.ndarray, "n 32 32"],
                                                 Int[np.ndarray, " n"]]:
    """Greyscale images and labels of one pickled CIFAR-10 batch; raises naming ``where`` for
    anything that is not one (wrong image size, labels out of range, missing keys)."""
    try:
        batch = load_batch(raw)
    except Exception as e:  # a damaged pickle raises many types
        raise ValueError(f"{where}: not a readable CIFAR-10 batch ({type(e).__name__}: {e})"
                         ) from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise ValueError(f"{where}: expected a dict with b'data' and b'labels'")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[b"labels"], np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * SIDE * SIDE:
        raise ValueError(f"{where}: images must be uint8 rows of 3x32x32=3072 values, got "
                         f"{data.dtype} {data.shape}")
    if labels.shape != (data.shape[0],):
        raise ValueError(f"{where}: {labels.shape[0]} labels for {data.shape[0]} images")
    if labels.size and (labels.min() < 0 or labels.max() >= CLASSES):
        bad = int(labels[(labels < 0) | (labels >= CLASSES)][0])
        raise ValueError(f"{where}: label {bad} is not a class in 0..{CLASSES - 1}")
    return greyscale(data), labels


def _batches(path: Path) -> dict[str, bytes]:
    """Raw bytes of every batch file, from the archive or the unpacked folder."""
    names = (*TRAIN_BATCHES, TEST_BATCH)
    if path.is_dir():
        found = {n: (path / n).read_bytes() for n in names if (path / n).is_file()}
    else:
        found = {}
        with manual.open_tar(path) as tar:
            for member in tar:
                name = member.name.rsplit("/", 1)[-1]
                if name in names and member.isfile():
                    found[name] = manual.tar_bytes(tar, member, path)
    missing = [n for n in names if n not in found]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(f'{FOLDER}/{n}' for n in missing)}; "
                         f"expected the CIFAR-10 python archive {ARCHIVE}")
    return found


@manual.parsed_once
def read_cifar(path: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Greyscale ``[n, 32, 32]`` images and labels per LRA split: train (the first 90% of the
    training batches), validation (the last 10%) and test."""
    path = Path(path)
    raw = _batches(path)
    parts = [parse_batch(raw[n], f"{path}:{n}") for n in TRAIN_BATCHES]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    n_train = images.shape[0] - images.shape[0] // 10
    return {"train": (images[:n_train], labels[:n_train]),
            "validation": (images[n_train:], labels[n_train:]),
            "test": parse_batch(raw[TEST_BATCH], f"{path}:{TEST_BATCH}")}


def _official_path(config: DataConfig) -> tuple[Path, Path]:
    root = manual.manual_dir(config, f"the CIFAR-10 archive {ARCHIVE}")
    return root, manual.find(root, [ARCHIVE, FOLDER])


def inputs(config: DataConfig) -> tuple[Path, list[Path]] | None:
    """The official archive (or every file of the unpacked folder) a build reads."""
    if config.source != "official":
        return None
    root, path = _official_path(config)
    return root, manual.files_under(path)


def build_name(config: DataConfig) -> str:
    """Names the content: the size limits."""
    return f"official_{manual.limits_name(config)}"


@register_source("image", build_name=build_name, inputs=inputs,
                 description="greyscale CIFAR-10 from the official python archive")
def examples(split: str, config: DataConfig) -> Iterator[tuple[str, dict]]:
    """Flattened greyscale images of ``split``, at most ``data.<split>_size`` of them."""
    if config.source != "official":
        raise ValueError("image reads the official CIFAR-10 archive: set data.source=official "
                         f"and put {ARCHIVE} in data.manual_dir")
    images, labels = read_cifar(_official_path(config)[1])[split]
    keep = manual.limit(list(range(len(labels))), manual.split_limit(config, split),
                        f"CIFAR-10 {split}")
    for i in keep:
        yield f"{split}-{i}", {"inputs": images[i].reshape(-1), "label": int(labels[i])}
