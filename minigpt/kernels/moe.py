"""Mixture-of-experts ops: routing, permute / unpermute, grouped GEMM, fused expert MLP.

A MoE layer runs each token through ``k`` of ``E`` expert MLPs. Done naively
(a loop over experts that gathers each expert's tokens with ``index_select`` and
adds results back with ``index_add``) it makes many small copies; the fast path
here is four steps, each one op:

1. **route**: pick experts and weights from the router logits
   (:func:`moe_topk_routing`, :func:`moe_drop_over_capacity`,
   :func:`moe_expert_choice_routing`; plain tensor code, cheap);
2. **permute**: a counting sort of the (token, expert) assignments puts every
   expert's token rows next to each other -- no padding to a capacity
   (:func:`moe_permute`);
3. **grouped GEMM**: each expert's rows are one dense matrix, multiplied by the
   expert's weights (:func:`grouped_mm`), here twice around a SwiGLU;
4. **unpermute**: scatter back to token order, multiplying by the router
   weight and summing a token's k results in the same pass (:func:`moe_unpermute`).

:func:`moe_expert_mlp` runs steps 2-4 as one autograd function: it saves only
the permuted input, the gate/up activations and the expert outputs, and
recomputes the SwiGLU in the backward pass. The math is defined by the naive
loops of :mod:`minigpt.kernels.reference.moe`.

Shapes: N tokens, width d, E experts, k assignments per token, F expert hidden
width, M = number of kept assignments (N*k minus dropped ones).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from minigpt.kernels._backend import cpp_available, register_op, select_backend
from minigpt.kernels._checks import check_same_device, check_tensor
from minigpt.kernels.reference.moe import (
    GATES,
    expert_capacity,
    grouped_mm_reference,
    moe_mlp_loop_over_experts,
    moe_permute_reference,
    moe_unpermute_reference,
)

__all__ = [
    "expert_capacity",
    "grouped_mm",
    "load_balancing_loss",
    "moe_drop_over_capacity",
    "moe_expert_choice_routing",
    "moe_expert_mlp",
    "moe_permute",
    "moe_topk_routing",
    "moe_unpermute",
    "router_probs",
    "router_z_loss",
]

for _op in ("moe_permute", "moe_unpermute", "grouped_mm", "moe_expert_mlp"):
    register_op(_op, ("cpp", "triton"))

_INDEX_DTYPES = (torch.int64, torch.int32)


# ---- routing (plain tensor code: a few ops on the small (N, E) logits) ---------------------


def _check_logits(logits: torch.Tensor) -> None:
    check_tensor(logits, "logits", ndim=2)
    if logits.shape[1] == 0:
        raise ValueError("logits must have at least one expert column")


def router_probs(logits: torch.Tensor, gate: str = "softmax") -> torch.Tensor:
    """The router's distribution over experts, (N, E) float32 rows summing to 1.

    ``softmax`` of the logits, or for ``gate="sigmoid"`` the sigmoid scores
    divided by their sum. The load-balancing loss and the entropy diagnostic use it.
    """
    _check_logits(logits)
    if gate not in GATES:
        raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
    if gate == "softmax":
        return torch.softmax(logits.float(), dim=-1)
    s = torch.sigmoid(logits.float())
    return s / s.sum(-1, keepdim=True)


def moe_topk_routing(
    logits: torch.Tensor, k: int, *, gate: str = "softmax", renormalize: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-choice routing: each token picks its ``k`` best experts.

    Args:
        logits: (N, E) router logits (any float dtype; scored in float32).
        k: experts per token, 1 <= k <= E (Switch uses 1, Mixtral 2).
        gate: ``"softmax"`` (weights are probabilities over all E experts) or
            ``"sigmoid"`` (independent per-expert scores, as in DeepSeek-V3).
        renormalize: divide each token's k weights by their sum (Mixtral does,
            so a token's output is a convex mix of its experts).

    Returns:
        ``(expert_ids, weights)``: (N, k) int64, best first, and (N, k) float32
        weights, differentiable with respect to ``logits`` (the router learns
        through them).
    """
    _check_logits(logits)
    n_experts = logits.shape[1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n_experts:
        raise ValueError(f"k must be an int in [1, {n_experts}] (the number of experts), got {k!r}")
    if gate not in GATES:
        raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
    scores = torch.softmax(logits.float(), -1) if gate == "softmax" else logits.float().sigmoid()
    weights, expert_ids = scores.topk(k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return expert_ids, weights


def moe_drop_over_capacity(expert_ids: torch.Tensor, n_experts: int, capacity: int) -> torch.Tensor:
    """Drop the assignments that find their expert full (Switch Transformer).

    Each expert accepts at most ``capacity`` assignments, served in the order
    (choice rank, token): every token's first choice in token order, then every
    second choice, ... A dropped assignment gets id ``-1``; a token whose every
    assignment was dropped adds nothing and passes through the block's residual.

    Args:
        expert_ids: (N, k) int64 in ``[0, E)``.
        n_experts: E.
        capacity: slots per expert (see :func:`expert_capacity`), >= 0.

    Returns:
        (N, k) int64, ``-1`` where dropped.
    """
    check_tensor(expert_ids, "expert_ids", ndim=2, dtypes=_INDEX_DTYPES)
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
        raise ValueError(f"capacity must be an int >= 0, got {capacity!r}")
    n, k = expert_ids.shape
    if expert_ids.numel() == 0:
        return expert_ids.long()
    order = expert_ids.t().reshape(-1).long()  # (k*N,) in service order
    if int(order.min()) < 0 or int(order.max()) >= n_experts:
        raise ValueError(f"expert_ids must be in [0, {n_experts})")
    # position of each assignment in its expert's queue = running count of that expert
    onehot = torch.nn.functional.one_hot(order, n_experts).to(torch.int32)
    position = onehot.cumsum(0).gather(1, order[:, None]).squeeze(1) - 1
    keep = (position < capacity).view(k, n).t()
    return torch.where(keep, expert_ids.long(), -1)


def moe_expert_choice_routing(
    logits: torch.Tensor, capacity: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert-choice routing: each expert picks its ``capacity`` best tokens.

    Load is balanced by construction (every expert gets exactly ``capacity``
    tokens), but a token may get zero, one or several experts. Scores are the
    softmax over experts of each token's logits.

    Args:
        logits: (N, E) router logits.
        capacity: tokens per expert, >= 1 (clipped to N).

    Returns:
        ``(expert_ids, weights)``, both (N, E): column ``e`` is ``e`` where expert
        ``e`` picked the token and ``-1`` elsewhere; ``weights`` are the softmax
        scores (differentiable).
    """
    _check_logits(logits)
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
        raise ValueError(f"capacity must be an int >= 1, got {capacity!r}")
    n, e = logits.shape
    scores = torch.softmax(logits.float(), dim=-1)
    ids = torch.full((n, e), -1, dtype=torch.long, device=logits.device)
    c = min(capacity, n)
    if c:
        picked = scores.detach().topk(c, dim=0).indices  # (c, E) token indices per expert
        cols = torch.arange(e, device=logits.device).expand(c, e)
        ids.scatter_(0, picked, cols)
    return ids, scores


def load_balancing_loss(
    probs: torch.Tensor, expert_ids: torch.Tensor, n_experts: int
) -> torch.Tensor:
    """Switch Transformer's auxiliary loss ``E * sum_e f_e * P_e`` (a float32 scalar).

    ``f_e``: fraction of the routing choices that went to expert ``e`` (pass
    the ids *before* capacity dropping; ``-1`` entries are ignored);
    ``P_e``: mean router probability of ``e``. Minimized (value 1) by a uniform
    router; only ``P`` carries a gradient.

    Args:
        probs: (N, E) router distribution, e.g. :func:`router_probs`.
        expert_ids: (N, k) int64 chosen experts.
        n_experts: E.
    """
    check_tensor(probs, "probs", ndim=2)
    check_tensor(expert_ids, "expert_ids", ndim=2, dtypes=_INDEX_DTYPES)
    if probs.shape[1] != n_experts:
        raise ValueError(f"probs has {probs.shape[1]} columns but n_experts is {n_experts}")
    ids = expert_ids.reshape(-1).long()
    ids = ids[ids >= 0]
    if ids.numel() == 0 or probs.shape[0] == 0:
        return probs.float().sum() * 0.0
    counts = torch.bincount(ids, minlength=n_experts).float()
    f = counts / expert_ids.numel()
    return n_experts * (f * probs.float().mean(0)).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE's z-loss ``mean_t logsumexp(logits[t])^2`` (a float32 scalar).

    Penalizing large logits keeps the router's softmax stable in bfloat16.
    """
    _check_logits(logits)
    if logits.shape[0] == 0:
        return logits.float().sum() * 0.0
    return torch.logsumexp(logits.float(), dim=-1).square().mean()


# ---- backends -------------------------------------------------------------------------------


def _cpp_swiglu_fwd(gate_up: torch.Tensor) -> torch.Tensor:
    f = gate_up.shape[1] // 2
    # the C++ SwiGLU reads the two halves of the fused activation in place
    return torch.ops.minigpt.swiglu_fwd(gate_up[:, :f], gate_up[:, f:])


class _Kernels(NamedTuple):
    """One backend's kernels, all with the C++ ops' signatures."""

    permute_fwd: Any
    permute_bwd: Any
    unpermute_fwd: Any
    unpermute_bwd: Any
    gmm_fwd: Any
    gmm_bwd: Any
    swiglu_fwd: Any
    swiglu_bwd: Any
    # in-place backward forms: the mutated input's storage becomes the gradient
    unpermute_bwd_: Any  # (dy, y_perm!, slot_of, weights) -> dweights; y_perm := dy_perm
    gmm_bwd_: Any  # (dy, x!, w, offsets, need_dx, need_dw) -> dw; x := dx
    swiglu_bwd_: Any  # (dh, gate_up!) -> None; gate_up := d(gate_up)


def _kernels(backend: str) -> _Kernels:
    """The fast backend's kernels, all with the C++ ops' signatures."""
    if backend == "cpp":
        ops = torch.ops.minigpt
        return _Kernels(
            permute_fwd=ops.moe_permute_fwd,
            permute_bwd=ops.moe_permute_bwd,
            unpermute_fwd=ops.moe_unpermute_fwd,
            unpermute_bwd=ops.moe_unpermute_bwd,
            gmm_fwd=ops.grouped_mm_fwd,
            gmm_bwd=ops.grouped_mm_bwd,
            swiglu_fwd=_cpp_swiglu_fwd,
            swiglu_bwd=ops.moe_swiglu_bwd,
            unpermute_bwd_=ops.moe_unpermute_bwd_,
            gmm_bwd_=ops.grouped_mm_bwd_,
            swiglu_bwd_=ops.moe_swiglu_bwd_,
        )
    from minigpt.kernels.triton import moe as tri

    return _Kernels(
        permute_fwd=tri.moe_permute_fwd,
        permute_bwd=tri.moe_permute_bwd,
        unpermute_fwd=tri.moe_unpermute_fwd,
        unpermute_bwd=tri.moe_unpermute_bwd,
        gmm_fwd=tri.grouped_mm_fwd,
        gmm_bwd=tri.grouped_mm_bwd,
        swiglu_fwd=tri.moe_swiglu_fwd,
        swiglu_bwd=tri.moe_swiglu_bwd,
        unpermute_bwd_=_unpermute_bwd_by_copy,
        gmm_bwd_=_gmm_bwd_by_copy,
        swiglu_bwd_=_swiglu_bwd_by_copy,
    )


# In-place forms for the Triton backend, which has out-of-place kernels only: compute,
# then copy the gradient over the input (same results; no memory saved on the GPU).


def _unpermute_bwd_by_copy(dy, y_perm, slot_of, weights):
    from minigpt.kernels.triton import moe as tri

    dy_perm, dweights = tri.moe_unpermute_bwd(dy, y_perm, slot_of, weights)
    y_perm.copy_(dy_perm)
    return dweights


def _gmm_bwd_by_copy(dy, x, w, offsets, need_dx, need_dw):
    from minigpt.kernels.triton import moe as tri

    dx, dw = tri.grouped_mm_bwd(dy, x, w, offsets, need_dx, need_dw)
    if need_dx:
        x.copy_(dx)
    return dw


def _swiglu_bwd_by_copy(dh, gate_up):
    from minigpt.kernels.triton import moe as tri

    gate_up.copy_(tri.moe_swiglu_bwd(dh, gate_up))


# ---- autograd functions ---------------------------------------------------------------------


class _PermuteFunction(torch.autograd.Function):
    """x -> expert-ordered copies; backward sums each token's copies' gradients."""

    @staticmethod
    def forward(ctx, x, expert_ids, n_experts, backend):  # type: ignore[override]
        x_perm, offsets, slot_of = _kernels(backend).permute_fwd(x, expert_ids, n_experts)
        ctx.backend = backend
        ctx.save_for_backward(slot_of)
        ctx.mark_non_differentiable(offsets, slot_of)
        return x_perm, offsets, slot_of

    @staticmethod
    def backward(ctx, dx_perm, _doffsets, _dslot):  # type: ignore[override]
        (slot_of,) = ctx.saved_tensors
        dx = _kernels(ctx.backend).permute_bwd(dx_perm.contiguous(), slot_of)
        return dx, None, None, None


class _UnpermuteFunction(torch.autograd.Function):
    """Weighted scatter-add back to token order; backward gives dy_perm and dweights."""

    @staticmethod
    def forward(ctx, y_perm, slot_of, weights, backend):  # type: ignore[override]
        ctx.backend = backend
        ctx.save_for_backward(y_perm, slot_of, weights)
        return _kernels(backend).unpermute_fwd(y_perm, slot_of, weights)

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        y_perm, slot_of, weights = ctx.saved_tensors
        dy_perm, dw = _kernels(ctx.backend).unpermute_bwd(dy.contiguous(), y_perm, slot_of, weights)
        return dy_perm, None, dw, None


class _GroupedMMFunction(torch.autograd.Function):
    """y_e = x_e @ w[e].T per group; backward dx_e = dy_e @ w[e], dw[e] = dy_e.T @ x_e."""

    @staticmethod
    def forward(ctx, x, w, offsets, backend):  # type: ignore[override]
        ctx.backend = backend
        ctx.save_for_backward(x, w, offsets)
        return _kernels(backend).gmm_fwd(x, w, offsets)

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x, w, offsets = ctx.saved_tensors
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dx, dw = _kernels(ctx.backend).gmm_bwd(dy.contiguous(), x, w, offsets, need_dx, need_dw)
        return (dx if need_dx else None), (dw if need_dw else None), None, None


class _FusedSwiGLUFunction(torch.autograd.Function):
    """(M, 2F) fused gate|up -> (M, F) silu(gate) * up; backward gives d(gate|up)."""

    @staticmethod
    def forward(ctx, gate_up, backend):  # type: ignore[override]
        ctx.backend = backend
        ctx.save_for_backward(gate_up)
        return _kernels(backend).swiglu_fwd(gate_up)

    @staticmethod
    def backward(ctx, dh):  # type: ignore[override]
        (gate_up,) = ctx.saved_tensors
        return _kernels(ctx.backend).swiglu_bwd(dh.contiguous(), gate_up), None


class _ExpertMLPFunction(torch.autograd.Function):
    """permute -> grouped GEMM -> SwiGLU -> grouped GEMM -> weighted unpermute, fused.

    Kept for backward: x_perm (M, d), gate_up (M, 2F), y_perm (M, d) and the index
    tensors. The SwiGLU output h (M, F) is recomputed instead of stored. The
    intermediates live on ``ctx`` (not ``save_for_backward``) and the backward
    overwrites each with its gradient (in-place kernels), which lowers the peak
    memory; the price is that the backward can run only once (no ``retain_graph``
    reuse).
    """

    @staticmethod
    def forward(ctx, x, expert_ids, weights, w_gate_up, w_down, backend):  # type: ignore[override]
        kern = _kernels(backend)
        x_perm, offsets, slot_of = kern.permute_fwd(x, expert_ids, w_gate_up.shape[0])
        gate_up = kern.gmm_fwd(x_perm, w_gate_up, offsets)
        y_perm = kern.gmm_fwd(kern.swiglu_fwd(gate_up), w_down, offsets)
        y = kern.unpermute_fwd(y_perm, slot_of, weights)
        ctx.backend = backend
        ctx.save_for_backward(weights, w_gate_up, w_down)
        ctx.inner = [x_perm, gate_up, y_perm, offsets, slot_of]
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        weights, w_gate_up, w_down = ctx.saved_tensors
        if ctx.inner is None:
            raise RuntimeError(
                "moe_expert_mlp: backward ran twice through the same graph; its saved "
                "activations are freed after the first (retain_graph is not supported)"
            )
        x_perm, gate_up, y_perm, offsets, slot_of = ctx.inner
        ctx.inner = None  # from here on, these locals are the only references
        need_x, _, need_w, need_gu, need_down, _ = ctx.needs_input_grad
        kern = _kernels(ctx.backend)
        # Each gradient is written over the activation it replaces (in-place kernels):
        # y_perm -> dy_perm, h -> dh, gate_up -> dgate_up, x_perm -> dx_perm, so the
        # backward allocates only the recomputed h, dx and the weight gradients.
        dweights = kern.unpermute_bwd_(dy.contiguous(), y_perm, slot_of, weights)
        dy_perm = y_perm
        h = kern.swiglu_fwd(gate_up)  # recomputed: cheaper than keeping (M, F) alive
        dw_down = kern.gmm_bwd_(dy_perm, h, w_down, offsets, True, need_down)
        dh = h
        del dy_perm, y_perm
        kern.swiglu_bwd_(dh, gate_up)
        dgate_up = gate_up
        del dh, h
        dw_gate_up = kern.gmm_bwd_(dgate_up, x_perm, w_gate_up, offsets, need_x, need_gu)
        dx_perm = x_perm
        del dgate_up, gate_up
        dx = kern.permute_bwd(dx_perm, slot_of) if need_x else None
        return (
            dx,
            None,
            dweights if need_w else None,
            dw_gate_up if need_gu else None,
            dw_down if need_down else None,
            None,
        )


# ---- public ops -----------------------------------------------------------------------------


def _check_ids(expert_ids: object, n: int, n_experts: int, name: str = "expert_ids") -> None:
    check_tensor(expert_ids, name, ndim=2, dtypes=_INDEX_DTYPES)
    assert isinstance(expert_ids, torch.Tensor)
    if expert_ids.shape[0] != n:
        raise ValueError(f"{name} has {expert_ids.shape[0]} rows but there are {n} tokens")
    if expert_ids.numel() and not torch.compiler.is_compiling():  # a value check syncs
        lo, hi = int(expert_ids.min()), int(expert_ids.max())
        if lo < -1 or hi >= n_experts:
            raise ValueError(
                f"{name} must be in [-1, {n_experts}) (-1 = dropped), got values {lo}..{hi}"
            )


def _check_weights(weights: object, expert_ids: torch.Tensor) -> None:
    check_tensor(weights, "weights", ndim=2)
    assert isinstance(weights, torch.Tensor)
    if weights.shape != expert_ids.shape:
        raise ValueError(
            f"weights shape {tuple(weights.shape)} must match expert_ids {tuple(expert_ids.shape)}"
        )


def moe_permute(
    x: torch.Tensor, expert_ids: torch.Tensor, n_experts: int, *, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Copy token rows into expert order (a counting sort of the assignments).

    Args:
        x: (N, d) tokens, float32/bfloat16/float16.
        expert_ids: (N, k) int64/int32 in ``[-1, E)``; ``-1`` = dropped (not copied).
        n_experts: E.
        backend: optional backend override.

    Returns:
        ``(x_perm, offsets, slot_of)``: (M, d) rows, expert ``e``'s being
        ``x_perm[offsets[e]:offsets[e+1]]`` in token order; (E+1,) int64 offsets;
        (N, k) int64 row of each assignment in ``x_perm`` (``-1`` if dropped).
        Differentiable with respect to ``x`` (a token's gradient is the sum of
        its copies' gradients).
    """
    check_tensor(x, "x", ndim=2)
    if isinstance(n_experts, bool) or not isinstance(n_experts, int) or n_experts < 1:
        raise ValueError(f"n_experts must be an int >= 1, got {n_experts!r}")
    _check_ids(expert_ids, x.shape[0], n_experts)
    check_same_device(x=x, expert_ids=expert_ids)
    chosen = select_backend("moe_permute", x.device, backend)
    if chosen == "torch":
        return moe_permute_reference(x, expert_ids, n_experts)
    return _PermuteFunction.apply(x.contiguous(), expert_ids.long().contiguous(), n_experts, chosen)


def moe_unpermute(
    y_perm: torch.Tensor,
    slot_of: torch.Tensor,
    weights: torch.Tensor,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Back to token order, weighted: ``y[t] = sum_j weights[t, j] * y_perm[slot_of[t, j]]``.

    The multiply by the router weight and the sum over a token's k experts are
    fused into the one pass that gathers the rows; sums are in float32.

    Args:
        y_perm: (M, d) expert outputs in expert order.
        slot_of: (N, k) int64 rows of ``y_perm`` (``-1`` = nothing), from :func:`moe_permute`.
        weights: (N, k) router weights (any float dtype; used in float32).
        backend: optional backend override.

    Returns:
        (N, d) of ``y_perm``'s dtype, differentiable in ``y_perm`` and ``weights``.
    """
    check_tensor(y_perm, "y_perm", ndim=2)
    check_tensor(slot_of, "slot_of", ndim=2, dtypes=_INDEX_DTYPES)
    _check_weights(weights, slot_of)
    check_same_device(y_perm=y_perm, slot_of=slot_of, weights=weights)
    if slot_of.numel() and not torch.compiler.is_compiling():
        lo, hi = int(slot_of.min()), int(slot_of.max())
        if lo < -1 or hi >= y_perm.shape[0]:
            raise ValueError(f"slot_of must be in [-1, {y_perm.shape[0]}), got {lo}..{hi}")
    chosen = select_backend("moe_unpermute", y_perm.device, backend)
    if chosen == "torch":
        return moe_unpermute_reference(y_perm, slot_of, weights)
    out = _UnpermuteFunction.apply(
        y_perm.contiguous(), slot_of.long().contiguous(), weights.float().contiguous(), chosen
    )
    return out


def _check_offsets(offsets: object, n_groups: int, rows: int) -> None:
    check_tensor(offsets, "offsets", ndim=1, dtypes=(torch.int64,))
    assert isinstance(offsets, torch.Tensor)
    if offsets.shape[0] != n_groups + 1:
        raise ValueError(f"offsets must have E+1 = {n_groups + 1} entries, got {offsets.shape[0]}")
    if torch.compiler.is_compiling():  # value checks would break the graph
        return
    o = offsets.cpu()
    if int(o[0]) != 0 or int(o[-1]) != rows or bool((o[1:] < o[:-1]).any()):
        raise ValueError(f"offsets must be non-decreasing from 0 to the {rows} rows of x")


def grouped_mm(
    x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, *, backend: str | None = None
) -> torch.Tensor:
    """Grouped GEMM: ``y[rows of e] = x[rows of e] @ w[e].T`` for variable-size groups.

    Args:
        x: (M, K) rows sorted by group, float32/bfloat16/float16.
        w: (E, N, K) one ``F.linear``-layout weight per group, x's dtype.
        offsets: (E+1,) int64, group ``e`` = rows ``offsets[e]:offsets[e+1]``;
            groups may be empty.
        backend: optional backend override.

    Returns:
        (M, N) of x's dtype, differentiable in ``x`` and ``w`` (an empty group's
        weight gradient is zero).
    """
    check_tensor(x, "x", ndim=2)
    check_tensor(w, "w", ndim=3)
    check_same_device(x=x, w=w)
    if w.dtype != x.dtype:
        raise TypeError(f"w dtype {w.dtype} does not match x dtype {x.dtype}")
    if w.shape[2] != x.shape[1]:
        raise ValueError(f"w is {tuple(w.shape)} but x has {x.shape[1]} columns (w[e] is (N, K))")
    _check_offsets(offsets, w.shape[0], x.shape[0])
    chosen = select_backend("grouped_mm", x.device, backend)
    if chosen == "torch":
        return grouped_mm_reference(x, w, offsets)
    return _GroupedMMFunction.apply(x.contiguous(), w.contiguous(), offsets.to(x.device), chosen)


def _expert_mlp_composed(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    backend: str,
) -> torch.Tensor:
    """:func:`moe_expert_mlp` as a chain of the single ops, for torch.compile.

    The fused autograd function keeps its (M, .) intermediates on ``ctx``, where the
    compiler cannot follow them; here every tensor whose row count M depends on the
    routing is an op output, so ``fullgraph=True`` traces it (M an unbacked size).
    The compiler's autograd then decides what to keep for the backward.
    """
    x_perm, offsets, slot_of = _PermuteFunction.apply(
        x.contiguous(), expert_ids.long().contiguous(), w_gate_up.shape[0], backend
    )
    gate_up = _GroupedMMFunction.apply(x_perm, w_gate_up.contiguous(), offsets, backend)
    h = _FusedSwiGLUFunction.apply(gate_up, backend)
    y_perm = _GroupedMMFunction.apply(h, w_down.contiguous(), offsets, backend)
    return _UnpermuteFunction.apply(y_perm, slot_of, weights.float().contiguous(), backend)


def moe_expert_mlp(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """The experts of a MoE layer: ``y[t] = sum_j weights[t, j] * expert_{ids[t, j]}(x[t])``.

    Each expert is a SwiGLU MLP ``w_down[e] @ (silu(g) * u)`` with
    ``[g; u] = w_gate_up[e] @ x``. Runs permute -> grouped GEMM -> SwiGLU ->
    grouped GEMM -> weighted unpermute as one autograd function.

    Args:
        x: (N, d) tokens, float32/bfloat16/float16.
        expert_ids: (N, k) int64/int32 in ``[-1, E)`` (``-1`` = dropped assignment).
        weights: (N, k) router weights (float32 recommended; used in float32).
        w_gate_up: (E, 2F, d) stacked gate (rows ``:F``) and up (rows ``F:``) weights.
        w_down: (E, d, F) down-projection weights. Both of x's dtype.
        backend: optional backend override (``torch`` = the per-expert eager loop).

    Returns:
        (N, d) of x's dtype, differentiable in ``x``, ``weights``, ``w_gate_up``
        and ``w_down``. Tokens with no kept assignment get zeros.
    """
    check_tensor(x, "x", ndim=2)
    check_tensor(w_gate_up, "w_gate_up", ndim=3)
    check_tensor(w_down, "w_down", ndim=3)
    n, d = x.shape
    n_experts, two_f = w_gate_up.shape[0], w_gate_up.shape[1]
    if two_f % 2:
        raise ValueError(
            f"w_gate_up must be (E, 2F, d) with an even 2F, got {tuple(w_gate_up.shape)}"
        )
    if w_gate_up.shape[2] != d:
        raise ValueError(f"w_gate_up is {tuple(w_gate_up.shape)} but x has width {d}")
    if w_down.shape != (n_experts, d, two_f // 2):
        raise ValueError(
            f"w_down must be (E, d, F) = {(n_experts, d, two_f // 2)}, got {tuple(w_down.shape)}"
        )
    for name, t in (("w_gate_up", w_gate_up), ("w_down", w_down)):
        if t.dtype != x.dtype:
            raise TypeError(f"{name} dtype {t.dtype} does not match x dtype {x.dtype}")
    _check_ids(expert_ids, n, n_experts)
    _check_weights(weights, expert_ids)
    check_same_device(
        x=x, expert_ids=expert_ids, weights=weights, w_gate_up=w_gate_up, w_down=w_down
    )
    chosen = select_backend("moe_expert_mlp", x.device, backend)
    if chosen == "torch":
        return moe_mlp_loop_over_experts(x, expert_ids, weights, w_gate_up, w_down)
    if torch.compiler.is_compiling():
        return _expert_mlp_composed(x, expert_ids, weights, w_gate_up, w_down, chosen)
    return _ExpertMLPFunction.apply(
        x.contiguous(),
        expert_ids.long().contiguous(),
        weights.float().contiguous(),
        w_gate_up.contiguous(),
        w_down.contiguous(),
        chosen,
    )


if cpp_available():
    # Shapes of the C++ ops for torch.compile / meta tensors (no data is touched).
    # The number of kept assignments M depends on the ids' values: an unbacked size.
    @torch.library.register_fake("minigpt::moe_permute_fwd")
    def _moe_permute_fwd_fake(x, expert_ids, n_experts):
        m = torch.library.get_ctx().new_dynamic_size()
        return (
            x.new_empty(m, x.shape[1]),
            expert_ids.new_empty(n_experts + 1),
            torch.empty_like(expert_ids),
        )

    @torch.library.register_fake("minigpt::moe_permute_bwd")
    def _moe_permute_bwd_fake(dx_perm, slot_of):
        return dx_perm.new_empty(slot_of.shape[0], dx_perm.shape[1])

    @torch.library.register_fake("minigpt::moe_unpermute_fwd")
    def _moe_unpermute_fwd_fake(y_perm, slot_of, weights):
        return y_perm.new_empty(slot_of.shape[0], y_perm.shape[1])

    @torch.library.register_fake("minigpt::moe_unpermute_bwd")
    def _moe_unpermute_bwd_fake(dy, y_perm, slot_of, weights):
        return torch.empty_like(y_perm), torch.empty_like(weights)

    @torch.library.register_fake("minigpt::grouped_mm_fwd")
    def _grouped_mm_fwd_fake(x, w, offsets):
        return x.new_empty(x.shape[0], w.shape[1])

    @torch.library.register_fake("minigpt::grouped_mm_bwd")
    def _grouped_mm_bwd_fake(dy, x, w, offsets, need_dx, need_dw):
        dx = torch.empty_like(x) if need_dx else x.new_empty(0)
        dw = torch.empty_like(w) if need_dw else w.new_empty(0)
        return dx, dw

    @torch.library.register_fake("minigpt::moe_swiglu_bwd")
    def _moe_swiglu_bwd_fake(dh, gate_up):
        return torch.empty_like(gate_up)

    @torch.library.register_fake("minigpt::moe_unpermute_bwd_")
    def _moe_unpermute_bwd_inplace_fake(dy, y_perm, slot_of, weights):
        return torch.empty_like(weights)

    @torch.library.register_fake("minigpt::grouped_mm_bwd_")
    def _grouped_mm_bwd_inplace_fake(dy, x, w, offsets, need_dx, need_dw):
        return torch.empty_like(w) if need_dw else w.new_empty(0)

    @torch.library.register_fake("minigpt::moe_swiglu_bwd_")
    def _moe_swiglu_bwd_inplace_fake(dh, gate_up):
        return None
