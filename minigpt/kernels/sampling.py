"""Token sampling: temperature, top-k, top-p (nucleus), min-p and repetition penalty.

    ids = sample(logits, temperature=0.8, top_k=50, top_p=0.9, generator=g)

Every knob is a Python number (the same for all rows) or a (batch,) tensor (one
value per row, so a server can batch requests with different settings). The
filters are applied in Hugging Face's order -- temperature, top-k, top-p on the
renormalized top-k set, min-p -- see :mod:`minigpt.kernels.reference.sampling`
for the exact definitions and ``docs/sampling.md`` for why the fast kernels need
no sort.

Randomness: one uniform number per row is drawn from ``generator`` (a single
``torch.rand`` call) and the kernel turns it into a token by inverse-CDF
sampling, so the same seed gives the same ids on the same backend.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from minigpt.kernels._backend import cpp_available, register_op, select_backend
from minigpt.kernels._checks import FLOAT_DTYPES, check_tensor
from minigpt.kernels.reference.sampling import (
    sample_reference,
    top_k_top_p_filter_reference,
)

register_op("sample", ("cpp", "triton"))
register_op("top_k_top_p_filter", ("cpp", "triton"))
register_op("repetition_penalty", ())

_OK, _BAD_VALUE, _NO_FINITE = 0, 1, 2


class SampleOutput(NamedTuple):
    """What :func:`sample` returns with ``return_logprobs=True``.

    ids: (batch,) int64 sampled token ids.
    logprobs: (batch,) float32 log-probability of each id under the distribution
        it was drawn from (after temperature and filters; 0 for greedy rows).
    raw_logprobs: (batch,) float32 log-probability of each id under the raw
        temperature-1 softmax of the logits (what an RL trainer's policy computes).
    """

    ids: torch.Tensor
    logprobs: torch.Tensor
    raw_logprobs: torch.Tensor


_TINY = torch.finfo(torch.float32).tiny


@functools.lru_cache(maxsize=256)
def _constant_row(value: float | int, rows: int, dtype: torch.dtype) -> torch.Tensor:
    """A cached (rows,) CPU tensor of one value: the common scalar case costs no
    allocation (the kernels only read these)."""
    return torch.full((rows,), value, dtype=dtype)


def _scalar_param(
    value: object, name: str, *, integer: bool, low: float, high: float, low_open: bool
) -> float | int:
    """Validate a Python number in plain Python (cheap for batch-1 decoding)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number or a tensor, got {type(value).__name__}")
    if integer and not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    ok = (value > low if low_open else value >= low) and value <= high  # False for NaN
    if not ok:
        lo = "(" if low_open else "["
        raise ValueError(f"{name} must be in {lo}{low}, {high}], got {value}")
    if integer:
        return min(int(value), 2**62)
    if low_open:
        return max(float(value), _TINY)
    return float(value)


def _row_param(
    value: object,
    name: str,
    rows: int,
    device: torch.device,
    *,
    integer: bool,
    low: float,
    high: float,
    low_open: bool = False,
) -> torch.Tensor:
    """Validate a scalar-or-(rows,) parameter and return it as a (rows,) tensor."""
    dtype = torch.int64 if integer else torch.float32
    if isinstance(value, torch.Tensor):
        is_int = not (value.is_floating_point() or value.is_complex()) and value.dtype != torch.bool
        if integer and not is_int:
            raise TypeError(f"{name} must be an integer tensor, got {value.dtype}")
        if not integer and not (value.is_floating_point() or is_int):
            raise TypeError(f"{name} must be a float tensor, got {value.dtype}")
        if value.dim() > 1 or (value.dim() == 1 and value.shape[0] not in (1, rows)):
            raise ValueError(
                f"{name} must be a scalar or have shape ({rows},), got {tuple(value.shape)}"
            )
        vals = value.detach().to(device=device, dtype=torch.float64).reshape(-1).expand(rows)
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number or a tensor, got {type(value).__name__}")
    elif integer and not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    else:
        vals = torch.full((rows,), float(value), dtype=torch.float64, device=device)
    # validate before rounding to float32 (so 1e-50 is "> 0" as the user meant)
    ok = (vals > low if low_open else vals >= low) & (vals <= high)
    if not bool(ok.all()):  # also catches NaN
        bad = vals[~ok][0].item()
        lo = "(" if low_open else "["
        raise ValueError(f"{name} must be in {lo}{low}, {high}], got {bad}")
    if integer:
        return vals.clamp(max=2**62).to(dtype).contiguous()
    out = vals.to(dtype)
    if low_open:  # keep "> 0" true after rounding to float32
        out = out.clamp(min=torch.finfo(torch.float32).tiny)
    return out.contiguous()


def _check_logits(logits: object) -> torch.Tensor:
    check_tensor(logits, "logits", ndim=2, dtypes=FLOAT_DTYPES)
    if logits.shape[1] == 0:
        raise ValueError("logits must have a non-empty vocab dimension")
    if logits.shape[1] >= 2**31:
        raise ValueError(f"vocab size {logits.shape[1]} is too large (< 2**31 supported)")
    return logits


def _params(logits, temperature, top_k, top_p, min_p, *, allow_greedy: bool):
    rows, dev = logits.shape[0], logits.device
    inf = float("inf")
    scalars = (temperature, top_k, top_p, min_p)
    if dev.type == "cpu" and not any(isinstance(v, torch.Tensor) for v in scalars):
        t = _scalar_param(
            temperature, "temperature", integer=False, low=0.0, high=inf, low_open=False
        )
        if t == inf:
            raise ValueError("temperature must be finite")
        if t < _TINY:  # 1/t would overflow: greedy
            if not allow_greedy:
                raise ValueError("temperature must be > 0 (and a normal float32 number)")
            t = 0.0
        k = _scalar_param(top_k, "top_k", integer=True, low=0, high=inf, low_open=False)
        p = _scalar_param(top_p, "top_p", integer=False, low=0.0, high=1.0, low_open=True)
        mp = _scalar_param(min_p, "min_p", integer=False, low=0.0, high=1.0, low_open=False)
        return (
            _constant_row(t, rows, torch.float32),
            _constant_row(k, rows, torch.int64),
            _constant_row(p, rows, torch.float32),
            _constant_row(mp, rows, torch.float32),
        )
    t = _row_param(
        temperature,
        "temperature",
        rows,
        dev,
        integer=False,
        low=0.0,
        high=inf,
        low_open=not allow_greedy,
    )
    if not bool(torch.isfinite(t).all()):
        raise ValueError("temperature must be finite")
    # below float32's smallest normal number 1/t overflows: that is greedy anyway
    t = torch.where(t < torch.finfo(torch.float32).tiny, 0.0, t)
    if not allow_greedy and bool((t == 0).any()):
        raise ValueError("temperature must be > 0 (and a normal float32 number)")
    k = _row_param(top_k, "top_k", rows, dev, integer=True, low=0, high=inf)
    p = _row_param(top_p, "top_p", rows, dev, integer=False, low=0.0, high=1.0, low_open=True)
    mp = _row_param(min_p, "min_p", rows, dev, integer=False, low=0.0, high=1.0)
    return t, k, p, mp


def _row_status(logits: torch.Tensor) -> torch.Tensor:
    """Per-row status as the kernels report it (for the torch backend)."""
    bad = (torch.isnan(logits) | torch.isposinf(logits)).any(-1)
    none = torch.isneginf(logits).all(-1)
    status = torch.full((logits.shape[0],), _OK, dtype=torch.int32, device=logits.device)
    status[none] = _NO_FINITE
    status[bad] = _BAD_VALUE
    return status


def _sanitize(logits: torch.Tensor) -> torch.Tensor:
    """NaN and +inf -> -inf."""
    return logits.masked_fill(torch.isnan(logits) | torch.isposinf(logits), float("-inf"))


def _raise_for(status: torch.Tensor) -> None:
    if bool((status == _BAD_VALUE).any()):
        row = int(torch.nonzero(status == _BAD_VALUE)[0])
        raise ValueError(
            f"logits row {row} contains NaN or +inf; fix the model or pass "
            "invalid_as_neg_inf=True to treat such values as -inf"
        )
    if bool((status == _NO_FINITE).any()):
        row = int(torch.nonzero(status == _NO_FINITE)[0])
        raise ValueError(f"logits row {row} has no finite value (all -inf): nothing to sample")


def _run_checked(run, logits: torch.Tensor, invalid_as_neg_inf: bool):
    """Run a kernel returning (..., status); redo bad rows sanitized if allowed.

    ``run(logits, rows)`` takes a row index tensor (or None for all rows) so the
    per-row parameters can be subset together with the logits.
    """
    outs = list(run(logits, None))
    status = outs[-1]
    if not bool(status.any()):  # the common case: one cheap check
        return outs[:-1]
    bad = status == _BAD_VALUE
    if invalid_as_neg_inf and bool(bad.any()):
        rows = torch.nonzero(bad).squeeze(1)
        redo = run(_sanitize(logits[rows]).contiguous(), rows)
        for o, r in zip(outs, redo):
            o[rows] = r
    _raise_for(outs[-1])
    return outs[:-1]


def _fast_kernels(backend: str):
    if backend == "cpp":
        return torch.ops.minigpt.sampling_sample, torch.ops.minigpt.sampling_filter
    from minigpt.kernels.triton import sampling as tri

    return tri.sampling_sample, tri.sampling_filter


def sample(
    logits: torch.Tensor,
    temperature: float | torch.Tensor = 1.0,
    top_k: int | torch.Tensor = 0,
    top_p: float | torch.Tensor = 1.0,
    min_p: float | torch.Tensor = 0.0,
    generator: torch.Generator | None = None,
    return_logprobs: bool = False,
    *,
    invalid_as_neg_inf: bool = False,
    backend: str | None = None,
) -> torch.Tensor | SampleOutput:
    """Draw one token per row from filtered, temperature-scaled logits, in one pass.

    Order (Hugging Face's): divide by ``temperature``; keep the ``top_k`` largest
    (ties at the k-th value included); keep the smallest set of top tokens whose
    renormalized probability reaches ``top_p``; drop tokens less likely than
    ``min_p`` times the most likely one; draw from the softmax of what is left.

    Args:
        logits: (batch, vocab) float32/bfloat16/float16 scores. ``-inf`` marks a
            token that may never be drawn.
        temperature: >= 0; 0 means greedy (argmax, first index on ties).
        top_k: >= 0 number of tokens kept; 0 (or >= vocab) disables it.
        top_p: in (0, 1]; 1 disables it.
        min_p: in [0, 1]; 0 disables it.
            Each of the four is a Python number or a (batch,) tensor.
        generator: source of the one uniform number drawn per row (same seed ->
            same ids on the same backend). None uses torch's global generator.
        return_logprobs: also return the log-probabilities of the drawn ids.
        invalid_as_neg_inf: treat NaN and +inf logits as -inf instead of raising.
        backend: ``"torch"``, ``"cpp"`` or ``"triton"`` to override the default.

    Returns:
        (batch,) int64 ids, or a :class:`SampleOutput` ``(ids, logprobs,
        raw_logprobs)`` with ``return_logprobs=True``.

    Raises:
        ValueError: a row with NaN/+inf (unless ``invalid_as_neg_inf``), a row with
            no finite logit, or a parameter out of range. TypeError: wrong types.
    """
    logits = _check_logits(logits)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    t, k, p, mp = _params(logits, temperature, top_k, top_p, min_p, allow_greedy=True)
    rows = logits.shape[0]
    uniforms = torch.rand(rows, generator=generator, dtype=torch.float64, device=logits.device)
    chosen = select_backend("sample", logits.device, backend)
    if chosen == "torch":
        status = _row_status(logits)
        if invalid_as_neg_inf and bool((status == _BAD_VALUE).any()):
            logits = _sanitize(logits)
            status = _row_status(logits)
        _raise_for(status)
        ids, lp, raw = sample_reference(logits, uniforms, t, k, p, mp)
    else:
        kernel, _ = _fast_kernels(chosen)

        def run(x, sel):
            if sel is None:
                return kernel(x, t, k, p, mp, uniforms, return_logprobs)
            return kernel(x, t[sel], k[sel], p[sel], mp[sel], uniforms[sel], return_logprobs)

        ids, lp, raw = _run_checked(run, logits.contiguous(), invalid_as_neg_inf)
    if return_logprobs:
        return SampleOutput(ids, lp, raw)
    return ids


def top_k_top_p_filter(
    logits: torch.Tensor,
    temperature: float | torch.Tensor = 1.0,
    top_k: int | torch.Tensor = 0,
    top_p: float | torch.Tensor = 1.0,
    min_p: float | torch.Tensor = 0.0,
    *,
    invalid_as_neg_inf: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """The filtered logits that :func:`sample` draws from, as a tensor.

    ``softmax(top_k_top_p_filter(x, t, k, p, m))`` is exactly the distribution
    ``sample(x, t, k, p, m)`` samples from: useful for speculative decoding,
    beam search or inspecting what a setting does.

    Args:
        logits: (batch, vocab) float32/bfloat16/float16 scores.
        temperature: > 0 (greedy has no distribution to return).
        top_k, top_p, min_p: as in :func:`sample` (numbers or (batch,) tensors).
        invalid_as_neg_inf, backend: as in :func:`sample`.

    Returns:
        (batch, vocab) float32 ``logits / temperature`` with filtered tokens -inf.
    """
    logits = _check_logits(logits)
    t, k, p, mp = _params(logits, temperature, top_k, top_p, min_p, allow_greedy=False)
    chosen = select_backend("top_k_top_p_filter", logits.device, backend)
    if chosen == "torch":
        status = _row_status(logits)
        if invalid_as_neg_inf and bool((status == _BAD_VALUE).any()):
            logits = _sanitize(logits)
            status = _row_status(logits)
        _raise_for(status)
        return top_k_top_p_filter_reference(logits, t, k, p, mp)
    _, kernel = _fast_kernels(chosen)

    def run(x, sel):
        if sel is None:
            return kernel(x, t, k, p, mp)
        return kernel(x, t[sel], k[sel], p[sel], mp[sel])

    (out,) = _run_checked(run, logits.contiguous(), invalid_as_neg_inf)
    return out


def repetition_penalty(
    logits: torch.Tensor, prev_ids: torch.Tensor, penalty: float | torch.Tensor
) -> torch.Tensor:
    """Make tokens already generated less likely (CTRL / Hugging Face rule).

    For every token id in ``prev_ids[b]`` the logit is divided by ``penalty`` if
    positive and multiplied by it if negative (so ``penalty > 1`` always lowers
    its probability; 1 is off). Repeats count once. Negative ids are padding and
    ignored, so ragged histories can share one tensor. Apply it before
    :func:`sample`. Costs O(batch * length), not O(batch * vocab).

    Args:
        logits: (batch, vocab) float32/bfloat16/float16.
        prev_ids: (batch, length) integer token ids (< vocab; negative = padding).
        penalty: > 0, a number or a (batch,) tensor.

    Returns:
        A new (batch, vocab) tensor of ``logits``' dtype.
    """
    logits = _check_logits(logits)
    check_tensor(
        prev_ids,
        "prev_ids",
        ndim=2,
        dtypes=(torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8),
    )
    rows, vocab = logits.shape
    if prev_ids.shape[0] != rows:
        raise ValueError(f"prev_ids has {prev_ids.shape[0]} rows but logits has {rows}")
    if prev_ids.device != logits.device:
        raise ValueError(f"prev_ids is on {prev_ids.device} but logits on {logits.device}")
    pen = _row_param(
        penalty,
        "penalty",
        rows,
        logits.device,
        integer=False,
        low=0.0,
        high=float("inf"),
        low_open=True,
    )
    if not bool(torch.isfinite(pen).all()):
        raise ValueError("penalty must be finite")
    ids = prev_ids.long()
    if ids.numel() and int(ids.max()) >= vocab:
        raise ValueError(f"prev_ids holds id {int(ids.max())} >= vocab size {vocab}")
    out = logits.clone()
    if ids.numel() == 0:
        return out
    valid = ids >= 0
    # point padding slots at a real id of the same row (or 0 when there is none)
    # so every write to one position carries the same value: no write races
    first_valid = torch.where(valid, ids, -1).amax(1, keepdim=True).clamp(min=0)
    idx = torch.where(valid, ids, first_valid)
    picked = logits.gather(1, idx).float()
    pen_row = pen[:, None]
    penalized = torch.where(picked < 0, picked * pen_row, picked / pen_row)
    has_any = valid.any(1, keepdim=True)
    out.scatter_(1, idx, torch.where(has_any, penalized, picked).to(logits.dtype))
    return out


if cpp_available():
    # Shapes of the C++ ops for torch.compile / meta tensors (no data is touched).
    @torch.library.register_fake("minigpt::sampling_sample")
    def _sampling_sample_fake(logits, temperature, top_k, top_p, min_p, uniforms, want_logprobs):
        rows = logits.shape[0]
        return (
            logits.new_empty(rows, dtype=torch.int64),
            logits.new_empty(rows, dtype=torch.float32),
            logits.new_empty(rows, dtype=torch.float32),
            logits.new_empty(rows, dtype=torch.int32),
        )

    @torch.library.register_fake("minigpt::sampling_filter")
    def _sampling_filter_fake(logits, temperature, top_k, top_p, min_p):
        return (
            logits.new_empty(logits.shape, dtype=torch.float32),
            logits.new_empty(logits.shape[0], dtype=torch.int32),
        )
