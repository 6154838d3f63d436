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


@TASK_CONFIGS.decorator("text")
def text() -> ExperimentConfig:
    """Text (byte-level IMDb): 4 layers, 4 heads, width 256, MLP 1024, CLS pooling, sinusoidal
    positions, 1000 bytes; batch 32 for 20K steps at 0.05 x linear warmup(8K) x rsqrt decay;
    weight decay and dropout 0.1. Reads the official aclImdb_v1.tar.gz from data.manual_dir."""
    return ExperimentConfig(
        model=ModelConfig(num_layers=4, num_heads=4, emb_dim=256, qkv_dim=256, mlp_dim=1024,
                          dropout=0.1, attention_dropout=0.1, pooling="cls",
                          positional="sinusoidal"),
        train=TrainConfig(batch_size=32, steps=20_000, lr=0.05, schedule="rsqrt",
                          warmup_steps=8000, weight_decay=0.1, eval_every=1000,
                          checkpoint_every=1000),
        data=DataConfig(task="text", source="official"),
    )


@TASK_CONFIGS.decorator("retrieval")
def retrieval() -> ExperimentConfig:
    """Retrieval (AAN pairs, dual encoder): 4 layers, 4 heads, width 128, MLP 512, CLS pooling,
    sinusoidal positions, 4000 bytes per paper; batch 32 for 5K steps at 0.05 x linear
    warmup(8K) x rsqrt decay; weight decay and dropout 0.1. Reads the release's tsv_data/."""
    return ExperimentConfig(
        model=ModelConfig(num_layers=4, num_heads=4, emb_dim=128, qkv_dim=128, mlp_dim=512,
                          dropout=0.1, attention_dropout=0.1, pooling="cls",
                          positional="sinusoidal"),
        train=TrainConfig(batch_size=32, steps=5000, lr=0.05, schedule="rsqrt",
                          warmup_steps=8000, weight_decay=0.1, eval_every=500,
                          checkpoint_every=500),
        data=DataConfig(task="retrieval", source="official"),
    )


@TASK_CONFIGS.decorator("image")
def image() -> ExperimentConfig:
    """Image (greyscale CIFAR-10): 1 layer, 8 heads, width 128, q/k/v 64, MLP 128, CLS pooling,
    learned positions; batch 256 for 35K steps (200 epochs of 45K) at 5e-4 with cosine decay
    after 1 epoch of warmup; no weight decay, dropout 0.3. Reads cifar-10-python.tar.gz."""
    return ExperimentConfig(
        model=ModelConfig(num_layers=1, num_heads=8, emb_dim=128, qkv_dim=64, mlp_dim=128,
                          dropout=0.3, attention_dropout=0.1, pooling="cls",
                          positional="learned"),
        train=TrainConfig(batch_size=256, steps=35_000, lr=5e-4, schedule="cosine",
                          warmup_steps=45_000 // 256, weight_decay=0.0, eval_every=1000,
                          checkpoint_every=1000),
        # Batches of 256 images outrun one process's batching on a GPU: prefetch in workers.
        data=DataConfig(task="image", source="official", loader_workers=4),
    )


def _pathfinder(task: str, *, num_layers: int, num_heads: int, positional: str,
                batch_size: int, steps: int, dropout: float,
                grad_clip: float | None) -> ExperimentConfig:
    """A Pathfinder config: width 32, q/k/v 16, MLP 32, mean pooling, 1e-3 with cosine decay
    after 1 epoch of warmup, no weight decay, 160K / 20K / 20K generated images (level 14)."""
    return ExperimentConfig(
        model=ModelConfig(num_layers=num_layers, num_heads=num_heads, emb_dim=32, qkv_dim=16,
                          mlp_dim=32, dropout=dropout, attention_dropout=0.1, pooling="mean",
                          positional=positional),
        train=TrainConfig(batch_size=batch_size, steps=steps, lr=1e-3, schedule="cosine",
                          warmup_steps=160_000 // batch_size, weight_decay=0.0,
                          grad_clip=grad_clip, eval_every=1000, checkpoint_every=1000),
        data=DataConfig(task=task, source="generated", level="contour14", train_size=160_000,
                        val_size=20_000, test_size=20_000, loader_workers=4),
    )


@TASK_CONFIGS.decorator("pathfinder32")
def pathfinder32() -> ExperimentConfig:
    """Pathfinder-32: 4 layers, 4 heads, sinusoidal positions, batch 512 for 62.4K steps (200
    epochs), dropout 0.2 (public LRA config)."""
    return _pathfinder("pathfinder32", num_layers=4, num_heads=4, positional="sinusoidal",
                       batch_size=512, steps=62_400, dropout=0.2, grad_clip=None)


@TASK_CONFIGS.decorator("pathfinder64")
def pathfinder64() -> ExperimentConfig:
    """Pathfinder-64 has no public LRA config; it takes the Pathfinder-32 values, as the
    FlashAttention recipe (Dao et al. 2022) does when pretraining on Path-64 for Path-X."""
    return _pathfinder("pathfinder64", num_layers=4, num_heads=4, positional="sinusoidal",
                       batch_size=512, steps=62_400, dropout=0.2, grad_clip=None)


@TASK_CONFIGS.decorator("pathx")
def pathx() -> ExperimentConfig:
    """Path-X (128x128): 1 layer, 2 heads, learned positions, batch 64 for 500K steps,
    dropout 0.1, gradient clipping at 1.0 (public LRA config)."""
    return _pathfinder("pathx", num_layers=1, num_heads=2, positional="learned",
                       batch_size=64, steps=500_000, dropout=0.1, grad_clip=1.0)


@TASK_CONFIGS.decorator("path256")
def path256() -> ExperimentConfig:
    """Path-256 has no public LRA config; it takes the Path-X values."""
    return _pathfinder("path256", num_layers=1, num_heads=2, positional="learned",
                       batch_size=64, steps=500_000, dropout=0.1, grad_clip=1.0)
