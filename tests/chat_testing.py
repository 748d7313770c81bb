"""Helpers for the chat-stage tests: a tiny tokenizer + GPT saved as a "base" run.

The tokenizer is trained on synthetic-task text (so prompts encode to few
tokens) and the model is a few thousand parameters: enough for SFT and DPO to
move the loss within a handful of steps on one CPU thread.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from minigpt.data.synthetic import generate_tasks
from minigpt.model import GPT, GPTConfig
from minigpt.model.io import save_model
from minigpt.tokenizer import Tokenizer, train_tokenizer


@functools.cache
def tiny_tokenizer() -> Tokenizer:
    """A BPE tokenizer (vocab 512 incl. chat specials) trained on task prompts and answers."""
    texts = [f"{e.prompt} {e.answer}" for e in generate_tasks(300, "train", seed=99)]
    return train_tokenizer(texts, 512, progress=False)


def tiny_model(vocab_size: int, seed: int = 0, ctx: int = 128) -> GPT:
    """A 2-layer, 32-wide GPT (fp32)."""
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=vocab_size, n_layer=2, n_head=2, d_model=32, max_seq_len=ctx)
    return GPT(cfg)


def make_base_run(root: Path, seed: int = 0) -> Path:
    """Write ``root/model`` + ``root/tokenizer.json`` (the layout of a pretraining run)."""
    tok = tiny_tokenizer()
    save_model(tiny_model(tok.vocab_size, seed), root / "model")
    tok.save(root / "tokenizer.json")
    return root
