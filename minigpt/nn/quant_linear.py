"""QuantLinear: an ``nn.Linear`` replacement that stores its weight quantized.

The weight lives as buffers in one of the formats of :mod:`minigpt.kernels.quant`
(int8 per channel, int4 group-wise, NF4 block-wise), so ``state_dict()`` holds
the packed bytes and a safetensors checkpoint is 2-4x smaller than bf16. The
forward pass is :func:`minigpt.kernels.quant.quant_linear`: the C++ kernel reads
the packed weight once per call and never builds the float matrix (for small
batches; large prefill batches dequantize and use a float GEMM).

The quantized weight is frozen (no gradient); the bias stays a float parameter.
"""

from __future__ import annotations

import torch
from torch import nn

from minigpt.kernels.quant import QuantizedWeight, quant_linear, quantize_weight


class QuantLinear(nn.Module):
    """``y = x @ dequantize(W)^T + b`` with W stored as int8, int4 or NF4.

    Build one with :meth:`from_linear` (quantizes an existing layer) or with
    the constructor (empty buffers of the right shapes, to load a checkpoint into).

    Args:
        in_features: K, the input size.
        out_features: N, the output size.
        fmt: ``"int8"``, ``"int4"`` or ``"nf4"``.
        block: int4 group size or nf4 block size (ignored for int8).
        bias: whether the layer has a bias.
        dtype: dtype of the bias (activations may be any float dtype).
        act_quant: ``None`` (float activations) or ``"int8"``: round each
            activation row to int8 and multiply on integers (faster decode on
            CPUs with AVX512-VNNI; see :func:`minigpt.kernels.quant.quant_linear`).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        fmt: str = "int8",
        block: int = 64,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        act_quant: str | None = None,
    ) -> None:
        super().__init__()
        if act_quant not in (None, "int8") or (act_quant and fmt == "nf4"):
            raise ValueError(
                f"act_quant must be None or 'int8' (int8/int4 weights), got {act_quant!r}"
            )
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.fmt = fmt
        self.act_quant = act_quant
        self.block = 0 if fmt == "int8" else int(block)
        n, k = self.out_features, self.in_features
        # shapes and dtypes of every format's buffers (layouts: kernels/reference/quant.py)
        empty = quantize_weight(torch.zeros(1, k if fmt == "int8" else self.block), fmt, block)
        if fmt == "int8":
            shapes = {"qweight": (n, k), "scales": (n,)}
        else:
            if k % self.block:
                raise ValueError(f"in_features {k} is not a multiple of block {self.block}")
            shapes = {"qweight": (n, k // 2), "scales": (n, k // self.block)}
            if fmt == "int4":
                shapes["zeros"] = (n, k // self.block)
        for name, shape in shapes.items():
            like = getattr(empty, name)
            self.register_buffer(name, torch.zeros(shape, dtype=like.dtype, device=device))
        if "zeros" not in shapes:
            self.zeros = None
        self.bias = nn.Parameter(torch.zeros(n, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, fmt: str, block: int = 64, act_quant: str | None = None
    ) -> QuantLinear:
        """Quantize an ``nn.Linear`` (its weight is read, not modified)."""
        qw = quantize_weight(linear.weight.detach().float(), fmt, block)
        has_bias = linear.bias is not None
        dtype = linear.bias.dtype if has_bias else linear.weight.dtype
        m = cls(
            linear.in_features, linear.out_features, fmt, block, has_bias, dtype, "meta", act_quant
        )
        m.qweight, m.scales = qw.qweight, qw.scales
        m.zeros = qw.zeros
        m.bias = (
            nn.Parameter(linear.bias.detach().clone(), requires_grad=False) if has_bias else None
        )
        return m.to(linear.weight.device)

    def quantized_weight(self) -> QuantizedWeight:
        """The buffers as a :class:`QuantizedWeight` (no copy)."""
        shape = (self.out_features, self.in_features)
        return QuantizedWeight(self.fmt, self.qweight, self.scales, self.zeros, shape, self.block)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float (N, K) weight this layer computes with."""
        return self.quantized_weight().dequantize(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., K) -> (..., N) in x's dtype."""
        return quant_linear(x, self.quantized_weight(), self.bias, act_quant=self.act_quant)

    def extra_repr(self) -> str:
        block = f", block={self.block}" if self.block else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"fmt={self.fmt}{block}, bias={self.bias is not None}"
            + (f", act_quant={self.act_quant}" if self.act_quant else "")
        )
