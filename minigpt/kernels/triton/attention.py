"""Triton flash attention: forward and backward over packed (varlen) sequences.

The same flat layout as the C++ ops: q (total_q, Hq, D), k/v (total_k, Hkv, D),
document b owning rows ``cu_seqlens[b]:cu_seqlens[b+1]`` (a dense (B, T) batch is
B documents of T tokens). Grouped-query attention: query head h reads kv head
``h // (Hq // Hkv)``; nothing is repeated in memory.

* forward: one program per (query block, document x query head). It walks the
  visible key blocks keeping the running max ``m``, sum ``l`` and float32
  accumulator (online softmax, in base 2: ``exp2`` is the native instruction), and
  writes the output and the log-sum-exp.
* backward: ``delta = rowsum(dO * O)`` first; then one program per (key block,
  document x kv head) recomputes ``P = exp(S - lse)`` block by block and sums dK,
  dV over every query head of its group (no atomics); a second kernel, one
  program per query block, recomputes P again for dQ. No (T, T) matrix is stored.

Matrix products run on tensor cores (``mma`` on sm_80, ``wgmma``/``mma`` on sm_90)
for bf16/fp16 inputs with float32 accumulation: tiles are loaded, widened to
float32 (also what the CPU interpreter needs for correct bf16 arithmetic) and
narrowed back to the input dtype right before each ``tl.dot``, which is exact for
q/k/v/dO and rounds only P and dS, as every flash-attention kernel does.
Wrappers take and return exactly what ``torch.ops.minigpt.attention_fwd/bwd`` do,
plus ``max_seqlen_q/k`` to size the grids.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _mm(a, b, dt, LOWP_DOT: tl.constexpr):
    """a @ b with float32 accumulation; operands narrowed to the input dtype ``dt`` for
    tensor cores when LOWP_DOT (bf16/fp16 on a GPU), else exact float32 products."""
    if LOWP_DOT:
        return tl.dot(a.to(dt), b.to(dt))
    else:
        return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _visible(offs_m, offs_n, q_len, k_len, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """(BLOCK_M, BLOCK_N) mask: key offs_n visible to query offs_m (bottom-right aligned)."""
    pos = offs_m[:, None] + (k_len - q_len)
    ok = (offs_n[None, :] < k_len) & (offs_m[:, None] < q_len)
    if CAUSAL:
        ok = ok & (offs_n[None, :] <= pos)
    if HAS_WINDOW:
        ok = ok & (pos - offs_n[None, :] < window)
        if not CAUSAL:
            ok = ok & (offs_n[None, :] - pos < window)
    return ok


@triton.jit
def _key_range(
    m0,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    q_len,
    k_len,
    window,
    CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
):
    """[lo, hi) of key positions any query in [m0, m0 + BLOCK_M) can see; lo is block aligned."""
    shift = k_len - q_len
    lo = 0
    hi = k_len
    if CAUSAL:
        hi = tl.minimum(hi, m0 + BLOCK_M + shift)
    if HAS_WINDOW:
        lo = tl.maximum(0, m0 + shift - window + 1)
        lo = (lo // BLOCK_N) * BLOCK_N
        if not CAUSAL:
            hi = tl.minimum(hi, m0 + BLOCK_M - 1 + shift + window)
    return lo, hi


@triton.jit
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, cu_q_ptr, cu_k_ptr,
    scale, window, HQ, GROUP, D,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, LOWP_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HQ
    h = pid_bh % HQ
    kvh = h // GROUP
    q_start = tl.load(cu_q_ptr + b).to(tl.int64)
    q_len = (tl.load(cu_q_ptr + b + 1) - q_start).to(tl.int32)
    k_start = tl.load(cu_k_ptr + b).to(tl.int64)
    k_len = (tl.load(cu_k_ptr + b + 1) - k_start).to(tl.int32)
    m0 = pid_m * BLOCK_M
    if m0 >= q_len:
        return
    HKV = HQ // GROUP
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    mask_q = (offs_m < q_len)[:, None] & mask_d[None, :]
    q_rows = (q_start + offs_m)[:, None] * (HQ * D) + h * D + offs_d[None, :]
    dt = q_ptr.dtype.element_ty
    q = tl.load(q_ptr + q_rows, mask=mask_q, other=0.0).to(tl.float32)
    qk_scale = scale * 1.4426950408889634  # scores in base 2
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    lo, hi = _key_range(m0, BLOCK_M, BLOCK_N, q_len, k_len, window, CAUSAL, HAS_WINDOW)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + offs_n0
        mask_k = (offs_n < k_len)[:, None] & mask_d[None, :]
        kv_rows = (k_start + offs_n)[:, None] * (HKV * D) + kvh * D + offs_d[None, :]
        k = tl.load(k_ptr + kv_rows, mask=mask_k, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + kv_rows, mask=mask_k, other=0.0).to(tl.float32)
        s = _mm(q, tl.trans(k), dt, LOWP_DOT) * qk_scale
        ok = _visible(offs_m, offs_n, q_len, k_len, window, CAUSAL, HAS_WINDOW)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing seen yet
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _mm(p, v, dt, LOWP_DOT)
        m_i = m_new
    has_any = l_i > 0.0
    out = acc / tl.where(has_any, l_i, 1.0)[:, None]
    tl.store(out_ptr + q_rows, out.to(out_ptr.dtype.element_ty), mask=mask_q)
    lse = tl.where(
        has_any, (m_i + tl.log2(tl.where(has_any, l_i, 1.0))) * 0.6931471805599453, float("-inf")
    )
    tl.store(lse_ptr + (q_start + offs_m) * HQ + h, lse, mask=offs_m < q_len)


@triton.jit
def _attn_bwd_delta_kernel(out_ptr, dout_ptr, delta_ptr, rows, D,
                           BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
    # delta[row] = sum(dO * O) over the head dim; rows = total_q * Hq (flat)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < rows)[:, None] & (offs_d < D)[None, :]
    idx = offs_m.to(tl.int64)[:, None] * D + offs_d[None, :]
    o = tl.load(out_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(dout_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    tl.store(delta_ptr + offs_m, tl.sum(o * do, axis=1), mask=offs_m < rows)


@triton.jit
def _attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, cu_q_ptr, cu_k_ptr,
    scale, window, HQ, GROUP, D,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, LOWP_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    HKV = HQ // GROUP
    b = pid_bh // HKV
    kvh = pid_bh % HKV
    q_start = tl.load(cu_q_ptr + b).to(tl.int64)
    q_len = (tl.load(cu_q_ptr + b + 1) - q_start).to(tl.int32)
    k_start = tl.load(cu_k_ptr + b).to(tl.int64)
    k_len = (tl.load(cu_k_ptr + b + 1) - k_start).to(tl.int32)
    n0 = pid_n * BLOCK_N
    if n0 >= k_len:
        return
    dt = q_ptr.dtype.element_ty
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    mask_k = (offs_n < k_len)[:, None] & mask_d[None, :]
    kv_rows = (k_start + offs_n)[:, None] * (HKV * D) + kvh * D + offs_d[None, :]
    k = tl.load(k_ptr + kv_rows, mask=mask_k, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + kv_rows, mask=mask_k, other=0.0).to(tl.float32)
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    qk_scale = scale * 1.4426950408889634
    shift = k_len - q_len
    # first query block that can see this key block (causal) / last one (window)
    m_lo = 0
    m_hi = q_len
    if CAUSAL:
        m_lo = tl.maximum(0, n0 - shift)
        m_lo = (m_lo // BLOCK_M) * BLOCK_M
    if HAS_WINDOW:
        m_hi = tl.minimum(q_len, n0 + BLOCK_N - 1 - shift + window)
        if not CAUSAL:
            m_lo = tl.maximum(0, n0 - shift - window + 1)
            m_lo = (m_lo // BLOCK_M) * BLOCK_M
    for g in range(0, GROUP):
        h = kvh * GROUP + g
        for m0 in range(m_lo, m_hi, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            mask_q = (offs_m < q_len)[:, None] & mask_d[None, :]
            q_rows = (q_start + offs_m)[:, None] * (HQ * D) + h * D + offs_d[None, :]
            q = tl.load(q_ptr + q_rows, mask=mask_q, other=0.0).to(tl.float32)
            do = tl.load(dout_ptr + q_rows, mask=mask_q, other=0.0).to(tl.float32)
            stat = (q_start + offs_m) * HQ + h
            lse = tl.load(lse_ptr + stat, mask=offs_m < q_len, other=0.0)
            lse = tl.where(lse == float("-inf"), float("inf"), lse)  # empty row: P = 0
            delta = tl.load(delta_ptr + stat, mask=offs_m < q_len, other=0.0)
            s = _mm(q, tl.trans(k), dt, LOWP_DOT) * qk_scale
            ok = _visible(offs_m, offs_n, q_len, k_len, window, CAUSAL, HAS_WINDOW)
            p = tl.where(ok, tl.exp2(s - lse[:, None] * 1.4426950408889634), 0.0)
            dv += _mm(tl.trans(p), do, dt, LOWP_DOT)
            dp = _mm(do, tl.trans(v), dt, LOWP_DOT)
            ds = p * (dp - delta[:, None])
            dk += _mm(tl.trans(ds), q, dt, LOWP_DOT)
    tl.store(dk_ptr + kv_rows, (dk * scale).to(dk_ptr.dtype.element_ty), mask=mask_k)
    tl.store(dv_ptr + kv_rows, dv.to(dv_ptr.dtype.element_ty), mask=mask_k)


@triton.jit
def _attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr, dq_ptr, cu_q_ptr, cu_k_ptr,
    scale, window, HQ, GROUP, D,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, LOWP_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HQ
    h = pid_bh % HQ
    kvh = h // GROUP
    HKV = HQ // GROUP
    q_start = tl.load(cu_q_ptr + b).to(tl.int64)
    q_len = (tl.load(cu_q_ptr + b + 1) - q_start).to(tl.int32)
    k_start = tl.load(cu_k_ptr + b).to(tl.int64)
    k_len = (tl.load(cu_k_ptr + b + 1) - k_start).to(tl.int32)
    m0 = pid_m * BLOCK_M
    if m0 >= q_len:
        return
    dt = q_ptr.dtype.element_ty
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    mask_q = (offs_m < q_len)[:, None] & mask_d[None, :]
    q_rows = (q_start + offs_m)[:, None] * (HQ * D) + h * D + offs_d[None, :]
    q = tl.load(q_ptr + q_rows, mask=mask_q, other=0.0).to(tl.float32)
    do = tl.load(dout_ptr + q_rows, mask=mask_q, other=0.0).to(tl.float32)
    stat = (q_start + offs_m) * HQ + h
    lse = tl.load(lse_ptr + stat, mask=offs_m < q_len, other=0.0)
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    delta = tl.load(delta_ptr + stat, mask=offs_m < q_len, other=0.0)
    qk_scale = scale * 1.4426950408889634
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    lo, hi = _key_range(m0, BLOCK_M, BLOCK_N, q_len, k_len, window, CAUSAL, HAS_WINDOW)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + offs_n0
        mask_k = (offs_n < k_len)[:, None] & mask_d[None, :]
        kv_rows = (k_start + offs_n)[:, None] * (HKV * D) + kvh * D + offs_d[None, :]
        k = tl.load(k_ptr + kv_rows, mask=mask_k, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + kv_rows, mask=mask_k, other=0.0).to(tl.float32)
        s = _mm(q, tl.trans(k), dt, LOWP_DOT) * qk_scale
        ok = _visible(offs_m, offs_n, q_len, k_len, window, CAUSAL, HAS_WINDOW)
        p = tl.where(ok, tl.exp2(s - lse[:, None] * 1.4426950408889634), 0.0)
        dp = _mm(do, tl.trans(v), dt, LOWP_DOT)
        ds = p * (dp - delta[:, None])
        dq += _mm(ds, k, dt, LOWP_DOT)
    tl.store(dq_ptr + q_rows, (dq * scale).to(dq_ptr.dtype.element_ty), mask=mask_q)


def _lowp_dot(q: torch.Tensor) -> bool:
    """Narrow dot operands to bf16/fp16 (tensor cores) on a GPU. The CPU interpreter
    computes bf16 dots wrongly, so there the products stay in float32."""
    if q.dtype == torch.float32:
        return False
    return q.device.type == "cuda" or q.dtype == torch.float16


def _blocks(q: torch.Tensor) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): GPU-sized tiles, or small ones for the interpreter."""
    if q.device.type == "cuda":
        return 64, 64, 4
    return 16, 16, 1


def attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float,
    causal: bool,
    window: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat (tokens, heads, D) forward: returns (out, lse (total_q, Hq) float32)."""
    total_q, hq, d = q.shape
    hkv = k.shape[1]
    n_seqs = cu_seqlens_q.numel() - 1
    out = torch.zeros_like(q)
    lse = torch.full((total_q, hq), float("-inf"), device=q.device, dtype=torch.float32)
    if total_q == 0 or n_seqs == 0 or max_seqlen_q == 0:
        return out, lse
    bm, bn, warps = _blocks(q)
    grid = (triton.cdiv(max_seqlen_q, bm), n_seqs * hq)
    _attn_fwd_kernel[grid](
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
        scale, max(window, 1), hq, hq // hkv, d,
        CAUSAL=causal, HAS_WINDOW=window > 0, LOWP_DOT=_lowp_dot(q),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=max(16, triton.next_power_of_2(d)), num_warps=warps,
    )  # fmt: skip
    return out, lse


def attention_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float,
    causal: bool,
    window: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat (tokens, heads, D) backward: returns (dq, dk, dv)."""
    total_q, hq, d = q.shape
    hkv = k.shape[1]
    n_seqs = cu_seqlens_q.numel() - 1
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if n_seqs == 0 or (max_seqlen_q == 0 and max_seqlen_k == 0):
        return dq, dk, dv
    bm, bn, warps = _blocks(q)
    bd = max(16, triton.next_power_of_2(d))
    delta = torch.empty((total_q, hq), device=q.device, dtype=torch.float32)
    rows = total_q * hq
    if rows:
        _attn_bwd_delta_kernel[(triton.cdiv(rows, 64),)](
            out, dout, delta, rows, d, BLOCK_M=64, BLOCK_D=bd
        )
    common = dict(
        CAUSAL=causal, HAS_WINDOW=window > 0, LOWP_DOT=_lowp_dot(q), BLOCK_M=bm, BLOCK_N=bn,
        BLOCK_D=bd,
    )  # fmt: skip
    if max_seqlen_k > 0:
        _attn_bwd_dkdv_kernel[(triton.cdiv(max_seqlen_k, bn), n_seqs * hkv)](
            q, k, v, dout, lse, delta, dk, dv, cu_seqlens_q, cu_seqlens_k,
            scale, max(window, 1), hq, hq // hkv, d, num_warps=warps, **common,
        )  # fmt: skip
    if max_seqlen_q > 0:
        _attn_bwd_dq_kernel[(triton.cdiv(max_seqlen_q, bm), n_seqs * hq)](
            q, k, v, dout, lse, delta, dq, cu_seqlens_q, cu_seqlens_k,
            scale, max(window, 1), hq, hq // hkv, d, num_warps=warps, **common,
        )  # fmt: skip
    return dq, dk, dv


def _spec(name, fn, pointers, dt, causal, window, block_d=128):
    sig = {p: (f"*{dt}" if p not in ("lse_ptr", "delta_ptr") else "*fp32") for p in pointers}
    sig.update({"cu_q_ptr": "*i32", "cu_k_ptr": "*i32"})
    sig.update({"scale": "fp32", "window": "i32", "HQ": "i32", "GROUP": "i32", "D": "i32"})
    consts = {"CAUSAL": causal, "HAS_WINDOW": window, "LOWP_DOT": True, "BLOCK_M": 64}
    consts["BLOCK_N"] = 64
    consts["BLOCK_D"] = block_d
    sig.update({c: "constexpr" for c in consts})
    return {
        "name": f"{name}[{dt}, causal={causal}, window={window}, D={block_d}]",
        "fn": fn,
        "signature": sig,
        "constexprs": consts,
    }


_FWD_PTRS = ("q_ptr", "k_ptr", "v_ptr", "out_ptr", "lse_ptr")
_DKDV_PTRS = ("q_ptr", "k_ptr", "v_ptr", "dout_ptr", "lse_ptr", "delta_ptr", "dk_ptr", "dv_ptr")
_DQ_PTRS = ("q_ptr", "k_ptr", "v_ptr", "dout_ptr", "lse_ptr", "delta_ptr", "dq_ptr")

# Argument types for ahead-of-time compilation checks (compile_check.py). A
# representative set (compiling is slow): each kernel once, both 16-bit dtypes, the
# causal and the sliding-window variants, head dims 128 and 64.
COMPILE_SPECS = [
    _spec("attention_fwd", _attn_fwd_kernel, _FWD_PTRS, "bf16", True, False),
    _spec("attention_fwd", _attn_fwd_kernel, _FWD_PTRS, "fp16", False, True, 64),
    _spec("attention_bwd_dkdv", _attn_bwd_dkdv_kernel, _DKDV_PTRS, "bf16", True, False),
    _spec("attention_bwd_dq", _attn_bwd_dq_kernel, _DQ_PTRS, "fp16", True, False),
    {
        "name": "attention_bwd_delta[bf16]",
        "fn": _attn_bwd_delta_kernel,
        "signature": {
            "out_ptr": "*bf16", "dout_ptr": "*bf16", "delta_ptr": "*fp32",
            "rows": "i32", "D": "i32", "BLOCK_M": "constexpr", "BLOCK_D": "constexpr",
        },
        "constexprs": {"BLOCK_M": 64, "BLOCK_D": 128},
    },
]  # fmt: skip
