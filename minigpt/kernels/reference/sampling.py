"""Reference token sampling: temperature, top-k, top-p, min-p and repetition penalty.

This is the specification of :func:`minigpt.kernels.sample` and friends, written
the way Hugging Face's logits warpers are: sort the row, take a cumulative sum,
mask, softmax, draw. It is clear and slow (a full sort of every row); the fast
kernels compute exactly the same kept set with thresholds instead of a sort.

Filtering order (the same as ``transformers``' warpers), per row, on float32::

    z = logits / temperature                     temperature scaling
    keep z >= (k-th largest z)                   top-k   (ties at the k-th value kept)
    keep tokens whose probability mass ranked    top-p   (nucleus, on the top-k set
        strictly above them is < top_p                    renormalized)
    keep p >= min_p * max(p)                     min-p
    draw from softmax(z) over the kept tokens

Every filter keeps "all tokens at least this large", so ties are always kept or
dropped together, and the largest logit always survives. The draw is inverse-CDF
sampling with one uniform number ``u`` in [0, 1) per row: the token picked is the
first (in vocabulary order) whose cumulative probability exceeds ``u``. The fast
backends use the same rule with the same ``u``, so they usually pick the very
same ids (they may differ only where rounding puts ``u`` on a boundary).
"""

from __future__ import annotations

import torch


def _per_row(value: float | int | torch.Tensor, rows: int, dtype: torch.dtype) -> torch.Tensor:
    """A scalar or (rows,) tensor as a (rows,) tensor of ``dtype`` on the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", dtype).reshape(-1).expand(rows)
    return torch.full((rows,), value, dtype=dtype)


def top_k_top_p_filter_reference(
    logits: torch.Tensor,
    temperature: float | torch.Tensor = 1.0,
    top_k: int | torch.Tensor = 0,
    top_p: float | torch.Tensor = 1.0,
    min_p: float | torch.Tensor = 0.0,
) -> torch.Tensor:
    """Temperature-scaled logits with every filtered-out token set to -inf.

    Args:
        logits: (batch, vocab) scores; NaN/+inf must already be removed.
        temperature: > 0, scalar or (batch,). top_k: >= 0 (0 = off).
        top_p: in (0, 1] (1 = off). min_p: in [0, 1] (0 = off).

    Returns:
        (batch, vocab) float32 tensor ``logits / temperature`` with removed tokens -inf.
    """
    rows, vocab = logits.shape
    dev = logits.device
    t = _per_row(temperature, rows, torch.float32).to(dev)
    k = _per_row(top_k, rows, torch.int64).clamp(0, vocab).to(dev)
    p = _per_row(top_p, rows, torch.float32).to(dev)
    mp = _per_row(min_p, rows, torch.float32).to(dev)
    z = logits.float() / t[:, None]
    neg_inf = torch.tensor(float("-inf"), device=dev)

    # top-k: keep everything at least as large as the k-th largest value
    sorted_z, _ = torch.sort(z, dim=-1, descending=True)
    kth = sorted_z.gather(1, (k - 1).clamp(min=0)[:, None])
    z = torch.where((k[:, None] > 0) & (z < kth), neg_inf, z)

    # top-p on the renormalized top-k distribution: a token is kept when the
    # probability mass of the tokens ranked strictly above it is below top_p
    # (masses in float64, so the reference itself adds no rounding error)
    sorted_z, _ = torch.sort(z, dim=-1, descending=True)
    sorted_p = torch.softmax(sorted_z.double(), dim=-1)
    mass_above = torch.cumsum(sorted_p, dim=-1) - sorted_p
    kept_sorted = mass_above < p[:, None]
    kept_sorted[:, 0] = True  # the largest token always survives
    threshold = torch.where(kept_sorted, sorted_z, torch.inf).amin(-1, keepdim=True)
    z = torch.where((p[:, None] < 1.0) & (z < threshold), neg_inf, z)

    # min-p: drop tokens less likely than min_p times the most likely one
    probs = torch.softmax(z.double(), dim=-1)
    floor = mp[:, None] * probs.amax(-1, keepdim=True)
    z = torch.where((mp[:, None] > 0) & (probs < floor), neg_inf, z)
    return z


def sample_reference(
    logits: torch.Tensor,
    uniforms: torch.Tensor,
    temperature: float | torch.Tensor = 1.0,
    top_k: int | torch.Tensor = 0,
    top_p: float | torch.Tensor = 1.0,
    min_p: float | torch.Tensor = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample one token per row with the given uniforms; the spec of ``sample``.

    Args:
        logits: (batch, vocab) finite-or-(-inf) scores, any float dtype.
        uniforms: (batch,) numbers in [0, 1), one per row (float64 is best).
        temperature: >= 0, scalar or (batch,); 0 means greedy (argmax).
        top_k, top_p, min_p: as in :func:`top_k_top_p_filter_reference`.

    Returns:
        ``(ids, logprobs, raw_logprobs)``: (batch,) int64 token ids; float32
        log-probability of each id under the filtered distribution (0 for greedy
        rows: a point mass) and under the raw temperature-1 softmax of the logits.
    """
    rows, vocab = logits.shape
    dev = logits.device
    t = _per_row(temperature, rows, torch.float32).to(dev)
    greedy = t == 0
    z = top_k_top_p_filter_reference(logits, torch.where(greedy, 1.0, t), top_k, top_p, min_p)
    probs = torch.softmax(z.double(), dim=-1)
    cdf = torch.cumsum(probs, dim=-1)
    target = uniforms.to(dev, torch.float64)[:, None] * cdf[:, -1:]
    ids = torch.searchsorted(cdf, target, right=True).squeeze(1)
    # rounding can push the target to the very end: take the last kept token then
    last_kept = vocab - 1 - torch.argmax((probs > 0).flip(-1).int(), dim=-1)
    ids = torch.minimum(ids, last_kept)
    ids = torch.where(greedy, torch.argmax(logits.float(), dim=-1), ids)
    logprobs = torch.log_softmax(z, dim=-1).gather(1, ids[:, None]).squeeze(1)
    logprobs = torch.where(greedy, 0.0, logprobs)
    raw = torch.log_softmax(logits.float(), dim=-1).gather(1, ids[:, None]).squeeze(1)
    return ids, logprobs, raw


def repetition_penalty_reference(
    logits: torch.Tensor, prev_ids: torch.Tensor, penalty: float | torch.Tensor
) -> torch.Tensor:
    """CTRL-style repetition penalty (as in ``transformers``), out of place.

    Every token id that appears in ``prev_ids[b]`` has its logit divided by
    ``penalty`` if positive and multiplied by it if negative, so with
    ``penalty > 1`` repeated tokens always become less likely. A token is
    penalized once however often it repeats; negative ids are padding, ignored.

    Args:
        logits: (batch, vocab). prev_ids: (batch, length) int64. penalty: > 0,
        scalar or (batch,).

    Returns:
        (batch, vocab) tensor of ``logits``' dtype.
    """
    rows = logits.shape[0]
    pen = _per_row(penalty, rows, torch.float32).to(logits.device)[:, None]
    out = logits.float()
    valid = prev_ids >= 0
    # count occurrences with scatter_add (deterministic with repeated ids)
    seen = torch.zeros(out.shape, dtype=torch.int32, device=out.device)
    seen.scatter_add_(1, torch.where(valid, prev_ids, 0), valid.int())
    penalized = torch.where(out < 0, out * pen, out / pen)
    out = torch.where(seen > 0, penalized, out)
    return out.to(logits.dtype)
