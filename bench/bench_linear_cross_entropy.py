"""linear_cross_entropy forward+backward: time AND peak memory vs eager and torch.compile.

Competitors, in the same run and the same dtype: eager ``F.cross_entropy(F.linear(h, W), t)``
(what a model does without the fused op) and ``torch.compile`` of that function.
Each call is one full training step of the loss: forward, then backward into the
hidden states and the head weight. GFLOP/s counts the three (N, H) x (H, V)
matmuls (6 N H V flops), which dominate.

Peak memory, the point of the fused op, is measured as follows. Each variant runs
in its own fresh Python process (``python bench_linear_cross_entropy.py --memory
...``) so that nothing another variant allocated or cached can hide or inflate
its footprint. In that process we

1. build the inputs and run one warm-up step (this also compiles the compiled
   variant, whose compiler memory we do not want to count),
2. drop the gradients, ``gc.collect()`` and ``malloc_trim(0)`` (glibc returns
   freed heap pages to the OS, so memory freed by the warm-up cannot be reused
   invisibly),
3. reset the kernel's resident-set high-water mark (``echo 5 >
   /proc/self/clear_refs``) and read the baseline ``VmRSS``,
4. run one measured step and read ``VmHWM`` (the peak resident set since step 3).

``peak - baseline`` is the extra memory the step needed at its worst moment:
logits, softmax buffers, gradients (dW and dh are included for every variant).
torch's CPU allocator does not cache blocks, so resident memory tracks live
tensors closely; large blocks come straight from mmap and go back on free.
(``ru_maxrss`` cannot be reset, which is why the /proc interface is used.)

With ``--benchmark-disable`` (CI) every case runs once on a tiny shape, and the
memory subprocess runs once (ours, tiny) to keep the harness itself tested.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from minigpt.kernels import linear_cross_entropy

# (tokens N, hidden H, vocab V); the 128k vocabulary only in bf16 (fp32 is slow here)
CASES = [
    (4096, 512, 8192, torch.float32),
    (4096, 512, 32000, torch.float32),
    (4096, 512, 32000, torch.bfloat16),
    (4096, 1024, 32000, torch.bfloat16),
    (4096, 512, 128000, torch.bfloat16),
]
SMOKE_SHAPE = (64, 32, 512)  # used for every case when benchmarks are disabled


def _inputs(n, h, v, dtype):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) * h**-0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g)
    return hidden, weight, targets


def _eager_loss(hidden, weight, targets):
    return F.cross_entropy(F.linear(hidden, weight), targets)


_compiled_loss = torch.compile(_eager_loss, dynamic=False)

VARIANTS = {
    "minigpt": linear_cross_entropy,
    "eager": _eager_loss,
    "compiled": _compiled_loss,
}


def _step(loss_fn, hidden, weight, targets):
    def run():
        hidden.grad = None
        weight.grad = None
        loss_fn(hidden, weight, targets).backward()

    return run


# ---- peak memory, one subprocess per variant ---------------------------------


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_peak_mb(variant: str, n: int, h: int, v: int, dtype_name: str) -> float:
    """Extra resident memory (MiB) of one fwd+bwd step of ``variant`` (this process)."""
    torch.set_num_threads(2)
    hidden, weight, targets = _inputs(n, h, v, getattr(torch, dtype_name))
    step = _step(VARIANTS[variant], hidden, weight, targets)
    step()  # warm-up (and compilation)
    hidden.grad = weight.grad = None
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current VmRSS
    base = _status_kb("VmRSS")
    step()
    return (_status_kb("VmHWM") - base) / 1024


def peak_mb_in_subprocess(variant: str, n: int, h: int, v: int, dtype: torch.dtype) -> float:
    dtype_name = str(dtype).replace("torch.", "")
    cmd = [sys.executable, __file__, "--memory", variant, str(n), str(h), str(v), dtype_name]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env, timeout=1800)
    return float(json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"])


# ---- the bench ----------------------------------------------------------------


@pytest.mark.parametrize(
    "n, h, v, dtype",
    CASES,
    ids=[f"{n}x{h}-V{v}-{str(d)[6:]}" for n, h, v, d in CASES],
)
def test_linear_cross_entropy_fwd_bwd(compare, benchmark, n, h, v, dtype):
    disabled = getattr(benchmark, "disabled", False)
    first_case = (n, h, v, dtype) == CASES[0]
    if disabled:
        n, h, v = SMOKE_SHAPE
    hidden, weight, targets = _inputs(n, h, v, dtype)
    extra = compare.run(
        _step(linear_cross_entropy, hidden, weight, targets),
        {
            "eager": _step(_eager_loss, hidden, weight, targets),
            "compiled": _step(_compiled_loss, hidden, weight, targets),
        },
        flops=6.0 * n * h * v,
        rounds=3,
        warmup=1,
        shape=f"N={n} H={h} V={v} {dtype}",
    )
    if disabled:
        if first_case:
            assert peak_mb_in_subprocess("minigpt", n, h, v, dtype) >= 0.0
        return
    peaks = {name: peak_mb_in_subprocess(name, n, h, v, dtype) for name in VARIANTS}
    extra["peak_mb"] = {k: round(p, 1) for k, p in peaks.items()}
    for name in ("eager", "compiled"):
        extra[f"memory_ratio_vs_{name}"] = round(peaks["minigpt"] / max(peaks[name], 1e-9), 3)


if __name__ == "__main__" and len(sys.argv) == 7 and sys.argv[1] == "--memory":
    _, _, variant, n, h, v, dtype_name = sys.argv
    peak = measure_peak_mb(variant, int(n), int(h), int(v), dtype_name)
    print(json.dumps({"variant": variant, "peak_mb": peak}))
