"""dpmoe: fused Mixture-of-Experts kernels for SYCL devices, NumPy in, NumPy out.

The MoE forward pass, stage by stage: routing (:func:`topk_softmax`), block alignment
(:func:`moe_align_block_size`), grouped GEMM (:func:`grouped_gemm_moe`, oneMKL via dpnp),
SiLU-and-mul (:func:`silu_and_mul_moe`, :func:`silu_and_mul`), weighted reduction
(:func:`moe_sum`), all fused in :func:`fused_moe_forward` and wrapped by :class:`MoELayer`.
:mod:`dpmoe.reference` holds the NumPy oracle of each. dpnp inputs stay on their queue;
NumPy inputs run on the default SYCL device and come back as NumPy.
"""

from .activation import (act_and_mul, gelu_and_mul, gelu_tanh_and_mul, silu_and_mul,
                         silu_and_mul_moe, swigluoai_and_mul)
from .alignment import moe_align_block_size
from .device import FallbackError, info
from . import layouts, models, reference
from .fused_moe import explain, fused_experts, fused_moe_forward
from .grouped_gemm import grouped_gemm_moe
from .layer import MoELayer
from .reduction import moe_sum
from .routing import grouped_topk, topk_sigmoid, topk_softmax

__version__ = "0.1.0"

__all__ = [
    "FallbackError",
    "act_and_mul",
    "gelu_and_mul",
    "gelu_tanh_and_mul",
    "swigluoai_and_mul",
    "MoELayer",
    "explain",
    "fused_experts",
    "fused_moe_forward",
    "layouts",
    "models",
    "grouped_gemm_moe",
    "info",
    "moe_align_block_size",
    "moe_sum",
    "reference",
    "silu_and_mul",
    "silu_and_mul_moe",
    "grouped_topk",
    "topk_sigmoid",
    "topk_softmax",
]
