"""LoRA: low-rank adapters on frozen linear layers (float or quantized: QLoRA).

A LoRA layer computes ``y = base(x) + (alpha / r) * (x @ A^T) @ B^T``. The base
layer (an ``nn.Linear`` or a :class:`~minigpt.nn.quant_linear.QuantLinear`)
stays frozen; only A (r, K) and B (N, r) train, which is a small fraction of
the parameters. B starts at zero, so at step 0 the model is exactly the base
model. ``merge_lora`` folds ``(alpha / r) * B @ A`` into a float ``nn.Linear``
(a quantized base is dequantized first), so no adapter code is needed at inference.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from minigpt.nn.quant_linear import QuantLinear


class LoRALinear(nn.Module):
    """A frozen base linear layer plus a trainable rank-``rank`` update.

    Args:
        base: ``nn.Linear`` or ``QuantLinear`` (frozen by this constructor).
        rank: r, the adapter rank.
        alpha: scaling numerator; the update is multiplied by ``alpha / rank``.
    """

    def __init__(self, base: nn.Module, rank: int = 8, alpha: float = 16.0) -> None:
        super().__init__()
        if not isinstance(base, (nn.Linear, QuantLinear)):
            raise TypeError(f"LoRA wraps nn.Linear or QuantLinear, got {type(base).__name__}")
        if rank <= 0:
            raise ValueError(f"rank must be positive, got {rank}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.rank, self.alpha = int(rank), float(alpha)
        self.scaling = self.alpha / self.rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """base(x) + scaling * x A^T B^T, shapes (..., K) -> (..., N)."""
        update = (x.to(self.lora_a.dtype) @ self.lora_a.t()) @ self.lora_b.t()
        return self.base(x) + (self.scaling * update).to(x.dtype)

    def merged(self) -> nn.Linear:
        """A float ``nn.Linear`` equal to this layer (base weight + scaled B @ A)."""
        if isinstance(self.base, QuantLinear):
            w = self.base.dequantized_weight(torch.float32)
        else:
            w = self.base.weight.detach().float()
        bias = self.base.bias
        out = nn.Linear(self.base.in_features, self.base.out_features, bias=bias is not None)
        with torch.no_grad():
            out.weight.copy_(w + self.scaling * (self.lora_b.float() @ self.lora_a.float()))
            if bias is not None:
                out.bias.copy_(bias.detach().float())
        return out


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def add_lora(
    model: nn.Module,
    rank: int = 8,
    alpha: float = 16.0,
    target_modules: Sequence[str] = ("qkv_proj", "o_proj", "up_proj", "down_proj"),
) -> nn.Module:
    """Wrap the linear layers whose last name part is in ``target_modules``, in place.

    Every other parameter of the model is frozen, so an optimizer over
    ``[p for p in model.parameters() if p.requires_grad]`` trains only the adapters.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    targets = [
        name
        for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, QuantLinear)) and name.split(".")[-1] in target_modules
    ]
    if not targets:
        raise ValueError(f"no linear layer named any of {list(target_modules)} in the model")
    for name in targets:
        _set_module(model, name, LoRALinear(model.get_submodule(name), rank, alpha))
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every :class:`LoRALinear` by its merged float ``nn.Linear``, in place."""
    names = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    for name in names:
        _set_module(model, name, model.get_submodule(name).merged())
    return model
