"""Triton decode attention against a KV cache (flash-decoding: split-K + combine).

Decoding asks one (or a few, for speculative decoding) new query tokens per
sequence to attend to a long cache. There is too little query work to fill a
GPU with one program per (sequence, head), so the cache is cut into
``num_splits`` contiguous ranges and every range is a separate program:

1. ``_kv_append_kernel`` writes ``k_new``/``v_new`` into each row's cache at
   ``cache_seqlens[b]`` (in place), one program per (sequence, new token).
2. ``_decode_split_kernel``, grid (split, sequence x kv head, row block): all the
   query rows that share a kv head (``GROUP`` query heads x ``Tq`` tokens) form one
   tile, so grouped-query attention reads each cache block once and never repeats
   keys/values. It runs the online softmax over its range of the cache and writes a
   float32 partial output (already divided by its own sum) and its log-sum-exp.
3. ``_decode_combine_kernel``, one program per (sequence, token, query head),
   merges the partials: ``out = sum_s w_s o_s / sum_s w_s`` with
   ``w_s = exp(lse_s - max lse)``. A split that saw no key has lse = -inf (w = 0);
   a row that saw no key at all outputs zeros.

Masking follows the C++ op and the reference: each row's cache holds
``cache_seqlens[b] + Tn`` valid entries and query token t sits at position
``cache_seqlens[b] + Tn - Tq + t`` (bottom-right aligned causal mask). The
split ranges cover the whole capacity S, so no host synchronization is needed
to learn the longest row; programs past a row's length exit after writing an
empty partial. Scores use base 2 (``exp2``), converted back to natural-log lse.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from minigpt.kernels.triton.attention import _lowp_dot, _mm


@triton.jit
def _kv_append_kernel(
    k_cache_ptr, v_cache_ptr, k_new_ptr, v_new_ptr, seqlens_ptr,
    S, TN, ROW,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """k_cache[b, seqlens[b] + t] = k_new[b, t] (and v), one program per (b, t); a
    cache row is ROW = Hkv * D contiguous elements."""
    pid = tl.program_id(0)
    b = pid // TN
    t = pid % TN
    pos = tl.load(seqlens_ptr + b).to(tl.int64) + t
    dst = (b.to(tl.int64) * S + pos) * ROW
    src = pid.to(tl.int64) * ROW
    for c0 in range(0, ROW, BLOCK):
        offs = c0 + tl.arange(0, BLOCK)
        m = offs < ROW
        tl.store(k_cache_ptr + dst + offs, tl.load(k_new_ptr + src + offs, mask=m), mask=m)
        tl.store(v_cache_ptr + dst + offs, tl.load(v_new_ptr + src + offs, mask=m), mask=m)


@triton.jit
def _decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, seqlens_ptr, o_part_ptr, lse_part_ptr,
    scale, B, TQ, TN, S, HQ, GROUP, D, SPLIT_LEN,
    CAUSAL: tl.constexpr, LOWP_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    split = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_m = tl.program_id(2)
    HKV = HQ // GROUP
    b = pid_bh // HKV
    kvh = pid_bh % HKV
    total = tl.load(seqlens_ptr + b).to(tl.int32) + TN  # valid cache entries of row b
    # tile row r = t * GROUP + g: token t of query head kvh * GROUP + g
    offs_r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    t = offs_r // GROUP
    h = kvh * GROUP + offs_r % GROUP
    row_ok = offs_r < GROUP * TQ
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    q_off = ((b.to(tl.int64) * TQ + t) * HQ + h) * D
    q = tl.load(
        q_ptr + q_off[:, None] + offs_d[None, :], mask=row_ok[:, None] & mask_d[None, :], other=0.0
    ).to(tl.float32)
    dt = q_ptr.dtype.element_ty
    qk_scale = scale * 1.4426950408889634  # base 2
    pos = total - TQ + t  # each row's key position (bottom-right aligned)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    lo = split * SPLIT_LEN
    hi = tl.minimum(lo + SPLIT_LEN, total)
    offs_n0 = tl.arange(0, BLOCK_N)
    kv_base = (b.to(tl.int64) * S * HKV + kvh) * D  # cache[b, 0, kvh, 0]
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + offs_n0
        n_ok = offs_n < hi
        kv_off = kv_base + offs_n.to(tl.int64)[:, None] * (HKV * D) + offs_d[None, :]
        kv_mask = n_ok[:, None] & mask_d[None, :]
        k = tl.load(k_cache_ptr + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
        v = tl.load(v_cache_ptr + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
        s = _mm(q, tl.trans(k), dt, LOWP_DOT) * qk_scale
        ok = row_ok[:, None] & n_ok[None, :]
        if CAUSAL:
            ok = ok & (offs_n[None, :] <= pos[:, None])
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing seen yet
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _mm(p, v, dt, LOWP_DOT)
        m_i = m_new
    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    o = acc / l_safe[:, None]
    lse = tl.where(seen, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))  # natural log
    part = ((split * B + b).to(tl.int64) * TQ + t) * HQ + h  # o_part[split, b, t, h]
    o_mask = row_ok[:, None] & mask_d[None, :]
    tl.store(o_part_ptr + part[:, None] * D + offs_d[None, :], o, mask=o_mask)
    tl.store(lse_part_ptr + part, lse, mask=row_ok)


@triton.jit
def _decode_combine_kernel(
    o_part_ptr, lse_part_ptr, out_ptr, ROWS, D, NUM_SPLITS,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One program per output row (b, t, h): weighted sum of the splits' partials."""
    row = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    s_ok = offs_s < NUM_SPLITS
    lse = tl.load(lse_part_ptr + offs_s * ROWS + row, mask=s_ok, other=float("-inf"))
    mx = tl.max(lse, 0)
    mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
    w = tl.where(s_ok, tl.exp(lse - mx_safe), 0.0)
    total = tl.sum(w, 0)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    o = tl.load(
        o_part_ptr + (offs_s.to(tl.int64) * ROWS + row)[:, None] * D + offs_d[None, :],
        mask=s_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    out = tl.sum(o * w[:, None], 0) / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + row * D + offs_d, out.to(out_ptr.dtype.element_ty), mask=d_ok)


def _num_splits(q: torch.Tensor, programs: int, capacity: int, block_n: int) -> int:
    """Enough splits to give a GPU ~2 programs per SM, never more than cache blocks."""
    if q.device.type == "cuda":
        target = 2 * torch.cuda.get_device_properties(q.device).multi_processor_count
    else:  # the interpreter: a few splits, so the combine step is exercised
        target = 4
    return max(1, min(triton.cdiv(capacity, block_n), triton.cdiv(target, max(programs, 1))))


def attention_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    k_new: torch.Tensor | None,
    v_new: torch.Tensor | None,
    scale: float,
    causal: bool,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Same contract as ``torch.ops.minigpt.attention_kvcache`` (checked by the caller).

    Args:
        q: (B, Tq, Hq, D); k_cache, v_cache: (B, S, Hkv, D), contiguous, written in place.
        cache_seqlens: (B,) valid entries per row before this step.
        k_new, v_new: optional (B, Tn, Hkv, D) appended at ``cache_seqlens[b]``.
        num_splits: cache ranges per (row, kv head); default sized to the device.

    Returns:
        (B, Tq, Hq, D) in q's dtype.
    """
    B, tq, hq, d = q.shape
    _, S, hkv, _ = k_cache.shape
    q = q.contiguous()
    lens = cache_seqlens.to(device=q.device, dtype=torch.int32).contiguous()
    tn = 0
    if k_new is not None and v_new is not None and k_new.shape[1] > 0 and B > 0:
        tn = k_new.shape[1]
        row = hkv * d
        _kv_append_kernel[(B * tn,)](
            k_cache, v_cache, k_new.contiguous(), v_new.contiguous(), lens, S, tn, row,
            BLOCK=min(1024, triton.next_power_of_2(row)),
        )  # fmt: skip
    out = torch.empty_like(q)
    if B == 0 or tq == 0:
        return out
    group = hq // hkv
    rows = group * tq
    block_m = min(64, max(16, triton.next_power_of_2(rows)))
    block_n = 64 if q.device.type == "cuda" else 16
    block_d = max(16, triton.next_power_of_2(d))
    m_blocks = triton.cdiv(rows, block_m)
    splits = num_splits or _num_splits(q, B * hkv * m_blocks, max(S, 1), block_n)
    split_len = triton.cdiv(triton.cdiv(max(S, 1), splits), block_n) * block_n
    o_part = torch.empty((splits, B, tq, hq, d), device=q.device, dtype=torch.float32)
    lse_part = torch.empty((splits, B, tq, hq), device=q.device, dtype=torch.float32)
    warps = 4 if q.device.type == "cuda" else 1
    _decode_split_kernel[(splits, B * hkv, m_blocks)](
        q, k_cache, v_cache, lens, o_part, lse_part,
        scale, B, tq, tn, S, hq, group, d, split_len,
        CAUSAL=causal, LOWP_DOT=_lowp_dot(q),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=warps,
    )  # fmt: skip
    _decode_combine_kernel[(B * tq * hq,)](
        o_part, lse_part, out, B * tq * hq, d, splits,
        BLOCK_S=max(2, triton.next_power_of_2(splits)), BLOCK_D=block_d,
    )  # fmt: skip
    return out


def _split_spec(dt: str, causal: bool, block_m: int, block_d: int) -> dict:
    sig = {
        "q_ptr": f"*{dt}", "k_cache_ptr": f"*{dt}", "v_cache_ptr": f"*{dt}",
        "seqlens_ptr": "*i32", "o_part_ptr": "*fp32", "lse_part_ptr": "*fp32",
        "scale": "fp32", "B": "i32", "TQ": "i32", "TN": "i32", "S": "i32", "HQ": "i32",
        "GROUP": "i32", "D": "i32", "SPLIT_LEN": "i32",
    }  # fmt: skip
    consts = {"CAUSAL": causal, "LOWP_DOT": True, "BLOCK_M": block_m, "BLOCK_N": 64}
    consts["BLOCK_D"] = block_d
    sig.update({c: "constexpr" for c in consts})
    return {
        "name": f"attention_decode_split[{dt}, causal={causal}, M={block_m}, D={block_d}]",
        "fn": _decode_split_kernel,
        "signature": sig,
        "constexprs": consts,
    }


# Ahead-of-time compilation for sm_80 / sm_90 (compile_check.py): the split kernel for
# plain decoding (4 query heads per kv head, one token: a 16-row tile) and for a
# speculative step (64-row tile), the combine and append kernels.
COMPILE_SPECS = [
    _split_spec("bf16", True, 16, 128),
    _split_spec("fp16", True, 64, 64),
    {
        "name": "attention_decode_combine[bf16]",
        "fn": _decode_combine_kernel,
        "signature": {
            "o_part_ptr": "*fp32", "lse_part_ptr": "*fp32", "out_ptr": "*bf16",
            "ROWS": "i32", "D": "i32", "NUM_SPLITS": "i32",
            "BLOCK_S": "constexpr", "BLOCK_D": "constexpr",
        },
        "constexprs": {"BLOCK_S": 16, "BLOCK_D": 128},
    },
    {
        "name": "attention_decode_append[bf16]",
        "fn": _kv_append_kernel,
        "signature": {
            "k_cache_ptr": "*bf16", "v_cache_ptr": "*bf16", "k_new_ptr": "*bf16",
            "v_new_ptr": "*bf16", "seqlens_ptr": "*i32", "S": "i32", "TN": "i32",
            "ROW": "i32", "BLOCK": "constexpr",
        },
        "constexprs": {"BLOCK": 1024},
    },
]  # fmt: skip
