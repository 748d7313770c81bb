"""Tests of the weight-only quantization formats and the mixed-matmul kernels."""

from __future__ import annotations

import contextlib

import pytest
import torch
from kernel_testing import ISAS, require_isa

from minigpt.kernels import force_cpu_isa
from minigpt.kernels.quant import quant_linear, quantize_weight, sqnr_db
from minigpt.kernels.reference.quant import (
    NF4_CODEBOOK,
    nf4_codebook_from_normal,
    pack_4bit,
    quant_linear_reference,
    unpack_4bit,
)

FORMATS = (("int8", None), ("int4", 32), ("int4", 64), ("int4", 128), ("nf4", 64))


def test_nf4_codebook_matches_its_definition():
    ours = torch.tensor(NF4_CODEBOOK, dtype=torch.float64)
    torch.testing.assert_close(ours, nf4_codebook_from_normal(), atol=1e-6, rtol=0)


def test_pack_4bit_layout_and_round_trip():
    codes = torch.randint(0, 16, (3, 64), dtype=torch.uint8)
    packed = pack_4bit(codes)
    assert packed.shape == (3, 32) and packed.dtype == torch.uint8
    # documented layout: byte j of a run = element j (low nibble) | element j+16 (high)
    assert int(packed[1, 5]) == int(codes[1, 5]) | (int(codes[1, 21]) << 4)
    assert int(packed[2, 16 + 3]) == int(codes[2, 32 + 3]) | (int(codes[2, 48 + 3]) << 4)
    assert torch.equal(unpack_4bit(packed), codes)


# SQNR reached on N(0, 1) weights (4096 x 512): int8 ~ 40.6 dB with per-channel
# scales; int4 g32 ~ 21.6, g64 ~ 20.3, g128 ~ 19.2 dB; nf4 b64 ~ 20.7 dB.
SQNR_MIN_DB = {("int8", None): 40.0, ("int4", 32): 21.0, ("int4", 64): 19.8}
SQNR_MIN_DB |= {("int4", 128): 18.7, ("nf4", 64): 20.2}


@pytest.mark.parametrize("fmt,block", FORMATS)
def test_round_trip_sqnr(fmt, block):
    torch.manual_seed(0)
    w = torch.randn(4096, 512)
    qw = quantize_weight(w, fmt, block)
    approx = qw.dequantize()
    db = sqnr_db(w, approx)
    assert db > SQNR_MIN_DB[(fmt, block)], f"{fmt} block {block}: {db:.2f} dB"
    # quantizing the dequantized weight again is (nearly) lossless
    again = quantize_weight(approx, fmt, block).dequantize()
    assert sqnr_db(approx, again) > db + 10
    # storage size: int8 ~1 byte/weight; 4-bit 0.5 byte/weight + <= 4 bytes per block
    per_weight = qw.nbytes() / w.numel()
    assert per_weight <= (1.01 if fmt == "int8" else 0.5 + 4 / block)


@pytest.mark.parametrize("fmt", ["int4", "nf4"])
def test_k_not_multiple_of_group_rejected(fmt):
    with pytest.raises(ValueError, match="not a multiple"):
        quantize_weight(torch.randn(8, 96), fmt, 64)
    with pytest.raises(ValueError):
        quantize_weight(torch.randn(8, 100), fmt, 48)


def test_bad_inputs():
    qw = quantize_weight(torch.randn(8, 64), "int8")
    with pytest.raises(ValueError, match="K=64"):
        quant_linear(torch.randn(2, 32), qw)
    with pytest.raises(TypeError):
        quant_linear(torch.randn(2, 64), torch.randn(8, 64))
    with pytest.raises(TypeError):
        quant_linear(torch.randint(0, 3, (2, 64)), qw)
    with pytest.raises(ValueError, match="bias"):
        quant_linear(torch.randn(2, 64), qw, torch.randn(7))
    with pytest.raises(ValueError, match="fmt"):
        quantize_weight(torch.randn(8, 64), "int3")
    with pytest.raises(ValueError, match="group_size"):
        quantize_weight(torch.randn(8, 64), "int4", 48)


# (M, N, K): odd M and N exercise tile tails; K=97 the int8 vector tail
SHAPES = [(1, 37, 128), (3, 5, 64), (7, 130, 256), (33, 19, 384), (48, 8, 128), (2, 9, 640)]
TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (2e-3, 2e-3)}


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt,block", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quant_linear_cpp_matches_reference(isa, fmt, block, dtype):
    require_isa(isa)
    torch.manual_seed(1)
    shapes = SHAPES + ([(2, 11, 97), (5, 3, 17)] if fmt == "int8" else [])
    for m, n, k in shapes:
        if block is not None and k % block:
            continue  # rejected by quantize_weight (tested above); other shapes cover it
        w = torch.randn(n, k)
        qw = quantize_weight(w, fmt, block)
        x = torch.randn(m, k).to(dtype)
        bias = torch.randn(n) if n % 2 else None
        expected = quant_linear(x, qw, bias, backend="torch")
        with force_cpu_isa(isa):
            got = quant_linear(x, qw, bias, backend="cpp")
        assert got.dtype == dtype and got.shape == (m, n)
        atol, rtol = TOL[dtype]
        # sums of K products: scale atol by sqrt(K)
        torch.testing.assert_close(
            got.float(), expected.float(), atol=atol * k**0.5, rtol=rtol, msg=f"{m, n, k}"
        )


# ---- AVX512-BF16 kernels (csrc/cpu/quant_bf16.cpp) ----------------------------------


@contextlib.contextmanager
def bf16_dot(enabled: bool):
    """Turn the AVX512-BF16 quant kernels on or off (the AVX-512 float kernel runs when off)."""
    previous = torch.ops.minigpt.quant_set_bf16_dot(enabled)
    try:
        yield
    finally:
        torch.ops.minigpt.quant_set_bf16_dot(previous)


def _bf16_split(x: torch.Tensor) -> torch.Tensor:
    """x as the bf16 kernel sees a float32 row: hi + lo, two bf16 parts (16 bits)."""
    hi = x.bfloat16().float()
    return hi + (x - hi).bfloat16().float()


def test_avx512_float_kernel_matches_reference():
    """The AVX-512 Vec kernel, which the bf16 kernels replace on this CPU, still checked."""
    torch.manual_seed(11)
    for fmt, block in FORMATS:
        for m, n, k in [(1, 37, 128), (3, 5, 64), (17, 9, 256), (2, 11, 97)]:
            if block is not None and k % block:
                continue
            qw = quantize_weight(torch.randn(n, k), fmt, block)
            for dtype in (torch.float32, torch.bfloat16):
                x = torch.randn(m, k).to(dtype)
                expected = quant_linear(x, qw, backend="torch")
                with force_cpu_isa("avx512"), bf16_dot(False):
                    got = quant_linear(x, qw, backend="cpp")
                atol, rtol = TOL[dtype]
                torch.testing.assert_close(
                    got.float(), expected.float(), atol=atol * k**0.5, rtol=rtol
                )


# M=1 int4 (any activation dtype) and M>1 with bf16 activations take the bf16
# kernels; nf4 block 96 exercises super-chunks of groups that are not powers of 2
BF16DOT_FORMATS = FORMATS + (("nf4", 96), ("nf4", 256))
BF16DOT_SHAPES = [(1, 37, 128), (1, 9, 640), (1, 6, 96), (1, 5, 32), (1, 130, 4096)]
BF16DOT_SHAPES += [(2, 9, 640), (3, 5, 64), (7, 130, 256), (16, 19, 384), (33, 6, 768)]
BF16DOT_SHAPES += [(5, 8, 96), (2, 11, 97), (4, 3, 288), (6, 5, 1536)]


@pytest.mark.parametrize("fmt,block", BF16DOT_FORMATS)
def test_bf16_dot_kernels_match_reference(fmt, block):
    require_isa("avx512")
    torch.manual_seed(12)
    for m, n, k in BF16DOT_SHAPES:
        if block is not None and k % block:
            continue
        qw = quantize_weight(torch.randn(n, k), fmt, block)
        bias = torch.randn(n) if n % 2 else None
        w = qw.dequantize()
        # bf16 activations: exact products, float32 sums; only the output rounds to bf16
        xb = torch.randn(m, k).bfloat16()
        with force_cpu_isa("avx512"), bf16_dot(True):
            got = quant_linear(xb, qw, bias)
        expected = quant_linear(xb.float(), qw, bias, backend="torch")
        torch.testing.assert_close(
            got.float(), expected, atol=2e-5 * k**0.5, rtol=2**-8, msg=f"bf16 {m, n, k}"
        )
        if m == 1 and fmt == "int4":
            # float32 activations at M=1 run as hi + lo bf16 parts: against the
            # reference on those parts, float32 tolerance; against the exact x the
            # split adds <= 2^-17 relative error per element (documented trade-off)
            x = torch.randn(m, k)
            with force_cpu_isa("avx512"), bf16_dot(True):
                got = quant_linear(x, qw, bias)
            ref_split = quant_linear_reference(_bf16_split(x), w, bias)
            torch.testing.assert_close(got, ref_split, atol=2e-5 * k**0.5, rtol=2e-5)
            ref = quant_linear_reference(x, w, bias)
            split_err = (x - _bf16_split(x)).abs() @ w.abs().t()
            assert bool(((got - ref).abs() <= split_err + 2e-5 * k**0.5).all())


def test_quant_linear_leading_dims_and_large_m_path():
    torch.manual_seed(2)
    qw = quantize_weight(torch.randn(24, 64), "int4", 32)
    x = torch.randn(2, 40, 64)  # 80 rows: takes the dequantize + GEMM path
    torch.testing.assert_close(
        quant_linear(x, qw), quant_linear(x, qw, backend="torch"), atol=1e-4, rtol=1e-4
    )
    x1 = torch.randn(64)
    assert quant_linear(x1, qw).shape == (24,)


def test_quant_linear_torch_compile():
    qw = quantize_weight(torch.randn(16, 64), "nf4")
    x = torch.randn(3, 64)

    def f(x):
        return torch.ops.minigpt.quant_linear(x, qw.qweight, qw.scales, None, None, 2, 64) * 2

    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x), f(x))


# ---- dynamic int8 activations (act_quant="int8") -----------------------------------

DYN_FORMATS = (("int8", None), ("int4", 32), ("int4", 64), ("int4", 128))
# K=96/160/224: the last 4-bit chunk is partial (K % 128 != 0); K=97/17 the int8 tail
DYN_SHAPES = [(1, 37, 128), (3, 5, 64), (7, 130, 256), (33, 19, 384), (2, 9, 640)]
DYN_SHAPES += [(5, 8, 96), (1, 11, 160), (6, 7, 224), (2, 3, 97), (4, 6, 17)]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt,block", DYN_FORMATS)
def test_quant_linear_act_quant_matches_reference(isa, fmt, block):
    """avx512 runs the VNNI integer kernel; avx2/scalar the float kernel on rounded x."""
    require_isa(isa)
    torch.manual_seed(3)
    for m, n, k in DYN_SHAPES:
        if (block is not None and k % block) or (block is None and k in (96, 224)):
            continue
        qw = quantize_weight(torch.randn(n, k), fmt, block)
        x = torch.randn(m, k)
        x[0, :5] = 0.0  # exact zeros and a zero row below must not break the scale
        if m > 2:
            x[2] = 0.0
        bias = torch.randn(n)
        expected = quant_linear(x, qw, bias, backend="torch", act_quant="int8")
        with force_cpu_isa(isa):
            got = quant_linear(x, qw, bias, backend="cpp", act_quant="int8")
        # integer sums are exact: only the float scaling differs (fp32 rounding)
        torch.testing.assert_close(got, expected, atol=2e-5 * k**0.5, rtol=2e-5, msg=f"{m, n, k}")
        for dtype in (torch.bfloat16, torch.float16):
            with force_cpu_isa(isa):
                got_low = quant_linear(x.to(dtype), qw, bias, backend="cpp", act_quant="int8")
            assert got_low.dtype == dtype
            ref_low = quant_linear(x.to(dtype), qw, bias, backend="torch", act_quant="int8")
            # bf16/fp16 outputs (and the reference re-rounding its rounded x to dtype)
            torch.testing.assert_close(
                got_low.float(), ref_low.float(), atol=3e-2 * k**0.5, rtol=2e-2
            )


def test_act_quant_is_native_here_and_close_to_float_path():
    # this machine has AVX512-VNNI: the integer kernel is what the test above checked
    assert torch.ops.minigpt.quant_dynamic_native()
    torch.manual_seed(4)
    qw = quantize_weight(torch.randn(256, 512), "int4", 64)
    x = torch.randn(4, 512)
    exact = quant_linear(x, qw)
    dyn = quant_linear(x, qw, act_quant="int8")
    rel = float((dyn - exact).norm() / exact.norm())
    assert 0 < rel < 0.01, rel  # int8 activations: ~0.5 % relative error on Gaussian x


def test_act_quant_bad_options_grad_and_compile():
    qn = quantize_weight(torch.randn(8, 64), "nf4")
    with pytest.raises(ValueError, match="nf4"):
        quant_linear(torch.randn(2, 64), qn, act_quant="int8")
    q8 = quantize_weight(torch.randn(8, 64), "int8")
    with pytest.raises(ValueError, match="act_quant"):
        quant_linear(torch.randn(2, 64), q8, act_quant="int4")
    x = torch.randn(3, 64, requires_grad=True)
    quant_linear(x, q8, act_quant="int8").sum().backward()
    # straight-through: the gradient is that of the float weight
    torch.testing.assert_close(x.grad, q8.dequantize().sum(0).expand(3, 64))

    def f(x):
        return torch.ops.minigpt.quant_linear_dynamic(x, q8.qweight, q8.scales, None, None, 0, 0)

    x2 = torch.randn(3, 64)
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x2), f(x2))


# ---- prefill (M > LARGE_M): tile-wise C++ dequantize + float GEMM ------------------


@pytest.mark.parametrize("isa", ISAS)
def test_cpp_dequantize_and_prefill_match_reference(isa):
    require_isa(isa)
    torch.manual_seed(7)
    for fmt, block in FORMATS:
        for n, k in [(7, 128), (5, 97), (300, 256)]:
            if block is not None and k % block:
                continue
            qw = quantize_weight(torch.randn(n, k), fmt, block)
            code = {"int8": 0, "int4": 1, "nf4": 2}[fmt]
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                with force_cpu_isa(isa):
                    got = torch.ops.minigpt.quant_dequantize(
                        qw.qweight, qw.scales, qw.zeros, code, qw.block, k, dtype
                    )
                assert got.dtype == dtype
                # fp32: same float ops; bf16/fp16: one rounding of the same value
                torch.testing.assert_close(got, qw.dequantize(dtype), atol=0, rtol=0)
            x = torch.randn(61, k)  # > LARGE_M rows: the prefill path
            bias = torch.randn(n)
            with force_cpu_isa(isa):
                got = quant_linear(x, qw, bias)
            expected = quant_linear(x, qw, bias, backend="torch")
            torch.testing.assert_close(got, expected, atol=2e-5 * k**0.5, rtol=2e-5)


def test_prefill_path_keeps_input_gradient():
    torch.manual_seed(8)
    qw = quantize_weight(torch.randn(16, 64), "int4", 32)
    x = torch.randn(60, 64, requires_grad=True)
    quant_linear(x, qw).sum().backward()
    torch.testing.assert_close(x.grad, qw.dequantize().sum(0).expand(60, 64))
