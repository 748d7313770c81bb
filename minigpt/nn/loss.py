"""Loss layers backed by the fused kernels."""

from __future__ import annotations

import torch
from torch import nn

from minigpt.kernels import linear_cross_entropy


class LinearCrossEntropyLoss(nn.Module):
    """LM-head projection + cross-entropy in one fused, chunked op.

    ``forward(hidden, weight, targets, bias=None)`` returns
    ``cross_entropy(hidden @ weight.T + bias, targets)`` without ever holding the
    full (tokens, vocab) logits (see :func:`minigpt.kernels.linear_cross_entropy`).
    The module owns no parameters: the head ``weight`` (V, H) is passed in, so a
    model with tied embeddings simply passes its embedding matrix.

    Args:
        ignore_index: target value of positions that do not count (padding, prompts).
        reduction: ``"mean"`` (over counted positions), ``"sum"`` or ``"none"``.
        softcap: optional logit cap (``softcap * tanh(logits / softcap)``).
        z_loss: weight of the auxiliary ``z_loss * logsumexp(logits)**2`` term (0 = off).
        chunk_size: rows per chunk; ``None`` picks ~64 MiB of logits per chunk.

    Example:
        >>> loss_fn = LinearCrossEntropyLoss()
        >>> h = torch.randn(2, 5, 16); emb = torch.randn(100, 16)
        >>> loss = loss_fn(h, emb, torch.randint(0, 100, (2, 5)))
    """

    def __init__(
        self,
        ignore_index: int = -100,
        reduction: str = "mean",
        softcap: float | None = None,
        z_loss: float = 0.0,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.softcap = softcap
        self.z_loss = z_loss
        self.chunk_size = chunk_size

    def forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Loss of ``hidden`` (N, H) or (B, T, H) projected by ``weight`` (V, H)."""
        return linear_cross_entropy(
            hidden,
            weight,
            targets,
            self.ignore_index,
            self.reduction,
            bias=bias,
            softcap=self.softcap,
            z_loss=self.z_loss,
            chunk_size=self.chunk_size,
        )

    def extra_repr(self) -> str:
        return (
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
            f"softcap={self.softcap}, z_loss={self.z_loss}, chunk_size={self.chunk_size}"
        )
