"""Attention variants (one module each, registered by import) and the shared classifier."""

# Importing a variant's module registers it under its name(s).
from xformers_zoo.models import (  # noqa: F401
    block_sparse,
    flash,
    full,
    linear,
    linformer,
    nystromformer,
    performer,
    reformer,
    sinkhorn,
    synthesizer,
)
from xformers_zoo.models.classifier import Classifier

__all__ = ["Classifier"]
