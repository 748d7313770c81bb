"""The decode step without the framework: one new token per row through the model.

``model(tokens, kv_cache=cache)`` is written for every case (training, prefill,
autocast, checkpointing); each of its ~15 ops per layer pays Python, autograd
and argument-checking costs of a few microseconds. At batch 1 a whole decode
step of a 135M model should take ~10 ms (the time to read the weights once), so
those microseconds, times 30 layers, are a real share of it. :class:`DecodeStep`
runs the same math for the decode case only (B rows, one token each, no
gradients) and calls the C++ kernels directly:

    embed -> per layer: add+RMSNorm, qkv GEMV, RoPE, cached attention (appends k/v),
             o GEMV, add+RMSNorm, gate/up GEMV, SwiGLU, down GEMV
          -> final add+RMSNorm -> LM head GEMV (float32 logits)

The linear layers use :func:`minigpt.kernels.linear.linear`'s GEMV kernel, which
reads each weight once at near memory bandwidth (AVX512-BF16 dot products for
bf16). When every projection and the LM head are plain bias-free ``nn.Linear``
(and all weights share one dtype), the whole step runs in one C++ call
(``torch.ops.minigpt.gemv_decode_step``, the same steps as the Python loop
below): the thread team starts once per token, each thread streams its own half
of every weight, and threads only meet at the 5 barriers per layer where a
result is needed whole -- instead of ~300 kernel calls, each with a fork/join and
an allocation. Otherwise the Python loop runs, and a layer that is not a plain
``nn.Linear`` (quantized, LoRA) is simply called.
Models this path does not cover (GPT-2-style switches, MoE, CUDA, autocast,
training mode with dropout) use ``model(...)``: :func:`decoder_for` picks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from minigpt.infer.kv_cache import KVCache
from minigpt.kernels import cpp_available, rope_cos_sin, select_backend
from minigpt.kernels.linear import MAX_GEMV_ROWS, linear

Decoder = Callable[[torch.Tensor], torch.Tensor]


def decoder_for(model: nn.Module, cache: KVCache) -> Decoder:
    """A function ``tokens (B,) -> float32 logits (B, V)`` that advances ``cache`` by one.

    The fast :class:`DecodeStep` when it supports ``model`` (see
    :meth:`DecodeStep.supports`), else a plain call of the model.
    """
    if DecodeStep.supports(model):
        return DecodeStep(model, cache)

    def step(tokens: torch.Tensor) -> torch.Tensor:
        return model(tokens[:, None], kv_cache=cache)[:, -1].float()

    return step


class DecodeStep:
    """One decoding step of a Llama-style :class:`minigpt.model.GPT` on the CPU.

    Call it with the (B,) int64 ids of the newest token of each row; it appends
    their keys/values to ``cache`` (at ``cache.seqlens``), advances
    ``cache.seqlens`` by one and returns the (B, V) float32 next-token logits --
    the same numbers as ``model(tokens[:, None], kv_cache=cache)[:, -1]`` up to
    float rounding (the GEMV sums in a different order than ``torch.mm``).
    The cache object may be reordered between calls (beam search): its tensors
    are looked up on every call.
    """

    def __init__(self, model: nn.Module, cache: KVCache) -> None:
        if not self.supports(model):
            raise ValueError("DecodeStep supports Llama-style GPT models on the CPU in eval mode")
        cfg = model.config
        self.model, self.cache = model, cache
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.ffn_hidden = cfg.ffn_hidden
        self.scale = cfg.head_dim**-0.5
        # cos/sin of every position the cache can hold, built once (float64 angles
        # rounded once: the same tables the model builds per call)
        self.cos, self.sin = rope_cos_sin(cache.max_len, cfg.head_dim, cfg.rope_theta)
        self.embed = model.embed.weight
        self.layers = [
            (
                b.attn_norm.weight,
                b.attn_norm.eps,
                b.attn.qkv_proj,
                b.attn.o_proj,
                b.mlp_norm.weight,
                b.mlp_norm.eps,
                b.mlp.up_proj,
                b.mlp.down_proj,
            )
            for b in model.blocks
        ]
        self.final_norm = (model.final_norm.weight, model.final_norm.eps)
        self.lm_head = model.lm_head
        self.in_cpp = fused_weights(model)
        self._rows = torch.arange(MAX_GEMV_ROWS)

    @staticmethod
    def supports(model: nn.Module) -> bool:
        """Whether this fast path computes exactly what ``model`` computes."""
        from minigpt.model.gpt import GPT, MLP
        from minigpt.nn import RMSNorm

        if type(model) is not GPT or not cpp_available():
            return False
        cfg = model.config
        if (cfg.norm, cfg.mlp, cfg.pos) != ("rmsnorm", "swiglu", "rope") or cfg.moe is not None:
            return False
        if model.training and cfg.dropout > 0:
            return False
        p = model.embed.weight
        if p.device.type != "cpu" or torch.is_autocast_enabled("cpu"):
            return False
        # every op this path calls must be the C++ kernel the model would also use
        ops = ("rms_norm", "add_rms_norm", "rope", "attention_with_kv_cache", "swiglu", "linear")
        if any(select_backend(op, p.device) != "cpp" for op in ops):
            return False
        return (
            all(
                type(b.mlp) is MLP and type(b.attn_norm) is RMSNorm and type(b.mlp_norm) is RMSNorm
                for b in model.blocks
            )
            and type(model.final_norm) is RMSNorm
        )

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        ops = torch.ops.minigpt
        cache = self.cache
        B = tokens.shape[0]
        H, Hkv, D, F = self.n_head, self.n_kv_head, self.head_dim, self.ffn_hidden
        seqlens = cache.seqlens
        # a position past the cache would write out of bounds: the kernel checks,
        # but say it in words here
        if int(seqlens.max()) >= cache.max_len:
            raise ValueError(f"KV cache is full ({cache.max_len} positions)")
        h = self.embed.index_select(0, tokens)  # (B, d) residual stream
        if self.in_cpp is not None and B <= MAX_GEMV_ROWS:
            rows = self._rows[:B]  # row b is the next token of sequence b
            logits = _fused_step(self, h, rows, seqlens, rows, self.cos, self.sin)
            seqlens += 1
            return logits
        cos = self.cos.index_select(0, seqlens)[:, None]  # (B, 1, D/2)
        sin = self.sin.index_select(0, seqlens)[:, None]
        delta = None
        for i, (w1, eps1, qkv_proj, o_proj, w2, eps2, up_proj, down_proj) in enumerate(self.layers):
            if delta is None:
                x = ops.rms_norm_fwd(h, None, w1, eps1)[0]
            else:
                x, h, _ = ops.rms_norm_fwd(delta, h, w1, eps1)
            qkv = _linear(qkv_proj, x)
            q = qkv[:, : H * D].view(B, 1, H, D)
            k = qkv[:, H * D : (H + Hkv) * D].view(B, 1, Hkv, D)
            v = qkv[:, (H + Hkv) * D :].contiguous().view(B, 1, Hkv, D)
            q, k = ops.rope_rotate(q, k, cos, sin, False)
            y = ops.attention_kvcache(q, cache.k[i], cache.v[i], seqlens, k, v, self.scale, True)
            x, h, _ = ops.rms_norm_fwd(_linear(o_proj, y.view(B, H * D)), h, w2, eps2)
            gate_up = _linear(up_proj, x)
            delta = _linear(down_proj, ops.swiglu_fwd(gate_up[:, :F], gate_up[:, F:]))
        return self._head(delta, h, seqlens)

    def _head(self, delta: torch.Tensor, h: torch.Tensor, seqlens: torch.Tensor) -> torch.Tensor:
        """Final add+norm and the LM head; advances the cache by one token."""
        x = torch.ops.minigpt.rms_norm_fwd(delta, h, *self.final_norm)[0]
        seqlens += 1
        head = self.lm_head
        if type(head) is nn.Linear:
            return linear(x, head.weight, head.bias, float_out=True)
        return head(x).float()


def fused_weights(model: nn.Module) -> tuple | None:
    """The weight lists of ``gemv_decode_step`` for ``model``, or None if it does not apply.

    It applies when every projection and the LM head are plain bias-free
    ``nn.Linear``, every norm has one eps and every weight has the embedding's
    dtype (the caller has checked :meth:`DecodeStep.supports`). Returns
    (attn_norm_w, qkv_w, o_w, mlp_norm_w, up_w, down_w) lists, then the final
    norm weight, the LM head weight and eps.
    """
    blocks = model.blocks
    linears = [m for b in blocks for m in (b.attn.qkv_proj, b.attn.o_proj)]
    linears += [m for b in blocks for m in (b.mlp.up_proj, b.mlp.down_proj)] + [model.lm_head]
    norms = [n for b in blocks for n in (b.attn_norm, b.mlp_norm)] + [model.final_norm]
    eps = {n.eps for n in norms}
    dtype = model.embed.weight.dtype
    if (
        any(type(lin) is not nn.Linear or lin.bias is not None for lin in linears)
        or len(eps) != 1
        or any(p.dtype != dtype for p in model.parameters())
    ):
        return None
    return (
        [b.attn_norm.weight for b in blocks],
        [b.attn.qkv_proj.weight for b in blocks],
        [b.attn.o_proj.weight for b in blocks],
        [b.mlp_norm.weight for b in blocks],
        [b.mlp.up_proj.weight for b in blocks],
        [b.mlp.down_proj.weight for b in blocks],
        model.final_norm.weight,
        model.lm_head.weight,
        eps.pop(),
    )


def _fused_step(step, h, cache_row, positions, head_rows, cos, sin) -> torch.Tensor:
    """``gemv_decode_step`` on rows ``h`` with ``step``'s weights and cache."""
    *weights, final_w, head_w, eps = step.in_cpp
    cache = step.cache
    return torch.ops.minigpt.gemv_decode_step(
        h, *weights, cache.k, cache.v, cache_row, positions, head_rows, cos, sin, final_w,
        head_w, step.n_head, step.n_kv_head, step.head_dim, eps, step.scale,
    )  # fmt: skip


@torch.no_grad()
def fused_prefill(
    model: nn.Module, prompts: list[list[int]], max_len: int
) -> tuple[KVCache, torch.Tensor] | None:
    """Prefill short prompts with the fused step: all their tokens in one call.

    Every prompt token is one row of ``gemv_decode_step`` (row = the token at
    position p of sequence b), so a short prompt costs one pass over the weights,
    like one decode step, instead of the general forward pass. Returns the cache
    (``seqlens`` = prompt lengths) and the (B, V) float32 logits at each prompt's
    last token -- what :func:`minigpt.infer.prefill` returns -- or None when the
    fused step does not apply (more than ``MAX_GEMV_ROWS`` tokens in all, or a
    model :class:`DecodeStep` cannot run in one call).
    """
    lengths = [len(p) for p in prompts]
    if sum(lengths) > MAX_GEMV_ROWS or not DecodeStep.supports(model):
        return None
    cache = KVCache.for_model(model, len(prompts), max_len)
    step = DecodeStep(model, cache)
    if step.in_cpp is None:
        return None
    tokens = torch.tensor([t for p in prompts for t in p])
    cache_row = torch.tensor([b for b, n in enumerate(lengths) for _ in range(n)])
    positions = torch.tensor([i for n in lengths for i in range(n)])
    last = torch.tensor(lengths).cumsum(0) - 1
    h = step.embed.index_select(0, tokens)
    logits = _fused_step(step, h, cache_row, positions, last, step.cos, step.sin)
    cache.seqlens.copy_(torch.tensor(lengths))
    return cache, logits


def _linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A plain nn.Linear through the GEMV kernel, anything else by calling it."""
    if type(layer) is nn.Linear and x.shape[0] <= MAX_GEMV_ROWS:
        return torch.ops.minigpt.gemv(x, layer.weight, layer.bias, False)
    return layer(x)
