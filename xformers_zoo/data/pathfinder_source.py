"""Pathfinder data sets for the four LRA resolutions: generated in parallel by the project's
generator (``pathfinder.py``), or read from the official release (``lra_release.py``).

Generation cuts each split into chunks of consecutive image indices and reads them back in
order; every image has its own random stream, so the result is the same for any number of
worker processes and growing one split leaves the others as they are. A build keeps one pool
of worker processes for its three splits, so it pays the process start-up once.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.pool
import os
from collections.abc import Iterator

import numpy as np

from xformers_zoo.configs.base import DataConfig
from xformers_zoo.data import lra_release, manual
from xformers_zoo.data.pathfinder import RESOLUTIONS, PathfinderParams, draw_images
from xformers_zoo.data.sources import register_source, split_sizes
from xformers_zoo.task_specs import tasks_of_family

# Image side of each Pathfinder task, from its spec (configs/lra_tasks.py).
SIZES = {name: spec.image_shape[0] for name, spec in tasks_of_family("pathfinder").items()}
# 2.0.0: drawn as the original generator (dashed Lanczos-shrunk paddles, its contrasts,
# distractors kept as they fit); 1.x images were connected curves a flood fill could solve.
GENERATOR_VERSION = "2.0.0"

# The pool of each build in progress, by its data config (see ``build_pool``).
_BUILD_POOLS: dict[DataConfig, multiprocessing.pool.Pool] = {}


def chunk_size(size: int) -> int:
    """Images per job: about a second of work, so that every core stays busy to the end."""
    return {32: 64, 64: 32, 128: 32, 256: 8}.get(size, 16)


def spawn_pool(workers: int) -> multiprocessing.pool.Pool:
    """A pool of ``workers`` generation processes."""
    # spawn: the parent may hold JAX's threads, which fork would copy in a broken state.
    return multiprocessing.get_context("spawn").Pool(workers)


def generate(params: PathfinderParams, count: int, *, seed: int, split: str, start: int = 0,
             workers: int = 0, pool=None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Images ``start .. start + count - 1`` of ``split`` in chunks: uint8 ``[n, size, size]``
    and labels ``[n]``, in index order. ``workers`` processes (0 = every core; 1 = this one),
    or an existing ``multiprocessing`` pool."""
    step = chunk_size(params.size)
    jobs = [(params, seed, split, i, min(step, start + count - i))
            for i in range(start, start + count, step)]
    workers = workers or os.cpu_count() or 1
    own = None
    if pool is None and workers > 1 and len(jobs) > 1:
        own = pool = spawn_pool(min(workers, len(jobs)))
    try:
        yield from (pool.imap(draw_images, jobs) if pool is not None else map(draw_images, jobs))
    finally:
        if own is not None:
            own.terminate()


def params_for(config: DataConfig) -> PathfinderParams:
    """The drawing settings of the config's task and level."""
    return RESOLUTIONS[SIZES[config.task]].with_level(config.level)


@contextlib.contextmanager
def build_pool(config: DataConfig) -> Iterator[None]:
    """Holds one pool of generation workers open while ``config``'s data set is built, for
    every split to draw on (none for the release, or when one process suffices)."""
    if config.source != "generated" or config in _BUILD_POOLS:
        yield
        return
    step = chunk_size(SIZES[config.task])
    jobs = sum(-(-n // step) for n in split_sizes(config).values())
    workers = min(config.workers or os.cpu_count() or 1, jobs)
    if workers <= 1:
        yield
        return
    with spawn_pool(workers) as pool:  # leaving it terminates the workers
        _BUILD_POOLS[config] = pool
        try:
            yield
        finally:
            del _BUILD_POOLS[config]


def build_name(config: DataConfig) -> str:
    """Names the content: level, then the generator's seed and sizes, or the release."""
    if config.source == "official":
        return f"official_{config.level}_{manual.limits_name(config)}"
    sizes = split_sizes(config)
    return (f"generated_{config.level}_seed{config.generation_seed}_"
            f"{sizes['train']}_{sizes['validation']}_{sizes['test']}")


@register_source(*SIZES, build_name=build_name, version=GENERATOR_VERSION,
                 build_scope=build_pool, inputs=lra_release.release_inputs,
                 description="Pathfinder (generated, or the LRA release's pathfinder<side>/)")
def examples(split: str, config: DataConfig) -> Iterator[tuple[str, dict]]:
    """Flattened images and labels of ``split``: generated, or read from the release."""
    size = SIZES[config.task]
    if config.source == "official":
        for i, (pixels, label) in enumerate(lra_release.pathfinder_images(config, split, size)):
            yield f"{split}-{i}", {"inputs": pixels.reshape(-1), "label": label}
        return
    if config.source != "generated":
        raise ValueError(f"{config.task} is generated (data.source=generated) or read from the "
                         "LRA release (data.source=official)")
    count = split_sizes(config)[split]
    i = 0
    for images, labels in generate(params_for(config), count, seed=config.generation_seed,
                                   split=split, workers=config.workers,
                                   pool=_BUILD_POOLS.get(config)):
        for pixels, label in zip(images, labels, strict=True):
            yield f"{split}-{i}", {"inputs": pixels.reshape(-1), "label": int(label)}
            i += 1
