"""Mixture-of-experts MLP: a router plus E SwiGLU experts, backed by the fused MoE ops.

A dense transformer runs every token through the same MLP. A MoE layer keeps E
MLPs (the experts) and a tiny linear *router* that picks, per token, which few
of them to run. Parameters grow with E while the compute per token stays that
of ``k`` experts: "more knowledge at the same FLOPs".

Routing kinds (``routing=``):

* ``"topk"`` -- token choice: each token takes its k best experts (Mixtral,
  k = 2). Optional ``capacity_factor`` drops assignments past an expert's capacity.
* ``"switch"`` -- Switch Transformer: top-1 with a capacity (default factor 1.25);
  overflowing tokens are dropped and pass through the block's residual unchanged.
* ``"expert_choice"`` -- each expert picks its best ``capacity`` tokens: perfect
  balance, but a token may get no expert (again: residual only) or several.
  The choice looks at every token of the batch, later positions included, so
  in a causal LM it leaks a little future information during training and
  behaves differently at generation time: a teaching option, not a default.

Training signals besides the LM loss (summed into :attr:`MoEMLP.aux_loss`):

* load-balancing loss ``E * sum_e f_e P_e`` (f = share of assignments, P = mean
  router probability), times ``aux_loss_coef``: pushes towards uniform use;
* router z-loss ``mean logsumexp(logits)^2``, times ``z_loss_coef``: keeps the
  router's logits small and its softmax stable in bf16.

Each forward also records diagnostics (:attr:`MoEMLP.last_stats`): tokens per
expert, drop rate, router entropy; and accumulates per-expert usage for
:meth:`MoEMLP.prune_experts`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from minigpt.kernels.moe import (
    expert_capacity,
    load_balancing_loss,
    moe_drop_over_capacity,
    moe_expert_choice_routing,
    moe_expert_mlp,
    moe_topk_routing,
    router_probs,
    router_z_loss,
)
from minigpt.nn.mlp import SwiGLUMLP

ROUTINGS = ("topk", "switch", "expert_choice")


class _ExpertWeight(nn.Module):
    """Holds one stacked (E, out, in) weight, so its name reads ``<proj>.weight``."""

    def __init__(self, n_experts: int, n_out: int, n_in: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_experts, n_out, n_in))
        nn.init.normal_(self.weight, 0.0, 1.0 / math.sqrt(n_in))


class MoEMLP(nn.Module):
    """A mixture of SwiGLU experts with a learned router.

    Args:
        dim: model width d.
        hidden_dim: each expert's hidden width F.
        n_experts: E (e.g. 8, 16, 32, 64).
        k: experts per token for token-choice routing (1, 2, 4, ...); for
            ``expert_choice`` the average experts per token that sets the capacity.
        routing: ``"topk"``, ``"switch"`` or ``"expert_choice"`` (see module doc).
        gate: ``"softmax"`` or ``"sigmoid"`` router scores (token choice only).
        renormalize: divide a token's k weights by their sum.
        capacity_factor: slots per expert = ceil(factor * N * k / E); ``None``
            means no limit for ``topk`` (switch defaults to 1.25, expert choice to 1.0).
        shared_expert_hidden: width of an always-on shared SwiGLU expert (0 = none).
        aux_loss_coef, z_loss_coef: weights of the two auxiliary losses.

    Shapes: ``(..., dim) -> (..., dim)``. After a forward in training mode,
    :attr:`aux_loss` holds the weighted auxiliary loss to add to the LM loss.
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        n_experts: int = 8,
        k: int = 2,
        *,
        routing: str = "topk",
        gate: str = "softmax",
        renormalize: bool = False,
        capacity_factor: float | None = None,
        shared_expert_hidden: int = 0,
        aux_loss_coef: float = 0.01,
        z_loss_coef: float = 0.001,
    ) -> None:
        super().__init__()
        if routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
        if n_experts < 1 or not 1 <= k <= n_experts:
            raise ValueError(f"need n_experts >= 1 and 1 <= k <= n_experts, got {n_experts}, {k}")
        if routing == "switch":
            if k != 1:
                raise ValueError(f"switch routing is top-1; got k={k}")
            capacity_factor = 1.25 if capacity_factor is None else capacity_factor
        if routing == "expert_choice":
            capacity_factor = 1.0 if capacity_factor is None else capacity_factor
            if gate != "softmax" or renormalize:
                raise ValueError(
                    "expert_choice routing uses softmax scores without renormalization"
                )
        if capacity_factor is not None and not capacity_factor > 0:
            raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
        self.dim, self.hidden_dim = dim, hidden_dim
        self.n_experts, self.k = n_experts, k
        self.routing, self.gate, self.renormalize = routing, gate, renormalize
        self.capacity_factor = capacity_factor
        self.aux_loss_coef, self.z_loss_coef = aux_loss_coef, z_loss_coef
        self.router = nn.Linear(dim, n_experts, bias=False)
        self.gate_up_proj = _ExpertWeight(n_experts, 2 * hidden_dim, dim)
        self.down_proj = _ExpertWeight(n_experts, dim, hidden_dim)
        self.shared_expert = (
            SwiGLUMLP(dim, shared_expert_hidden) if shared_expert_hidden > 0 else None
        )
        # assignments each expert received since the last reset (for pruning)
        self.register_buffer("expert_usage", torch.zeros(n_experts), persistent=False)
        self.aux_loss: torch.Tensor | None = None
        self.last_stats: dict[str, object] = {}

    # ---- routing -----------------------------------------------------------------------

    def route(self, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router logits (float32) -> ``(expert_ids, weights, logits)`` for (N, d) tokens.

        Also sets :attr:`aux_loss` and :attr:`last_stats`.
        """
        # the router runs in float32 whatever the activations: its softmax decides
        # discrete choices, and bf16 logits make near-ties flip (ST-MoE's advice)
        logits = nn.functional.linear(x2.float(), self.router.weight.float())
        n, e = logits.shape
        if self.routing == "expert_choice":
            capacity = expert_capacity(n, e, self.k, self.capacity_factor)
            ids, weights = moe_expert_choice_routing(logits, capacity)
            chosen = ids  # balance is by construction; f_e counts the picks
            probs = router_probs(logits, "softmax")
        else:
            ids, weights = moe_topk_routing(
                logits, self.k, gate=self.gate, renormalize=self.renormalize
            )
            chosen = ids
            probs = router_probs(logits, self.gate)
            if self.capacity_factor is not None:
                capacity = expert_capacity(n, e, self.k, self.capacity_factor)
                ids = moe_drop_over_capacity(ids, e, capacity)
        aux = logits.new_zeros(())
        if self.aux_loss_coef:
            aux = aux + self.aux_loss_coef * load_balancing_loss(probs, chosen, e)
        if self.z_loss_coef:
            aux = aux + self.z_loss_coef * router_z_loss(logits)
        self.aux_loss = aux
        self._record(ids, probs, n)
        return ids, weights, logits

    @torch.no_grad()
    def _record(self, ids: torch.Tensor, probs: torch.Tensor, n: int) -> None:
        kept = ids[ids >= 0]
        counts = torch.bincount(kept, minlength=self.n_experts).float()
        self.expert_usage += counts
        assigned = n * self.k
        entropy = -(probs * probs.clamp_min(1e-20).log()).sum(-1).mean()
        self.last_stats = {
            "tokens_per_expert": counts.tolist(),
            # token choice: share of the N*k assignments dropped for capacity;
            # expert choice: share of tokens no expert picked
            "drop_rate": (
                1.0 - kept.numel() / max(assigned, 1)
                if self.routing != "expert_choice"
                else float((ids < 0).all(-1).float().mean())
                if n
                else 0.0
            ),
            "router_entropy": float(entropy) if n else 0.0,
            "aux_loss": float(self.aux_loss) if self.aux_loss is not None else 0.0,
        }

    # ---- forward ----------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Route each token, run its experts, combine; ``(..., dim) -> (..., dim)``."""
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        ids, weights, _ = self.route(x2)
        w_gu, w_down = self.gate_up_proj.weight, self.down_proj.weight
        if torch.is_autocast_enabled(x.device.type):  # what nn.Linear would compute in
            low = torch.get_autocast_dtype(x.device.type)
            x2, w_gu, w_down = x2.to(low), w_gu.to(low), w_down.to(low)
        else:
            w_gu, w_down = w_gu.to(x2.dtype), w_down.to(x2.dtype)
        y = moe_expert_mlp(x2, ids, weights, w_gu, w_down)
        if self.shared_expert is not None:
            y = y + self.shared_expert(x2).to(y.dtype)
        return y.view(*shape[:-1], y.shape[-1])

    # ---- maintenance ------------------------------------------------------------------

    def reset_usage(self) -> None:
        """Zero the per-expert usage counters."""
        self.expert_usage.zero_()

    @torch.no_grad()
    def prune_experts(self, keep: int | Sequence[int]) -> list[int]:
        """Drop experts in place, keeping ``keep`` (an int: the most-used ones, by
        :attr:`expert_usage`; or a list of expert indices). Returns the kept indices.

        The router's rows and the experts' weights are sliced; ``k`` shrinks to
        the new expert count if needed. Useful after training to shrink a model
        whose router ignores some experts (measure usage on real data first).
        """
        if isinstance(keep, int) and not isinstance(keep, bool):
            if not 1 <= keep <= self.n_experts:
                raise ValueError(f"keep must be in [1, {self.n_experts}], got {keep}")
            order = torch.argsort(self.expert_usage, descending=True, stable=True)
            kept = sorted(order[:keep].tolist())
        else:
            kept = sorted({int(i) for i in keep})
            if not kept or kept[0] < 0 or kept[-1] >= self.n_experts:
                raise ValueError(f"keep must list expert indices in [0, {self.n_experts})")
        idx = torch.tensor(kept, device=self.router.weight.device)
        self.router.weight = nn.Parameter(self.router.weight[idx].clone())
        self.router.out_features = len(kept)
        for proj in (self.gate_up_proj, self.down_proj):
            proj.weight = nn.Parameter(proj.weight[idx].clone())
        self.expert_usage = self.expert_usage[idx].clone()
        self.n_experts = len(kept)
        self.k = min(self.k, self.n_experts)
        return kept

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, hidden_dim={self.hidden_dim}, n_experts={self.n_experts}, "
            f"k={self.k}, routing={self.routing!r}, gate={self.gate!r}, "
            f"capacity_factor={self.capacity_factor}"
        )


def moe_layers(model: nn.Module) -> list[MoEMLP]:
    """Every :class:`MoEMLP` inside ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, MoEMLP)]


def moe_aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum of the auxiliary losses of the last forward of every MoE layer (None if none)."""
    losses = [m.aux_loss for m in moe_layers(model) if m.aux_loss is not None]
    if not losses:
        return None
    return torch.stack([loss.float() for loss in losses]).sum()


def moe_diagnostics(model: nn.Module) -> dict[str, float]:
    """Router health of the last forward, averaged over MoE layers, as flat floats.

    ``moe_drop_rate``, ``moe_router_entropy``, ``moe_aux_loss`` and
    ``moe_load_max`` (the busiest expert's tokens over the mean: 1.0 is perfect
    balance). Empty for a model without MoE layers.
    """
    stats = [m.last_stats for m in moe_layers(model) if m.last_stats]
    if not stats:
        return {}
    loads = []
    for s in stats:
        counts = s["tokens_per_expert"]
        mean = sum(counts) / max(len(counts), 1)
        loads.append(max(counts) / mean if mean > 0 else 0.0)
    n = len(stats)
    return {
        "moe_drop_rate": sum(float(s["drop_rate"]) for s in stats) / n,
        "moe_router_entropy": sum(float(s["router_entropy"]) for s in stats) / n,
        "moe_aux_loss": sum(float(s["aux_loss"]) for s in stats),
        "moe_load_max": sum(loads) / n,
    }
