"""Triton rotary position embedding (half-split pairing), forward and backward.

One program rotates a tile of BLOCK_H heads x D of one token: it loads the
token's cos/sin row once (D/2 values each) and reuses it for every head of the
tile. Pairs are (i, i + D/2), see :mod:`minigpt.kernels.reference.rope`. The
backward pass is the same kernel with ``SIGN = -1`` (rotation by -angle).

The input may be strided over (batch, token, head); the output is contiguous.
The wrapper takes and returns exactly what ``torch.ops.minigpt.rope_rotate`` does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_kernel(
    x_ptr,
    out_ptr,
    cos_ptr,
    sin_ptr,
    seq_len,
    heads,
    half,
    stride_b,
    stride_t,
    stride_h,
    cos_stride_b,
    SIGN: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    b = token // seq_len
    t = token % seq_len
    hs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_HALF)
    col_mask = cols < half
    c_off = b * cos_stride_b + t * half + cols
    c = tl.load(cos_ptr + c_off, mask=col_mask, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + c_off, mask=col_mask, other=0.0).to(tl.float32) * SIGN
    mask = (hs[:, None] < heads) & col_mask[None, :]
    x1_off = b * stride_b + t * stride_t + hs[:, None].to(tl.int64) * stride_h + cols[None, :]
    x1 = tl.load(x_ptr + x1_off, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + x1_off + half, mask=mask, other=0.0).to(tl.float32)
    o1_off = (token * heads + hs[:, None]) * (2 * half) + cols[None, :]
    out1 = x1 * c[None, :] - x2 * s[None, :]
    out2 = x2 * c[None, :] + x1 * s[None, :]
    tl.store(out_ptr + o1_off, out1.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_ptr + o1_off + half, out2.to(out_ptr.dtype.element_ty), mask=mask)


def _rotate_one(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool
) -> torch.Tensor:
    B, T, H, D = x.shape
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    half = D // 2
    block_half = triton.next_power_of_2(half)
    # about 2k elements of x per program (fewer heads when D is large)
    block_h = min(triton.next_power_of_2(H), max(1, 1024 // block_half))
    grid = (B * T, triton.cdiv(H, block_h))
    _rope_kernel[grid](
        x,
        out,
        cos,
        sin,
        T,
        H,
        half,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        0 if cos.shape[0] == 1 else T * half,
        SIGN=-1.0 if inverse else 1.0,
        BLOCK_H=block_h,
        BLOCK_HALF=block_half,
    )
    return out


def rope_rotate(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,T,Hq,D), (B,T,Hk,D), (1|B,T,D/2) x2 -> (q_rot, k_rot), like the C++ op."""
    return _rotate_one(q, cos, sin, inverse), _rotate_one(k, cos, sin, inverse)


def _spec(dt: str, cdt: str, sign: float) -> dict:
    return {
        "name": f"rope[{dt}, cos={cdt}, sign={sign:+.0f}]",
        "fn": _rope_kernel,
        "signature": {
            "x_ptr": f"*{dt}",
            "out_ptr": f"*{dt}",
            "cos_ptr": f"*{cdt}",
            "sin_ptr": f"*{cdt}",
            "seq_len": "i32",
            "heads": "i32",
            "half": "i32",
            "stride_b": "i64",
            "stride_t": "i64",
            "stride_h": "i64",
            "cos_stride_b": "i64",
            "SIGN": "constexpr",
            "BLOCK_H": "constexpr",
            "BLOCK_HALF": "constexpr",
        },
        "constexprs": {"SIGN": sign, "BLOCK_H": 16, "BLOCK_HALF": 64},
    }


# Argument types for ahead-of-time compilation checks (compile_check.py).
COMPILE_SPECS = [
    _spec(dt, cdt, sign)
    for dt in ("fp32", "bf16", "fp16")
    for cdt in sorted({"fp32", dt})
    for sign in (1.0, -1.0)
]
