"""GPTQ: calibration-based weight quantization that corrects its own rounding error.

Round-to-nearest (RTN) rounds every weight on its own, so the errors of the
K inputs of an output channel add up in the layer's output. GPTQ (Frantar et
al., 2022) rounds the columns of W one at a time and, after each one, nudges
the columns not yet rounded so that the layer's *output* on real inputs moves
as little as possible. What "real inputs" look like is summarised by the
Hessian of the layer's squared output error,

    H = 2 X^T X / n        (K, K), X = the (n, K) inputs the layer saw,

collected by running a few calibration batches through the float model.

The algorithm for one (N, K) weight:

1. Dampen: ``H += 0.01 * mean(diag H) * I`` so H is safely positive definite.
   Inputs that were always zero (``H_ii = 0``) get ``H_ii = 1`` and weight 0.
2. ``U = cholesky(H^-1)^T`` (upper triangular). Row i of U, divided by
   ``U_ii``, says how the optimal remaining columns j > i change when column i
   is fixed at a rounded value; ``U_ii^2`` is that column's error weight.
3. For i = 0..K-1 (input order): round column i (with the scale and zero point
   of its group, computed from the *current*, already corrected weights when
   the group starts), ``err = (w_i - q_i) / U_ii``, then
   ``W[:, j] -= err * U[i, j]`` for every j > i.
4. Lazy batch updates: step 3 touches all later columns after every column,
   which is memory bound. Instead, columns are processed in blocks of 128; the
   updates inside a block are applied at once, and the block's errors are
   pushed to the rest of W with one matmul ``W[:, end:] -= E @ U[block, end:]``.

The result is ordinary codes + scales (+ zeros) in exactly the layout of
:mod:`minigpt.kernels.reference.quant`: the same kernels run it, and a
checkpoint does not record how it was made.

Entry points: :func:`gptq_quantize_weight` (one weight + its Hessian),
:class:`HessianCollector` (hooks that build H for many linears in one pass),
and ``quantize_(model, config, calibration=batches)`` which uses both.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from minigpt.kernels.quant import FORMATS, QuantizedWeight
from minigpt.kernels.reference.quant import INT4_GROUP_SIZES, PACK_RUN, pack_4bit
from minigpt.nn.quant_linear import QuantLinear
from minigpt.quant.search import quantize_with_params, rtn_group_params, search_group_params

GPTQ_BLOCK = 128  # columns per lazy-update block


# ---- the Hessian ---------------------------------------------------------------------


def hessian_from_inputs(x: torch.Tensor) -> torch.Tensor:
    """``2 X^T X / n`` (float64, (K, K)) of the (..., K) inputs ``x`` of one linear layer."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError("calibration inputs must be a float tensor of shape (..., K)")
    if x.dim() < 1 or x.numel() == 0:
        raise ValueError(f"calibration inputs are empty: shape {tuple(x.shape)}")
    x2 = x.detach().reshape(-1, x.shape[-1]).float()
    if not torch.isfinite(x2).all():
        raise ValueError("calibration inputs contain NaN or inf")
    return (2.0 / x2.shape[0]) * (x2.t() @ x2).double()


class HessianCollector:
    """Forward hooks that accumulate ``H = 2 X^T X / n`` for each given linear layer.

    Use as a context manager around calibration forward passes::

        with HessianCollector({"fc1": model.fc1}) as hc:
            model(batch)
        H = hc.hessian("fc1")

    Each batch is multiplied in float32 (fast) and summed in float64, so many
    batches lose no precision. Inputs with NaN/inf raise ValueError.
    """

    def __init__(self, linears: Mapping[str, nn.Linear]) -> None:
        self.linears = dict(linears)
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self._handles: list = []

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            if not torch.isfinite(x).all():
                raise ValueError(f"calibration input of {name!r} contains NaN or inf")
            xtx = (x.t() @ x).double()
            if name in self.sums:
                self.sums[name] += xtx
            else:
                self.sums[name] = xtx
            self.counts[name] = self.counts.get(name, 0) + x.shape[0]

        return hook

    def __enter__(self) -> HessianCollector:
        for name, mod in self.linears.items():
            self._handles.append(mod.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def hessian(self, name: str) -> torch.Tensor:
        """The (K, K) float64 Hessian of layer ``name`` (ValueError if it saw no input)."""
        if not self.counts.get(name):
            raise ValueError(
                f"layer {name!r} received no input during calibration; the calibration "
                "batches must run through every layer being quantized"
            )
        return self.sums[name] * (2.0 / self.counts[name])


def gptq_quantize_weight(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    fmt: str = "int4",
    block: int = 64,
    *,
    damp: float = 0.01,
    group_params: str = "mse",
) -> QuantizedWeight:
    """Quantize an (N, K) weight with GPTQ, given the (K, K) Hessian of its inputs.

    Args:
        weight: (N, K) float weight (not modified).
        hessian: (K, K) ``2 X^T X / n`` from :func:`hessian_from_inputs` or
            :class:`HessianCollector` (symmetric, positive semi-definite).
        fmt: ``"int4"`` (group-wise scale + zero), ``"int8"`` (per-channel
            symmetric; the scale comes from the original row maximum) or
            ``"nf4"`` (block absmax + normal-float code book).
        block: int4 group size / nf4 block size (ignored for int8).
        damp: fraction of the mean diagonal added to H's diagonal.
        group_params: how each group's scale (and int4 zero) is chosen from
            the error-updated weights when the group starts: ``"mse"``
            searches for the lowest error weighted by ``diag(H)`` (see
            :mod:`minigpt.quant.search`), ``"minmax"`` uses the
            round-to-nearest range. int8 always takes the original row's absmax.

    Returns:
        A :class:`QuantizedWeight` in the standard packed layout, usable by
        :class:`QuantLinear` and every quant kernel.
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise TypeError("weight must be a 2-D float tensor (N, K)")
    n, k = weight.shape
    if not isinstance(hessian, torch.Tensor) or tuple(hessian.shape) != (k, k):
        got = tuple(hessian.shape) if isinstance(hessian, torch.Tensor) else type(hessian).__name__
        raise ValueError(f"hessian must be ({k}, {k}) for a weight with K={k}, got {got}")
    if not torch.isfinite(hessian).all():
        raise ValueError("hessian contains NaN or inf")
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    if fmt == "int4" and block not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group_size must be one of {INT4_GROUP_SIZES}, got {block}")
    if fmt != "int8" and (block <= 0 or block % PACK_RUN or k % block):
        raise ValueError(
            f"K={k} must be a multiple of the block size {block} (itself a multiple of 32)"
        )
    if not 0 <= damp < 1:
        raise ValueError(f"damp must be in [0, 1), got {damp}")
    if group_params not in ("mse", "minmax"):
        raise ValueError(f"group_params must be 'mse' or 'minmax', got {group_params!r}")

    w = weight.detach().float().clone()
    h = hessian.detach().double().clone()
    dead = torch.diagonal(h) <= 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    # diag(H) ~ E[x_j^2]: the cost of an error in column j, for the group search
    importance = torch.diagonal(h).float().clone()
    h += damp * torch.diagonal(h).mean() * torch.eye(k, dtype=h.dtype)
    chol, info = torch.linalg.cholesky_ex(h)
    if int(info):
        raise ValueError("hessian is not positive definite even after damping; increase damp")
    u = torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True).float()

    group = k if fmt == "int8" else block
    step = max(GPTQ_BLOCK, group) // group * group  # a whole number of groups per block
    codes = torch.zeros(n, k, dtype=torch.float32)
    n_groups = k // group
    scales = torch.zeros(n, n_groups)
    zeros = torch.zeros(n, n_groups)
    if fmt == "int8":
        # per-channel scale from the original row; only the codes follow the error updates
        scales[:, 0] = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0

    for b0 in range(0, k, step):
        b1 = min(b0 + step, k)
        wb = w[:, b0:b1].clone()
        ub = u[b0:b1, b0:b1]
        errs = torch.zeros_like(wb)
        for i in range(b1 - b0):
            col = b0 + i
            gi = col // group
            if col % group == 0 and fmt != "int8":
                g = wb[:, i : i + group]
                if group_params == "mse":
                    s_g, z_g = search_group_params(g, fmt, importance[col : col + group])
                else:
                    s_g, z_g = rtn_group_params(g, fmt)
                scales[:, gi] = s_g
                if z_g is not None:
                    zeros[:, gi] = z_g
            x = wb[:, i : i + 1]
            z_col = zeros[:, gi] if fmt == "int4" else None
            q, deq = quantize_with_params(x, fmt, scales[:, gi], z_col)
            q, deq, x = q[:, 0], deq[:, 0], x[:, 0]
            codes[:, col] = q
            err = (x - deq) / ub[i, i]
            wb[:, i:] -= err[:, None] * ub[i, i:][None, :]
            errs[:, i] = err
        w[:, b1:] -= errs @ u[b0:b1, b1:]

    shape = (n, k)
    if fmt == "int8":
        return QuantizedWeight(
            "int8", codes.to(torch.int8), scales[:, 0].contiguous(), None, shape, 0
        )
    packed = pack_4bit(codes)
    if fmt == "int4":
        return QuantizedWeight(
            "int4", packed, scales.to(torch.bfloat16), zeros.to(torch.uint8), shape, block
        )
    return QuantizedWeight("nf4", packed, scales.contiguous(), None, shape, block)


# ---- whole models ----------------------------------------------------------------------


def _run_batch(model: nn.Module, batch: object) -> None:
    if isinstance(batch, torch.Tensor):
        model(batch)
    elif isinstance(batch, Mapping):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    else:
        raise TypeError(
            "each calibration batch must be a tensor (model(batch)), a tuple/list "
            f"(model(*batch)) or a dict (model(**batch)), got {type(batch).__name__}"
        )


def collect_hessians(
    model: nn.Module, targets: Mapping[str, nn.Linear], calibration: torch.Tensor | Iterable[object]
) -> dict[str, torch.Tensor]:
    """Run ``calibration`` through ``model`` (eval mode, no grad) and return
    ``{name: H}``, the (K, K) float64 Hessian of each target linear's inputs.

    ``calibration`` is one batch (a tensor of model inputs, e.g. token ids) or an
    iterable of batches (tensors, tuples of positional args, or dicts of
    keyword args). A few thousand tokens of ordinary text suffice.
    """
    batches = [calibration] if isinstance(calibration, torch.Tensor) else calibration
    if not isinstance(batches, Iterable) or isinstance(batches, (str, bytes, Mapping)):
        raise TypeError("calibration must be a tensor or an iterable of batches")
    batches = list(batches)
    if not batches:
        raise ValueError("calibration is empty: give at least one batch of model inputs")
    was_training = model.training
    model.eval()
    try:
        with HessianCollector(targets) as hc, torch.no_grad():
            for batch in batches:
                _run_batch(model, batch)
    finally:
        model.train(was_training)
    return {name: hc.hessian(name) for name in targets}


def quant_linear_from_weight(
    linear: nn.Linear, qw: QuantizedWeight, act_quant: str | None = None
) -> QuantLinear:
    """A :class:`QuantLinear` holding ``qw`` (already quantized) and ``linear``'s bias."""
    has_bias = linear.bias is not None
    dtype = linear.bias.dtype if has_bias else linear.weight.dtype
    m = QuantLinear(
        linear.in_features,
        linear.out_features,
        qw.fmt,
        qw.block or 64,
        has_bias,
        dtype,
        "meta",
        act_quant,
    )
    m.qweight, m.scales, m.zeros = qw.qweight, qw.scales, qw.zeros
    if has_bias:
        m.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return m.to(linear.weight.device)


CALIBRATED_METHODS = ("gptq", "mse")


def gptq_quantize_linears(
    model: nn.Module,
    targets: Mapping[str, nn.Linear],
    fmt: str,
    block: int,
    calibration: torch.Tensor | Iterable[object],
    act_quant: str | None = None,
    damp: float = 0.01,
    method: str = "gptq",
) -> dict[str, QuantLinear]:
    """Run ``calibration`` through the float ``model``, then quantize every target linear.

    All Hessians are collected in one calibration pass over the float model
    (each layer sees float inputs, not those of already quantized layers).

    Args:
        model: the float model (not modified here).
        targets: ``{name: linear}`` layers to quantize.
        fmt, block, act_quant: as in :class:`QuantLinear`.
        calibration: model inputs, see :func:`collect_hessians`.
        damp: GPTQ's damping (fraction of the mean diagonal of H).
        method: ``"gptq"`` (error feedback, with searched group parameters)
            or ``"mse"`` (only the activation-weighted group search of
            :mod:`minigpt.quant.search`, weights ``diag(H)``; no error feedback).

    Returns:
        ``{name: QuantLinear}`` ready to be swapped in.
    """
    from minigpt.quant.search import mse_quantize_weight

    if method not in CALIBRATED_METHODS:
        raise ValueError(f"method must be one of {CALIBRATED_METHODS}, got {method!r}")
    hessians = collect_hessians(model, targets, calibration)
    out = {}
    for name, linear in targets.items():
        h = hessians.pop(name)
        if method == "gptq":
            qw = gptq_quantize_weight(linear.weight, h, fmt, block, damp=damp)
        else:
            importance = torch.diagonal(h).float().clamp_min(0)
            qw = mse_quantize_weight(linear.weight, fmt, block, importance)
        out[name] = quant_linear_from_weight(linear, qw, act_quant)
    return out
