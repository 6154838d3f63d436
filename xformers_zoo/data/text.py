"""LRA Text (Tay et al. 2020): IMDb sentiment (Maas et al. 2011) as UTF-8 bytes, id = byte + 1
(0 is padding), cut to the task length (1000 in the public configs, 4000 in the paper).

Read from the official ``aclImdb_v1.tar.gz`` (or its unpacked ``aclImdb/`` folder) in
``data.manual_dir``, or with ``data.source=tfds`` from a TFDS ``imdb_reviews`` already prepared in
array_record format. As in LRA, the 25K test reviews serve as validation and as test set.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from xformers_zoo.configs.base import DataConfig
from xformers_zoo.data import manual
from xformers_zoo.data.sources import effective_length, register_source

ARCHIVE, FOLDER = "aclImdb_v1.tar.gz", "aclImdb"
# Which part of the IMDb data each LRA split reads.
PARTS = {"train": "train", "validation": "test", "test": "test"}
LABELS = {"neg": 0, "pos": 1}
_REVIEW = re.compile(r"(?:^|/)aclImdb/(train|test)/(pos|neg)/([^/]+\.txt)$")
# One fixed shuffle of each part, so that any leading subset mixes both classes.
SHUFFLE_SEED = 0

Review = tuple[bytes, int]


def _from_archive(path: Path) -> dict[str, list[tuple[str, Review]]]:
    parts: dict[str, list[tuple[str, Review]]] = {"train": [], "test": []}
    with manual.open_tar(path) as tar:
        for member in tar:
            match = _REVIEW.search(member.name)
            if match and member.isfile():
                part, sentiment, name = match.groups()
                text = manual.tar_bytes(tar, member, path)
                parts[part].append((f"{sentiment}/{name}", (text, LABELS[sentiment])))
    return parts


def _from_folder(path: Path) -> dict[str, list[tuple[str, Review]]]:
    parts: dict[str, list[tuple[str, Review]]] = {"train": [], "test": []}
    for part in parts:
        for sentiment, label in LABELS.items():
            for file in (path / part / sentiment).glob("*.txt"):
                parts[part].append((f"{sentiment}/{file.name}", (file.read_bytes(), label)))
    return parts


@manual.parsed_once
def read_imdb(path: str | Path) -> dict[str, list[Review]]:
    """Reviews and labels (0 negative, 1 positive) of the "train" and "test" parts of the
    official archive or folder, each part in a fixed shuffled order."""
    path = Path(path)
    parts = _from_folder(path) if path.is_dir() else _from_archive(path)
    out = {}
    for part, named in parts.items():
        if not named:
            raise ValueError(f"{path} holds no {part}/pos/*.txt or {part}/neg/*.txt reviews; "
                             f"expected the IMDb archive {ARCHIVE} (aclImdb/{part}/...)")
        named.sort()
        order = np.random.default_rng(SHUFFLE_SEED).permutation(len(named))
        out[part] = [named[i][1] for i in order]
    return out


def _official_path(config: DataConfig) -> tuple[Path, Path]:
    root = manual.manual_dir(config, f"the IMDb archive {ARCHIVE}")
    return root, manual.find(root, [ARCHIVE, FOLDER])


def _official(config: DataConfig, split: str) -> list[Review]:
    return read_imdb(_official_path(config)[1])[PARTS[split]]


def _tfds(config: DataConfig, split: str) -> list[Review]:
    import tensorflow_datasets as tfds

    data_dir = config.manual_dir or config.data_dir
    try:
        source = tfds.data_source("imdb_reviews", split=PARTS[split], data_dir=data_dir,
                                  download=False)
    except Exception as e:  # tfds raises several types for "not prepared"
        raise FileNotFoundError(
            f"TFDS imdb_reviews is not prepared in {data_dir} in array_record format ({e}); "
            f"prepare it there, or use data.source=official with {ARCHIVE} in "
            "data.manual_dir") from None
    return [(bytes(ex["text"]), int(ex["label"])) for ex in source]


def build_name(config: DataConfig) -> str:
    """Names the content: where it came from, the byte length and the size limits."""
    return f"{config.source}_len{effective_length(config)}_{manual.limits_name(config)}"


def inputs(config: DataConfig) -> tuple[Path, list[Path]] | None:
    """The official archive (or every file of the unpacked folder); None for TFDS, which keeps
    its own versions."""
    if config.source != "official":
        return None
    root, path = _official_path(config)
    return root, manual.files_under(path)


@register_source("text", build_name=build_name, inputs=inputs,
                 description="byte-level IMDb reviews (official aclImdb_v1.tar.gz or TFDS "
                             "imdb_reviews)")
def examples(split: str, config: DataConfig) -> Iterator[tuple[str, dict]]:
    """Byte-level reviews of ``split``, at most ``data.<split>_size`` of them."""
    if config.source == "generated":
        raise ValueError("text has no generator; use data.source=official (aclImdb_v1.tar.gz "
                         "in data.manual_dir) or data.source=tfds")
    reviews = (_tfds if config.source == "tfds" else _official)(config, split)
    reviews = manual.limit(reviews, manual.split_limit(config, split),
                           f"IMDb {PARTS[split]} ({split})")
    length = effective_length(config)
    for i, (text, label) in enumerate(reviews):
        yield f"{split}-{i}", {"inputs": manual.byte_tokens(text, length), "label": label}
