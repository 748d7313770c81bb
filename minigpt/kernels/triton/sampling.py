"""Triton fused sampling: temperature, top-k, top-p, min-p and the draw, without a sort.

One program handles one row and streams it in BLOCK-sized chunks (a 256k-token
row does not fit in registers). The kept set of every filter is "all tokens with
z >= some threshold" (z = (x - max) / temperature), so instead of sorting we
*search* the threshold, radix style, on the 32-bit ordered key of z:

    pass 1       max of the row, NaN/+inf check
    pass 2       sum exp(z) (and sum exp(x - max) for temperature-1 log-probs)
    8 passes     top-k: the largest key K with count(key >= K) >= k, four bits per
                 pass (16 candidate prefixes counted at once, a [BLOCK, 16] compare)
    8 passes     top-p: the largest key K with mass(key >= K) >= top_p * mass(top-k)
    1 pass       mass of the kept set (also applying min-p: exp(z) >= min_p)
    1 pass       inverse-CDF draw with the caller's uniform u (block cumsum)

Each pass is a coalesced read of a row that stays in L2, and every step is exact
(ties handled like the reference: equal values are kept or dropped together).
The same kernel with FILTER=True writes the filtered logits instead of drawing.

Wrappers take and return exactly what ``torch.ops.minigpt.sampling_sample`` /
``sampling_filter`` do.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _ordered_key(z):
    """float32 -> int64 key with the same order (for z without NaN)."""
    u = z.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF
    return tl.where(u >= 0x80000000, 0xFFFFFFFF - u, u + 0x80000000)


@triton.jit
def _radix_threshold(
    x_ptr, V, m, inv_t, floor_key, target, WEIGHTED: tl.constexpr, BLOCK: tl.constexpr
):
    """Largest key K with W(key >= K) >= target, W = count or exp(z) mass, over
    tokens with key >= floor_key. Exact: four bits of K per pass over the row."""
    cols = tl.arange(0, BLOCK)
    digits = tl.arange(0, 16).to(tl.int64)
    prefix = tl.zeros((), dtype=tl.int64)
    for step in range(8):  # a runtime loop: unrolling would only bloat the code
        unit = tl.full((), 1, tl.int64) << (28 - 4 * step)  # weight of this digit
        cand = prefix | (digits * unit)
        acc = tl.zeros((16,), dtype=tl.float32)
        for start in range(0, V, BLOCK):
            offs = start + cols
            msk = offs < V
            x = tl.load(x_ptr + offs, mask=msk, other=float("-inf")).to(tl.float32)
            z = (x - m) * inv_t
            key = _ordered_key(z)
            live = msk & (key >= floor_key)
            if WEIGHTED:  # noqa: SIM108 (a compile-time branch)
                w = tl.where(live, tl.exp(z), 0.0)
            else:
                w = tl.where(live, 1.0, 0.0)
            hit = key[:, None] >= cand[None, :]
            acc += tl.sum(tl.where(hit, w[:, None], 0.0), axis=0)
        # W is non-increasing in the digit: the answer is the last digit that
        # still reaches the target (digit 0 always does, up to rounding)
        ndig = tl.sum((acc.to(tl.float64) >= target).to(tl.int32), axis=0)
        d = tl.maximum(ndig - 1, 0).to(tl.int64)
        prefix = prefix | (d * unit)
    return prefix


@triton.jit
def _sampling_kernel(
    x_ptr,
    t_ptr,
    k_ptr,
    p_ptr,
    mp_ptr,
    u_ptr,
    ids_ptr,
    lp_ptr,
    raw_ptr,
    status_ptr,
    out_ptr,
    V,
    FILTER: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_ptr += row * V
    cols = tl.arange(0, BLOCK)
    temp = tl.load(t_ptr + row)
    top_k = tl.load(k_ptr + row)
    top_p = tl.load(p_ptr + row)
    min_p = tl.load(mp_ptr + row)

    # ---- pass 1: max and bad values
    vmax = tl.full((BLOCK,), float("-inf"), tl.float32)
    nbad = tl.zeros((BLOCK,), dtype=tl.int32)
    for start in range(0, V, BLOCK):
        offs = start + cols
        x = tl.load(x_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        nbad += ((x != x) | (x == float("inf"))).to(tl.int32)
        vmax = tl.maximum(vmax, tl.where(x == x, x, float("-inf")))
    m = tl.max(vmax, axis=0)
    bad = tl.sum(nbad, axis=0) > 0
    status = tl.where(bad, 1, tl.where(m == float("-inf"), 2, 0))
    tl.store(status_ptr + row, status)
    ok = status == 0
    m = tl.where(ok, m, 0.0)  # keep the passes below NaN-free on bad rows

    greedy = temp == 0.0
    inv_t = 1.0 / tl.where(greedy, 1.0, temp)
    # ---- pass 2: total masses; argmax (first index of the max) for greedy rows
    s_all = tl.zeros((), dtype=tl.float64)
    s_raw = tl.zeros((), dtype=tl.float64)
    first = V
    for start in range(0, V, BLOCK):
        offs = start + cols
        msk = offs < V
        x = tl.load(x_ptr + offs, mask=msk, other=float("-inf")).to(tl.float32)
        s_all += tl.sum(tl.exp((x - m) * inv_t), axis=0).to(tl.float64)
        s_raw += tl.sum(tl.exp(x - m), axis=0).to(tl.float64)
        first = tl.minimum(first, tl.min(tl.where(msk & (x == m), offs, V), axis=0))

    # ---- thresholds (as ordered keys of z)
    floor_key = tl.zeros((), dtype=tl.int64)
    use_k = (top_k > 0) & (top_k < V) & ok & (temp != 0.0)
    if use_k:
        floor_key = _radix_threshold(
            x_ptr, V, m, inv_t, floor_key, top_k.to(tl.float64), False, BLOCK
        )
    use_p = (top_p < 1.0) & ok & (temp != 0.0)
    if use_p:
        s_k = s_all
        if use_k:  # top-p renormalizes over the top-k set
            s_k = tl.zeros((), dtype=tl.float64)
            for start in range(0, V, BLOCK):
                offs = start + cols
                x = tl.load(x_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
                z = (x - m) * inv_t
                s_k += tl.sum(tl.where(_ordered_key(z) >= floor_key, tl.exp(z), 0.0), 0).to(
                    tl.float64
                )
        target = top_p.to(tl.float64) * s_k
        floor_key = _radix_threshold(x_ptr, V, m, inv_t, floor_key, target, True, BLOCK)

    # ---- mass of the kept set (min-p: exp(z) >= min_p)
    s_kept = tl.zeros((), dtype=tl.float64)
    for start in range(0, V, BLOCK):
        offs = start + cols
        x = tl.load(x_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        z = (x - m) * inv_t
        e = tl.exp(z)
        kept = (_ordered_key(z) >= floor_key) & (e >= min_p)
        if FILTER:
            val = tl.where(kept & ok, x / temp, float("-inf"))
            tl.store(out_ptr + row * V + offs, val, mask=offs < V)
        s_kept += tl.sum(tl.where(kept, e, 0.0), axis=0).to(tl.float64)

    if not FILTER:
        # ---- draw: first kept token whose running mass exceeds u * s_kept
        goal = tl.load(u_ptr + row) * s_kept
        cum = tl.zeros((), dtype=tl.float64)
        pick = V
        last = 0
        for start in range(0, V, BLOCK):
            offs = start + cols
            msk = offs < V
            x = tl.load(x_ptr + offs, mask=msk, other=float("-inf")).to(tl.float32)
            z = (x - m) * inv_t
            e = tl.exp(z)
            e = tl.where((_ordered_key(z) >= floor_key) & (e >= min_p) & msk, e, 0.0)
            run = cum + tl.cumsum(e, axis=0).to(tl.float64)
            pick = tl.minimum(pick, tl.min(tl.where((run > goal) & (e > 0), offs, V), axis=0))
            last = tl.maximum(last, tl.max(tl.where(e > 0, offs, 0), axis=0))
            cum += tl.sum(e, axis=0).to(tl.float64)
        pick = tl.where(pick < V, pick, last)  # rounding ran past the end
        pick = tl.where(greedy, first, pick)
        pick = tl.where(ok, pick, 0)
        x_id = tl.load(x_ptr + pick).to(tl.float32)
        z_id = (x_id - m) * inv_t
        lp = tl.where(greedy, 0.0, z_id.to(tl.float64) - tl.log(s_kept))
        raw = (x_id - m).to(tl.float64) - tl.log(s_raw)
        tl.store(ids_ptr + row, pick.to(tl.int64))
        tl.store(lp_ptr + row, tl.where(ok, lp, 0.0).to(tl.float32))
        tl.store(raw_ptr + row, tl.where(ok, raw, 0.0).to(tl.float32))


def _launch(logits, temperature, top_k, top_p, min_p, uniforms, filter_mode):
    rows, vocab = logits.shape
    dev = logits.device
    ids = torch.zeros(rows, dtype=torch.int64, device=dev)
    lp = torch.zeros(rows, dtype=torch.float32, device=dev)
    raw = torch.zeros(rows, dtype=torch.float32, device=dev)
    status = torch.zeros(rows, dtype=torch.int32, device=dev)
    out = torch.empty((rows, vocab) if filter_mode else (1,), dtype=torch.float32, device=dev)
    if uniforms is None:
        uniforms = torch.zeros(rows, dtype=torch.float64, device=dev)
    if rows > 0:
        block = min(BLOCK, triton.next_power_of_2(vocab))
        _sampling_kernel[(rows,)](
            logits,
            temperature,
            top_k,
            top_p,
            min_p,
            uniforms,
            ids,
            lp,
            raw,
            status,
            out,
            vocab,
            FILTER=filter_mode,
            BLOCK=block,
            num_warps=8 if block >= 1024 else 4,
        )
    return ids, lp, raw, status, out


def sampling_sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    uniforms: torch.Tensor,
    want_logprobs: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, V) logits -> (ids, logprobs, raw_logprobs, status), like the C++ op."""
    ids, lp, raw, status, _ = _launch(logits, temperature, top_k, top_p, min_p, uniforms, False)
    return ids, lp, raw, status


def sampling_filter(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, V) logits -> (filtered float32 logits, status), like the C++ op."""
    _, _, _, status, out = _launch(logits, temperature, top_k, top_p, min_p, None, True)
    return out, status


# Argument types for ahead-of-time compilation checks (compile_check.py).
COMPILE_SPECS = [
    {
        "name": f"sampling[{dt}, filter={flt}]",
        "fn": _sampling_kernel,
        "signature": {
            "x_ptr": f"*{dt}",
            "t_ptr": "*fp32",
            "k_ptr": "*i64",
            "p_ptr": "*fp32",
            "mp_ptr": "*fp32",
            "u_ptr": "*fp64",
            "ids_ptr": "*i64",
            "lp_ptr": "*fp32",
            "raw_ptr": "*fp32",
            "status_ptr": "*i32",
            "out_ptr": "*fp32",
            "V": "i32",
            "FILTER": "constexpr",
            "BLOCK": "constexpr",
        },
        "constexprs": {"FILTER": flt, "BLOCK": BLOCK},
        "options": {"num_warps": 8},
    }
    # the dtype only changes the loads: fp32 and bf16 samplers, one filter
    for dt, flt in (("fp32", False), ("bf16", False), ("bf16", True))
]
