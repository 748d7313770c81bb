"""Argument checks shared by the public ops.

Every public op validates its inputs before any kernel runs, so a mistake is a
``TypeError`` (wrong kind of object or dtype) or ``ValueError`` (wrong shape,
device or value) that names the argument, never a crash inside C++ or Triton.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _dtype_names(dtypes: Sequence[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(
    t: object,
    name: str,
    *,
    ndim: int | Sequence[int] | None = None,
    min_ndim: int | None = None,
    dtypes: Sequence[torch.dtype] | None = FLOAT_DTYPES,
) -> torch.Tensor:
    """Check that ``t`` is a tensor with an allowed rank and dtype; return it."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype {_dtype_names(dtypes)}; got {t.dtype}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            want = " or ".join(str(a) for a in allowed)
            raise ValueError(f"{name} must be {want}-D, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dims, got shape {tuple(t.shape)}")
    return t


def check_same_device(**tensors: torch.Tensor | None) -> None:
    """All given tensors must be on one device."""
    devs = {n: t.device for n, t in tensors.items() if t is not None}
    if len(set(devs.values())) > 1:
        desc = ", ".join(f"{n} on {d}" for n, d in devs.items())
        raise ValueError(f"tensors must be on the same device: {desc}")


def check_same_dtype(**tensors: torch.Tensor | None) -> None:
    """All given tensors must have one dtype."""
    dts = {n: t.dtype for n, t in tensors.items() if t is not None}
    if len(set(dts.values())) > 1:
        desc = ", ".join(f"{n}: {d}" for n, d in dts.items())
        raise TypeError(f"tensors must have the same dtype: {desc}")


def check_positive_float(value: object, name: str, *, allow_zero: bool = False) -> float:
    """A finite float > 0 (or >= 0)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    v = float(value)
    ok = v >= 0.0 if allow_zero else v > 0.0
    if not ok or v != v or v == float("inf"):
        raise ValueError(f"{name} must be a finite number {'>=' if allow_zero else '>'} 0, got {v}")
    return v
