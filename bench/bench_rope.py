"""RoPE forward+backward on (B, T, H, D) queries and keys: ours vs eager vs HF formula vs compile.

Competitors, timed in the same run: the eager float32 reference, the formula
Hugging Face Llama uses (``x * cos + rotate_half(x) * sin`` in the activation
dtype with full-width tables, autograd backward), and ``torch.compile`` of the
reference. GB/s counts the bytes an ideal fused implementation must move
(forward: read q, k, write q_rot, k_rot; backward: read dq_rot, dk_rot, write
dq, dk; the small cos/sin tables are ignored), to compare with the copy
bandwidth measured in the same file.
"""

import pytest
import torch
from conftest import compiled, fwd_bwd

from minigpt.kernels import rope, rope_cos_sin
from minigpt.kernels.reference import rope_reference, rotate_half

# (B, T, Hq, Hk, D): 4096 tokens, Llama-like grouped-query attention (32 query heads,
# 8 key heads, D=128). One shape only: compiling the reference takes ~10-30 s per case.
SHAPES = [(2, 2048, 32, 8, 128)]


def _hf_rope(q, k, cos_full, sin_full):
    """Hugging Face Llama's apply_rotary_pos_emb, for the (B, T, H, D) layout."""
    c, s = cos_full[:, None, :], sin_full[:, None, :]  # (T, 1, D) broadcasts over heads
    return q * c + rotate_half(q) * s, k * c + rotate_half(k) * s


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_rope_fwd_bwd(compare, shape, dtype):
    B, T, Hq, Hk, D = shape
    q = torch.randn(B, T, Hq, D, dtype=dtype, requires_grad=True)
    k = torch.randn(B, T, Hk, D, dtype=dtype, requires_grad=True)
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    cos, sin = rope_cos_sin(T, D)  # float32 tables
    cos_full = torch.cat((cos, cos), -1).to(dtype)
    sin_full = torch.cat((sin, sin), -1).to(dtype)
    ref_compiled = compiled(rope_reference)
    qk, grads = (q, k), (dq, dk)
    compare.run(
        fwd_bwd(lambda q, k: rope(q, k, cos, sin), qk, grads),
        {
            "eager": fwd_bwd(lambda q, k: rope_reference(q, k, cos, sin), qk, grads),
            "hf_formula": fwd_bwd(lambda q, k: _hf_rope(q, k, cos_full, sin_full), qk, grads),
            "compiled": fwd_bwd(lambda q, k: ref_compiled(q, k, cos, sin), qk, grads),
        },
        bytes_moved=4 * (q.numel() + k.numel()) * q.element_size(),
        rounds=10,
    )
