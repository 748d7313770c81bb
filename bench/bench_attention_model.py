"""Training tokens/s of our GPT with its attention swapped: fused kernel vs SDPA vs eager.

The same model (a ~13M-parameter Llama-style ``minigpt.model.GPT``, same weights,
same batch) takes full optimizer steps (forward, backward, fused AdamW) with the
attention of every layer computed by

* ``minigpt``: ``minigpt.kernels.attention`` on its default backend (the C++ flash
  kernel on the CPU) -- what the model ships with;
* ``sdpa``: ``F.scaled_dot_product_attention`` (torch's own CPU flash kernel);
* ``eager_reference``: the eager float32 reference, ``backend="torch"`` (the
  textbook softmax(QK^T)V that materializes the (T, T) scores).

Only the attention op changes: :func:`attention_backend` swaps the ``attention``
function the model's attention module calls for the duration of a step (a
per-op override; nothing in the model is edited). Everything else (matmuls,
norms, RoPE, SwiGLU, the fused loss) is identical, so the tokens/s ratio is how
much the attention kernel is worth end to end. fp32, and bf16 autocast (the
attention then runs on bf16 tensors). ``extra_info`` records tokens/s of each.
With ``--benchmark-disable`` (CI) a tiny model runs one step of each.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Callable, Iterator

import pytest
import torch
from bench_train import train_step_fn

import minigpt.nn.attention as attention_module
from minigpt.kernels import attention
from minigpt.model import GPT, GPTConfig
from minigpt.nn.attention import attention_torch

# ~13M parameters (10M-30M), sequences long enough for attention to matter
FULL = dict(vocab_size=8192, n_layer=6, n_head=6, d_model=384, max_seq_len=1024, batch=4)
TINY = dict(vocab_size=256, n_layer=2, n_head=2, d_model=64, max_seq_len=32, batch=2)

BACKENDS: dict[str, Callable[..., torch.Tensor]] = {
    "minigpt": attention,
    "sdpa": lambda q, k, v, causal=True: attention_torch(q, k, v, causal),
    "eager_reference": functools.partial(attention, backend="torch"),
}


@contextlib.contextmanager
def attention_backend(fn: Callable[..., torch.Tensor]) -> Iterator[None]:
    """Make the model's attention layers call ``fn(q, k, v, causal=...)`` inside the block."""
    previous = attention_module.attention
    attention_module.attention = fn
    try:
        yield
    finally:
        attention_module.attention = previous


def _step_with(model: GPT, x, y, precision: str, fn) -> Callable[[], object]:
    step = train_step_fn(model, x, y, precision)

    def run() -> object:
        with attention_backend(fn):
            return step()

    return run


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_train_tokens_per_s_by_attention_backend(compare, benchmark, precision):
    shape = dict(TINY if getattr(benchmark, "disabled", False) else FULL)
    batch = shape.pop("batch")
    cfg = GPTConfig(**shape)
    torch.manual_seed(0)
    base = GPT(cfg)
    n_params = sum(p.numel() for p in base.parameters())
    T = cfg.max_seq_len
    x = torch.randint(0, cfg.vocab_size, (batch, T))
    y = torch.randint(0, cfg.vocab_size, (batch, T))
    steps = {
        name: _step_with(copy.deepcopy(base), x, y, precision, fn) for name, fn in BACKENDS.items()
    }
    # same weights, same batch: the first losses agree whatever the attention backend
    first = {name: float(step().detach()) for name, step in steps.items()}
    tol = 1e-3 if precision == "fp32" else 5e-2
    assert max(first.values()) - min(first.values()) < tol, first
    ours = steps.pop("minigpt")
    extra = compare.run(
        ours,
        steps,
        rounds=1 if benchmark.disabled else 3,
        warmup=1,
        params_M=round(n_params / 1e6, 2),
        precision=precision,
        tokens_per_step=batch * T,
        shape=dict(batch=batch, seq=T, heads=cfg.n_head, head_dim=cfg.d_model // cfg.n_head),
    )
    if not benchmark.disabled:
        extra["tokens_per_s"] = {
            name: round(batch * T / (ms / 1e3)) for name, ms in extra["time_ms"].items()
        }
