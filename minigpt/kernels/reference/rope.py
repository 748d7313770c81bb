"""Reference rotary position embedding (RoPE), the position encoding of Llama.

RoPE encodes a token's position by *rotating* its query and key vectors: pairs
of dimensions are treated as 2-D points and turned by an angle proportional to
the position. The dot product of a rotated query (position m) and a rotated
key (position n) then depends only on m - n, so attention sees relative
positions without any learned position table.

Which dimensions form a pair? We use the half-split ("rotate_half") convention
of Hugging Face Llama / GPT-NeoX, so checkpoints export to ``transformers``
unchanged: dimension ``i`` pairs with ``i + D/2``::

    head vector x at position t, D = 8:  a_i = x[i], b_i = x[i + D/2]

        a0   a1   a2   a3  |  b0   b1   b2   b3
        |    |    |    |      |    |    |    |
        |    |    |    +------|----|----|----+    pair 3: (a3, b3) turned by angle t * f3
        |    |    +-----------|----|----+         pair 2: (a2, b2) turned by angle t * f2
        |    +----------------|----+              pair 1: (a1, b1) turned by angle t * f1
        +---------------------+                   pair 0: (a0, b0) turned by angle t * f0

    out[i]       = a_i * cos(t f_i) - b_i * sin(t f_i)       f_i = theta ** (-2 i / D)
    out[i + D/2] = b_i * cos(t f_i) + a_i * sin(t f_i)       (i = 0 .. D/2 - 1)

(The interleaved convention of the original paper and Meta's first Llama
code pairs (0, 1), (2, 3), ... instead; it is the same math on permuted
weights, but the two are not interchangeable on one checkpoint.)

Tables: ``cos`` and ``sin`` hold ``cos(t f_i)`` and ``sin(t f_i)`` with shape
``(T, D/2)`` (one set of positions for the whole batch) or ``(B, T, D/2)``
(per-row positions: packed documents, or a KV cache where rows are at
different lengths). Hugging Face stores them duplicated to width D; we keep
the D/2 distinct values.
"""

from __future__ import annotations

import torch


def rope_cos_sin(
    positions_or_seq_len: int | torch.Tensor,
    head_dim: int,
    theta: float = 10000.0,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Build the RoPE ``cos`` / ``sin`` tables for given positions.

    Args:
        positions_or_seq_len: an int ``T`` (positions ``0 .. T-1``), or an integer
            tensor of positions, shape ``(T,)`` or ``(B, T)`` (e.g. ``offset +
            arange(T)`` when decoding with a KV cache, or positions restarting at
            each document in a packed batch).
        head_dim: D, the (even) size of one attention head.
        theta: the base of the frequencies ``f_i = theta ** (-2 i / D)``; Llama 2
            uses 10000, Llama 3 500000 (larger = longer wavelengths).
        dtype: dtype of the returned tables (float32 recommended, whatever the
            activation dtype: the kernels accept float32 tables with bf16/fp16
            activations, and angles of far positions need the precision).
        device: where to build them (default: the positions' device, else CPU).

    Returns:
        ``(cos, sin)``, each of shape ``positions.shape + (D/2,)``.

    Angles are computed in float64 and rounded once, so the tables are exact to
    the last bit of ``dtype`` even at positions in the hundreds of thousands.
    """
    if isinstance(head_dim, bool) or not isinstance(head_dim, int):
        raise TypeError(f"head_dim must be an int, got {type(head_dim).__name__}")
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"head_dim must be a positive even number, got {head_dim}")
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 1.0:
        raise ValueError(f"theta must be a number > 1, got {theta!r}")
    if isinstance(positions_or_seq_len, torch.Tensor):
        pos = positions_or_seq_len
        if pos.is_floating_point() or pos.is_complex() or pos.dtype == torch.bool:
            raise TypeError(f"positions must be an integer tensor, got {pos.dtype}")
        if pos.dim() not in (1, 2):
            raise ValueError(f"positions must be (T,) or (B, T), got shape {tuple(pos.shape)}")
        if device is not None:
            pos = pos.to(device)
    elif isinstance(positions_or_seq_len, int) and not isinstance(positions_or_seq_len, bool):
        if positions_or_seq_len < 0:
            raise ValueError(f"seq_len must be >= 0, got {positions_or_seq_len}")
        pos = torch.arange(positions_or_seq_len, device=device)
    else:
        raise TypeError(
            "positions_or_seq_len must be an int or an integer tensor, "
            f"got {type(positions_or_seq_len).__name__}"
        )
    exponent = torch.arange(0, head_dim, 2, dtype=torch.float64, device=pos.device) / head_dim
    inv_freq = float(theta) ** -exponent  # (D/2,)
    angles = pos.to(torch.float64).unsqueeze(-1) * inv_freq  # (..., T, D/2)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[a, b] -> [-b, a]`` on the last dimension (a, b its two halves).

    With it, the rotation of every pair is ``x * cos + rotate_half(x) * sin``
    when cos/sin are duplicated to the full width D (Hugging Face's form).
    """
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def rope_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate queries and keys by their positions' angles, in float32.

    Args:
        q: (B, T, Hq, D) queries.
        k: (B, T, Hk, D) keys; Hk may differ from Hq (grouped-query attention).
        cos, sin: (T, D/2) or (B, T, D/2) tables from :func:`rope_cos_sin`.

    Returns:
        ``(q_rot, k_rot)`` of the inputs' shapes and dtype. Differentiable in
        all four inputs (the fast kernels differentiate only q and k).
    """
    c = torch.cat((cos, cos), dim=-1).float()
    s = torch.cat((sin, sin), dim=-1).float()
    if c.dim() == 2:  # (T, D) -> (1, T, 1, D)
        c, s = c[None, :, None, :], s[None, :, None, :]
    else:  # (B, T, D) -> (B, T, 1, D)
        c, s = c[:, :, None, :], s[:, :, None, :]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * c + rotate_half(xf) * s).to(x.dtype)

    return rotate(q), rotate(k)
