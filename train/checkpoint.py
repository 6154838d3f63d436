"""Orbax checkpoints of a run: model, optimizer, rng and data-iterator state written together
and atomically (orbax writes to a temporary folder and renames it when complete).

Two managers: ``checkpoints/`` keeps the latest few for resuming, ``best/`` keeps the one with
the best validation accuracy for scoring the test split.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from xformers_zoo.train.steps import TrainState


def _manager(directory: Path, keep: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=False,
        cleanup_tmp_directories=True)
    return ocp.CheckpointManager(directory.absolute(), options=options,
                                 item_names=("state", "data", "meta"))


class RunCheckpoints:
    """The latest and best checkpoints of one run directory."""

    def __init__(self, workdir: str | Path, keep: int = 2):
        workdir = Path(workdir)
        self.latest = _manager(workdir / "checkpoints", keep)
        self.best = _manager(workdir / "best", 1)

    @staticmethod
    def _args(state: TrainState, data_state: dict[str, Any], meta: dict[str, Any]):
        host_state = jax.tree.map(np.asarray, state)
        return ocp.args.Composite(state=ocp.args.StandardSave(host_state),
                                  data=ocp.args.JsonSave(data_state),
                                  meta=ocp.args.JsonSave(meta))

    def save(self, state: TrainState, data_state: dict[str, Any], meta: dict[str, Any], *,
             best: bool = False) -> None:
        """Writes the latest checkpoint (and the best one when ``best``) at ``state.step``."""
        step = int(state.step)
        args = self._args(state, data_state, meta)
        if self.latest.latest_step() != step:
            self.latest.save(step, args=args, force=True)
        if best:
            self.best.save(step, args=args, force=True)
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

    @staticmethod
    def _restore(manager: ocp.CheckpointManager, target: TrainState, step: int | None = None):
        step = manager.latest_step() if step is None else step
        if step is None:
            return None
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore()))
        state = jax.tree.map(lambda t, r: jax.device_put(r, t.sharding) if hasattr(
            t, "sharding") else r, target, restored["state"])
        return TrainState(*state), restored["data"], restored["meta"]

    def restore_latest(self, target: TrainState):
        """(state, data_state, meta) of the latest checkpoint, or None if there is none."""
        return self._restore(self.latest, target)

    def restore_best(self, target: TrainState):
        """(state, data_state, meta) of the best-validation checkpoint, or None."""
        return self._restore(self.best, target)

    def latest_step(self) -> int | None:
        """Step of the latest checkpoint, or None."""
        return self.latest.latest_step()

    def close(self) -> None:
        """Waits for writes and releases the managers."""
        self.latest.close()
        self.best.close()
