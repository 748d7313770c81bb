"""Small-batch linear layer ``y = x W^T + b``: the matrix-vector products of decoding.

When a model generates one token at a time, every linear layer multiplies a
handful of rows (one per sequence) by a big weight matrix. Each weight is then
used for a single multiply-add per row, so the time is the time to *read the
weights from memory*: a 135M-parameter model in bfloat16 moves 270 MB per token.
General matrix-multiply libraries are tuned for the opposite case (many rows,
weights reused from cache) and, for bfloat16, often widen the weights to float32
in a temporary first. The C++ kernel here streams each weight row once, with
AVX512-BF16 ``vdpbf16ps`` dot products where the CPU has them (exact bf16
products, float32 sums), so a decode step runs near memory bandwidth.

Large inputs (training, prefill) and anything that needs gradients go to
``torch.nn.functional.linear``, which is the reference and the right tool there.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from minigpt.kernels._backend import cpp_available, register_op, select_backend
from minigpt.kernels._checks import check_same_device, check_tensor

register_op("linear", ("cpp",))

# Above this many rows a blocked GEMM (torch.mm), which reuses weights from cache
# across rows, beats streaming the weights once per 4-row block.
MAX_GEMV_ROWS = 16


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    float_out: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """``x @ weight.T + bias``, fast for the few rows of a decode step.

    Args:
        x: (..., K) float32/bfloat16/float16 activations.
        weight: (N, K) weight of x's dtype (``nn.Linear.weight``'s layout).
        bias: optional (N,) bias of x's dtype.
        float_out: return float32 whatever the input dtype (e.g. logits to sample
            from), rounding the float32 sums once instead of twice.
        backend: ``"torch"`` (``F.linear``) or ``"cpp"`` to override the default.

    Returns:
        (..., N) tensor of x's dtype (float32 with ``float_out``). The C++ kernel
        runs for CPU tensors with at most ``MAX_GEMV_ROWS`` rows when no gradient
        is needed; other calls use ``F.linear`` (differentiable).

    Example:
        >>> x, w = torch.randn(1, 64), torch.randn(10, 64)
        >>> torch.allclose(linear(x, w), x @ w.T, atol=1e-5)
        True
    """
    check_tensor(x, "x", min_ndim=1)
    check_tensor(weight, "weight", ndim=2)
    if bias is not None:
        check_tensor(bias, "bias", ndim=1)
        if bias.shape[0] != weight.shape[0] or bias.dtype != weight.dtype:
            raise ValueError(f"bias must be ({weight.shape[0]},) of weight's dtype {weight.dtype}")
    check_same_device(x=x, weight=weight, bias=bias)
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"x has {x.shape[-1]} features but weight expects {weight.shape[1]} "
            f"(weight shape {tuple(weight.shape)})"
        )
    if x.dtype != weight.dtype:
        raise TypeError(f"x dtype {x.dtype} does not match weight dtype {weight.dtype}")
    rows = math.prod(x.shape[:-1])
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    fast = x.device.type == "cpu" and rows <= MAX_GEMV_ROWS and not needs_grad
    if not fast or select_backend("linear", x.device, backend) != "cpp":
        y = F.linear(x, weight, bias)
        return y.float() if float_out else y
    y = torch.ops.minigpt.gemv(
        x.reshape(rows, x.shape[-1]).contiguous(), weight.contiguous(), bias, float_out
    )
    return y.view(*x.shape[:-1], weight.shape[0])


if cpp_available():
    # Shape of the C++ op for torch.compile / meta tensors (no data is touched).
    @torch.library.register_fake("minigpt::gemv")
    def _gemv_fake(x, weight, bias, float_out):
        dtype = torch.float32 if float_out else x.dtype
        return x.new_empty((x.shape[0], weight.shape[0]), dtype=dtype)
