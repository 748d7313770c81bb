"""Access to the C++ BPE core in ``minigpt._C`` (``torch.classes.minigpt.Bpe*``).

The core is optional at import time: if the extension is missing or was built
without the BPE sources, :func:`native_available` is False and the tokenizer
runs the pure-Python reference instead (slow, identical results).
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def native_available() -> bool:
    """True if the C++ BPE classes are registered (``minigpt._C`` imports)."""
    try:
        import minigpt._C  # noqa: F401  (registers torch.classes.minigpt.*)

        torch.classes.minigpt.BpeCore  # noqa: B018
        torch.classes.minigpt.BpeTrainer  # noqa: B018
    except (ImportError, RuntimeError, AttributeError):
        return False
    return True


def pack_bytes(items: list[bytes]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate byte strings into (uint8 data, int64 offsets of length n+1)."""
    data = b"".join(items)
    offsets = [0]
    for item in items:
        offsets.append(offsets[-1] + len(item))
    flat = (
        torch.frombuffer(bytearray(data), dtype=torch.uint8)
        if data
        else torch.empty(0, dtype=torch.uint8)
    )
    return flat, torch.tensor(offsets, dtype=torch.int64)


def unpack_bytes(flat: torch.Tensor, offsets: torch.Tensor) -> list[bytes]:
    """Inverse of :func:`pack_bytes`."""
    data = flat.numpy().tobytes()
    o = offsets.tolist()
    return [data[o[i] : o[i + 1]] for i in range(len(o) - 1)]


def new_core(
    pattern: str,
    byte_ids: list[int],
    merges: list[tuple[int, int, int]],
    all_token_bytes: list[bytes],
):
    """Build a ``torch.classes.minigpt.BpeCore`` encoder/decoder."""
    flat, offsets = pack_bytes(all_token_bytes)
    merge_tensor = torch.tensor(merges, dtype=torch.int64).reshape(-1, 3)
    return torch.classes.minigpt.BpeCore(
        pattern, torch.tensor(byte_ids, dtype=torch.int64), merge_tensor, flat, offsets
    )


def new_trainer(pattern: str):
    """Build a ``torch.classes.minigpt.BpeTrainer``."""
    return torch.classes.minigpt.BpeTrainer(pattern)
