"""minigpt.kernels -- fused LLM ops with C++ (CPU) and Triton (GPU) backends.

Every op is one function with an eager float32 reference
(:mod:`minigpt.kernels.reference`) that defines it, and fast backends chosen by
device (see :mod:`minigpt.kernels._backend`). Import them into any model::

    from minigpt.kernels import rms_norm
    y = rms_norm(x, weight, eps=1e-6)

``minigpt.kernels.info()`` prints which backend each op uses here.
"""

from minigpt.kernels._backend import (
    BACKENDS,
    cpp_available,
    cpu_isa,
    force_cpu_isa,
    info,
    registered_ops,
    select_backend,
    triton_available,
)
from minigpt.kernels.attention import attention, attention_varlen, attention_with_kv_cache
from minigpt.kernels.linear import linear
from minigpt.kernels.linear_cross_entropy import linear_cross_entropy
from minigpt.kernels.moe import grouped_mm, moe_expert_mlp, moe_permute, moe_unpermute
from minigpt.kernels.quant import QuantizedWeight, quant_linear, quantize_weight
from minigpt.kernels.rms_norm import add_rms_norm, rms_norm
from minigpt.kernels.rope import rope, rope_cos_sin, rope_with_positions
from minigpt.kernels.sampling import SampleOutput, repetition_penalty, sample, top_k_top_p_filter
from minigpt.kernels.swiglu import swiglu

__all__ = [
    "BACKENDS",
    "add_rms_norm",
    "attention",
    "attention_varlen",
    "attention_with_kv_cache",
    "cpp_available",
    "cpu_isa",
    "force_cpu_isa",
    "info",
    "linear",
    "linear_cross_entropy",
    "grouped_mm",
    "moe_expert_mlp",
    "moe_permute",
    "moe_unpermute",
    "QuantizedWeight",
    "quant_linear",
    "quantize_weight",
    "registered_ops",
    "rms_norm",
    "rope",
    "rope_cos_sin",
    "rope_with_positions",
    "repetition_penalty",
    "sample",
    "SampleOutput",
    "top_k_top_p_filter",
    "select_backend",
    "swiglu",
    "triton_available",
]
