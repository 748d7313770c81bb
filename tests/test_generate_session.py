"""ChatSession: a conversation keeps its KV cache across turns and answers exactly
as a full re-run of the conversation would."""

from __future__ import annotations

import pytest
import torch

from minigpt.infer import generate
from minigpt.infer.session import ChatSession
from minigpt.model import GPT, GPTConfig


def tiny_model(ctx: int = 96) -> GPT:
    torch.manual_seed(3)
    cfg = GPTConfig(
        vocab_size=50, n_layer=2, n_head=4, n_kv_head=2, d_model=32, max_seq_len=ctx, init_std=0.3
    )
    return GPT(cfg).eval()


def test_turns_reuse_the_cache_and_match_a_full_rerun():
    model = tiny_model()
    session = ChatSession(model)
    kw = dict(temperature=0, max_new_tokens=6, stop_tokens=[0])
    conversation = [1, 5, 6, 7]
    for turn, user in enumerate(([8, 9], [10, 11, 12], [13])):
        conversation = conversation + user
        got = session.generate(conversation, **kw)
        expected = generate(model, [conversation], **kw)[0]
        assert got.tokens == expected.tokens and got.finish_reason == expected.finish_reason
        if turn:  # all but the new user turn (and the reply's last token) came from the cache
            assert session.reused == len(conversation) - len(user) - 1
        assert session.tokens == conversation + got.tokens[:-1]
        conversation = conversation + got.tokens
    # sampling with a seed is reproducible the same way
    a = session.generate(conversation + [14], temperature=1.0, seed=5, max_new_tokens=5)
    b = generate(model, [conversation + [14]], temperature=1.0, seed=5, max_new_tokens=5)[0]
    assert a.tokens == b.tokens


def test_edited_history_growth_and_context_truncation():
    model = tiny_model(ctx=40)
    session = ChatSession(model)
    kw = dict(temperature=0, max_new_tokens=4)
    first = session.generate([1, 2, 3, 4, 5], **kw)
    # a different history: only the common prefix [1, 2] is reused
    edited = [1, 2, 9, 9, 9]
    assert session.generate(edited, **kw).tokens == generate(model, [edited], **kw)[0].tokens
    assert session.reused == 2
    # the same prompt again: all but its last token come from the cache
    assert session.generate(edited, **kw).tokens == generate(model, [edited], **kw)[0].tokens
    assert session.reused == len(edited) - 1
    # past the context with truncate="left": the kept window starts elsewhere, no reuse
    long = edited + first.tokens + list(range(10, 45))
    got = session.generate(long, truncate="left", **kw)
    assert got.tokens == generate(model, [long], truncate="left", **kw)[0].tokens
    with pytest.raises(ValueError, match="context"):
        session.generate(long, **kw)


def test_interrupted_turn_resets_the_cache():
    model = tiny_model()
    session = ChatSession(model)

    def interrupt(row, token):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        session.generate([1, 2, 3], temperature=0, max_new_tokens=5, stream=interrupt)
    assert session.tokens == []
    kw = dict(temperature=0, max_new_tokens=5)
    assert session.generate([1, 2, 3], **kw).tokens == generate(model, [[1, 2, 3]], **kw)[0].tokens
