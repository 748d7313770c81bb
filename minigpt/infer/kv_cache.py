"""The key/value cache that makes decoding one token cost O(context), not O(context^2).

Without a cache, producing token t re-runs the model over all t previous tokens.
Attention is the only place where tokens meet, and it only needs the *keys and
values* of earlier tokens, which never change once computed. So we keep them:
per layer, a preallocated (batch, max_len, n_kv_head, head_dim) buffer for keys
and one for values, and a per-row count of filled positions (``seqlens``).
Each forward pass with ``kv_cache=cache`` writes the new tokens' keys/values at
``seqlens[b]`` onward and advances ``seqlens`` by the number of new tokens.
"""

from __future__ import annotations

import torch


class KVCache:
    """Preallocated per-layer key/value buffers for a batch of sequences.

    Attributes:
        k, v: lists (one per layer) of (B, max_len, n_kv_head, head_dim) tensors.
        seqlens: (B,) int64, how many positions of each row hold real keys/values.

    Rows may have different lengths (prompts of different sizes): a query of row
    b only ever attends to that row's first ``seqlens[b]`` (+ new) positions.
    """

    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        max_len: int,
        n_kv_head: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        for name, value in dict(
            n_layer=n_layer, batch_size=batch_size, max_len=max_len, n_kv_head=n_kv_head
        ).items():
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        shape = (batch_size, max_len, n_kv_head, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.seqlens = torch.zeros(batch_size, dtype=torch.long, device=device)

    @classmethod
    def for_model(
        cls, model: torch.nn.Module, batch_size: int, max_len: int | None = None
    ) -> KVCache:
        """A cache shaped for ``model`` (a :class:`minigpt.model.GPT`), in its dtype/device.

        ``max_len`` defaults to the model's context length (``max_seq_len``).
        """
        cfg = model.config
        max_len = cfg.max_seq_len if max_len is None else max_len
        if max_len > cfg.max_seq_len:
            raise ValueError(f"max_len {max_len} exceeds the model's max_seq_len {cfg.max_seq_len}")
        p = next(model.parameters())
        return cls(
            cfg.n_layer,
            batch_size,
            max_len,
            cfg.n_kv_head,
            cfg.head_dim,
            dtype=p.dtype,
            device=p.device,
        )

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[1]

    def reset(self) -> None:
        """Forget every row's contents (the buffers are reused, not freed)."""
        self.seqlens.zero_()

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep/duplicate rows: row i becomes old row ``rows[i]`` (beam search uses this).

        ``rows`` is 1-D; its length is the new batch size."""
        rows = rows.to(self.seqlens.device, torch.long)
        if rows.dim() != 1 or rows.numel() == 0:
            raise ValueError(f"rows must be a non-empty 1-D tensor, got shape {tuple(rows.shape)}")
        if int(rows.min()) < 0 or int(rows.max()) >= self.batch_size:
            raise ValueError(f"rows must index the {self.batch_size} existing rows")
        for layer in range(len(self.k)):
            self.k[layer] = self.k[layer].index_select(0, rows)
            self.v[layer] = self.v[layer].index_select(0, rows)
        self.seqlens = self.seqlens.index_select(0, rows)

    def memory_bytes(self) -> int:
        """Bytes held by the key and value buffers."""
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))
