"""Small-batch linear (the decode GEMV): every ISA and dtype vs a float64 reference."""

import pytest
import torch
from kernel_testing import DTYPES, ISAS, assert_error_no_worse, random_tensor, require_isa

from minigpt.kernels import force_cpu_isa
from minigpt.kernels.linear import MAX_GEMV_ROWS, linear

# (M, K, N): one row (decoding), a few rows (beams), K odd / not a multiple of the
# vector width, N not a multiple of the 4-row block
SHAPES = [(1, 1, 1), (1, 64, 8), (3, 97, 13), (1, 576, 130), (MAX_GEMV_ROWS, 40, 7)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("isa", ISAS)
def test_gemv_matches_reference(dtype, shape, isa):
    require_isa(isa)
    M, K, N = shape
    x, w, b = random_tensor((M, K), dtype), random_tensor((N, K), dtype), random_tensor((N,), dtype)
    expected = x.double() @ w.double().T + b.double()
    eager = torch.nn.functional.linear(x, w, b)  # torch in the same dtype
    with force_cpu_isa(isa):
        for float_out in (False, True):
            y = linear(x, w, b, float_out=float_out, backend="cpp")
            assert y.dtype == (torch.float32 if float_out else dtype) and y.shape == (M, N)
            # float32 sums rounded once: no worse than torch's own low-precision matmul
            assert_error_no_worse(y, eager, expected, floor=1e-4 * K**0.5)
        y = linear(x, w, backend="cpp")  # no bias
        assert_error_no_worse(y, eager - b, expected - b.double(), floor=1e-4 * K**0.5)


def test_gemv_leading_dims_and_fallbacks():
    x, w = random_tensor((2, 1, 48)), random_tensor((10, 48))
    y = linear(x, w)
    assert y.shape == (2, 1, 10)
    torch.testing.assert_close(y, x @ w.T, atol=1e-5, rtol=1e-5)
    big = random_tensor((MAX_GEMV_ROWS + 1, 48))  # many rows: torch.mm's GEMM
    torch.testing.assert_close(linear(big, w), big @ w.T)
    xg = x.clone().requires_grad_(True)  # gradients: F.linear, differentiable
    linear(xg, w).sum().backward()
    torch.testing.assert_close(xg.grad, w.sum(0).expand_as(x))
    b = random_tensor((5,))
    torch.testing.assert_close(linear(random_tensor((1, 0)), random_tensor((5, 0)), b), b[None])


def test_gemv_bad_input():
    w = random_tensor((4, 8))
    with pytest.raises(ValueError, match="features"):
        linear(random_tensor((1, 7)), w)
    with pytest.raises(TypeError, match="dtype"):
        linear(random_tensor((1, 8), torch.bfloat16), w)
    with pytest.raises(ValueError, match="bias"):
        linear(random_tensor((1, 8)), w, random_tensor((3,)))
    with pytest.raises(ValueError, match="2-D"):
        linear(random_tensor((1, 8)), random_tensor((4, 8, 1)))
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.minigpt.gemv(random_tensor((8, 1)).T, random_tensor((8, 4)).T, None, False)


def test_gemv_under_torch_compile():
    x, w = random_tensor((1, 32)), random_tensor((6, 32))
    fn = torch.compile(lambda x, w: linear(x, w) * 2, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(fn(x, w), 2 * x @ w.T)
