"""How exact (optionally block-sparse) softmax attention is computed: ``xla`` (reference),
``cudnn`` and ``pallas`` implementations behind one ``dot_product_attention``."""

from xformers_zoo.kernels.block_mask import BlockMask
from xformers_zoo.kernels.cudnn import cudnn_attention, cudnn_call_form, cudnn_rejects
from xformers_zoo.kernels.dispatch import (
    IMPLEMENTATIONS,
    AttentionCall,
    KernelImpl,
    NoImplementationError,
    choose_implementation,
    describe_choice,
    dot_product_attention,
)
from xformers_zoo.kernels.mask_predicate import MaskPredicate
from xformers_zoo.kernels.pallas_attention import pallas_attention as pallas_flash_attention
from xformers_zoo.kernels.pallas_attention import pallas_rejects
from xformers_zoo.kernels.xla import xla_attention

IMPLEMENTATIONS.register(
    "xla", KernelImpl("xla", xla_attention, lambda call: None, "dense XLA reference"))
IMPLEMENTATIONS.register(
    "cudnn", KernelImpl("cudnn", cudnn_attention, cudnn_rejects, "cuDNN fused attention",
                        form=cudnn_call_form))
IMPLEMENTATIONS.register(
    "pallas", KernelImpl("pallas", pallas_flash_attention, pallas_rejects,
                         "FlashAttention-2 Pallas kernels, dense and block-sparse"))

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
    "xla_attention",
]
