"""Helpers for the trainer tests: a tiny stand-in LM and a resumable batch source.

The trainer works with any ``nn.Module`` whose ``forward(idx, targets)`` returns
a scalar loss; these stand-ins keep the trainer tests fast and independent of
the real model (which has its own tests), and include dropout so that exact
resume must restore the torch RNG too.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class TinyLM(nn.Module):
    """Embedding -> dropout -> LayerNorm -> MLP -> tied head: a few thousand params."""

    def __init__(self, vocab_size: int = 32, dim: int = 16, dropout: float = 0.1) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.drop = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.head = nn.Linear(dim, vocab_size, bias=False)
        self.head.weight = self.embed.weight  # tied, like the real model

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        h = self.drop(self.embed(idx))
        h = h + self.mlp(self.norm(h))
        logits = self.head(h)
        if targets is None:
            return logits
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)


class ToyBatches:
    """Endless (x, y) batches of a fixed random token stream, with resumable state.

    Batch k is decided by (seed, k) alone, like the real RandomWindowLoader.
    """

    def __init__(self, batch_size: int = 4, seq_len: int = 8, vocab_size: int = 32, seed: int = 0):
        stream_rng = np.random.default_rng(1234)
        # a learnable stream: each token is the previous one plus 1 or 2 (mod vocab)
        steps = stream_rng.integers(1, 3, size=5000)
        self.tokens = np.cumsum(steps) % vocab_size
        self.batch_size, self.seq_len, self.seed, self.step = batch_size, seq_len, seed, 0

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.step])
        self.step += 1
        starts = rng.integers(0, len(self.tokens) - self.seq_len - 1, size=self.batch_size)
        win = np.stack([self.tokens[s : s + self.seq_len + 1] for s in starts])
        win = torch.from_numpy(win.astype(np.int64))
        return win[:, :-1].contiguous(), win[:, 1:].contiguous()

    def state_dict(self) -> dict:
        return {"seed": self.seed, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.step = state["seed"], state["step"]


def one_thread():
    """Generator for an autouse fixture: run a test on one intra-op thread.

    The stand-in models are tiny; on a busy 2-core machine a second OpenMP
    thread only adds spin-wait contention (each op can take 100x longer).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
