"""Training throughput: our GPT vs the same architecture in plain eager PyTorch.

One timed call = one full optimizer step (forward, backward, fused AdamW) on a
fixed (batch, seq_len) batch, in float32 or under bf16 autocast (``precision``:
every model in the same dtype). Competitors, same shapes and parameter count:

* ``eager``: a nanoGPT-style Llama block written with stock PyTorch modules
  (``nn.RMSNorm``, one fused q/k/v linear like nanoGPT's ``c_attn`` and one fused
  gate/up linear, ``F.scaled_dot_product_attention``, ``F.silu``,
  ``F.cross_entropy``) -- what a learner would write without fused kernels;
* ``compiled``: that eager model under ``torch.compile``.

``extra_info`` records tokens/s of every model and a ``torch.profiler`` table of
where one step of our model spends its time (also printed with ``-s``).
Goals (issue 9): 2x the eager model, 1.2x the compiled one.

With ``--benchmark-disable`` (CI) a tiny model runs one step of each, a smoke test.
"""

from __future__ import annotations

import math
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minigpt.model import GPT, GPTConfig

# ~13M parameters: the 10M-30M range of the issue, big enough for matmuls to matter
FULL = dict(vocab_size=8192, n_layer=6, n_head=6, d_model=384, max_seq_len=256, batch=8)
TINY = dict(vocab_size=256, n_layer=2, n_head=2, d_model=64, max_seq_len=32, batch=2)


class EagerBlock(nn.Module):
    """Pre-norm block: x += attn(norm(x)); x += swiglu_mlp(norm(x)), stock PyTorch ops."""

    def __init__(self, d: int, n_head: int, hidden: int, eps: float) -> None:
        super().__init__()
        self.n_head = n_head
        self.attn_norm = nn.RMSNorm(d, eps=eps)
        # one matrix product for q, k, v (nanoGPT's c_attn) and one for gate, up
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.o = nn.Linear(d, d, bias=False)
        self.mlp_norm = nn.RMSNorm(d, eps=eps)
        self.gate_up = nn.Linear(d, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        h = self.attn_norm(x)

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)

        q, k, v = map(heads, self.qkv(h).split(C, dim=-1))
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(y.transpose(1, 2).reshape(B, T, C))
        h = self.mlp_norm(x)
        gate, up = self.gate_up(h).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE, half-split layout: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class EagerGPT(nn.Module):
    """The same Llama-style decoder as :class:`minigpt.model.GPT`, in eager PyTorch."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(
            EagerBlock(cfg.d_model, cfg.n_head, cfg.ffn_hidden, cfg.norm_eps)
            for _ in range(cfg.n_layer)
        )
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.head.weight = self.embed.weight
        half = cfg.head_dim // 2
        inv = 1.0 / cfg.rope_theta ** (torch.arange(half, dtype=torch.float32) / half)
        angles = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float32), inv)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = (
                    0.02 / math.sqrt(2 * cfg.n_layer)
                    if name.endswith(("o.weight", "down.weight"))
                    else 0.02
                )
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        x = self.embed(idx)
        cos, sin = self.cos[:T], self.sin[:T]
        for block in self.blocks:
            x = block(x, cos, sin)
        logits = self.head(self.norm(x))
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def train_step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, precision: str = "fp32"):
    """A closure doing one full optimizer step of ``model`` on (x, y).

    ``precision="bf16"`` runs forward and backward under CPU bf16 autocast (float32
    master weights and optimizer, as the trainer does)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    autocast = precision == "bf16"

    def step() -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def profile_table(step, rows: int = 15) -> str:
    """Self-CPU-time table of one step (after the step was warmed up)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_train_throughput(compare, benchmark, precision):
    shape = TINY if getattr(benchmark, "disabled", False) else FULL
    shape = dict(shape)
    batch = shape.pop("batch")
    cfg = GPTConfig(**shape)
    torch.manual_seed(0)
    ours = GPT(cfg)
    eager = EagerGPT(cfg)
    compiled_model = EagerGPT(cfg)
    n_params = sum(p.numel() for p in ours.parameters())
    assert n_params == sum(p.numel() for p in eager.parameters()), "architectures differ"
    T = cfg.max_seq_len
    x = torch.randint(0, cfg.vocab_size, (batch, T))
    y = torch.randint(0, cfg.vocab_size, (batch, T))
    ours_step = train_step_fn(ours, x, y, precision)
    eager_step = train_step_fn(eager, x, y, precision)
    compiled_step = train_step_fn(torch.compile(compiled_model), x, y, precision)
    compiled_step()  # compile outside the timed rounds
    rounds = 1 if benchmark.disabled else 5
    extra = compare.run(
        ours_step,
        {"eager": eager_step, "compiled": compiled_step},
        flops=6 * n_params * batch * T,
        rounds=rounds,
        warmup=1,
        params_M=round(n_params / 1e6, 2),
        precision=precision,
        tokens_per_step=batch * T,
    )
    if not benchmark.disabled:
        tokens = batch * T
        extra["tokens_per_s"] = {
            name: round(tokens / (ms / 1e3)) for name, ms in extra["time_ms"].items()
        }
        t0 = time.perf_counter()
        extra["profile_minigpt"] = profile_table(ours_step)
        extra["profile_eager"] = profile_table(eager_step, rows=10)
        extra["profile_seconds"] = round(time.perf_counter() - t0, 2)
        print("\n" + extra["profile_minigpt"])
    else:
        assert extra is not None
    for step in (ours_step, eager_step):
        assert torch.isfinite(step())


@pytest.mark.parametrize("seq", [16])
def test_eager_model_matches_ours_at_init_scale(seq):
    """Sanity: both models start near ln(vocab) loss, so they are the same problem."""
    cfg = GPTConfig(**{k: v for k, v in TINY.items() if k != "batch"})
    x = torch.randint(0, cfg.vocab_size, (2, seq))
    y = torch.randint(0, cfg.vocab_size, (2, seq))
    with torch.no_grad():
        for model in (GPT(cfg), EagerGPT(cfg)):
            assert abs(model(x, y).item() - math.log(cfg.vocab_size)) < 0.5
