"""Attention variants (one module each, registered by ``@register_variant`` in it) and the shared
classifier. Importing this package imports every module in it, so a new variant is one new file."""

from xformers_zoo.models.classifier import Classifier
from xformers_zoo.registry import import_submodules

import_submodules(__name__)

__all__ = ["Classifier"]
