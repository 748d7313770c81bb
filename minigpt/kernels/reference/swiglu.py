"""Reference SwiGLU, the gated activation of Llama-style MLPs.

A SwiGLU MLP computes ``down(silu(gate(x)) * up(x))``: two projections of the
input, one passed through SiLU (``g * sigmoid(g)``) and used as a smooth,
learned gate on the other. This file defines the elementwise middle part::

    swiglu(g, u) = silu(g) * u = g * sigmoid(g) * u
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` computed in float32, returned in ``gate``'s dtype.

    Args:
        gate: any shape; the input of the SiLU.
        up: same shape and dtype as ``gate``; the gated value.

    Returns:
        Tensor of the common shape and dtype. Its gradients (by autograd) are
        ``d_up = dy * silu(g)`` and ``d_gate = dy * u * s * (1 + g * (1 - s))``
        with ``s = sigmoid(g)``.
    """
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)
