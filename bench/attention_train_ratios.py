"""Quick same-run ratios of fused attention training (forward+backward, causal) on the CPU.

Prints, for the three training shapes of ``bench_attention.py`` and both float32 and
bfloat16, how many times faster ``minigpt.kernels.attention`` is than the naive eager
formula and than ``F.scaled_dot_product_attention``, with the GFLOP/s reached (useful
causal work) next to ``torch.mm`` in the same dtype. The three candidates run in
interleaved rounds and each ratio is the median over rounds of that round's ratio, so a
burst of load from elsewhere hits all of them alike. Wall-clock by default (what two
threads deliver); ``--cpu-time`` uses process CPU time (fairer on a loaded machine,
best with ``--threads 1``).

Run it on a quiet machine:

    python bench/attention_train_ratios.py                 # 2 threads, wall clock
    python bench/attention_train_ratios.py --threads 1 --cpu-time

Goals (issue 4): >= 3x naive eager in both dtypes, >= 1.3x SDPA in float32 and >= 2x
SDPA in bfloat16.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_attention import TRAIN_SHAPES, _naive, _sdpa  # noqa: E402

from minigpt.kernels import attention  # noqa: E402


def _step(fn, q, k, v, dout):
    def run() -> None:
        out = fn(q, k, v)
        torch.autograd.grad(out, (q, k, v), dout)

    return run


def measure(shape: tuple[int, int, int, int], dtype: torch.dtype, rounds: int, clock) -> dict:
    """Median seconds of each candidate and median per-round ratios vs ours."""
    B, T, H, D = shape
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, T, H, D, generator=gen).to(dtype).requires_grad_() for _ in range(3))
    dout = torch.randn(B, T, H, D, generator=gen).to(dtype)
    fns = {"ours": _step(attention, q, k, v, dout), "sdpa": _step(_sdpa, q, k, v, dout)}
    if T <= 1024:  # naive materializes B*H*T*T scores and their gradients
        fns["naive"] = _step(_naive, q, k, v, dout)
    for fn in fns.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = clock()
            fn()
            times[name].append(clock() - t0)
    result = {name: statistics.median(ts) for name, ts in times.items()}
    for name in fns:
        if name != "ours":
            ratios = [a / b for a, b in zip(times[name], times["ours"], strict=True)]
            result[f"x_{name}"] = statistics.median(ratios)
    flops = 4 * B * H * T * T * D / 2 * 3.5  # causal half; backward = 2.5x forward
    result["GFLOP/s"] = flops / result["ours"] / 1e9
    return result


def matmul_gflops(dtype: torch.dtype, clock) -> float:
    n = 1536
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    ts = []
    for _ in range(5):
        t0 = clock()
        torch.mm(a, b)
        ts.append(clock() - t0)
    return 2 * n**3 / statistics.median(ts) / 1e9


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--cpu-time", action="store_true", help="process CPU time, not wall")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "both"], default="both")
    parser.add_argument("--seq", type=int, default=None, help="only the shape of this length")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.cpu_time else time.perf_counter
    dtypes = {"fp32": [torch.float32], "bf16": [torch.bfloat16]}.get(
        args.dtype, [torch.float32, torch.bfloat16]
    )
    print(f"threads={args.threads} clock={'cpu' if args.cpu_time else 'wall'} rounds={args.rounds}")
    for dtype in dtypes:
        mm = matmul_gflops(dtype, clock)
        name = "bf16" if dtype == torch.bfloat16 else "fp32"
        print(f"{name}: torch.mm {mm:.0f} GFLOP/s")
        for shape in [s for s in TRAIN_SHAPES if args.seq in (None, s[1])]:
            r = measure(shape, dtype, args.rounds, clock)
            naive = (
                f"{r['x_naive']:.2f}x naive ({r['naive'] * 1e3:.0f} ms)"
                if "x_naive" in r
                else "(naive skipped)"
            )
            print(
                f"  B{shape[0]} T{shape[1]} H{shape[2]} D{shape[3]}: ours {r['ours'] * 1e3:7.1f} ms"
                f"  {naive}  {r['x_sdpa']:.2f}x sdpa ({r['sdpa'] * 1e3:.0f} ms)"
                f"  {r['GFLOP/s']:.0f} GFLOP/s ({r['GFLOP/s'] / mm:.0%} of mm)",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
