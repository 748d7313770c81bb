"""Sampling (temperature / top-k / top-p / min-p) and repetition penalty vs the reference.

Sampling is random, so besides exact checks (greedy, filtered logits, log-probs)
it is tested statistically: many draws from one row (the row repeated B times in
one call, each copy with its own uniform) must never leave the reference's kept
set and must land on each token about as often as its reference probability.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kernel_testing import ISAS, require_isa

from minigpt.kernels import force_cpu_isa, repetition_penalty, sample, top_k_top_p_filter
from minigpt.kernels.reference.sampling import (
    repetition_penalty_reference,
    sample_reference,
    top_k_top_p_filter_reference,
)

# (temperature, top_k, top_p, min_p): the setting, each filter alone, mixes
SETTINGS = [
    (0.8, 50, 0.9, 0.0),
    (1.0, 0, 0.9, 0.0),
    (1.0, 20, 1.0, 0.0),
    (0.7, 0, 1.0, 0.05),
    (1.3, 0, 1.0, 0.0),
    (0.5, 5, 0.6, 0.1),
]


def _logits(rows: int, vocab: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    """LLM-like scores: a broad spread plus a few clearly preferred tokens."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, vocab, generator=g) * 2.0
    top = torch.randint(0, vocab, (rows, min(8, vocab)), generator=g)
    x.scatter_add_(1, top, torch.rand(rows, top.shape[1], generator=g) * 6.0)
    return x.to(dtype)


def _draw(x, setting, backend, seed=1, **kw):
    t, k, p, mp = setting
    g = torch.Generator().manual_seed(seed)
    return sample(x, t, k, p, mp, generator=g, return_logprobs=True, backend=backend, **kw)


def _ref(x, setting, seed=1):
    t, k, p, mp = setting
    u = torch.rand(x.shape[0], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return sample_reference(x, u, t, k, p, mp)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab", [1, 7, 111, 4099])
def test_filter_matches_reference(isa, dtype, vocab):
    require_isa(isa)
    x = _logits(6, vocab, dtype)
    for setting in SETTINGS:
        with force_cpu_isa(isa):
            got = top_k_top_p_filter(x, *setting, backend="cpp")
        want = top_k_top_p_filter_reference(x, *setting)
        assert got.dtype == torch.float32
        assert torch.equal(torch.isinf(got), torch.isinf(want)), setting
        torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("vocab", [1, 7, 111, 3001])
def test_sample_matches_reference_same_uniforms(isa, vocab):
    # Same uniforms and the same inverse-CDF rule: the very same ids, except where
    # rounding puts u within ~1e-7 of a boundary (never at this size in practice).
    require_isa(isa)
    x = _logits(64, vocab)
    for setting in SETTINGS:
        with force_cpu_isa(isa):
            got = _draw(x, setting, "cpp")
        ids, lp, raw = _ref(x, setting)
        assert torch.equal(got.ids, ids), setting
        # float32 log-softmax of O(10) logits: a few ulp of 10
        torch.testing.assert_close(got.logprobs, lp, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.raw_logprobs, raw, atol=1e-5, rtol=1e-5)


def _many_draws(x_row: torch.Tensor, setting, backend: str, draws: int, chunk: int):
    """ids of `draws` samples of one row (the row repeated `chunk` times per call)."""
    g = torch.Generator().manual_seed(7)
    block = x_row.expand(chunk, -1).contiguous()
    t, k, p, mp = setting
    out = [sample(block, t, k, p, mp, generator=g, backend=backend) for _ in range(draws // chunk)]
    return torch.cat(out)


@pytest.mark.parametrize(
    "vocab, setting",
    [(111, s) for s in SETTINGS]
    + [(32000, SETTINGS[0]), (32000, SETTINGS[1]), (32000, SETTINGS[3])]
    + [(128256, SETTINGS[0]), (128256, SETTINGS[5])],
)
def test_masking_exact_and_frequencies_match(vocab, setting):
    x = _logits(1, vocab, seed=vocab)[0]
    # (fewer draws for big vocabs: the chi-square pools rare tokens, 8192 is plenty)
    draws, chunk = (16384, 4096) if vocab < 1000 else (8192, 2048 if vocab < 100_000 else 256)
    ids = _many_draws(x, setting, "cpp", draws=draws, chunk=chunk)
    filtered = top_k_top_p_filter_reference(x[None], *setting)[0]
    allowed = ~torch.isinf(filtered)
    # masking is exact: never a token outside the reference's kept set
    assert bool(allowed[ids].all()), f"sampled a filtered-out token: {ids[~allowed[ids]][:5]}"
    probs = torch.softmax(filtered.double(), -1)
    n = ids.numel()
    counts = torch.bincount(ids, minlength=vocab).double()
    # Pearson chi-square over the tokens expected >= 5 times, the rest pooled in
    # one bin; fail beyond mean + 7 standard deviations (false alarm < 1e-6)
    expected = probs * n
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    chi2 = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    dof = max(int(keep.sum()) - 1, 1)
    assert chi2 < dof + 7 * math.sqrt(2 * dof) + 10, (chi2, dof)
    # and no likely token (expected >= 20 times, where the normal approximation
    # holds) is off by more than 6 binomial standard deviations
    freq = counts / n
    sd = (probs * (1 - probs) / n).sqrt()
    likely = expected >= 20
    assert bool(((freq - probs).abs()[likely] <= 6 * sd[likely]).all())


def test_greedy_is_argmax_exactly():
    # bf16 logits have many exact ties: the first maximal index must win
    x = (torch.randn(37, 1001) * 2).to(torch.bfloat16)
    x[3] = 0.5  # a row made only of ties
    for isa in ISAS:
        with force_cpu_isa(isa):
            assert torch.equal(sample(x, 0.0, backend="cpp"), torch.argmax(x.float(), -1))
    assert torch.equal(sample(x, 0.0, 7, 0.5, backend="torch"), torch.argmax(x.float(), -1))
    out = sample(x.float(), 0.0, return_logprobs=True, backend="cpp")
    assert torch.equal(out.logprobs, torch.zeros(37))
    raw = torch.log_softmax(x.float(), -1).gather(1, out.ids[:, None])[:, 0]
    torch.testing.assert_close(out.raw_logprobs, raw)


def test_per_row_parameters():
    x = _logits(6, 300)
    t = torch.tensor([0.0, 0.5, 1.0, 1.5, 0.8, 1.0])
    k = torch.tensor([0, 3, 0, 40, 50, 1])
    p = torch.tensor([1.0, 0.9, 0.5, 1.0, 0.9, 1.0])
    mp = torch.tensor([0.0, 0.0, 0.2, 0.01, 0.0, 0.0])
    g = torch.Generator().manual_seed(3)
    got = sample(x, t, k, p, mp, generator=g, return_logprobs=True, backend="cpp")
    u = torch.rand(6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ids, lp, raw = sample_reference(x, u, t, k, p, mp)
    assert torch.equal(got.ids, ids)
    assert got.ids[0] == torch.argmax(x[0]) and got.ids[5] == torch.argmax(x[5])
    torch.testing.assert_close(got.logprobs, lp, atol=1e-5, rtol=1e-5)
    # each row filtered exactly as if sampled alone with scalar settings
    f = top_k_top_p_filter(x, t.clamp(min=0.1), k, p, mp, backend="cpp")
    for r in range(6):
        alone = top_k_top_p_filter(
            x[r : r + 1], max(float(t[r]), 0.1), int(k[r]), float(p[r]), float(mp[r])
        )
        assert torch.equal(f[r : r + 1], alone)


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_bad_rows(backend):
    x = _logits(3, 50)
    nan_row, inf_row = x.clone(), x.clone()
    nan_row[2, 7] = float("nan")
    inf_row[1, 3] = float("inf")
    for bad in (nan_row, inf_row):
        with pytest.raises(ValueError, match="NaN or \\+inf"):
            sample(bad, backend=backend)
        with pytest.raises(ValueError, match="NaN or \\+inf"):
            top_k_top_p_filter(bad, backend=backend)
        # with the flag they count as -inf: same draw as on the cleaned logits
        clean = bad.nan_to_num(nan=float("-inf"), posinf=float("-inf"))
        got = _draw(bad, SETTINGS[0], backend, invalid_as_neg_inf=True)
        want = _draw(clean, SETTINGS[0], backend)
        assert torch.equal(got.ids, want.ids)
        torch.testing.assert_close(got.logprobs, want.logprobs)
    dead = x.clone()
    dead[0] = float("-inf")
    with pytest.raises(ValueError, match="no finite"):
        sample(dead, backend=backend)
    dead[0] = float("nan")
    with pytest.raises(ValueError, match="no finite"):
        sample(dead, invalid_as_neg_inf=True, backend=backend)
    # a partly -inf row is fine: masked tokens are never drawn
    masked = x.clone()
    masked[:, 10:] = float("-inf")
    ids = sample(masked[:1].expand(8, -1).contiguous(), backend=backend)
    assert bool((ids < 10).all())


def test_reproducible_with_seed():
    x = _logits(32, 32000)
    a = _draw(x, SETTINGS[1], "cpp", seed=11).ids
    b = _draw(x, SETTINGS[1], "cpp", seed=11).ids
    c = _draw(x, SETTINGS[1], "cpp", seed=12).ids
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_large_vocab_and_batch():
    x = _logits(2, 262144)  # vocab up to 256k
    for setting in (SETTINGS[0], SETTINGS[1]):
        got = _draw(x, setting, "cpp")
        allowed = ~torch.isinf(top_k_top_p_filter_reference(x, *setting))
        assert bool(allowed.gather(1, got.ids[:, None]).all())
    x = _logits(256, 997)  # batch 256, a prime vocab
    got = _draw(x, SETTINGS[0], "cpp")
    assert torch.equal(got.ids, _ref(x, SETTINGS[0])[0])


def test_flat_and_tied_rows():
    # every token equal: top-k keeps all ties, top-p keeps the whole row
    x = torch.zeros(3, 500)
    f = top_k_top_p_filter(x, 1.0, 5, 0.5, backend="cpp")
    assert not bool(torch.isinf(f).any())
    # a very flat row: the nucleus is most of the vocabulary (slow path)
    y = torch.randn(4, 20000) * 0.01
    for setting in ((1.0, 0, 0.99, 0.0), (1.0, 15000, 0.95, 0.0)):
        got = top_k_top_p_filter(y, *setting, backend="cpp")
        want = top_k_top_p_filter_reference(y, *setting)
        assert torch.equal(torch.isinf(got), torch.isinf(want))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_repetition_penalty(dtype):
    x = _logits(5, 40, dtype)
    prev = torch.randint(0, 40, (5, 12))
    prev[1, 4:] = -1  # ragged history: padding
    prev[2] = -1  # no history at all
    prev[3, :] = 0  # the same token over and over (and token 0)
    pen = torch.tensor([1.2, 1.5, 2.0, 0.8, 1.0])
    for p in (1.3, pen):
        got = repetition_penalty(x, prev, p)
        assert got.dtype == dtype
        assert torch.equal(got, repetition_penalty_reference(x, prev, p))
    assert torch.equal(repetition_penalty(x, prev, 1.0), x)
    assert torch.equal(repetition_penalty(x, prev[:, :0], 1.3), x)


@pytest.mark.parametrize(
    "kwargs, err",
    [
        ({"temperature": -1.0}, ValueError),
        ({"temperature": float("nan")}, ValueError),
        ({"top_k": -1}, ValueError),
        ({"top_k": 2.5}, TypeError),
        ({"top_p": 0.0}, ValueError),
        ({"top_p": 1.5}, ValueError),
        ({"min_p": -0.1}, ValueError),
        ({"temperature": torch.ones(3)}, ValueError),
        ({"top_k": torch.ones(4)}, TypeError),
        ({"temperature": "hot"}, TypeError),
        ({"generator": 5}, TypeError),
    ],
)
def test_bad_parameters(kwargs, err):
    with pytest.raises(err):
        sample(torch.randn(4, 10), **kwargs)


def test_bad_logits_and_ids():
    with pytest.raises(ValueError):
        sample(torch.randn(10))
    with pytest.raises(ValueError):
        sample(torch.randn(3, 0))
    with pytest.raises(TypeError):
        sample(torch.randn(3, 5).int())
    with pytest.raises(ValueError):
        top_k_top_p_filter(torch.randn(3, 5), temperature=0.0)
    with pytest.raises(ValueError):
        repetition_penalty(torch.randn(3, 5), torch.tensor([[7]] * 3), 1.2)
    with pytest.raises(ValueError):
        repetition_penalty(torch.randn(3, 5), torch.zeros(2, 1, dtype=torch.long), 1.2)
    with pytest.raises(ValueError):
        repetition_penalty(torch.randn(3, 5), torch.zeros(3, 1, dtype=torch.long), 0.0)
    assert sample(torch.randn(0, 5)).shape == (0,)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.integers(1, 6),
    vocab=st.integers(1, 300),
    # tiny temperatures overflow the reference's logits / temperature: keep >= 1e-3
    temperature=st.one_of(st.floats(-1, 3).filter(lambda t: abs(t) >= 1e-3), st.just(0.0)),
    top_k=st.integers(-2, 400),
    top_p=st.floats(-0.2, 1.2),
    min_p=st.one_of(st.floats(-0.1, 1.1), st.just(0.0)),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
)
def test_property_valid_sample_or_clear_error(
    rows, vocab, temperature, top_k, top_p, min_p, seed, dtype
):
    x = _logits(rows, vocab, dtype, seed=seed)
    try:
        ids = sample(x, temperature, top_k, top_p, min_p, backend="cpp")
    except ValueError:
        assert not (temperature >= 0 and top_k >= 0 and 0 < top_p <= 1 and 0 <= min_p <= 1), (
            "valid parameters were rejected"
        )
        return
    assert ids.shape == (rows,) and ids.dtype == torch.int64
    assert bool(((ids >= 0) & (ids < vocab)).all())
    if temperature == 0:
        assert torch.equal(ids, torch.argmax(x.float(), -1))
    else:
        allowed = ~torch.isinf(top_k_top_p_filter_reference(x, temperature, top_k, top_p, min_p))
        assert bool(allowed.gather(1, ids[:, None]).all())


@pytest.mark.parametrize("vocab", [7, 111])
def test_triton_interpreter_matches_reference(vocab):
    x = _logits(2, vocab)  # the interpreter needs ~0.3 s per row: few rows
    for setting in SETTINGS + [(0.0, 0, 1.0, 0.0)]:
        got = _draw(x, setting, "triton")
        ids, lp, raw = _ref(x, setting)
        assert torch.equal(got.ids, ids), setting
        torch.testing.assert_close(got.logprobs, lp, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.raw_logprobs, raw, atol=1e-5, rtol=1e-5)
        if setting in (SETTINGS[0], SETTINGS[5]):  # same kernel, FILTER=True
            f = top_k_top_p_filter(x, *setting, backend="triton")
            want = top_k_top_p_filter_reference(x, *setting)
            assert torch.equal(torch.isinf(f), torch.isinf(want)), setting
            torch.testing.assert_close(f, want)


def test_triton_bf16_many_draws_stay_in_kept_set():
    x = _logits(1, 111, torch.bfloat16, seed=5)
    setting = SETTINGS[0]
    ids = _many_draws(x[0], setting, "triton", draws=12, chunk=12)
    allowed = ~torch.isinf(top_k_top_p_filter_reference(x, *setting))[0]
    assert bool(allowed[ids].all())
    assert len(set(ids.tolist())) > 1  # it really samples
