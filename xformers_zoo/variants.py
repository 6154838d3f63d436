"""Attention variants: what a variant declares and the registry that holds them.

A variant is an ``nnx.Module`` "core" that receives projected ``q, k, v: [batch, length, heads,
head_dim]`` and a key padding mask ``[batch, length]`` and returns ``[batch, length, heads,
head_dim]``. It is built as ``core_cls(config, num_heads=..., head_dim=..., max_length=...,
dropout=..., rngs=...)`` (dropout: the attention dropout rate) and called as
``core(q, k, v, key_mask, deterministic=..., rngs=...)``. The shared
multi-head layer owns the projections; the core owns whatever else it needs. Key masks are right
padding: each sequence's real tokens come first (the pipelines pad at the end and the classifier
prepends its CLS token), so cores may turn masks into lengths. For tasks without padding (image
tasks) the mask is None for cores that declare ``accepts_no_mask`` (they may then skip masking,
as cuDNN's plain call does) and all True for the others.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from xformers_zoo.overrides import ConfigError
from xformers_zoo.registry import Registry


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What a variant can serve.

    Attributes:
      key_padding_mask: padded keys are ignored, so padding never changes real positions.
      causal: supports autoregressive masking.
      fixed_length: parameters depend on the maximum length (e.g. Linformer's projections).
      cross_attention: queries and keys may come from different sequences.
      shared_qk: queries and keys share one projection (Reformer).
      uses_qk: the core reads q and k (False for Synthesizer's random attention).
      max_length: the longest sequence the variant accepts, if bounded.
      accepts_no_mask: the core takes ``key_mask=None`` for inputs without padding and computes
        without a mask then (``full``: cuDNN without sequence lengths).
    """

    key_padding_mask: bool = True
    causal: bool = False
    fixed_length: bool = False
    cross_attention: bool = False
    shared_qk: bool = False
    uses_qk: bool = True
    max_length: int | None = None
    accepts_no_mask: bool = False


@dataclasses.dataclass(frozen=True)
class VariantSpec:
    """A registered attention variant.

    Attributes:
      name: registry name users type.
      core: the nnx.Module class computing attention from projected q, k, v.
      config_cls: its typed, frozen config dataclass (all fields defaulted).
      capabilities: what it can serve.
      paper: the citation it comes from.
      lra_overrides: dotted config overrides that reproduce the public LRA code's defaults for this
        variant (applied by the ``lra`` preset), e.g. {"model.attention.k": 16}.
      refresh: ``(model, key) -> int`` updating the cores' non-trainable state between
        training steps (Performer's feature redraw); the trainer calls it at the steps that the
        variant config's ``refresh_interval()`` divides. Returns how many cores changed.
    """

    name: str
    core: type
    config_cls: type
    capabilities: Capabilities
    paper: str
    lra_overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    refresh: Callable[..., int] | None = None

    def refresh_interval(self, config: Any) -> int:
        """Steps between ``refresh`` calls for this config; 0 when the variant never refreshes."""
        if self.refresh is None or not hasattr(config, "refresh_interval"):
            return 0
        return int(config.refresh_interval())

    def check(self, config: Any, *, max_length: int, num_heads: int, head_dim: int) -> None:
        """Raises ConfigError when this variant cannot serve the shape; variant configs may add
        their own checks through a ``check(max_length=, num_heads=, head_dim=)`` method."""
        limit = self.capabilities.max_length
        if limit is not None and max_length > limit:
            raise ConfigError(f"{self.name} accepts sequences up to {limit} tokens, got "
                              f"{max_length}")
        if hasattr(config, "check"):
            config.check(max_length=max_length, num_heads=num_heads, head_dim=head_dim)


VARIANTS: Registry[VariantSpec] = Registry("attention variant")


def register_variant(
    name: str,
    *,
    config_cls: type,
    paper: str,
    capabilities: Capabilities | None = None,
    lra_overrides: Mapping[str, Any] | None = None,
    refresh: Callable[..., int] | None = None,
):
    """Class decorator registering an attention core under ``name``."""

    def wrap(core: type) -> type:
        VARIANTS.register(name, VariantSpec(
            name=name, core=core, config_cls=config_cls,
            capabilities=capabilities or Capabilities(), paper=paper,
            lra_overrides=dict(lra_overrides or {}), refresh=refresh,
        ))
        return core

    return wrap
