"""SwiGLU activation ``silu(gate) * up``: public op with autograd.

The gated activation of Llama-style MLPs (see
:mod:`minigpt.kernels.reference.swiglu`). It is purely elementwise and so
memory-bound: the fused kernels read ``gate`` and ``up`` once and write ``y``
once in the forward pass, and in the backward pass read ``dy``, ``gate``,
``up`` once and write both gradients once, recomputing the sigmoid instead of
saving it. Unfused PyTorch (``F.silu(g) * u``) makes about 14 passes over
memory for forward + backward; the fused kernels make 8.
"""

from __future__ import annotations

import torch

from minigpt.kernels._backend import cpp_available, register_op, select_backend
from minigpt.kernels._checks import check_same_device, check_tensor
from minigpt.kernels.reference.swiglu import swiglu_reference

register_op("swiglu", ("cpp", "triton"))


def _kernels(backend: str):
    """(forward, backward) callables of a fast backend."""
    if backend == "cpp":
        return torch.ops.minigpt.swiglu_fwd, torch.ops.minigpt.swiglu_bwd
    from minigpt.kernels.triton import swiglu as tri

    return tri.swiglu_fwd, tri.swiglu_bwd


class _SwiGLUFunction(torch.autograd.Function):
    """Autograd glue: forward saves (gate, up); backward recomputes sigmoid(gate)."""

    @staticmethod
    def forward(ctx, gate, up, backend):  # type: ignore[override]
        fwd, _ = _kernels(backend)
        ctx.backend = backend
        ctx.save_for_backward(gate, up)
        return fwd(gate, up)

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        gate, up = ctx.saved_tensors
        _, bwd = _kernels(ctx.backend)
        dgate, dup = bwd(dy.contiguous().view(gate.shape), gate, up)
        return dgate, dup, None


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """SwiGLU activation: ``silu(gate) * up = gate * sigmoid(gate) * up``.

    In a Llama MLP, ``y = down(swiglu(gate_proj(x), up_proj(x)))``.

    Args:
        gate: float32/bfloat16/float16 tensor of any shape (the SiLU input).
        up: tensor of the same shape, dtype and device (the gated value).
            Both may be views with a unit last stride, e.g. the two halves
            ``fused.chunk(2, dim=-1)`` of one fused gate/up projection: the C++
            kernel reads them in place.
        backend: ``"torch"``, ``"cpp"`` or ``"triton"`` to override the default.

    Returns:
        Tensor of the same shape and dtype, differentiable in ``gate`` and ``up``.
        All arithmetic is float32; low-precision inputs are rounded once on store.

    Example:
        >>> g = torch.tensor([0.0, 1.0]); u = torch.tensor([5.0, 2.0])
        >>> swiglu(g, u)  # silu(0) = 0, silu(1) = 0.7311
        tensor([0.0000, 1.4621])
    """
    check_tensor(gate, "gate")
    check_tensor(up, "up")
    check_same_device(gate=gate, up=up)
    if up.shape != gate.shape:
        raise ValueError(
            f"up shape {tuple(up.shape)} does not match gate shape {tuple(gate.shape)}"
        )
    if up.dtype != gate.dtype:
        raise TypeError(f"up dtype {up.dtype} does not match gate dtype {gate.dtype}")
    chosen = select_backend("swiglu", gate.device, backend)
    if chosen == "torch":
        return swiglu_reference(gate, up)
    if chosen == "cpp" and not (gate.is_contiguous() and up.is_contiguous()) and gate.dim() >= 1:
        # Views such as the halves of a fused gate/up projection, fused[..., :H] and
        # fused[..., H:], are read in place as (rows, H) with a row stride: no copy.
        n = gate.shape[-1]
        g2, u2 = gate.reshape(-1, n), up.reshape(-1, n)
        g2 = g2 if g2.stride(-1) == 1 else g2.contiguous()
        u2 = u2 if u2.stride(-1) == 1 else u2.contiguous()
        return _SwiGLUFunction.apply(g2, u2, chosen).view(gate.shape)
    return _SwiGLUFunction.apply(gate.contiguous(), up.contiguous(), chosen)


if cpp_available():
    # Shapes of the C++ ops for torch.compile / meta tensors (no data is touched).
    @torch.library.register_fake("minigpt::swiglu_fwd")
    def _swiglu_fwd_fake(gate, up):
        return torch.empty_like(gate, memory_format=torch.contiguous_format)

    @torch.library.register_fake("minigpt::swiglu_bwd")
    def _swiglu_bwd_fake(dy, gate, up):
        return (
            torch.empty_like(gate, memory_format=torch.contiguous_format),
            torch.empty_like(gate, memory_format=torch.contiguous_format),
        )
