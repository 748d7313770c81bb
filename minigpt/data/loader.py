"""Batch loaders over :class:`~minigpt.data.TokenShards`, with exactly resumable state.

* :class:`RandomWindowLoader` (pretraining): each batch is ``batch_size`` windows
  of ``seq_len + 1`` tokens starting at random offsets; ``x`` is the window
  without its last token, ``y`` without its first (next-token targets).
  Windows cross document boundaries; the BOS tokens show the model where a new
  document begins.
* :class:`SequentialLoader` (evaluation, packed documents): walks the stream in
  order in non-overlapping windows, so every token is scored once.

Both keep their position in a tiny ``state_dict()``. The random offsets of batch
``k`` come from a generator seeded with ``(seed, k)``, so the state is just
``(seed, k)``: a run resumed from a checkpoint sees exactly the batches it
would have seen, with no random-generator state to save.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from minigpt.data.shards import TokenShards


def _check_sizes(shards: TokenShards, batch_size: int, seq_len: int) -> None:
    if not isinstance(shards, TokenShards):
        raise TypeError(f"shards must be a TokenShards, got {type(shards).__name__}")
    for name, v in (("batch_size", batch_size), ("seq_len", seq_len)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if shards.num_tokens < seq_len + 1:
        raise ValueError(
            f"the {shards.split} split has {shards.num_tokens} tokens, fewer than "
            f"seq_len + 1 = {seq_len + 1}: use a shorter seq_len or more data"
        )


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, ...]:
    idx = starts[:, None] + np.arange(seq_len + 1)[None, :]
    win = torch.from_numpy(np.asarray(tokens[idx], dtype=np.int64))
    return win[:, :-1].contiguous(), win[:, 1:].contiguous()


class RandomWindowLoader:
    """Endless random ``(x, y)`` batches, each ``(batch_size, seq_len)`` int64.

    Args:
        shards: the split to sample from.
        batch_size: windows per batch (B).
        seq_len: tokens per window (T); ``y[:, t]`` is the token after ``x[:, t]``.
        seed: with the batch index, decides every window offset.
    """

    def __init__(self, shards: TokenShards, batch_size: int, seq_len: int, *, seed: int = 0):
        _check_sizes(shards, batch_size, seq_len)
        self.shards = shards
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = int(seed)
        self.step = 0  # index of the next batch

    def offsets(self, step: int) -> np.ndarray:
        """Start offsets of the windows of batch ``step`` (deterministic)."""
        rng = np.random.default_rng([self.seed, step])
        return rng.integers(0, self.shards.num_tokens - self.seq_len, size=self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = self.offsets(self.step)
        self.step += 1
        return _windows(self.shards.tokens, starts, self.seq_len)

    def state_dict(self) -> dict:
        """The loader's position: enough to resume exactly (JSON-able)."""
        return {
            "kind": "random_window",
            "seed": self.seed,
            "step": self.step,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "num_tokens": self.shards.num_tokens,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict`; the next batch is the one it would have been."""
        if state.get("kind") != "random_window":
            raise ValueError("not a RandomWindowLoader state")
        for key in ("batch_size", "seq_len", "num_tokens"):
            mine = self.state_dict()[key]
            if state.get(key) != mine:
                raise ValueError(f"loader state has {key}={state.get(key)}, this loader {mine}")
        self.seed = int(state["seed"])
        self.step = int(state["step"])


class SequentialLoader:
    """``(x, y)`` batches walking the split in order, each token predicted once.

    One pass yields ``(num_tokens - 1) // (batch_size * seq_len)`` full batches
    (the remainder is dropped so every batch has the same shape); iterate again
    for another pass. ``state_dict``/``load_state_dict`` resume mid-pass.
    """

    def __init__(self, shards: TokenShards, batch_size: int, seq_len: int):
        _check_sizes(shards, batch_size, seq_len)
        self.shards = shards
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.num_batches = (shards.num_tokens - 1) // (batch_size * seq_len)
        if self.num_batches == 0:
            raise ValueError(
                f"the {shards.split} split ({shards.num_tokens} tokens) is too small for one "
                f"batch of {batch_size} x {seq_len}"
            )
        self.batch = 0

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while self.batch < self.num_batches:
            first = self.batch * self.batch_size * self.seq_len
            starts = first + self.seq_len * np.arange(self.batch_size)
            self.batch += 1
            yield _windows(self.shards.tokens, starts, self.seq_len)
        self.batch = 0

    def state_dict(self) -> dict:
        """Position within the pass (JSON-able)."""
        return {"kind": "sequential", "batch": self.batch}

    def load_state_dict(self, state: dict) -> None:
        """Resume mid-pass from :meth:`state_dict`."""
        if state.get("kind") != "sequential":
            raise ValueError("not a SequentialLoader state")
        self.batch = int(state["batch"])
