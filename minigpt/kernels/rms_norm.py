"""RMSNorm and fused residual-add + RMSNorm: public ops with autograd.

    y = x / sqrt(mean(x**2, -1) + eps) * weight              rms_norm
    h = x + residual;  y = rms_norm(h)                        add_rms_norm

The fused kernels read each row once, keep it in registers/L1 for the second
pass, and save only one float32 ``rstd`` per row for the backward pass (which
recomputes the normalized row instead of storing it). The weight gradient is
summed in float32 whatever the activation dtype.
"""

from __future__ import annotations

import math

import torch

from minigpt.kernels._backend import cpp_available, register_op, select_backend
from minigpt.kernels._checks import check_positive_float, check_same_device, check_tensor
from minigpt.kernels.reference.norm import add_rms_norm_reference, rms_norm_reference

register_op("rms_norm", ("cpp", "triton"))
register_op("add_rms_norm", ("cpp", "triton"))


def _kernels(backend: str):
    """(forward, backward) callables of a fast backend; both share one signature."""
    if backend == "cpp":
        # the resolved overloads: calling them skips torch.ops' overload lookup
        return torch.ops.minigpt.rms_norm_fwd.default, torch.ops.minigpt.rms_norm_bwd.default
    from minigpt.kernels.triton import rms_norm as tri

    return tri.rms_norm_fwd, tri.rms_norm_bwd


def _as_rows(t: torch.Tensor, backend: str) -> torch.Tensor:
    """``t`` as the kernels take it: the C++ ops take any rank, Triton (rows, n)."""
    if backend != "cpp" and t.dim() != 2:
        t = t.reshape(-1, t.shape[-1])
    return t if t.is_contiguous() else t.contiguous()


def _like(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return t if t.shape == shape else t.view(shape)


# Reshapes happen inside forward and backward, where autograd does not record
# them, and only when needed: reshaping outside would add view nodes to the
# graph, which cost as much as the kernel itself on small inputs (a 2048x256
# float32 RMSNorm step is ~0.1 ms of work; each view node adds ~5 us).
class _RMSNormFunction(torch.autograd.Function):
    """Autograd glue of rms_norm: forward saves (x, weight, rstd); backward is one kernel."""

    @staticmethod
    def forward(ctx, x, weight, eps, backend):  # type: ignore[override]
        fwd, _ = _kernels(backend)
        x2 = _as_rows(x, backend)
        y, _, rstd = fwd(x2, None, weight, eps)
        ctx.backend = backend
        ctx.save_for_backward(x2, weight, rstd)
        return _like(y, x.shape)

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x2, weight, rstd = ctx.saved_tensors
        _, bwd = _kernels(ctx.backend)
        dh, dw = bwd(_like(dy, x2.shape).contiguous(), x2, weight, rstd, None)
        return _like(dh, dy.shape), dw, None, None


class _AddRMSNormFunction(torch.autograd.Function):
    """Autograd glue of add_rms_norm: forward saves (h, weight, rstd)."""

    @staticmethod
    def forward(ctx, x, residual, weight, eps, backend):  # type: ignore[override]
        fwd, _ = _kernels(backend)
        y, h, rstd = fwd(_as_rows(x, backend), _as_rows(residual, backend), weight, eps)
        ctx.backend = backend
        ctx.save_for_backward(h, weight, rstd)
        return _like(y, x.shape), _like(h, x.shape)

    @staticmethod
    def backward(ctx, dy, dh_out):  # type: ignore[override]
        h, weight, rstd = ctx.saved_tensors
        _, bwd = _kernels(ctx.backend)
        extra = _like(dh_out, h.shape).contiguous() if dh_out is not None else None
        dh, dw = bwd(_like(dy, h.shape).contiguous(), h, weight, rstd, extra)
        dh = _like(dh, dy.shape)
        return dh, dh, dw, None, None


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
    # .contiguous() of a contiguous tensor is still a dispatched call (~4 us with
    # autograd on): skip it when there is nothing to do
    return weight if weight.is_contiguous() else weight.contiguous()


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
    return _RMSNormFunction.apply(x, _as_kernel_weight(weight, x), eps, chosen)


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
    return _AddRMSNormFunction.apply(x, residual, _as_kernel_weight(weight, x), eps, chosen)


if cpp_available():
    # Shapes of the C++ ops for torch.compile / meta tensors (no data is touched).
    @torch.library.register_fake("minigpt::rms_norm_fwd")
    def _rms_norm_fwd_fake(x, residual, weight, eps):
        h = torch.empty_like(x) if residual is not None else x.new_empty(0)
        rows = math.prod(x.shape[:-1])
        return torch.empty_like(x), h, x.new_empty(rows, dtype=torch.float32)

    @torch.library.register_fake("minigpt::rms_norm_bwd")
    def _rms_norm_bwd_fake(dy, h, weight, rstd, dh_extra):
        return torch.empty_like(h), torch.empty_like(weight)
