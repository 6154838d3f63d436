"""How exact (optionally block-sparse) softmax attention is computed: ``xla`` (reference),
``cudnn`` and ``pallas`` implementations behind one ``dot_product_attention``. Each implementation
registers itself (``@register_implementation``) in its own module; importing this package imports
them all."""

from xformers_zoo.kernels.block_mask import BlockMask
from xformers_zoo.kernels.dispatch import (
    IMPLEMENTATIONS,
    AttentionCall,
    KernelImpl,
    NoImplementationError,
    choose_implementation,
    describe_choice,
    dot_product_attention,
    register_implementation,
)
from xformers_zoo.kernels.mask_predicate import MaskPredicate
from xformers_zoo.kernels.xla import xla_attention
from xformers_zoo.registry import import_submodules

import_submodules(__name__)

__all__ = [
    "IMPLEMENTATIONS",
    "AttentionCall",
    "BlockMask",
    "KernelImpl",
    "MaskPredicate",
    "NoImplementationError",
    "choose_implementation",
    "describe_choice",
    "dot_product_attention",
    "register_implementation",
    "xla_attention",
]
