"""Rotary position embedding layer: cached cos/sin tables + the fused ``rope`` op."""

from __future__ import annotations

import torch
from torch import nn

from minigpt.kernels import rope, rope_cos_sin


class RotaryEmbedding(nn.Module):
    """Applies RoPE to (B, T, H, D) queries and keys, caching the angle tables.

    The tables ``cos, sin`` of shape ``(max_seq_len, head_dim / 2)`` are built
    once (float32, whatever the model's dtype) and indexed by position on each
    call; they grow automatically if a longer sequence arrives. They are not
    saved in checkpoints (they are a function of ``head_dim`` and ``theta``).

    Args:
        head_dim: D, size of one attention head (even).
        max_seq_len: positions to pre-compute (more are added on demand).
        theta: frequency base (10000 for Llama 2, 500000 for Llama 3).

    Example:
        >>> rot = RotaryEmbedding(64, max_seq_len=128)
        >>> q, k = torch.randn(2, 10, 8, 64), torch.randn(2, 10, 2, 64)
        >>> q, k = rot(q, k)             # positions 0..9
        >>> q1, k1 = torch.randn(2, 1, 8, 64), torch.randn(2, 1, 2, 64)
        >>> q1, k1 = rot(q1, k1, 10)     # decoding: the 11th token
    """

    cos: torch.Tensor
    sin: torch.Tensor

    def __init__(self, head_dim: int, max_seq_len: int = 2048, theta: float = 10000.0) -> None:
        super().__init__()
        if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 1:
            raise ValueError(f"max_seq_len must be a positive int, got {max_seq_len!r}")
        cos, sin = rope_cos_sin(max_seq_len, head_dim, theta)  # checks head_dim and theta
        self.head_dim = head_dim
        self.theta = float(theta)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _apply(self, fn, *args, **kwargs):  # type: ignore[override]
        # model.to(bfloat16) would round the tables; moving devices is fine, so
        # rebuild them in float32 wherever they ended up.
        super()._apply(fn, *args, **kwargs)
        if self.cos.dtype != torch.float32:
            self._build(self.cos.shape[0], self.cos.device)
        return self

    def _build(self, seq_len: int, device: torch.device) -> None:
        self.cos, self.sin = rope_cos_sin(seq_len, self.head_dim, self.theta, device=device)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor | int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate ``q`` (B, T, Hq, D) and ``k`` (B, T, Hk, D) by their positions.

        Args:
            positions: None for positions ``0 .. T-1``; an int offset for
                ``offset .. offset+T-1`` (decoding after ``offset`` cached
                tokens); or an integer tensor (T,) or (B, T) of explicit
                positions (rows at different lengths, packed documents).

        Returns:
            ``(q_rot, k_rot)``, same shapes and dtype as the inputs.
        """
        T = q.shape[1] if q.dim() == 4 else 0
        if positions is None or (isinstance(positions, int) and not isinstance(positions, bool)):
            offset = 0 if positions is None else positions
            if offset < 0:
                raise ValueError(f"the position offset must be >= 0, got {offset}")
            needed = offset + T
            if needed > self.cos.shape[0]:
                self._build(max(needed, 2 * self.cos.shape[0]), self.cos.device)
            cos, sin = self.cos[offset : offset + T], self.sin[offset : offset + T]
        elif isinstance(positions, torch.Tensor):
            if positions.is_floating_point() or positions.dtype == torch.bool:
                raise TypeError(f"positions must be an integer tensor, got {positions.dtype}")
            if positions.numel() and int(positions.min()) < 0:
                raise ValueError("positions must be >= 0")
            needed = int(positions.max()) + 1 if positions.numel() else 0
            if needed > self.cos.shape[0]:
                self._build(max(needed, 2 * self.cos.shape[0]), self.cos.device)
            idx = positions.to(self.cos.device)
            cos, sin = self.cos[idx], self.sin[idx]
        else:
            kind = type(positions).__name__
            raise TypeError(f"positions must be None, an int or an integer tensor, got {kind}")
        return rope(q, k, cos.to(q.device), sin.to(q.device))

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, max_seq_len={self.cos.shape[0]}, theta={self.theta:g}"
