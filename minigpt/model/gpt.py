"""The MiniGPT decoder: a Llama-style transformer in one readable file.

    tokens (B, T)
      -> token embedding (+ learned positions when pos="learned")     (B, T, d)
      -> n_layer x Block:  h += Attention(Norm(h));  h += MLP(Norm(h))
      -> final Norm -> LM head                                         (B, T, vocab)

Pre-norm blocks keep an un-normalized "residual stream" ``h`` that every
sub-layer reads (through a norm) and adds to. The add and the next norm are one
fused kernel: ``norm(delta, h)`` returns ``(norm(h + delta), h + delta)``.

Packed rows (several documents concatenated, e.g. short chat conversations) pass
``cu_seqlens``: attention then stays inside each document (``attention_varlen``)
and positions restart at 0 at every document start.

Training with ``targets`` returns the loss, computed by the fused
``linear_cross_entropy`` kernel, which never builds the (B*T, vocab) logits.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from minigpt.kernels import linear_cross_entropy, rope_cos_sin, swiglu
from minigpt.model.config import GPTConfig
from minigpt.nn import RMSNorm
from minigpt.nn.attention import CausalSelfAttention
from minigpt.nn.moe import MoEMLP, moe_aux_loss


class LayerNorm(nn.LayerNorm):
    """GPT-2's LayerNorm with RMSNorm's calling convention (optional fused residual add)."""

    def forward(self, x, residual=None):  # type: ignore[override]
        if residual is None:
            return super().forward(x)
        h = x + residual
        return super().forward(h), h


def make_norm(config: GPTConfig) -> nn.Module:
    """The normalization layer the config asks for."""
    if config.norm == "rmsnorm":
        return RMSNorm(config.d_model, eps=config.norm_eps)
    return LayerNorm(config.d_model, eps=config.norm_eps, bias=config.bias)


class MLP(nn.Module):
    """Position-wise feed-forward: SwiGLU (gate and up in one matmul) or GELU."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.kind = config.mlp
        n_in = 2 * config.ffn_hidden if self.kind == "swiglu" else config.ffn_hidden
        self.up_proj = nn.Linear(config.d_model, n_in, bias=config.bias)
        self.down_proj = nn.Linear(config.ffn_hidden, config.d_model, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, d_model) -> (B, T, d_model)."""
        u = self.up_proj(x)
        if self.kind == "swiglu":
            gate, up = u.chunk(2, dim=-1)
            u = swiglu(gate, up)
        else:
            u = F.gelu(u, approximate="tanh")
        return self.dropout(self.down_proj(u))


def make_mlp(config: GPTConfig, layer: int) -> nn.Module:
    """The dense MLP, or a mixture of experts on the layers ``config.moe`` selects."""
    moe = config.moe
    if moe is None or not moe.is_moe_layer(layer):
        return MLP(config)
    return MoEMLP(
        config.d_model,
        moe.ffn_hidden or config.ffn_hidden,
        moe.n_experts,
        moe.k,
        routing=moe.routing,
        gate=moe.gate,
        renormalize=moe.renormalize and moe.k > 1 and moe.routing == "topk",
        capacity_factor=moe.capacity_factor,
        shared_expert_hidden=moe.shared_expert_hidden,
        aux_loss_coef=moe.aux_loss_coef,
        z_loss_coef=moe.z_loss_coef,
    )


class Block(nn.Module):
    """One transformer layer: attention then MLP, each behind a pre-norm."""

    def __init__(self, config: GPTConfig, layer: int = 0) -> None:
        super().__init__()
        self.attn_norm = make_norm(config)
        self.attn = CausalSelfAttention(
            config.d_model,
            config.n_head,
            config.n_kv_head,
            config.head_dim,
            bias=config.bias,
            dropout=config.dropout,
        )
        self.mlp_norm = make_norm(config)
        self.mlp = make_mlp(config, layer)

    def forward(self, h, delta, rope=None, cache=None, packed=None):
        """Add the previous layer's pending output ``delta`` to ``h``, run this layer.

        Returns ``(h, mlp_out)``: the MLP output is left pending so that the next
        layer can fuse its add with its norm.
        """
        if delta is None:  # first layer: nothing pending
            x = self.attn_norm(h)
        else:
            x, h = self.attn_norm(delta.to(h.dtype), h)
        # under autocast the sub-layers return bf16/fp16 while the residual stream
        # stays in the parameters' dtype (float32): add in the stream's precision
        x, h = self.mlp_norm(self.attn(x, rope, cache, packed).to(h.dtype), h)
        return h, self.mlp(x)


class GPT(nn.Module):
    """A decoder-only language model built from a :class:`GPTConfig`.

    ``model(idx)`` returns logits (B, T, vocab); ``model(idx, targets)`` returns
    the mean cross-entropy loss (targets equal to -100 are ignored).
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_embed = (
            nn.Embedding(config.max_seq_len, config.d_model) if config.pos == "learned" else None
        )
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.final_norm = make_norm(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, init_std); output projections scaled by 1/sqrt(2 n_layer)
        so the residual stream's variance does not grow with depth."""
        std = self.config.init_std
        for name, p in self.named_parameters():
            if p.dim() == 1:  # norm gains and biases
                nn.init.ones_(p) if name.endswith("norm.weight") else nn.init.zeros_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.config.n_layer))
            else:
                nn.init.normal_(p, 0.0, std)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Number of distinct parameters (a tied LM head counts once)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.embed.weight.numel()
            if self.pos_embed is not None:
                n -= self.pos_embed.weight.numel()
        return n

    def _positions(self, idx: torch.Tensor, kv_cache, positions) -> torch.Tensor:
        B, T = idx.shape
        if positions is None:
            steps = torch.arange(T, device=idx.device)
            if kv_cache is None:
                positions = steps[None, :]
            else:
                positions = kv_cache.seqlens.to(idx.device, torch.long)[:, None] + steps
        else:
            positions = positions.to(idx.device, torch.long)
            if positions.dim() == 1:
                positions = positions[None, :]
            if positions.shape[-1] != T or positions.shape[0] not in (1, B):
                raise ValueError(
                    f"positions shape {tuple(positions.shape)} does not fit idx {(B, T)}"
                )
        if not torch.compiler.is_compiling():
            top = int(positions.max()) if positions.numel() else 0
            if top >= self.config.max_seq_len:
                raise ValueError(
                    f"position {top} is past the model's context of "
                    f"{self.config.max_seq_len} tokens (max_seq_len)"
                )
        return positions

    def _packing(
        self, idx: torch.Tensor, cu_seqlens: torch.Tensor, kv_cache, positions
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, int]]:
        """Check ``cu_seqlens`` against idx (B, T); return (positions (B, T), (cu, max_len))."""
        if kv_cache is not None or positions is not None:
            raise ValueError(
                "cu_seqlens (packed documents) cannot be combined with kv_cache or positions "
                "(packing is for training and scoring; positions are derived from cu_seqlens)"
            )
        B, T = idx.shape
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1:
            raise TypeError("cu_seqlens must be a 1-D integer tensor of document offsets")
        if cu_seqlens.dtype not in (torch.int32, torch.int64) or cu_seqlens.numel() < 2:
            raise TypeError(
                f"cu_seqlens must be an int32/int64 tensor (n_docs + 1,) >= 2 entries, got "
                f"{cu_seqlens.dtype} {tuple(cu_seqlens.shape)}"
            )
        cu = cu_seqlens.to(idx.device, torch.long)
        lengths = cu[1:] - cu[:-1]
        if not torch.compiler.is_compiling():
            if int(cu[0]) != 0 or int(cu[-1]) != B * T:
                raise ValueError(
                    f"cu_seqlens must start at 0 and end at B*T = {B * T} (every token, "
                    f"padding included, belongs to a document), got {int(cu[0])}..{int(cu[-1])}"
                )
            if bool((lengths <= 0).any()):
                raise ValueError("cu_seqlens must be strictly increasing (no empty documents)")
            row_starts = torch.arange(0, B * T, T, device=cu.device)
            if not bool(torch.isin(row_starts, cu).all()):
                raise ValueError(
                    f"cu_seqlens must have a boundary at every row start (multiples of T = {T}): "
                    "a document may not continue into the next row"
                )
        # each token's position = its index minus the start of its document
        starts = torch.repeat_interleave(cu[:-1], lengths, output_size=B * T)
        pos = (torch.arange(B * T, device=cu.device) - starts).view(B, T)
        return pos, (cu, int(lengths.max()))

    def hidden_states(
        self,
        idx: torch.Tensor,
        *,
        kv_cache=None,
        positions: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The final-normed hidden states (B, T, d_model) that the LM head reads.

        With ``kv_cache`` (see :class:`minigpt.infer.KVCache`) the tokens continue
        each row's cached sequence and their keys/values are appended; the cache's
        ``seqlens`` then grow by T.

        With ``cu_seqlens`` (n_docs + 1,) int, the rows pack several documents:
        document j is flat tokens ``cu_seqlens[j]:cu_seqlens[j+1]`` of ``idx.view(-1)``
        (offsets start at 0, end at B*T, and include every row start; row padding is
        a document of its own). Each document is computed exactly as if it were
        alone: attention never crosses a boundary and positions restart at 0.
        """
        if idx.dim() != 2 or idx.dtype not in (torch.long, torch.int32, torch.int64):
            raise ValueError(f"idx must be a (B, T) integer tensor, got {idx.dtype} {idx.shape}")
        if idx.numel() and not torch.compiler.is_compiling():
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= self.config.vocab_size:
                raise ValueError(
                    f"token ids must be in [0, {self.config.vocab_size}), got {lo}..{hi}"
                )
        packed = None
        if cu_seqlens is not None:
            positions, packed = self._packing(idx, cu_seqlens, kv_cache, positions)
        pos = self._positions(idx, kv_cache, positions)
        h = self.embed(idx)
        rope = None
        if self.pos_embed is not None:
            h = h + self.pos_embed(pos)
        else:
            # one (T, D/2) table when every row shares positions, else (B, T, D/2)
            table_pos = pos[0] if pos.shape[0] == 1 else pos
            rope = rope_cos_sin(table_pos, self.config.head_dim, self.config.rope_theta)
        h = self.drop(h)
        delta = None
        for i, block in enumerate(self.blocks):
            cache = None if kv_cache is None else (kv_cache.k[i], kv_cache.v[i], kv_cache.seqlens)
            if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
                h, delta = checkpoint(block, h, delta, rope, cache, packed, use_reentrant=False)
            else:
                h, delta = block(h, delta, rope, cache, packed)
        if kv_cache is not None:
            kv_cache.seqlens += idx.shape[1]
        if delta is None:  # n_layer == 0 cannot happen, but keep the code honest
            return self.final_norm(h)
        x, _ = self.final_norm(delta.to(h.dtype), h)
        return x

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        kv_cache=None,
        positions: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab) of the next token at every position, or the loss.

        Args:
            idx: (B, T) int token ids.
            targets: optional (B, T) int next-token ids (-100 = ignore). When given,
                the mean cross-entropy (a scalar) is returned instead of logits.
            kv_cache: optional decode cache; see :meth:`hidden_states`.
            positions: optional (T,) or (B, T) positions (default 0..T-1, or after
                the cached tokens).
            cu_seqlens: optional (n_docs + 1,) offsets of documents packed into the
                rows (see :meth:`hidden_states`); labels must not predict across them.
        """
        x = self.hidden_states(idx, kv_cache=kv_cache, positions=positions, cu_seqlens=cu_seqlens)
        if targets is None:
            return self.lm_head(x)
        if targets.shape != idx.shape:
            raise ValueError(
                f"targets shape {tuple(targets.shape)} != idx shape {tuple(idx.shape)}"
            )
        # fused LM head + cross-entropy, chunked over rows: the (B*T, vocab) logits
        # never exist at once (the same value as F.cross_entropy(self.lm_head(x), ...))
        flat_x, flat_t = x.reshape(-1, x.shape[-1]), targets.reshape(-1)
        weight = self.lm_head.weight
        if torch.is_autocast_enabled(flat_x.device.type):  # what F.linear would do
            low = torch.get_autocast_dtype(flat_x.device.type)
            flat_x, weight = flat_x.to(low), weight.to(low)
        loss = linear_cross_entropy(flat_x, weight, flat_t, ignore_index=-100)
        aux = moe_aux_loss(self) if self.training and self.config.moe is not None else None
        return loss if aux is None else loss + aux  # MoE load-balancing + z-loss
