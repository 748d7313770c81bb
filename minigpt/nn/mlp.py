"""Feed-forward (MLP) blocks of a transformer, backed by the fused kernels."""

from __future__ import annotations

import torch
from torch import nn

from minigpt.kernels import swiglu


class SwiGLUMLP(nn.Module):
    """Llama's gated MLP: ``down(silu(gate(x)) * up(x))``.

    Two parallel projections widen ``x`` from ``dim`` to ``hidden_dim``; one,
    passed through SiLU, gates the other elementwise (the fused
    :func:`minigpt.kernels.swiglu`), and a third projects back to ``dim``. The
    layer names match Hugging Face's ``LlamaMLP`` (``gate_proj``, ``up_proj``,
    ``down_proj``) so weights map one to one on export.

    With three matrices instead of two, Llama picks ``hidden_dim`` about
    ``8/3 * dim`` (rounded to a multiple of 64 or 256) to keep the parameter
    count of a classic ``4 * dim`` GELU MLP.

    Args:
        dim: model width (input and output size).
        hidden_dim: inner width.
        bias: add biases to the three projections (Llama has none).

    Shapes: ``(..., dim) -> (..., dim)``.
    """

    def __init__(self, dim: int, hidden_dim: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=bias)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=bias)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the gated MLP to the last dimension of ``x``."""
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))
