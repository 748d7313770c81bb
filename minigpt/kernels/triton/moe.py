"""Triton mixture-of-experts kernels: permute / unpermute, grouped GEMM, expert SwiGLU.

Wrappers take and return exactly what the C++ ops ``torch.ops.minigpt.moe_*`` and
``grouped_mm_*`` do (see ``csrc/cpu/moe.cpp``):

* permute: the histogram, offsets and each assignment's row come from a few torch
  ops on the small (N, k) id tensor (``bincount``, ``cumsum``, a stable sort);
  the row gather is a kernel, one program per expert-ordered row.
* unpermute (and the permute backward, with unit weights): one program per token
  gathers its k rows, multiplies by the router weights and sums in float32.
* grouped GEMM: the host lists the (expert, row-block) tiles -- only as many as
  each expert's rows need, no padding to a capacity -- and one program computes
  one BLOCK_M x BLOCK_N output tile of one expert with ``tl.dot``. One kernel
  serves ``y = x @ w[e].T`` and ``dx = dy @ w[e]`` (only the strides of the
  weight change); the weight gradient ``dw[e] = dy_e.T @ x_e`` has its own
  kernel, one program per output tile, looping over the expert's rows.
* SwiGLU on the fused (gate | up) activations, forward and backward.

Every low-precision load is converted to float32 (accumulation is float32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ROW_BLOCK = 128  # columns per step in the row kernels
ELEM_BLOCK = 1024
BM, BN, BK = 32, 32, 32  # GEMM tiles: tl.dot needs >= 16; small keeps interpreter tests fast


# ---- row movement ----------------------------------------------------------------------------


@triton.jit
def _gather_rows_kernel(x_ptr, token_ptr, out_ptr, d, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    tok = tl.load(token_ptr + row).to(tl.int64)
    for c0 in range(0, d, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        mask = cols < d
        v = tl.load(x_ptr + tok * d + cols, mask=mask, other=0.0).to(tl.float32)  # exact
        tl.store(out_ptr + row * d + cols, v.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _combine_kernel(
    src_ptr, slot_ptr, w_ptr, out_ptr, k, d, HAS_W: tl.constexpr, BLOCK: tl.constexpr
):
    # out[t] = sum_j w[t, j] * src[slot[t, j]] over slots >= 0 (w = 1 without HAS_W)
    t = tl.program_id(0).to(tl.int64)
    for c0 in range(0, d, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        cmask = cols < d
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for j in range(0, k):
            s = tl.load(slot_ptr + t * k + j)
            wt = tl.load(w_ptr + t * k + j).to(tl.float32) if HAS_W else 1.0
            s_vec = tl.zeros([BLOCK], dtype=tl.int64) + s  # broadcast: a vector mask
            s_ok = s_vec >= 0
            s_safe = tl.where(s_ok, s_vec, 0)
            v = tl.load(src_ptr + s_safe * d + cols, mask=cmask & s_ok, other=0.0).to(tl.float32)
            acc += wt * v
        tl.store(out_ptr + t * d + cols, acc.to(out_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _unpermute_bwd_kernel(
    dy_ptr, y_perm_ptr, slot_ptr, w_ptr, dy_perm_ptr, dw_ptr, k, d, BLOCK: tl.constexpr
):
    # one program per assignment (t, j): dy_perm[s] = w * dy[t]; dw[t, j] = <dy[t], y_perm[s]>
    a = tl.program_id(0).to(tl.int64)
    t = a // k
    s = tl.zeros([BLOCK], dtype=tl.int64) + tl.load(slot_ptr + a)  # broadcast: a vector mask
    s_ok = s >= 0
    s_safe = tl.where(s_ok, s, 0)
    wt = tl.load(w_ptr + a).to(tl.float32)
    dot = tl.zeros([BLOCK], dtype=tl.float32)
    for c0 in range(0, d, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        m = (cols < d) & s_ok
        g = tl.load(dy_ptr + t * d + cols, mask=m, other=0.0).to(tl.float32)
        y = tl.load(y_perm_ptr + s_safe * d + cols, mask=m, other=0.0).to(tl.float32)
        dot += g * y
        tl.store(dy_perm_ptr + s_safe * d + cols, (wt * g).to(dy_perm_ptr.dtype.element_ty), mask=m)
    tl.store(dw_ptr + a, tl.sum(dot, axis=0))


# ---- grouped GEMM ----------------------------------------------------------------------------


@triton.jit
def _grouped_mm_kernel(
    a_ptr,
    w_ptr,
    c_ptr,
    tile_expert_ptr,
    tile_row_ptr,
    offsets_ptr,
    n,
    kdim,
    stride_we,
    stride_bk,
    stride_bn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # C[rows of e, :] = A[rows of e, :] @ B_e
    # with B_e[kk, nn] = w[e * stride_we + kk * stride_bk + nn * stride_bn]
    tile = tl.program_id(0)
    e = tl.load(tile_expert_ptr + tile).to(tl.int64)
    row0 = tl.load(tile_row_ptr + tile).to(tl.int64)
    row_end = tl.load(offsets_ptr + e + 1).to(tl.int64)
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < row_end
    cmask = cols < n
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, kdim, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < kdim
        a = tl.load(
            a_ptr + rows[:, None] * kdim + ks[None, :],
            mask=rmask[:, None] & kmask[None, :],
            other=0.0,
        ).to(tl.float32)
        b = tl.load(
            w_ptr + e * stride_we + ks[:, None] * stride_bk + cols[None, :] * stride_bn,
            mask=kmask[:, None] & cmask[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.dot(a, b)
    tl.store(
        c_ptr + rows[:, None] * n + cols[None, :],
        acc.to(c_ptr.dtype.element_ty),
        mask=rmask[:, None] & cmask[None, :],
    )


@triton.jit
def _grouped_mm_dw_kernel(
    dy_ptr,
    x_ptr,
    dw_ptr,
    offsets_ptr,
    n,
    kdim,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # dw[e, n-tile, k-tile] = sum over the rows r of expert e of dy[r, n] * x[r, k]
    e = tl.program_id(0).to(tl.int64)
    ns = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.program_id(2).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    nmask = ns < n
    kmask = ks < kdim
    start = tl.load(offsets_ptr + e).to(tl.int64)
    end = tl.load(offsets_ptr + e + 1).to(tl.int64)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for r0 in range(start, end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        rmask = rows < end
        dyt = tl.load(
            dy_ptr + rows[None, :] * n + ns[:, None],
            mask=nmask[:, None] & rmask[None, :],
            other=0.0,
        ).to(tl.float32)
        xv = tl.load(
            x_ptr + rows[:, None] * kdim + ks[None, :],
            mask=rmask[:, None] & kmask[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.dot(dyt, xv)
    tl.store(
        dw_ptr + e * n * kdim + ns[:, None] * kdim + ks[None, :],
        acc.to(dw_ptr.dtype.element_ty),
        mask=nmask[:, None] & kmask[None, :],
    )


# ---- SwiGLU on the fused (gate | up) activations ----------------------------------------


@triton.jit
def _swiglu_fused_fwd_kernel(gu_ptr, h_ptr, total, f, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    r = offs // f
    c = offs % f
    g = tl.load(gu_ptr + r * 2 * f + c, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + r * 2 * f + f + c, mask=mask, other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-g))
    tl.store(h_ptr + offs, (g * s * u).to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_fused_bwd_kernel(dh_ptr, gu_ptr, dgu_ptr, total, f, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    r = offs // f
    c = offs % f
    dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gu_ptr + r * 2 * f + c, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + r * 2 * f + f + c, mask=mask, other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-g))
    silu = g * s
    ty = dgu_ptr.dtype.element_ty
    tl.store(dgu_ptr + r * 2 * f + c, (dh * u * (s + silu * (1.0 - s))).to(ty), mask=mask)
    tl.store(dgu_ptr + r * 2 * f + f + c, (dh * silu).to(ty), mask=mask)


# ---- wrappers (the C++ ops' signatures) ------------------------------------------------------


def moe_permute_fwd(
    x: torch.Tensor, expert_ids: torch.Tensor, n_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_perm, offsets, slot_of), like ``torch.ops.minigpt.moe_permute_fwd``."""
    n, k = expert_ids.shape
    flat = expert_ids.reshape(-1)
    valid = flat >= 0
    counts = torch.bincount(flat[valid], minlength=n_experts)
    offsets = torch.zeros(n_experts + 1, dtype=torch.long, device=x.device)
    offsets[1:] = counts.cumsum(0)
    # stable sort by expert (dropped = -1 sort first and are cut off): row order
    order = torch.sort(torch.where(valid, flat, -1), stable=True).indices
    n_dropped = int((~valid).sum())
    kept = order[n_dropped:]
    slot_of = torch.full((n * k,), -1, dtype=torch.long, device=x.device)
    slot_of[kept] = torch.arange(kept.numel(), device=x.device)
    token_of = (kept // k).contiguous()
    m, d = kept.numel(), x.shape[1]
    x_perm = torch.empty(m, d, dtype=x.dtype, device=x.device)
    if m and d:
        _gather_rows_kernel[(m,)](x, token_of, x_perm, d, BLOCK=ROW_BLOCK)
    return x_perm, offsets, slot_of.view(n, k)


def _combine(src: torch.Tensor, slot_of: torch.Tensor, weights: torch.Tensor | None):
    n, k = slot_of.shape
    d = src.shape[1]
    out = torch.empty(n, d, dtype=src.dtype, device=src.device)
    if n and d:
        w = weights if weights is not None else slot_of  # unused pointer when HAS_W=False
        _combine_kernel[(n,)](
            src, slot_of, w, out, k, d, HAS_W=weights is not None, BLOCK=ROW_BLOCK
        )
    return out


def moe_permute_bwd(dx_perm: torch.Tensor, slot_of: torch.Tensor) -> torch.Tensor:
    """dx[t] = sum of t's rows of dx_perm."""
    return _combine(dx_perm, slot_of, None)


def moe_unpermute_fwd(
    y_perm: torch.Tensor, slot_of: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """y[t] = sum_j weights[t, j] * y_perm[slot_of[t, j]]."""
    return _combine(y_perm, slot_of, weights)


def moe_unpermute_bwd(
    dy: torch.Tensor, y_perm: torch.Tensor, slot_of: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dy_perm, dweights), like ``torch.ops.minigpt.moe_unpermute_bwd``."""
    n, k = slot_of.shape
    d = y_perm.shape[1]
    dy_perm = torch.empty_like(y_perm)
    dw = torch.zeros(n, k, dtype=torch.float32, device=dy.device)
    if n * k:
        _unpermute_bwd_kernel[(n * k,)](
            dy, y_perm, slot_of, weights, dy_perm, dw, k, d, BLOCK=ROW_BLOCK
        )
    return dy_perm, dw


def _tiles(offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(expert, first row) of every BM-row tile, only as many as each expert needs."""
    rows = offsets[1:] - offsets[:-1]
    per_expert = (rows + BM - 1) // BM
    experts = torch.repeat_interleave(torch.arange(rows.numel(), device=offsets.device), per_expert)
    first_tile = torch.cumsum(per_expert, 0) - per_expert
    within = torch.arange(experts.numel(), device=offsets.device) - first_tile[experts]
    row0 = offsets[:-1][experts] + within * BM
    return experts.to(torch.int32).contiguous(), row0.to(torch.int64).contiguous()


def _run_grouped(a, w, offsets, n, kdim, stride_bk, stride_bn):
    c = torch.empty(a.shape[0], n, dtype=a.dtype, device=a.device)
    if a.shape[0] == 0 or n == 0:
        return c
    experts, row0 = _tiles(offsets)
    grid = (experts.numel(), triton.cdiv(n, BN))
    _grouped_mm_kernel[grid](
        a, w, c, experts, row0, offsets, n, kdim, w.stride(0), stride_bk, stride_bn,
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK,
    )  # fmt: skip
    return c


def grouped_mm_fwd(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """y[rows of e] = x[rows of e] @ w[e].T; w is (E, N, K)."""
    n, kdim = w.shape[1], w.shape[2]
    return _run_grouped(x, w, offsets, n, kdim, stride_bk=1, stride_bn=kdim)


def grouped_mm_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    w: torch.Tensor,
    offsets: torch.Tensor,
    need_dx: bool,
    need_dw: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dw) like ``torch.ops.minigpt.grouped_mm_bwd`` (empty tensors when not needed)."""
    n, kdim = w.shape[1], w.shape[2]
    dx = x.new_empty(0)
    dw = w.new_empty(0)
    if need_dx:
        dx = _run_grouped(dy, w, offsets, kdim, n, stride_bk=kdim, stride_bn=1)
    if need_dw:
        dw = torch.empty_like(w)
        if dw.numel():
            grid = (w.shape[0], triton.cdiv(n, BN), triton.cdiv(kdim, BK))
            _grouped_mm_dw_kernel[grid](
                dy, x, dw, offsets, n, kdim, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK
            )
    return dx, dw


def moe_swiglu_fwd(gate_up: torch.Tensor) -> torch.Tensor:
    """(M, 2F) fused gate|up -> (M, F) silu(gate) * up."""
    m, f = gate_up.shape[0], gate_up.shape[1] // 2
    h = torch.empty(m, f, dtype=gate_up.dtype, device=gate_up.device)
    total = m * f
    if total:
        _swiglu_fused_fwd_kernel[(triton.cdiv(total, ELEM_BLOCK),)](
            gate_up, h, total, f, BLOCK=ELEM_BLOCK
        )
    return h


def moe_swiglu_bwd(dh: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    """(dh, gate_up) -> d(gate_up), like ``torch.ops.minigpt.moe_swiglu_bwd``."""
    m, f = dh.shape
    dgu = torch.empty_like(gate_up)
    total = m * f
    if total:
        _swiglu_fused_bwd_kernel[(triton.cdiv(total, ELEM_BLOCK),)](
            dh, gate_up, dgu, total, f, BLOCK=ELEM_BLOCK
        )
    return dgu


# Argument types for ahead-of-time compilation checks (compile_check.py).
_GEMM = {"BLOCK_M": BM, "BLOCK_N": BN, "BLOCK_K": BK}
COMPILE_SPECS = []
for _dt in ("fp32", "bf16"):
    COMPILE_SPECS += [
        {
            "name": f"moe_gather_rows[{_dt}]",
            "fn": _gather_rows_kernel,
            "signature": {"x_ptr": f"*{_dt}", "token_ptr": "*i64", "out_ptr": f"*{_dt}"}
            | {"d": "i64", "BLOCK": "constexpr"},
            "constexprs": {"BLOCK": ROW_BLOCK},
        },
        {
            "name": f"moe_combine[{_dt}]",
            "fn": _combine_kernel,
            "signature": {"src_ptr": f"*{_dt}", "slot_ptr": "*i64", "w_ptr": "*fp32"}
            | {"out_ptr": f"*{_dt}", "k": "i64", "d": "i64"}
            | {"HAS_W": "constexpr", "BLOCK": "constexpr"},
            "constexprs": {"HAS_W": True, "BLOCK": ROW_BLOCK},
        },
        {
            "name": f"moe_unpermute_bwd[{_dt}]",
            "fn": _unpermute_bwd_kernel,
            "signature": {"dy_ptr": f"*{_dt}", "y_perm_ptr": f"*{_dt}", "slot_ptr": "*i64"}
            | {"w_ptr": "*fp32", "dy_perm_ptr": f"*{_dt}", "dw_ptr": "*fp32"}
            | {"k": "i64", "d": "i64", "BLOCK": "constexpr"},
            "constexprs": {"BLOCK": ROW_BLOCK},
        },
        {
            "name": f"grouped_mm[{_dt}]",
            "fn": _grouped_mm_kernel,
            "signature": {"a_ptr": f"*{_dt}", "w_ptr": f"*{_dt}", "c_ptr": f"*{_dt}"}
            | {"tile_expert_ptr": "*i32", "tile_row_ptr": "*i64", "offsets_ptr": "*i64"}
            | {"n": "i64", "kdim": "i64", "stride_we": "i64", "stride_bk": "i64"}
            | {"stride_bn": "i64"}
            | dict.fromkeys(_GEMM, "constexpr"),
            "constexprs": _GEMM,
        },
        {
            "name": f"grouped_mm_dw[{_dt}]",
            "fn": _grouped_mm_dw_kernel,
            "signature": {"dy_ptr": f"*{_dt}", "x_ptr": f"*{_dt}", "dw_ptr": f"*{_dt}"}
            | {"offsets_ptr": "*i64", "n": "i64", "kdim": "i64"}
            | dict.fromkeys(_GEMM, "constexpr"),
            "constexprs": _GEMM,
        },
        {
            "name": f"moe_swiglu_fwd[{_dt}]",
            "fn": _swiglu_fused_fwd_kernel,
            "signature": {"gu_ptr": f"*{_dt}", "h_ptr": f"*{_dt}", "total": "i64", "f": "i64"}
            | {"BLOCK": "constexpr"},
            "constexprs": {"BLOCK": ELEM_BLOCK},
        },
        {
            "name": f"moe_swiglu_bwd[{_dt}]",
            "fn": _swiglu_fused_bwd_kernel,
            "signature": {"dh_ptr": f"*{_dt}", "gu_ptr": f"*{_dt}", "dgu_ptr": f"*{_dt}"}
            | {"total": "i64", "f": "i64", "BLOCK": "constexpr"},
            "constexprs": {"BLOCK": ELEM_BLOCK},
        },
    ]
