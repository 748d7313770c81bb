"""RMSNorm (and fused add + RMSNorm) forward+backward: ours vs eager vs torch.

Competitors, timed in the same run: the eager float32 reference, torch's own
``F.rms_norm``, and ``torch.compile`` of the reference. GB/s counts the bytes an
ideal fused implementation must move (forward: read x, write y; backward: read
dy and x, write dx), so it can be compared with the machine's copy bandwidth
(``bench_memory.py``).
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import compiled, fwd_bwd

from minigpt.kernels import add_rms_norm, rms_norm
from minigpt.kernels.reference import add_rms_norm_reference, rms_norm_reference

SHAPES = [(8192, 1024), (4096, 4096), (2048, 256)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_rms_norm_fwd_bwd(compare, shape, dtype):
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    w = torch.randn(shape[1], dtype=dtype, requires_grad=True)
    dy = torch.randn(shape, dtype=dtype)
    eps = 1e-6
    ref_compiled = compiled(rms_norm_reference)
    compare.run(
        fwd_bwd(lambda x, w: rms_norm(x, w, eps), (x, w), dy),
        {
            "eager": fwd_bwd(lambda x, w: rms_norm_reference(x, w, eps), (x, w), dy),
            "F.rms_norm": fwd_bwd(lambda x, w: F.rms_norm(x, (shape[1],), w, eps), (x, w), dy),
            "compiled": fwd_bwd(lambda x, w: ref_compiled(x, w, eps), (x, w), dy),
        },
        bytes_moved=5 * x.numel() * x.element_size(),
        rounds=15,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_add_rms_norm_fwd_bwd(compare, dtype):
    shape = (8192, 1024)
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    r = torch.randn(shape, dtype=dtype, requires_grad=True)
    w = torch.randn(shape[1], dtype=dtype, requires_grad=True)
    dy, dh = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    ref_compiled = compiled(add_rms_norm_reference)
    compare.run(
        fwd_bwd(add_rms_norm, (x, r, w), (dy, dh)),
        {
            "eager": fwd_bwd(add_rms_norm_reference, (x, r, w), (dy, dh)),
            "compiled": fwd_bwd(ref_compiled, (x, r, w), (dy, dh)),
        },
        # fwd: read x, r; write y, h.  bwd: read dy, dh, h; write dx (= dr)
        bytes_moved=8 * x.numel() * x.element_size(),
        rounds=15,
    )
