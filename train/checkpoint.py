"""Orbax checkpoints of a run: model, optimizer, rng and data-iterator state written together
and atomically (orbax writes to a temporary folder and renames it when complete).

Two managers: ``checkpoints/`` keeps the latest few for resuming, ``best/`` keeps the
best-validation checkpoints that they record, for scoring the test split.

The order of writes keeps the pair consistent whatever point a kill lands on: a new best
checkpoint is written first, then the latest checkpoint that records it, and only then are best
checkpoints that no kept latest checkpoint records removed. A resumed run therefore always finds
the best checkpoint its latest one names; best checkpoints written after it (by a run killed
before it recorded them) are removed and written again when training reaches them.

Every checkpoint carries a digest of its arrays and data-iterator state: a restore checks it,
so damaged array data is caught even where the file format would decode it. A latest
checkpoint that cannot be read is named, set aside under ``corrupt/`` and the next older one is
used.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from xformers_zoo.train.steps import TrainState

log = logging.getLogger("xformers_zoo.train")

# Called as ``fault_hook(phase, step)`` at each phase of a save ("best:before", "best:after",
# "latest:before", "latest:after", "prune:after"); fault-injection tests stop the process there.
fault_hook: Callable[[str, int], None] | None = None


class CheckpointError(ValueError):
    """A checkpoint that cannot be read back, or whose content does not match its digest."""


def _phase(name: str, step: int) -> None:
    if fault_hook is not None:
        fault_hook(name, step)


def _manager(directory: Path, keep: int | None) -> ocp.CheckpointManager:
    # create=False: reading a run (eval, init_from) leaves no empty folders; a save creates it.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=False, enable_async_checkpointing=False,
        cleanup_tmp_directories=True)
    return ocp.CheckpointManager(directory.absolute(), options=options,
                                 item_names=("state", "data", "meta"))


def state_digest(host_state: Any, data_state: dict[str, Any]) -> str:
    """SHA-256 of every array (dtype, shape and bytes, in tree order) and the iterator state."""
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(host_state):
        array = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(array.tobytes())
    digest.update(json.dumps(data_state, sort_keys=True).encode())
    return digest.hexdigest()


@contextlib.contextmanager
def _unraisable_dropped() -> Iterator[None]:
    """Drops the "Exception ignored in <coroutine>" reports of orbax's concurrent array reads
    while a restore runs: when one array of a damaged checkpoint fails, the reads of the others
    are abandoned and each would print its own hundred-line report."""
    hook = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: None
    try:
        yield
    finally:
        sys.unraisablehook = hook


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200] if text else ''}"


class RunCheckpoints:
    """The latest and best checkpoints of one run directory."""

    def __init__(self, workdir: str | Path, keep: int = 2):
        self.workdir = Path(workdir)
        self.latest = _manager(self.workdir / "checkpoints", keep)
        # Pruned by this class to the steps the kept latest checkpoints record.
        self.best = _manager(self.workdir / "best", None)

    def save(self, state: TrainState, data_state: dict[str, Any], best_record: dict[str, Any],
             *, best: bool = False) -> None:
        """Writes the checkpoint of ``state.step`` to ``best/`` (when ``best``), then to
        ``checkpoints/`` recording ``best_record`` (the best step and its accuracy)."""
        step = int(state.step)
        host_state = jax.tree.map(np.asarray, state)
        meta = {"best": best_record, "digest": state_digest(host_state, data_state)}
        args = ocp.args.Composite(state=ocp.args.StandardSave(host_state),
                                  data=ocp.args.JsonSave(data_state),
                                  meta=ocp.args.JsonSave(meta))
        if best:
            self._write(self.best, "best", step, args)
        self._write(self.latest, "latest", step, args)
        self._prune_best()
        _phase("prune:after", step)

    @staticmethod
    def _write(manager: ocp.CheckpointManager, kind: str, step: int, args) -> None:
        _phase(f"{kind}:before", step)
        if step in manager.all_steps():  # left by a run killed before it was recorded
            manager.delete(step)
        manager.save(step, args=args, force=True)
        manager.wait_until_finished()
        _phase(f"{kind}:after", step)

    def _item(self, manager: ocp.CheckpointManager, step: int, item: str, args) -> Any:
        with _unraisable_dropped():
            try:
                return manager.restore(step, args=ocp.args.Composite(**{item: args}))[item]
            except Exception as e:  # orbax and tensorstore raise many types for damaged files
                reason = _first_line(e)
            # The error (and with it the abandoned reads) is released here: collect them while
            # their reports are dropped.
            gc.collect()
        raise CheckpointError(f"{manager.directory / str(step) / item} is unreadable ({reason})")

    def _meta(self, manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
        meta = self._item(manager, step, "meta", ocp.args.JsonRestore())
        if not isinstance(meta, dict) or not isinstance(meta.get("best"), dict):
            raise CheckpointError(f"{manager.directory / str(step) / 'meta'} does not hold the "
                                  "best-step record")
        return meta

    def _restore(self, manager: ocp.CheckpointManager, step: int, target: TrainState):
        """(state, data_state, meta) of ``step``, checked against its digest."""
        meta = self._meta(manager, step)
        data_state = self._item(manager, step, "data", ocp.args.JsonRestore())
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        restored = self._item(manager, step, "state", ocp.args.StandardRestore(abstract))
        # Checkpoints written before digests were recorded are read unchecked.
        if "digest" in meta and state_digest(restored, data_state) != meta["digest"]:
            where = manager.directory / str(step)
            raise CheckpointError(f"{where / 'state'} (or {where / 'data'}) does not match the "
                                  f"digest recorded in {where / 'meta'}: damaged data")
        state = jax.tree.map(lambda t, r: jax.device_put(r, t.sharding) if hasattr(
            t, "sharding") else r, target, restored)
        return TrainState(*state), data_state, meta

    def _set_aside(self, manager: ocp.CheckpointManager, step: int) -> Path:
        destination = self.workdir / "corrupt" / f"{manager.directory.name}-{step}"
        # One process moves the files; every process fails to read them alike and falls back.
        if jax.process_index() == 0:
            if destination.exists():
                shutil.rmtree(destination)
            destination.parent.mkdir(exist_ok=True)
            shutil.move(str(manager.directory / str(step)), destination)
        manager.reload()
        return destination

    def _referenced_best(self) -> set[int] | None:
        """Best steps recorded by the kept latest checkpoints (None if one is unreadable)."""
        steps = set()
        for step in self.latest.all_steps():
            try:
                best = self._meta(self.latest, step)["best"]
            except CheckpointError:
                return None
            if best.get("step") is not None:
                steps.add(int(best["step"]))
        return steps

    def _prune_best(self) -> None:
        keep = self._referenced_best()
        if keep is None:
            return
        for step in self.best.all_steps():
            if step not in keep:
                self.best.delete(step)

    def restore_latest(self, target: TrainState, *, repair: bool = False):
        """(state, data_state, meta) of the newest readable latest checkpoint, or None if there
        is none. An unreadable one is named in a warning and the next older one used; with
        ``repair`` (a run resuming) it is moved to ``corrupt/`` and best checkpoints that no
        kept latest checkpoint records are removed."""
        restored, skipped = None, False
        for step in sorted(self.latest.all_steps(), reverse=True):
            try:
                restored = self._restore(self.latest, step, target)
                break
            except CheckpointError as e:
                skipped = True
                moved = f"; moved it to {self._set_aside(self.latest, step)}" if repair else ""
                log.warning("%s%s", e, moved)
        if skipped:
            log.warning("falling back to %s", "no checkpoint (starting afresh)" if restored is None
                        else f"the newest good checkpoint, step {int(restored[0].step)}")
        if repair:
            self._prune_best()
            recorded = None if restored is None else restored[2]["best"].get("step")
            if recorded is not None and recorded not in self.best.all_steps():
                raise CheckpointError(
                    f"{self.latest.directory / str(int(restored[0].step))} records the best "
                    f"step {recorded}, which {self.best.directory} lacks; the run cannot score "
                    "its test split on it: start it again in a new run directory")
        return restored

    def recorded_best_step(self) -> int | None:
        """The best step recorded by the newest readable latest checkpoint (else the newest in
        ``best/``), or None."""
        for step in sorted(self.latest.all_steps(), reverse=True):
            try:
                return self._meta(self.latest, step)["best"].get("step")
            except CheckpointError as e:
                log.warning("%s; reading the next older checkpoint", e)
        return self.best.latest_step()

    def restore_best(self, target: TrainState, step: int | None = None):
        """(state, data_state, meta) of the best checkpoint of ``step`` (default: the one the
        latest checkpoint records), or None if there is none; an unreadable one raises
        ``CheckpointError`` naming it."""
        step = self.recorded_best_step() if step is None else step
        if step is None:
            return None
        if step not in self.best.all_steps():
            raise CheckpointError(f"{self.best.directory} has no checkpoint of step {step}")
        return self._restore(self.best, step, target)

    def latest_step(self) -> int | None:
        """Step of the latest checkpoint, or None."""
        return self.latest.latest_step()

    def close(self) -> None:
        """Waits for writes and releases the managers."""
        self.latest.close()
        self.best.close()
