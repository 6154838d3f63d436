"""Base configs per task with the public LRA values (they supersede the paper's appendix).

Each entry is a function returning an ``ExperimentConfig``; presets and overrides compose on top.
"""

from __future__ import annotations

from collections.abc import Callable

from xformers_zoo.configs.base import DataConfig, ExperimentConfig, ModelConfig, TrainConfig

from xformers_zoo.registry import Registry

TASK_CONFIGS: Registry[Callable[[], ExperimentConfig]] = Registry("task config")


@TASK_CONFIGS.decorator("listops")
def listops() -> ExperimentConfig:
    """ListOps: 4 layers, 8 heads, width 512, MLP 1024, CLS pooling, sinusoidal positions;
    batch 32 for 5K steps at 0.05 x linear warmup(1K) x rsqrt decay; weight decay and dropout
    0.1; 96K / 2K / 2K examples of length 500 to 2000."""
    return ExperimentConfig(
        model=ModelConfig(num_layers=4, num_heads=8, emb_dim=512, qkv_dim=512, mlp_dim=1024,
                          dropout=0.1, attention_dropout=0.1, pooling="cls",
                          positional="sinusoidal"),
        train=TrainConfig(batch_size=32, steps=5000, lr=0.05, schedule="rsqrt",
                          warmup_steps=1000, weight_decay=0.1, eval_every=1000,
                          checkpoint_every=500),
        data=DataConfig(task="listops", train_size=96_000, val_size=2_000, test_size=2_000),
    )
