"""LRA Retrieval (Tay et al. 2020): do two ACL Anthology Network papers (Radev et al. 2013) cite
each other? Both papers as byte-level sequences (id = byte + 1, 0 = pad) of up to 4000 tokens,
classified by a dual encoder over [u, v, u*v, u-v].

Read from the LRA release's ``tsv_data/new_aan_pairs.{train,eval,test}.tsv`` (no header; columns
label, id1, id2, text1, text2) in ``data.manual_dir``, in either release layout.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from xformers_zoo.configs.base import DataConfig
from xformers_zoo.data import manual
from xformers_zoo.data.sources import SPLITS, effective_length, register_source

FILES = {"train": "new_aan_pairs.train.tsv", "validation": "new_aan_pairs.eval.tsv",
         "test": "new_aan_pairs.test.tsv"}
FOLDER = "tsv_data"


def read_pairs(path: str | Path, length: int, limit: int | None = None
               ) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """(tokens of paper 1, tokens of paper 2, label) per row, at most ``limit`` rows; a row
    that is not ``label<TAB>id1<TAB>id2<TAB>text1<TAB>text2`` raises naming its line."""
    path = Path(path)
    count = 0
    with path.open("rb") as f:
        for line_no, line in enumerate(f, start=1):
            if limit is not None and count >= limit:
                return
            line = line.rstrip(b"\r\n")
            if not line.strip():
                continue
            fields = line.split(b"\t")
            if len(fields) != 5:
                raise ValueError(f"{path}:{line_no}: expected 5 tab-separated columns (label, "
                                 f"id1, id2, text1, text2), got {len(fields)}")
            label = manual.label_in_range(fields[0].decode("ascii", "replace"), 2,
                                          f"{path}:{line_no}")
            yield (manual.byte_tokens(fields[3], length), manual.byte_tokens(fields[4], length),
                   label)
            count += 1


def pairs_file(config: DataConfig, split: str) -> Path:
    """The release TSV of ``split`` under ``data.manual_dir``."""
    root = manual.manual_dir(config, f"the LRA release's {FOLDER}/ folder")
    name = FILES[split]
    return manual.find(root, [f"{FOLDER}/{name}", name], release=True)


def build_name(config: DataConfig) -> str:
    """Names the content: the byte length per paper and the size limits."""
    return f"official_len{effective_length(config)}_{manual.limits_name(config)}"


def inputs(config: DataConfig) -> tuple[Path, list[Path]] | None:
    """The release TSV files a build reads."""
    if config.source != "official":
        return None
    files = [pairs_file(config, s) for s in SPLITS]
    return Path(config.manual_dir).expanduser(), files


@register_source("retrieval", build_name=build_name, inputs=inputs,
                 description="AAN paper pairs from the LRA release's tsv_data/")
def examples(split: str, config: DataConfig) -> Iterator[tuple[str, dict]]:
    """Paper pairs of ``split``, at most ``data.<split>_size`` of them (in file order)."""
    if config.source != "official":
        raise ValueError("retrieval reads the LRA release: set data.source=official and point "
                         f"data.manual_dir at the folder holding {FOLDER}/")
    path = pairs_file(config, split)
    limit = manual.split_limit(config, split)
    count = 0
    for i, (first, second, label) in enumerate(read_pairs(path, effective_length(config),
                                                           limit)):
        count += 1
        yield f"{split}-{i}", {"inputs": first, "inputs2": second, "label": label}
    if count == 0:
        raise ValueError(f"{path} holds no rows")
    manual.limit([None] * count, limit, f"{path.name} ({split})")  # warns if short
