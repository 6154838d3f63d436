"""FlashAttention (Dao et al. 2022, "FlashAttention: Fast and Memory-Efficient Exact Attention
with IO-Awareness"; Dao 2023, FlashAttention-2): exact softmax attention, as the ``full``
variant computes it, run on the ``pallas`` kernels first. Registered under its own name so a user
can ask for "the Transformer with FlashAttention" by name."""

from __future__ import annotations

import dataclasses

from xformers_zoo.models.full import FullAttention, FullConfig
from xformers_zoo.variants import Capabilities, register_variant


@dataclasses.dataclass(frozen=True)
class FlashConfig(FullConfig):
    """``full``'s config with the Pallas kernels tried first; each implementation passed over is
    logged with its reason (e.g. no GPU), then cuDNN and XLA serve. Attention dropout runs inside
    the kernels."""

    implementation: tuple[str, ...] = ("pallas", "cudnn", "xla")


register_variant(
    "flash", config_cls=FlashConfig,
    paper="Dao et al. 2022, FlashAttention: Fast and Memory-Efficient Exact Attention with "
          "IO-Awareness",
    capabilities=Capabilities(causal=True, cross_attention=True, accepts_no_mask=True),
)(FullAttention)
