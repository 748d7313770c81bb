"""Weight-only quantized matmul (decode GEMV and small GEMMs): ours vs torch.

For each weight shape (N outputs, K inputs) of a 7B-class Llama layer and each
number of activation rows M, our fused kernel (:func:`minigpt.kernels.quant_linear`,
fp32 activations) is timed against, in the same run:

* ``fp32_linear``  -- ``F.linear`` with the float32 weight (what we replace),
* ``bf16_linear``  -- ``F.linear`` with bf16 weight and activations,
* ``torch_int8``   -- ``torch._weight_int8pack_mm`` (torch's own int8 CPU kernel),
* ``torch_int4``   -- ``torch._weight_int4pack_mm_for_cpu`` (torch's int4 CPU
  kernel; weights packed by ``torch._convert_weight_to_int4pack_for_cpu``, scales
  and zeros as a (K/G, N, 2) tensor).

The ``-dyn`` variants pass ``act_quant="int8"`` (activations rounded to int8
per row, integer dot products with AVX512-VNNI). The ``-bf16x`` variants (M >= 16)
give our op bf16 activations, as a bf16 model does: the like-for-like comparison
with ``bf16_linear`` (both multiply bf16 activations; ours runs the AVX512-BF16
kernels of csrc/cpu/quant_bf16.cpp there). For M > 48 our op takes the
prefill path (tile-wise dequantize + ``at::mm``).

GB/s counts the packed weight bytes + metadata our kernel must read, to compare
with ``test_copy_bandwidth`` (the machine's copy rate, measured in this file).
"""

import functools

import pytest
import torch
import torch.nn.functional as F

from minigpt.kernels.quant import quant_linear, quantize_weight

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (N, K)
ROWS = [1, 16, 32, 128]
FORMATS = [("int8", None), ("int4", 64), ("nf4", 64)]
# bench variants: name -> (weight format, activation quantization, activation dtype)
VARIANTS = {
    "int8": ("int8", None, torch.float32),
    "int4": ("int4", None, torch.float32),
    "nf4": ("nf4", None, torch.float32),
    "int8-dyn": ("int8", "int8", torch.float32),
    "int4-dyn": ("int4", "int8", torch.float32),
    "int8-bf16x": ("int8", None, torch.bfloat16),
    "int4-bf16x": ("int4", None, torch.bfloat16),
    "nf4-bf16x": ("nf4", None, torch.bfloat16),
}


@functools.cache
def _weights(n: int, k: int):
    torch.manual_seed(0)
    w = torch.randn(n, k) * 0.02
    quantized = {fmt: quantize_weight(w, fmt, block) for fmt, block in FORMATS}
    # torch's own kernels, with their packed layouts
    q8 = quantized["int8"]
    t8 = (q8.qweight, q8.scales)
    codes = torch.randint(0, 16, (n, k), dtype=torch.int32)
    t4 = (
        torch._convert_weight_to_int4pack_for_cpu(codes, 1),
        torch.rand(k // 64, n, 2) * 0.01,
    )
    return w, w.bfloat16(), quantized, t8, t4


def test_copy_bandwidth(compare):
    """Reference point: copy 128 MiB into a reused buffer (read + write bytes)."""
    src = torch.randn(2**25)
    dst = torch.empty_like(src)
    compare.run(lambda: dst.copy_(src), {}, bytes_moved=2 * src.numel() * 4, rounds=10)


# M=128 (prefill-sized) is measured at 4096x4096 only, to keep the file quick
CASES = [
    pytest.param(shape, variant, m, id=f"{shape[0]}x{shape[1]}-{variant}-{m}")
    for shape in SHAPES
    for variant in VARIANTS
    for m in ROWS
    if (m < 128 or shape == SHAPES[0]) and (m >= 16 or not variant.endswith("-bf16x"))
]


@pytest.mark.parametrize("shape,variant,m", CASES)
def test_quant_linear(compare, shape, variant, m):
    n, k = shape
    fmt, act_quant, x_dtype = VARIANTS[variant]
    w, wb, quantized, t8, t4 = _weights(n, k)
    qw = quantized[fmt]
    x = torch.randn(m, k)
    xb = x.bfloat16()
    ours_x = x.to(x_dtype)
    competitors = {
        "fp32_linear": lambda: F.linear(x, w),
        "bf16_linear": lambda: F.linear(xb, wb),
    }
    # torch's int8/int4 kernels take ~0.1-0.5 s per call from M=32 on (an easy win
    # for us that only slows the file down): compared for M <= 16 only
    if variant == "int8" and m <= 16:
        competitors["torch_int8"] = lambda: torch._weight_int8pack_mm(x, *t8)
    if variant == "int4" and m <= 16:
        competitors["torch_int4"] = lambda: torch._weight_int4pack_mm_for_cpu(x, t4[0], 64, t4[1])
    compare.run(
        lambda: quant_linear(ours_x, qw, act_quant=act_quant),
        competitors,
        bytes_moved=qw.nbytes() + ours_x.element_size() * m * (k + n),
        flops=2 * m * n * k,
        rounds=10 if m >= 32 else 20,
        fmt=variant,
        shape=f"M={m} N={n} K={k}",
    )
