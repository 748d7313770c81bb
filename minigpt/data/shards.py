"""Token shards on disk: what ``prepare`` writes and the loaders read.

A prepared folder holds, per split (``train``, ``val``):

* ``<split>.bin``: every token of the split, flat, as little-endian ``uint16``
  (vocabulary <= 65,536) or ``uint32``. Each document starts with the BOS token,
  so documents are separated by BOS and a model learns where text begins.
* ``<split>.docs.npy``: ``int64`` start offset of every document in ``.bin``.

plus ``metadata.json`` (counts, dtype, source, the tokenizer's fingerprint) and
``tokenizer.json`` (a copy of the tokenizer, so the folder is self-contained).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

METADATA = "metadata.json"
FORMAT_NAME = "minigpt-tokens"
FORMAT_VERSION = 1
SPLITS = ("train", "val")


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype holding every id: uint16 up to 65,536 ids, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def read_metadata(out_dir: str | os.PathLike) -> dict:
    """Read and check ``metadata.json`` of a prepared folder."""
    path = Path(out_dir) / METADATA
    if not path.is_file():
        raise FileNotFoundError(
            f"{out_dir} has no {METADATA}; create it with `minigpt data prepare` "
            "or minigpt.data.prepare()"
        )
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg}); re-run prepare") from None
    if meta.get("format") != FORMAT_NAME or meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path} is not a {FORMAT_NAME} v{FORMAT_VERSION} metadata file")
    return meta


class TokenShards:
    """The tokens of one split of a prepared folder, memory-mapped (nothing is loaded).

    Args:
        out_dir: folder written by :func:`minigpt.data.prepare`.
        split: "train" or "val".
        tokenizer: if given, checked against the one the shards were written with;
            a different tokenizer raises ValueError (its ids would mean other text).

    Attributes:
        tokens: 1-D ``np.memmap`` (uint16/uint32) of every token of the split.
        doc_starts: 1-D int64 array, offset of each document's BOS token.
        metadata: the folder's metadata dict.
    """

    def __init__(self, out_dir: str | os.PathLike, split: str = "train", tokenizer=None) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.out_dir = Path(out_dir)
        self.split = split
        self.metadata = read_metadata(out_dir)
        info = self.metadata["splits"][split]
        if (
            tokenizer is not None
            and tokenizer.fingerprint != self.metadata["tokenizer_fingerprint"]
        ):
            raise ValueError(
                f"{out_dir} was written by a different tokenizer "
                f"(fingerprint {self.metadata['tokenizer_fingerprint'][:12]}..., yours "
                f"{tokenizer.fingerprint[:12]}...); re-run prepare with your tokenizer"
            )
        dtype = np.dtype(self.metadata["dtype"])
        path = self.out_dir / info["file"]
        if not path.is_file():
            raise FileNotFoundError(f"missing token file {path}; re-run prepare")
        expected = info["num_tokens"] * dtype.itemsize
        if path.stat().st_size != expected:
            raise ValueError(
                f"{path} has {path.stat().st_size} bytes, metadata says {expected}; "
                "the folder is corrupt or half-written: re-run prepare"
            )
        self.tokens: np.ndarray = (
            np.memmap(path, dtype=dtype, mode="r")
            if info["num_tokens"] > 0
            else np.zeros(0, dtype=dtype)
        )
        self.doc_starts: np.ndarray = np.load(self.out_dir / info["docs_file"])

    @property
    def num_tokens(self) -> int:
        """Number of tokens in this split."""
        return int(self.tokens.shape[0])

    @property
    def num_docs(self) -> int:
        """Number of documents in this split."""
        return int(self.doc_starts.shape[0])

    @property
    def vocab_size(self) -> int:
        """Vocabulary size of the tokenizer that wrote the shards."""
        return int(self.metadata["vocab_size"])

    @property
    def bos_id(self) -> int:
        """The BOS id that starts every document."""
        return int(self.metadata["bos_id"])

    def document(self, i: int) -> np.ndarray:
        """Tokens of document ``i`` (its BOS first)."""
        if not -self.num_docs <= i < self.num_docs:
            raise IndexError(f"document {i} out of range (split has {self.num_docs})")
        i %= self.num_docs
        end = self.doc_starts[i + 1] if i + 1 < self.num_docs else self.num_tokens
        return self.tokens[self.doc_starts[i] : end]

    def __len__(self) -> int:
        return self.num_tokens

    def __repr__(self) -> str:
        return (
            f"TokenShards({str(self.out_dir)!r}, split={self.split!r}, "
            f"tokens={self.num_tokens}, docs={self.num_docs})"
        )
