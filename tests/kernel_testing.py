"""Shared helpers for testing a kernel against its float32 reference.

The pattern of every kernel test::

    def test_rms_norm(dtype, shape, backend):
        x = random_tensor(shape, dtype)
        w = random_tensor(shape[-1:], dtype)
        check_op(lambda x, w: rms_norm(x, w, backend=backend),
                 rms_norm_reference, {"x": x, "weight": w}, grads=("x", "weight"))

``check_op`` runs the op on the given (low-precision) inputs and the reference
on float32 copies of the *same* values, compares the outputs with per-dtype
tolerances, then back-propagates one random upstream gradient through both and
compares every input gradient. Failures print a report: worst element, its
index, and how many elements are out of tolerance.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Every C++ op is tested on each SIMD variant (csrc/cpu/isa.h), forced in turn.
ISAS = ("avx512", "avx2", "scalar")


def require_isa(isa: str) -> None:
    """Fail (never skip) a test that needs an instruction set this CPU lacks."""
    import pytest

    order = {"scalar": 0, "avx2": 1, "avx512": 2}
    if order[isa] > order[torch.ops.minigpt.cpu_isa_detected()]:
        pytest.fail(f"CPU lacks {isa}; run on an AVX-512 machine")


# (atol, rtol) per dtype for outputs of O(1) magnitude. These are the usual
# choices of kernel libraries: a few units in the last place of each dtype.
TOLERANCES = {
    torch.float32: (1e-5, 1.3e-5),
    torch.bfloat16: (1e-2, 1.6e-2),
    torch.float16: (1e-3, 1e-3),
}


def tolerance(dtype: torch.dtype, scale: float = 1.0) -> tuple[float, float]:
    """(atol, rtol) for ``dtype``; ``scale`` widens both for long reductions."""
    atol, rtol = TOLERANCES[dtype]
    return atol * scale, rtol * scale


def random_tensor(
    shape: Sequence[int],
    dtype: torch.dtype = torch.float32,
    *,
    scale: float = 1.0,
    requires_grad: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Standard-normal values times ``scale`` (never zeros), cast to ``dtype``."""
    t = (torch.randn(tuple(shape), generator=generator) * scale).to(dtype)
    return t.requires_grad_(requires_grad)


def mismatch_report(
    actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, name: str
) -> str | None:
    """None if ``actual`` matches ``expected`` within tolerance, else a readable report."""
    if actual.shape != expected.shape:
        return f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    a, e = actual.detach().double(), expected.detach().double()
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    if not torch.equal(nan_a, nan_e):
        return f"{name}: NaN pattern differs ({int(nan_a.sum())} vs {int(nan_e.sum())} NaNs)"
    a, e = a.masked_fill(nan_a, 0), e.masked_fill(nan_e, 0)
    err = (a - e).abs()
    bad = err > atol + rtol * e.abs()
    if not bool(bad.any()):
        return None
    worst = int(torch.argmax(err - rtol * e.abs()))
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), a.shape))
    return (
        f"{name}: {int(bad.sum())}/{a.numel()} elements out of tolerance "
        f"(atol={atol:g}, rtol={rtol:g}); worst at {idx}: got {a.flatten()[worst]:.6g}, "
        f"expected {e.flatten()[worst]:.6g}; max abs err {float(err.max()):.3g}"
    )


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    dtype: torch.dtype | None = None,
    *,
    name: str = "output",
    atol: float | None = None,
    rtol: float | None = None,
) -> None:
    """Assert closeness with the tolerance of ``dtype`` (default: ``actual.dtype``)."""
    d_atol, d_rtol = tolerance(dtype or actual.dtype)
    report = mismatch_report(
        actual, expected, d_atol if atol is None else atol, d_rtol if rtol is None else rtol, name
    )
    assert report is None, report


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute difference, computed in float64."""
    return float((actual.detach().double() - expected.detach().double()).abs().max())


def assert_error_no_worse(
    actual: torch.Tensor,
    eager: torch.Tensor,
    expected: torch.Tensor,
    *,
    factor: float = 2.0,
    floor: float = 1e-6,
    name: str = "output",
) -> None:
    """The kernel's error vs the float32 reference is at most ``factor`` x the error
    of plain eager PyTorch run in the same low precision (plus a tiny ``floor``).

    This is the fairest tolerance for long reductions (attention, big matmuls):
    it asks only that we are as accurate as the framework op we replace.
    """
    ours, theirs = max_error(actual, expected), max_error(eager, expected)
    assert ours <= factor * theirs + floor, (
        f"{name}: max error {ours:.3g} vs eager {theirs:.3g} (allowed {factor}x + {floor:g})"
    )


def _as_tuple(out: object) -> tuple[torch.Tensor, ...]:
    if isinstance(out, torch.Tensor):
        return (out,)
    return tuple(o for o in out if isinstance(o, torch.Tensor))  # type: ignore[union-attr]


def check_op(
    op: Callable[..., object],
    reference: Callable[..., object],
    inputs: Mapping[str, object],
    *,
    grads: Sequence[str] = (),
    dtype: torch.dtype | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    grad_tol_scale: float = 1.0,
    outputs_for_grad: Sequence[int] | None = None,
) -> None:
    """Compare ``op`` with ``reference`` forward and (for ``grads``) backward.

    Args:
        op: the kernel under test, called with ``inputs`` as keyword arguments.
        reference: the float32 specification, called with float32 copies.
        inputs: tensors (any float dtype) and other keyword arguments.
        grads: names of tensor inputs whose gradients are compared.
        dtype: dtype that sets the tolerance (default: the first tensor's dtype).
        atol, rtol: override the per-dtype tolerance of the outputs.
        grad_tol_scale: widen gradient tolerances (long reductions such as a
            weight gradient summed over many rows).
        outputs_for_grad: which outputs receive an upstream gradient (default all).
    """
    tensors = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    if dtype is None:
        dtype = next(iter(tensors.values())).dtype
    ours_in: dict[str, object] = {}
    ref_in: dict[str, object] = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor):
            ours_in[k] = v.detach().clone().requires_grad_(k in grads)
            ref_v = v.detach().clone()
            if ref_v.is_floating_point():
                ref_v = ref_v.float()
            ref_in[k] = ref_v.requires_grad_(k in grads)
        else:
            ours_in[k] = ref_in[k] = v
    out = _as_tuple(op(**ours_in))
    ref = _as_tuple(reference(**ref_in))
    assert len(out) == len(ref), f"op returned {len(out)} tensors, reference {len(ref)}"
    d_atol, d_rtol = tolerance(dtype)
    atol = d_atol if atol is None else atol
    rtol = d_rtol if rtol is None else rtol
    for i, (o, r) in enumerate(zip(out, ref)):
        report = mismatch_report(o.float(), r.float(), atol, rtol, f"output[{i}]")
        assert report is None, report
    if not grads:
        return
    picks = range(len(out)) if outputs_for_grad is None else outputs_for_grad
    upstream = [torch.randn(ref[i].shape) for i in picks]
    torch.autograd.backward(
        [out[i] for i in picks], [u.to(out[i].dtype) for u, i in zip(upstream, picks)]
    )
    # the reference sees the same (rounded) upstream values as the op
    torch.autograd.backward(
        [ref[i] for i in picks], [u.to(out[i].dtype).float() for u, i in zip(upstream, picks)]
    )
    for k in grads:
        g, gr = ours_in[k].grad, ref_in[k].grad  # type: ignore[union-attr]
        assert g is not None, f"no gradient reached input {k!r}"
        assert g.dtype == ours_in[k].dtype, f"grad of {k} has dtype {g.dtype}"  # type: ignore[union-attr]
        # gradients of O(1) values can be O(sqrt(n)): scale atol with the magnitude
        mag = max(1.0, float(gr.abs().max()))
        report = mismatch_report(
            g.float(), gr.float(), atol * grad_tol_scale * mag, rtol * grad_tol_scale, f"grad {k}"
        )
        assert report is None, report
