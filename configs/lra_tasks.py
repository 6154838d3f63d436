"""The Long Range Arena tasks (Tay et al. 2020): each task's facts (``TaskSpec``: length,
vocabulary, classes, sizes) and its base config with the public LRA values (they supersede the
paper's appendix), entered together by ``@register_task``. Presets and overrides compose on top.
"""

from __future__ import annotations

from xformers_zoo.configs.base import DataConfig, ExperimentConfig, ModelConfig, TrainConfig
from xformers_zoo.task_specs import TaskSpec, register_task


def task_data_config(spec: TaskSpec, **fields) -> DataConfig:
    """The task's data config: its published split sizes where it has them, then ``fields``."""
    sizes = {}
    if spec.split_sizes is not None:
        sizes = dict(zip(("train_size", "val_size", "test_size"), spec.split_sizes, strict=True))
    return DataConfig(task=spec.name, **(sizes | fields))


@register_task(TaskSpec(
    name="listops", max_length=2000, vocab_size=16, num_classes=10, min_length=8,
    split_sizes=(96_000, 2_000, 2_000),
    description="nested MIN/MAX/MED/SM expressions, 10-way (Nangia & Bowman 2018)"))
def listops(spec: TaskSpec) -> ExperimentConfig:
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
        data=task_data_config(spec),
    )


@register_task(TaskSpec(
    name="text", max_length=1000, vocab_size=257, num_classes=2,
    description="byte-level IMDb sentiment (id = byte + 1, 0 = pad; Maas et al. 2011)"))
def text(spec: TaskSpec) -> ExperimentConfig:
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
        data=task_data_config(spec, source="official"),
    )


@register_task(TaskSpec(
    name="retrieval", max_length=4000, vocab_size=257, num_classes=2, two_inputs=True,
    description="byte-level AAN citation matching of two papers, dual encoder (Radev et al. 2013)"))
def retrieval(spec: TaskSpec) -> ExperimentConfig:
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
        data=task_data_config(spec, source="official"),
    )


@register_task(TaskSpec(
    name="image", max_length=1024, vocab_size=256, num_classes=10, image_shape=(32, 32),
    has_padding=False, description="greyscale CIFAR-10, pixel values as tokens (Krizhevsky 2009)"))
def image(spec: TaskSpec) -> ExperimentConfig:
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
        data=task_data_config(spec, source="official", loader_workers=4),
    )


def pathfinder_spec(name: str, side: int, what: str) -> TaskSpec:
    """Pathfinder (Linsley et al. 2018) on ``side`` x ``side`` images, pixel values as tokens,
    160K / 20K / 20K generated images."""
    return TaskSpec(name=name, max_length=side * side, vocab_size=256, num_classes=2,
                    image_shape=(side, side), has_padding=False,
                    split_sizes=(160_000, 20_000, 20_000), family="pathfinder",
                    description=f"{what}: are the two marked dots on one dashed contour?")


def _pathfinder(spec: TaskSpec, *, num_layers: int, num_heads: int, positional: str,
                batch_size: int, steps: int, dropout: float,
                grad_clip: float | None) -> ExperimentConfig:
    """A Pathfinder config: width 32, q/k/v 16, MLP 32, mean pooling, 1e-3 with cosine decay
    after 1 epoch of warmup, no weight decay, generated images (level 14)."""
    return ExperimentConfig(
        model=ModelConfig(num_layers=num_layers, num_heads=num_heads, emb_dim=32, qkv_dim=16,
                          mlp_dim=32, dropout=dropout, attention_dropout=0.1, pooling="mean",
                          positional=positional),
        train=TrainConfig(batch_size=batch_size, steps=steps, lr=1e-3, schedule="cosine",
                          warmup_steps=spec.split_sizes[0] // batch_size, weight_decay=0.0,
                          grad_clip=grad_clip, eval_every=1000, checkpoint_every=1000),
        data=task_data_config(spec, source="generated", level="contour14", loader_workers=4),
    )


@register_task(pathfinder_spec("pathfinder32", 32, "Pathfinder 32x32"))
def pathfinder32(spec: TaskSpec) -> ExperimentConfig:
    """Pathfinder-32: 4 layers, 4 heads, sinusoidal positions, batch 512 for 62.4K steps (200
    epochs), dropout 0.2 (public LRA config)."""
    return _pathfinder(spec, num_layers=4, num_heads=4, positional="sinusoidal",
                       batch_size=512, steps=62_400, dropout=0.2, grad_clip=None)


@register_task(pathfinder_spec("pathfinder64", 64, "Pathfinder 64x64"))
def pathfinder64(spec: TaskSpec) -> ExperimentConfig:
    """Pathfinder-64 has no public LRA config; it takes the Pathfinder-32 values, as the
    FlashAttention recipe (Dao et al. 2022) does when pretraining on Path-64 for Path-X."""
    return _pathfinder(spec, num_layers=4, num_heads=4, positional="sinusoidal",
                       batch_size=512, steps=62_400, dropout=0.2, grad_clip=None)


@register_task(pathfinder_spec("pathx", 128, "Path-X, Pathfinder 128x128"))
def pathx(spec: TaskSpec) -> ExperimentConfig:
    """Path-X (128x128): 1 layer, 2 heads, learned positions, batch 64 for 500K steps,
    dropout 0.1, gradient clipping at 1.0 (public LRA config)."""
    return _pathfinder(spec, num_layers=1, num_heads=2, positional="learned",
                       batch_size=64, steps=500_000, dropout=0.1, grad_clip=1.0)


@register_task(pathfinder_spec("path256", 256, "Path-256, Pathfinder 256x256"))
def path256(spec: TaskSpec) -> ExperimentConfig:
    """Path-256 has no public LRA config; it takes the Path-X values."""
    return _pathfinder(spec, num_layers=1, num_heads=2, positional="learned",
                       batch_size=64, steps=500_000, dropout=0.1, grad_clip=1.0)
