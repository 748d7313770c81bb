"""Reference mixture-of-experts (MoE) math: the specification, written as plain loops.

A MoE MLP replaces one big feed-forward network by ``E`` smaller ones, the
*experts*, and a *router* that sends each token to a few of them::

    logits = x @ router.T                     (N, E)   one score per token and expert
    pick k experts per token (or k*N/E tokens per expert), with weights w
    y[t] = sum over the picks (e, w) of token t:  w * expert_e(x[t])
    expert_e(v) = w_down[e] @ (silu(g) * u),  [g; u] = w_gate_up[e] @ v   (SwiGLU)

Everything here is deliberately naive -- a Python loop over tokens or experts,
computed in float32 -- so that it can be read as the definition. The fast
kernels in :mod:`minigpt.kernels.moe` are tested against these functions.

Routing conventions (the fast code must match them exactly):

* **Token choice, top-k**: each token scores every expert (``softmax`` or
  ``sigmoid`` of its logits) and keeps the ``k`` best; with ``renormalize`` the
  k weights are divided by their sum.
* **Capacity** (Switch Transformer): expert ``e`` accepts at most ``capacity``
  assignments. Assignments are served in the order (choice rank, token): all
  first choices in token order, then all second choices, ... An assignment that
  finds its expert full is *dropped*: its expert id becomes ``-1`` and it adds
  nothing (the token still passes through the block's residual connection).
* **Expert choice**: each expert picks the ``capacity`` tokens with the highest
  softmax score for it (ties: lower token index first); a token may be picked by
  zero, one or many experts. The result uses one column per expert: id ``e``
  where expert ``e`` picked the token, else ``-1``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

GATES = ("softmax", "sigmoid")


def expert_capacity(n_tokens: int, n_experts: int, k: int, capacity_factor: float) -> int:
    """Slots per expert: ``ceil(capacity_factor * n_tokens * k / n_experts)``.

    With ``capacity_factor = 1`` and a perfectly balanced router every slot is
    used and nothing is dropped; 1.25 leaves a 25% margin for imbalance.
    """
    return max(1, math.ceil(capacity_factor * n_tokens * k / n_experts))


def router_scores_reference(logits: torch.Tensor, gate: str) -> torch.Tensor:
    """Per-expert scores of each token: ``softmax`` or ``sigmoid`` of the logits (float32)."""
    if gate == "softmax":
        return torch.softmax(logits.float(), dim=-1)
    if gate == "sigmoid":
        return torch.sigmoid(logits.float())
    raise ValueError(f"gate must be one of {GATES}, got {gate!r}")


def router_probs_reference(logits: torch.Tensor, gate: str) -> torch.Tensor:
    """The router's distribution over experts (rows sum to 1), used by the aux losses.

    Softmax scores already sum to 1; sigmoid scores are divided by their sum.
    """
    scores = router_scores_reference(logits, gate)
    return scores if gate == "softmax" else scores / scores.sum(-1, keepdim=True)


def topk_routing_reference(
    logits: torch.Tensor,
    k: int,
    gate: str = "softmax",
    renormalize: bool = False,
    capacity: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-choice routing, one token at a time.

    Args:
        logits: (N, E) router logits.
        k: experts per token.
        gate: ``"softmax"`` or ``"sigmoid"``.
        renormalize: divide each token's k weights by their sum.
        capacity: optional assignments per expert; the rest are dropped (see
            the module docstring for the order).

    Returns:
        ``(expert_ids, weights)``: (N, k) int64 (``-1`` = dropped) and (N, k)
        float32, differentiable with respect to ``logits``.
    """
    n, e = logits.shape
    scores = router_scores_reference(logits, gate)
    ids = torch.full((n, k), -1, dtype=torch.long)
    plain = scores.detach()
    weights_rows = []
    for t in range(n):
        # best first; among equal scores the lower expert index first
        order = sorted(range(e), key=lambda j: (-float(plain[t, j]), j))[:k]
        ids[t] = torch.tensor(order)
        w = scores[t, order]
        if renormalize:
            w = w / w.sum()
        weights_rows.append(w)
    weights = torch.stack(weights_rows) if n else scores.new_zeros(0, k)
    if capacity is not None:
        used = [0] * e
        for j in range(k):  # all first choices, then all second choices, ...
            for t in range(n):
                ex = int(ids[t, j])
                if used[ex] < capacity:
                    used[ex] += 1
                else:
                    ids[t, j] = -1
    return ids, weights


def expert_choice_routing_reference(
    logits: torch.Tensor, capacity: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert-choice routing, one expert at a time.

    Args:
        logits: (N, E) router logits.
        capacity: tokens each expert picks (at most N).

    Returns:
        ``(expert_ids, weights)``, both (N, E): column ``e`` holds ``e`` for the
        tokens expert ``e`` picked (``-1`` elsewhere) and their softmax score.
    """
    n, e = logits.shape
    scores = router_scores_reference(logits, "softmax")
    ids = torch.full((n, e), -1, dtype=torch.long)
    for ex in range(e):
        col = scores[:, ex].detach()
        order = sorted(range(n), key=lambda t: (-float(col[t]), t))[: min(capacity, n)]
        for t in order:
            ids[t, ex] = ex
    return ids, scores


def moe_mlp_reference(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
) -> torch.Tensor:
    """The expert SwiGLU MLPs applied token by token: the definition of a MoE layer.

    Args:
        x: (N, d) tokens.
        expert_ids: (N, k) int64 in ``[-1, E)``; ``-1`` = no expert (dropped).
        weights: (N, k) combine weight of each pick.
        w_gate_up: (E, 2F, d): rows ``[:F]`` project to the gate, ``[F:]`` to the up value.
        w_down: (E, d, F).

    Returns:
        (N, d) in ``x``'s dtype: ``y[t] = sum_j weights[t, j] * expert_{ids[t, j]}(x[t])``,
        computed in float32 (differentiable by autograd).
    """
    f = w_gate_up.shape[1] // 2
    xf, wgu, wd, wt = x.float(), w_gate_up.float(), w_down.float(), weights.float()
    rows = []
    for t in range(x.shape[0]):
        acc = xf.new_zeros(x.shape[1])
        for j in range(expert_ids.shape[1]):
            e = int(expert_ids[t, j])
            if e < 0:
                continue
            gu = wgu[e] @ xf[t]
            h = F.silu(gu[:f]) * gu[f:]
            acc = acc + wt[t, j] * (wd[e] @ h)
        rows.append(acc)
    y = torch.stack(rows) if rows else xf.new_zeros(0, x.shape[1])
    return y.to(x.dtype)


def moe_mlp_loop_over_experts(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
) -> torch.Tensor:
    """The same math, vectorized per expert the way common eager code does it.

    For each expert: find its tokens, ``index_select`` them, run the MLP as
    dense matmuls, scale by the weights and ``index_add_`` the result back. This
    is the ``torch`` backend of :func:`minigpt.kernels.moe_expert_mlp` and the
    "eager loop" competitor in the benchmark. Computes in ``x``'s dtype.
    """
    f = w_gate_up.shape[1] // 2
    y = torch.zeros_like(x)
    w = weights.to(x.dtype)
    for e in range(w_gate_up.shape[0]):
        tok, slot = torch.nonzero(expert_ids == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        xe = x.index_select(0, tok)
        gu = xe @ w_gate_up[e].t()
        h = F.silu(gu[:, :f]) * gu[:, f:]
        out = (h @ w_down[e].t()) * w[tok, slot].unsqueeze(1)
        y = y.index_add(0, tok, out)
    return y


def moe_permute_reference(
    x: torch.Tensor, expert_ids: torch.Tensor, n_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group token copies by expert.

    Assignments ``(t, j)`` are visited in row-major order and appended to their
    expert's group, so within a group tokens stay in order.

    Returns:
        ``(x_perm, offsets, slot_of)``: (M, d) rows of ``x``, expert ``e``'s rows
        being ``x_perm[offsets[e]:offsets[e+1]]``; (E+1,) int64 offsets; (N, k)
        int64 row of ``x_perm`` holding each assignment (``-1`` if dropped).
    """
    n, k = expert_ids.shape
    groups: list[list[tuple[int, int]]] = [[] for _ in range(n_experts)]
    for t in range(n):
        for j in range(k):
            e = int(expert_ids[t, j])
            if e >= 0:
                groups[e].append((t, j))
    offsets = [0]
    slot_of = torch.full((n, k), -1, dtype=torch.long)
    order = []
    for e in range(n_experts):
        for t, j in groups[e]:
            slot_of[t, j] = len(order)
            order.append(t)
        offsets.append(len(order))
    x_perm = x[torch.tensor(order, dtype=torch.long)] if order else x.new_zeros(0, x.shape[1])
    return x_perm, torch.tensor(offsets, dtype=torch.long), slot_of


def moe_unpermute_reference(
    y_perm: torch.Tensor, slot_of: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Combine: ``y[t] = sum_j weights[t, j] * y_perm[slot_of[t, j]]`` (skipping ``-1``).

    Computed in float32, returned in ``y_perm``'s dtype.
    """
    n, k = slot_of.shape
    yf, wf = y_perm.float(), weights.float()
    rows = []
    for t in range(n):
        acc = yf.new_zeros(y_perm.shape[1])
        for j in range(k):
            s = int(slot_of[t, j])
            if s >= 0:
                acc = acc + wf[t, j] * yf[s]
        rows.append(acc)
    y = torch.stack(rows) if rows else yf.new_zeros(0, y_perm.shape[1])
    return y.to(y_perm.dtype)


def grouped_mm_reference(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Per-group linear map: ``y[rows of e] = x[rows of e] @ w[e].T`` (float32).

    Args:
        x: (M, K) rows sorted by group; group ``e`` is ``offsets[e]:offsets[e+1]``.
        w: (E, N, K), one weight matrix per group (``F.linear`` layout).
        offsets: (E+1,) int64, non-decreasing, from 0 to M.

    Returns:
        (M, N) in ``x``'s dtype.
    """
    out = []
    for e in range(w.shape[0]):
        a, b = int(offsets[e]), int(offsets[e + 1])
        out.append(x[a:b].float() @ w[e].float().t())
    y = torch.cat(out) if out else x.float().new_zeros(0, w.shape[1])
    return y.to(x.dtype)


def load_balancing_loss_reference(
    probs: torch.Tensor, expert_ids: torch.Tensor, n_experts: int
) -> torch.Tensor:
    """Switch Transformer's auxiliary loss, ``E * sum_e f_e * P_e``.

    ``f_e`` is the fraction of the N*k routing choices that picked expert ``e``
    (counted before any dropping; not differentiable) and ``P_e`` the mean
    router probability of ``e`` over the tokens (differentiable). It is 1 for a
    perfectly uniform router and grows as the load concentrates.

    Args:
        probs: (N, E) router distribution (rows sum to 1).
        expert_ids: (N, k) the experts each token chose, before dropping.
        n_experts: E.
    """
    n, k = expert_ids.shape
    counts = [0] * n_experts
    for t in range(n):
        for j in range(k):
            counts[int(expert_ids[t, j])] += 1
    total = 0.0
    for e in range(n_experts):
        total = total + (counts[e] / (n * k)) * probs[:, e].float().mean()
    return n_experts * total


def router_z_loss_reference(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE's router z-loss: ``mean_t (log sum_e exp(logits[t, e]))^2``.

    It keeps the logits small, which keeps the router's softmax numerically
    stable in low precision.
    """
    total = 0.0
    for t in range(logits.shape[0]):
        total = total + torch.logsumexp(logits[t].float(), 0) ** 2
    return total / max(logits.shape[0], 1)
