"""A multi-turn conversation that keeps its KV cache between turns.

A chat re-renders the whole conversation every turn (system prompt, all earlier
messages, the new user message) and asks the model to continue it. Running all
of that through the model again costs O(conversation) per turn; but everything
up to the new message is the same as last turn, and its keys/values are still
in the cache from the last reply. :class:`ChatSession` compares the new token
ids with the ones its cache holds, keeps the longest common prefix, and feeds
the model only the rest -- usually just the new user turn. The answer equals a
full re-run (same math on the same tokens; only the float rounding of prefill
in one pass vs token by token can differ, far below what changes a token).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from minigpt.infer.generate import (
    Generation,
    GenerationConfig,
    StreamCallback,
    _finish,
    decode_loop,
    generate,
    prepare_prompts,
)
from minigpt.infer.kv_cache import KVCache

_CHUNK = 256  # the cache grows in steps of this many positions


class ChatSession:
    """Generation with a KV cache that survives between calls.

    Call :meth:`generate` with the full token ids of the conversation each turn;
    only the part that differs from what the cache holds is prefilled.

    Attributes:
        tokens: the ids whose keys/values the cache holds (prompt + reply of the
            last turn, minus the reply's last token, which was never fed back).
        reused: how many prompt tokens the last call took from the cache.

    Example:
        >>> session = ChatSession(model)
        >>> r1 = session.generate(turn1_ids, temperature=0)
        >>> r2 = session.generate(turn1_ids + r1.tokens + turn2_ids, temperature=0)
        >>> session.reused  # == len(turn1_ids) + len(r1.tokens) - 1
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.cache: KVCache | None = None
        self.tokens: list[int] = []
        self.reused = 0

    def reset(self) -> None:
        """Forget the cached conversation (the buffers are kept for reuse)."""
        self.tokens = []
        if self.cache is not None:
            self.cache.reset()

    @torch.no_grad()
    def generate(
        self,
        ids: Sequence[int],
        config: GenerationConfig | None = None,
        *,
        tokenizer=None,
        stream: StreamCallback | None = None,
        **overrides,
    ) -> Generation:
        """Continue the conversation ``ids`` (all of it, as the chat template renders it).

        Same arguments and result as :func:`minigpt.infer.generate` for one prompt.
        Beam search (``num_beams > 1``) runs without the cache (and resets it).
        """
        config = (config or GenerationConfig()).replace(**overrides)
        if config.stop_strings and tokenizer is None:
            raise ValueError("stop_strings need a tokenizer to decode the output")
        if config.num_beams > 1:
            self.reset()
            return generate(self.model, [ids], config, tokenizer=tokenizer, stream=stream)[0]
        ctx = self.model.config.max_seq_len
        prompt = prepare_prompts([ids], ctx, config.truncate)[0]
        budget = min(config.max_new_tokens, ctx - len(prompt))
        if config.max_new_tokens == 0:
            return _finish([], "length", tokenizer, config)
        # reuse the common prefix, but prefill at least one token: its logits start decoding
        n = 0
        limit = min(len(self.tokens), len(prompt) - 1)
        while n < limit and self.tokens[n] == prompt[n]:
            n += 1
        cache = self._cache_for(len(prompt) + budget, keep=n)
        cache.seqlens.fill_(n)
        self.tokens, self.reused = prompt[:n], n
        try:
            device = cache.seqlens.device
            new = torch.tensor([prompt[n:]], dtype=torch.long, device=device)
            hidden = self.model.hidden_states(new, kv_cache=cache)
            logits = self.model.lm_head(hidden[:, -1]).float()
            result = decode_loop(
                self.model, cache, logits, [prompt], [budget], config, tokenizer, stream
            )[0]
        except BaseException:  # e.g. Ctrl-C mid-reply: the cache no longer matches tokens
            self.reset()
            raise
        self.tokens = prompt + result.tokens[:-1]
        return result

    def _cache_for(self, needed: int, keep: int) -> KVCache:
        """A cache of at least ``needed`` positions holding the first ``keep`` cached ones."""
        if self.cache is not None and self.cache.max_len >= needed:
            return self.cache
        ctx = self.model.config.max_seq_len
        size = min(ctx, -(-needed // _CHUNK) * _CHUNK)
        bigger = KVCache.for_model(self.model, 1, size)
        if self.cache is not None and keep:
            for new, old in zip((*bigger.k, *bigger.v), (*self.cache.k, *self.cache.v)):
                new[:, :keep] = old[:, :keep]
        self.cache = bigger
        return bigger
