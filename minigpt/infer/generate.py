"""The generation engine: prompts in, continuations out, for a batch at once.

One loop serves every decoding strategy:

1. **Prefill**: run all prompts through the model in one batched pass (right-
   padded), filling the KV cache; read each row's logits at its last prompt token.
2. **Decode**: repeatedly pick a token per row (greedy / sampled, after
   penalties and filters), feed just those B tokens through the model with the
   cache, and stop rows that hit a stop token, a stop string, ``max_new_tokens``
   or the end of the context.

Beam search lives in :mod:`minigpt.infer.beam` and shares the prefill.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from minigpt.infer.fast_decode import decoder_for, fused_prefill
from minigpt.infer.kv_cache import KVCache
from minigpt.infer.sampling import _kernel_repetition_penalty, _kernel_sample


@dataclass
class GenerationConfig:
    """Settings of one generation call (all optional; the defaults sample at T=1).

    Attributes:
        max_new_tokens: at most this many new tokens per row.
        temperature: 0 = greedy; otherwise logits are divided by it before sampling.
        top_k / top_p / min_p: filters (0 / 1.0 / 0.0 = off), see
            :mod:`minigpt.infer.sampling`.
        repetition_penalty: > 1 discourages tokens already in the prompt or output.
        stop_tokens: ids that end a row (the id is kept in ``tokens``, not in ``text``).
        stop_strings: strings that end a row once the decoded output contains them
            (needs a tokenizer; ``text`` is cut before the string).
        seed: makes sampling reproducible.
        num_beams: > 1 switches to beam search (deterministic, see ``beam.py``).
        length_penalty: beam search score = sum log p / length ** length_penalty.
        early_stopping: beam search stops as soon as ``num_beams`` hypotheses ended.
        truncate: what to do with a prompt longer than the context: ``"error"``
            (default) or ``"left"`` (drop its oldest tokens).
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    stop_tokens: list[int] = field(default_factory=list)
    stop_strings: list[str] = field(default_factory=list)
    seed: int | None = None
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool = False
    truncate: str = "error"

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0 or not 0 < self.top_p <= 1 or not 0 <= self.min_p <= 1:
            raise ValueError("need top_k >= 0, 0 < top_p <= 1 and 0 <= min_p <= 1")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.truncate not in ("error", "left"):
            raise ValueError(f"truncate must be 'error' or 'left', got {self.truncate!r}")

    def replace(self, **changes) -> GenerationConfig:
        """A copy with some fields changed (unknown names raise TypeError)."""
        return dataclasses.replace(self, **changes)


@dataclass
class Generation:
    """The result for one prompt: new token ids, their text, and why it stopped.

    ``finish_reason`` is ``"stop"`` (stop token or string), ``"length"``
    (max_new_tokens) or ``"context"`` (the model's context is full).
    """

    tokens: list[int]
    text: str | None
    finish_reason: str
    score: float | None = None  # beam search only: the length-normalized log-prob


StreamCallback = Callable[[int, int], None]  # (row, token id), called as tokens appear


def prepare_prompts(
    prompts: Sequence[Sequence[int]] | torch.Tensor, max_seq_len: int, truncate: str
) -> list[list[int]]:
    """Validate prompts (lists of ids or a (B, T) tensor), truncating if asked."""
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() == 1:
            prompts = prompts[None]
        prompts = prompts.tolist()
    rows = [list(map(int, p)) for p in prompts]
    if not rows:
        raise ValueError("no prompts given")
    for i, row in enumerate(rows):
        if not row:
            raise ValueError(f"prompt {i} is empty: start it with at least a BOS token")
        if len(row) >= max_seq_len:
            if truncate != "left":
                raise ValueError(
                    f"prompt {i} has {len(row)} tokens but the model's context is "
                    f"{max_seq_len} (max_seq_len), leaving no room to generate; shorten it "
                    "or pass truncate='left' to keep only its last tokens"
                )
            rows[i] = row[-(max_seq_len - 1) :]
    return rows


@torch.no_grad()
def prefill(
    model: torch.nn.Module, rows: list[list[int]], max_len: int
) -> tuple[KVCache, torch.Tensor]:
    """Run the prompts through ``model`` in one right-padded batch.

    Returns the filled cache (``seqlens`` = each prompt's length) and the (B, V)
    float32 logits at each prompt's last token. Padding positions write garbage
    keys/values past a row's length, but decoding overwrites them before any query
    may see them (a query only attends to positions <= its own).
    Short prompts of a Llama-style model on the CPU skip the padding: all their
    tokens go through one fused call (:func:`minigpt.infer.fast_decode.fused_prefill`).
    """
    fused = fused_prefill(model, rows, max_len)
    if fused is not None:
        return fused
    device = next(model.parameters()).device
    lengths = torch.tensor([len(r) for r in rows], device=device)
    padded = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        padded[i, : len(r)] = torch.tensor(r)
    cache = KVCache.for_model(model, len(rows), max_len)
    hidden = model.hidden_states(padded, kv_cache=cache)
    cache.seqlens.copy_(lengths)
    last = hidden[torch.arange(len(rows), device=device), lengths - 1]
    return cache, model.lm_head(last).float()


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]] | torch.Tensor,
    config: GenerationConfig | None = None,
    *,
    tokenizer=None,
    stream: StreamCallback | None = None,
    **overrides,
) -> list[Generation]:
    """Continue each prompt with the model; one :class:`Generation` per prompt.

    Args:
        model: a :class:`minigpt.model.GPT` (put it in eval mode).
        prompts: token-id lists (different lengths are fine) or a (B, T) tensor.
        config: a :class:`GenerationConfig`; keyword ``overrides`` change its fields,
            e.g. ``generate(model, [ids], temperature=0, max_new_tokens=20)``.
        tokenizer: optional, to fill ``Generation.text`` and match stop strings.
        stream: optional ``callback(row, token_id)`` called for every new token as it
            is chosen (beam search: for the winning tokens, once the search ends).
    """
    config = (config or GenerationConfig()).replace(**overrides)
    if config.stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer to decode the output")
    if config.num_beams > 1:
        from minigpt.infer.beam import beam_search

        results = [
            beam_search(model, p, config, tokenizer=tokenizer)
            for p in prepare_prompts(prompts, model.config.max_seq_len, config.truncate)
        ]
        for row, result in enumerate(results):  # beams only settle at the end
            for token in result.tokens if stream is not None else ():
                stream(row, token)
        return results
    ctx = model.config.max_seq_len
    rows = prepare_prompts(prompts, ctx, config.truncate)
    budget = [min(config.max_new_tokens, ctx - len(r)) for r in rows]  # tokens row may add
    if config.max_new_tokens == 0:
        return [_finish([], "length", tokenizer, config) for _ in rows]
    cache, logits = prefill(model, rows, max(len(r) + b for r, b in zip(rows, budget)))
    return decode_loop(model, cache, logits, rows, budget, config, tokenizer, stream)


@torch.no_grad()
def decode_loop(
    model: torch.nn.Module,
    cache: KVCache,
    logits: torch.Tensor,
    rows: list[list[int]],
    budget: list[int],
    config: GenerationConfig,
    tokenizer=None,
    stream: StreamCallback | None = None,
) -> list[Generation]:
    """The decode half of :func:`generate`, after the prompts are in ``cache``.

    ``logits`` (B, V) are the next-token logits of each row's last prompt token,
    ``rows`` the prompts (for the repetition penalty), ``budget[b]`` the most
    tokens row b may add. On return the cache holds every row's prompt and its
    new tokens except the last one (which was never fed back to the model).
    """
    B = len(rows)
    out: list[list[int]] = [[] for _ in rows]
    reasons: list[str | None] = [None] * B
    device = logits.device
    generator = None
    if config.seed is not None:
        generator = torch.Generator(device=device).manual_seed(config.seed)
    history = None  # (B, L) ids seen so far, -1 padded: only for the repetition penalty
    if config.repetition_penalty != 1.0:
        width = max(len(r) for r in rows)
        history = torch.full((B, width), -1, dtype=torch.long, device=device)
        for i, r in enumerate(rows):
            history[i, : len(r)] = torch.tensor(r)
    sample, penalize = _kernel_sample(), _kernel_repetition_penalty()
    decode = decoder_for(model, cache)
    stop_tokens = set(config.stop_tokens)
    while True:
        if history is not None:
            logits = penalize(logits, history, config.repetition_penalty)
        next_ids = sample(
            logits, config.temperature, config.top_k, config.top_p, config.min_p, generator
        )
        for b, token in enumerate(next_ids.tolist()):
            if reasons[b] is not None:
                continue
            out[b].append(token)
            if stream is not None:
                stream(b, token)
            reasons[b] = _stop_reason(out[b], token, budget[b], config, stop_tokens, tokenizer)
            if reasons[b] == "length" and budget[b] < config.max_new_tokens:
                reasons[b] = "context"
        if all(r is not None for r in reasons):
            break
        if history is not None:
            history = torch.cat([history, next_ids[:, None]], dim=1)
        done = torch.tensor([r is not None for r in reasons], device=device)
        logits = decode(next_ids)
        cache.seqlens -= done.long()  # finished rows stay put (their slot gets reused)
    return [_finish(o, r, tokenizer, config) for o, r in zip(out, reasons)]


def _stop_reason(tokens, token, budget, config, stop_tokens, tokenizer) -> str | None:
    if token in stop_tokens:
        return "stop"
    if _hits_stop_string(tokens, config, tokenizer):
        return "stop"
    if len(tokens) >= budget:
        return "length"
    return None


def _hits_stop_string(tokens: list[int], config: GenerationConfig, tokenizer) -> bool:
    """Whether the decoded end of ``tokens`` contains one of the stop strings."""
    if not config.stop_strings:
        return False
    tail = tokenizer.decode(tokens[-64:])  # a new stop string ends within the last tokens
    return any(s in tail for s in config.stop_strings)


def _finish(tokens: list[int], reason: str, tokenizer, config: GenerationConfig) -> Generation:
    text = None
    if tokenizer is not None:
        body = tokens[:-1] if tokens and tokens[-1] in config.stop_tokens else tokens
        text = tokenizer.decode(body)
        cuts = [text.find(s) for s in config.stop_strings if s in text]
        if cuts:
            text = text[: min(cuts)]
    return Generation(tokens=tokens, text=text, finish_reason=reason)
