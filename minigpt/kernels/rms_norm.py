"""RMSNorm and fused residual-add + RMSNorm: public ops with autograd.

    y = x / sqrt(mean(x**2, -1) + eps) * weight              rms_norm
    h = x + residual;  y = rms_norm(h)                        add_rms_norm

The fused kernels read each row once, keep it in registers/L1 for the second
pass, and save only one float32 ``rstd`` per row for the backward pass (which
recomputes the normalized row instead of storing it). The weight gradient is
summed in float32 whatever the activation dtype.
"""

from __future__ import annotations

import torch

from minigpt.kernels._backend import cpp_available, register_op, select_backend
from minigpt.kernels._checks import check_positive_float, check_same_device, check_tensor
from minigpt.kernels.reference.norm import add_rms_norm_reference, rms_norm_reference

register_op("rms_norm", ("cpp", "triton"))
register_op("add_rms_norm", ("cpp", "triton"))


def _kernels(backend: str):
    """(forward, backward) callables of a fast backend; both share one signature."""
    if backend == "cpp":
        return torch.ops.minigpt.rms_norm_fwd, torch.ops.minigpt.rms_norm_bwd
    from minigpt.kernels.triton import rms_norm as tri

    return tri.rms_norm_fwd, tri.rms_norm_bwd


class _RMSNormFunction(torch.autograd.Function):
    """Autograd glue: forward saves (h, weight, rstd); backward calls the fused kernel."""

    @staticmethod
    def forward(ctx, x, residual, weight, eps, backend):  # type: ignore[override]
        fwd, _ = _kernels(backend)
        y, h, rstd = fwd(x, residual, weight, eps)
        ctx.has_residual = residual is not None
        ctx.backend = backend
        ctx.save_for_backward(h if ctx.has_residual else x, weight, rstd)
        if not ctx.has_residual:
            ctx.mark_non_differentiable(h)
        return y, h

    @staticmethod
    def backward(ctx, dy, dh_out):  # type: ignore[override]
        h, weight, rstd = ctx.saved_tensors
        _, bwd = _kernels(ctx.backend)
        extra = dh_out.contiguous() if (ctx.has_residual and dh_out is not None) else None
        dh, dw = bwd(dy.contiguous(), h, weight, rstd, extra)
        return dh, (dh if ctx.has_residual else None), dw, None, None


def _check(x: torch.Tensor, weight: torch.Tensor, eps: float) -> float:
    check_tensor(x, "x", min_ndim=1)
    check_tensor(weight, "weight", ndim=1)
    check_same_device(x=x, weight=weight)
    if x.shape[-1] == 0:
        raise ValueError("x must have a non-empty last dimension")
    if weight.shape[0] != x.shape[-1]:
        raise ValueError(
            f"weight has {weight.shape[0]} elements but x's last dimension is {x.shape[-1]}"
        )
    return check_positive_float(eps, "eps")


def _as_kernel_weight(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # kernels take a weight of x's dtype or float32 (mixed-precision training)
    if weight.dtype not in (x.dtype, torch.float32):
        weight = weight.to(x.dtype)
    return weight.contiguous()


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, backend: str | None = None
) -> torch.Tensor:
    """Root-mean-square normalization of the last dimension, times a learned gain.

    Args:
        x: (..., n) float32/bfloat16/float16 activations, any leading shape.
        weight: (n,) gain, of x's dtype or float32.
        eps: small positive number added to the mean square.
        backend: ``"torch"``, ``"cpp"`` or ``"triton"`` to override the default.

    Returns:
        (..., n) tensor of x's dtype. Differentiable with respect to x and weight.

    Example:
        >>> x = torch.randn(4, 8); w = torch.ones(8)
        >>> y = rms_norm(x, w)
        >>> torch.allclose(y.pow(2).mean(-1), torch.ones(4), atol=1e-4)
        True
    """
    eps = _check(x, weight, eps)
    chosen = select_backend("rms_norm", x.device, backend)
    if chosen == "torch":
        return rms_norm_reference(x, weight, eps)
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    y, _ = _RMSNormFunction.apply(x2, None, _as_kernel_weight(weight, x), eps, chosen)
    return y.view(x.shape)


def add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused ``h = x + residual; y = rms_norm(h, weight, eps)``.

    In a pre-norm transformer block the output of one sub-layer is added to the
    residual stream and immediately normalized for the next; doing both in one
    pass saves a full read and write of the activations.

    Args:
        x: (..., n) sub-layer output.
        residual: (..., n) residual stream, same shape and dtype as x.
        weight: (n,) gain, of x's dtype or float32.
        eps: small positive number added to the mean square.
        backend: optional backend override.

    Returns:
        ``(y, h)``: the normalized activations and the new residual stream,
        both of x's dtype and differentiable.
    """
    eps = _check(x, weight, eps)
    check_tensor(residual, "residual")
    check_same_device(x=x, residual=residual)
    if residual.shape != x.shape:
        raise ValueError(
            f"residual shape {tuple(residual.shape)} does not match x shape {tuple(x.shape)}"
        )
    if residual.dtype != x.dtype:
        raise TypeError(f"residual dtype {residual.dtype} does not match x dtype {x.dtype}")
    chosen = select_backend("add_rms_norm", x.device, backend)
    if chosen == "torch":
        return add_rms_norm_reference(x, residual, weight, eps)
    n = x.shape[-1]
    x2 = x.reshape(-1, n).contiguous()
    r2 = residual.reshape(-1, n).contiguous()
    y, h = _RMSNormFunction.apply(x2, r2, _as_kernel_weight(weight, x), eps, chosen)
    return y.view(x.shape), h.view(x.shape)


if cpp_available():
    # Shapes of the C++ ops for torch.compile / meta tensors (no data is touched).
    @torch.library.register_fake("minigpt::rms_norm_fwd")
    def _rms_norm_fwd_fake(x, residual, weight, eps):
        h = torch.empty_like(x) if residual is not None else x.new_empty(0)
        return torch.empty_like(x), h, x.new_empty(x.shape[0], dtype=torch.float32)

    @torch.library.register_fake("minigpt::rms_norm_bwd")
    def _rms_norm_bwd_fake(dy, h, weight, rstd, dh_extra):
        return torch.empty_like(h), torch.empty_like(weight)
