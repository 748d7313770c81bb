"""Triton flash attention: numerics in the interpreter, tensor-core code in the PTX.

Numerics run the Triton kernels in ``TRITON_INTERPRET=1`` on small shapes (the
interpreter is slow) with the same accuracy rule as the C++ tests. The PTX check
compiles for sm_80 / sm_90 in a subprocess (it needs the real JIT, which the
interpreter replaces) and asserts the matrix products use tensor cores: Triton
3.9 emits ``mma.sync`` on sm_80 and ``wgmma.mma_async`` on sm_90.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from kernel_testing import DTYPES
from test_attention import _check_attention, _eager_lowp, _no_worse, _packed

from minigpt.kernels.attention import attention_varlen
from minigpt.kernels.reference.attention import attention_varlen_reference

TRITON_CONFIGS = [
    (2, 17, 17, 4, 2, 32, True, None),  # GQA, odd length
    (1, 20, 20, 2, 1, 80, False, None),  # MQA, head dim 80, not causal
    (1, 5, 23, 2, 2, 16, True, 6),  # Tq < Tk, sliding window
    (1, 23, 5, 2, 1, 16, True, None),  # Tq > Tk: rows that see nothing
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg", TRITON_CONFIGS, ids=str)
def test_attention_triton(cfg, dtype):
    _check_attention(cfg, dtype, "triton")


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_attention_varlen_triton(dtype):
    lens = [5, 0, 19, 1]
    q, k, v, cu = _packed(lens, 2, 1, 32, dtype)
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    out = attention_varlen(*ins, cu, cu, 19, 19, backend="triton")
    rins = [t.double().requires_grad_() for t in (q, k, v)]
    rout = attention_varlen_reference(*rins, cu, cu, 19, 19)
    eins = [t.clone().requires_grad_() for t in (q, k, v)]
    eout = torch.cat(
        [
            _eager_lowp(*(t[None, a:b] for t in eins), True, None, None)[0]
            for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())
        ]
    )
    up = torch.randn(out.shape).to(dtype)
    for o in (out, rout, eout):
        o.backward(up.to(o.dtype))
    _no_worse(out, eout, rout, "out")
    for a, e, r, name in zip(ins, eins, rins, ("dq", "dk", "dv")):
        _no_worse(a.grad, e.grad, r.grad, name)


_PTX_SCRIPT = """
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from minigpt.kernels.triton.attention import COMPILE_SPECS
names = sys.argv[1].split(",")
for spec in COMPILE_SPECS:
    if spec["name"].split("[")[0] not in names:
        continue
    for arch in (80, 90):
        src = ASTSource(fn=spec["fn"], signature=spec["signature"], constexprs=spec["constexprs"])
        ptx = triton.compile(src, target=GPUTarget("cuda", arch, 32)).asm["ptx"]
        print(json.dumps({"name": spec["name"], "arch": arch, "mma_sync": "mma.sync" in ptx,
                          "wgmma": "wgmma.mma_async" in ptx}), flush=True)
"""


def _compile(kernels: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run(
        [sys.executable, "-c", _PTX_SCRIPT, kernels],
        capture_output=True,
        text=True,
        env=env,
        timeout=1200,
    )
    rows = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert rows and proc.returncode == 0, proc.stderr[-4000:]
    return rows


def _assert_tensor_cores(rows: list[dict]) -> None:
    for r in rows:
        if r["arch"] == 80:
            assert r["mma_sync"], f"{r['name']}: no mma.sync in the sm_80 PTX"
        else:
            assert r["wgmma"], f"{r['name']}: no wgmma.mma_async in the sm_90 PTX"


def test_forward_ptx_uses_tensor_cores():
    rows = _compile("attention_fwd")
    assert {r["arch"] for r in rows} == {80, 90}
    _assert_tensor_cores(rows)


@pytest.mark.slow
def test_backward_ptx_uses_tensor_cores():
    rows = _compile("attention_bwd_dkdv,attention_bwd_dq")
    assert len(rows) == 4
    _assert_tensor_cores(rows)
