"""The experiment config: model, training and data sections, each a typed frozen dataclass.

Task bases (``configs/lra_tasks.py``) fill these with the public LRA values; presets
(``configs/presets.py``) and command-line overrides change fields by dotted name.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

from xformers_zoo.task_specs import TASKS

Pooling = Literal["cls", "mean"]
Positional = Literal["sinusoidal", "learned", "learned_2d", "none"]
DType = Literal["bfloat16", "float32", "float16"]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The shared encoder classifier (LRA: pre-LayerNorm blocks, GELU MLP, Dense-ReLU-Dense head).

    ``attention`` holds the variant's own config dataclass; None means the variant's defaults.
    ``reversible`` runs the encoder blocks as reversible residual layers and ``ff_chunks`` > 1
    applies each feed-forward layer over that many slices of the sequence (both from the
    Reformer, Kitaev et al. 2020; they trade compute for activation memory).
    """

    variant: str = "full"
    num_layers: int = 4
    num_heads: int = 8
    emb_dim: int = 512
    qkv_dim: int = 512
    mlp_dim: int = 1024
    dropout: float = 0.1
    attention_dropout: float = 0.1
    pooling: Pooling = "cls"
    positional: Positional = "sinusoidal"
    dtype: DType = "bfloat16"
    remat: bool = False
    reversible: bool = False
    ff_chunks: int = 1
    attention: Any = None

    def __post_init__(self):
        if self.qkv_dim % self.num_heads:
            raise ValueError(f"qkv_dim {self.qkv_dim} must divide into num_heads {self.num_heads}")
        for name in ("num_layers", "num_heads", "emb_dim", "qkv_dim", "mlp_dim", "ff_chunks"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}")
        for name in ("dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"model.{name} must be in [0, 1), got {getattr(self, name)}")

    @property
    def head_dim(self) -> int:
        """Per-head width of q, k and v."""
        return self.qkv_dim // self.num_heads


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation and loop settings (LRA: Adam(0.9, 0.98, 1e-9), decoupled weight decay).

    ``init_from`` names another run directory whose best (else latest) checkpoint initialises
    the model when this run starts fresh; optimizer, step and data order still start fresh.
    Learned 2-D positions may grow by whole factors on the way, the Path-64 -> Path-X recipe of
    FlashAttention (Dao et al. 2022, section 4).

    ``objective`` is "classify" (the task's labels) or "masked": self-pretraining by masked-token
    denoising of the task's own training inputs (Amos et al. 2024, "Never Train from Scratch"),
    where ``mask_rate`` of the real tokens, in spans of ``mask_span`` consecutive tokens, are
    replaced by a mask token and predicted; a classifier then starts from that run with
    ``init_from``. Its accuracy is the masked-token accuracy.

    ``sequence_parallel``: the size of the ``seq`` mesh axis that ring attention shards each
    sequence over (train/sharding.py); the ``data`` axis gets the remaining devices.
    """

    batch_size: int = 32
    steps: int = 5000
    lr: float = 0.05
    schedule: Literal["rsqrt", "cosine", "constant"] = "rsqrt"
    warmup_steps: int = 1000
    weight_decay: float = 0.1
    grad_clip: float | None = None
    adam_b1: float = 0.9
    adam_b2: float = 0.98
    adam_eps: float = 1e-9
    grad_accum: int = 1
    sequence_parallel: int = 1
    eval_every: int = 500
    eval_batches: int | None = None
    checkpoint_every: int = 500
    log_every: int = 50
    seed: int = 0
    init_from: str | None = None
    objective: Literal["classify", "masked"] = "classify"
    mask_rate: float = 0.15
    mask_span: int = 1

    def __post_init__(self):
        if not 0.0 < self.mask_rate < 1.0:
            raise ValueError(f"train.mask_rate must be in (0, 1), got {self.mask_rate}")
        if self.mask_span < 1:
            raise ValueError(f"train.mask_span must be 1 or more tokens, got {self.mask_span}")
        if self.init_from is not None and not self.init_from.strip():
            raise ValueError("train.init_from must name a run directory or be None, got ''")
        for name in ("batch_size", "steps", "grad_accum", "sequence_parallel", "eval_every",
                     "checkpoint_every", "log_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"train.{name} must be positive, got {getattr(self, name)}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"train.batch_size {self.batch_size} must be divisible by "
                             f"train.grad_accum {self.grad_accum}")
        _check_positive("train", self, ("adam_eps", "grad_clip", "eval_batches"))
        # lr 0 is allowed: it keeps the weights (e.g. to score a warm start as it began).
        _check_at_least_zero("train", self, ("lr", "warmup_steps", "weight_decay", "seed"))
        for name in ("adam_b1", "adam_b2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"train.{name} must be in [0, 1), got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where a task's data comes from and how much of it to generate.

    ``source`` is "generated" for tasks the project generates (ListOps, Pathfinder), "official"
    to read released files from ``manual_dir``, or "tfds" for a TFDS data set already prepared
    (Text: ``imdb_reviews``). Sizes of None mean the task's standard sizes. ``level`` is the
    Pathfinder difficulty: contour length 6, 9 or 14 (LRA uses 14). ``workers``: processes that
    generate data (0: every core); ``loader_workers``: processes that assemble training batches
    ahead of the step (0: in the training process).
    """

    task: str = "listops"
    data_dir: str = "data"
    source: Literal["generated", "official", "tfds"] = "generated"
    manual_dir: str | None = None
    train_size: int | None = None
    val_size: int | None = None
    test_size: int | None = None
    max_length: int | None = None
    generation_seed: int = 0
    workers: int = 0
    loader_workers: int = 0
    level: Literal["baseline", "contour9", "contour14"] = "contour14"

    def __post_init__(self):
        for name in ("data_dir", "manual_dir"):
            value = getattr(self, name)
            if value is not None and not value.strip():
                raise ValueError(f"data.{name} must name a folder, got {value!r}")
        _check_positive("data", self, ("train_size", "val_size", "test_size", "max_length"))
        _check_at_least_zero("data", self, ("generation_seed", "workers", "loader_workers"))
        task = TASKS.get(self.task)
        if self.max_length is None:
            return
        if task.image_shape is not None and self.max_length != task.max_length:
            raise ValueError(f"data.max_length of {self.task} must be {task.max_length} (its "
                             f"{task.image_shape[0]}x{task.image_shape[1]} pixels) or None, got "
                             f"{self.max_length}")
        if self.max_length < task.min_length:
            raise ValueError(f"data.max_length of {self.task} must be at least "
                             f"{task.min_length}, got {self.max_length}")


def _check_positive(section: str, config: Any, names: tuple[str, ...]) -> None:
    """Raises naming the first of ``names`` that is set (not None) and not a positive number."""
    for name in names:
        value = getattr(config, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"{section}.{name} must be positive, got {value}")


def _check_at_least_zero(section: str, config: Any, names: tuple[str, ...]) -> None:
    """Raises naming the first of ``names`` that is negative (or not finite)."""
    for name in names:
        value = getattr(config, name)
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{section}.{name} must be 0 or more, got {value}")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """One training run: model, training and data sections."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)

    def __post_init__(self):
        if self.train.objective == "masked" and TASKS.get(self.data.task).two_inputs:
            # Masking both sequences would pretrain the shared encoder too, but the dual-input
            # pipeline and head need their own treatment; refused until that is written.
            raise ValueError(f"train.objective=masked is not supported for the two-input task "
                             f"{self.data.task}; accepted there: train.objective=classify")
