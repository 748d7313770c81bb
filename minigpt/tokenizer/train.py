"""``train_tokenizer``: learn a byte-level BPE vocabulary from a stream of texts.

Memory stays bounded however big the corpus is: texts are consumed in batches
and only ``{pre-token: count}`` is kept (a few hundred thousand distinct
pre-tokens for a large English corpus), never the text itself. The merges are
then learned from those counts (see :mod:`minigpt.tokenizer.reference` for the
algorithm; the C++ core runs the same one, faster).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence

from tqdm.auto import tqdm

from minigpt.tokenizer import _native
from minigpt.tokenizer.pretokenize import check_pattern, iter_split
from minigpt.tokenizer.reference import train_bpe
from minigpt.tokenizer.tokenizer import DEFAULT_SPECIALS, Tokenizer

# texts are handed to the C++ counter in batches of about this many characters
_BATCH_CHARS = 1 << 22
# merges learned per call into C++ between progress-bar updates
_MERGES_PER_STEP = 256


def _batches(texts: Iterable[str], bar: tqdm | None) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts must yield str, item {i} is {type(text).__name__}")
        batch.append(text)
        size += len(text)
        if bar is not None:
            bar.update(len(text))
        if size >= _BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def count_words(texts: Iterable[str], pattern: str = "gpt4") -> Counter[bytes]:
    """``{pre-token bytes: count}`` over all texts, in Python (the reference path)."""
    counts: Counter[bytes] = Counter()
    for text in texts:
        counts.update(p.encode("utf-8", errors="replace") for p in iter_split(text, pattern))
    return counts


def prune_counts(counts: Counter[bytes], max_pieces: int) -> None:
    """Keep at most ``max_pieces`` distinct pre-tokens by dropping the rarest, in place.

    Drops every piece seen fewer than 2 times, then 4, 8, ... until at most
    half of ``max_pieces`` remain (the C++ trainer follows the same rule).
    Rare pieces barely affect which pairs are most frequent, and pruning keeps
    memory bounded on corpora with an endless tail of one-off strings.
    """
    threshold = 2
    while len(counts) > max_pieces // 2:
        for piece in [p for p, c in counts.items() if c < threshold]:
            del counts[piece]
        threshold *= 2


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    *,
    special_tokens: Sequence[str] = DEFAULT_SPECIALS,
    pattern: str = "gpt4",
    progress: bool = True,
    use_native: bool | None = None,
    num_threads: int | None = None,
    max_pieces: int = 4_000_000,
) -> Tokenizer:
    """Train a byte-level BPE tokenizer.

    Args:
        texts: documents (any iterable of str; read once, streamed).
        vocab_size: total ids wanted: 256 bytes + merges + special tokens.
            If the corpus runs out of pairs first, the vocabulary is smaller.
        special_tokens: control tokens, given ids after the learned tokens.
        pattern: pre-split pattern, "gpt4" (default) or "gpt2".
        progress: show progress bars (characters read, merges learned).
        use_native: use the C++ core (default: when built) or the Python reference.
        num_threads: threads for counting pre-tokens in C++ (default: all cores).
        max_pieces: memory bound: when more distinct pre-tokens than this are held,
            the rarest are dropped (see :func:`prune_counts`). Each batch of about
            4M characters is counted before the check.

    Returns:
        the trained :class:`Tokenizer`.
    """
    check_pattern(pattern)
    special_tokens = list(special_tokens)
    if len(set(special_tokens)) != len(special_tokens) or not all(
        isinstance(s, str) and s for s in special_tokens
    ):
        raise ValueError("special_tokens must be distinct non-empty strings")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise TypeError(f"vocab_size must be an int, got {type(vocab_size).__name__}")
    num_merges = vocab_size - 256 - len(special_tokens)
    if num_merges < 0:
        raise ValueError(
            f"vocab_size must be at least 256 + {len(special_tokens)} special tokens, "
            f"got {vocab_size}"
        )
    if isinstance(texts, str):
        raise TypeError("texts must be an iterable of documents, not one string")
    if isinstance(max_pieces, bool) or not isinstance(max_pieces, int) or max_pieces < 2:
        raise ValueError(f"max_pieces must be an int >= 2, got {max_pieces!r}")
    if use_native is None:
        use_native = _native.native_available()
    read_bar = tqdm(desc="reading", unit="char", unit_scale=True, disable=not progress)
    if use_native:
        trainer = _native.new_trainer(pattern)
        threads = int(num_threads or os.cpu_count() or 1)
        for batch in _batches(texts, read_bar):
            trainer.add_texts(batch, threads)
            threshold = 2
            while trainer.num_words() > max_pieces:
                while trainer.prune(threshold) > max_pieces // 2:
                    threshold *= 2
        read_bar.close()
        merges: list[tuple[int, int, int]] = []
        with tqdm(total=num_merges, desc="merges", disable=not progress) as bar:
            trainer.start()
            while len(merges) < num_merges:
                step = min(_MERGES_PER_STEP, num_merges - len(merges))
                got = trainer.train(step).tolist()
                merges.extend(tuple(m) for m in got)
                bar.update(len(got))
                if len(got) < step:
                    break
        flat, offsets = trainer.token_bytes()
        token_bytes = _native.unpack_bytes(flat, offsets)
    else:
        counts: Counter[bytes] = Counter()
        for batch in _batches(texts, read_bar):
            counts.update(count_words(batch, pattern))
            if len(counts) > max_pieces:
                prune_counts(counts, max_pieces)
        read_bar.close()
        with tqdm(total=num_merges, desc="merges", disable=not progress) as bar:
            merges, token_bytes = train_bpe(counts, num_merges, on_merge=lambda n: bar.update(1))
    n = len(token_bytes)
    specials = {s: n + i for i, s in enumerate(special_tokens)}
    return Tokenizer(pattern, token_bytes, merges, list(range(256)), specials, use_native=None)
