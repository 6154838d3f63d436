"""How exact (optionally block-sparse) softmax attention is computed: ``xla`` (reference),
``cudnn`` and ``pallas`` implementations behind one ``dot_product_attention``. Each implementation
registers itself (``@register_implementation``) in its own module; importing this package imports
them all. ``ring_attention`` shards the sequence over a mesh axis and runs an implementation's
blockwise passes around the ring."""

from xformers_zoo.kernels.block_mask import BlockMask
from xformers_zoo.kernels.dispatch import (
    IMPLEMENTATIONS,
    AttentionCall,
    BlockwiseAttention,
    KernelImpl,
    NoImplementationError,
    choose_implementation,
    describe_choice,
    dot_product_attention,
    register_implementation,
)
from xformers_zoo.kernels.mask_predicate import MaskPredicate
from xformers_zoo.kernels.ring_attention import ring_attention
from xformers_zoo.kernels.xla import xla_attention
from xformers_zoo.registry import import_submodules

import_submodules(__name__)

__all__ = [
    "IMPLEMENTATIONS",
    "AttentionCall",
    "BlockMask",
    "BlockwiseAttention",
    "KernelImpl",
    "MaskPredicate",
    "NoImplementationError",
    "choose_implementation",
    "describe_choice",
    "dot_product_attention",
    "register_implementation",
    "ring_attention",
    "xla_attention",
]
