"""Normalization layers backed by the fused kernels."""

from __future__ import annotations

import torch
from torch import nn

from minigpt.kernels import add_rms_norm, rms_norm


class RMSNorm(nn.Module):
    """Root-mean-square layer norm with a learned gain (no mean, no bias).

    ``forward(x)`` returns ``rms_norm(x, weight)``. ``forward(x, residual)``
    returns ``(y, h)`` with ``h = x + residual`` the new residual stream and
    ``y = rms_norm(h)``, computed in one fused pass (what a pre-norm block does
    between sub-layers).

    Args:
        dim: size of the normalized (last) dimension.
        eps: added to the mean square for numerical safety.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Normalize ``x`` (or ``x + residual``, returning the sum too)."""
        if residual is None:
            return rms_norm(x, self.weight, self.eps)
        return add_rms_norm(x, residual, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
