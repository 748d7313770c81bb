"""Fused attention (dense, varlen, KV-cache decode): every backend vs the float32 reference.

Accuracy rule: the kernel's error (output and dq/dk/dv) against the float32
reference must be no worse than ~2x the error of plain eager PyTorch attention
computed in the same dtype (``assert_error_no_worse``).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kernel_testing import DTYPES, assert_error_no_worse, random_tensor, require_isa

from minigpt.kernels import force_cpu_isa
from minigpt.kernels.attention import attention, attention_varlen, attention_with_kv_cache
from minigpt.kernels.reference.attention import (
    attention_mask,
    attention_reference,
    attention_varlen_reference,
    attention_with_kv_cache_reference,
)

# (B, Tq, Tk, Hq, Hkv, D, causal, window): MHA / GQA / MQA, odd and round lengths,
# Tq < Tk (bottom-right causal), Tq > Tk (rows that see nothing), head dims 32..128.
CONFIGS = [
    (2, 1, 1, 2, 2, 32, True, None),
    (2, 17, 17, 4, 2, 64, True, None),
    (1, 97, 97, 4, 1, 80, False, None),
    (1, 200, 200, 2, 2, 128, True, None),
    (2, 33, 33, 4, 2, 96, True, 8),
    (1, 70, 70, 2, 1, 32, False, 13),
    (1, 5, 77, 4, 2, 64, True, None),
    (1, 77, 5, 2, 1, 64, True, None),
]


def _eager_lowp(q, k, v, causal, scale, window):
    """Naive attention in q's own dtype: the accuracy bar we must meet."""
    B, Tq, Hq, D = q.shape
    g = Hq // k.shape[2]
    kk, vv = k.repeat_interleave(g, dim=2), v.repeat_interleave(g, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, kk) * (D**-0.5 if scale is None else scale)
    mask = attention_mask(Tq, k.shape[1], causal, window)
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # rows with no visible key -> 0
    return torch.einsum("bhqk,bkhd->bqhd", p, vv)


def _no_worse(ours, eager, ref, name):
    """assert_error_no_worse with a floor of a few float32 ulps of the result's magnitude:
    where eager is exact by luck (a softmax over one key has exactly zero gradient)
    we still allow the float32 rounding of the fused recomputation."""
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    if ref.numel() == 0:
        return
    floor = 16 * torch.finfo(torch.float32).eps * max(1.0, float(ref.detach().abs().max()))
    assert_error_no_worse(ours, eager, ref, floor=floor, name=name)


def _check_attention(cfg, dtype, backend, *, check_lse=True):
    B, Tq, Tk, Hq, Hkv, D, causal, window = cfg
    q = random_tensor((B, Tq, Hq, D), dtype)
    k = random_tensor((B, Tk, Hkv, D), dtype)
    v = random_tensor((B, Tk, Hkv, D), dtype)
    runs = {}
    for name in ("ours", "eager", "ref"):
        # float64 reference: for float32 inputs a float32 reference would only measure
        # summation-order noise
        cast = (lambda t: t.double()) if name == "ref" else (lambda t: t)
        ins = [cast(t.detach().clone()).requires_grad_() for t in (q, k, v)]
        if name == "ours":
            out, lse = attention(
                *ins, causal=causal, window=window, return_lse=True, backend=backend
            )
        elif name == "eager":
            out, lse = _eager_lowp(*ins, causal, None, window), None
        else:
            out, lse = attention_reference(*ins, causal=causal, window=window, return_lse=True)
        runs[name] = (out, lse, ins)
    upstream = torch.randn(B, Tq, Hq, D, dtype=torch.float64).to(dtype)
    for out, _, _ in runs.values():
        out.backward(upstream.to(out.dtype))
    ours, eager, ref = runs["ours"], runs["eager"], runs["ref"]
    assert ours[0].dtype == dtype and ours[0].shape == (B, Tq, Hq, D)
    _no_worse(ours[0], eager[0], ref[0], "out")
    if check_lse:
        assert ours[1].dtype == torch.float32
        assert torch.equal(torch.isinf(ours[1]), torch.isinf(ref[1])), "lse -inf pattern"
        finite = torch.isfinite(ref[1])
        err = (ours[1][finite] - ref[1][finite]).abs().max().item() if finite.any() else 0.0
        # lse is float32 math on the same rounded inputs: only summation order differs
        assert float(err) < 1e-4 * max(1.0, D / 32), f"lse error {float(err)}"
    for i, name in enumerate(("dq", "dk", "dv")):
        g = ours[2][i].grad
        assert g is not None and g.dtype == dtype, f"{name} missing or wrong dtype"
        _no_worse(g, eager[2][i].grad, ref[2][i].grad, name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_attention_cpp(cfg, dtype):
    _check_attention(cfg, dtype, "cpp")


@pytest.mark.parametrize("isa", ("avx2", "scalar"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize(
    "cfg", [(1, 19, 19, 4, 2, 80, True, None), (1, 5, 70, 2, 1, 32, False, 9)], ids=str
)
def test_attention_cpp_every_isa(cfg, dtype, isa):
    require_isa(isa)
    with force_cpu_isa(isa):
        _check_attention(cfg, dtype, "cpp")


@pytest.mark.parametrize(
    "cfg", [(2, 33, 33, 4, 2, 64, True, None), (1, 19, 40, 2, 1, 80, False, 9)], ids=str
)
def test_attention_bf16_vec_path(cfg):
    """On CPUs with AVX512_BF16, bf16 uses vdpbf16ps kernels; check the plain AVX-512
    (Vec) path that other CPUs take, by switching the dot-product kernels off."""
    previous = torch.ops.minigpt.attention_set_bf16_dot(False)
    try:
        _check_attention(cfg, torch.bfloat16, "cpp")
    finally:
        torch.ops.minigpt.attention_set_bf16_dot(previous)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_attention_cpp_long(dtype):
    _check_attention((1, 1000, 1000, 4, 2, 64, True, None), dtype, "cpp")


def test_head_dims_16_to_256():
    for d in (16, 24, 48, 200, 256):
        _check_attention((1, 9, 9, 2, 1, d, True, None), torch.float32, "cpp")


def test_softmax_scale_and_noncontiguous_inputs():
    q = random_tensor((2, 6, 11, 32)).transpose(1, 2)  # (2, 11, 6, 32) non-contiguous
    k = random_tensor((2, 3, 11, 32)).transpose(1, 2)
    v = random_tensor((2, 3, 11, 32)).transpose(1, 2)
    out = attention(q, k, v, causal=False, softmax_scale=0.3, backend="cpp")
    ref = attention_reference(q, k, v, causal=False, softmax_scale=0.3)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=2e-6)


def test_fully_masked_rows_are_zero_with_zero_grad():
    q = random_tensor((1, 6, 2, 16), requires_grad=True)
    k = random_tensor((1, 2, 1, 16), requires_grad=True)
    v = random_tensor((1, 2, 1, 16), requires_grad=True)
    out, lse = attention(q, k, v, causal=True, return_lse=True, backend="cpp")
    # bottom-right alignment: queries 0..3 sit before key 0 and see nothing
    assert torch.equal(out[:, :4], torch.zeros_like(out[:, :4]))
    assert torch.isinf(lse[:, :4]).all() and torch.isfinite(lse[:, 4:]).all()
    out.sum().backward()
    assert torch.equal(q.grad[:, :4], torch.zeros_like(q.grad[:, :4]))


# ---- varlen ----------------------------------------------------------------------------

DOC_LENS = [5, 1, 37, 0, 70, 12]


def _packed(lens, hq, hkv, d, dtype):
    total = sum(lens)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    q = random_tensor((total, hq, d), dtype)
    k = random_tensor((total, hkv, d), dtype)
    v = random_tensor((total, hkv, d), dtype)
    return q, k, v, cu


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", (True, False))
def test_attention_varlen_cpp(dtype, causal):
    q, k, v, cu = _packed(DOC_LENS, 4, 2, 64, dtype)
    mx = max(DOC_LENS)
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = attention_varlen(*ins, cu, cu, mx, mx, causal=causal, return_lse=True)
    rins = [t.double().requires_grad_() for t in (q, k, v)]
    rout, rlse = attention_varlen_reference(*rins, cu, cu, mx, mx, causal=causal, return_lse=True)
    # eager low-precision baseline, document by document
    eins = [t.clone().requires_grad_() for t in (q, k, v)]
    eout = torch.cat(
        [
            _eager_lowp(*(t[None, a:b] for t in eins), causal, None, None)[0]
            for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())
        ]
    )
    up = torch.randn(out.shape).to(dtype)
    for o in (out, rout, eout):
        o.backward(up.to(o.dtype))
    _no_worse(out, eout, rout, "out")
    torch.testing.assert_close(lse, rlse.float(), atol=1e-4, rtol=1e-5)
    for a, e, r, name in zip(ins, eins, rins, ("dq", "dk", "dv")):
        _no_worse(a.grad, e.grad, r.grad, name)


def test_varlen_never_crosses_document_boundary():
    q, k, v, cu = _packed([9, 40, 23], 2, 1, 32, torch.float32)
    out = attention_varlen(q, k, v, cu, cu, 40, 40, causal=False)
    k2, v2 = k.clone(), v.clone()
    k2[9:49] = torch.randn_like(k2[9:49]) * 10  # scramble the middle document only
    v2[9:49] = torch.randn_like(v2[9:49]) * 10
    out2 = attention_varlen(q, k2, v2, cu, cu, 40, 40, causal=False)
    assert torch.equal(out[:9], out2[:9]) and torch.equal(out[49:], out2[49:])
    assert not torch.equal(out[9:49], out2[9:49])


def test_varlen_matches_dense_batch():
    q = random_tensor((3, 21, 4, 32))
    k = random_tensor((3, 21, 2, 32))
    v = random_tensor((3, 21, 2, 32))
    cu = torch.arange(4, dtype=torch.int64) * 21
    flat = attention_varlen(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, cu, 21, 21)
    torch.testing.assert_close(flat.view(3, 21, 4, 32), attention(q, k, v), atol=0, rtol=0)


# ---- KV-cache decode ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tn", (0, 1, 3))
def test_attention_with_kv_cache(dtype, tn):
    B, S, Hq, Hkv, D = 4, 160, 8, 2, 64
    lens = torch.tensor([0, 5, 100, 150], dtype=torch.int32)  # row 0 starts empty
    tq = max(tn, 1)
    q = random_tensor((B, tq, Hq, D), dtype)
    kc, vc = random_tensor((B, S, Hkv, D), dtype), random_tensor((B, S, Hkv, D), dtype)
    kn = random_tensor((B, tn, Hkv, D), dtype) if tn else None
    vn = random_tensor((B, tn, Hkv, D), dtype) if tn else None
    kc_ref, vc_ref = kc.double(), vc.double()
    out = attention_with_kv_cache(q, kc, vc, lens, kn, vn)
    ref = attention_with_kv_cache_reference(
        q.double(),
        kc_ref,
        vc_ref,
        lens,
        None if kn is None else kn.double(),
        None if vn is None else vn.double(),
    )
    torch.testing.assert_close(kc.double(), kc_ref, atol=0, rtol=0)  # appended in place
    torch.testing.assert_close(vc.double(), vc_ref, atol=0, rtol=0)
    eager = torch.cat(
        [
            _eager_lowp(
                q[b : b + 1],
                kc[b : b + 1, : int(lens[b]) + tn],
                vc[b : b + 1, : int(lens[b]) + tn],
                True,
                None,
                None,
            )
            for b in range(B)
        ]
    )
    _no_worse(out, eager, ref, "out")
    if tn == 0:  # an empty cache row has nothing to attend to
        assert torch.equal(out[0], torch.zeros_like(out[0]))


def test_kv_cache_ignores_garbage_past_the_valid_length():
    q = random_tensor((2, 1, 4, 32))
    kc, vc = random_tensor((2, 50, 1, 32)), random_tensor((2, 50, 1, 32))
    lens = torch.tensor([10, 20])
    out = attention_with_kv_cache(q, kc, vc, lens)
    kc[0, 10:], vc[0, 10:] = float("nan"), float("inf")
    kc[1, 20:], vc[1, 20:] = float("nan"), float("inf")
    torch.testing.assert_close(attention_with_kv_cache(q, kc, vc, lens), out, atol=0, rtol=0)


def test_kv_cache_decode_matches_dense_prefix():
    # decoding token by token gives the same output as full causal attention
    T, H, D = 9, 4, 32
    q, k, v = random_tensor((1, T, H, D)), random_tensor((1, T, 2, D)), random_tensor((1, T, 2, D))
    full = attention(q, k, v, causal=True)
    kc, vc = torch.zeros(1, T, 2, D), torch.zeros(1, T, 2, D)
    for t in range(T):
        lens = torch.tensor([t])
        out = attention_with_kv_cache(
            q[:, t : t + 1], kc, vc, lens, k[:, t : t + 1], v[:, t : t + 1]
        )
        torch.testing.assert_close(out[:, 0], full[:, t], atol=2e-6, rtol=2e-6)


# ---- bad input, properties, compile ------------------------------------------------------


@pytest.mark.parametrize(
    "args, kwargs, err",
    [
        ((torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8)), {}, TypeError),  # v missing
        ((torch.randn(4, 2, 8),) * 3, {}, ValueError),  # rank
        (
            (torch.randn(1, 4, 3, 8), torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8)),
            {},
            ValueError,
        ),
        (
            (torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8).half(), torch.randn(1, 4, 2, 8)),
            {},
            TypeError,
        ),
        ((torch.randn(1, 4, 2, 8).int(),) * 3, {}, TypeError),
        ((torch.randn(1, 4, 2, 300),) * 3, {}, ValueError),  # head dim
        (
            (torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 4), torch.randn(1, 4, 2, 4)),
            {},
            ValueError,
        ),
        (
            (torch.randn(2, 4, 2, 8), torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8)),
            {},
            ValueError,
        ),
        ((torch.randn(1, 4, 2, 8),) * 3, {"window": 0}, ValueError),
        ((torch.randn(1, 4, 2, 8),) * 3, {"window": 2.5}, TypeError),
        ((torch.randn(1, 4, 2, 8),) * 3, {"softmax_scale": -1.0}, ValueError),
        ((torch.randn(1, 4, 2, 8),) * 3, {"causal": "yes"}, TypeError),
        (
            (
                torch.randn(1, 4, 2, 8),
                torch.randn(1, 4, 2, 8, device="meta"),
                torch.randn(1, 4, 2, 8),
            ),
            {},
            ValueError,
        ),
    ],
)
def test_attention_bad_input(args, kwargs, err):
    with pytest.raises(err):
        attention(*args, **kwargs)


def test_varlen_and_cache_bad_input():
    q = torch.randn(10, 2, 8)
    with pytest.raises(ValueError, match="start at 0"):
        attention_varlen(q, q, q, torch.tensor([1, 10]), torch.tensor([1, 10]), 10, 10)
    with pytest.raises(ValueError, match="rows"):
        attention_varlen(q, q, q, torch.tensor([0, 11]), torch.tensor([0, 11]), 11, 11)
    with pytest.raises(ValueError, match="non-decreasing"):
        attention_varlen(q, q, q, torch.tensor([0, 6, 4]), torch.tensor([0, 6, 4]), 6, 6)
    with pytest.raises(TypeError):
        attention_varlen(q, q, q, torch.tensor([0.0, 10.0]), torch.tensor([0, 10]), 10, 10)
    with pytest.raises(ValueError, match="max_seqlen"):
        attention_varlen(q, q, q, torch.tensor([0, 10]), torch.tensor([0, 10]), 5, 10)
    kc = torch.zeros(2, 8, 1, 8)
    with pytest.raises(ValueError, match="cache length"):
        attention_with_kv_cache(
            torch.randn(2, 1, 2, 8),
            kc,
            kc.clone(),
            torch.tensor([8, 0]),
            torch.randn(2, 1, 1, 8),
            torch.randn(2, 1, 1, 8),
        )
    with pytest.raises(ValueError, match="both"):
        attention_with_kv_cache(
            torch.randn(2, 1, 2, 8), kc, kc.clone(), torch.tensor([1, 0]), torch.randn(2, 1, 1, 8)
        )
    with pytest.raises(ValueError, match="contiguous"):
        strided = torch.zeros(2, 16, 1, 8)[:, ::2]
        attention_with_kv_cache(torch.randn(2, 1, 2, 8), strided, strided, torch.tensor([1, 0]))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    b=st.integers(0, 2),
    tq=st.integers(0, 40),
    tk=st.integers(0, 40),
    hkv=st.integers(0, 3),
    group=st.integers(1, 3),
    d=st.integers(0, 72),
    causal=st.booleans(),
    window=st.one_of(st.none(), st.integers(-1, 20)),
    dtype=st.sampled_from(DTYPES),
)
def test_attention_property(b, tq, tk, hkv, group, d, causal, window, dtype):
    """Random shapes, valid or not: either match the reference or raise a clear error."""
    q = torch.randn(b, tq, hkv * group, d).to(dtype)
    k = torch.randn(b, tk, hkv, d).to(dtype)
    v = torch.randn(b, tk, hkv, d).to(dtype)
    try:
        out = attention(q, k, v, causal=causal, window=window, backend="cpp")
    except (ValueError, TypeError):
        assert hkv == 0 or d == 0 or (window is not None and window < 1)
        return
    ref = attention_reference(q.double(), k.double(), v.double(), causal=causal, window=window)
    eager = _eager_lowp(q, k, v, causal, None, window)
    _no_worse(out, eager, ref, "out")


def test_torch_compile_fullgraph_with_backward():
    q = random_tensor((2, 33, 4, 64), requires_grad=True)
    k = random_tensor((2, 33, 2, 64), requires_grad=True)
    v = random_tensor((2, 33, 2, 64), requires_grad=True)
    f = torch.compile(lambda q, k, v: attention(q, k, v, backend="cpp"), fullgraph=True)
    out = f(q, k, v)
    out.sum().backward()
    qr, kr, vr = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref = attention_reference(qr, kr, vr)
    ref.sum().backward()
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=2e-6)
    for a, r in ((q, qr), (k, kr), (v, vr)):
        torch.testing.assert_close(a.grad, r.grad, atol=1e-5, rtol=1e-5)
