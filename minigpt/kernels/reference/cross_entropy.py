"""Reference linear + cross-entropy: the language-model loss, written plainly.

A language model ends with a linear "LM head" that turns each hidden vector
into one score (logit) per vocabulary entry, and is trained with the
cross-entropy between the softmax of those scores and the next token::

    logits = hidden @ weight.T (+ bias)                 (N, V)
    loss_i = logsumexp(logits_i) - logits_i[target_i]   (-log p(target_i))

This reference builds the full (N, V) logits in float32, which is exactly what
the fused kernel avoids: with N = 8192 tokens and V = 32k that is 1 GiB per copy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
    z_loss: float = 0.0,
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T (+ bias)`` against ``targets``, in float32.

    Args:
        hidden: (N, H) or (B, T, H) hidden states (flattened to rows).
        weight: (V, H) LM-head / tied-embedding matrix.
        targets: int64 class indices of shape ``hidden.shape[:-1]``; rows equal to
            ``ignore_index`` contribute nothing.
        ignore_index: target value that marks a row to skip (padding, prompt tokens).
        reduction: ``"mean"`` over non-ignored rows (0 if every row is ignored,
            never NaN), ``"sum"``, or ``"none"`` (per-row loss, 0 at ignored rows).
        bias: optional (V,) bias of the LM head.
        softcap: if set, logits are capped as ``softcap * tanh(logits / softcap)``
            before the softmax (Gemma-2 style).
        z_loss: weight of the auxiliary z-loss ``z_loss * logsumexp(logits)**2`` added
            to every counted row (PaLM): it keeps the softmax normalizer near 1.

    Returns:
        A float32 scalar (mean/sum) or a float32 tensor of ``targets``' shape (none).
    """
    h = hidden.reshape(-1, hidden.shape[-1]).float()
    logits = F.linear(h, weight.float(), None if bias is None else bias.float())
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    t = targets.reshape(-1)
    per_row = F.cross_entropy(logits, t, ignore_index=ignore_index, reduction="none")
    if z_loss:
        lse = torch.logsumexp(logits, dim=-1)
        per_row = per_row + torch.where(t != ignore_index, z_loss * lse * lse, 0.0)
    if reduction == "none":
        return per_row.view(targets.shape)
    if reduction == "sum":
        return per_row.sum()
    n_valid = (t != ignore_index).sum().clamp(min=1)  # all ignored: 0, not 0/0
    return per_row.sum() / n_valid
