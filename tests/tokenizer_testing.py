"""Shared helpers for the tokenizer and data tests: corpus slices from ../shared/data."""

from __future__ import annotations

import functools
import gzip
import os
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
GPT2_DIR = SHARED / "tokenizers" / "gpt2"
TIKTOKEN_CACHE = SHARED / "tokenizers" / "tiktoken_cache"
EN_CORPORA = ("shakespeare", "austen", "kjv", "mobydick", "sotu", "brown", "fortunes")
ZH_CORPORA = ("poetry", "fortunes")

# strings that stress the pre-split and the byte fallback
TRICKY = (
    "it's 'S 'Re 'll'LL 'VE 'ſ we'd I'M \t\tx \r\n\r\n  \n \u00a0\u3000end"
    " 😀🎉👍🏽👨‍👩‍👧 1234567 ½ ١٢٣ Ⅻ x²  \x1c\x1d e\u0301 ﬁ 中文，标点！ 한국어 עברית"
)


@functools.cache
def corpus_text(lang: str, name: str) -> str:
    """The whole text of ../shared/data/<lang>/<name>.txt.gz (cached)."""
    with gzip.open(SHARED / lang / f"{name}.txt.gz", "rt", encoding="utf-8") as f:
        return f.read()


def corpus_slice(lang: str, name: str, n: int, start: int = 0) -> str:
    """``n`` characters of a corpus from ``start``."""
    return corpus_text(lang, name)[start : start + n]


def tiktoken_gpt2():
    """tiktoken's GPT-2 encoding, offline from the shared cache."""
    os.environ["TIKTOKEN_CACHE_DIR"] = str(TIKTOKEN_CACHE)
    import tiktoken

    return tiktoken.get_encoding("gpt2")
