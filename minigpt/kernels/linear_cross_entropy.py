"""Fused LM head + cross-entropy that never builds the full (N, V) logits.

The last layer of a language model multiplies N hidden vectors by the (V, H)
vocabulary matrix and takes a softmax cross-entropy over V classes. Done
eagerly, the (N, V) logits exist several times at once (logits, log-softmax,
their gradient): with N = 8192 tokens and V = 32k that is ~1 GiB per float32
copy, usually the biggest tensor of the whole training step.

:func:`linear_cross_entropy` walks over the rows in chunks instead. For each
chunk of C rows::

    logits = h_c @ W^T (+ b)                      (C, V), torch matmul
    loss_c, lse_c, logits <- grad                 fused kernel, in place:
                                                  grad = (softmax - onehot) * scale
    dh_c   = grad @ W                             (C, H), torch matmul
    dW    += grad^T @ h_c                         (V, H), float32 accumulator
    db    += grad.sum(0)                          (V,),   float32 accumulator

so only one (C, V) block is alive at a time. For ``reduction="mean"``/``"sum"``
the gradients are computed during the forward pass (the upstream gradient of a
scalar loss only rescales them, so backward is one multiply and nothing is
recomputed). For ``reduction="none"`` each row has its own upstream gradient,
which cannot be applied to an already-summed dW, so the forward pass only saves
the float32 logsumexp per row and backward redoes the chunk loop with the exact
per-row scales (one extra logits matmul; no max/sum passes).

Extras that cost nothing because the kernel has the row's logsumexp at hand:
``z_loss`` (PaLM's ``z * lse**2`` auxiliary loss, folded into the gradient) and
``return_lse`` (the per-row logsumexp, for logging).

Rows whose target is ``ignore_index`` are dropped before any matmul (prompt
masking in fine-tuning often ignores half the rows, and they cost nothing here).

Chunk size: by default each chunk's logits take about ``CHUNK_BYTES`` (64 MiB)
in float32 and ``CHUNK_BYTES_16BIT`` (28 MiB) in bfloat16/float16, i.e.
``C = bytes / (itemsize * V)`` rows, at least 64: 512 float32 / 458 bfloat16
rows at V = 32k, 128 / 114 at V = 128k. That bounds the extra memory
independently of N, while C stays large enough that the three matmuls run near
peak and the (V, H) float32 accumulator update (one read + write of dW per
chunk) costs a few percent. The 16-bit budget is smaller because there the
float32 dW accumulator (4 bytes per weight, twice the weight itself) dominates
the footprint, and eager's own peak is half that of float32: at N = 4096,
H = 1024, V = 32k in bfloat16 the step peaks near 180 MiB (accumulator 125,
chunk 26, dW block 16, dh 8) against eager's ~750. Pass ``chunk_size`` to override.

bfloat16 on CPU keeps the float32 accumulator split in two 16-bit halves (the
top half is the bfloat16 result, rounded in place at the end), so no float32 to
bfloat16 copy of the (V, H) gradient is ever made.

Backends: the chunk kernel is C++ (``torch.ops.minigpt.cross_entropy_chunk``,
CPU) or Triton (:mod:`minigpt.kernels.triton.cross_entropy`, CUDA or the
interpreter); the matmuls are torch's in both. The loop runs inside the opaque
custom ops ``minigpt::linear_cross_entropy_fwd`` / ``_bwd``, so ``torch.compile``
sees two nodes with fake (shape-only) implementations and no graph break.
"""

from __future__ import annotations

import torch

from minigpt.kernels._backend import cpp_available, register_op, select_backend
from minigpt.kernels._checks import check_same_device, check_tensor
from minigpt.kernels.reference.cross_entropy import linear_cross_entropy_reference

register_op("linear_cross_entropy", ("cpp", "triton"))

REDUCTIONS = ("mean", "sum", "none")
CHUNK_BYTES = 64 * 2**20  # target size of one chunk of float32 logits
CHUNK_BYTES_16BIT = 28 * 2**20  # ... of bfloat16/float16 logits (see module docstring)
MIN_CHUNK_ROWS = 64  # below this the matmuls and the dW update lose efficiency
# bf16/fp16: dW partials are computed for this many elements of vocabulary rows at
# a time (8M = 16 MiB) rather than for the whole (V, H) matrix at once. Bigger
# blocks mean fewer, larger GEMMs and accumulator passes: with 2M-element blocks
# (and 40 MiB chunks, same peak memory) the step was 0.88x eager in CPU time,
# with 8M ones 1.04x (N = 4096, H = 1024, V = 32k, 2 threads, loaded machine).
DW_BLOCK_ELEMENTS = 8 * 2**20


def default_chunk_rows(n_rows: int, vocab: int, itemsize: int = 4) -> int:
    """Rows per chunk: logits of about ``CHUNK_BYTES`` (``CHUNK_BYTES_16BIT`` for
    2-byte elements; at least 64 rows) with ``itemsize``-byte elements, and the
    rows split evenly so the last chunk is not a sliver."""
    if n_rows <= 0:
        return 1
    budget = CHUNK_BYTES if itemsize >= 4 else CHUNK_BYTES_16BIT
    rows = max(MIN_CHUNK_ROWS, budget // (itemsize * max(vocab, 1)))
    if rows >= n_rows:
        return n_rows
    n_chunks = -(-n_rows // rows)
    return -(-n_rows // n_chunks)


def _chunk_kernel(backend: str):
    if backend == "cpp":
        return torch.ops.minigpt.cross_entropy_chunk
    from minigpt.kernels.triton.cross_entropy import cross_entropy_chunk

    return cross_entropy_chunk


def _valid_rows(targets: torch.Tensor, ignore_index: int, vocab: int) -> torch.Tensor:
    """Indices of non-ignored rows; a clear ValueError for out-of-range targets."""
    valid = targets != ignore_index
    bad = valid & ((targets < 0) | (targets >= vocab))
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"targets[{row}] = {int(targets[row])} is outside [0, {vocab}) "
            f"and is not ignore_index ({ignore_index})"
        )
    return valid.nonzero().squeeze(1)


def _chunk_logits(h, weight, bias, out):
    if bias is None:
        return torch.mm(h, weight.t(), out=out)
    return torch.addmm(bias, h, weight.t(), out=out)


def _accumulate_grads(
    grad, h, weight, post_scale, dh_out, dw_acc, dw_lo, dw_tmp, db_acc, fused_add
):
    """dh = grad @ W; dW += grad^T h; db += sum(grad), with dW/db in float32.

    ``dw_acc`` is the float32 accumulator, or with ``dw_lo`` given, the bfloat16 top
    half of a split float32 accumulator whose int16 bottom half is ``dw_lo`` (C++
    only, see ``_run_chunks``). ``dw_tmp``: low-precision scratch for a block of dW
    rows (the partials of bf16/fp16 chunks are computed DW_BLOCK_ELEMENTS at a time).
    """
    if dh_out is not None:
        torch.mm(grad, weight, out=dh_out)
        if post_scale != 1.0:
            dh_out.mul_(post_scale)
    if dw_acc is not None:
        if grad.dtype == torch.float32:
            dw_acc.addmm_(grad.t(), h, alpha=post_scale)
        else:
            # CPU has no low-precision matmul with a float32 output: compute the
            # partial in blocks of vocabulary rows and add each to the accumulator
            vb = dw_tmp.shape[0]
            for v0 in range(0, dw_acc.shape[0], vb):
                v1 = min(v0 + vb, dw_acc.shape[0])
                part = torch.mm(grad[:, v0:v1].t(), h, out=dw_tmp[: v1 - v0])
                if dw_lo is not None:
                    torch.ops.minigpt.accumulate_split_f32_(
                        dw_acc[v0:v1], dw_lo[v0:v1], part, post_scale
                    )
                elif fused_add:  # one pass; torch's add_ would first copy part to float32
                    torch.ops.minigpt.accumulate_f32_(dw_acc[v0:v1], part, post_scale)
                else:
                    dw_acc[v0:v1].add_(part, alpha=post_scale)
    if db_acc is not None:
        db_acc.add_(grad.sum(0, dtype=torch.float32), alpha=post_scale)


def _run_chunks(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    ignore_index: int,
    softcap: float,
    z_loss: float,
    chunk_size: int,
    backend: str,
    *,
    lse_in: torch.Tensor | None,
    row_scale: torch.Tensor | None,
    scale: float,
    need: tuple[bool, bool, bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The chunk loop shared by forward and the ``none`` backward.

    Returns per-row float32 (loss, lse) and (dh, dW, db), each empty when not needed.
    """
    kernel = _chunk_kernel(backend)
    N, H = hidden.shape
    V = weight.shape[0]
    need_dh, need_dw, need_db = need
    write_grad = any(need)
    idx = _valid_rows(targets, ignore_index, V)
    n_valid = idx.numel()
    compact = n_valid < N
    h_all = hidden.index_select(0, idx) if compact else hidden
    t_all = targets.index_select(0, idx) if compact else targets
    lse_all = lse_in.index_select(0, idx) if (compact and lse_in is not None) else lse_in
    rs_all = row_scale.index_select(0, idx) if (compact and row_scale is not None) else row_scale
    # float16 gradients (softmax - onehot) / N underflow for large N: scale them
    # after the matmuls instead (per-row scales have no such way out; as eager).
    kernel_scale = 1.0 if hidden.dtype == torch.float16 else scale
    post_scale = scale / kernel_scale if kernel_scale != 0.0 else 0.0

    f32 = dict(device=hidden.device, dtype=torch.float32)
    loss_c = torch.empty(n_valid, **f32)
    lse_c = torch.empty(n_valid, **f32)
    dh_c = torch.empty(n_valid, H, device=hidden.device, dtype=hidden.dtype) if need_dh else None
    low_precision_dw = need_dw and hidden.dtype != torch.float32 and n_valid > 0
    # bfloat16 on CPU: the float32 dW accumulator is stored split in two 16-bit
    # halves, the top one being the bfloat16 result (rounded in place at the end),
    # so no float32 -> bfloat16 copy of (V, H) is made: the peak memory is the
    # 4 bytes per dW element of the accumulator rather than 4 + 2.
    split_dw = low_precision_dw and hidden.dtype == torch.bfloat16 and backend == "cpp"
    dw_lo = torch.zeros(V, H, device=hidden.device, dtype=torch.int16) if split_dw else None
    dw_dtype = torch.bfloat16 if split_dw else torch.float32
    dw_acc = torch.zeros(V, H, device=hidden.device, dtype=dw_dtype) if need_dw else None
    db_acc = torch.zeros(V, **f32) if need_db else None
    dw_rows = max(1, min(V, DW_BLOCK_ELEMENTS // max(H, 1)))
    dw_tmp = (
        torch.empty(dw_rows, H, device=hidden.device, dtype=hidden.dtype)
        if low_precision_dw
        else None
    )
    rows = max(1, min(chunk_size, n_valid))
    buf = torch.empty(rows, V, device=hidden.device, dtype=hidden.dtype) if n_valid else None
    for s in range(0, n_valid, rows):
        e = min(s + rows, n_valid)
        h = h_all[s:e]
        logits = _chunk_logits(h, weight, bias, buf[: e - s])
        loss_c[s:e], lse_c[s:e] = kernel(
            logits,
            t_all[s:e],
            None if lse_all is None else lse_all[s:e],
            None if rs_all is None else rs_all[s:e],
            kernel_scale,
            ignore_index,
            softcap,
            z_loss,
            write_grad,
        )
        if write_grad:
            _accumulate_grads(
                logits,
                h,
                weight,
                post_scale,
                dh_c[s:e] if dh_c is not None else None,
                dw_acc,
                dw_lo,
                dw_tmp,
                db_acc,
                backend == "cpp",
            )
        del logits, h  # views of buf and h_all: they would keep buf alive below
    del buf, dw_tmp
    if dw_lo is not None:
        torch.ops.minigpt.round_split_to_bf16_(dw_acc, dw_lo)
        del dw_lo

    def scatter(values: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        if not compact:
            return values
        out = torch.zeros(shape, device=values.device, dtype=values.dtype)
        return out.index_copy_(0, idx, values)

    # (a fresh empty tensor for each missing gradient: custom-op outputs may not alias)
    loss_rows = scatter(loss_c, (N,))
    lse = scatter(lse_c, (N,))
    dh = scatter(dh_c, (N, H)) if dh_c is not None else hidden.new_empty(0)
    dw = dw_acc.to(weight.dtype) if dw_acc is not None else hidden.new_empty(0)
    db = db_acc.to(bias.dtype) if (db_acc is not None and bias is not None) else hidden.new_empty(0)
    return loss_rows, lse, dh, dw, db


@torch.library.custom_op("minigpt::linear_cross_entropy_fwd", mutates_args=())
def _lce_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    ignore_index: int,
    reduction: str,
    softcap: float,
    z_loss: float,
    chunk_size: int,
    backend: str,
    need_dh: bool,
    need_dw: bool,
    need_db: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chunked forward: (loss, lse, dh, dW, db); the grads only for mean/sum."""
    n_valid = int((targets != ignore_index).sum())
    scale = 1.0
    if reduction == "mean":
        scale = 1.0 / n_valid if n_valid else 0.0  # all ignored: zero loss and grads
    need = (need_dh, need_dw, need_db) if reduction != "none" else (False, False, False)
    loss_rows, lse, dh, dw, db = _run_chunks(
        hidden,
        weight,
        bias,
        targets,
        ignore_index,
        softcap,
        z_loss,
        chunk_size,
        backend,
        lse_in=None,
        row_scale=None,
        scale=scale,
        need=need,
    )
    if reduction == "none":
        loss = loss_rows
    elif reduction == "sum":
        loss = loss_rows.sum()
    else:
        loss = loss_rows.sum() * scale
    return loss, lse, dh, dw, db


@_lce_fwd.register_fake
def _lce_fwd_fake(
    hidden,
    weight,
    bias,
    targets,
    ignore_index,
    reduction,
    softcap,
    z_loss,
    chunk_size,
    backend,
    need_dh,
    need_dw,
    need_db,
):
    N, H = hidden.shape
    f32 = torch.float32
    loss = hidden.new_empty((N,) if reduction == "none" else (), dtype=f32)
    grads = reduction != "none"
    return (
        loss,
        hidden.new_empty(N, dtype=f32),
        torch.empty_like(hidden) if (grads and need_dh) else hidden.new_empty(0),
        torch.empty_like(weight) if (grads and need_dw) else hidden.new_empty(0),
        torch.empty_like(bias) if (grads and need_db and bias is not None) else hidden.new_empty(0),
    )


@torch.library.custom_op("minigpt::linear_cross_entropy_bwd", mutates_args=())
def _lce_bwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    lse: torch.Tensor,
    grad_rows: torch.Tensor,
    ignore_index: int,
    softcap: float,
    z_loss: float,
    chunk_size: int,
    backend: str,
    need_dh: bool,
    need_dw: bool,
    need_db: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of ``reduction="none"``: recompute each chunk's logits, then apply
    the per-row upstream gradient inside the kernel (exact, no re-reduction)."""
    _, _, dh, dw, db = _run_chunks(
        hidden,
        weight,
        bias,
        targets,
        ignore_index,
        softcap,
        z_loss,
        chunk_size,
        backend,
        lse_in=lse,
        row_scale=grad_rows.float().contiguous(),
        scale=1.0,
        need=(need_dh, need_dw, need_db),
    )
    return dh, dw, db


@_lce_bwd.register_fake
def _lce_bwd_fake(
    hidden,
    weight,
    bias,
    targets,
    lse,
    grad_rows,
    ignore_index,
    softcap,
    z_loss,
    chunk_size,
    backend,
    need_dh,
    need_dw,
    need_db,
):
    return (
        torch.empty_like(hidden) if need_dh else hidden.new_empty(0),
        torch.empty_like(weight) if need_dw else hidden.new_empty(0),
        torch.empty_like(bias) if (need_db and bias is not None) else hidden.new_empty(0),
    )


class _LinearCrossEntropyFunction(torch.autograd.Function):
    """Autograd glue. mean/sum: forward returns the gradients with the loss, backward
    scales them. none: forward saves lse, backward recomputes chunk by chunk."""

    @staticmethod
    def forward(
        ctx,
        hidden,
        weight,
        bias,
        targets,
        ignore_index,
        reduction,
        softcap,
        z_loss,
        chunk,
        backend,
        need_dh,
        need_dw,
        need_db,
    ):  # type: ignore[override]
        loss, lse, dh, dw, db = torch.ops.minigpt.linear_cross_entropy_fwd(
            hidden,
            weight,
            bias,
            targets,
            ignore_index,
            reduction,
            softcap,
            z_loss,
            chunk,
            backend,
            need_dh,
            need_dw,
            need_db,
        )
        ctx.reduction = reduction
        ctx.args = (ignore_index, softcap, z_loss, chunk, backend, need_dh, need_dw, need_db)
        if reduction == "none":
            ctx.save_for_backward(hidden, weight, bias, targets, lse)
        else:
            ctx.save_for_backward(dh, dw, db)
        ctx.mark_non_differentiable(lse)
        return loss, lse

    @staticmethod
    def backward(ctx, grad_loss, grad_lse):  # type: ignore[override]
        ignore_index, softcap, z_loss, chunk, backend, need_dh, need_dw, need_db = ctx.args
        if ctx.reduction == "none":
            hidden, weight, bias, targets, lse = ctx.saved_tensors
            dh, dw, db = torch.ops.minigpt.linear_cross_entropy_bwd(
                hidden,
                weight,
                bias,
                targets,
                lse,
                grad_loss.contiguous(),
                ignore_index,
                softcap,
                z_loss,
                chunk,
                backend,
                need_dh,
                need_dw,
                need_db,
            )
        else:
            dh, dw, db = ctx.saved_tensors
            # The loss is a scalar: its upstream gradient only rescales. In place, so
            # no second (V, H) copy exists at the peak and autograd can hand the
            # buffers straight to .grad (a second backward through this node then
            # fails with autograd's "modified by an inplace operation" error).
            dh = dh.mul_(grad_loss) if need_dh else None
            dw = dw.mul_(grad_loss) if need_dw else None
            db = db.mul_(grad_loss) if need_db else None
        return (
            dh if need_dh else None,
            dw if need_dw else None,
            db if need_db else None,
            *([None] * 10),
        )


def _check(hidden, weight, targets, ignore_index, reduction, bias, softcap, z_loss, chunk_size):
    check_tensor(hidden, "hidden", ndim=(2, 3))
    check_tensor(weight, "weight", ndim=2)
    check_tensor(targets, "targets", dtypes=(torch.int64,))
    if bias is not None:
        check_tensor(bias, "bias", ndim=1)
    check_same_device(hidden=hidden, weight=weight, targets=targets, bias=bias)
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} does not match hidden dtype {hidden.dtype}")
    if bias is not None and bias.dtype != hidden.dtype:
        raise TypeError(f"bias dtype {bias.dtype} does not match hidden dtype {hidden.dtype}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must have shape (V, {hidden.shape[-1]}) to match hidden's last "
            f"dimension, got {tuple(weight.shape)}"
        )
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one row (vocabulary size V >= 1)")
    if bias is not None and bias.shape[0] != weight.shape[0]:
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"targets must have shape {tuple(hidden.shape[:-1])} (hidden without its last "
            f"dimension), got {tuple(targets.shape)}"
        )
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
            raise TypeError(f"softcap must be a float or None, got {type(softcap).__name__}")
        if not (0.0 < float(softcap) < float("inf")):
            raise ValueError(f"softcap must be a finite number > 0, got {softcap}")
    if isinstance(z_loss, bool) or not isinstance(z_loss, (int, float)):
        raise TypeError(f"z_loss must be a float, got {type(z_loss).__name__}")
    if not (0.0 <= float(z_loss) < float("inf")):
        raise ValueError(f"z_loss must be a finite number >= 0, got {z_loss}")
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
            raise TypeError(f"chunk_size must be an int or None, got {type(chunk_size).__name__}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    *,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
    z_loss: float = 0.0,
    return_lse: bool = False,
    chunk_size: int | None = None,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of ``hidden @ weight.T (+ bias)`` vs ``targets``, without the logits.

    Same result as ``F.cross_entropy(F.linear(hidden, weight, bias), targets)`` (in
    float32), but the (N, V) logits are only ever built one chunk of rows at a time,
    so the memory of the LM-head loss no longer grows with N * V (see the module
    docstring for the algorithm).

    Args:
        hidden: (N, H) or (B, T, H) float32/bfloat16/float16 hidden states (the
            final-norm output); (B, T, H) is flattened to rows.
        weight: (V, H) LM head or tied embedding matrix, of hidden's dtype.
        targets: int64 class indices of shape ``hidden.shape[:-1]``, each in
            ``[0, V)`` or equal to ``ignore_index`` (anything else: ValueError).
        ignore_index: target value of rows to skip (padding, prompt tokens).
        reduction: ``"mean"`` over the non-ignored rows (0 with zero gradients if
            every row is ignored, never NaN), ``"sum"``, or ``"none"`` (per-row
            loss of ``targets``' shape, 0 at ignored rows).
        bias: optional (V,) LM-head bias, of hidden's dtype.
        softcap: optional logit cap ``c``: the softmax sees ``c * tanh(logits / c)``.
        z_loss: weight ``z`` of the auxiliary z-loss: every counted row adds
            ``z * lse**2`` (``lse`` = logsumexp of its logits), which keeps the
            softmax normalizer near 1 in long bf16 runs (PaLM uses 1e-4). Free:
            the kernel has ``lse`` at hand and folds ``2 z lse softmax`` into the
            gradient it already writes.
        return_lse: also return the float32 per-row logsumexp (shape of
            ``targets``, 0 at ignored rows, not differentiable), e.g. to log the
            z-statistics. Free: the kernel computes it anyway.
        chunk_size: rows per chunk (default :func:`default_chunk_rows`: about 64 MiB
            of float32 or 28 MiB of bfloat16/float16 logits per chunk).
        backend: ``"torch"`` (the eager reference), ``"cpp"`` or ``"triton"``.

    Returns:
        The float32 loss (a scalar, or per row for ``"none"``), or ``(loss, lse)``
        with ``return_lse``. The loss is differentiable
        with respect to hidden, weight and bias. Matmuls run in the input dtype
        (float32 accumulation inside torch's GEMMs); the softmax/log math runs in
        float32; dW and db are summed over chunks in float32, then cast.

    Example:
        >>> h = torch.randn(6, 16); W = torch.randn(50, 16); t = torch.randint(0, 50, (6,))
        >>> ref = torch.nn.functional.cross_entropy(h @ W.T, t)
        >>> torch.allclose(linear_cross_entropy(h, W, t), ref, atol=1e-5)
        True
    """
    _check(hidden, weight, targets, ignore_index, reduction, bias, softcap, z_loss, chunk_size)
    chosen = select_backend("linear_cross_entropy", hidden.device, backend)
    if chosen == "torch":
        loss = linear_cross_entropy_reference(
            hidden, weight, targets, ignore_index, reduction, bias, softcap, float(z_loss)
        )
        return (
            (loss, _reference_lse(hidden, weight, targets, ignore_index, bias, softcap))
            if return_lse
            else loss
        )
    H, V = hidden.shape[-1], weight.shape[0]
    h2 = hidden.reshape(-1, H).contiguous()
    t2 = targets.reshape(-1).contiguous()
    chunk = (
        chunk_size
        if chunk_size is not None
        else default_chunk_rows(h2.shape[0], V, h2.element_size())
    )
    grad_on = torch.is_grad_enabled()
    loss, lse = _LinearCrossEntropyFunction.apply(
        h2,
        weight.contiguous(),
        None if bias is None else bias.contiguous(),
        t2,
        ignore_index,
        reduction,
        0.0 if softcap is None else float(softcap),
        float(z_loss),
        chunk,
        chosen,
        grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
    )
    if reduction == "none":
        loss = loss.view(targets.shape)
    return (loss, lse.view(targets.shape)) if return_lse else loss


def _reference_lse(hidden, weight, targets, ignore_index, bias, softcap) -> torch.Tensor:
    """Per-row float32 logsumexp for ``return_lse`` on the torch backend."""
    with torch.no_grad():
        h = hidden.reshape(-1, hidden.shape[-1]).float()
        logits = torch.nn.functional.linear(
            h, weight.float(), None if bias is None else bias.float()
        )
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        lse = torch.logsumexp(logits, dim=-1).view(targets.shape)
        return torch.where(targets != ignore_index, lse, 0.0)


if cpp_available():
    # Shapes of the C++ chunk op for torch.compile / meta tensors (no data is touched).
    @torch.library.register_fake("minigpt::cross_entropy_chunk")
    def _cross_entropy_chunk_fake(
        logits, targets, lse_in, row_scale, scale, ignore_index, softcap, z_loss, write_grad
    ):
        rows = logits.shape[0]
        return logits.new_empty(rows, dtype=torch.float32), logits.new_empty(
            rows, dtype=torch.float32
        )

    @torch.library.register_fake("minigpt::accumulate_f32_")
    def _accumulate_f32_fake(acc, part, alpha):
        return None
