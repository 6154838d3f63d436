"""Timing the trainer's own jitted steps on a synthetic batch of a config's shapes.

Shared by the sweep's dry-run probe (``train/sweep_probe.py``) and ``bench speed``
(``xformers_zoo/bench/speed.py``): both need steps per second and peak device memory of exactly the
step ``train.run`` would execute, without building the task's data set. Every token is real
(no padding), the worst case the LRA speed protocol times.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import numpy as np
from jaxtyping import Bool, Float, Int

from xformers_zoo.configs import ExperimentConfig
from xformers_zoo.data.sources import effective_length
from xformers_zoo.task_specs import TASKS


def synthetic_batch(config: ExperimentConfig, batch_size: int, seed: int = 0
                    ) -> dict[str, np.ndarray]:
    """A batch as ``data.train_dataset`` yields it: ``inputs`` int32 [b, L] ([b, 2, L] for
    two-input tasks), ``mask`` bool of the same shape (all true), ``label`` int32 [b] and
    ``weight`` float32 [b] (all one), with random tokens and labels."""
    task = TASKS.get(config.data.task)
    rng = np.random.default_rng(seed)
    shape = (batch_size, 2, effective_length(config.data)) if task.two_inputs else (
        batch_size, effective_length(config.data))
    inputs: Int[np.ndarray, "b ..."] = rng.integers(1, task.vocab_size, shape, dtype=np.int32)
    mask: Bool[np.ndarray, "b ..."] = np.ones(shape, bool)
    label: Int[np.ndarray, " b"] = rng.integers(0, task.num_classes, batch_size, dtype=np.int32)
    weight: Float[np.ndarray, " b"] = np.ones(batch_size, np.float32)
    return {"inputs": inputs, "mask": mask, "label": label, "weight": weight}


def is_out_of_memory(error: BaseException) -> bool:
    """Whether a JAX runtime error reports device memory exhausted."""
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text


def time_training_steps(config: ExperimentConfig, steps: int, warmup: int = 2,
                        min_seconds: float = 0.0, eval_batches: int = 0,
                        before_timing=None) -> dict[str, Any]:
    """Compiles the trainer's train step for ``config`` (``loop._Setup``: model, optimizer,
    sharding and grad accumulation as in a run), runs ``warmup`` steps, then times at least
    ``steps`` steps (and ``min_seconds``). ``eval_batches`` > 0 also times the eval step.
    ``before_timing()`` runs once after warm-up (e.g. to wait for other processes).

    Returns steps_per_sec, seconds_per_eval_batch (if timed), compile_s, peak_bytes (device
    statistics, None on CPU), compiled_bytes (XLA's memory analysis of the step: arguments,
    outputs and temporaries; available on every backend), params and the device."""
    from xformers_zoo.train.loop import _peak_memory, _Setup
    from xformers_zoo.train.sharding import shard_batch

    start = time.perf_counter()
    setup = _Setup(config)
    batch = shard_batch(synthetic_batch(config, setup.local_batch), setup.mesh)
    compiled = setup.train_step.lower(setup.state, batch).compile()
    analysis = compiled.memory_analysis()
    compiled_bytes = None if analysis is None else int(
        analysis.argument_size_in_bytes + analysis.output_size_in_bytes
        + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes)
    state = setup.state
    for _ in range(warmup):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start
    if before_timing is not None:
        before_timing()
    count, start = 0, time.perf_counter()
    while count < steps or time.perf_counter() - start < min_seconds:
        state, metrics = compiled(state, batch)
        count += 1
    jax.block_until_ready((state, metrics))
    result = {"steps_per_sec": count / (time.perf_counter() - start), "timed_steps": count,
              "compile_s": compile_s, "params": setup.num_params,
              "device_kind": jax.devices()[0].device_kind, "backend": jax.default_backend(),
              "jax_version": jax.__version__}
    if eval_batches:
        jax.block_until_ready(setup.eval_step(state, batch))  # compiles
        start = time.perf_counter()
        jax.block_until_ready([setup.eval_step(state, batch) for _ in range(eval_batches)])
        result["seconds_per_eval_batch"] = (time.perf_counter() - start) / eval_batches
    result["peak_bytes"] = _peak_memory()  # None where the backend keeps no statistics (CPU)
    result["compiled_bytes"] = compiled_bytes
    return result
