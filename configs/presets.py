"""Presets: named sets of dotted overrides composed onto a task's base config.

A preset is a function ``(variant, task) -> {dotted field: value}`` so that one preset serves
every task and variant (``tiny`` shrinks whatever it is given; ``lra`` applies each variant's
public-LRA defaults from its registration).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from xformers_zoo.registry import Registry
from xformers_zoo.task_specs import TASKS
from xformers_zoo.variants import VARIANTS

Preset = Callable[[str, str], Mapping[str, Any]]
PRESETS: Registry[Preset] = Registry("preset")


@PRESETS.decorator("tiny")
def tiny(variant: str, task: str) -> dict[str, Any]:
    """A model and data set small enough to train on a laptop CPU in a few minutes: 2 layers of
    width 64; sequence tasks shortened to 128 tokens; a few thousand examples."""
    del variant
    overrides: dict[str, Any] = {
        "model.num_layers": 2, "model.num_heads": 4, "model.emb_dim": 64, "model.qkv_dim": 64,
        "model.mlp_dim": 128, "model.dropout": 0.0, "model.attention_dropout": 0.0,
        "model.dtype": "float32",
        "train.batch_size": 32, "train.steps": 1500, "train.lr": 0.05, "train.schedule": "rsqrt",
        "train.warmup_steps": 200, "train.weight_decay": 0.01, "train.eval_every": 250,
        "train.checkpoint_every": 250, "train.log_every": 50,
        "data.train_size": 8_000, "data.val_size": 500, "data.test_size": 1_000,
        "data.loader_workers": 0,
    }
    if TASKS.get(task).image_shape is None:
        overrides["data.max_length"] = 128
    return overrides


@PRESETS.decorator("lra")
def lra(variant: str, task: str) -> dict[str, Any]:
    """The attention settings of the public LRA code for ``variant`` (e.g. Linformer k=16)."""
    del task
    return dict(VARIANTS.get(variant).lra_overrides)
