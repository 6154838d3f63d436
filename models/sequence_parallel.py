"""The sequence-parallel option of the exact-attention variants (``full``, ``flash`` and the
block-sparse ones): their configs derive from ``SequenceParallelConfig``, and their cores pass
``sequence_axis`` to ``kernels.dot_product_attention``, which then runs ring attention
(kernels/ring_attention.py). Variants whose configs lack the field cannot use it: an override
of it names the fields they accept."""

from __future__ import annotations

import dataclasses

from xformers_zoo.overrides import ConfigError


@dataclasses.dataclass(frozen=True)
class SequenceParallelConfig:
    """``sequence_axis``: the mesh axis (usually "seq") to shard each sequence over, running
    ring attention on it (the mesh in context, ``jax.set_mesh``, must have that axis and the
    attention length must be a multiple of its size); None: attention is not sharded."""

    sequence_axis: str | None = None

    def __post_init__(self):
        if self.sequence_axis is not None and not self.sequence_axis.strip():
            raise ConfigError("sequence_axis must name a mesh axis (e.g. 'seq') or be None, "
                              "got ''")
