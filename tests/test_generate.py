"""Generation engine: greedy == step-by-step argmax without a cache, sampling filters,
penalties, stops, streaming, context limits and beam search (against brute force)."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from kernel_testing import ISAS, require_isa

from minigpt.infer import GenerationConfig, filter_logits, generate, repetition_penalty, sample
from minigpt.infer.sampling import sample as fallback_sample
from minigpt.kernels import force_cpu_isa
from minigpt.model import GPT, GPTConfig


def tiny_model(vocab: int = 40, ctx: int = 32, init_std: float = 0.3) -> GPT:
    torch.manual_seed(7)
    cfg = GPTConfig(
        vocab_size=vocab,
        n_layer=2,
        n_head=4,
        n_kv_head=2,
        d_model=32,
        max_seq_len=ctx,
        init_std=init_std,
    )
    return GPT(cfg).eval()


class LetterTokenizer:
    """Token i <-> letter chr(97 + i): enough to test stop strings and text."""

    def decode(self, ids):
        return "".join(chr(97 + i) for i in ids)


@torch.no_grad()
def greedy_without_cache(model, prompt, n):
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt) :]


def test_greedy_batch_matches_uncached_argmax():
    model = tiny_model()
    prompts = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [4]]
    outs = generate(model, prompts, temperature=0, max_new_tokens=8)
    for prompt, out in zip(prompts, outs):
        assert out.tokens == greedy_without_cache(model, prompt, 8)
        assert out.finish_reason == "length"


def test_seed_reproducible_and_top_k_1_is_greedy():
    model = tiny_model()
    kw = dict(temperature=1.5, max_new_tokens=10)
    a = generate(model, [[1, 2]], seed=3, **kw)[0].tokens
    assert a == generate(model, [[1, 2]], seed=3, **kw)[0].tokens
    assert generate(model, [[1, 2]], top_k=1, seed=4, **kw)[0].tokens == greedy_without_cache(
        model, [1, 2], 10
    )


def test_filters_keep_the_right_sets():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    kept = lambda x: torch.isfinite(x)[0].nonzero()[:, 0].tolist()  # noqa: E731
    assert kept(filter_logits(logits, top_k=2)) == [0, 1]
    assert kept(filter_logits(logits, top_p=0.7)) == [0, 1]  # 0.5 + 0.2 reaches 0.7
    assert kept(filter_logits(logits, top_p=0.71)) == [0, 1, 2]
    assert kept(filter_logits(logits, min_p=0.3)) == [0, 1, 2]  # p >= 0.3 * 0.5
    per_row = filter_logits(logits.expand(2, -1), top_k=torch.tensor([1, 3]))
    assert torch.isfinite(per_row).sum(-1).tolist() == [1, 3]


def test_sampling_frequencies_match_filtered_distribution():
    logits = torch.randn(1, 9)
    allowed = filter_logits(logits, temperature=0.7, top_k=6, top_p=0.9)
    g = torch.Generator().manual_seed(0)
    draws = fallback_sample(logits.expand(20000, -1), 0.7, 6, 0.9, 0.0, generator=g)
    counts = torch.bincount(draws, minlength=9).float()
    assert counts[~torch.isfinite(allowed[0])].sum() == 0  # never a masked token
    freq = counts / counts.sum()
    torch.testing.assert_close(freq, allowed.softmax(-1)[0], atol=0.015, rtol=0)
    ids, lp, raw = fallback_sample(logits, 0.0, return_logprobs=True)
    assert ids.item() == logits.argmax().item()
    torch.testing.assert_close(raw, logits.log_softmax(-1)[0, ids])
    with pytest.raises(ValueError, match="NaN"):
        sample(torch.tensor([[0.0, float("nan")]]))


def test_repetition_penalty_rule():
    logits = torch.tensor([[2.0, -1.0, 3.0, 0.5]])
    out = repetition_penalty(logits, torch.tensor([[0, 1, 1, -1]]), 2.0)
    torch.testing.assert_close(out, torch.tensor([[1.0, -2.0, 3.0, 0.5]]))


def test_stop_tokens_stop_strings_and_streaming():
    model = tiny_model()
    free = greedy_without_cache(model, [1, 2, 3], 6)
    streamed = []
    out = generate(
        model,
        [[1, 2, 3]],
        temperature=0,
        max_new_tokens=6,
        stop_tokens=[free[2]],
        stream=lambda row, tok: streamed.append((row, tok)),
        tokenizer=LetterTokenizer(),
    )[0]
    cut = free.index(free[2]) + 1
    assert out.tokens == free[:cut] and out.finish_reason == "stop"
    assert streamed == [(0, t) for t in free[:cut]]
    assert out.text == LetterTokenizer().decode(free[: cut - 1])
    stop = LetterTokenizer().decode(free[1:3])
    out = generate(
        model,
        [[1, 2, 3]],
        temperature=0,
        max_new_tokens=6,
        stop_strings=[stop],
        tokenizer=LetterTokenizer(),
    )[0]
    assert out.finish_reason == "stop" and out.tokens == free[:3]
    assert out.text == LetterTokenizer().decode(free[:1])


def test_context_limits():
    model = tiny_model(ctx=16)
    with pytest.raises(ValueError, match="context"):
        generate(model, [list(range(16))], max_new_tokens=2)
    out = generate(model, [list(range(20))], truncate="left", temperature=0, max_new_tokens=4)
    assert out[0].tokens == greedy_without_cache(model, list(range(5, 20)), 1)
    assert out[0].finish_reason == "context"
    outs = generate(model, [list(range(12)), [1]], temperature=0, max_new_tokens=6)
    assert len(outs[0].tokens) == 4 and outs[0].finish_reason == "context"
    assert outs[1].tokens == greedy_without_cache(model, [1], 6)
    with pytest.raises(ValueError, match="empty"):
        generate(model, [[]])
    with pytest.raises(ValueError, match="top_p"):
        GenerationConfig(top_p=0)


def test_beam_search_finds_the_best_sequence():
    model = tiny_model(vocab=5, init_std=0.6)
    prompt = [1, 2, 3]
    tails = torch.tensor(list(itertools.product(range(5), repeat=3)))  # all 125 endings
    seqs = torch.cat([torch.tensor(prompt).expand(len(tails), -1), tails], dim=1)
    with torch.no_grad():  # one batched forward scores every sequence
        logprobs = model(seqs).log_softmax(-1)[:, 2:5].gather(2, tails[:, :, None])
    scores = logprobs.sum((1, 2))
    best = (scores.max().item(), tuple(tails[scores.argmax()].tolist()))
    # 25 beams = every 2-token prefix, so beam search is exact here
    out = generate(model, [prompt], num_beams=25, max_new_tokens=3)[0]
    assert tuple(out.tokens) == best[1]
    assert out.score == pytest.approx(best[0] / 3, abs=1e-5)
    # one beam is greedy
    greedy = greedy_without_cache(model, prompt, 3)
    assert generate(model, [prompt], num_beams=1, temperature=0, max_new_tokens=3)[0].tokens == (
        greedy
    )


def test_beam_search_stop_tokens_and_early_stopping():
    model = tiny_model(vocab=6, init_std=0.6)
    for early in (True, False):
        out = generate(
            model,
            [[1, 2]],
            num_beams=3,
            max_new_tokens=8,
            stop_tokens=[0, 1],
            early_stopping=early,
        )[0]
        assert out.tokens and out.score is not None
        assert all(t not in (0, 1) for t in out.tokens[:-1])
        if out.finish_reason == "stop":
            assert out.tokens[-1] in (0, 1)


@pytest.mark.parametrize("bias", [False, True])  # all layers in one C++ call / Python loop
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_decode_step_matches_the_model(dtype, bias):
    from minigpt.infer import prefill
    from minigpt.infer.fast_decode import DecodeStep, decoder_for

    model = tiny_model().to(dtype)
    if bias:
        torch.manual_seed(1)
        model = GPT(dataclasses.replace(model.config, bias=True)).eval().to(dtype)
    rows = [[1, 2, 3, 4, 5], [7, 8]]  # different lengths: per-row positions
    slow_cache, _ = prefill(model, rows, 16)
    fast_cache, _ = prefill(model, rows, 16)
    fast = decoder_for(model, fast_cache)
    assert isinstance(fast, DecodeStep) and (fast.in_cpp is None) == bias
    tokens = torch.tensor([11, 12])
    for _ in range(4):
        with torch.no_grad():
            expected = model(tokens[:, None], kv_cache=slow_cache)[:, -1].float()
        got = fast(tokens)
        # same math; the GEMV sums in another order than torch.mm, and bf16 logits
        # are not rounded to bf16 at the end (float_out), hence a bf16-sized tolerance
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got, expected, atol=tol, rtol=tol)
        assert torch.equal(fast_cache.seqlens, slow_cache.seqlens)
        tokens = expected.argmax(-1)
    # GPT-2-style models take the general path (model(...)), with the same interface
    gpt2 = GPT(GPTConfig(vocab_size=40, n_layer=1, n_head=2, d_model=16, norm="layernorm"))
    cache, _ = prefill(gpt2.eval(), [[1, 2]], 8)
    step = decoder_for(gpt2, cache)
    assert not isinstance(step, DecodeStep) and step(torch.tensor([3])).shape == (1, 40)


def test_beam_search_stop_strings():
    model = tiny_model(vocab=6, init_std=0.6)
    tok = LetterTokenizer()
    kw = dict(num_beams=3, max_new_tokens=8, tokenizer=tok)
    # a one-letter stop string is the same as stopping on that letter's token
    by_token = generate(model, [[1, 2]], stop_tokens=[2], **kw)[0]
    by_string = generate(model, [[1, 2]], stop_strings=["c"], **kw)[0]
    assert by_string.tokens == by_token.tokens and by_string.score == by_token.score
    assert by_string.finish_reason == by_token.finish_reason == "stop"
    assert by_string.text == tok.decode(by_string.tokens).split("c")[0]
    # a stop string across tokens: the hypothesis ends where the string ends
    # (length_penalty 0 scores by total log-prob, so the short stopped one wins)
    free = generate(model, [[1, 2]], num_beams=3, max_new_tokens=8)[0].tokens
    stop = tok.decode(free[2:4])
    out = generate(model, [[1, 2]], stop_strings=[stop], length_penalty=0.0, **kw)[0]
    assert out.tokens == free[:4]
    text = tok.decode(out.tokens)
    assert out.finish_reason == "stop" and text.endswith(stop)
    assert stop not in tok.decode(out.tokens[:-1])  # it ended at the first occurrence
    assert out.text == text[: text.index(stop)]
    with pytest.raises(ValueError, match="tokenizer"):
        generate(model, [[1, 2]], num_beams=2, stop_strings=["c"])


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_decode_step_every_isa_and_thread_count(isa, dtype):
    """gemv_decode_step (one C++ call, a thread team) == the op-by-op Python loop."""
    from minigpt.infer import prefill
    from minigpt.infer.fast_decode import DecodeStep

    require_isa(isa)
    torch.manual_seed(3)
    # odd sizes: d_model 40 and head_dim 10 leave partial SIMD vectors everywhere
    cfg = GPTConfig(vocab_size=37, n_layer=2, n_head=4, n_kv_head=2, d_model=40, max_seq_len=24)
    model = GPT(cfg).eval().to(dtype)
    rows = [[1, 2, 3, 4, 5, 6], [7, 8]]
    threads = torch.get_num_threads()
    try:
        with force_cpu_isa(isa):
            for n_threads in (1, 2):
                torch.set_num_threads(n_threads)
                ref_cache, _ = prefill(model, rows, 12)
                cache, _ = prefill(model, rows, 12)
                ref, fused = DecodeStep(model, ref_cache), DecodeStep(model, cache)
                ref.in_cpp = None  # the Python loop over the per-op kernels
                assert fused.in_cpp is not None
                tokens = torch.tensor([11, 12])
                for _ in range(5):
                    expected, got = ref(tokens), fused(tokens)
                    # same roundings; only the float32 summation order differs
                    tol = 1e-5 if dtype == torch.float32 else 2e-2
                    torch.testing.assert_close(got, expected, atol=tol, rtol=tol)
                    for a, b in zip(cache.k + cache.v, ref_cache.k + ref_cache.v):
                        torch.testing.assert_close(a, b, atol=tol, rtol=tol)
                    assert torch.equal(cache.seqlens, ref_cache.seqlens)
                    tokens = expected.argmax(-1)
    finally:
        torch.set_num_threads(threads)
    w, rows = fused.in_cpp, torch.arange(2)
    with pytest.raises(RuntimeError, match="qkv_w"):
        torch.ops.minigpt.gemv_decode_step(
            model.embed.weight[:2].clone(), w[0], [t[:-1] for t in w[1]], *w[2:6], cache.k,
            cache.v, rows, cache.seqlens, rows, fused.cos, fused.sin, w[6], w[7], 4, 2, 10,
            w[8], 0.3,
        )  # fmt: skip
    with pytest.raises(RuntimeError, match="same position"):
        torch.ops.minigpt.gemv_decode_step(
            model.embed.weight[:2].clone(), *w[:6], cache.k, cache.v, torch.zeros(2).long(),
            torch.zeros(2).long(), rows, fused.cos, fused.sin, w[6], w[7], 4, 2, 10, w[8], 0.3,
        )  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_prefill_matches_the_model(dtype, monkeypatch):
    """Short prompts prefilled in one fused call: same logits and cache as model(...)."""
    import importlib

    from minigpt.infer import prefill

    engine = importlib.import_module("minigpt.infer.generate")  # the module, not the function

    model = tiny_model().to(dtype)
    rows = [[1, 2, 3, 4, 5], [7, 8], [9]]
    assert engine.fused_prefill(model, rows, 12) is not None
    cache, logits = prefill(model, rows, 12)
    monkeypatch.setattr(engine, "fused_prefill", lambda *args: None)  # the general path
    ref_cache, ref_logits = prefill(model, rows, 12)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(logits, ref_logits, atol=tol, rtol=tol)
    assert torch.equal(cache.seqlens, ref_cache.seqlens)
    for a, b in zip(cache.k + cache.v, ref_cache.k + ref_cache.v):
        for row, n in enumerate(map(len, rows)):  # past a prompt the general path has padding
            torch.testing.assert_close(a[row, :n], b[row, :n], atol=tol, rtol=tol)
    # the whole generation agrees with the general path's
    monkeypatch.undo()
    fused_out = generate(model, rows, temperature=0, max_new_tokens=6)
    monkeypatch.setattr(engine, "fused_prefill", lambda *args: None)
    assert [g.tokens for g in fused_out] == [
        g.tokens for g in generate(model, rows, temperature=0, max_new_tokens=6)
    ]
    # more than MAX_GEMV_ROWS tokens: not fused
    from minigpt.infer.fast_decode import fused_prefill

    assert fused_prefill(model, [list(range(1, 18))], 20) is None
