"""Reference scaled dot-product attention: the specification of the attention ops.

Everything here is the textbook formula, computed in float32 and written for
clarity, not speed (it materializes the full (Tq, Tk) score matrix)::

    scores = (Q @ K^T) * softmax_scale          masked entries set to -inf
    P      = softmax(scores, dim=-1)            rows with no visible key -> all 0
    out    = P @ V
    lse    = logsumexp(scores, dim=-1)          -inf for rows with no visible key

Layout is (batch, seq, heads, head_dim). Grouped-query attention: k and v may have
fewer heads than q; query head ``h`` uses key/value head ``h // (Hq // Hkv)``.

Causal alignment when the query is shorter than the key (decoding, chunked
prefill) is *bottom-right*: the last query sits on the last key. Query ``i`` has
absolute position ``p = i + Tk - Tq`` and sees key ``j`` when ``j <= p``::

    Tq = 2, Tk = 5 (x = visible)      Tq = Tk = 3
            k0 k1 k2 k3 k4                    k0 k1 k2
      q0 :  x  x  x  x  .               q0 :  x  .  .
      q1 :  x  x  x  x  x               q1 :  x  x  .
                                        q2 :  x  x  x

A sliding ``window`` of w keeps only keys with ``p - j < w`` (and, when not
causal, also ``j - p < w``). A query row that sees no key at all (possible when
Tq > Tk with causal masking, or with an empty key sequence) outputs zeros.
"""

from __future__ import annotations

import torch


def attention_mask(
    seqlen_q: int,
    seqlen_k: int,
    causal: bool,
    window: int | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """(seqlen_q, seqlen_k) bool matrix, True where query i may attend to key j.

    Queries are aligned bottom-right: query i sits at key position
    ``i + seqlen_k - seqlen_q``.
    """
    pos_q = torch.arange(seqlen_q, device=device)[:, None] + (seqlen_k - seqlen_q)
    pos_k = torch.arange(seqlen_k, device=device)[None, :]
    visible = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if causal:
        visible &= pos_k <= pos_q
    if window is not None:
        visible &= pos_q - pos_k < window
        if not causal:
            visible &= pos_k - pos_q < window
    return visible


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    softmax_scale: float | None = None,
    window: int | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """softmax(Q K^T * scale + mask) V in float32, materializing the score matrix.

    Args:
        q: (B, Tq, Hq, D) queries.
        k, v: (B, Tk, Hkv, D) keys and values; Hq must be a multiple of Hkv.
        causal: mask keys after each query's (bottom-right aligned) position.
        softmax_scale: multiplier of the scores; default 1/sqrt(D).
        window: optional sliding-window width (see module docstring).
        return_lse: also return the float32 log-sum-exp of each score row.

    Returns:
        out (B, Tq, Hq, D) in q's dtype, and with ``return_lse`` also
        lse (B, Tq, Hq) float32 (float64 for float64 inputs).
    """
    B, Tq, Hq, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    scale = D**-0.5 if softmax_scale is None else softmax_scale
    group = Hq // Hkv
    # float32 math (float64 if given float64 inputs: tests use that as the exact answer)
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    # repeat each key/value head for the query heads that share it (clear, not fast)
    kf = k.to(ct).repeat_interleave(group, dim=2)
    vf = v.to(ct).repeat_interleave(group, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.to(ct), kf) * scale
    visible = attention_mask(Tq, Tk, causal, window, q.device)
    scores = scores.masked_fill(~visible, float("-inf"))
    # A numerically safe softmax that gives exact zeros for rows with no visible key
    # (plain softmax would give NaN there).
    row_max = scores.amax(dim=-1, keepdim=True) if Tk > 0 else scores.sum(-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)).detach()
    unnormalized = torch.exp(scores - row_max)
    row_sum = unnormalized.sum(dim=-1, keepdim=True)
    probs = unnormalized / row_sum.clamp_min(torch.finfo(ct).tiny)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, vf).to(q.dtype)
    if not return_lse:
        return out
    lse = (row_max + torch.log(row_sum)).squeeze(-1).transpose(1, 2)  # (B, Tq, Hq)
    return out, lse


def attention_varlen_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    causal: bool = True,
    softmax_scale: float | None = None,
    window: int | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention over packed sequences: each document attends only within itself.

    Args:
        q: (total_q, Hq, D) queries of all documents, concatenated.
        k, v: (total_k, Hkv, D) keys/values, concatenated the same way.
        cu_seqlens_q, cu_seqlens_k: (n_docs + 1,) integer offsets; document b
            owns rows ``cu[b]:cu[b+1]``.
        max_seqlen_q, max_seqlen_k: unused here (kernels size their grids with them).

    Returns:
        out (total_q, Hq, D), and with ``return_lse`` lse (total_q, Hq) float32.
    """
    outs, lses = [], []
    for b in range(cu_seqlens_q.numel() - 1):
        q0, q1 = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
        k0, k1 = int(cu_seqlens_k[b]), int(cu_seqlens_k[b + 1])
        o, lse = attention_reference(
            q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], causal, softmax_scale, window, True
        )
        outs.append(o[0])
        lses.append(lse[0])
    out = torch.cat(outs) if outs else q.new_empty(q.shape)
    if not return_lse:
        return out
    lse = torch.cat(lses) if lses else q.new_empty(q.shape[:2], dtype=torch.float32)
    return out, lse


def attention_with_kv_cache_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    k_new: torch.Tensor | None = None,
    v_new: torch.Tensor | None = None,
    causal: bool = True,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Decode-time attention against a key/value cache, appending new entries in place.

    Args:
        q: (B, Tq, Hq, D) the new tokens' queries (Tq = 1 for plain decoding).
        k_cache, v_cache: (B, S, Hkv, D) caches; row b holds ``cache_seqlens[b]``
            valid entries, the rest is ignored.
        cache_seqlens: (B,) integer lengths before this step (not modified).
        k_new, v_new: optional (B, Tn, Hkv, D) entries written to positions
            ``cache_seqlens[b] : cache_seqlens[b] + Tn`` of each row.

    Returns:
        (B, Tq, Hq, D): each row's queries attend to its ``cache_seqlens[b] + Tn``
        valid keys, causally aligned bottom-right.
    """
    tn = 0 if k_new is None else k_new.shape[1]
    outs = []
    for b in range(q.shape[0]):
        n = int(cache_seqlens[b])
        if k_new is not None and v_new is not None:
            k_cache[b, n : n + tn] = k_new[b]
            v_cache[b, n : n + tn] = v_new[b]
        length = n + tn
        outs.append(
            attention_reference(
                q[b : b + 1],
                k_cache[b : b + 1, :length],
                v_cache[b : b + 1, :length],
                causal,
                softmax_scale,
            )
        )
    return torch.cat(outs) if outs else q.new_empty(q.shape)
