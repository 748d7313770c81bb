"""RMSNorm and fused add + RMSNorm: every backend vs the float32 reference."""

import pytest
import torch
from kernel_testing import DTYPES, ISAS, check_op, random_tensor, require_isa

from minigpt.kernels import add_rms_norm, force_cpu_isa, rms_norm
from minigpt.kernels.reference import add_rms_norm_reference, rms_norm_reference

SHAPES = [(1, 1), (7, 33), (3, 5, 97), (64, 256), (2, 1000)]  # odd and round rows
TRITON_SHAPES = [(1, 1), (7, 33), (4, 64)]  # the interpreter is slow


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("isa", ISAS)
def test_rms_norm_cpp(dtype, shape, isa):
    require_isa(isa)
    x = random_tensor(shape, dtype)
    w = random_tensor(shape[-1:], dtype, scale=0.5) + 1
    with force_cpu_isa(isa):
        check_op(
            lambda x, weight: rms_norm(x, weight, 1e-5, backend="cpp"),
            lambda x, weight: rms_norm_reference(x, weight, 1e-5),
            {"x": x, "weight": w},
            grads=("x", "weight"),
            grad_tol_scale=2.0,
        )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("isa", ISAS)
def test_add_rms_norm_cpp(dtype, shape, isa):
    require_isa(isa)
    x, r = random_tensor(shape, dtype), random_tensor(shape, dtype)
    w = random_tensor(shape[-1:], torch.float32)  # float32 gain with low-precision x
    with force_cpu_isa(isa):
        check_op(
            lambda x, residual, weight: add_rms_norm(x, residual, weight, backend="cpp"),
            add_rms_norm_reference,
            {"x": x, "residual": r, "weight": w},
            grads=("x", "residual", "weight"),
            dtype=dtype,
            grad_tol_scale=2.0,
        )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", TRITON_SHAPES)
def test_rms_norm_triton(dtype, shape):
    x = random_tensor(shape, dtype)
    w = random_tensor(shape[-1:], dtype)
    check_op(
        lambda x, weight: rms_norm(x, weight, backend="triton"),
        rms_norm_reference,
        {"x": x, "weight": w},
        grads=("x", "weight"),
        grad_tol_scale=2.0,
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", TRITON_SHAPES)
def test_add_rms_norm_triton(dtype, shape):
    x, r = random_tensor(shape, dtype), random_tensor(shape, dtype)
    w = random_tensor(shape[-1:], dtype)
    check_op(
        lambda x, residual, weight: add_rms_norm(x, residual, weight, backend="triton"),
        add_rms_norm_reference,
        {"x": x, "residual": r, "weight": w},
        grads=("x", "residual", "weight"),
        grad_tol_scale=2.0,
    )


def test_rms_norm_normalizes():
    x = random_tensor((16, 128), scale=7.0)
    y = rms_norm(x, torch.ones(128))
    assert torch.allclose(y.pow(2).mean(-1), torch.ones(16), atol=1e-4)


def test_residual_gradient_flows_through_both_outputs():
    # loss uses both y and the new residual h: dx must include both paths
    x = random_tensor((5, 40), requires_grad=True)
    r = random_tensor((5, 40), requires_grad=True)
    w = random_tensor((40,), requires_grad=True)
    y, h = add_rms_norm(x, r, w, backend="cpp")
    (y.sum() + (h * h).sum()).backward()
    xr = x.detach().clone().requires_grad_()
    rr = r.detach().clone().requires_grad_()
    wr = w.detach().clone().requires_grad_()
    y2, h2 = add_rms_norm_reference(xr, rr, wr)
    (y2.sum() + (h2 * h2).sum()).backward()
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(r.grad, rr.grad)
    torch.testing.assert_close(w.grad, wr.grad, atol=1e-4, rtol=1e-4)


def test_noncontiguous_input_is_handled():
    x = random_tensor((8, 64)).t()  # (64, 8) non-contiguous view
    w = random_tensor((8,))
    torch.testing.assert_close(rms_norm(x, w, backend="cpp"), rms_norm_reference(x, w))


@pytest.mark.parametrize(
    "args, err",
    [
        ((torch.randn(4, 8), torch.randn(7)), ValueError),  # weight size
        ((torch.randn(4, 8), torch.randn(8, 1)), ValueError),  # weight rank
        ((torch.randn(4, 8).int(), torch.randn(8)), TypeError),  # dtype
        (([1.0, 2.0], torch.randn(2)), TypeError),  # not a tensor
        ((torch.randn(4, 0), torch.randn(0)), ValueError),  # empty rows
        ((torch.randn(4, 8), torch.randn(8), -1.0), ValueError),  # eps
        ((torch.randn(4, 8), torch.randn(8, device="meta")), ValueError),  # device
    ],
)
def test_rms_norm_bad_input(args, err):
    with pytest.raises(err):
        rms_norm(*args)


def test_add_rms_norm_bad_input():
    with pytest.raises(ValueError, match="residual shape"):
        add_rms_norm(torch.randn(4, 8), torch.randn(4, 9), torch.randn(8))
    with pytest.raises(TypeError, match="residual dtype"):
        add_rms_norm(torch.randn(4, 8), torch.randn(4, 8).half(), torch.randn(8))


_SOFTWARE_BF16_SCRIPT = """
import sys, torch
from minigpt.kernels import add_rms_norm
g = torch.Generator().manual_seed(0)
x, r = (torch.randn(5, 77, generator=g).bfloat16().requires_grad_() for _ in range(2))
w = torch.randn(77, generator=g).requires_grad_()
y, h = add_rms_norm(x, r, w, backend="cpp")
dy, dh = torch.randn(5, 77, generator=g).bfloat16(), torch.randn(5, 77, generator=g).bfloat16()
torch.save([y, h, *torch.autograd.grad((y, h), (x, r, w), (dy, dh))], sys.argv[1])
"""


def test_native_and_software_bfloat16_stores_agree(tmp_path):
    # On CPUs with AVX512-BF16 the AVX-512 kernels convert to bfloat16 natively;
    # MINIGPT_NATIVE_BF16=0 (read once per process, hence the subprocess) selects
    # the software rounding. Both round to nearest even: the results are identical.
    import os
    import subprocess
    import sys

    outs = []
    for native in ("1", "0"):
        path = tmp_path / f"native{native}.pt"
        env = {**os.environ, "MINIGPT_NATIVE_BF16": native}
        subprocess.run(
            [sys.executable, "-c", _SOFTWARE_BF16_SCRIPT, str(path)], env=env, check=True
        )
        outs.append(torch.load(path))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_torch_compile_traces_cpp_op():
    w = random_tensor((96,))
    f = torch.compile(lambda x: rms_norm(x, w, backend="cpp"), fullgraph=True)
    x = random_tensor((10, 96))
    torch.testing.assert_close(f(x), rms_norm_reference(x, w))


# ---- property test: random shapes and dtypes, valid or not ------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_DT = st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int32])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=st.lists(st.integers(0, 9), min_size=0, max_size=4),
    wlen=st.integers(0, 10),
    xdt=_DT,
    wdt=_DT,
    eps=st.sampled_from([1e-6, 0.0, -1.0, 1e-2]),
    residual=st.booleans(),
)
def test_property_matches_reference_or_raises(shape, wlen, xdt, wdt, eps, residual):
    x = torch.randn(shape).to(xdt)
    w = torch.randn(wlen).to(wdt)
    try:
        if residual:
            out = add_rms_norm(x, torch.randn(shape).to(xdt), w, eps, backend="cpp")[0]
        else:
            out = rms_norm(x, w, eps, backend="cpp")
    except (ValueError, TypeError):
        return
    ok_dtypes = (torch.float32, torch.bfloat16, torch.float16)
    assert xdt in ok_dtypes and wdt in ok_dtypes and eps > 0 and len(shape) >= 1
    assert shape[-1] == wlen and wlen > 0
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.isfinite(out.float()).all()
