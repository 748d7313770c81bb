"""Eager float32 references: the specification of every op in :mod:`minigpt.kernels`.

Each reference is written for clarity, computes in float32 whatever the input
dtype, and returns results in the input dtype. The tests compare every fast
kernel (C++ and Triton, forward and backward) against these functions, and the
``torch`` backend simply calls them (autograd provides their gradients).
"""

from minigpt.kernels.reference.attention import (
    attention_mask,
    attention_reference,
    attention_varlen_reference,
    attention_with_kv_cache_reference,
)
from minigpt.kernels.reference.cross_entropy import linear_cross_entropy_reference
from minigpt.kernels.reference.moe import (
    expert_choice_routing_reference,
    grouped_mm_reference,
    load_balancing_loss_reference,
    moe_mlp_loop_over_experts,
    moe_mlp_reference,
    moe_permute_reference,
    moe_unpermute_reference,
    router_z_loss_reference,
    topk_routing_reference,
)
from minigpt.kernels.reference.norm import add_rms_norm_reference, rms_norm_reference
from minigpt.kernels.reference.rope import rope_cos_sin, rope_reference, rotate_half
from minigpt.kernels.reference.swiglu import swiglu_reference

__all__ = ["linear_cross_entropy_reference", "rms_norm_reference", "add_rms_norm_reference"]
__all__ += ["rope_cos_sin", "rope_reference", "rotate_half", "swiglu_reference"]
__all__ += [
    "attention_mask",
    "attention_reference",
    "attention_varlen_reference",
    "attention_with_kv_cache_reference",
]
__all__ += [
    "expert_choice_routing_reference",
    "grouped_mm_reference",
    "load_balancing_loss_reference",
    "moe_mlp_loop_over_experts",
    "moe_mlp_reference",
    "moe_permute_reference",
    "moe_unpermute_reference",
    "router_z_loss_reference",
    "topk_routing_reference",
]
