"""Triton mixed matmul for weight-only quantized linear layers (int8, int4, NF4).

``y = x @ dequantize(W)^T (+ bias)`` with W in one of the formats of
:mod:`minigpt.kernels.reference.quant`. Each program computes a
(BLOCK_M, BLOCK_N) tile of y: it walks K in steps of BLOCK_K, loads the packed
weight bytes of its BLOCK_N output channels, decodes them in registers
(int8: code * channel scale; int4: (code - zero) * group scale; NF4: codebook
value * block absmax) and feeds them to ``tl.dot`` with float32 accumulation.
The float weight matrix never exists in global memory, so the kernel reads 1
(int8) or ~0.55 (4-bit) bytes per weight instead of 2 or 4.

4-bit codes use the split-halves layout: element k of a row lives in byte
``(k // 32) * 16 + k % 16``, low nibble if ``k % 32 < 16`` else high nibble.

fp32 activations use an exact (IEEE, not TF32) dot; bf16/fp16 activations
multiply in their own dtype (the decoded weight is rounded to it, as
``F.linear(x, dequantize(W).to(x.dtype))`` would) with float32 accumulation.
The wrapper has the signature of ``torch.ops.minigpt.quant_linear``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from minigpt.kernels.reference.quant import NF4_CODEBOOK

_CODEBOOKS: dict[torch.device, torch.Tensor] = {}


@triton.jit
def _quant_linear_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    z_ptr,
    cb_ptr,
    b_ptr,
    y_ptr,
    M,
    N,
    K,
    GROUP,
    FMT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    LOW_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    rn64 = rn.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if FMT == 0:  # int8: one scale per output channel
        ch_scale = tl.load(s_ptr + rn64, mask=n_ok, other=0.0).to(tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        x_mask = m_ok[:, None] & k_ok[None, :]
        x = tl.load(x_ptr + rm.to(tl.int64)[:, None] * K + rk[None, :], mask=x_mask, other=0.0)
        x = x.to(tl.float32)
        w_mask = n_ok[:, None] & k_ok[None, :]
        if FMT == 0:
            q = tl.load(q_ptr + rn64[:, None] * K + rk[None, :], mask=w_mask, other=0)
            w = q.to(tl.float32) * ch_scale[:, None]
        else:
            byte = (rk // 32) * 16 + rk % 16
            shift = ((rk % 32) // 16) * 4
            packed = tl.load(q_ptr + rn64[:, None] * (K // 2) + byte[None, :], mask=w_mask, other=0)
            code = (packed.to(tl.int32) >> shift[None, :]) & 0xF
            s_idx = rn64[:, None] * (K // GROUP) + (rk // GROUP)[None, :]
            s = tl.load(s_ptr + s_idx, mask=w_mask, other=0.0).to(tl.float32)
            if FMT == 1:  # int4: (code - zero) * scale
                z = tl.load(z_ptr + s_idx, mask=w_mask, other=0).to(tl.float32)
                w = (code.to(tl.float32) - z) * s
            else:  # nf4: codebook[code] * absmax
                w = tl.load(cb_ptr + code, mask=w_mask, other=0.0).to(tl.float32) * s
        if LOW_PRECISION:
            xd = x.to(y_ptr.dtype.element_ty)
            acc += tl.dot(xd, tl.trans(w.to(y_ptr.dtype.element_ty)), out_dtype=tl.float32)
        else:
            acc += tl.dot(x, tl.trans(w), input_precision="ieee", out_dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn64, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_mask = m_ok[:, None] & n_ok[None, :]
    out = y_ptr + rm.to(tl.int64)[:, None] * N + rn64[None, :]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=y_mask)


def _codebook(device: torch.device) -> torch.Tensor:
    if device not in _CODEBOOKS:
        _CODEBOOKS[device] = torch.tensor(NF4_CODEBOOK, dtype=torch.float32, device=device)
    return _CODEBOOKS[device]


def quant_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    fmt: int,
    block: int,
) -> torch.Tensor:
    """(M, K) x (N, K) quantized -> (M, N) in x's dtype; same arguments as the C++ op."""
    x = x.contiguous()
    m, k = x.shape
    n = qweight.shape[0]
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    if m == 0 or n == 0:
        return y
    if k == 0:
        y.zero_()
        return y + bias.to(x.dtype) if bias is not None else y
    bias_f = bias.float().contiguous() if bias is not None else None
    low = x.dtype != torch.float32 and x.device.type == "cuda"
    block_m = 16 if m <= 16 else 32
    block_n, block_k = 64, 32 if fmt != 0 else 64
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _quant_linear_kernel[grid](
        x,
        qweight,
        scales,
        zeros if zeros is not None else qweight,
        _codebook(x.device),
        bias_f if bias_f is not None else scales,
        y,
        m,
        n,
        k,
        max(int(block), 1),
        FMT=int(fmt),
        HAS_BIAS=bias is not None,
        LOW_PRECISION=low,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
    )
    return y


_SCALE_TYPE = {0: "*fp32", 1: "*bf16", 2: "*fp32"}
_CODE_TYPE = {0: "*i8", 1: "*u8", 2: "*u8"}

# Argument types for ahead-of-time compilation checks (compile_check.py).
COMPILE_SPECS = [
    {
        "name": f"quant_linear[fmt={fmt}, {dt}]",
        "fn": _quant_linear_kernel,
        "signature": {
            "x_ptr": f"*{dt}",
            "q_ptr": _CODE_TYPE[fmt],
            "s_ptr": _SCALE_TYPE[fmt],
            "z_ptr": "*u8" if fmt == 1 else _CODE_TYPE[fmt],
            "cb_ptr": "*fp32",
            "b_ptr": "*fp32",
            "y_ptr": f"*{dt}",
            "M": "i32",
            "N": "i32",
            "K": "i32",
            "GROUP": "i32",
            "FMT": "constexpr",
            "HAS_BIAS": "constexpr",
            "LOW_PRECISION": "constexpr",
            "BLOCK_M": "constexpr",
            "BLOCK_N": "constexpr",
            "BLOCK_K": "constexpr",
        },
        "constexprs": {
            "FMT": fmt,
            "HAS_BIAS": True,
            "LOW_PRECISION": dt != "fp32",
            "BLOCK_M": 16,
            "BLOCK_N": 64,
            "BLOCK_K": 32 if fmt else 64,
        },
    }
    for fmt in (0, 1, 2)
    for dt in ("fp32", "bf16", "fp16")
]
