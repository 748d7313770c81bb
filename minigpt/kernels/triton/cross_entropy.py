"""Triton fused softmax + cross-entropy over a chunk of logits (linear_cross_entropy's core).

One program handles one row of a (rows, V) logits chunk, streaming the row in
BLOCK_V slices twice:

1. an online logsumexp: running max ``m`` and running sum ``s`` of ``exp(y - m)``,
   rescaled whenever the max grows, so any V fits in registers;
2. the gradient ``(exp(y - lse) * (1 + 2 z lse) - onehot) * scale`` written over
   the logits in place (``z`` is the optional z-loss weight: loss += z * lse**2).

``y`` is the (optionally soft-capped) logit; all math is float32 whatever the
storage dtype. The matmuls around this kernel (logits = h @ W^T, dh = grad @ W,
dW += grad^T @ h) are left to torch / cuBLAS, which already run them at peak.

The wrapper takes and returns exactly what ``torch.ops.minigpt.cross_entropy_chunk``
does, so :mod:`minigpt.kernels.linear_cross_entropy` drives both backends with
one loop.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _capped(x, softcap, HAS_CAP: tl.constexpr):
    # softcap * tanh(x / softcap), with tanh(z) = 1 - 2 / (exp(2z) + 1) (exact
    # limits; exp overflow to inf gives exactly 1).
    if HAS_CAP:
        x = softcap * (1.0 - 2.0 / (tl.exp(2.0 * x / softcap) + 1.0))
    return x


@triton.jit
def _cross_entropy_chunk_kernel(
    logits_ptr,
    targets_ptr,
    loss_ptr,
    lse_ptr,
    lse_in_ptr,
    row_scale_ptr,
    V,
    scale,
    ignore_index,
    softcap,
    z_loss,
    HAS_LSE_IN: tl.constexpr,
    HAS_ROW_SCALE: tl.constexpr,
    HAS_CAP: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * V
    t = tl.load(targets_ptr + row)
    valid = t != ignore_index
    # the wrapper has checked 0 <= t < V for valid rows; clamp anyway so an
    # ignored row never reads out of bounds
    t_safe = tl.where(valid, t, 0)
    cols = tl.arange(0, BLOCK_V)
    if HAS_LSE_IN:
        lse = tl.load(lse_in_ptr + row)
    else:
        m = -float("inf")
        s = 0.0
        for start in range(0, V, BLOCK_V):
            mask = start + cols < V
            x = tl.load(base + start + cols, mask=mask, other=-float("inf")).to(tl.float32)
            y = tl.where(mask, _capped(x, softcap, HAS_CAP), -float("inf"))
            m_new = tl.maximum(m, tl.max(y, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(y - m_new), axis=0)
            m = m_new
        lse = m + tl.log(s)
    y_t = _capped(tl.load(base + t_safe).to(tl.float32), softcap, HAS_CAP)
    tl.store(loss_ptr + row, tl.where(valid, lse - y_t + z_loss * lse * lse, 0.0))
    tl.store(lse_ptr + row, tl.where(valid, lse, 0.0))
    if WRITE_GRAD:
        sc = tl.load(row_scale_ptr + row) if HAS_ROW_SCALE else scale
        sc = tl.where(valid, sc, 0.0)  # ignored rows get an all-zero gradient
        zc = 1.0 + 2.0 * z_loss * lse  # the z-loss adds 2 z lse * softmax
        for start in range(0, V, BLOCK_V):
            mask = start + cols < V
            x = tl.load(base + start + cols, mask=mask, other=0.0).to(tl.float32)
            y = _capped(x, softcap, HAS_CAP)
            g = tl.exp(y - lse) * zc - tl.where(start + cols == t, 1.0, 0.0)
            if HAS_CAP:
                th = y / softcap
                g = g * (1.0 - th * th)
            g = tl.where(valid, g * sc, 0.0)  # where, not *: exp of a junk row may be inf
            tl.store(base + start + cols, g.to(logits_ptr.dtype.element_ty), mask=mask)


def _block_v(V: int, device: torch.device) -> int:
    if device.type != "cuda":  # interpreter: small blocks keep it quick
        return max(16, min(triton.next_power_of_2(V), 256))
    return max(16, min(triton.next_power_of_2(V), 4096))


def cross_entropy_chunk(
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse_in: torch.Tensor | None,
    row_scale: torch.Tensor | None,
    scale: float,
    ignore_index: int,
    softcap: float,
    z_loss: float,
    write_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, V) chunk step: returns float32 (loss, lse) per row; with ``write_grad``
    overwrites ``logits`` with the gradient. Same contract as the C++ op."""
    rows, V = logits.shape
    if not logits.is_contiguous() or not targets.is_contiguous():
        raise ValueError("cross_entropy_chunk: logits and targets must be contiguous")
    loss = torch.empty(rows, device=logits.device, dtype=torch.float32)
    lse = torch.empty(rows, device=logits.device, dtype=torch.float32)
    if rows == 0:
        return loss, lse
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= V))
    if bool(bad.any()):
        raise ValueError(f"cross_entropy_chunk: a target is outside [0, {V}) and not ignore_index")
    block = _block_v(V, logits.device)
    _cross_entropy_chunk_kernel[(rows,)](
        logits,
        targets,
        loss,
        lse,
        lse_in if lse_in is not None else loss,
        row_scale if row_scale is not None else loss,
        V,
        float(scale),
        int(ignore_index),
        float(softcap) if softcap > 0 else 1.0,
        float(z_loss),
        HAS_LSE_IN=lse_in is not None,
        HAS_ROW_SCALE=row_scale is not None,
        HAS_CAP=softcap > 0,
        WRITE_GRAD=write_grad,
        BLOCK_V=block,
        num_warps=min(max(block // 256, 1), 16),
    )
    return loss, lse


# Argument types for ahead-of-time compilation checks (compile_check.py).
COMPILE_SPECS = [
    {
        "name": f"cross_entropy_chunk[{dt}, lse_in={lse_in}, cap={cap}]",
        "fn": _cross_entropy_chunk_kernel,
        "signature": {
            "logits_ptr": f"*{dt}",
            "targets_ptr": "*i64",
            "loss_ptr": "*fp32",
            "lse_ptr": "*fp32",
            "lse_in_ptr": "*fp32",
            "row_scale_ptr": "*fp32",
            "V": "i32",
            "scale": "fp32",
            "ignore_index": "i64",
            "softcap": "fp32",
            "z_loss": "fp32",
            "HAS_LSE_IN": "constexpr",
            "HAS_ROW_SCALE": "constexpr",
            "HAS_CAP": "constexpr",
            "WRITE_GRAD": "constexpr",
            "BLOCK_V": "constexpr",
        },
        "constexprs": {
            "HAS_LSE_IN": lse_in,
            "HAS_ROW_SCALE": lse_in,
            "HAS_CAP": cap,
            "WRITE_GRAD": True,
            "BLOCK_V": 4096,
        },
        "options": {"num_warps": 16},
    }
    for dt in ("fp32", "bf16", "fp16")
    for lse_in in (False, True)
    for cap in (False, True)
]
