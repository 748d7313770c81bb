"""``prepare``: tokenize a corpus once into flat token shards (``minigpt data prepare``).

Training reads tokens, not text: tokenizing on the fly would cost more than the
model's forward pass for a small model. ``prepare`` streams the documents of a
source, encodes them (in several processes), prepends BOS to each, routes
whole documents to ``train`` or ``val``, and writes the files described in
:mod:`minigpt.data.shards`.

Re-running with the same source, tokenizer and split is a no-op (the inputs'
fingerprint is stored in ``metadata.json``). A different tokenizer (or changed
local files) is detected and the shards are rebuilt. Files are written to
temporary names and renamed at the end, so an interrupted run never leaves a
folder that looks complete.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from minigpt.data.shards import FORMAT_NAME, FORMAT_VERSION, METADATA, read_metadata, token_dtype
from minigpt.data.sources import load_corpus
from minigpt.tokenizer import Tokenizer

_DOCS_PER_TASK = 32
_CHARS_PER_TASK = 1 << 20


def is_val_document(index: int, val_fraction: float) -> bool:
    """Deterministic split: document ``index`` goes to val about every ``1/val_fraction`` docs.

    ``floor((i + 1) f) > floor(i f)`` spreads val documents evenly through the
    corpus (no hashing, no randomness: the same corpus always splits the same).
    """
    return int((index + 1) * val_fraction) > int(index * val_fraction)


def _source_stamp(source: str) -> list | None:
    """Sizes and mtimes of a local source's files (to notice edits), or None."""
    path = Path(source.rsplit(":", 1)[0]) if not Path(source).exists() else Path(source)
    if not path.exists():
        return None
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def _task_batches(docs: Iterator[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    for doc in docs:
        batch.append(doc)
        size += len(doc)
        if len(batch) >= _DOCS_PER_TASK or size >= _CHARS_PER_TASK:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


_worker_tokenizer: Tokenizer | None = None


def _worker_init(tokenizer_path: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer.load(tokenizer_path)


def _worker_encode(batch: list[str]) -> list[list[int]]:
    assert _worker_tokenizer is not None
    return _worker_tokenizer.encode_batch(batch, num_threads=1)


def prepare(
    source: str,
    tokenizer: Tokenizer | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    val_fraction: float = 0.05,
    num_workers: int | None = None,
    progress: bool = True,
    force: bool = False,
) -> dict:
    """Tokenize ``source`` into ``out_dir`` and return the metadata dict.

    Args:
        source: a corpus source for :func:`minigpt.data.load_corpus`.
        tokenizer: a :class:`~minigpt.tokenizer.Tokenizer` or a path to its JSON.
            It must have a BOS token (it separates documents).
        out_dir: output folder (created).
        val_fraction: share of documents held out for validation, in [0, 1).
            With at least two documents and ``val_fraction > 0``, val gets at
            least one document.
        num_workers: encoding processes (default: all cores; 1 = in this process).
        progress: show a progress bar.
        force: rebuild even if the folder is up to date.

    Returns:
        the metadata, also saved as ``out_dir/metadata.json``: ``splits`` (per
        split: ``file``, ``docs_file``, ``num_tokens``, ``num_docs``), ``dtype``,
        ``vocab_size``, ``bos_id``, ``tokenizer_fingerprint``, ``source``,
        ``num_chars``, ``decode_errors``, ``seconds``.
    """
    if not isinstance(tokenizer, Tokenizer):
        tokenizer = Tokenizer.load(tokenizer)
    if isinstance(val_fraction, bool) or not 0.0 <= float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    if num_workers is None:
        num_workers = os.cpu_count() or 1
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    bos = tokenizer.bos_id
    if bos is None:
        raise ValueError("the tokenizer has no BOS token, which prepare puts before each document")

    out = Path(out_dir)
    inputs = {
        "source": source,
        "source_stamp": _source_stamp(source),
        "tokenizer_fingerprint": tokenizer.fingerprint,
        "val_fraction": float(val_fraction),
    }
    if (out / METADATA).exists() and not force:
        try:
            old = read_metadata(out)
        except ValueError:
            old = None
        if old is not None and old.get("inputs") == inputs and _files_ok(out, old):
            if progress:
                print(f"{out}: up to date ({old['splits']['train']['num_tokens']:,} train tokens)")
            return old
        if old is not None and old.get("tokenizer_fingerprint") != tokenizer.fingerprint:
            print(f"{out}: written by a different tokenizer; rebuilding", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    (out / METADATA).unlink(missing_ok=True)  # the folder is incomplete until we finish

    t0 = time.time()
    dtype = token_dtype(tokenizer.vocab_size)
    stats: dict = {}
    files = {s: open(out / f"{s}.bin.tmp", "wb") for s in ("train", "val")}  # noqa: SIM115
    counts = {s: 0 for s in files}
    starts: dict[str, list[int]] = {s: [] for s in files}

    def write(split: str, ids: list[int]) -> None:
        starts[split].append(counts[split])
        arr = np.empty(len(ids) + 1, dtype=dtype)
        arr[0] = bos
        arr[1:] = ids
        arr.tofile(files[split])
        counts[split] += arr.shape[0]

    tokenizer_path = out / "tokenizer.json"
    tokenizer.save(tokenizer_path)
    bar = tqdm(desc=f"prepare {source}", unit="doc", disable=not progress)
    num_chars = 0
    pending: list[int] | None = None  # hold back the last doc: val may need it
    index = 0
    docs = load_corpus(source, stats=stats)

    def counted(batches: Iterator[list[str]]) -> Iterator[list[str]]:
        nonlocal num_chars
        for b in batches:
            num_chars += sum(len(d) for d in b)
            yield b

    pool = None
    try:
        if num_workers > 1:
            ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
            pool = ctx.Pool(num_workers, initializer=_worker_init, initargs=(str(tokenizer_path),))
            encoded = pool.imap(_worker_encode, counted(_task_batches(docs)))
        else:
            encoded = (
                tokenizer.encode_batch(b, num_threads=1) for b in counted(_task_batches(docs))
            )
        for batch_ids in encoded:
            for ids in batch_ids:
                if pending is not None:
                    write("val" if is_val_document(index - 1, val_fraction) else "train", pending)
                pending = ids
                index += 1
            bar.update(len(batch_ids))
    except BaseException:
        for f in files.values():
            f.close()
        raise
    finally:
        if pool is not None:
            pool.terminate()
        bar.close()
    if pending is not None:
        last_is_val = is_val_document(index - 1, val_fraction) or (
            val_fraction > 0 and not starts["val"] and index >= 2
        )
        write("val" if last_is_val else "train", pending)
    for f in files.values():
        f.close()
    splits = {}
    for s in ("train", "val"):
        os.replace(out / f"{s}.bin.tmp", out / f"{s}.bin")
        np.save(out / f"{s}.docs.npy", np.asarray(starts[s], dtype=np.int64))
        splits[s] = {
            "file": f"{s}.bin",
            "docs_file": f"{s}.docs.npy",
            "num_tokens": counts[s],
            "num_docs": len(starts[s]),
        }
    meta = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "source": source,
        "inputs": inputs,
        "tokenizer_fingerprint": tokenizer.fingerprint,
        "tokenizer_file": "tokenizer.json",
        "vocab_size": tokenizer.vocab_size,
        "bos_id": bos,
        "dtype": dtype.name,
        "splits": splits,
        "num_chars": num_chars,
        "decode_errors": stats.get("decode_errors", 0),
        "seconds": round(time.time() - t0, 3),
    }
    total = counts["train"] + counts["val"]
    meta["chars_per_token"] = round(num_chars / total, 4) if total else None
    tmp = out / (METADATA + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, out / METADATA)
    if progress:
        print(
            f"{out}: {counts['train']:,} train / {counts['val']:,} val tokens "
            f"({splits['train']['num_docs']} / {splits['val']['num_docs']} docs, {dtype.name})"
        )
    return meta


def _files_ok(out: Path, meta: dict) -> bool:
    itemsize = np.dtype(meta["dtype"]).itemsize
    for info in meta["splits"].values():
        p = out / info["file"]
        if not p.is_file() or p.stat().st_size != info["num_tokens"] * itemsize:
            return False
        if not (out / info["docs_file"]).is_file():
            return False
    return True
