"""Reference RMSNorm, the normalization used by Llama-style models.

RMSNorm rescales each vector ``x`` (the last dimension) to unit root-mean-square
and multiplies by a learned gain ``weight``::

    y = x / sqrt(mean(x ** 2) + eps) * weight

Unlike LayerNorm it neither subtracts the mean nor adds a bias: cheaper, and in
practice just as good for transformers.
"""

from __future__ import annotations

import torch


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dimension of ``x``, computed in float32.

    Args:
        x: (..., n) activations.
        weight: (n,) gain.
        eps: added to the mean square before the square root.

    Returns:
        (..., n) tensor of ``x``'s dtype.
    """
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (xf * rstd * weight.float()).to(x.dtype)


def add_rms_norm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add followed by RMSNorm, as in every pre-norm transformer block.

    ``h = x + residual`` is the updated residual stream and ``y = rms_norm(h)``
    the input of the next sub-layer. Fusing the two saves a full read and write
    of the activations.

    Returns:
        ``(y, h)``, both of ``x``'s dtype.
    """
    h = x.float() + residual.float()
    rstd = torch.rsqrt(h.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (h * rstd * weight.float()).to(x.dtype), h.to(x.dtype)
