"""Rotary position embedding (RoPE) of queries and keys: public ops with autograd.

See :mod:`minigpt.kernels.reference.rope` for the math and the half-split
("rotate_half", Hugging Face Llama / GPT-NeoX) pairing of dimensions
``(i, i + D/2)``::

    q_rot[..., i]       = q[..., i] * cos - q[..., i + D/2] * sin
    q_rot[..., i + D/2] = q[..., i + D/2] * cos + q[..., i] * sin

Three entry points:

* :func:`rope` rotates ``(B, T, H, D)`` queries and keys with given tables;
* :func:`rope_cos_sin` builds the tables from positions (a length, or a
  ``(T,)`` / ``(B, T)`` integer tensor for KV-cache decoding or packed docs);
* :func:`rope_with_positions` does both in one call.

The fused kernels read q and k once and write the rotated copies once; the
backward pass is the same kernel rotating the gradients by the negative angle
(a rotation's transpose is its inverse), so nothing but the small tables is
saved for it. q and k may be strided views (e.g. slices of a fused QKV
projection) as long as each head's D values are contiguous.
"""

from __future__ import annotations

import torch

from minigpt.kernels._backend import cpp_available, register_op, select_backend
from minigpt.kernels._checks import check_same_device, check_tensor
from minigpt.kernels.reference.rope import rope_cos_sin, rope_reference

__all__ = ["rope", "rope_cos_sin", "rope_with_positions"]

register_op("rope", ("cpp", "triton"))


def _rotate_fn(backend: str):
    """The fast backend's ``rope_rotate(q, k, cos, sin, inverse) -> (q_rot, k_rot)``."""
    if backend == "cpp":
        return torch.ops.minigpt.rope_rotate
    from minigpt.kernels.triton import rope as tri

    return tri.rope_rotate


class _RopeFunction(torch.autograd.Function):
    """Autograd glue: backward rotates (dq, dk) by the negative angle."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, backend):  # type: ignore[override]
        ctx.backend = backend
        ctx.save_for_backward(cos, sin)
        return _rotate_fn(backend)(q, k, cos, sin, False)

    @staticmethod
    def backward(ctx, dq, dk):  # type: ignore[override]
        cos, sin = ctx.saved_tensors
        need_q, need_k = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # a gradient nobody needs is passed as zero heads, so no work is done for it
        dq = dq.contiguous() if need_q else dq.new_empty(*dq.shape[:2], 0, dq.shape[3])
        dk = dk.contiguous() if need_k else dk.new_empty(*dk.shape[:2], 0, dk.shape[3])
        dq_in, dk_in = _rotate_fn(ctx.backend)(dq, dk, cos, sin, True)
        return (dq_in if need_q else None), (dk_in if need_k else None), None, None, None


def _check(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    check_tensor(q, "q", ndim=4)
    check_tensor(k, "k", ndim=4)
    check_tensor(cos, "cos", ndim=(2, 3))
    check_tensor(sin, "sin", ndim=(2, 3))
    check_same_device(q=q, k=k, cos=cos, sin=sin)
    if k.dtype != q.dtype:
        raise TypeError(f"k dtype {k.dtype} does not match q dtype {q.dtype}")
    B, T, _, D = q.shape
    if k.shape[0] != B or k.shape[1] != T or k.shape[3] != D:
        raise ValueError(
            f"k shape {tuple(k.shape)} must match q shape {tuple(q.shape)} in batch, "
            "sequence and head-dim sizes (only the number of heads may differ)"
        )
    if D == 0 or D % 2:
        raise ValueError(f"the head dim must be a positive even number, got {D}")
    if sin.shape != cos.shape:
        raise ValueError(
            f"sin shape {tuple(sin.shape)} does not match cos shape {tuple(cos.shape)}"
        )
    if sin.dtype != cos.dtype:
        raise TypeError(f"sin dtype {sin.dtype} does not match cos dtype {cos.dtype}")
    if cos.dtype not in (torch.float32, q.dtype):
        raise TypeError(f"cos/sin must be float32 or q's dtype {q.dtype}; got {cos.dtype}")
    want = [(T, D // 2), (B, T, D // 2)]
    if tuple(cos.shape) not in want:
        raise ValueError(
            f"cos/sin must have shape (T, D/2) = {want[0]} or (B, T, D/2) = {want[1]}; "
            f"got {tuple(cos.shape)}"
        )


def rope(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply rotary position embeddings to queries and keys.

    Args:
        q: (B, T, Hq, D) queries, float32/bfloat16/float16, D even (any even
            size: 64, 80, 96, 128, even 2). Each head's D values must be
            contiguous; other strides are free.
        k: (B, T, Hk, D) keys of q's dtype; Hk may differ from Hq (grouped-query
            attention shares few key heads among many query heads).
        cos, sin: (T, D/2) tables shared by the batch, or (B, T, D/2) per-row
            tables (rows at different positions), float32 or q's dtype. Build
            them with :func:`rope_cos_sin`.
        backend: ``"torch"``, ``"cpp"`` or ``"triton"`` to override the default.

    Returns:
        ``(q_rot, k_rot)``: contiguous tensors of the input shapes and dtype,
        differentiable in q and k. (If cos/sin require grad, the reference
        implementation runs so that their gradients are computed too.)

    Example:
        >>> q, k = torch.randn(2, 16, 8, 64), torch.randn(2, 16, 2, 64)
        >>> cos, sin = rope_cos_sin(16, 64)
        >>> q_rot, k_rot = rope(q, k, cos, sin)
        >>> torch.allclose(q_rot.norm(dim=-1), q.norm(dim=-1), atol=1e-4)  # rotations keep norms
        True
    """
    _check(q, k, cos, sin)
    chosen = select_backend("rope", q.device, backend)
    if chosen == "torch" or cos.requires_grad or sin.requires_grad:
        return rope_reference(q, k, cos, sin)
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    c = (cos if cos.dim() == 3 else cos.unsqueeze(0)).contiguous()
    s = (sin if sin.dim() == 3 else sin.unsqueeze(0)).contiguous()
    return _RopeFunction.apply(q, k, c, s, chosen)


def rope_with_positions(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor | int | None = None,
    theta: float = 10000.0,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE by positions: builds the tables with :func:`rope_cos_sin`, then :func:`rope`.

    Args:
        q, k: as in :func:`rope`.
        positions: None (positions ``0 .. T-1``), an int offset (positions
            ``offset .. offset+T-1``, e.g. the KV-cache length when decoding), or
            an integer tensor of shape (T,) or (B, T).
        theta: frequency base (10000 for Llama 2, 500000 for Llama 3).
        backend: optional backend override.

    For repeated calls (every layer of a model), build the tables once, or use
    :class:`minigpt.nn.RotaryEmbedding`, which caches them.
    """
    check_tensor(q, "q", ndim=4)
    T = q.shape[1]
    if positions is None:
        positions = 0
    if isinstance(positions, int) and not isinstance(positions, bool):
        if positions < 0:
            raise ValueError(f"the position offset must be >= 0, got {positions}")
        positions = torch.arange(positions, positions + T, device=q.device)
    cos, sin = rope_cos_sin(positions, q.shape[-1], theta, device=q.device)
    return rope(q, k, cos, sin, backend=backend)


if cpp_available():
    # Shapes of the C++ op for torch.compile / meta tensors (no data is touched).
    @torch.library.register_fake("minigpt::rope_rotate")
    def _rope_rotate_fake(q, k, cos, sin, inverse):
        return q.new_empty(q.shape), k.new_empty(k.shape)
