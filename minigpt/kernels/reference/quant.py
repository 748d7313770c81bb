"""Eager references for weight-only quantization: the formats and their math.

A linear layer's weight ``W`` has shape (N, K): N output channels, K inputs.
Each format below stores W in fewer bits plus a little float metadata, and
``dequantize_*`` rebuilds a float approximation. The mixed matmul of every
format is defined as ``y = x @ dequantize(W)^T (+ bias)`` computed in float32.

Byte layouts (all tensors contiguous, row n = output channel n)
----------------------------------------------------------------

int8, per-output-channel symmetric
    qweight  int8    (N, K)      q = clamp(round(w / scale), -127, 127)
    scales   float32 (N,)        scale = max(|w[n, :]|) / 127
    w ~= q * scale.  1 byte per weight (+4 bytes per row).

int4, group-wise asymmetric (group_size G in 32, 64, 128; K % G == 0)
    qweight  uint8    (N, K // 2) two 4-bit codes per byte, see below
    scales   bfloat16 (N, K // G) scale = (max(w_g) - min(w_g)) / 15
    zeros    uint8    (N, K // G) integer zero point z in [0, 15]
    w ~= (q - z) * scale, q in [0, 15].  0.5 byte per weight (+3 bytes per group).

NF4, block-wise absmax "normal float" (block_size B, default 64; K % B == 0)
    qweight  uint8   (N, K // 2)  two 4-bit codes per byte, see below
    absmax   float32 (N, K // B)  max(|w_b|) of each block
    w ~= NF4_CODEBOOK[q] * absmax.  The 16 code values are quantiles of a
    standard normal (QLoRA), so normally distributed weights use every code
    about equally often.

4-bit packing ("split halves of 32"): the K codes of a row are cut into runs
of 32; within a run starting at element k0, byte ``k0 // 2 + j`` (j < 16) holds
element ``k0 + j`` in its low nibble and element ``k0 + 16 + j`` in its high
nibble. A kernel that loads 16 bytes gets 16 consecutive elements from the low
nibbles and the next 16 from the high nibbles (one AND and one shift), instead
of having to de-interleave even and odd elements. This is why 4-bit formats
need K % 32 == 0 (every group size we allow is a multiple of 32).
"""

from __future__ import annotations

import torch

INT4_GROUP_SIZES = (32, 64, 128)
PACK_RUN = 32  # elements per packing run of the 4-bit formats

# The 16 NF4 values: quantiles of N(0, 1), 8 on the positive side and 7 on the
# negative side plus an exact zero, scaled so that the extremes are -1 and 1.
# Recomputed from that definition by tests/test_quant.py (nf4_codebook_from_normal).
NF4_CODEBOOK = (
    -1.0,
    -0.69619289,
    -0.52507304,
    -0.39491749,
    -0.28444136,
    -0.18477344,
    -0.09104999,
    0.0,
    0.07958033,
    0.16093017,
    0.24611229,
    0.33791519,
    0.4407098,
    0.56261697,
    0.72295673,
    1.0,
)


def nf4_codebook_from_normal(offset: float = 0.9677083) -> torch.Tensor:
    """Build the NF4 code values from normal quantiles (float64, sorted, in [-1, 1])."""
    normal = torch.distributions.Normal(0.0, 1.0)
    pos = normal.icdf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -normal.icdf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    v = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return v / v.abs().max()


def _check_weight(weight: torch.Tensor) -> None:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (N, K), got {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a float tensor, got {weight.dtype}")


def _check_blocks(k: int, block: int, what: str) -> None:
    if block % PACK_RUN != 0 or block <= 0:
        raise ValueError(f"{what} must be a positive multiple of {PACK_RUN}, got {block}")
    if k % block != 0:
        raise ValueError(
            f"in_features K={k} is not a multiple of the {what} {block}; "
            f"pick a {what} that divides K (or pad the layer's inputs)"
        )


# ---- 4-bit packing --------------------------------------------------------------


def pack_4bit(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) integer codes in [0, 15] -> (N, K // 2) uint8 in the split-halves layout."""
    n, k = codes.shape
    c = codes.to(torch.uint8).reshape(n, k // PACK_RUN, 2, PACK_RUN // 2)
    return (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(n, k // 2)


def unpack_4bit(packed: torch.Tensor) -> torch.Tensor:
    """(N, K // 2) uint8 split-halves bytes -> (N, K) uint8 codes in [0, 15]."""
    n, kh = packed.shape
    b = packed.reshape(n, kh // (PACK_RUN // 2), 1, PACK_RUN // 2)
    return torch.cat([b & 0x0F, b >> 4], dim=2).reshape(n, kh * 2)


# ---- int8 -----------------------------------------------------------------------


def quantize_int8_reference(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float weight -> (qweight int8 (N, K), scales float32 (N,))."""
    _check_weight(weight)
    w = weight.float()
    scales = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scales.contiguous()


def dequantize_int8_reference(
    qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Rebuild the (N, K) weight: ``qweight * scales[:, None]``."""
    return (qweight.float() * scales.float()[:, None]).to(dtype)


# ---- int4 -----------------------------------------------------------------------


def quantize_int4_reference(
    weight: torch.Tensor, group_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) float weight -> (qweight uint8 (N, K/2), scales bf16 (N, K/G), zeros uint8 (N, K/G)).

    Each group of ``group_size`` consecutive inputs of a row maps its range
    [min, max] (widened to include 0, so zero stays exactly representable)
    onto the 16 codes 0..15.
    """
    _check_weight(weight)
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"group_size must be one of {INT4_GROUP_SIZES}, got {group_size}")
    n, k = weight.shape
    _check_blocks(k, group_size, "group_size")
    w = weight.float().reshape(n, k // group_size, group_size)
    lo = w.amin(dim=2).clamp_max(0.0)
    hi = w.amax(dim=2).clamp_min(0.0)
    # The stored scale is bf16: round it first so that codes are chosen for the
    # scale the kernels will actually use.
    scales = ((hi - lo) / 15.0).clamp_min(1e-8).to(torch.bfloat16)
    s = scales.float()
    zeros = torch.round(-lo / s).clamp(0, 15)
    q = (torch.round(w / s[:, :, None]) + zeros[:, :, None]).clamp(0, 15)
    return pack_4bit(q.reshape(n, k)), scales.contiguous(), zeros.to(torch.uint8).contiguous()


def dequantize_int4_reference(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Rebuild the (N, K) weight: ``(q - zero) * scale`` per group."""
    q = unpack_4bit(qweight).float()
    n, k = q.shape
    groups = scales.shape[1]
    q = q.reshape(n, groups, k // groups)
    w = (q - zeros.float()[:, :, None]) * scales.float()[:, :, None]
    return w.reshape(n, k).to(dtype)


# ---- NF4 ------------------------------------------------------------------------


def quantize_nf4_reference(
    weight: torch.Tensor, block_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float weight -> (qweight uint8 (N, K/2), absmax float32 (N, K/B)).

    Each block is divided by its absolute maximum and every value is mapped
    to the nearest of the 16 NF4 code values.
    """
    _check_weight(weight)
    n, k = weight.shape
    _check_blocks(k, block_size, "block_size")
    w = weight.float().reshape(n, k // block_size, block_size)
    absmax = w.abs().amax(dim=2).clamp_min(1e-12)
    v = w / absmax[:, :, None]
    code = torch.tensor(NF4_CODEBOOK, dtype=torch.float32)
    # nearest code value: count the midpoints between codes that lie below v
    mids = (code[1:] + code[:-1]) / 2
    q = torch.bucketize(v.contiguous(), mids)
    return pack_4bit(q.reshape(n, k)), absmax.contiguous()


def dequantize_nf4_reference(
    qweight: torch.Tensor, absmax: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Rebuild the (N, K) weight: ``NF4_CODEBOOK[q] * absmax`` per block."""
    q = unpack_4bit(qweight).long()
    n, k = q.shape
    blocks = absmax.shape[1]
    code = torch.tensor(NF4_CODEBOOK, dtype=torch.float32)
    w = code[q].reshape(n, blocks, k // blocks) * absmax.float()[:, :, None]
    return w.reshape(n, k).to(dtype)


# ---- mixed matmul -----------------------------------------------------------------


def quant_linear_reference(
    x: torch.Tensor, weight_fp32: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ W^T (+ bias)`` in float32 with an already dequantized W; returns x's dtype."""
    y = x.float() @ weight_fp32.float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def fake_quantize_rows_reference(x: torch.Tensor) -> torch.Tensor:
    """Dynamic int8 activation quantization, as the kernels do it (one scale per row).

    ``xs = max|x_row| / 127`` (1 for an all-zero row), ``xq = round(x / xs)``
    (half to even) clamped to [-127, 127]; returns ``xq * xs`` in float32, the
    activations that ``act_quant="int8"`` multiplies with the weight.
    """
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True)
    xs = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    return torch.round(xf / xs).clamp(-127, 127) * xs


def sqnr_db(original: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(sum w^2 / sum (w - w~)^2)."""
    o = original.double()
    noise = (o - approx.double()).pow(2).sum().clamp_min(1e-300)
    return float(10.0 * torch.log10(o.pow(2).sum() / noise))
