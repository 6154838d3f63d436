"""ListOps (Nangia & Bowman 2018) as used by LRA (Tay et al. 2020): a seeded, parallel generator
of nested MIN/MAX/MED/SM expressions, the tokenizer, and a reader for the official TSV files.

A tree is a digit (leaf) or ``(operator, [children])``. Its length counts a leaf as 1 and an
operator node as 2 (operator token and closing bracket) plus its children, which is exactly its
token count once the official files' parentheses are dropped.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import multiprocessing
import os
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from xformers_zoo.configs.base import DataConfig
from xformers_zoo.data import manual
from xformers_zoo.data.sources import SPLITS, effective_length, register_source, split_sizes

OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
CLOSE = "]"
# id 0 is padding; the official reader writes the closing bracket as "X".
VOCAB = ("<pad>", *OPERATORS, CLOSE, *(str(d) for d in range(10)))
TOKEN_IDS = {tok: i for i, tok in enumerate(VOCAB)} | {"X": VOCAB.index(CLOSE)}
MAX_DEPTH, MAX_ARGS, LEAF_PROBABILITY = 10, 10, 0.75

Tree = int | tuple[str, list["Tree"]]


class _TooLongError(Exception):
    pass


def sample_tree(rng: random.Random, max_length: int) -> tuple[Tree, int]:
    """Draws one tree; raises _TooLongError as soon as it reaches ``max_length`` tokens (so that
    rejected trees cost little)."""
    used = [0]

    def grow(depth: int) -> Tree:
        if depth < MAX_DEPTH and rng.random() >= LEAF_PROBABILITY:
            used[0] += 2
            op = rng.choice(OPERATORS)
            children = [grow(depth + 1) for _ in range(rng.randint(2, MAX_ARGS))]
            return (op, children)
        used[0] += 1
        if used[0] >= max_length:
            raise _TooLongError
        return rng.randrange(10)

    tree = grow(1)
    return tree, used[0]


def evaluate(tree: Tree) -> int:
    """The value of a tree: MIN, MAX, MED (floor of the median) or SM (sum mod 10)."""
    if isinstance(tree, int):
        return tree
    op, children = tree
    values = sorted(evaluate(c) for c in children)
    if op == "[MIN":
        return values[0]
    if op == "[MAX":
        return values[-1]
    if op == "[SM":
        return sum(values) % 10
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) // 2


def tree_tokens(tree: Tree) -> list[str]:
    """Tokens in reading order, without the official files' parentheses."""
    if isinstance(tree, int):
        return [str(tree)]
    op, children = tree
    out = [op]
    for child in children:
        out += tree_tokens(child)
    return out + [CLOSE]


def to_official_string(tree: Tree) -> str:
    """The official TSV rendering, e.g. ``( ( ( [MAX 2 ) 9 ) ] )`` for MAX(2, 9)."""
    if isinstance(tree, int):
        return str(tree)
    op, children = tree
    text = op
    for part in [*map(to_official_string, children), CLOSE]:
        text = f"( {text} {part} )"
    return text


def tokenize(source: str) -> np.ndarray:
    """Token ids of an expression in the official format (parentheses dropped, "]" or "X" close)."""
    words = source.replace("(", " ").replace(")", " ").split()
    try:
        return np.asarray([TOKEN_IDS[w] for w in words], np.uint8)
    except KeyError as e:
        raise ValueError(f"unknown ListOps token {e.args[0]!r}; known: "
                         f"{', '.join(VOCAB[1:])} and X") from None


def _chunk(args: tuple[int, int, int, int]) -> list[tuple[bytes, int]]:
    """``count`` accepted trees from chunk ``index`` of the stream seeded by ``seed``."""
    seed, index, count, max_length = args
    digest = hashlib.sha256(f"listops:{seed}:{index}".encode()).digest()
    rng = random.Random(int.from_bytes(digest[:8], "little"))
    min_length = max_length // 4
    out = []
    while len(out) < count:
        try:
            tree, length = sample_tree(rng, max_length)
        except _TooLongError:
            continue
        if length > min_length:
            ids = bytes(TOKEN_IDS[t] for t in tree_tokens(tree))
            out.append((ids, evaluate(tree)))
    return out


def generate(total: int, *, seed: int, max_length: int, workers: int = 0,
             chunk_size: int = 256) -> list[tuple[np.ndarray, int]]:
    """``total`` distinct expressions with ``max_length // 4 < length < max_length``, and labels.

    The stream is cut into chunks seeded by ``(seed, chunk index)`` and read back in chunk
    order, so the result depends on ``seed`` alone, never on the number of ``workers``
    (0 = every core).
    """
    if max_length < 8:
        raise ValueError(f"ListOps needs max_length >= 8, got {max_length}")
    workers = workers or os.cpu_count() or 1
    seen: set[bytes] = set()
    out: list[tuple[np.ndarray, int]] = []
    ctx = multiprocessing.get_context("spawn" if workers > 1 else "fork")
    pool = ctx.Pool(workers) if workers > 1 else None
    # Chunks go out in finite waves, each read back whole: a pool fed an endless task stream
    # can hang in terminate() while its feeder thread waits on a full pipe.
    wave = 4 * workers
    try:
        for start in itertools.count(0, wave):
            jobs = [(seed, i, chunk_size, max_length) for i in range(start, start + wave)]
            for chunk in (pool.map(_chunk, jobs) if pool else map(_chunk, jobs)):
                for ids, label in chunk:
                    if ids not in seen:
                        seen.add(ids)
                        out.append((np.frombuffer(ids, np.uint8), label))
                        if len(out) == total:
                            return out
    finally:
        if pool:
            pool.terminate()
    return out


def read_tsv(path: str | Path) -> Iterator[tuple[np.ndarray, int]]:
    """(token ids, label) per row of an official ``basic_*.tsv`` (header ``Source\\tTarget``)."""
    path = Path(path)
    with path.open() as f:
        header = f.readline().rstrip("\n")
        if header.split("\t") != ["Source", "Target"]:
            raise ValueError(f"{path}:1: expected the header 'Source<TAB>Target', got {header!r}")
        for line_no, line in enumerate(f, start=2):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) != 2 or not parts[1].strip().isdigit() or not 0 <= int(parts[1]) <= 9:
                raise ValueError(f"{path}:{line_no}: expected '<expression>\\t<digit 0-9>', got "
                                 f"{line[:80]!r}")
            try:
                tokens = tokenize(parts[0])
            except ValueError as e:
                raise ValueError(f"{path}:{line_no}: {e}") from None
            yield tokens, int(parts[1])


OFFICIAL_FILES = {"train": "basic_train.tsv", "validation": "basic_val.tsv",
                  "test": "basic_test.tsv"}


def official_file(manual_dir: str | None, split: str) -> Path:
    """The official TSV of ``split`` under ``manual_dir``, its ``listops-1000/`` folder or the
    release's."""
    if manual_dir is None:
        raise ValueError("data.source=official needs data.manual_dir, the folder holding "
                         "listops-1000/basic_{train,val,test}.tsv")
    name = OFFICIAL_FILES[split]
    # Also inside the release layouts (lra_release/lra_release/listops-1000/...).
    return manual.find(Path(manual_dir), [f"listops-1000/{name}", name], release=True)


@functools.lru_cache(maxsize=2)
def _generated_splits(seed: int, sizes: tuple[int, int, int], max_length: int, workers: int):
    # Test first, then validation, then train: growing the train set leaves the others as they are.
    n_train, n_val, n_test = sizes
    pool = generate(n_train + n_val + n_test, seed=seed, max_length=max_length, workers=workers)
    return {"test": pool[:n_test], "validation": pool[n_test:n_test + n_val],
            "train": pool[n_test + n_val:]}


def build_name(config: DataConfig) -> str:
    """Names what determines the content: the generator's seed, sizes and length bound, or the
    size limits of the official files."""
    if config.source == "official":
        return f"official_{manual.limits_name(config)}"
    sizes = split_sizes(config)
    return (f"generated_len{effective_length(config)}_seed{config.generation_seed}_"
            f"{sizes['train']}_{sizes['validation']}_{sizes['test']}")


def inputs(config: DataConfig) -> tuple[Path, list[Path]] | None:
    """The official TSV files a build reads (None when generating)."""
    if config.source != "official":
        return None
    files = [official_file(config.manual_dir, s) for s in SPLITS]
    return Path(config.manual_dir), files


@register_source("listops", build_name=build_name, inputs=inputs,
                 description="ListOps expressions (generated or the official LRA TSV files)")
def examples(split: str, config: DataConfig) -> Iterator[tuple[str, dict]]:
    """ListOps examples of ``split``: generated, or read from the official TSV files."""
    if config.source == "official":
        rows = manual.limit(list(read_tsv(official_file(config.manual_dir, split))),
                            manual.split_limit(config, split), f"official ListOps {split}")
    else:
        sizes = split_sizes(config)
        rows = _generated_splits(config.generation_seed, tuple(sizes.values()),
                                 effective_length(config), config.workers)[split]
    for i, (tokens, label) in enumerate(rows):
        yield f"{split}-{i}", {"inputs": tokens, "label": label}
