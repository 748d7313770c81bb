"""linear_cross_entropy: every backend, dtype, ISA and reduction vs the float32 reference."""

import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kernel_testing import DTYPES, ISAS, check_op, random_tensor, require_isa

from minigpt.kernels import force_cpu_isa, linear_cross_entropy
from minigpt.kernels.linear_cross_entropy import default_chunk_rows
from minigpt.kernels.reference import linear_cross_entropy_reference
from minigpt.nn import LinearCrossEntropyLoss

# (N, H, V): single row / single class, odd sizes, a 32k-class vocabulary, many rows
SHAPES = [(1, 7, 1), (7, 33, 3), (97, 65, 1000), (5, 16, 32003), (1000, 17, 97)]
TRITON_SHAPES = [(1, 5, 3), (7, 9, 70)]  # the interpreter is slow
IGNORE = -100


def _inputs(n, h, v, dtype, *, ignore_every=0, bias=False, batch=None):
    """hidden ~ N(0, 1), weight ~ N(0, 1/H) so logits are O(1) like a trained head."""
    shape = (n, h) if batch is None else (batch, n, h)
    hidden = random_tensor(shape, dtype)
    weight = random_tensor((v, h), dtype, scale=h**-0.5)
    targets = torch.randint(0, v, shape[:-1])
    if ignore_every:
        targets.view(-1)[::ignore_every] = IGNORE
    inputs = {"hidden": hidden, "weight": weight, "targets": targets}
    if bias:
        inputs["bias"] = random_tensor((v,), dtype, scale=0.5)
    return inputs


def _check(inputs, backend, reduction="mean", softcap=None, chunk_size=None, z_loss=0.0):
    grads = ("hidden", "weight") + (("bias",) if "bias" in inputs else ())
    check_op(
        lambda **kw: linear_cross_entropy(
            **kw,
            reduction=reduction,
            softcap=softcap,
            z_loss=z_loss,
            chunk_size=chunk_size,
            backend=backend,
        ),
        lambda **kw: linear_cross_entropy_reference(
            **kw, reduction=reduction, softcap=softcap, z_loss=z_loss
        ),
        inputs,
        grads=grads,
        dtype=inputs["hidden"].dtype,
        # dW / db are sums over all N rows
        grad_tol_scale=2.0,
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("isa", ISAS)
def test_cpp_matches_reference(dtype, shape, isa):
    require_isa(isa)
    n, h, v = shape
    # rotate through the reductions and options so every shape sees several
    k = SHAPES.index(shape)
    reduction = ("mean", "sum", "none")[k % 3]
    inputs = _inputs(n, h, v, dtype, ignore_every=3 if n > 3 else 0, bias=k % 2 == 0)
    with force_cpu_isa(isa):
        _check(inputs, "cpp", reduction, chunk_size=max(1, n // 3))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("softcap, z_loss", [(None, 0.0), (2.5, 0.0), (None, 0.05)])
def test_cpp_every_reduction_softcap_zloss_bias(dtype, reduction, softcap, z_loss):
    inputs = _inputs(61, 24, 301, dtype, ignore_every=4, bias=True)
    _check(inputs, "cpp", reduction, softcap=softcap, chunk_size=16, z_loss=z_loss)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", TRITON_SHAPES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_triton_matches_reference(dtype, shape, reduction):
    n, h, v = shape
    inputs = _inputs(n, h, v, dtype, ignore_every=3 if n > 3 else 0, bias=n > 1)
    big = n > 1
    _check(
        inputs,
        "triton",
        reduction,
        softcap=3.0 if big else None,
        chunk_size=4,
        z_loss=0.05 if big else 0.0,
    )


@pytest.mark.parametrize("backend", ["cpp", "triton", "torch"])
def test_return_lse(backend):
    inputs = _inputs(11, 5, 40, torch.float32, ignore_every=4, batch=3)
    loss, lse = linear_cross_entropy(**inputs, return_lse=True, backend=backend, chunk_size=2)
    logits = inputs["hidden"] @ inputs["weight"].t()
    expected = torch.logsumexp(logits, -1).masked_fill(inputs["targets"] == IGNORE, 0.0)
    assert lse.shape == inputs["targets"].shape and lse.dtype == torch.float32
    torch.testing.assert_close(lse, expected)
    torch.testing.assert_close(loss, linear_cross_entropy_reference(**inputs))


@pytest.mark.parametrize("chunk_size", [1, 10, 96, 97, 500, None])
def test_chunk_boundaries(chunk_size):
    # 97 rows: chunks that do and do not divide N, one row, and one chunk for all
    _check(_inputs(97, 31, 257, torch.float32, ignore_every=5), "cpp", chunk_size=chunk_size)


def test_default_chunk_rows_bounds_memory():
    assert default_chunk_rows(8192, 32000, 4) * 32000 * 4 <= 64 * 2**20
    # 16-bit: 28 MiB budget (458 rows at V = 32k), split evenly over 18 chunks
    assert default_chunk_rows(8192, 32000, 2) == 456
    assert default_chunk_rows(100, 32000) == 100  # small N: one chunk
    assert default_chunk_rows(8192, 10**7) == 64  # huge V: the floor
    rows = default_chunk_rows(1000, 32000)  # chunks split evenly
    assert -(-1000 // rows) * rows - 1000 < -(-1000 // rows)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored(backend, reduction):
    h = random_tensor((6, 8), requires_grad=True)
    w = random_tensor((11, 8), requires_grad=True)
    t = torch.full((6,), IGNORE)
    loss = linear_cross_entropy(h, w, t, reduction=reduction, backend=backend)
    assert torch.equal(loss, torch.zeros_like(loss))  # 0, not NaN
    loss.sum().backward()
    assert torch.equal(h.grad, torch.zeros_like(h)) and torch.equal(w.grad, torch.zeros_like(w))


def test_custom_ignore_index_and_3d_hidden():
    inputs = _inputs(9, 12, 40, torch.float32, batch=3)
    inputs["targets"][:, -2:] = 7  # class 7 is also the ignore value
    loss = linear_cross_entropy(**inputs, ignore_index=7, reduction="none")
    ref = linear_cross_entropy_reference(**inputs, ignore_index=7, reduction="none")
    assert loss.shape == (3, 9)
    assert torch.all(loss[:, -2:] == 0)
    torch.testing.assert_close(loss, ref)


def test_no_grad_inference_and_module():
    inputs = _inputs(20, 16, 50, torch.float32)
    with torch.no_grad():
        loss = linear_cross_entropy(**inputs)
    torch.testing.assert_close(loss, linear_cross_entropy_reference(**inputs))
    module = LinearCrossEntropyLoss(reduction="sum", chunk_size=7)
    assert "reduction='sum'" in repr(module)
    w = inputs["weight"].clone().requires_grad_()
    out = module(inputs["hidden"], w, inputs["targets"])
    out.backward()
    torch.testing.assert_close(
        out, linear_cross_entropy_reference(**inputs, reduction="sum"), rtol=1e-5, atol=1e-4
    )
    assert w.grad is not None and w.grad.abs().sum() > 0


def test_noncontiguous_inputs():
    inputs = _inputs(12, 10, 30, torch.float32)
    h = inputs["hidden"].t().contiguous().t()  # same values, column-major
    w = torch.cat([inputs["weight"], inputs["weight"]], 1)[:, :10]  # strided rows
    loss = linear_cross_entropy(h, w, inputs["targets"], backend="cpp")
    torch.testing.assert_close(loss, linear_cross_entropy_reference(**inputs))


def _bad(**over):
    args = {"hidden": torch.randn(4, 8), "weight": torch.randn(10, 8)}
    args["targets"] = torch.tensor([0, 9, IGNORE, 3])
    args.update(over)
    return args


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (_bad(targets=torch.tensor([0, 10, 1, 2])), ValueError, "outside"),  # target >= V
        (_bad(targets=torch.tensor([0, -1, 1, 2])), ValueError, "outside"),  # negative
        (_bad(targets=torch.tensor([0, 1, 1, 2], dtype=torch.int32)), TypeError, "targets"),
        (_bad(targets=torch.zeros(4)), TypeError, "targets"),
        (_bad(targets=torch.zeros(5, dtype=torch.long)), ValueError, "targets"),
        (_bad(hidden=torch.randn(8)), ValueError, "hidden"),
        (_bad(hidden=torch.randn(4, 8).int()), TypeError, "hidden"),
        (_bad(weight=torch.randn(10, 7)), ValueError, "weight"),
        (_bad(weight=torch.randn(10)), ValueError, "weight"),
        (_bad(weight=torch.randn(0, 8)), ValueError, "weight"),
        (_bad(weight=torch.randn(10, 8).half()), TypeError, "weight"),
        (_bad(weight=torch.randn(10, 8, device="meta")), ValueError, "device"),
        (_bad(bias=torch.randn(9)), ValueError, "bias"),
        (_bad(reduction="avg"), ValueError, "reduction"),
        (_bad(softcap=0.0), ValueError, "softcap"),
        (_bad(softcap="30"), TypeError, "softcap"),
        (_bad(chunk_size=0), ValueError, "chunk_size"),
        (_bad(z_loss=-1.0), ValueError, "z_loss"),
        (_bad(z_loss=None), TypeError, "z_loss"),
        (_bad(ignore_index=1.5), TypeError, "ignore_index"),
        (_bad(hidden=[[1.0] * 8] * 4), TypeError, "hidden"),
    ],
)
def test_bad_input(kwargs, err, match):
    with pytest.raises(err, match=match):
        linear_cross_entropy(**kwargs)


def test_kernel_rejects_out_of_range_target_without_crashing():
    logits = torch.randn(3, 5)
    with pytest.raises(RuntimeError, match="outside"):
        torch.ops.minigpt.cross_entropy_chunk(
            logits, torch.tensor([0, 5, 1]), None, None, 1.0, IGNORE, 0.0, 0.0, True
        )
    from minigpt.kernels.triton.cross_entropy import cross_entropy_chunk

    with pytest.raises(ValueError, match="outside"):
        cross_entropy_chunk(
            logits, torch.tensor([0, -3, 1]), None, None, 1.0, IGNORE, 0.0, 0.0, True
        )


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_compile(reduction):
    inputs = _inputs(33, 16, 70, torch.float32, ignore_every=4)

    def step(hidden, weight, targets):
        loss = linear_cross_entropy(hidden, weight, targets, reduction=reduction, chunk_size=8)
        return loss.sum() * 0.5

    f = torch.compile(step, fullgraph=True)
    check_op(
        f,
        lambda **kw: linear_cross_entropy_reference(**kw, reduction=reduction).sum() * 0.5,
        inputs,
        grads=("hidden", "weight"),
    )


def _hypothesis_case(data):
    n = data.draw(st.integers(0, 40), label="N")
    h = data.draw(st.integers(1, 24), label="H")
    v = data.draw(st.integers(1, 90), label="V")
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    reduction = data.draw(st.sampled_from(["mean", "sum", "none", "bad"]), label="reduction")
    flaw = data.draw(st.sampled_from(["none"] * 6 + ["target", "width", "wdtype"]), label="flaw")
    inputs = _inputs(max(n, 1), h, v, dtype, ignore_every=data.draw(st.integers(0, 4)))
    inputs = {k: t[:n] if k != "weight" else t for k, t in inputs.items()}
    if flaw == "target" and n:
        inputs["targets"][0] = v + data.draw(st.integers(0, 5))
    elif flaw == "width":
        inputs["weight"] = random_tensor((v, h + 1), dtype)
    elif flaw == "wdtype":
        inputs["weight"] = inputs["weight"].double()
    chunk = data.draw(st.one_of(st.none(), st.integers(1, 50)), label="chunk")
    return inputs, reduction, chunk


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_property_matches_reference_or_raises(data):
    inputs, reduction, chunk = _hypothesis_case(data)
    try:
        loss = linear_cross_entropy(**inputs, reduction=reduction, chunk_size=chunk)
    except (ValueError, TypeError):
        invalid = (
            reduction == "bad"
            or inputs["weight"].shape[1] != inputs["hidden"].shape[1]
            or inputs["weight"].dtype != inputs["hidden"].dtype
            or bool((inputs["targets"] >= inputs["weight"].shape[0]).any())
        )
        assert invalid, "a valid input was rejected"
        return
    assert reduction != "bad"
    ref = linear_cross_entropy_reference(
        **{k: t.float() if t.is_floating_point() else t for k, t in inputs.items()},
        reduction=reduction,
    )
    assert torch.isfinite(loss).all()
    atol, rtol = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2)}.get(
        inputs["hidden"].dtype, (2e-3, 2e-3)
    )
    torch.testing.assert_close(loss, ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_dw_in_vocab_blocks(monkeypatch, dtype):
    # (the package attribute of that name is the function, hence sys.modules)
    lce = sys.modules["minigpt.kernels.linear_cross_entropy"]
    monkeypatch.setattr(lce, "DW_BLOCK_ELEMENTS", 7 * 12)  # blocks of 7 vocab rows
    _check(_inputs(30, 12, 50, dtype, ignore_every=4, bias=True), "cpp", chunk_size=8)


def test_grad_scaling_and_second_backward_is_refused():
    inputs = _inputs(10, 8, 20, torch.float32)
    h = inputs["hidden"].requires_grad_()
    loss = linear_cross_entropy(h, inputs["weight"], inputs["targets"])
    (3.0 * loss).backward(retain_graph=True)
    ref_h = h.detach().clone().requires_grad_()
    (3.0 * linear_cross_entropy_reference(ref_h, inputs["weight"], inputs["targets"])).backward()
    torch.testing.assert_close(h.grad, ref_h.grad)
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()  # the saved gradients were scaled in place by the first pass


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("isa", ISAS)
def test_accumulate_f32(dtype, isa):
    acc = random_tensor((3, 37))
    part = random_tensor((3, 37), dtype)
    expected = acc + 0.5 * part.float()
    with force_cpu_isa(isa):
        torch.ops.minigpt.accumulate_f32_(acc, part, 0.5)
    torch.testing.assert_close(acc, expected)
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.minigpt.accumulate_f32_(part.double(), part, 1.0)


@pytest.mark.parametrize("isa", ISAS)
def test_split_f32_accumulator_is_exactly_float32(isa):
    # The bfloat16 dW accumulator: a float32 kept as bf16 top half + int16 bottom
    # half. Summing into it must give bit for bit the float32 sum, and the final
    # rounding the bfloat16 of that sum (round to nearest even, as torch).
    shape = (3, 37)  # odd sizes: vector body and tail
    hi = torch.zeros(shape, dtype=torch.bfloat16)
    lo = torch.zeros(shape, dtype=torch.int16)
    acc = torch.zeros(shape)
    with force_cpu_isa(isa):
        for alpha in (0.5, -1.25, 3.0, 1e-3):
            part = random_tensor(shape, torch.bfloat16)
            torch.ops.minigpt.accumulate_split_f32_(hi, lo, part, alpha)
            torch.ops.minigpt.accumulate_f32_(acc, part, alpha)
        bits = (hi.view(torch.int16).int() << 16) | (lo.int() & 0xFFFF)
        assert torch.equal(bits.view(torch.float32), acc)
        torch.ops.minigpt.round_split_to_bf16_(hi, lo)
    assert torch.equal(hi, acc.bfloat16())
    with pytest.raises(RuntimeError, match="int16"):
        torch.ops.minigpt.round_split_to_bf16_(hi, lo.float())
