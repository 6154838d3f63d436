"""The trainer: one loop for every task and variant.

``run(config, workdir)`` trains with periodic validation, writes checkpoints (latest and best),
resumes from ``workdir`` when it holds a run of the same config (a fresh run may start from
another run's weights, ``train.init_from``), stops on a non-finite loss with the last good
checkpoint intact, and scores the test split on the best-validation checkpoint.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from xformers_zoo import data
from xformers_zoo import overrides as cfglib
from xformers_zoo.api import build_model, count_params
from xformers_zoo.configs import ExperimentConfig, load_config, load_run_config
from xformers_zoo.data.sources import effective_length
from xformers_zoo.fs import check_writable_dir, write_text_atomic
from xformers_zoo.task_specs import TASKS
from xformers_zoo.train.checkpoint import RunCheckpoints
from xformers_zoo.train.distributed import is_primary
from xformers_zoo.train.metrics import MetricsLog
from xformers_zoo.train.objectives import make_objective
from xformers_zoo.train.optim import make_optimizer, make_schedule
from xformers_zoo.train.sharding import (
    data_mesh,
    local_batch_size,
    replicate,
    sequence_parallel_model,
    shard_batch,
    under_mesh,
)
from xformers_zoo.train.steps import TrainState, compile_steps, init_state
from xformers_zoo.train.warm_start import warm_start
from xformers_zoo.variants import VARIANTS

log = logging.getLogger("xformers_zoo.train")

# Fields a rerun may change without making the saved run a different experiment.
RESUMABLE_FIELDS = {"train.steps", "train.log_every", "train.eval_every", "train.eval_batches",
                    "train.checkpoint_every", "data.data_dir", "data.workers", "data.manual_dir",
                    "data.loader_workers"}


class TrainingDivergedError(RuntimeError):
    """The loss or gradient became NaN or Inf; the last good checkpoint is kept."""


class RunDirectoryMismatchError(ValueError):
    """The run directory holds a run of a different config."""


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_run_dir(config: ExperimentConfig, workdir: Path) -> None:
    """Saves the config in a new run directory (process 0 writes it), or checks it against the
    saved one."""
    if not compare_run_config(config, workdir) and is_primary():
        workdir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(workdir / "config.json",
                          json.dumps(cfglib.to_dict(config), indent=2) + "\n")


def compare_run_config(config: ExperimentConfig, workdir: Path) -> bool:
    """Whether ``workdir`` already holds a run of ``config`` (False: it holds no run); raises
    ``RunDirectoryMismatchError`` if it holds a run of another config. Writes nothing."""
    path = workdir / "config.json"
    if not path.exists():
        return False
    given = cfglib.to_dict(config)
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RunDirectoryMismatchError(f"{path} is not valid JSON ({e}); use a new --workdir "
                                        "or remove the file") from None
    saved = _flatten(json.loads(json.dumps(_with_defaults(raw))))
    new = _flatten(json.loads(json.dumps(given)))
    resumable = set(RESUMABLE_FIELDS)
    if saved.get("train.schedule") == "cosine":
        resumable.discard("train.steps")  # the cosine decay ends at train.steps
    diff = [f"{k}: saved {saved.get(k)!r}, given {new.get(k)!r}"
            for k in sorted(set(saved) | set(new))
            if k not in resumable and saved.get(k) != new.get(k)]
    if diff:
        raise RunDirectoryMismatchError(
            f"{workdir} holds a run of a different config ({'; '.join(diff)}); use a new "
            f"--workdir, or only change {', '.join(sorted(resumable))} to resume")
    return True


def _with_defaults(raw: dict[str, Any]) -> dict[str, Any]:
    """A saved config with the fields added since it was saved at their defaults (which is
    what that run used), so that adding a field does not make old runs unresumable; as saved
    when it cannot be loaded (the comparison then names what differs)."""
    try:
        return cfglib.to_dict(load_config(raw))
    except (ValueError, TypeError):
        return raw


def evaluate(eval_step, state, config: ExperimentConfig, split: str, mesh,
             max_batches: int | None = None) -> dict[str, float]:
    """Loss and accuracy of ``state`` over ``split`` (every example once, or those of the first
    ``max_batches`` global batches), and the majority-class rate of the examples scored."""
    batch_size = config.train.batch_size
    local_batch_size(batch_size, mesh)  # splits over the devices, or a clear error
    pending = [eval_step(state, shard_batch(batch, mesh))
               for batch in data.eval_batches(config.data, split, batch_size, max_batches)]
    sums = jax.tree.map(lambda *xs: np.sum(xs, axis=0), *jax.device_get(pending))
    count = max(float(sums["count"]), 1.0)
    return {"loss": float(sums["loss_sum"]) / count, "accuracy": float(sums["correct"]) / count,
            "examples": int(sums["count"]),
            "majority_rate": float(np.max(sums["class_counts"])) / count}


def prepare_data(config: ExperimentConfig) -> None:
    """Builds the run's data set (reused once built). With several processes the first builds
    it before the others look, so that hosts sharing a data directory never build it at once
    (a host with its own directory then builds its own copy, the same examples)."""
    if is_primary():
        data.prepare(config.data)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("data prepared")
        if not is_primary():
            data.prepare(config.data)


def _peak_memory() -> int | None:
    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


class _Setup:
    """Model, optimizer, compiled steps and placed state of one run."""

    def __init__(self, config: ExperimentConfig):
        self.config = config
        max_length = effective_length(config.data)
        model_config = sequence_parallel_model(config.model, config.train.sequence_parallel,
                                               max_length)
        self.mesh = data_mesh(sequence_parallel=config.train.sequence_parallel)
        self.local_batch = local_batch_size(config.train.batch_size, self.mesh,
                                            config.train.grad_accum)
        model = build_model(model_config, config.data.task, max_length=max_length,
                            seed=config.train.seed, objective=config.train.objective)
        self.num_params = count_params(model)
        self.schedule = make_schedule(config.train)
        tx = make_optimizer(config.train, self.schedule)
        self.graphdef, state = init_state(model, tx, config.train.seed)
        self.state = replicate(state, self.mesh)
        objective = make_objective(config.train.objective, TASKS.get(config.data.task),
                                   mask_rate=config.train.mask_rate,
                                   mask_span=config.train.mask_span)
        train_step, eval_step = compile_steps(self.graphdef, tx, self.schedule,
                                              config.train.grad_accum, objective)
        self.train_step = under_mesh(train_step, self.mesh)
        self.eval_step = under_mesh(eval_step, self.mesh)
        self.variant = VARIANTS.get(config.model.variant)
        self.refresh_every = self.variant.refresh_interval(config.model.attention)

    def refresh(self, state: TrainState, step: int) -> TrainState:
        """Lets the variant update its non-trainable state (e.g. redraw random features) at
        the steps its config asks for; the key depends on the seed and step only."""
        if not self.refresh_every or step % self.refresh_every:
            return state
        model = nnx.merge(self.graphdef, state.params, state.rest)
        key = jax.random.fold_in(jax.random.key(self.config.train.seed + 1), step)
        self.variant.refresh(model, key)
        _, _, rest = nnx.split(model, nnx.Param, ...)
        return state._replace(rest=replicate(rest, self.mesh))


def run(config: ExperimentConfig, workdir: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """Trains ``config`` in ``workdir`` (resuming if it holds a checkpoint of the same config,
    else starting from the weights of run ``train.init_from`` when set) and returns the final
    metrics, also written to ``workdir/final.json``."""
    # Everything that can be found wrong is checked before the run claims its directory (writes
    # config.json), so that the corrected command is not refused as a different config.
    workdir = check_writable_dir(workdir, "the run directory (--workdir)")
    tc = config.train
    compare_run_config(config, workdir)
    setup = _Setup(config)
    state = setup.state
    checkpoints = RunCheckpoints(workdir)
    try:
        if tc.init_from is not None and checkpoints.latest_step() is None:
            # A source run that does not fit fails in seconds, before the data is built.
            state = warm_start(state, setup.graphdef, tc.init_from, setup.mesh)
        prepare_data(config)
        check_run_dir(config, workdir)
        restored = checkpoints.restore_latest(state, repair=True)
    except BaseException:
        checkpoints.close()
        raise
    best = {"accuracy": -1.0, "step": None}
    iterator = iter(data.train_dataset(config.data, tc.batch_size, seed=tc.seed))
    if restored is not None:
        state, data_state, meta = restored
        iterator.set_state(data_state)
        best = meta["best"]
        log.info("resumed %s at step %d", workdir, int(state.step))
    metrics_log = MetricsLog(workdir / "metrics.jsonl",
                             resume_step=int(state.step) if restored else None,
                             active=is_primary())
    step = int(state.step)
    pending: list[dict[str, jax.Array]] = []
    window_start, rates, compiled = time.perf_counter(), [], False
    last_good = checkpoints.latest_step()

    def flush(step: int) -> None:
        """Checks and logs the metrics of the steps since the last flush."""
        nonlocal window_start, compiled
        if not pending:
            return
        fetched = jax.device_get(pending)
        n = len(fetched)
        pending.clear()
        bad = [m for m in fetched if not m["finite"]]
        if bad:
            kept = ("There is no checkpoint yet." if last_good is None else
                    f"The last good checkpoint is step {last_good} in {workdir / 'checkpoints'}.")
            raise TrainingDivergedError(
                f"loss became {float(bad[0]['loss'])} (grad norm {float(bad[0]['grad_norm'])}) "
                f"by step {step}; stopped. {kept} Lower train.lr or set train.grad_clip.")
        elapsed = time.perf_counter() - window_start
        window_start = time.perf_counter()
        if compiled:  # this process's first window holds compilation
            rates.append(n / elapsed)
        compiled = True
        count = sum(float(m["count"]) for m in fetched)
        record = {"loss": sum(float(m["loss_sum"]) for m in fetched) / count,
                  "accuracy": sum(float(m["correct"]) for m in fetched) / count,
                  "lr": float(fetched[-1]["lr"]), "grad_norm": float(fetched[-1]["grad_norm"]),
                  "steps_per_sec": n / elapsed}
        metrics_log.write("train", step, **record)
        bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['accuracy']:.3f}")

    bar = tqdm(total=tc.steps, initial=step, disable=not (progress and is_primary()),
               desc=config.data.task, dynamic_ncols=True)
    try:
        while step < tc.steps:
            state, metrics = setup.train_step(state, shard_batch(next(iterator), setup.mesh))
            pending.append(metrics)
            step += 1
            state = setup.refresh(state, step)
            bar.update(1)
            is_eval = step % tc.eval_every == 0 or step == tc.steps
            is_save = is_eval or step % tc.checkpoint_every == 0
            if step % tc.log_every == 0 or is_save:
                flush(step)
            if is_eval:
                val = evaluate(setup.eval_step, state, config, "validation", setup.mesh,
                               tc.eval_batches)
                metrics_log.write("validation", step, **val)
                improved = val["accuracy"] > best["accuracy"]
                if improved:
                    best = {"accuracy": val["accuracy"], "step": step}
                window_start = time.perf_counter()
            if is_save:
                checkpoints.save(state, iterator.get_state(), best,
                                 best=is_eval and improved)
                last_good = step
                window_start = time.perf_counter()
        result = _finish(setup, checkpoints, state, config, metrics_log, best, rates)
    finally:
        bar.close()
        metrics_log.close()
        checkpoints.close()
    if is_primary():
        write_text_atomic(workdir / "final.json", json.dumps(result, indent=2) + "\n")
    return result


def _finish(setup: _Setup, checkpoints: RunCheckpoints, state, config: ExperimentConfig,
            metrics_log: MetricsLog, best: dict, rates: list[float]) -> dict[str, Any]:
    # Exactly the step the run recorded as best; a missing or damaged one raises, naming it.
    scored = checkpoints.restore_best(state, best["step"])[0]
    test = evaluate(setup.eval_step, scored, config, "test", setup.mesh)
    metrics_log.write("test", int(state.step), **test, checkpoint_step=int(scored.step))
    # Accuracies are of the objective: labels, or masked tokens for self-pretraining.
    return {
        "task": config.data.task, "variant": config.model.variant, "steps": int(state.step),
        "objective": config.train.objective,
        "test_accuracy": test["accuracy"], "test_loss": test["loss"],
        "test_examples": test["examples"], "majority_rate": test["majority_rate"],
        "best_step": best["step"], "best_val_accuracy": best["accuracy"],
        "steps_per_sec": float(np.median(rates)) if rates else None,
        "peak_memory_bytes": _peak_memory(), "params": setup.num_params,
        "devices": setup.mesh.devices.size, "mesh": dict(setup.mesh.shape),
        "processes": jax.process_count(),
        "device_kind": jax.devices()[0].device_kind,
        "jax_version": jax.__version__,
    }


def evaluate_run(workdir: str | Path, split: str = "test", checkpoint: str = "best",
                 data_dir: str | None = None) -> dict[str, float]:
    """Scores a run directory's ``best`` or ``latest`` checkpoint on ``split``."""
    workdir = Path(workdir)
    config = load_run_config(workdir)
    if data_dir is not None:
        config = cfglib.replace(config, {"data.data_dir": data_dir})
    setup = _Setup(config)
    checkpoints = RunCheckpoints(workdir)
    try:
        if checkpoint not in ("best", "latest"):
            raise ValueError(f"checkpoint must be 'best' or 'latest', got {checkpoint!r}")
        restore = checkpoints.restore_best if checkpoint == "best" else checkpoints.restore_latest
        restored = restore(setup.state)
        if restored is None:
            raise FileNotFoundError(f"{workdir} has no {checkpoint} checkpoint yet")
        result = evaluate(setup.eval_step, restored[0], config, split, setup.mesh)
        return {**result, "step": int(restored[0].step), "split": split}
    finally:
        checkpoints.close()
