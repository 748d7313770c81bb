"""The machine's limits, measured in the same run as the kernel benches.

* copy bandwidth: ``dst.copy_(src)`` on 256 MiB into a reused buffer, counted as
  read + write bytes; memory-bound kernels are judged against it. The competitor
  ``copy_into_fresh`` copies into a newly allocated tensor: the gap is the cost of
  faulting in fresh pages, which is why large C++ outputs come from an output pool
  (``csrc/cpu/output_pool.h``).
* matmul throughput: ``torch.mm`` at 2048^3 in fp32 and bf16 (oneDNN/MKL);
  compute-bound kernels (attention, quantized matmul) are judged against it.
"""

import pytest
import torch


def test_copy_bandwidth(compare):
    src = torch.randn(2**26)  # 256 MiB of float32
    dst = torch.empty_like(src)
    compare.run(
        lambda: dst.copy_(src),
        {"copy_into_fresh": lambda: torch.empty(2**26).copy_(src)},
        bytes_moved=2 * src.numel() * 4,
        rounds=10,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_matmul_throughput(compare, dtype):
    n = 2048
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    compare.run(lambda: torch.mm(a, b), {}, flops=2 * n**3, rounds=5)
