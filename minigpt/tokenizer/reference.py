"""Byte-level BPE in plain Python: the readable reference (and the spec the C++ core matches).

How byte-level BPE works, in three steps:

1. **Bytes.** Text is UTF-8 encoded, so the starting alphabet is the 256 byte
   values. Any string (Chinese, emoji, binary junk) can be written with them:
   nothing is ever "unknown".
2. **Training.** Count every adjacent pair of tokens in the corpus, merge the most
   frequent pair into a new token, repeat until the vocabulary is big enough.
   Counting happens per *unique pre-token* (``" the"`` is counted once with its
   frequency, not once per occurrence), which is what makes it fast.
3. **Encoding.** Replay the merges on new text: in each pre-token, repeatedly
   merge the adjacent pair whose merge was learned earliest (lowest rank).

The trainer below does not recount all pairs after every merge. It keeps
``pair -> count`` and ``pair -> words containing it`` and, after merging pair P,
visits only the words that contain P, subtracting their old pairs and adding
their new ones. The most frequent pair comes from a heap with *lazy* updates:
counts of existing pairs only ever go down, so a popped entry whose count is
stale is pushed back with its true count instead of being searched for.

Tie-break rule (shared with the C++ core, so both learn identical merges): the
highest count wins; among equal counts, the smallest ``(left_id, right_id)``.
Inside a word, occurrences of the pair are merged left to right.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Callable, Mapping

Merge = tuple[int, int, int]  # (left id, right id, new id), in rank order


def count_pairs(symbols: list[int]) -> dict[tuple[int, int], int]:
    """How many times each adjacent pair occurs in one word."""
    counts: dict[tuple[int, int], int] = defaultdict(int)
    for a, b in zip(symbols, symbols[1:]):
        counts[(a, b)] += 1
    return counts


def merge_word(symbols: list[int], a: int, b: int, new: int) -> list[int]:
    """Replace every ``a, b`` in ``symbols`` (left to right, no overlaps) with ``new``."""
    out: list[int] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and symbols[i] == a and symbols[i + 1] == b:
            out.append(new)
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def train_bpe(
    word_counts: Mapping[bytes, int],
    num_merges: int,
    *,
    on_merge: Callable[[int], None] | None = None,
) -> tuple[list[Merge], list[bytes]]:
    """Learn up to ``num_merges`` merges from pre-token counts.

    Args:
        word_counts: ``{pre-token bytes: how often it occurs}``.
        num_merges: how many new tokens to create (vocab = 256 + this).
        on_merge: called with the number of merges done so far (progress bars).

    Returns:
        ``(merges, token_bytes)``: ``merges[r] = (a, b, new)`` is the merge of rank
        ``r``; ``token_bytes[i]`` is the byte string of token ``i`` (ids 0..255 are
        the single bytes). If a merge builds a byte string that is already a
        token (rare: two merge paths to the same bytes), it reuses that id, like
        Hugging Face's trainer; so ``new`` may repeat and ``len(token_bytes)`` may
        be less than ``256 + len(merges)``. Training stops early when no pair
        is left.
    """
    token_bytes: list[bytes] = [bytes([i]) for i in range(256)]
    id_of: dict[bytes, int] = {t: i for i, t in enumerate(token_bytes)}
    words: list[list[int]] = []
    freqs: list[int] = []
    for word, freq in word_counts.items():
        if freq > 0 and len(word) > 0:
            words.append(list(word))
            freqs.append(freq)

    pair_counts: dict[tuple[int, int], int] = defaultdict(int)
    where: dict[tuple[int, int], set[int]] = defaultdict(set)
    for w, symbols in enumerate(words):
        for pair, n in count_pairs(symbols).items():
            pair_counts[pair] += n * freqs[w]
            where[pair].add(w)

    # max-heap via negated counts; ties -> smallest (a, b)
    heap = [(-c, a, b) for (a, b), c in pair_counts.items() if c > 0]
    heapq.heapify(heap)
    merges: list[Merge] = []
    while len(token_bytes) - 256 < num_merges and heap:
        neg, a, b = heapq.heappop(heap)
        true = pair_counts.get((a, b), 0)
        if true <= 0:
            continue
        if -neg != true:  # stale: its count went down since it was pushed
            heapq.heappush(heap, (-true, a, b))
            continue
        merged = token_bytes[a] + token_bytes[b]
        new = id_of.get(merged)
        if new is None:
            new = len(token_bytes)
            token_bytes.append(merged)
            id_of[merged] = new
        merges.append((a, b, new))

        changed: dict[tuple[int, int], int] = defaultdict(int)
        for w in sorted(where.pop((a, b), ())):
            old = words[w]
            new_symbols = merge_word(old, a, b, new)
            if len(new_symbols) == len(old):
                continue  # stale index entry: the pair left this word earlier
            f = freqs[w]
            for pair, n in count_pairs(old).items():
                changed[pair] -= n * f
            for pair, n in count_pairs(new_symbols).items():
                changed[pair] += n * f
                where[pair].add(w)
            words[w] = new_symbols
        for pair, delta in changed.items():
            if delta == 0:
                continue
            pair_counts[pair] += delta
            if delta > 0:  # only pairs containing `new` grow; push their fresh count
                heapq.heappush(heap, (-pair_counts[pair], pair[0], pair[1]))
        pair_counts.pop((a, b), None)
        if on_merge is not None:
            on_merge(len(merges))
    return merges, token_bytes


def encode_piece(
    piece: bytes, ranks: Mapping[tuple[int, int], tuple[int, int]], byte_ids: list[int]
) -> list[int]:
    """BPE-encode one pre-token.

    Args:
        piece: the pre-token's bytes.
        ranks: ``{(a, b): (rank, new id)}`` built from the merge list.
        byte_ids: ``byte_ids[b]`` is the id of the single byte ``b``.

    Repeatedly merges the adjacent pair with the lowest rank (the leftmost one
    when the same pair occurs twice) until no adjacent pair has a merge.
    """
    symbols = [byte_ids[b] for b in piece]
    while len(symbols) > 1:
        best = None
        for i in range(len(symbols) - 1):
            hit = ranks.get((symbols[i], symbols[i + 1]))
            if hit is not None and (best is None or hit[0] < best[0]):
                best = (hit[0], hit[1], i)
        if best is None:
            break
        _, new, i = best
        symbols[i : i + 2] = [new]
    return symbols
