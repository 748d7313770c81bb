"""Choosing the next token from logits: filters, penalties and the draw.

``sample`` here is the plain-torch stand-in with the signature of the fused
``minigpt.kernels.sample`` op; the generation engine uses the kernel when it
exists (see ``_kernel_sample`` at the bottom) and this function otherwise.

The filters run in Hugging Face's order -- temperature, top-k, top-p, min-p --
each removing tokens (setting their logit to -inf) from the distribution:

* temperature T: logits / T. T < 1 sharpens, T > 1 flattens, T = 0 means greedy.
* top-k k: keep the k most likely tokens.
* top-p p (nucleus): keep the smallest set of most likely tokens whose total
  probability reaches p.
* min-p m: keep tokens whose probability is at least m times the top token's.
"""

from __future__ import annotations

import torch

Param = float | int | torch.Tensor


def _per_row(value: Param, batch: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A scalar or (B,) tensor as a (B, 1) tensor."""
    t = torch.as_tensor(value, dtype=dtype, device=device)
    if t.dim() == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"per-row sampling parameters must have shape ({batch},), got {t.shape}")
    return t[:, None]


def repetition_penalty(
    logits: torch.Tensor, prev_ids: torch.Tensor, penalty: float
) -> torch.Tensor:
    """Discourage tokens already present in ``prev_ids`` (CTRL / Hugging Face rule).

    A seen token's logit is divided by ``penalty`` when positive and multiplied by
    it when negative, so ``penalty > 1`` always lowers its probability.

    Args:
        logits: (B, V) float logits (not modified).
        prev_ids: (B, L) int token ids; entries < 0 are padding and ignored.
        penalty: 1.0 means off.
    """
    if penalty <= 0:
        raise ValueError(f"repetition penalty must be positive, got {penalty}")
    if penalty == 1.0 or prev_ids.numel() == 0:
        return logits
    # count occurrences per vocab entry (padding adds 0), then penalize the seen ones
    counts = torch.zeros_like(logits, dtype=torch.float32)
    counts.scatter_add_(1, prev_ids.clamp_min(0), (prev_ids >= 0).to(torch.float32))
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(counts > 0, penalized, logits)


def filter_logits(
    logits: torch.Tensor,
    temperature: Param = 1.0,
    top_k: Param = 0,
    top_p: Param = 1.0,
    min_p: Param = 0.0,
) -> torch.Tensor:
    """The float32 logits after temperature, top-k, top-p and min-p (removed = -inf).

    Rows with temperature 0 are left unscaled (the caller takes their argmax).
    """
    B, V = logits.shape
    x = logits.float()
    temp = _per_row(temperature, B, torch.float32, x.device)
    x = x / torch.where(temp > 0, temp, torch.ones_like(temp))
    k = _per_row(top_k, B, torch.long, x.device)
    p = _per_row(top_p, B, torch.float32, x.device)
    m = _per_row(min_p, B, torch.float32, x.device)
    neg_inf = torch.tensor(float("-inf"), device=x.device)
    if bool((k > 0).any()):
        kk = torch.where(k > 0, k.clamp_max(V), torch.full_like(k, V))
        kth = torch.sort(x, dim=-1, descending=True).values.gather(1, kk - 1)
        x = torch.where(x < kth, neg_inf, x)
    if bool((p < 1).any()):
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        probs = sorted_x.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass of strictly more likely tokens
        drop_sorted = before >= p  # the token that crosses p is kept
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        x = torch.where(drop, neg_inf, x)
    if bool((m > 0).any()):
        probs = x.softmax(-1)
        x = torch.where(probs < m * probs.max(-1, keepdim=True).values, neg_inf, x)
    return x


def sample(
    logits: torch.Tensor,
    temperature: Param = 1.0,
    top_k: Param = 0,
    top_p: Param = 1.0,
    min_p: Param = 0.0,
    generator: torch.Generator | None = None,
    return_logprobs: bool = False,
):
    """Draw one token per row of (B, V) logits after the filters above.

    Every parameter is a scalar or a (B,) tensor. Temperature 0 is greedy
    (argmax); top_k 0 / top_p 1 / min_p 0 switch that filter off.

    Returns:
        (B,) int64 ids, or ``(ids, logprobs, raw_logprobs)`` with
        ``return_logprobs=True``: the log-probability of each id under the
        filtered distribution and under the raw softmax of ``logits``.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be (batch, vocab), got shape {tuple(logits.shape)}")
    if not torch.isfinite(logits).logical_or(logits == float("-inf")).all():
        raise ValueError("logits contain NaN or +inf")
    B = logits.shape[0]
    x = filter_logits(logits, temperature, top_k, top_p, min_p)
    if bool(torch.isinf(x).all(-1).any()):
        raise ValueError("a row of logits is entirely -inf: nothing can be sampled")
    probs = x.softmax(-1)
    drawn = torch.multinomial(probs, 1, generator=generator)[:, 0]
    greedy = _per_row(temperature, B, torch.float32, logits.device)[:, 0] <= 0
    ids = torch.where(greedy, logits.argmax(-1), drawn)
    if not return_logprobs:
        return ids
    logprobs = x.log_softmax(-1).gather(1, ids[:, None])[:, 0]
    logprobs = torch.where(greedy, torch.zeros_like(logprobs), logprobs)
    raw = logits.float().log_softmax(-1).gather(1, ids[:, None])[:, 0]
    return ids, logprobs, raw


def _kernel_sample():
    """The fused sampling op when it exists, else this module's :func:`sample`."""
    try:
        from minigpt.kernels import sample as fused
    except ImportError:
        return sample
    return fused


def _kernel_repetition_penalty():
    """The fused repetition penalty when it exists, else this module's version."""
    try:
        from minigpt.kernels import repetition_penalty as fused
    except ImportError:
        return repetition_penalty
    return fused
