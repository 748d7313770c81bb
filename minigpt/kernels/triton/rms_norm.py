"""Triton RMSNorm (optionally fused with the residual add), forward and backward.

One program normalizes one row held entirely in registers (BLOCK_N >= n), so
the row is read once and written once. The backward pass gives each program a
contiguous slab of rows and lets it sum its share of the weight gradient in
float32 registers; the per-program partial sums are added at the end (no
atomics, deterministic).

Wrappers take and return exactly what ``torch.ops.minigpt.rms_norm_fwd/bwd`` do.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_N = 65536  # one row must fit in a program's registers/shared memory


@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    y_ptr,
    h_ptr,
    rstd_ptr,
    n,
    eps,
    HAS_RES: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n
    # Load in the storage dtype, compute in float32 (also required for correct
    # bf16 results in the interpreter).
    h = tl.load(x_ptr + row * n + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        h += tl.load(res_ptr + row * n + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(h_ptr + row * n + cols, h.to(h_ptr.dtype.element_ty), mask=mask)
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / n + eps)
    tl.store(rstd_ptr + row, rstd)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * n + cols, (h * rstd * w).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(
    dy_ptr,
    h_ptr,
    w_ptr,
    rstd_ptr,
    extra_ptr,
    dh_ptr,
    dw_partial_ptr,
    rows,
    n,
    rows_per_program,
    HAS_EXTRA: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    row_start = pid * rows_per_program
    for i in range(0, rows_per_program):
        row = row_start + i
        if row < rows:
            off = row.to(tl.int64) * n + cols
            dy = tl.load(dy_ptr + off, mask=mask, other=0.0).to(tl.float32)
            h = tl.load(h_ptr + off, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + row)
            g = dy * w
            c = tl.sum(g * h, axis=0) / n * rstd * rstd
            dh = rstd * (g - h * c)
            if HAS_EXTRA:
                dh += tl.load(extra_ptr + off, mask=mask, other=0.0).to(tl.float32)
            tl.store(dh_ptr + off, dh.to(dh_ptr.dtype.element_ty), mask=mask)
            dw += dy * h * rstd
    tl.store(dw_partial_ptr + pid * n + cols, dw, mask=mask)


def _block(n: int) -> int:
    if n > MAX_N:
        raise ValueError(f"the Triton RMSNorm handles rows of at most {MAX_N} elements, got {n}")
    return triton.next_power_of_2(n)


def rms_norm_fwd(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, n) forward: returns (y, h or empty, rstd) like the C++ op."""
    rows, n = x.shape
    y = torch.empty_like(x)
    h = torch.empty_like(x) if residual is not None else x.new_empty(0)
    rstd = torch.empty(rows, device=x.device, dtype=torch.float32)
    if rows == 0:
        return y, h, rstd
    block = _block(n)
    _rms_norm_fwd_kernel[(rows,)](
        x,
        residual if residual is not None else x,
        weight,
        y,
        h if residual is not None else y,
        rstd,
        n,
        eps,
        HAS_RES=residual is not None,
        BLOCK_N=block,
        num_warps=min(max(block // 256, 1), 16),
    )
    return y, h, rstd


def rms_norm_bwd(
    dy: torch.Tensor,
    h: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    dh_extra: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, n) backward: returns (dh, dweight) like the C++ op."""
    rows, n = h.shape
    dh = torch.empty_like(h)
    if rows == 0:
        return dh, torch.zeros_like(weight)
    block = _block(n)
    if h.device.type == "cuda":
        programs = min(rows, torch.cuda.get_device_properties(h.device).multi_processor_count * 4)
    else:  # interpreter: few programs keep it quick
        programs = min(rows, 4)
    per_program = triton.cdiv(rows, programs)
    programs = triton.cdiv(rows, per_program)
    partial = torch.empty(programs, n, device=h.device, dtype=torch.float32)
    _rms_norm_bwd_kernel[(programs,)](
        dy,
        h,
        weight,
        rstd,
        dh_extra if dh_extra is not None else dy,
        dh,
        partial,
        rows,
        n,
        per_program,
        HAS_EXTRA=dh_extra is not None,
        BLOCK_N=block,
        num_warps=min(max(block // 256, 1), 16),
    )
    return dh, partial.sum(0).to(weight.dtype)


# Argument types for ahead-of-time compilation checks (compile_check.py).
COMPILE_SPECS = [
    {
        "name": f"rms_norm_fwd[{dt}, res={res}]",
        "fn": _rms_norm_fwd_kernel,
        "signature": {
            "x_ptr": f"*{dt}",
            "res_ptr": f"*{dt}",
            "w_ptr": f"*{dt}",
            "y_ptr": f"*{dt}",
            "h_ptr": f"*{dt}",
            "rstd_ptr": "*fp32",
            "n": "i32",
            "eps": "fp32",
            "HAS_RES": "constexpr",
            "BLOCK_N": "constexpr",
        },
        "constexprs": {"HAS_RES": res, "BLOCK_N": 1024},
    }
    for dt in ("fp32", "bf16", "fp16")
    for res in (False, True)
] + [
    {
        "name": f"rms_norm_bwd[{dt}]",
        "fn": _rms_norm_bwd_kernel,
        "signature": {
            "dy_ptr": f"*{dt}",
            "h_ptr": f"*{dt}",
            "w_ptr": "*fp32",
            "rstd_ptr": "*fp32",
            "extra_ptr": f"*{dt}",
            "dh_ptr": f"*{dt}",
            "dw_partial_ptr": "*fp32",
            "rows": "i32",
            "n": "i32",
            "rows_per_program": "i32",
            "HAS_EXTRA": "constexpr",
            "BLOCK_N": "constexpr",
        },
        "constexprs": {"HAS_EXTRA": True, "BLOCK_N": 1024},
    }
    for dt in ("fp32", "bf16", "fp16")
]
