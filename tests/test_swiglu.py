"""SwiGLU (silu(gate) * up): every backend vs the float32 reference, plus the MLP module."""

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_testing import DTYPES, ISAS, check_op, random_tensor, require_isa

from minigpt.kernels import force_cpu_isa, swiglu
from minigpt.kernels.reference import swiglu_reference
from minigpt.nn import SwiGLUMLP

# odd and round sizes; (300, 257) is big enough to be split across threads
SHAPES = [(1,), (7, 33), (3, 5, 97), (64, 256), (300, 257)]
TRITON_SHAPES = [(1,), (7, 33), (3, 1000)]  # (3, 1000) spans several programs


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("isa", ISAS)
def test_swiglu_cpp(dtype, shape, isa):
    require_isa(isa)
    g, u = random_tensor(shape, dtype, scale=2.0), random_tensor(shape, dtype)
    with force_cpu_isa(isa):
        check_op(
            lambda gate, up: swiglu(gate, up, backend="cpp"),
            swiglu_reference,
            {"gate": g, "up": u},
            grads=("gate", "up"),
        )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", TRITON_SHAPES)
def test_swiglu_triton(dtype, shape):
    g, u = random_tensor(shape, dtype, scale=2.0), random_tensor(shape, dtype)
    check_op(
        lambda gate, up: swiglu(gate, up, backend="triton"),
        swiglu_reference,
        {"gate": g, "up": u},
        grads=("gate", "up"),
    )


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_swiglu_saturated_sigmoid(backend):
    # |g| up to 100: sigmoid is 0 or 1 to float32 precision; no NaN/inf may appear
    g = torch.linspace(-100, 100, 401)
    u = random_tensor((401,))
    check_op(
        lambda gate, up: swiglu(gate, up, backend=backend),
        swiglu_reference,
        {"gate": g, "up": u},
        grads=("gate", "up"),
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 7, 2 * 40), (1000, 2 * 33), (1, 2)])
def test_swiglu_halves_of_fused_projection(dtype, shape):
    # gate, up = fused.chunk(2, -1) are strided views; the C++ op reads them in place
    fused = random_tensor(shape, dtype, scale=2.0)
    check_op(
        lambda fused: swiglu(*fused.chunk(2, dim=-1), backend="cpp"),
        lambda fused: swiglu_reference(*fused.chunk(2, dim=-1)),
        {"fused": fused},
        grads=("fused",),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_streaming_stores_on_huge_outputs(dtype):
    # outputs >= 8 MiB each are written with non-temporal stores; an odd length makes the
    # per-thread spans start unaligned, which exercises the alignment peeling
    n = (16 << 20) // torch.finfo(dtype).bits * 8 + 5
    g, u = random_tensor((n,), dtype, scale=2.0), random_tensor((n,), dtype)
    check_op(
        lambda gate, up: swiglu(gate, up, backend="cpp"),
        swiglu_reference,
        {"gate": g, "up": u},
        grads=("gate", "up"),
    )


def test_swiglu_noncontiguous_inputs():
    g = random_tensor((40, 24)).t()
    u = random_tensor((24, 40))
    torch.testing.assert_close(swiglu(g, u, backend="cpp"), swiglu_reference(g, u))
    torch.testing.assert_close(swiglu(u, g, backend="cpp"), swiglu_reference(u, g))
    h = random_tensor((24, 80))[:, ::2]  # last stride 2: copied, still correct
    torch.testing.assert_close(swiglu(h, u, backend="cpp"), swiglu_reference(h, u))


def test_swiglu_empty():
    g = torch.empty(0, 8)
    assert swiglu(g, g, backend="cpp").shape == (0, 8)


@pytest.mark.parametrize(
    "gate, up, err",
    [
        (torch.randn(4, 8), torch.randn(4, 9), ValueError),  # shape
        (torch.randn(4, 8), torch.randn(8, 4), ValueError),  # shape (same numel)
        (torch.randn(4, 8), torch.randn(4, 8).half(), TypeError),  # dtype mismatch
        (torch.randn(4, 8).int(), torch.randn(4, 8).int(), TypeError),  # integer dtype
        (torch.randn(4, 8).double(), torch.randn(4, 8).double(), TypeError),  # float64
        ([1.0, 2.0], torch.randn(2), TypeError),  # not a tensor
        (torch.randn(4, 8), torch.randn(4, 8, device="meta"), ValueError),  # device
    ],
)
def test_swiglu_bad_input(gate, up, err):
    with pytest.raises(err):
        swiglu(gate, up)


def test_swiglu_bad_backend():
    with pytest.raises(ValueError, match="not a backend"):
        swiglu(torch.randn(3), torch.randn(3), backend="cuda")


def test_torch_compile_traces_cpp_op_forward_and_backward():
    f = torch.compile(lambda g, u: swiglu(g, u, backend="cpp"), fullgraph=True)
    g, u = random_tensor((10, 96), requires_grad=True), random_tensor((10, 96), requires_grad=True)
    y = f(g, u)
    y.sum().backward()
    g2, u2 = g.detach().clone().requires_grad_(), u.detach().clone().requires_grad_()
    swiglu_reference(g2, u2).sum().backward()
    torch.testing.assert_close(y, swiglu_reference(g2, u2))
    torch.testing.assert_close(g.grad, g2.grad)
    torch.testing.assert_close(u.grad, u2.grad)


def test_swiglu_mlp_module():
    torch.manual_seed(0)
    mlp = SwiGLUMLP(48, 128)
    assert [n for n, _ in mlp.named_parameters()] == [
        "gate_proj.weight",
        "up_proj.weight",
        "down_proj.weight",
    ]
    x = random_tensor((2, 5, 48), requires_grad=True)
    y = mlp(x)
    x2 = x.detach().clone().requires_grad_()
    expected = mlp.down_proj(torch.nn.functional.silu(mlp.gate_proj(x2)) * mlp.up_proj(x2))
    torch.testing.assert_close(y, expected)
    y.sum().backward()
    grads = [p.grad.clone() for p in mlp.parameters()]
    mlp.zero_grad()
    expected.sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    for got, p in zip(grads, mlp.parameters()):
        torch.testing.assert_close(got, p.grad)
    assert SwiGLUMLP(8, 16, bias=True).up_proj.bias is not None


_DTYPE_CHOICES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int32]


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(0, 40), min_size=0, max_size=3),
    up_shape_delta=st.sampled_from([None, None, None, 1]),
    dtype=st.sampled_from(_DTYPE_CHOICES),
    up_dtype=st.sampled_from([None, None, None, *_DTYPE_CHOICES]),
    backend=st.sampled_from(["cpp", "torch"]),
)
def test_swiglu_property(shape, up_shape_delta, dtype, up_dtype, backend):
    """Random shapes and dtypes (some invalid): matches the reference or raises a clear error."""
    gen = torch.Generator().manual_seed(len(shape))
    g = (torch.randn(shape, generator=gen) * 3).to(dtype)
    up_shape = list(shape) if up_shape_delta is None else [*shape, up_shape_delta]
    u = torch.randn(up_shape, generator=gen).to(up_dtype or dtype)
    try:
        y = swiglu(g, u, backend=backend)
    except (ValueError, TypeError):
        valid = dtype in DTYPES and u.dtype == dtype and up_shape == list(shape)
        assert not valid, "a valid input was rejected"
        return
    ref = swiglu_reference(g.float(), u.float())
    assert y.shape == g.shape and y.dtype == g.dtype
    atol, rtol = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2)}.get(
        dtype, (2e-3, 2e-3)
    )
    torch.testing.assert_close(y.float(), ref, atol=atol, rtol=rtol)


def test_large_outputs_come_from_the_reused_output_pool():
    # outputs >= 1 MiB are served from csrc/cpu/output_pool.cpp: a recycled block holds
    # stale data, so results must still match on every call, and freed blocks are cached
    g, u = random_tensor((1024, 300)), random_tensor((1024, 300))
    expected = swiglu_reference(g, u)
    torch.ops.minigpt.cpu_pool_empty_cache()
    assert torch.ops.minigpt.cpu_pool_cached_bytes() == 0
    for _ in range(3):
        y = swiglu(g, u, backend="cpp")
        torch.testing.assert_close(y, expected)
        y.fill_(float("nan"))  # poison the block before it returns to the pool
        del y
        assert torch.ops.minigpt.cpu_pool_cached_bytes() >= 1024 * 300 * 4
    y = swiglu(g, u, backend="cpp")
    y.resize_(4096, 300).fill_(1.0)  # pooled storage stays resizable
    assert float(y.sum()) == 4096 * 300
    torch.ops.minigpt.cpu_pool_empty_cache()
    assert torch.ops.minigpt.cpu_pool_cached_bytes() == 0


def test_output_pool_can_be_turned_off():
    # MINIGPT_CPU_POOL_MB=0: plain allocations, nothing cached (read once at import)
    code = (
        "import torch, minigpt.kernels as K\n"
        "g, u = torch.randn(1024, 512), torch.randn(1024, 512)\n"
        "y = K.swiglu(g, u, backend='cpp')\n"
        "ref = torch.nn.functional.silu(g) * u\n"
        "torch.testing.assert_close(y, ref)\n"
        "del y\n"
        "assert torch.ops.minigpt.cpu_pool_cached_bytes() == 0\n"
    )
    env = {**os.environ, "MINIGPT_CPU_POOL_MB": "0"}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
