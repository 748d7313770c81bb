"""Rotary position embedding: every backend vs the float32 reference, tables, and the module."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_testing import DTYPES, ISAS, check_op, random_tensor, require_isa

from minigpt.kernels import force_cpu_isa, rope, rope_cos_sin, rope_with_positions
from minigpt.kernels.reference import rope_reference, rotate_half
from minigpt.nn import RotaryEmbedding

# (B, T, Hq, Hk, D): odd and round sizes, GQA (Hk < Hq), head dims 2..128 (80 and 96
# have a partial vector tail), and one case big enough to be split across threads.
SHAPES = [
    (1, 1, 1, 1, 2),
    (2, 7, 4, 2, 80),
    (1, 97, 3, 1, 64),
    (2, 16, 8, 8, 128),
    (1, 7, 2, 2, 96),
    (2, 64, 8, 2, 64),
]
TRITON_SHAPES = [(1, 1, 1, 1, 2), (2, 7, 4, 2, 80), (1, 5, 3, 1, 128)]


def _inputs(shape, dtype, *, per_row=False, table_dtype=torch.float32):
    B, T, Hq, Hk, D = shape
    q, k = random_tensor((B, T, Hq, D), dtype), random_tensor((B, T, Hk, D), dtype)
    if per_row:  # every row at its own offset, as in batched decoding
        positions = torch.arange(T)[None, :] + torch.randint(0, 5000, (B, 1))
    else:
        positions = torch.arange(T) + 3
    cos, sin = rope_cos_sin(positions, D, dtype=table_dtype)
    return {"q": q, "k": k, "cos": cos, "sin": sin}


def _check(inputs, backend, dtype):
    check_op(
        lambda q, k, cos, sin: rope(q, k, cos, sin, backend=backend),
        rope_reference,
        inputs,
        grads=("q", "k"),
        dtype=dtype,
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("isa", ISAS)
def test_rope_cpp(dtype, shape, isa):
    require_isa(isa)
    with force_cpu_isa(isa):
        _check(_inputs(shape, dtype), "cpp", dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("table_dtype", ["same", torch.float32])
@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_rope_tables(dtype, table_dtype, per_row, backend):
    # (T, D/2) and per-row (B, T, D/2) tables, in float32 or the activation dtype
    tdt = dtype if table_dtype == "same" else table_dtype
    _check(_inputs((3, 5, 4, 2, 80), dtype, per_row=per_row, table_dtype=tdt), backend, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", TRITON_SHAPES)
def test_rope_triton(dtype, shape):
    _check(_inputs(shape, dtype), "triton", dtype)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_rope_strided_views_of_fused_qkv(backend):
    # q and k sliced out of one (B, T, Hq + 2 Hk, D) projection: no copy needed
    B, T, Hq, Hk, D = 2, 6, 4, 2, 64
    qkv = random_tensor((B, T, Hq + 2 * Hk, D))
    q, k = qkv[:, :, :Hq], qkv[:, :, Hq : Hq + Hk]
    assert not q.is_contiguous()
    cos, sin = rope_cos_sin(T, D)
    _check({"q": q, "k": k, "cos": cos, "sin": sin}, backend, torch.float32)
    # a (B, H, T, D) tensor transposed to (B, T, H, D) works too
    qt = random_tensor((B, Hq, T, D)).transpose(1, 2)
    _check({"q": qt, "k": qt, "cos": cos, "sin": sin}, backend, torch.float32)


def test_rope_large_outputs_from_output_pool_are_fully_written():
    # >= 1 MiB outputs come from recycled blocks holding stale data (output_pool.cpp)
    inputs = _inputs((2, 64, 16, 4, 128), torch.float32)
    expected = rope_reference(**inputs)
    for _ in range(2):
        q_rot, k_rot = rope(**inputs, backend="cpp")
        torch.testing.assert_close(q_rot, expected[0])
        torch.testing.assert_close(k_rot, expected[1])
        q_rot.fill_(float("nan")), k_rot.fill_(float("nan"))
        del q_rot, k_rot


@pytest.mark.parametrize("D", [128, 80])
def test_rope_streaming_stores_on_huge_outputs(D):
    # q_rot + k_rot >= 16 MiB: non-temporal stores (D=128) or their fallback (D=80)
    _check(_inputs((1, 509, 32, 31, D), torch.float32), "cpp", torch.float32)


def test_rope_matches_complex_rotation():
    # independent formula: pair (x[i], x[i + D/2]) is the complex number x[i] + j x[i + D/2],
    # and RoPE multiplies it by exp(j * t * theta^(-2i/D))
    B, T, H, D = 2, 9, 3, 16
    q = random_tensor((B, T, H, D), torch.float64)
    pos = torch.arange(T)
    cos, sin = rope_cos_sin(pos, D)
    q_rot, _ = rope(q.float(), q.float(), cos, sin, backend="cpp")
    angles = pos[:, None].double() * 10000.0 ** (-torch.arange(0, D, 2).double() / D)
    z = (
        torch.complex(q[..., : D // 2], q[..., D // 2 :])
        * torch.polar(torch.ones_like(angles), angles)[None, :, None, :]
    )
    expected = torch.cat((z.real, z.imag), dim=-1)
    torch.testing.assert_close(q_rot.double(), expected, atol=2e-6, rtol=2e-6)


def test_rope_matches_hugging_face_formula():
    # transformers' apply_rotary_pos_emb on (B, H, T, D) with full-width cos/sin tables
    B, T, H, D = 2, 11, 4, 64
    q, k = random_tensor((B, T, H, D)), random_tensor((B, T, 2, D))
    cos, sin = rope_cos_sin(T, D)
    cos_full, sin_full = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)

    def hf(x):  # x: (B, H, T, D)
        return x * cos_full[None, None] + rotate_half(x) * sin_full[None, None]

    q_rot, k_rot = rope(q, k, cos, sin, backend="cpp")
    torch.testing.assert_close(q_rot, hf(q.transpose(1, 2)).transpose(1, 2))
    torch.testing.assert_close(k_rot, hf(k.transpose(1, 2)).transpose(1, 2))


def test_rope_scores_depend_only_on_relative_position():
    D = 32
    q, k = random_tensor((1, 1, 1, D)), random_tensor((1, 1, 1, D))

    def score(m, n):
        cq, sq = rope_cos_sin(torch.tensor([m]), D)
        ck, sk = rope_cos_sin(torch.tensor([n]), D)
        qr, _ = rope(q, q, cq, sq)
        kr, _ = rope(k, k, ck, sk)
        return float((qr * kr).sum())

    assert score(5, 2) == pytest.approx(score(103, 100), abs=1e-4)
    assert score(5, 2) != pytest.approx(score(5, 3), abs=1e-3)


def test_rope_cos_sin_tables():
    cos, sin = rope_cos_sin(8, 4, theta=100.0)
    assert cos.shape == sin.shape == (8, 2) and cos.dtype == torch.float32
    t = 5.0
    assert float(cos[5, 0]) == pytest.approx(math.cos(t))
    assert float(sin[5, 1]) == pytest.approx(math.sin(t / 10.0))  # 100 ** (-2/4) = 1/10
    per_row = rope_cos_sin(torch.tensor([[0, 1], [7, 8]]), 4, dtype=torch.bfloat16)[0]
    assert per_row.shape == (2, 2, 2) and per_row.dtype == torch.bfloat16
    with pytest.raises(ValueError):
        rope_cos_sin(8, 5)
    with pytest.raises(TypeError):
        rope_cos_sin(torch.tensor([0.5]), 4)
    with pytest.raises(TypeError):
        rope_cos_sin("8", 4)
    with pytest.raises(ValueError):
        rope_cos_sin(-1, 4)


def test_rope_with_positions_and_module_agree():
    B, T, Hq, Hk, D = 2, 6, 4, 2, 48
    q, k = random_tensor((B, T, Hq, D)), random_tensor((B, T, Hk, D))
    rot = RotaryEmbedding(D, max_seq_len=8)
    offset = 7  # 7 + 6 > 8: the module grows its tables
    by_offset = rot(q, k, offset)
    by_tensor = rot(q, k, torch.arange(offset, offset + T))
    by_rows = rot(q, k, torch.arange(offset, offset + T).expand(B, T))
    functional = rope_with_positions(q, k, offset)
    for got in (by_tensor, by_rows, functional):
        torch.testing.assert_close(got[0], by_offset[0])
        torch.testing.assert_close(got[1], by_offset[1])
    cos, sin = rope_cos_sin(torch.arange(offset, offset + T), D)
    torch.testing.assert_close(by_offset[0], rope_reference(q, k, cos, sin)[0])
    torch.testing.assert_close(rot(q, k)[0], rope_with_positions(q, k)[0])
    assert rot.cos.shape[0] >= offset + T


def test_rotary_module_keeps_float32_tables_and_no_state():
    rot = RotaryEmbedding(16, max_seq_len=32).to(torch.bfloat16)
    assert rot.cos.dtype == torch.float32
    assert rot.state_dict() == {}
    q = random_tensor((1, 4, 2, 16), torch.bfloat16)
    q_rot, _ = rot(q, q)
    assert q_rot.dtype == torch.bfloat16
    with pytest.raises(ValueError):
        RotaryEmbedding(15)
    with pytest.raises(TypeError):
        rot(q, q, torch.tensor([0.0, 1.0, 2.0, 3.0]))
    with pytest.raises(ValueError):
        rot(q, q, -1)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_rope_gradient_of_one_input_only(backend):
    inputs = _inputs((2, 5, 4, 2, 64), torch.float32)
    q = inputs["q"].clone().requires_grad_()
    q_rot, k_rot = rope(q, inputs["k"], inputs["cos"], inputs["sin"], backend=backend)
    (q_rot.square().sum() + k_rot.sum()).backward()
    q2 = inputs["q"].clone().requires_grad_()
    rq, _ = rope_reference(q2, inputs["k"], inputs["cos"], inputs["sin"])
    rq.square().sum().backward()
    torch.testing.assert_close(q.grad, q2.grad)


def test_rope_learnable_tables_fall_back_to_reference():
    q, k = random_tensor((1, 3, 2, 8)), random_tensor((1, 3, 1, 8))
    cos, sin = rope_cos_sin(3, 8)
    cos.requires_grad_()
    q_rot, k_rot = rope(q, k, cos, sin, backend="cpp")
    (q_rot.sum() + k_rot.sum()).backward()
    assert cos.grad is not None and cos.grad.shape == cos.shape


def _bad(**over):
    args = {
        "q": torch.randn(2, 5, 4, 8),
        "k": torch.randn(2, 5, 2, 8),
        "cos": torch.randn(5, 4),
        "sin": torch.randn(5, 4),
    }
    args.update(over)
    return args


@pytest.mark.parametrize(
    "args, err",
    [
        (_bad(q=torch.randn(2, 5, 4, 7), k=torch.randn(2, 5, 2, 7)), ValueError),  # odd D
        (_bad(q=torch.randn(5, 4, 8)), ValueError),  # q rank
        (_bad(k=torch.randn(2, 6, 2, 8)), ValueError),  # k length
        (_bad(k=torch.randn(2, 5, 2, 10)), ValueError),  # k head dim
        (_bad(k=torch.randn(3, 5, 2, 8)), ValueError),  # k batch
        (_bad(cos=torch.randn(5, 8), sin=torch.randn(5, 8)), ValueError),  # full-width tables
        (_bad(cos=torch.randn(6, 4), sin=torch.randn(6, 4)), ValueError),  # table length
        (_bad(cos=torch.randn(3, 5, 4), sin=torch.randn(3, 5, 4)), ValueError),  # table batch
        (_bad(sin=torch.randn(5, 3)), ValueError),  # sin vs cos shape
        (_bad(cos=torch.randn(4)), ValueError),  # table rank
        (_bad(k=torch.randn(2, 5, 2, 8).half()), TypeError),  # k dtype
        (_bad(q=torch.randn(2, 5, 4, 8).int()), TypeError),  # integer q
        (_bad(sin=torch.randn(5, 4).double()), TypeError),  # float64 table
        (_bad(cos=torch.randn(5, 4).half(), sin=torch.randn(5, 4).half()), TypeError),
        (_bad(q="q"), TypeError),  # not a tensor
        (_bad(cos=torch.randn(5, 4, device="meta")), ValueError),  # device
    ],
)
def test_rope_bad_input(args, err):
    with pytest.raises(err):
        rope(**args)


def test_torch_compile_traces_cpp_op_forward_and_backward():
    B, T, D = 2, 9, 64
    cos, sin = rope_cos_sin(T, D)
    f = torch.compile(lambda q, k: rope(q, k, cos, sin, backend="cpp"), fullgraph=True)
    q = random_tensor((B, T, 4, D), requires_grad=True)
    k = random_tensor((B, T, 2, D), requires_grad=True)
    q_rot, k_rot = f(q, k)
    (q_rot.square().sum() + k_rot.sum()).backward()
    q2, k2 = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    rq, rk = rope_reference(q2, k2, cos, sin)
    (rq.square().sum() + rk.sum()).backward()
    torch.testing.assert_close(q_rot, rq)
    torch.testing.assert_close(k_rot, rk)
    torch.testing.assert_close(q.grad, q2.grad)
    torch.testing.assert_close(k.grad, k2.grad)


_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64]


@settings(max_examples=60, deadline=None)
@given(
    B=st.integers(0, 3),
    T=st.integers(0, 9),
    Hq=st.integers(0, 5),
    Hk=st.integers(0, 3),
    D=st.integers(0, 20),
    dtype=st.sampled_from(_DTYPES),
    table=st.sampled_from(["shared", "per_row", "wrong_len", "full_width"]),
    table_dtype=st.sampled_from(["same", "float32", "float64"]),
    backend=st.sampled_from(["cpp", "torch"]),
)
def test_rope_property(B, T, Hq, Hk, D, dtype, table, table_dtype, backend):
    """Random shapes/dtypes (some invalid): matches the reference or raises a clear error."""
    gen = torch.Generator().manual_seed(B * 1000 + T * 100 + D)
    q = torch.randn(B, T, Hq, D, generator=gen).to(dtype)
    k = torch.randn(B, T, Hk, D, generator=gen).to(dtype)
    half = max(D // 2, 1)
    shape = {
        "shared": (T, half),
        "per_row": (B, T, half),
        "wrong_len": (T + 1, half),
        "full_width": (T, 2 * half),
    }[table]
    tdt = {"same": dtype, "float32": torch.float32, "float64": torch.float64}[table_dtype]
    cos = torch.randn(shape, generator=gen).to(tdt)
    sin = torch.randn(shape, generator=gen).to(tdt)
    try:
        q_rot, k_rot = rope(q, k, cos, sin, backend=backend)
    except (ValueError, TypeError):
        valid = (
            dtype in DTYPES
            and D > 0
            and D % 2 == 0
            and table in ("shared", "per_row")
            and tdt in (torch.float32, dtype)
        )
        assert not valid, "a valid input was rejected"
        return
    rq, rk = rope_reference(q.float(), k.float(), cos.float(), sin.float())
    tol = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 3e-3}[dtype]
    # tables here are random (not unit-norm), so outputs can reach ~|x| * 4: scale atol
    torch.testing.assert_close(q_rot.float(), rq, atol=tol * 8, rtol=tol)
    torch.testing.assert_close(k_rot.float(), rk, atol=tol * 8, rtol=tol)
