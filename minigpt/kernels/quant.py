"""Weight-only quantization: quantize / dequantize and the mixed matmul, per format.

Formats (byte layouts in :mod:`minigpt.kernels.reference.quant`):

* ``int8``  per-output-channel symmetric, 1 byte per weight.
* ``int4``  group-wise asymmetric (group 32/64/128), bf16 scale + uint8 zero
  point per group, two weights per byte.
* ``nf4``   block-wise absmax "normal float" 4-bit (QLoRA), two weights per byte.

The mixed matmul ``y = x @ dequantize(W)^T (+ bias)`` never materializes the
float weight on the C++ path: each packed weight byte is read once, decoded in
registers and multiplied with every activation row (decode-time GEMV when
M = 1, small GEMMs up to M ~ 32). For large M (prefill) a dequantize-then-GEMM
path is faster, because a float GEMM library reuses the weights from cache
far better; :func:`quant_linear` switches at ``LARGE_M``.

Dynamic activation quantization (``act_quant="int8"``) is an explicit option:
each activation row is rounded to int8 with its own scale and the products run
on integers (AVX512-VNNI ``vpdpbusd``: 64 multiply-adds per instruction), which
takes the decode GEMV from compute-bound to memory-bound for int4. It changes
the result slightly (the activations lose precision). NF4 has no integer path.

The default float path multiplies by the exact weights. On CPUs with
AVX512-BF16 it runs on ``vdpbf16ps`` (exact products of bf16 pairs, float32
sums; weight codes are exact in bf16, scales and zero points are applied in
float32) for int4 at M = 1 and for bf16 activations at M > 1. bf16 activations
are used exactly; float32 activations of the int4 M = 1 kernel are split into
two bf16 parts, ``x = hi + lo``, which keeps 16 of their 24 significant bits
(relative error <= 2^-17 per element, far below int4's own error). Everywhere
else (and without AVX512-BF16) the float32 FMA kernel runs: exact up to float32
summation order.

Quantizing is an offline step done once per model, so ``quantize_*`` use the
vectorized eager reference (already fast enough: a 4096x4096 matrix takes a
fraction of a second).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from minigpt.kernels._backend import cpp_available, register_op, select_backend
from minigpt.kernels._checks import check_same_device, check_tensor
from minigpt.kernels.reference.quant import (
    INT4_GROUP_SIZES,
    NF4_CODEBOOK,
    dequantize_int4_reference,
    dequantize_int8_reference,
    dequantize_nf4_reference,
    fake_quantize_rows_reference,
    quant_linear_reference,
    quantize_int4_reference,
    quantize_int8_reference,
    quantize_nf4_reference,
    sqnr_db,
)

register_op("quant_linear", ("cpp", "triton"))

FORMATS = ("int8", "int4", "nf4")
ACT_QUANT = (None, "int8")  # activation quantization options of quant_linear
_FMT_CODE = {"int8": 0, "int4": 1, "nf4": 2}
LARGE_M = 48  # rows above which tile-dequantize + float GEMM beats the fused kernel


@dataclass
class QuantizedWeight:
    """A quantized (N, K) weight matrix: packed codes plus per-row/group metadata.

    Attributes:
        fmt: ``"int8"``, ``"int4"`` or ``"nf4"``.
        qweight: int8 (N, K) for int8; uint8 (N, K // 2) for the 4-bit formats.
        scales: float32 (N,) for int8, bfloat16 (N, K // G) for int4,
            float32 absmax (N, K // B) for nf4.
        zeros: uint8 (N, K // G) zero points for int4, else None.
        shape: (N, K) of the original weight.
        block: group size (int4) or block size (nf4); 0 for int8.
    """

    fmt: str
    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    shape: tuple[int, int]
    block: int

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float (N, K) approximation of the original weight."""
        if self.fmt == "int8":
            return dequantize_int8_reference(self.qweight, self.scales, dtype)
        if self.fmt == "int4":
            assert self.zeros is not None
            return dequantize_int4_reference(self.qweight, self.scales, self.zeros, dtype)
        return dequantize_nf4_reference(self.qweight, self.scales, dtype)

    def nbytes(self) -> int:
        """Bytes of packed weights plus metadata (what a GEMV must read)."""
        t = [self.qweight, self.scales] + ([self.zeros] if self.zeros is not None else [])
        return sum(x.numel() * x.element_size() for x in t)


def quantize_weight(weight: torch.Tensor, fmt: str, block: int | None = None) -> QuantizedWeight:
    """Quantize a float (N, K) weight into ``fmt``.

    Args:
        weight: (N, K) float tensor (any float dtype; math in float32).
        fmt: ``"int8"``, ``"int4"`` or ``"nf4"``.
        block: int4 group size (32, 64 or 128; default 64) or nf4 block size
            (a multiple of 32; default 64). Ignored for int8. K must be a
            multiple of it, otherwise a ValueError says so.
    """
    check_tensor(weight, "weight", ndim=2, dtypes=None)
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    w = weight.detach()
    shape = (int(w.shape[0]), int(w.shape[1]))
    if fmt == "int8":
        q, s = quantize_int8_reference(w)
        return QuantizedWeight("int8", q, s, None, shape, 0)
    block = 64 if block is None else int(block)
    if fmt == "int4":
        if block not in INT4_GROUP_SIZES:
            raise ValueError(f"int4 group_size must be one of {INT4_GROUP_SIZES}, got {block}")
        q, s, z = quantize_int4_reference(w, block)
        return QuantizedWeight("int4", q, s, z, shape, block)
    q, s = quantize_nf4_reference(w, block)
    return QuantizedWeight("nf4", q, s, None, shape, block)


def quant_linear(
    x: torch.Tensor,
    weight: QuantizedWeight,
    bias: torch.Tensor | None = None,
    *,
    backend: str | None = None,
    act_quant: str | None = None,
) -> torch.Tensor:
    """``y = x @ dequantize(weight)^T (+ bias)`` with a quantized weight.

    Args:
        x: (..., K) float32/bfloat16/float16 activations.
        weight: a :class:`QuantizedWeight` of shape (N, K).
        bias: optional (N,) float bias.
        backend: ``"torch"`` (dequantize + float32 matmul, the reference),
            ``"cpp"`` (CPU: fused kernel reading packed weights once) or
            ``"triton"`` (CUDA: decode in registers + ``tl.dot``).
        act_quant: ``None`` (default: float activations, exact) or ``"int8"``:
            round each activation row to int8 first (one scale per row, see
            :func:`~minigpt.kernels.reference.quant.fake_quantize_rows_reference`)
            and multiply on integers (AVX512-VNNI when the CPU has it; elsewhere
            the float kernel runs on the rounded activations, same result).
            int8 and int4 weights only. Gradients pass straight through the rounding.

    Returns:
        (..., N) tensor of x's dtype, accumulated in float32.
    """
    if backend is None and _decode_fast_path_ok(x, weight, bias, act_quant):
        # decode hot path (one call per linear layer per token): the argument
        # checks below cost several times the kernel for small layers
        y = _fused(x.reshape(-1, weight.shape[1]), weight, bias, "cpp", act_quant is not None)
        return y.reshape(*x.shape[:-1], weight.shape[0])
    check_tensor(x, "x", min_ndim=1)
    if not isinstance(weight, QuantizedWeight):
        raise TypeError(f"weight must be a QuantizedWeight, got {type(weight).__name__}")
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x's last dimension is {x.shape[-1]} but the weight has K={k} inputs")
    if bias is not None:
        check_tensor(bias, "bias", ndim=1)
        if bias.shape[0] != n:
            raise ValueError(f"bias has {bias.shape[0]} elements, expected N={n}")
    if act_quant not in ACT_QUANT:
        raise ValueError(f"act_quant must be one of {ACT_QUANT}, got {act_quant!r}")
    if act_quant is not None and weight.fmt == "nf4":
        raise ValueError("act_quant='int8' needs int8 or int4 weights (nf4 has no integer path)")
    check_same_device(x=x, qweight=weight.qweight, bias=bias)
    chosen = select_backend("quant_linear", x.device, backend)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if chosen == "torch":
        xr = x2 if act_quant is None else fake_quantize_rows_reference(x2).to(x2.dtype)
        y = quant_linear_reference(xr, weight.dequantize(), bias)
    elif chosen == "cpp" and act_quant is None and x2.shape[0] > LARGE_M:
        # prefill: a float GEMM library reuses weights from cache far better; the
        # C++ op decodes W tile by tile into a small buffer for at::mm
        if torch.is_grad_enabled() and (
            x2.requires_grad or (bias is not None and bias.requires_grad)
        ):
            b = None if bias is None else bias.to(x.dtype)
            y = F.linear(x2, weight.dequantize(x.dtype), b)
        else:
            y = torch.ops.minigpt.quant_linear_prefill(
                x2.contiguous(), weight.qweight, weight.scales, weight.zeros, bias,
                _FMT_CODE[weight.fmt], weight.block,
            )  # fmt: skip
    elif torch.is_grad_enabled() and x2.requires_grad:
        y = _QuantLinearFunction.apply(x2, weight, bias, chosen, act_quant is not None)
    else:
        y = _fused(x2, weight, bias, chosen, act_quant is not None)
    return y.reshape(*lead, n)


_FAST_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _decode_fast_path_ok(x, weight, bias, act_quant) -> bool:
    """True when the call is certainly valid for the C++ decode kernel as it stands:
    CPU, no autograd, few rows, default backend, shapes and dtypes that match."""
    return (
        type(x) is torch.Tensor
        and type(weight) is QuantizedWeight
        and x.device.type == "cpu"
        and x.dtype in _FAST_DTYPES
        and x.dim() >= 1
        and x.is_contiguous()
        and x.shape[-1] == weight.shape[1]
        and x.numel() <= LARGE_M * weight.shape[1]
        and x.numel() > 0
        and not (x.requires_grad and torch.is_grad_enabled())
        and weight.qweight.device.type == "cpu"
        and (act_quant is None or (act_quant == "int8" and weight.fmt != "nf4"))
        and (bias is None or (type(bias) is torch.Tensor and bias.dim() == 1 and
                              bias.shape[0] == weight.shape[0] and bias.is_floating_point() and
                              bias.device.type == "cpu" and not bias.requires_grad))
        and not os.environ.get("MINIGPT_BACKEND")
        and cpp_available()
    )  # fmt: skip


def _fused(
    x2: torch.Tensor,
    weight: QuantizedWeight,
    bias: torch.Tensor | None,
    backend: str,
    dynamic: bool = False,
) -> torch.Tensor:
    if backend == "triton":
        from minigpt.kernels.triton import quant as tri

        if dynamic:  # GPU: round the activations, then the float-activation kernel
            x2 = fake_quantize_rows_reference(x2).to(x2.dtype)
        return tri.quant_linear(
            x2,
            weight.qweight,
            weight.scales,
            weight.zeros,
            bias,
            _FMT_CODE[weight.fmt],
            weight.block,
        )
    op = torch.ops.minigpt.quant_linear_dynamic if dynamic else torch.ops.minigpt.quant_linear
    return op(
        x2.contiguous(),
        weight.qweight,
        weight.scales,
        weight.zeros,
        bias,
        _FMT_CODE[weight.fmt],
        weight.block,
    )


class _QuantLinearFunction(torch.autograd.Function):
    """Gradient with respect to x (and bias) through a frozen quantized weight.

    QLoRA trains adapters on top of a quantized base: the base weight gets no
    gradient, but the activations below it do: dx = dy @ dequantize(W).
    """

    @staticmethod
    def forward(ctx, x2, weight, bias, backend, dynamic):  # type: ignore[override]
        ctx.weight = weight
        ctx.has_bias = bias is not None
        return _fused(x2, weight, bias, backend, dynamic)

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        w = ctx.weight.dequantize(torch.float32)
        dx = (dy.float() @ w).to(dy.dtype)
        db = dy.float().sum(0).to(dy.dtype) if ctx.has_bias else None
        return dx, None, db, None, None


def dequantize_weight(weight: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Functional form of :meth:`QuantizedWeight.dequantize`."""
    return weight.dequantize(dtype)


if cpp_available():

    @torch.library.register_fake("minigpt::quant_linear")
    def _quant_linear_fake(x, qweight, scales, zeros, bias, fmt, block):
        return x.new_empty(x.shape[0], qweight.shape[0])

    @torch.library.register_fake("minigpt::quant_linear_prefill")
    def _quant_linear_prefill_fake(x, qweight, scales, zeros, bias, fmt, block):
        return x.new_empty(x.shape[0], qweight.shape[0])

    @torch.library.register_fake("minigpt::quant_dequantize")
    def _quant_dequantize_fake(qweight, scales, zeros, fmt, block, k, dtype):
        return qweight.new_empty(qweight.shape[0], k, dtype=dtype)

    @torch.library.register_fake("minigpt::quant_linear_dynamic")
    def _quant_linear_dynamic_fake(x, qweight, scales, zeros, bias, fmt, block):
        return x.new_empty(x.shape[0], qweight.shape[0])


__all__ = [
    "ACT_QUANT",
    "FORMATS",
    "NF4_CODEBOOK",
    "QuantizedWeight",
    "dequantize_weight",
    "quant_linear",
    "quantize_weight",
    "sqnr_db",
]
