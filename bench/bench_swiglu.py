"""SwiGLU ``silu(gate) * up`` forward+backward: ours vs eager vs torch built-ins vs compile.

Competitors, timed in the same run: the eager float32 reference, the nearest
torch built-in (``F.silu(g) * u`` in the activation dtype, autograd backward),
and ``torch.compile`` of the reference. GB/s counts the bytes an ideal fused
implementation must move (forward: read gate, up, write y; backward: read dy,
gate, up, write dgate, dup: 8 tensors), to compare with the machine's copy
bandwidth measured in the same file (into a reused buffer and into a freshly
allocated one: fresh pages are expensive on this machine, and every op returns
fresh tensors).
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import compiled, fwd_bwd

from minigpt.kernels import swiglu
from minigpt.kernels.reference import swiglu_reference

# (tokens, MLP hidden width): Llama-ish MLP widths of models of width 1024 .. 1536
SHAPES = [(1024, 2816), (4096, 4096)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_swiglu_fwd_bwd(compare, shape, dtype):
    g = torch.randn(shape, dtype=dtype, requires_grad=True)
    u = torch.randn(shape, dtype=dtype, requires_grad=True)
    dy = torch.randn(shape, dtype=dtype)
    ref_compiled = compiled(swiglu_reference)
    compare.run(
        fwd_bwd(swiglu, (g, u), dy),
        {
            "eager": fwd_bwd(swiglu_reference, (g, u), dy),
            "F.silu*u": fwd_bwd(lambda g, u: F.silu(g) * u, (g, u), dy),
            "compiled": fwd_bwd(ref_compiled, (g, u), dy),
        },
        bytes_moved=8 * g.numel() * g.element_size(),
        rounds=10,
    )
