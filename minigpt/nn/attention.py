"""Causal self-attention with rotary positions, grouped-query heads and a KV cache.

Layout everywhere: (batch, seq, heads, head_dim) -- "BTHD" -- the layout of the
fused kernels in :mod:`minigpt.kernels`, which do the math here: ``rope``,
``attention`` (flash attention, training and prefill) and
``attention_with_kv_cache`` (decoding), and ``attention_varlen`` for rows that
pack several documents (each token attends only within its own document). The
plain-torch ``*_torch`` versions below compute the same thing through
``F.scaled_dot_product_attention``; they are kept as readable references and as
competitors in the benchmarks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minigpt.kernels import attention, attention_varlen, attention_with_kv_cache, rope

# ---- attention -------------------------------------------------------------------------


def attention_torch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True
) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v over (B, T, H, D) tensors, via torch's SDPA.

    ``k``/``v`` may have fewer heads than ``q`` (grouped-query attention): each
    group of ``H / Hkv`` query heads shares one key/value head.
    """
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        is_causal=causal,
        enable_gqa=k.shape[2] != q.shape[2],
    )
    return out.transpose(1, 2)


def attention_with_kv_cache_torch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    k_new: torch.Tensor | None = None,
    v_new: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode-time attention: append new keys/values to each row's cache, then attend.

    Args:
        q: (B, T, H, D) queries of the T new tokens.
        k_cache, v_cache: (B, L, Hkv, D) preallocated caches, updated in place.
        cache_seqlens: (B,) int, how many positions of each row are filled before
            this call. Row b's new tokens sit at positions ``cache_seqlens[b] + t``.
        k_new, v_new: (B, T, Hkv, D) keys/values of the new tokens (or None when
            the cache already holds them).

    Returns:
        (B, T, H, D). Query t of row b sees cache positions ``<= cache_seqlens[b] + t``
        (causal, aligned bottom-right). ``cache_seqlens`` is not modified.
    """
    B, T = q.shape[:2]
    steps = torch.arange(T, device=q.device)
    positions = cache_seqlens.to(torch.long)[:, None] + steps  # (B, T)
    lengths = cache_seqlens.tolist()
    end = max(lengths) + T
    if end > k_cache.shape[1]:
        raise ValueError(f"KV cache is full: {end} positions needed, {k_cache.shape[1]} allocated")
    uniform = min(lengths) == max(lengths)
    if k_new is not None:
        if uniform:  # the common case: one contiguous slice write
            k_cache[:, end - T : end] = k_new
            v_cache[:, end - T : end] = v_new
        else:
            rows = torch.arange(B, device=q.device)[:, None]
            k_cache[rows, positions] = k_new
            v_cache[rows, positions] = v_new
    mask = None
    if not (uniform and T == 1):
        key_pos = torch.arange(end, device=q.device)
        mask = (key_pos[None, None, :] <= positions[:, :, None])[:, None]  # (B, 1, T, end)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k_cache[:, :end].transpose(1, 2),
        v_cache[:, :end].transpose(1, 2),
        attn_mask=mask,
        enable_gqa=k_cache.shape[2] != q.shape[2],
    )
    return out.transpose(1, 2)


class CausalSelfAttention(nn.Module):
    """Multi-head (or grouped-query) causal self-attention with optional RoPE.

    One fused projection makes q, k and v (one matrix multiply instead of three);
    ``o_proj`` mixes the heads back into the residual stream.

    Args:
        d_model: width of the residual stream.
        n_head: query heads. n_kv_head: key/value heads (divides n_head).
        head_dim: width of each head.
        bias: add biases to the projections (GPT-2 style).
        dropout: dropout on the output (training only).
    """

    def __init__(
        self,
        d_model: int,
        n_head: int,
        n_kv_head: int,
        head_dim: int,
        bias: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, head_dim
        self.qkv_proj = nn.Linear(d_model, (n_head + 2 * n_kv_head) * head_dim, bias=bias)
        self.o_proj = nn.Linear(n_head * head_dim, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        rope_tables: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        packed: tuple[torch.Tensor, int] | None = None,
    ) -> torch.Tensor:
        """Attend over ``x`` (B, T, d_model) -> (B, T, d_model).

        ``rope_tables``: (cos, sin) tables of the tokens' positions, (T, D/2) or (B, T, D/2)
        float32 (see :func:`minigpt.kernels.rope_cos_sin`), or None (no RoPE).
        ``cache``: (k_cache, v_cache, seqlens) of this layer while decoding: the new
        keys/values are appended and the queries also attend to the cached past.
        ``packed``: (cu_seqlens, max_seqlen) when the rows pack several documents:
        ``cu_seqlens`` (n_docs + 1,) int offsets over the flattened B*T tokens; attention
        is causal within each document and never crosses into another.
        """
        B, T, _ = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.qkv_proj(x).split((H * D, Hkv * D, Hkv * D), dim=-1)
        q, k, v = q.view(B, T, H, D), k.view(B, T, Hkv, D), v.view(B, T, Hkv, D)
        if rope_tables is not None:
            q, k = rope(q, k, *rope_tables)
        if packed is not None:
            cu_seqlens, max_seqlen = packed
            flat = (B * T, -1, D)
            y = attention_varlen(
                q.reshape(flat),
                k.reshape(flat),
                v.reshape(flat),
                cu_seqlens,
                cu_seqlens,
                max_seqlen,
                max_seqlen,
                causal=True,
            )
        elif cache is None:
            y = attention(q, k, v, causal=True)
        else:
            k_cache, v_cache, seqlens = cache
            y = attention_with_kv_cache(q, k_cache, v_cache, seqlens, k, v)
        return self.dropout(self.o_proj(y.reshape(B, T, H * D)))
