"""grain input pipelines: padded fixed-shape batches with a key mask, a seeded order, per-process
sharding and a checkpointable training iterator.

Batches are dicts of numpy arrays: ``inputs`` int32 ``[batch, length]`` (``[batch, 2, length]``
for two-sequence tasks), ``mask`` bool of the same shape (True at real tokens), ``label`` int32
``[batch]`` and ``weight`` float32 ``[batch]`` (0 for the filler rows of a last eval batch).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import grain
import jax
import numpy as np
from absl import flags as absl_flags

from xformers_zoo.configs.base import DataConfig
from xformers_zoo.data.builder import data_source
from xformers_zoo.data.sources import effective_length
from xformers_zoo.task_specs import TASKS


def _pad(tokens: np.ndarray, length: int, task: str) -> tuple[np.ndarray, np.ndarray]:
    """Pads (or rejects) one sequence to ``length``; returns int32 ids and the real-token mask."""
    n = tokens.shape[0]
    if n > length:
        raise ValueError(f"{task} example of {n} tokens exceeds the sequence length {length}; "
                         "raise data.max_length or rebuild the data with a shorter length")
    ids = np.zeros(length, np.int32)
    ids[:n] = tokens
    return ids, np.arange(length) < n


class PadExample(grain.transforms.Map):
    """Pads an example's sequences to the task length and attaches the key mask."""

    def __init__(self, config: DataConfig):
        self.task = TASKS.get(config.task)
        self.length = effective_length(config)

    def map(self, example: dict[str, Any]) -> dict[str, np.ndarray]:
        keys = ("inputs", "inputs2") if self.task.two_inputs else ("inputs",)
        padded = [_pad(np.asarray(example[k]), self.length, self.task.name) for k in keys]
        ids = np.stack([p[0] for p in padded]) if self.task.two_inputs else padded[0][0]
        mask = np.stack([p[1] for p in padded]) if self.task.two_inputs else padded[0][1]
        if not self.task.has_padding:
            mask = np.ones_like(mask)
        return {"inputs": ids, "mask": mask, "label": np.int32(example["label"]),
                "weight": np.float32(1.0)}


class EpochShuffle(grain.MapDataset):
    """Endless epochs of a finite dataset, each in a fresh seeded order: element ``i`` is
    ``parent[order_e[i % n]]`` with ``e = i // n`` and ``order_e`` a numpy permutation drawn
    from ``(seed, e)``. One array lookup per element, where grain's index shuffle (shuffle +
    repeat) measured about 0.1 ms per element, more than reading and decoding a 1K-token
    example. Index-based like every MapDataset, so iterator checkpoints stay exact."""

    def __init__(self, parent: grain.MapDataset, seed: int):
        super().__init__(parent)
        self._size = len(parent)
        self._seed = seed

    def __len__(self) -> int:
        return 2**62  # endless (as grain's repeat(None))

    @functools.lru_cache(maxsize=2)  # noqa: B019 - two epochs (current, next) per dataset
    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self._seed, epoch]).permutation(self._size)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, position = divmod(index, self._size)
        return self._parent[int(self._order(epoch)[position])]

    def __str__(self) -> str:
        return f"EpochShuffle(seed={self._seed})"


class ProcessRows(grain.MapDataset):
    """This process's rows of every global batch of ``parent``: element ``i`` is the parent's
    element ``(i // local) * global_batch + start + i % local``, where ``local`` is
    ``global_batch / process_count`` and ``start = process_index * local``. Batched by
    ``local``, batch ``j`` is this process's slice of the parent's ``j``-th global batch, so
    the examples of a step, and the iterator state (the batch count), do not depend on the
    number of processes reading them."""

    def __init__(self, parent: grain.MapDataset, global_batch: int, process_index: int,
                 process_count: int):
        super().__init__(parent)
        if global_batch % process_count:
            raise ValueError(f"the batch size {global_batch} does not split over "
                             f"{process_count} processes")
        self._global = global_batch
        self._local = global_batch // process_count
        self._start = process_index * self._local
        self._size = len(parent) // global_batch * self._local

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        batch, row = divmod(index, self._local)
        return self._parent[batch * self._global + self._start + row]

    def __str__(self) -> str:
        return f"ProcessRows(global_batch={self._global}, start={self._start})"


class FillTo(grain.MapDataset):
    """``parent``'s padded examples followed by zero-weight copies of its first one up to
    ``size`` elements, so that every batch is whole (jit never recompiles)."""

    def __init__(self, parent: grain.MapDataset, size: int):
        super().__init__(parent)
        self._size = size

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        if index < len(self._parent):
            return self._parent[index]
        return {**self._parent[0], "weight": np.float32(0.0)}


def _this_process(ds: grain.MapDataset, global_batch: int) -> grain.MapDataset:
    return ProcessRows(ds, global_batch, jax.process_index(), jax.process_count())


# Batches are assembled in this process (or in each loader worker) without reader threads:
# decoding and padding are Python work that threads only serialise on the GIL (measured: one
# thread 3x the batches/s of grain's default 16 for 256 x 1K-token images).
_READ = grain.ReadOptions(num_threads=0)


def train_dataset(config: DataConfig, batch_size: int, seed: int) -> grain.IterDataset:
    """Endless shuffled training batches (a new permutation every epoch, fixed by ``seed``).

    ``batch_size`` is the global batch; each process yields its own rows of every global
    batch (``batch_size / process_count``), reading only those. With ``loader_workers`` > 0,
    batches are assembled by that many worker processes ahead of training (grain's
    ``mp_prefetch``; the order stays the same). The iterator made from it has
    ``get_state()``/``set_state()`` for checkpoints; the state counts batches, the same for
    any number of processes.
    """
    ds = grain.MapDataset.source(data_source(config, "train"))
    if len(ds) < batch_size:
        raise ValueError(f"the train split has {len(ds)} examples, fewer than one batch of "
                         f"{batch_size}")
    ds = _this_process(EpochShuffle(ds, seed), batch_size).map(PadExample(config))
    local = batch_size // jax.process_count()
    ds = ds.batch(local, drop_remainder=True).to_iter_dataset(_READ)
    if config.loader_workers > 0:
        # grain's workers read absl flags, which only absl.app parses; mark them parsed (with
        # their defaults) when running under any other entry point.
        if not absl_flags.FLAGS.is_parsed():
            absl_flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.loader_workers))
    return ds


def eval_batches(config: DataConfig, split: str, batch_size: int,
                 max_batches: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Every example of ``split`` once, in file order, in global batches of ``batch_size``
    (the first ``max_batches`` of them when given); this process yields its rows of each.

    The last global batch is topped up with zero-weight copies so shapes never change (and jit
    never recompiles); every process yields the same number of batches, so that none waits on
    the others, and the examples scored do not depend on the number of processes.
    """
    ds = grain.MapDataset.source(data_source(config, split)).map(PadExample(config))
    num_batches = -(-len(ds) // batch_size)
    if max_batches is not None:
        num_batches = min(num_batches, max_batches)
    ds = _this_process(FillTo(ds, num_batches * batch_size), batch_size)
    yield from ds.batch(batch_size // jax.process_count()).to_iter_dataset(_READ)
