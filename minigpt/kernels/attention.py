"""Fused (flash) attention: dense, variable-length packed, and decode with a KV cache.

    out = softmax(Q K^T * softmax_scale + mask) V

The fast kernels never build the (Tq, Tk) score matrix. They walk over blocks of
keys and keep, per query row, a running maximum ``m``, a running sum ``l`` and an
unnormalized output ``O`` (the *online softmax*): when a new block raises the
maximum, the old ``l`` and ``O`` are rescaled by ``exp(m_old - m_new)``. Memory is
linear in the sequence length. The backward pass saves only the output and the
per-row log-sum-exp ``lse`` and recomputes the probabilities block by block
(``P = exp(S - lse)``), trading a little compute for O(T) instead of O(T^2)
memory. See docs/attention.md.

Layout is (batch, seq, heads, head_dim), the layout the projections produce, so
no transpose is needed. Grouped-query (GQA) and multi-query (MQA) attention: pass
k and v with fewer heads than q; query head h uses kv head ``h // (Hq // Hkv)``
and the kernels never materialize the repeated keys/values.

Causal masking when Tq < Tk is aligned bottom-right (the last query sits on the
last key), which is what decoding and chunked prefill need::

    Tq = 2, Tk = 5 (x = visible)
            k0 k1 k2 k3 k4
      q0 :  x  x  x  x  .
      q1 :  x  x  x  x  x

A query row that sees no key at all outputs zeros (and lse = -inf).
"""

from __future__ import annotations

import math

import torch

from minigpt.kernels._backend import cpp_available, register_op, select_backend
from minigpt.kernels._checks import check_same_device, check_tensor
from minigpt.kernels.reference.attention import (
    attention_reference,
    attention_varlen_reference,
    attention_with_kv_cache_reference,
)

register_op("attention", ("cpp", "triton"))
register_op("attention_varlen", ("cpp", "triton"))
register_op("attention_with_kv_cache", ("cpp", "triton"))

MAX_HEAD_DIM = 256


def _kernels(backend: str):
    """(forward, backward) of a fast backend, both with the C++ op signatures."""
    if backend == "cpp":
        return torch.ops.minigpt.attention_fwd, torch.ops.minigpt.attention_bwd
    from minigpt.kernels.triton import attention as tri

    return tri.attention_fwd, tri.attention_bwd


class _AttentionFunction(torch.autograd.Function):
    """Autograd glue on flat (tokens, heads, head_dim) tensors + cu_seqlens.

    Forward saves q, k, v, out and lse (O(T) memory); backward recomputes the
    attention probabilities blockwise inside the kernel.
    """

    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, window, backend):  # type: ignore[override]
        fwd, _ = _kernels(backend)
        if backend == "cpp":
            out, lse = fwd(q, k, v, cu_q, cu_k, scale, causal, window)
        else:
            out, lse = fwd(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, window)
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
        ctx.args = (max_q, max_k, scale, causal, window, backend)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):  # type: ignore[override]
        q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
        max_q, max_k, scale, causal, window, backend = ctx.args
        _, bwd = _kernels(backend)
        dout = dout.contiguous()
        if backend == "cpp":
            dq, dk, dv = bwd(dout, q, k, v, out, lse, cu_q, cu_k, scale, causal, window)
        else:
            dq, dk, dv = bwd(
                dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, causal, window
            )
        return dq, dk, dv, None, None, None, None, None, None, None, None


def _check_options(causal: object, softmax_scale: object, window: object, head_dim: int) -> float:
    """Validate the scalar options; return the softmax scale to use."""
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, int):
            raise TypeError(f"window must be an int or None, got {type(window).__name__}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise TypeError(
            f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}"
        )
    s = float(softmax_scale)
    if not math.isfinite(s) or s <= 0:
        raise ValueError(f"softmax_scale must be a finite number > 0, got {s}")
    return s


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ndim: int) -> None:
    """Shapes/dtypes shared by the dense (4-D) and packed (3-D) entry points."""
    check_tensor(q, "q", ndim=ndim)
    check_tensor(k, "k", ndim=ndim)
    check_tensor(v, "v", ndim=ndim)
    check_same_device(q=q, k=k, v=v)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must have one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k shape {tuple(k.shape)} and v shape {tuple(v.shape)} must match")
    d = q.shape[-1]
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in 1..{MAX_HEAD_DIM}, got {d}")
    if k.shape[-1] != d:
        raise ValueError(f"k head_dim {k.shape[-1]} does not match q head_dim {d}")
    hq, hkv = q.shape[-2], k.shape[-2]
    if hq < 1 or hkv < 1 or hq % hkv != 0:
        raise ValueError(
            f"query heads ({hq}) must be a positive multiple of key/value heads ({hkv})"
        )


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    softmax_scale: float | None = None,
    window: int | None = None,
    return_lse: bool = False,
    *,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Scaled dot-product attention, fused: softmax(Q K^T * scale + mask) V.

    Args:
        q: (B, Tq, Hq, D) queries; float32, bfloat16 or float16; 1 <= D <= 256.
        k, v: (B, Tk, Hkv, D) keys and values of q's dtype; Hq % Hkv == 0
            (Hkv < Hq is grouped-query attention, Hkv == 1 multi-query).
        causal: query i (at key position ``i + Tk - Tq``, bottom-right aligned)
            sees only keys at or before its position.
        softmax_scale: score multiplier, default ``1 / sqrt(D)``.
        window: sliding window; query at position p sees keys j with
            ``p - j < window`` (and ``j - p < window`` when not causal).
        return_lse: also return the float32 log-sum-exp of each score row,
            shape (B, Tq, Hq) (not differentiable; useful for fused losses and
            for merging partial attention results).
        backend: ``"torch"``, ``"cpp"`` or ``"triton"`` to override the default.

    Returns:
        out (B, Tq, Hq, D) of q's dtype, differentiable w.r.t. q, k, v; and
        lse if ``return_lse``. Accumulation is float32 whatever the dtype.

    Example:
        >>> q = torch.randn(2, 16, 8, 64); k = v = torch.randn(2, 16, 2, 64)
        >>> attention(q, k, v).shape          # 8 query heads share 2 kv heads
        torch.Size([2, 16, 8, 64])
    """
    _check_qkv(q, k, v, 4)
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"q has batch {q.shape[0]} but k has batch {k.shape[0]}")
    scale = _check_options(causal, softmax_scale, window, q.shape[-1])
    chosen = select_backend("attention", q.device, backend)
    if chosen == "torch":
        return attention_reference(q, k, v, causal, scale, window, return_lse)
    B, Tq, Hq, D = q.shape
    Tk = k.shape[1]
    cu_q = torch.arange(0, B + 1, dtype=torch.int32, device=q.device) * Tq
    cu_k = torch.arange(0, B + 1, dtype=torch.int32, device=q.device) * Tk
    out, lse = _AttentionFunction.apply(
        q.reshape(B * Tq, Hq, D).contiguous(),
        k.reshape(B * Tk, k.shape[2], D).contiguous(),
        v.reshape(B * Tk, v.shape[2], D).contiguous(),
        cu_q,
        cu_k,
        Tq,
        Tk,
        scale,
        causal,
        -1 if window is None else window,
        chosen,
    )
    out = out.view(B, Tq, Hq, D)
    return (out, lse.view(B, Tq, Hq)) if return_lse else out


def _check_cu_seqlens(cu: object, name: str, total: int, device: torch.device) -> torch.Tensor:
    check_tensor(cu, name, ndim=1, dtypes=(torch.int32, torch.int64))
    assert isinstance(cu, torch.Tensor)
    if cu.device != device:
        raise ValueError(f"{name} must be on {device}, got {cu.device}")
    if cu.numel() < 1:
        raise ValueError(f"{name} must hold at least one offset (0)")
    c = cu.cpu()
    if int(c[0]) != 0:
        raise ValueError(f"{name} must start at 0, got {int(c[0])}")
    if bool((c[1:] < c[:-1]).any()):
        raise ValueError(f"{name} must be non-decreasing")
    if int(c[-1]) > total:
        raise ValueError(f"{name} ends at {int(c[-1])} but the tensor has only {total} rows")
    return cu


def attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool = True,
    softmax_scale: float | None = None,
    window: int | None = None,
    return_lse: bool = False,
    *,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention over packed variable-length documents (no padding, no cross-talk).

    Training on packed sequences concatenates documents into one token stream;
    document b owns rows ``cu_seqlens[b]:cu_seqlens[b+1]`` and attends only to
    its own keys, so no attention crosses a document boundary.

    Args:
        q: (total_q, Hq, D) queries of all documents, concatenated.
        k, v: (total_k, Hkv, D) keys/values, concatenated the same way.
        cu_seqlens_q, cu_seqlens_k: (n_docs + 1,) int32/int64 cumulative lengths
            starting at 0, e.g. ``[0, 5, 12]`` for documents of 5 and 7 tokens.
        max_seqlen_q, max_seqlen_k: longest document (sizes the GPU grid).
        causal, softmax_scale, window, return_lse, backend: as in :func:`attention`
            (causal alignment is bottom-right within each document).

    Returns:
        out (total_q, Hq, D), and lse (total_q, Hq) float32 with ``return_lse``.
        Rows past ``cu_seqlens_q[-1]`` are zeros.
    """
    _check_qkv(q, k, v, 3)
    cu_q = _check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q.shape[0], q.device)
    cu_k = _check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", k.shape[0], q.device)
    if cu_q.numel() != cu_k.numel():
        raise ValueError("cu_seqlens_q and cu_seqlens_k must have the same number of entries")
    for name, val in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 0:
            raise TypeError(f"{name} must be a non-negative int, got {val!r}")
    lens_q = (cu_q[1:] - cu_q[:-1]).cpu()
    lens_k = (cu_k[1:] - cu_k[:-1]).cpu()
    if lens_q.numel() and (int(lens_q.max()) > max_seqlen_q or int(lens_k.max()) > max_seqlen_k):
        raise ValueError("max_seqlen_q / max_seqlen_k is smaller than the longest document")
    scale = _check_options(causal, softmax_scale, window, q.shape[-1])
    chosen = select_backend("attention_varlen", q.device, backend)
    if chosen == "torch":
        return attention_varlen_reference(
            q, k, v, cu_q, cu_k, max_seqlen_q, max_seqlen_k, causal, scale, window, return_lse
        )
    out, lse = _AttentionFunction.apply(
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        cu_q,
        cu_k,
        max_seqlen_q,
        max_seqlen_k,
        scale,
        causal,
        -1 if window is None else window,
        chosen,
    )
    return (out, lse) if return_lse else out


def attention_with_kv_cache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    k_new: torch.Tensor | None = None,
    v_new: torch.Tensor | None = None,
    causal: bool = True,
    softmax_scale: float | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Decode-step attention against a preallocated key/value cache.

    Writes ``k_new``/``v_new`` into each row's cache at positions
    ``cache_seqlens[b] : cache_seqlens[b] + Tn`` (in place), then lets the new
    queries attend to the ``cache_seqlens[b] + Tn`` valid entries of their row,
    causally aligned bottom-right (query t of Tq sits at position
    ``cache_seqlens[b] + Tn - Tq + t``). ``cache_seqlens`` itself is not
    modified: advance it yourself after the step. Entries past a row's length are
    never read, so the cache may hold garbage there. Grouped-query attention reads
    each kv head once for all query heads that share it (no repeated KV).

    Args:
        q: (B, Tq, Hq, D) queries; Tq = 1 for plain decoding, a few tokens for
            speculative decoding or chunked prefill.
        k_cache, v_cache: (B, S, Hkv, D) contiguous caches of q's dtype.
        cache_seqlens: (B,) int32/int64 valid lengths before this step (0 = empty row).
        k_new, v_new: optional (B, Tn, Hkv, D) new entries to append.
        causal: mask cache entries after each query's position.
        softmax_scale: default 1/sqrt(D).
        backend: optional backend override.

    Returns:
        (B, Tq, Hq, D) of q's dtype (not differentiable: this is an inference op).
        A row whose cache is empty (and gets no new entries) outputs zeros.
    """
    check_tensor(q, "q", ndim=4)
    check_tensor(k_cache, "k_cache", ndim=4)
    check_tensor(v_cache, "v_cache", ndim=4)
    check_tensor(cache_seqlens, "cache_seqlens", ndim=1, dtypes=(torch.int32, torch.int64))
    check_same_device(q=q, k_cache=k_cache, v_cache=v_cache, cache_seqlens=cache_seqlens)
    if not (q.dtype == k_cache.dtype == v_cache.dtype):
        raise TypeError("q, k_cache and v_cache must have one dtype")
    if k_cache.shape != v_cache.shape:
        raise ValueError("k_cache and v_cache must have the same shape")
    B, _, Hq, D = q.shape
    _, S, Hkv, Dk = k_cache.shape
    if k_cache.shape[0] != B or cache_seqlens.shape[0] != B:
        raise ValueError("q, the caches and cache_seqlens must share the batch size")
    if Dk != D or not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must match and be in 1..{MAX_HEAD_DIM}; got {D} and {Dk}")
    if Hkv < 1 or Hq % Hkv != 0:
        raise ValueError(f"query heads ({Hq}) must be a multiple of cache heads ({Hkv})")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous (they are written in place)")
    if (k_new is None) != (v_new is None):
        raise ValueError("pass both k_new and v_new, or neither")
    tn = 0
    if k_new is not None and v_new is not None:
        check_tensor(k_new, "k_new", ndim=4)
        check_tensor(v_new, "v_new", ndim=4)
        if k_new.shape != v_new.shape or k_new.shape[0] != B or k_new.shape[2:] != (Hkv, D):
            raise ValueError(f"k_new/v_new must be (B, Tn, {Hkv}, {D}) with B={B}")
        if k_new.dtype != q.dtype or v_new.dtype != q.dtype:
            raise TypeError("k_new and v_new must have q's dtype")
        tn = k_new.shape[1]
    lens = cache_seqlens.cpu()
    if B and (int(lens.min()) < 0 or int(lens.max()) + tn > S):
        raise ValueError(f"cache_seqlens + {tn} new entries must lie in 0..{S} (the cache length)")
    scale = _check_options(causal, softmax_scale, None, D)
    chosen = select_backend("attention_with_kv_cache", q.device, backend)
    if chosen == "torch":
        return attention_with_kv_cache_reference(
            q, k_cache, v_cache, cache_seqlens, k_new, v_new, causal, scale
        )
    if chosen == "triton":
        from minigpt.kernels.triton import attention_decode

        return attention_decode.attention_kvcache(
            q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale, causal
        )
    return torch.ops.minigpt.attention_kvcache(
        q.contiguous(),
        k_cache,
        v_cache,
        cache_seqlens,
        None if k_new is None else k_new.contiguous(),
        None if v_new is None else v_new.contiguous(),
        scale,
        causal,
    )


if cpp_available():
    # Shapes of the C++ ops for torch.compile / meta tensors (no data is touched).
    @torch.library.register_fake("minigpt::attention_fwd")
    def _attention_fwd_fake(q, k, v, cu_q, cu_k, scale, causal, window):
        return torch.empty_like(q), q.new_empty(q.shape[:2], dtype=torch.float32)

    @torch.library.register_fake("minigpt::attention_bwd")
    def _attention_bwd_fake(dout, q, k, v, out, lse, cu_q, cu_k, scale, causal, window):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    @torch.library.register_fake("minigpt::attention_kvcache")
    def _attention_kvcache_fake(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale, causal):
        return torch.empty_like(q)
