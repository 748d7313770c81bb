"""Mixture-of-experts ops: routing, permute/unpermute, grouped GEMM and the fused expert
MLP, every backend against the naive per-token loops of minigpt.kernels.reference.moe."""

import pytest
import torch
from kernel_testing import DTYPES, ISAS, assert_error_no_worse, check_op, random_tensor, require_isa

from minigpt.kernels import force_cpu_isa
from minigpt.kernels import moe as M
from minigpt.kernels.reference import moe as R


def uneven_ids(n: int, n_experts: int, k: int, *, empty=(1,), drop_every: int = 5) -> torch.Tensor:
    """(n, k) expert ids with skewed group sizes, some experts never used and some
    assignments dropped (-1); each token's ids are distinct."""
    gen = torch.Generator().manual_seed(n * 31 + n_experts * 7 + k)
    usable = [e for e in range(n_experts) if e not in empty]
    # skewed: low expert ids are much more popular
    probs = torch.tensor([1.0 / (1 + i) for i in range(len(usable))])
    ids = torch.empty(n, k, dtype=torch.long)
    for t in range(n):
        pick = torch.multinomial(probs, k, replacement=False, generator=gen)
        ids[t] = torch.tensor(usable)[pick]
    ids.view(-1)[::drop_every] = -1
    return ids


def expert_weights(n_experts, d, f, dtype, scale=0.3):
    return (
        random_tensor((n_experts, 2 * f, d), dtype, scale=scale),
        random_tensor((n_experts, d, f), dtype, scale=scale),
    )


# ---- routing -------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("gate", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize", [False, True])
def test_topk_routing_matches_reference(k, gate, renormalize):
    logits = random_tensor((29, 8), scale=2.0)
    check_op(
        lambda logits: M.moe_topk_routing(logits, k, gate=gate, renormalize=renormalize)[1],
        lambda logits: R.topk_routing_reference(logits, k, gate, renormalize)[1],
        {"logits": logits},
        grads=("logits",),
    )
    ids, _ = M.moe_topk_routing(logits, k, gate=gate, renormalize=renormalize)
    assert torch.equal(ids, R.topk_routing_reference(logits, k, gate, renormalize)[0])


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("capacity", [0, 1, 3, 7, 100])
def test_capacity_dropping_matches_reference_exactly(k, capacity):
    # skewed logits: a few experts are everyone's favourite, so they overflow
    logits = random_tensor((41, 8)) + torch.tensor([3.0, 2.0, 1.0, 0, 0, 0, 0, 0])
    ids, _ = M.moe_topk_routing(logits, k)
    dropped = M.moe_drop_over_capacity(ids, 8, capacity)
    ref_ids, _ = R.topk_routing_reference(logits, k, capacity=capacity)
    assert torch.equal(dropped, ref_ids)
    kept = torch.bincount(dropped[dropped >= 0], minlength=8)
    assert int(kept.max()) <= capacity


def test_switch_capacity_formula():
    assert R.expert_capacity(4096, 64, 1, 1.25) == 80
    assert M.expert_capacity(10, 8, 2, 1.0) == 3  # ceil(2.5)


@pytest.mark.parametrize("capacity", [1, 4, 13, 50])
def test_expert_choice_matches_reference(capacity):
    logits = random_tensor((23, 6), scale=2.0)
    ids, w = M.moe_expert_choice_routing(logits, capacity)
    ref_ids, ref_w = R.expert_choice_routing_reference(logits, capacity)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(w, ref_w)
    assert ((ids >= 0).sum(0) == min(capacity, 23)).all()  # every expert is full


@pytest.mark.parametrize("gate", ["softmax", "sigmoid"])
def test_aux_losses_match_their_formulas(gate):
    logits = random_tensor((37, 8), scale=2.0, requires_grad=True)
    ids, _ = M.moe_topk_routing(logits, 2, gate=gate)
    probs = M.router_probs(logits, gate)
    ref_probs = R.router_probs_reference(logits, gate)
    torch.testing.assert_close(probs, ref_probs)
    torch.testing.assert_close(probs.sum(-1), torch.ones(37))
    lb = M.load_balancing_loss(probs, ids, 8)
    ref_lb = R.load_balancing_loss_reference(ref_probs, ids, 8)
    torch.testing.assert_close(lb, ref_lb)
    (g,) = torch.autograd.grad(lb, logits)
    (gr,) = torch.autograd.grad(ref_lb, logits)
    torch.testing.assert_close(g, gr)
    z = M.router_z_loss(logits)
    torch.testing.assert_close(z, R.router_z_loss_reference(logits))
    torch.testing.assert_close(z, (torch.logsumexp(logits, -1) ** 2).mean())


def test_load_balancing_loss_is_one_when_uniform():
    n, e = 64, 8
    probs = torch.full((n, e), 1.0 / e)
    ids = torch.arange(n * 2).view(n, 2) % e
    torch.testing.assert_close(M.load_balancing_loss(probs, ids, e), torch.tensor(1.0))
    # all tokens on expert 0 with certainty: E * 1 * 1
    probs = torch.zeros(n, e)
    probs[:, 0] = 1
    assert float(M.load_balancing_loss(probs, torch.zeros(n, 1, dtype=torch.long), e)) == e


# ---- data movement and grouped GEMM ---------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("isa", ISAS)
def test_permute_unpermute_cpp(dtype, isa):
    require_isa(isa)
    n, d, e, k = 53, 37, 7, 3
    ids = uneven_ids(n, e, k, empty=(2, 5))
    x = random_tensor((n, d), dtype)
    with force_cpu_isa(isa):
        xp, off, slot = M.moe_permute(x, ids, e, backend="cpp")
        rxp, roff, rslot = R.moe_permute_reference(x, ids, e)
        assert torch.equal(xp, rxp) and torch.equal(off, roff) and torch.equal(slot, rslot)
        assert off[3] == off[2] and off[6] == off[5]  # empty groups
        check_op(
            lambda x: M.moe_permute(x, ids, e, backend="cpp")[0],
            lambda x: R.moe_permute_reference(x, ids, e)[0],
            {"x": x},
            grads=("x",),
        )
        y_perm = random_tensor((xp.shape[0], d), dtype)
        w = torch.rand(n, k)
        check_op(
            lambda y_perm, weights: M.moe_unpermute(y_perm, slot, weights, backend="cpp"),
            lambda y_perm, weights: R.moe_unpermute_reference(y_perm, slot, weights),
            {"y_perm": y_perm, "weights": w},
            grads=("y_perm", "weights"),
            dtype=dtype,
        )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sizes", [[5, 0, 17, 1, 0], [0, 0, 3], [64, 64]])
def test_grouped_mm_cpp(dtype, sizes):
    kdim, nout = 33, 20
    offsets = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()])
    x = random_tensor((sum(sizes), kdim), dtype, scale=0.3)
    w = random_tensor((len(sizes), nout, kdim), dtype, scale=0.3)
    check_op(
        lambda x, w: M.grouped_mm(x, w, offsets, backend="cpp"),
        lambda x, w: R.grouped_mm_reference(x, w, offsets),
        {"x": x, "w": w},
        grads=("x", "w"),
        grad_tol_scale=4.0,  # dw sums up to 64 products of low-precision values
    )
    if 0 in sizes and dtype == torch.float32:  # an empty group's weight gradient is zero
        w2 = w.clone().requires_grad_()
        M.grouped_mm(x, w2, offsets, backend="cpp").sum().backward()
        assert (w2.grad[sizes.index(0)] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("isa", ["avx512", "scalar"])
def test_in_place_backward_ops_equal_out_of_place(dtype, isa):
    # the fused MLP's backward writes each gradient over the activation it replaces;
    # the in-place forms must give bit-identical results to the out-of-place ones
    require_isa(isa)
    ops = torch.ops.minigpt
    n, d, f, e, k = 41, 24, 40, 6, 2
    ids = uneven_ids(n, e, k, empty=(3,))
    _, off, slot = M.moe_permute(random_tensor((n, d)), ids, e, backend="cpp")
    m = int(off[-1])
    weights, dy = torch.rand(n, k), random_tensor((n, d), dtype)
    y_perm, x = random_tensor((m, d), dtype), random_tensor((m, d), dtype, scale=0.3)
    dy_perm, gate_up = random_tensor((m, 2 * f), dtype), random_tensor((m, 2 * f), dtype)
    dh, w = random_tensor((m, f), dtype), random_tensor((e, 2 * f, d), dtype, scale=0.3)
    with force_cpu_isa(isa):
        want_dyp, want_dw = ops.moe_unpermute_bwd(dy, y_perm, slot, weights)
        buf = y_perm.clone()
        assert torch.equal(ops.moe_unpermute_bwd_(dy, buf, slot, weights), want_dw)
        assert torch.equal(buf, want_dyp)
        want_dgu = ops.moe_swiglu_bwd(dh, gate_up)
        buf = gate_up.clone()
        ops.moe_swiglu_bwd_(dh, buf)
        assert torch.equal(buf, want_dgu)
    for need_dx, need_dw in [(True, True), (True, False), (False, True)]:
        want_dx, want_dw = ops.grouped_mm_bwd(dy_perm, x, w, off, need_dx, need_dw)
        buf = x.clone()
        got_dw = ops.grouped_mm_bwd_(dy_perm, buf, w, off, need_dx, need_dw)
        assert torch.equal(got_dw, want_dw)
        assert torch.equal(buf, want_dx if need_dx else x)


def test_weight_gradient_from_the_output_pool_is_fully_written():
    # dw comes from the C++ output pool (csrc/cpu/output_pool.h), whose recycled blocks
    # hold stale data: poison one, then every expert's gradient -- an empty group's
    # zeros included -- must be written over it
    ops = torch.ops.minigpt
    e, nout, kdim = 4, 256, 256  # dw: 1 MiB of float32, large enough to be pooled
    sizes = [70, 0, 50, 8]
    offsets = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()])
    x, dy = random_tensor((128, kdim)), random_tensor((128, nout))
    w = random_tensor((e, nout, kdim))
    ops.cpu_pool_empty_cache()
    stale = ops.grouped_mm_fwd(
        random_tensor((1024, kdim)), w[:1].contiguous(), offsets[[0, -1]] * 8
    )
    stale.fill_(float("nan"))  # 1 MiB: the same pool block size as dw
    del stale
    assert ops.cpu_pool_cached_bytes() > 0
    _, dw = ops.grouped_mm_bwd(dy, x, w, offsets, False, True)
    assert ops.cpu_pool_cached_bytes() == 0  # dw took the poisoned block
    want = R.grouped_mm_reference(x, w.requires_grad_(), offsets)
    (want_dw,) = torch.autograd.grad(want, w, dy)
    torch.testing.assert_close(dw, want_dw)


# ---- the fused expert MLP --------------------------------------------------------------------


def _mlp_and_grads(fn, inputs, dy):
    leaves = {
        k: v.detach().clone().requires_grad_(v.is_floating_point()) for k, v in inputs.items()
    }
    y = fn(**leaves)
    names = [k for k, v in leaves.items() if v.requires_grad]
    grads = torch.autograd.grad(y, [leaves[k] for k in names], dy.to(y.dtype))
    return y, dict(zip(names, grads))


# every k on the best ISA; the AVX2 and scalar row kernels once each (k only changes
# how many rows a token combines, which the best ISA's cases already cover)
ISA_K = [("avx512", 1), ("avx512", 2), ("avx512", 4), ("avx2", 2), ("scalar", 3)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("isa, k", ISA_K)
def test_expert_mlp_cpp_matches_per_token_reference(dtype, isa, k):
    require_isa(isa)
    n, d, f, e = 31, 24, 40, 6
    ids = uneven_ids(n, e, k, empty=(4,))
    wgu, wd = expert_weights(e, d, f, dtype)
    inputs = {
        "x": random_tensor((n, d), dtype),
        "expert_ids": ids,
        "weights": torch.rand(n, k),
        "w_gate_up": wgu,
        "w_down": wd,
    }
    with force_cpu_isa(isa):
        if dtype == torch.float32:
            check_op(
                lambda **kw: M.moe_expert_mlp(**kw, backend="cpp"),
                R.moe_mlp_reference,
                inputs,
                grads=("x", "weights", "w_gate_up", "w_down"),
            )
            return
        # low precision: three GEMMs in a chain, each rounding its output, so compare
        # errors vs the float32 spec with those of the eager loop in the same dtype
        dy = random_tensor((n, d))
        ours, g_ours = _mlp_and_grads(
            lambda **kw: M.moe_expert_mlp(**kw, backend="cpp"), inputs, dy
        )
    eager, g_eager = _mlp_and_grads(R.moe_mlp_loop_over_experts, inputs, dy)
    f32 = {k: (v.float() if v.is_floating_point() else v) for k, v in inputs.items()}
    ref, g_ref = _mlp_and_grads(R.moe_mlp_reference, f32, dy)
    assert ours.dtype == dtype
    assert_error_no_worse(ours, eager, ref, name="y", floor=1e-3)
    for name in g_ref:
        assert g_ours[name].dtype == inputs[name].dtype
        assert_error_no_worse(g_ours[name], g_eager[name], g_ref[name], name=name, floor=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_expert_mlp_triton_matches_per_token_reference(dtype):
    # interpreter: small shapes; uneven groups, an empty expert, dropped assignments,
    # rows and widths that are not multiples of the 32-wide tiles
    n, d, f, e, k = 37, 24, 40, 6, 2
    ids = uneven_ids(n, e, k, empty=(3,))
    wgu, wd = expert_weights(e, d, f, dtype)
    inputs = {"x": random_tensor((n, d), dtype), "expert_ids": ids, "weights": torch.rand(n, k)}
    inputs |= {"w_gate_up": wgu, "w_down": wd}
    dy = random_tensor((n, d))
    ours, g_ours = _mlp_and_grads(lambda **kw: M.moe_expert_mlp(**kw, backend="triton"), inputs, dy)
    f32 = {k: (v.float() if v.is_floating_point() else v) for k, v in inputs.items()}
    ref, g_ref = _mlp_and_grads(R.moe_mlp_reference, f32, dy)
    if dtype == torch.float32:
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
        for name in g_ref:
            torch.testing.assert_close(g_ours[name], g_ref[name], atol=2e-5, rtol=2e-5)
        return
    # Triton's interpreter converts float32 -> bfloat16 by truncation, not round to
    # nearest even as GPUs do (checked: half of random values differ by 1 ulp), so the
    # chain of three rounded GEMM outputs drifts up to a few bf16 ulps (2^-8 relative)
    # of the largest value: allow 3% of each tensor's max magnitude.
    for name, got, want in [("y", ours, ref)] + [(k, g_ours[k], g_ref[k]) for k in g_ref]:
        err = float((got.float() - want).abs().max())
        assert err <= 0.03 * float(want.abs().max()), f"{name}: max error {err:.3g}"


def test_triton_permute_unpermute_grouped_mm():
    n, d, e, k = 29, 40, 5, 3
    ids = uneven_ids(n, e, k, empty=(1,))
    x = random_tensor((n, d))
    xp, off, slot = M.moe_permute(x, ids, e, backend="triton")
    rxp, roff, rslot = R.moe_permute_reference(x, ids, e)
    assert torch.equal(xp, rxp) and torch.equal(off, roff) and torch.equal(slot, rslot)
    check_op(
        lambda y_perm, weights: M.moe_unpermute(y_perm, slot, weights, backend="triton"),
        lambda y_perm, weights: R.moe_unpermute_reference(y_perm, slot, weights),
        {"y_perm": random_tensor((xp.shape[0], d)), "weights": torch.rand(n, k)},
        grads=("y_perm", "weights"),
    )
    check_op(
        lambda x: M.moe_permute(x, ids, e, backend="triton")[0],
        lambda x: R.moe_permute_reference(x, ids, e)[0],
        {"x": x},
        grads=("x",),
    )
    check_op(
        lambda x, w: M.grouped_mm(x, w, off, backend="triton"),
        lambda x, w: R.grouped_mm_reference(x, w, off),
        {"x": random_tensor((xp.shape[0], 33), scale=0.3), "w": random_tensor((e, 45, 33))},
        grads=("x", "w"),
    )


def test_expert_mlp_torch_backend_matches_reference():
    n, d, f, e, k = 19, 16, 24, 5, 2
    ids = uneven_ids(n, e, k, empty=(0, 3))
    wgu, wd = expert_weights(e, d, f, torch.float32)
    check_op(
        lambda **kw: M.moe_expert_mlp(**kw, backend="torch"),
        R.moe_mlp_reference,
        {"x": random_tensor((n, d)), "expert_ids": ids, "weights": torch.rand(n, k)}
        | {"w_gate_up": wgu, "w_down": wd},
        grads=("x", "weights", "w_gate_up", "w_down"),
    )


def test_expert_mlp_all_dropped_gives_zeros():
    x = random_tensor((6, 8), requires_grad=True)
    wgu, wd = expert_weights(3, 8, 4, torch.float32)
    ids = torch.full((6, 2), -1)
    y = M.moe_expert_mlp(x, ids, torch.rand(6, 2), wgu, wd)
    assert torch.equal(y, torch.zeros(6, 8))
    y.sum().backward()
    assert torch.equal(x.grad, torch.zeros(6, 8))


def test_expert_mlp_bigger_shape_threads():
    # enough rows that every op splits across threads
    n, d, f, e, k = 700, 64, 96, 8, 2
    ids, w = M.moe_topk_routing(random_tensor((n, e)), k)
    wgu, wd = expert_weights(e, d, f, torch.float32, scale=0.1)
    x = random_tensor((n, d))
    y = M.moe_expert_mlp(x, ids, w, wgu, wd, backend="cpp")
    torch.testing.assert_close(
        y, R.moe_mlp_loop_over_experts(x, ids, w, wgu, wd), atol=2e-5, rtol=2e-5
    )


# ---- bad input ---------------------------------------------------------------------------------


def _good():
    wgu, wd = expert_weights(4, 8, 6, torch.float32)
    return {
        "x": random_tensor((5, 8)),
        "expert_ids": torch.zeros(5, 2, dtype=torch.long),
        "weights": torch.rand(5, 2),
        "w_gate_up": wgu,
        "w_down": wd,
    }


@pytest.mark.parametrize(
    "change, err, match",
    [
        ({"x": torch.randn(5, 8, 1)}, ValueError, "x must be 2-D"),
        ({"x": torch.randn(5, 8).double()}, TypeError, "x must have dtype"),
        ({"expert_ids": torch.full((5, 2), 4)}, ValueError, "expert_ids must be in"),
        ({"expert_ids": torch.full((5, 2), -2)}, ValueError, "expert_ids must be in"),
        ({"expert_ids": torch.zeros(5, 2)}, TypeError, "expert_ids must have dtype"),
        ({"expert_ids": torch.zeros(4, 2, dtype=torch.long)}, ValueError, "rows"),
        ({"weights": torch.rand(5, 3)}, ValueError, "weights shape"),
        ({"w_gate_up": torch.randn(4, 12, 8).half()}, TypeError, "w_gate_up dtype"),
        ({"w_gate_up": torch.randn(4, 11, 8)}, ValueError, "even"),
        ({"w_down": torch.randn(4, 8, 5)}, ValueError, "w_down must be"),
        ({"w_gate_up": [1.0]}, TypeError, "w_gate_up must be a torch.Tensor"),
    ],
)
def test_expert_mlp_bad_input(change, err, match):
    with pytest.raises(err, match=match):
        M.moe_expert_mlp(**(_good() | change))


def test_other_ops_bad_input():
    x = random_tensor((4, 8))
    with pytest.raises(ValueError, match="n_experts"):
        M.moe_permute(x, torch.zeros(4, 1, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="slot_of must be in"):
        M.moe_unpermute(x, torch.full((4, 1), 9), torch.rand(4, 1))
    with pytest.raises(ValueError, match="offsets"):
        M.grouped_mm(x, torch.randn(2, 3, 8), torch.tensor([0, 3, 2]))
    with pytest.raises(ValueError, match="offsets"):
        M.grouped_mm(x, torch.randn(2, 3, 8), torch.tensor([0, 1, 2, 4]))
    with pytest.raises(ValueError, match="columns"):
        M.grouped_mm(x, torch.randn(2, 3, 7), torch.tensor([0, 1, 4]))
    with pytest.raises(ValueError, match="k must be"):
        M.moe_topk_routing(torch.randn(4, 3), 4)
    with pytest.raises(ValueError, match="gate must be"):
        M.moe_topk_routing(torch.randn(4, 3), 1, gate="relu")
    with pytest.raises(ValueError, match="capacity"):
        M.moe_drop_over_capacity(torch.zeros(4, 1, dtype=torch.long), 3, -1)
    with pytest.raises(ValueError, match="capacity"):
        M.moe_expert_choice_routing(torch.randn(4, 3), 0)


@pytest.mark.slow  # 15-30 s, all of it torch.compile itself
def test_torch_compile_fullgraph_runs_the_expert_mlp():
    # the permuted row count M is data-dependent (an unbacked size in the fakes); under
    # torch.compile the MLP runs as a chain of single ops whose outputs carry M, so the
    # whole call is one graph (fullgraph=True), with the values and gradients of eager
    n, d, f, e, k = 10, 16, 32, 4, 2
    ids, w = torch.randint(0, e, (n, k)), torch.rand(n, k)
    ids[0, 1] = -1  # a dropped assignment
    wgu, wd = expert_weights(e, d, f, torch.float32)
    inputs = {"x": random_tensor((n, d)), "weights": w, "w_gate_up": wgu, "w_down": wd}
    dy = random_tensor((n, d))

    def run(fn):
        leaves = {name: t.detach().clone().requires_grad_() for name, t in inputs.items()}
        y = fn(leaves["x"], ids, leaves["weights"], leaves["w_gate_up"], leaves["w_down"])
        return y, torch.autograd.grad(y, list(leaves.values()), dy)

    compiled = torch.compile(
        lambda *a: M.moe_expert_mlp(*a, backend="cpp"), fullgraph=True, dynamic=False
    )
    y, grads = run(compiled)
    y_ref, grads_ref = run(R.moe_mlp_reference)
    torch.testing.assert_close(y, y_ref)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want)
