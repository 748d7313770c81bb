"""Triton SwiGLU, ``silu(gate) * up``, forward and backward.

Elementwise over the flattened tensors: each program handles BLOCK contiguous
elements, loads them once (converted to float32), and stores each output once.
The backward kernel recomputes sigmoid(gate) rather than reading a saved copy.

Wrappers take and return exactly what ``torch.ops.minigpt.swiglu_fwd/bwd`` do.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _swiglu_fwd_kernel(g_ptr, u_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-g))
    tl.store(y_ptr + offs, (g * s * u).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(dy_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-g))
    silu = g * s
    tl.store(
        dg_ptr + offs, (dy * u * (s + silu * (1.0 - s))).to(dg_ptr.dtype.element_ty), mask=mask
    )
    tl.store(du_ptr + offs, (dy * silu).to(du_ptr.dtype.element_ty), mask=mask)


def swiglu_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Contiguous gate/up of one shape -> y, like the C++ op."""
    y = torch.empty_like(gate, memory_format=torch.contiguous_format)
    n = gate.numel()
    if n:
        _swiglu_fwd_kernel[(triton.cdiv(n, BLOCK),)](gate, up, y, n, BLOCK=BLOCK)
    return y


def swiglu_bwd(
    dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous dy/gate/up -> (dgate, dup), like the C++ op."""
    dg = torch.empty_like(gate, memory_format=torch.contiguous_format)
    du = torch.empty_like(gate, memory_format=torch.contiguous_format)
    n = gate.numel()
    if n:
        _swiglu_bwd_kernel[(triton.cdiv(n, BLOCK),)](dy, gate, up, dg, du, n, BLOCK=BLOCK)
    return dg, du


# Argument types for ahead-of-time compilation checks (compile_check.py).
COMPILE_SPECS = [
    {
        "name": f"swiglu_fwd[{dt}]",
        "fn": _swiglu_fwd_kernel,
        "signature": {"g_ptr": f"*{dt}", "u_ptr": f"*{dt}", "y_ptr": f"*{dt}", "n": "i64"}
        | {"BLOCK": "constexpr"},
        "constexprs": {"BLOCK": BLOCK},
    }
    for dt in ("fp32", "bf16", "fp16")
] + [
    {
        "name": f"swiglu_bwd[{dt}]",
        "fn": _swiglu_bwd_kernel,
        "signature": {
            "dy_ptr": f"*{dt}",
            "g_ptr": f"*{dt}",
            "u_ptr": f"*{dt}",
            "dg_ptr": f"*{dt}",
            "du_ptr": f"*{dt}",
            "n": "i64",
            "BLOCK": "constexpr",
        },
        "constexprs": {"BLOCK": BLOCK},
    }
    for dt in ("fp32", "bf16", "fp16")
]
