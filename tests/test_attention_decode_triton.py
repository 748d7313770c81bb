"""Triton decode attention (split-K over the KV cache + combine): interpreter numerics,
in-place append, empty rows, grouped-query heads, and sm_80 / sm_90 compilation.

The kernels run in ``TRITON_INTERPRET=1`` (set by conftest.py) on small shapes, with
``num_splits`` forced so that rows span several splits (and some splits see nothing).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from kernel_testing import DTYPES, random_tensor
from test_attention import _eager_lowp, _no_worse

from minigpt.kernels import info
from minigpt.kernels.attention import attention_with_kv_cache
from minigpt.kernels.reference.attention import attention_with_kv_cache_reference
from minigpt.kernels.triton.attention_decode import attention_kvcache


def _run(dtype, *, B, S, Hq, Hkv, D, lens, tq, tn, causal=True, num_splits=None):
    q = random_tensor((B, tq, Hq, D), dtype)
    kc, vc = random_tensor((B, S, Hkv, D), dtype), random_tensor((B, S, Hkv, D), dtype)
    kn = random_tensor((B, tn, Hkv, D), dtype) if tn else None
    vn = random_tensor((B, tn, Hkv, D), dtype) if tn else None
    lens_t = torch.tensor(lens, dtype=torch.int32)
    kc_ref, vc_ref = kc.double(), vc.double()
    ref = attention_with_kv_cache_reference(
        q.double(),
        kc_ref,
        vc_ref,
        lens_t,
        None if kn is None else kn.double(),
        None if vn is None else vn.double(),
        causal,
    )
    scale = D**-0.5
    out = attention_kvcache(q, kc, vc, lens_t, kn, vn, scale, causal, num_splits=num_splits)
    # the new entries were written in place, exactly, and nothing else changed
    torch.testing.assert_close(kc.double(), kc_ref, atol=0, rtol=0)
    torch.testing.assert_close(vc.double(), vc_ref, atol=0, rtol=0)
    eager = torch.cat(
        [
            _eager_lowp(
                q[b : b + 1],
                kc[b : b + 1, : lens[b] + tn],
                vc[b : b + 1, : lens[b] + tn],
                causal,
                None,
                None,
            )
            for b in range(B)
        ]
    )
    assert out.dtype == dtype and out.shape == q.shape
    _no_worse(out, eager, ref, "out")
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tn", (0, 1, 3))
def test_decode_triton_matches_reference(dtype, tn):
    # GQA 4 query heads per kv head; rows of very different lengths, row 0 empty
    out = _run(
        dtype, B=3, S=70, Hq=8, Hkv=2, D=32, lens=[0, 9, 66], tq=max(tn, 1), tn=tn, num_splits=3
    )
    if tn == 0:  # an empty cache row has nothing to attend to
        assert torch.equal(out[0], torch.zeros_like(out[0]))


@pytest.mark.parametrize(
    "kw",
    [
        dict(B=2, S=40, Hq=2, Hkv=2, D=80, lens=[17, 30], tq=1, tn=1),  # MHA, head dim 80
        dict(B=1, S=50, Hq=6, Hkv=1, D=16, lens=[45], tq=4, tn=2),  # MQA, speculative Tq=4
        dict(B=2, S=33, Hq=4, Hkv=2, D=32, lens=[5, 20], tq=2, tn=0, causal=False),
        dict(B=1, S=300, Hq=32, Hkv=2, D=16, lens=[290], tq=3, tn=3),  # 48 rows: 3 row blocks
    ],
    ids=["mha_d80", "mqa_tq4", "noncausal", "many_rows"],
)
def test_decode_triton_shapes(kw):
    _run(torch.float32, num_splits=None, **kw)


def test_decode_triton_one_split_equals_many():
    """The combine step is exact: 1 split and 5 splits agree to float32 rounding."""
    torch.manual_seed(0)
    args = dict(B=2, S=64, Hq=4, Hkv=1, D=32, lens=[60, 13], tq=1, tn=0)
    torch.manual_seed(1)
    a = _run(torch.float32, num_splits=1, **args)
    torch.manual_seed(1)
    b = _run(torch.float32, num_splits=5, **args)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_decode_dispatch_uses_triton_backend():
    q = random_tensor((1, 1, 4, 32))
    kc, vc = random_tensor((1, 20, 2, 32)), random_tensor((1, 20, 2, 32))
    lens = torch.tensor([11], dtype=torch.int32)
    out = attention_with_kv_cache(q, kc, vc, lens, backend="triton")
    ref = attention_with_kv_cache_reference(q, kc, vc, lens)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert info(print_table=False)["ops"]["attention_with_kv_cache"]["cuda"].startswith("triton")


_PTX_SCRIPT = """
import json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from minigpt.kernels.triton.attention_decode import COMPILE_SPECS
for spec in COMPILE_SPECS:
    for arch in (80, 90):
        src = ASTSource(fn=spec["fn"], signature=spec["signature"], constexprs=spec["constexprs"])
        ptx = triton.compile(src, target=GPUTarget("cuda", arch, 32)).asm["ptx"]
        print(json.dumps({"name": spec["name"], "arch": arch, "bytes": len(ptx),
                          "mma": "mma" in ptx}), flush=True)
"""


def test_decode_kernels_compile_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", _PTX_SCRIPT], capture_output=True, text=True, env=env, timeout=1200
    )
    rows = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert len(rows) == 8 and all(r["bytes"] > 0 for r in rows)
    for r in rows:
        if r["name"].startswith("attention_decode_split"):
            assert r["mma"], f"{r['name']} sm_{r['arch']}: no tensor-core mma in the PTX"
