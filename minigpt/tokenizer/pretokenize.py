"""The pre-split: cut text into pieces before BPE runs on each piece.

Byte-level BPE never merges across piece boundaries. The split keeps words,
numbers, punctuation and white space apart, so a token never spans " the." and a
number never glues onto a word. The patterns below are the ONE definition used
everywhere: by the Python reference (through the ``regex`` module), by the C++
pre-splitter (``csrc/cpu/bpe_pretokenize.h`` implements the same alternation by
hand and a test proves they cut every text identically) and by the Hugging Face
export (``tokenizer.json`` stores the pattern string).

* ``"gpt2"``: GPT-2's pattern. Contractions, an optional space + a run of letters,
  of digits, or of other symbols, then white space (``\\s+(?!\\S)`` leaves the last
  space of a run to start the next word).
* ``"gpt4"``: the GPT-4 (cl100k) style pattern. Numbers are cut into groups of at
  most 3 digits, a letter run may take one leading non-letter (a space, a quote,
  a tab), and newlines are kept together. Unlike cl100k, the contractions are
  spelled with ASCII case classes (``'[sS]``) instead of ``(?i:...)``, because
  Unicode case folding (``'ſ`` matches ``(?i:'s)``) differs between regex engines.
"""

from __future__ import annotations

from collections.abc import Iterator

import regex

PATTERNS: dict[str, str] = {
    "gpt2": r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
    "gpt4": (
        r"""'(?:[sS]|[tT]|[rR][eE]|[vV][eE]|[mM]|[lL][lL]|[dD])"""
        r"""|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
        r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
    ),
}

_COMPILED: dict[str, regex.Pattern] = {}


def check_pattern(name: str) -> str:
    """Return ``name`` if it names a pattern in :data:`PATTERNS`, else raise ValueError."""
    if not isinstance(name, str) or name not in PATTERNS:
        raise ValueError(f"pattern must be one of {sorted(PATTERNS)}, got {name!r}")
    return name


def compiled_pattern(name: str) -> regex.Pattern:
    """The compiled ``regex`` pattern for ``name`` ("gpt2" or "gpt4")."""
    check_pattern(name)
    if name not in _COMPILED:
        _COMPILED[name] = regex.compile(PATTERNS[name])
    return _COMPILED[name]


def split_text(text: str, pattern: str = "gpt4") -> list[str]:
    """Cut ``text`` into pre-tokens with the named pattern (the Python reference).

    Every character lands in exactly one piece, so ``"".join(pieces) == text``.

    >>> split_text("Hello world!! 1234")
    ['Hello', ' world', '!!', ' ', '123', '4']
    """
    return compiled_pattern(pattern).findall(text)


def iter_split(text: str, pattern: str = "gpt4") -> Iterator[str]:
    """Like :func:`split_text` but lazy (constant memory on huge strings)."""
    for m in compiled_pattern(pattern).finditer(text):
        yield m.group()
