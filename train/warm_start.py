"""Warm-starting a run from another run's weights (``train.init_from``).

The source run's model is rebuilt from its saved config, its best (else latest) checkpoint is
restored, and its parameters move by key path into the new model. A learned 2-D position grid
may grow by whole factors on the way: FlashAttention trains Path-X from a Path-64 model this
way, with the positional embeddings spatially upsampled (Dao et al. 2022, section 4).

A run self-pretrained by masked-token denoising (``train.objective=masked``; Amos et al. 2024)
gives a classifier its encoder and embeddings: the masked-token head is dropped, the classifier
head starts fresh, and the embedding's last row (the mask token) is left behind.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from xformers_zoo.api import build_model
from xformers_zoo.configs import load_run_config
from xformers_zoo.data.sources import effective_length
from xformers_zoo.layers.embeddings import LearnedPositions2D, upsample_grid
from xformers_zoo.models.classifier import Classifier
from xformers_zoo.task_specs import TaskSpec
from xformers_zoo.train.checkpoint import RunCheckpoints
from xformers_zoo.train.optim import make_optimizer
from xformers_zoo.train.sharding import replicate
from xformers_zoo.train.steps import TrainState, init_state

log = logging.getLogger("xformers_zoo.train")

# Model fields that must agree. Most would also show as a shape or path difference, but
# num_heads, reversible and variant change what the same weights compute without changing them.
ARCHITECTURE_FIELDS = ("variant", "num_layers", "num_heads", "emb_dim", "qkv_dim", "mlp_dim",
                       "pooling", "positional", "reversible")
ACCEPTED = ("Accepted: the same architecture (model." + ", model.".join(ARCHITECTURE_FIELDS)
            + ", the variant's parameter shapes, the task's vocabulary and classes); only 2-D "
            "learned positions (model.positional=learned_2d) may differ, growing by whole "
            "factors to a larger image; and a masked-pretrained source (train.objective=masked) "
            "gives its embeddings less the mask-token row, its head being replaced.")
MAX_LISTED = 12  # a layer-count mismatch lists every parameter of the extra layers


class WarmStartError(ValueError):
    """The source run's parameters cannot initialise this model."""


@dataclasses.dataclass(frozen=True)
class Transfer:
    """The new model's parameters and what happened to each: ``copied`` paths, ``upsampled``
    and ``trimmed`` (the mask-token row dropped) paths with their old and new shapes, ``fresh``
    paths kept at this model's initialisation (a head of another objective) and ``dropped``
    source paths (the source's head of another objective)."""

    params: nnx.State
    copied: list[str]
    upsampled: list[str]
    trimmed: list[str] = dataclasses.field(default_factory=list)
    fresh: list[str] = dataclasses.field(default_factory=list)
    dropped: list[str] = dataclasses.field(default_factory=list)


def _name(path: tuple) -> str:
    return ".".join(str(part) for part in path)


def _differing_fields(source: Classifier, target: Classifier) -> list[tuple[str, Any, Any]]:
    """(field, source value, this run's value) of each architecture field that differs."""
    return [(f, getattr(source.config, f), getattr(target.config, f))
            for f in ARCHITECTURE_FIELDS if getattr(source.config, f) != getattr(target.config, f)]


def _task_problem(source: TaskSpec, target: TaskSpec) -> list[str]:
    """A line when the tasks differ in vocabulary or class count (embedding and head shapes)."""
    if (source.vocab_size, source.num_classes) == (target.vocab_size, target.num_classes):
        return []
    return [f"task: source {source.name} (vocabulary {source.vocab_size}, {source.num_classes} "
            f"classes), this run {target.name} (vocabulary {target.vocab_size}, "
            f"{target.num_classes} classes)"]


def _grows(old: tuple[int, ...], new: tuple[int, ...]) -> bool:
    """Whether grid ``[h, w, dim]`` upsamples to ``new`` (same dim, whole factors)."""
    return (len(old) == len(new) == 3 and old[2] == new[2]
            and new[0] % old[0] == 0 and new[1] % old[1] == 0)


def _drops_mask_row(source: Classifier, target: Classifier, path: tuple,
                    old: tuple[int, ...], new: tuple[int, ...]) -> bool:
    """Whether ``path`` is the embedding of a masked-pretrained source, one mask-token row
    longer than the embedding of a ``target`` without one."""
    return (path == ("embed", "embedding") and source.objective == "masked"
            and target.objective != "masked" and old == (new[0] + 1, *new[1:]))


def transfer_params(source: Classifier, target: Classifier, *,
                    source_name: str = "the source model") -> Transfer:
    """``target``'s parameters (an ``nnx.State`` of ``nnx.Param``) taken from ``source`` by key
    path: equal shapes are copied; a ``LearnedPositions2D`` grid of ``target`` larger by whole
    factors receives the source grid repeated (``upsample_grid``). When the two were built for
    different objectives, the source's head is dropped and the target's kept as initialised,
    and a masked-pretrained embedding loses its mask-token row. Any other difference raises
    ``WarmStartError`` listing each offending field or path with both sides.
    """
    src = dict(nnx.to_flat_state(nnx.state(source, nnx.Param)))
    dst = nnx.to_flat_state(nnx.state(target, nnx.Param))
    # Heads belong to their objective: one trained for another objective is not transferred.
    own_heads = ({source.head_name}, {target.head_name}) if source.head_name != target.head_name \
        else (set(), set())
    grids = {path + ("table",) for path, module in nnx.iter_graph(target)
             if isinstance(module, LearnedPositions2D)}
    fields = _differing_fields(source, target)
    problems = [f"model.{f}: source {a!r}, this run {b!r}" for f, a, b in fields]
    problems += _task_problem(source.task, target.task)
    moved, copied, upsampled, trimmed, fresh = [], [], [], [], []
    for path, variable in dst:
        new = variable[...]
        if path[0] in own_heads[1]:
            fresh.append(_name(path))
            moved.append((path, variable))
            continue
        if path not in src:
            problems.append(f"{_name(path)}: missing in the source, this run {new.shape}")
            continue
        old = src[path][...]
        if old.shape == new.shape:
            value = old
            copied.append(_name(path))
        elif path in grids and _grows(old.shape, new.shape):
            value = upsample_grid(old, *new.shape[:2])
            upsampled.append(f"{_name(path)} {old.shape} -> {new.shape}")
        elif _drops_mask_row(source, target, path, old.shape, new.shape):
            value = old[:-1]
            trimmed.append(f"{_name(path)} {old.shape} -> {new.shape}")
        else:
            problems.append(f"{_name(path)}: source {old.shape}, this run {new.shape}")
            continue
        moved.append((path, variable.replace(value.astype(new.dtype))))
    dropped = sorted((p for p in src if p[0] in own_heads[0]), key=_name)
    problems += [f"{_name(path)}: source {src[path][...].shape}, missing in this run"
                 for path in sorted(src.keys() - dict(dst).keys() - set(dropped), key=_name)]
    if problems:
        listed = problems[:MAX_LISTED] + (
            [f"... and {len(problems) - MAX_LISTED} more"] if len(problems) > MAX_LISTED else [])
        overrides = " ".join(f"model.{f}={a}" for f, a, _ in fields)
        match = (f"\nThis run takes the source's architecture with: {overrides} (or train the "
                 "source with this run's values)." if overrides else "")
        raise WarmStartError(f"{source_name} cannot initialise this model:\n  "
                             + "\n  ".join(listed) + "\n" + ACCEPTED + match)
    return Transfer(nnx.from_flat_state(moved), copied, upsampled, trimmed, fresh,
                    [_name(p) for p in dropped])


def load_run_model(run_dir: str | Path) -> tuple[Classifier, int, str]:
    """(model, step, "best" or "latest"): a run directory's model, built from its saved
    ``config.json`` with the parameters of its best checkpoint, else its latest."""
    config = load_run_config(run_dir)
    model = build_model(config.model, config.data.task, max_length=effective_length(config.data),
                        seed=config.train.seed, objective=config.train.objective)
    # Orbax restores a whole TrainState, so the target needs the source's optimizer state too.
    _, state = init_state(model, make_optimizer(config.train), config.train.seed)
    checkpoints = RunCheckpoints(run_dir)
    try:
        restored, which = checkpoints.restore_best(state), "best"
        if restored is None:
            restored, which = checkpoints.restore_latest(state), "latest"
        if restored is None:
            raise FileNotFoundError(f"{run_dir} has no checkpoint (neither best/ nor "
                                    "checkpoints/); train it before starting from it")
    finally:
        checkpoints.close()
    nnx.update(model, restored[0].params)
    return model, int(restored[0].step), which


def warm_start(state: TrainState, graphdef: nnx.GraphDef, init_from: str | Path,
               mesh: jax.sharding.Mesh) -> TrainState:
    """``state`` of a fresh run with its parameters taken from the run in ``init_from``.

    The non-trainable state stays this model's own, and so do the optimizer state (Adam's
    moments are zeros of the parameter shapes, which the transfer keeps), step and rng key.
    """
    source, step, which = load_run_model(init_from)
    target = nnx.merge(graphdef, state.params, state.rest)
    moved = transfer_params(source, target, source_name=f"{init_from} (train.init_from)")
    log.info("initialised from %s, %s checkpoint at step %d: %d tensors copied, upsampled: %s; "
             "mask-token row dropped: %s; head started fresh: %d tensors, source head dropped: "
             "%d tensors", init_from, which, step, len(moved.copied),
             "; ".join(moved.upsampled) or "none", "; ".join(moved.trimmed) or "none",
             len(moved.fresh), len(moved.dropped))
    return state._replace(params=replicate(moved.params, mesh))
