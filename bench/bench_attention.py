"""Fused attention on the CPU: training (forward+backward) and decode, vs torch.

Training shapes (causal, forward+backward): ours vs ``F.scaled_dot_product_attention``
(torch's own CPU flash kernel) and the naive eager formula in the same dtype.
GFLOP/s counts the useful causal work (forward 2 matmuls, backward 5 with the
recomputation, over the lower triangle) and sits next to this machine's
``torch.mm`` GFLOP/s for the same dtype, measured in the same run.

Decode (one query token, 32 query heads over 8 KV heads, cache 512..4096): ours
vs SDPA with ``enable_gqa=True`` (given its preferred (B, H, L, D) layout of the
valid cache prefix, for free) and SDPA on repeated keys/values. GB/s counts the
valid key/value bytes read, next to the machine's copy bandwidth (read + write).

Memory: a subprocess per sequence length records the peak resident memory added
by one forward+backward; ours stays flat per token, the naive formula grows with T.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from conftest import median_seconds

from minigpt.kernels import attention, attention_with_kv_cache

_LIMITS: dict[str, float] = {}


# torch.mm GFLOP/s and copy GB/s of this machine (2 cores) measured when it was quiet;
# the run's own measurement (under whatever load there is) is recorded too.
QUIET_LIMITS = {"fp32_matmul_GFLOP/s": 149.0, "bf16_matmul_GFLOP/s": 389.0, "copy_GB/s": 30.7}


def record_fraction_of_limits(extra: dict, dtype: torch.dtype) -> None:
    """Add our GFLOP/s as a fraction of the matmul GFLOP/s (this run's and quiet)."""
    if "GFLOP/s" not in extra:
        return
    key = "bf16" if dtype == torch.bfloat16 else "fp32"
    quiet = QUIET_LIMITS[f"{key}_matmul_GFLOP/s"]
    extra["matmul_GFLOP/s_quiet"] = quiet
    extra["fraction_of_quiet_matmul"] = round(extra["GFLOP/s"] / quiet, 3)
    if "matmul_GFLOP/s" in extra:
        extra["fraction_of_matmul"] = round(extra["GFLOP/s"] / extra["matmul_GFLOP/s"], 3)


def machine_limits(compare, dtype: torch.dtype) -> dict[str, float]:
    """Copy bandwidth (GB/s, read + write) and matmul GFLOP/s for ``dtype``, measured once
    per run (not at all in a --benchmark-disable smoke run)."""
    if getattr(compare.benchmark, "disabled", False):
        return {}
    key = str(dtype)
    if key not in _LIMITS:
        n = 1536
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        _LIMITS[key] = 2 * n**3 / median_seconds(lambda: torch.mm(a, b), 5, 1) / 1e9
    if "copy" not in _LIMITS:
        src = torch.randn(2**25)  # 128 MiB
        dst = torch.empty_like(src)
        _LIMITS["copy"] = 2 * src.numel() * 4 / median_seconds(lambda: dst.copy_(src), 5, 1) / 1e9
    return {"matmul_GFLOP/s": round(_LIMITS[key], 1), "copy_GB/s": round(_LIMITS["copy"], 1)}


def _naive(q, k, v):
    """Textbook causal attention in the inputs' dtype, (B, T, H, D) layout."""
    T, D = q.shape[1], q.shape[3]
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * D**-0.5
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", p, v)


def _sdpa(q, k, v):
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
    )
    return out.transpose(1, 2)


def _fwd_bwd(fn, q, k, v, dout):
    def step():
        out = fn(q, k, v)
        torch.autograd.grad(out, (q, k, v), dout)

    return step


# (batch, seq, heads, head_dim)
TRAIN_SHAPES = [(4, 1024, 8, 64), (4, 512, 16, 128), (4, 2048, 8, 64)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", TRAIN_SHAPES, ids=lambda s: "B{}_T{}_H{}_D{}".format(*s))
def test_attention_train(compare, benchmark, shape, dtype):
    B, T, H, D = shape
    q, k, v = (torch.randn(B, T, H, D, dtype=dtype, requires_grad=True) for _ in range(3))
    dout = torch.randn(B, T, H, D, dtype=dtype)
    competitors = {"sdpa": _fwd_bwd(_sdpa, q, k, v, dout)}
    if T <= 1024:  # the naive formula materializes B*H*T*T scores (and grads)
        competitors["naive_eager"] = _fwd_bwd(_naive, q, k, v, dout)
    fwd_flops = 4 * B * H * T * T * D / 2  # two matmuls over the causal half
    big = T >= 2048
    extra = compare.run(
        _fwd_bwd(attention, q, k, v, dout),
        competitors,
        flops=fwd_flops * 3.5,  # backward = 2.5x forward (5 matmuls incl. recompute)
        rounds=3 if big else 7,
        warmup=1,
        **machine_limits(compare, dtype),
    )
    record_fraction_of_limits(extra, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_attention_forward_only(compare, dtype):
    B, T, H, D = 4, 1024, 8, 64
    q, k, v = (torch.randn(B, T, H, D, dtype=dtype) for _ in range(3))
    with torch.no_grad():
        extra = compare.run(
            lambda: attention(q, k, v),
            {"sdpa": lambda: _sdpa(q, k, v)},
            flops=4 * B * H * T * T * D / 2,
            rounds=7,
            **machine_limits(compare, dtype),
        )
    record_fraction_of_limits(extra, dtype)


# (cache_len, batch, dtype): both dtypes at the short and the long cache, batch 1 and 8
DECODE_CASES = [
    (L, b, dt) for dt in (torch.float32, torch.bfloat16) for L in (512, 4096) for b in (1, 8)
]


@pytest.mark.parametrize(
    "cache_len, batch, dtype", DECODE_CASES, ids=lambda c: str(c).replace("torch.", "")
)
def test_attention_decode(compare, cache_len, batch, dtype):
    Hq, Hkv, D = 32, 8, 128
    S = cache_len + 16
    q = torch.randn(batch, 1, Hq, D, dtype=dtype)
    k_cache = torch.randn(batch, S, Hkv, D, dtype=dtype)
    v_cache = torch.randn(batch, S, Hkv, D, dtype=dtype)
    lens = torch.full((batch,), cache_len, dtype=torch.int32)
    # SDPA gets the valid prefix in its own (B, H, L, D) layout, prepared for free
    k_bhld = k_cache[:, :cache_len].transpose(1, 2).contiguous()
    v_bhld = v_cache[:, :cache_len].transpose(1, 2).contiguous()
    q_bhld = q.transpose(1, 2).contiguous()
    g = Hq // Hkv
    with torch.no_grad():
        compare.run(
            lambda: attention_with_kv_cache(q, k_cache, v_cache, lens),
            {
                "sdpa_gqa": lambda: F.scaled_dot_product_attention(
                    q_bhld, k_bhld, v_bhld, enable_gqa=True
                ),
                "sdpa_repeat_kv": lambda: F.scaled_dot_product_attention(
                    q_bhld,
                    k_bhld.repeat_interleave(g, dim=1),
                    v_bhld.repeat_interleave(g, dim=1),
                ),
            },
            bytes_moved=2 * batch * cache_len * Hkv * D * q.element_size(),
            flops=4 * batch * Hq * cache_len * D,
            rounds=30,
            copy_GB_per_s_quiet=QUIET_LIMITS["copy_GB/s"],
            **machine_limits(compare, dtype),
        )


_MEM_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from minigpt.kernels import attention
    from bench_attention import _naive
    torch.set_num_threads(1)

    def status_kib(field):
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith(field + ":"))

    which, T = sys.argv[1], int(sys.argv[2])
    B, H, D = 1, 8, 64
    q, k, v = (torch.randn(B, T, H, D, requires_grad=True) for _ in range(3))
    dout = torch.randn(B, T, H, D)
    fn = attention if which == "ours" else _naive
    # warm up on a tiny problem so library start-up costs are not counted
    w = torch.randn(1, 8, H, D, requires_grad=True)
    torch.autograd.grad(fn(w, w, w), (w,), torch.ones_like(w))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident size (VmHWM) to the current one
    before = status_kib("VmRSS")
    torch.autograd.grad(fn(q, k, v), (q, k, v), dout)
    print(json.dumps({"extra_kib": status_kib("VmHWM") - before}))
    """
)


def _peak_extra_kib(which: str, T: int) -> int:
    proc = subprocess.run(
        [sys.executable, "-c", _MEM_SCRIPT, which, str(T)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=__file__.rsplit("/", 1)[0],
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])["extra_kib"]


def test_attention_memory_flat(benchmark):
    """Peak extra memory of one fwd+bwd per token: flat for ours, linear in T for naive."""
    smoke = getattr(benchmark, "disabled", False)
    seqs = (256, 1024) if smoke else (1024, 4096)
    ours = {T: _peak_extra_kib("ours", T) for T in seqs}
    naive = {} if smoke else {T: _peak_extra_kib("naive", T) for T in seqs[:1]}
    per_token = {T: ours[T] / T for T in seqs}
    benchmark.extra_info.update(
        {
            "ours_extra_KiB": ours,
            "naive_extra_KiB": naive,
            "ours_KiB_per_token": {T: round(x, 2) for T, x in per_token.items()},
        }
    )
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    # O(T) buffers only: 4x the tokens may cost at most ~4x the memory (+ slack for
    # allocator granularity), never the 16x a (T, T) matrix would.
    assert ours[seqs[0]] > 0, "peak memory was not measured"
    assert ours[seqs[1]] <= 6 * ours[seqs[0]]
