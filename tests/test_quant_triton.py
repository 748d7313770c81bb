"""The Triton quantized matmul (int8, int4, NF4) in the interpreter, vs the reference.

Small shapes (the interpreter is slow); compilation for sm_80/sm_90 is checked
by tests/test_triton_compile.py through ``COMPILE_SPECS``.
"""

from __future__ import annotations

import pytest
import torch

from minigpt.kernels.quant import quant_linear, quantize_weight

FORMATS = (("int8", None), ("int4", 32), ("int4", 64), ("nf4", 64))
# odd M/N exercise the tile masks; K=97 the int8 K tail; M=20 two row tiles
SHAPES = [(1, 37, 128), (5, 70, 64), (20, 9, 192), (3, 5, 97)]


@pytest.mark.parametrize("fmt,block", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_quant_linear_matches_reference(fmt, block, dtype):
    torch.manual_seed(5)
    for m, n, k in SHAPES:
        if block is not None and k % block:
            continue
        qw = quantize_weight(torch.randn(n, k), fmt, block)
        x = torch.randn(m, k).to(dtype)
        bias = torch.randn(n) if n % 2 else None
        expected = quant_linear(x, qw, bias, backend="torch")
        got = quant_linear(x, qw, bias, backend="triton")
        assert got.dtype == dtype and got.shape == (m, n)
        if dtype == torch.float32:
            tol = dict(atol=2e-5 * k**0.5, rtol=2e-5)
        else:  # the output is rounded to bf16/fp16 (same tolerances as the C++ tests)
            tol = dict(atol=2e-2 * k**0.5, rtol=2e-2)
        torch.testing.assert_close(got.float(), expected.float(), **tol, msg=f"{m, n, k}")


def test_triton_act_quant_and_leading_dims():
    torch.manual_seed(6)
    qw = quantize_weight(torch.randn(24, 64), "int4", 32)
    x = torch.randn(2, 3, 64)
    torch.testing.assert_close(
        quant_linear(x, qw, backend="triton", act_quant="int8"),
        quant_linear(x, qw, backend="torch", act_quant="int8"),
        atol=1e-4,
        rtol=1e-4,
    )
    assert quant_linear(torch.randn(64), qw, backend="triton").shape == (24,)
