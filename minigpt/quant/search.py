"""Error-minimizing scales and zero points for group-wise weight quantization.

Round-to-nearest (RTN) picks each group's scale from its range: int4 maps
``[min, max]`` (widened to include 0) onto the codes 0..15, NF4 and int8 divide
by the absolute maximum. That choice spends the 16 levels on covering the
extremes, so one large weight coarsens the grid for the other 63. A slightly
smaller scale (clipping the extreme a little) or a shifted zero point often
lowers the total error of the group.

This module searches for that better choice, per group, by brute force:

    for each candidate scale  s = factor * s_rtn   (factors: DEFAULT_FACTORS)
        for each candidate zero z near the one that centres the group (int4 only)
            err(s, z) = sum_j a_j * (w_j - dequant(quant(w_j; s, z)))^2
    keep the (s, z) with the lowest err

The weights ``a_j`` (one per input channel j) say how much an error in column
j costs. Plain weight MSE (``a = 1``) treats every column alike, which clips
exactly the weights that multiply large activations; on SmolLM2-135M that
makes perplexity worse than RTN. With ``a_j = E[x_j^2]`` (the diagonal of the
calibration Hessian, see :mod:`minigpt.quant.gptq`), ``err`` is the expected
squared output error of the row when only this group is rounded: the search
then protects the columns that see large activations ("activation-aware").

Everything is data-free apart from ``a``; the result uses exactly the packed
layouts of :mod:`minigpt.kernels.reference.quant` (int4 scales are rounded to
bf16 *before* the codes are chosen, as the kernels use the bf16 value).

Entry points: :func:`search_group_params` (parameters of many groups at once,
also used inside GPTQ) and :func:`mse_quantize_weight` (a whole weight).
"""

from __future__ import annotations

import torch

from minigpt.kernels.quant import FORMATS, QuantizedWeight
from minigpt.kernels.reference.quant import INT4_GROUP_SIZES, NF4_CODEBOOK, PACK_RUN, pack_4bit

# Scale candidates as multiples of the RTN scale. Below 1 clips the extremes;
# slightly above 1 lets an integer zero point line up better with the weights.
# Measured on SmolLM2-135M (int4 g64, GPTQ + this search): a coarse grid of 10
# factors in [0.6, 1.05] with one zero on each side gives +12.5 % perplexity,
# this grid +9.0 %.
DEFAULT_FACTORS = tuple(0.5 + 0.025 * i for i in range(31))  # 0.5, 0.525, ..., 1.25
DEFAULT_ZERO_WINDOW = 2  # int4: also try zero points up to 2 away from the centring one

_NF4 = torch.tensor(NF4_CODEBOOK, dtype=torch.float32)
_NF4_MIDS = (_NF4[1:] + _NF4[:-1]) / 2


def rtn_group_params(w: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest parameters of groups ``w`` (..., G): ``(scale, zero)``, each (...).

    int4: bf16-rounded scale ``(max - min) / 15`` of the range widened to
    include 0, integer zero ``round(-min / scale)``; nf4: absmax scale, int8:
    ``absmax / 127`` (zero is None for both).
    """
    if fmt == "int4":
        lo = w.amin(dim=-1).clamp_max(0.0)
        hi = w.amax(dim=-1).clamp_min(0.0)
        scale = ((hi - lo) / 15.0).clamp_min(1e-8).to(torch.bfloat16).float()
        return scale, torch.round(-lo / scale).clamp(0, 15)
    absmax = w.abs().amax(dim=-1).clamp_min(1e-12)
    return (absmax if fmt == "nf4" else absmax / 127.0), None


def quantize_with_params(
    w: torch.Tensor, fmt: str, scale: torch.Tensor, zero: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and dequantized values of ``w`` (..., G) with per-group ``scale``/``zero`` (...).

    Returns ``(codes, dequantized)``, both float32 of ``w``'s shape: int4 codes
    in 0..15, nf4 code-book indices 0..15, int8 codes in -127..127.
    """
    s = scale[..., None]
    if fmt == "int4":
        assert zero is not None
        z = zero[..., None]
        q = (torch.round(w / s) + z).clamp(0, 15)
        return q, (q - z) * s
    if fmt == "int8":
        q = torch.round(w / s).clamp(-127, 127)
        return q, q * s
    q = torch.bucketize((w / s).contiguous(), _NF4_MIDS.to(w.device))
    return q.float(), _NF4.to(w.device)[q] * s


def search_group_params(
    w: torch.Tensor,
    fmt: str,
    importance: torch.Tensor | None = None,
    *,
    factors: tuple[float, ...] = DEFAULT_FACTORS,
    zero_window: int = DEFAULT_ZERO_WINDOW,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The scale (and int4 zero) of each group that minimizes its weighted error.

    Args:
        w: (..., G) float32 groups (e.g. (N, K // G, G) for a whole weight).
        fmt: ``"int4"``, ``"nf4"`` or ``"int8"`` (int8: one group = one row).
        importance: weight of each element's squared error, broadcastable to
            ``w`` (typically (K // G, G): ``E[x_j^2]`` of input channel j);
            None = plain weight MSE.
        factors: candidate scales as multiples of the RTN scale (1.0 is always
            tried too, so the result is never worse than RTN).
        zero_window: int4 only: zero points within this distance of the one
            that centres the group in the code range are tried.

    Returns:
        ``(scale, zero)``, float32 of shape ``w.shape[:-1]``; ``zero`` is None
        except for int4. int4 scales are already bf16-representable.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    if not factors or min(factors) <= 0:
        raise ValueError(f"factors must be positive and non-empty, got {factors}")
    if zero_window < 0:
        raise ValueError(f"zero_window must be >= 0, got {zero_window}")
    w = w.float()
    a = torch.ones(()) if importance is None else importance.float()
    s_rtn, z_rtn = rtn_group_params(w, fmt)

    def error(scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
        return (a * (quantize_with_params(w, fmt, scale, zero)[1] - w).square()).sum(dim=-1)

    best_s, best_z, best_err = s_rtn, z_rtn, error(s_rtn, z_rtn)
    if fmt == "int4":
        mid = (w.amin(dim=-1) + w.amax(dim=-1)) / 2
    for f in factors:
        s = (s_rtn * f).clamp_min(1e-8)
        if fmt != "int4":
            err = error(s, None)
            better = err < best_err
            best_s, best_err = torch.where(better, s, best_s), torch.where(better, err, best_err)
            continue
        s = s.to(torch.bfloat16).float()
        centre = torch.round(7.5 - mid / s)
        rounded = torch.round(w / s[..., None])  # shared by every zero point
        for dz in range(-zero_window, zero_window + 1):
            z = (centre + dz).clamp(0, 15)
            # (code - zero) = clamp(round(w / s), -z, 15 - z); in place: this loop is the cost
            diff = torch.clamp(rounded, (-z)[..., None], (15 - z)[..., None])
            sq = diff.mul_(s[..., None]).sub_(w).square_()
            err = (sq if importance is None else sq.mul_(a)).sum(dim=-1)
            better = err < best_err
            best_s = torch.where(better, s, best_s)
            best_z = torch.where(better, z, best_z)
            best_err = torch.where(better, err, best_err)
    return best_s, best_z


def mse_quantize_weight(
    weight: torch.Tensor,
    fmt: str = "int4",
    block: int = 64,
    importance: torch.Tensor | None = None,
    *,
    rows_per_chunk: int = 256,
) -> QuantizedWeight:
    """Quantize an (N, K) weight with searched (error-minimizing) group parameters.

    Args:
        weight: (N, K) float weight (not modified).
        fmt: ``"int4"``, ``"nf4"`` or ``"int8"``.
        block: int4 group size (32/64/128) or nf4 block size (multiple of 32);
            ignored for int8 (one scale per row).
        importance: None (plain weight MSE) or (K,) non-negative cost of an
            error in each input channel, e.g. ``E[x_j^2]`` from calibration.
        rows_per_chunk: rows searched at once (bounds the temporary memory).

    Returns:
        A :class:`QuantizedWeight` in the standard packed layout (the same
        kernels, QuantLinear and checkpoints as round-to-nearest).
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise TypeError("weight must be a 2-D float tensor (N, K)")
    n, k = weight.shape
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    if fmt == "int4" and block not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group_size must be one of {INT4_GROUP_SIZES}, got {block}")
    if fmt != "int8" and (block <= 0 or block % PACK_RUN or k % block):
        raise ValueError(
            f"K={k} must be a multiple of the block size {block} (itself a multiple of 32)"
        )
    group = k if fmt == "int8" else block
    a = None
    if importance is not None:
        if not isinstance(importance, torch.Tensor) or tuple(importance.shape) != (k,):
            raise ValueError(f"importance must be a ({k},) tensor for a weight with K={k}")
        if not torch.isfinite(importance).all() or (importance < 0).any():
            raise ValueError("importance must be finite and non-negative")
        a = importance.detach().float().reshape(k // group, group)
    w = weight.detach().float().reshape(n, k // group, group)
    codes = torch.empty_like(w)
    scales = torch.empty(n, k // group)
    zeros = torch.empty(n, k // group)
    for r0 in range(0, n, rows_per_chunk):
        rows = w[r0 : r0 + rows_per_chunk]
        s, z = search_group_params(rows, fmt, a)
        codes[r0 : r0 + rows_per_chunk] = quantize_with_params(rows, fmt, s, z)[0]
        scales[r0 : r0 + rows_per_chunk] = s
        if z is not None:
            zeros[r0 : r0 + rows_per_chunk] = z
    codes = codes.reshape(n, k)
    if fmt == "int8":
        return QuantizedWeight(
            "int8", codes.to(torch.int8), scales[:, 0].contiguous(), None, (n, k), 0
        )
    packed = pack_4bit(codes)
    if fmt == "int4":
        return QuantizedWeight(
            "int4", packed, scales.to(torch.bfloat16), zeros.to(torch.uint8), (n, k), block
        )
    return QuantizedWeight("nf4", packed, scales.contiguous(), None, (n, k), block)
