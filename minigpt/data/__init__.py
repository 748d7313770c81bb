"""Corpora, token shards and batch loaders.

>>> from minigpt.data import load_corpus, prepare, TokenShards, RandomWindowLoader
>>> meta = prepare("shakespeare", tok, "data/shakespeare")           # doctest: +SKIP
>>> loader = RandomWindowLoader(TokenShards("data/shakespeare"), 8, 256)  # doctest: +SKIP
>>> x, y = next(loader)                                              # doctest: +SKIP

Modules: ``sources`` (named corpus sources), ``prepare`` (text -> token shards),
``shards`` (reading them), ``loader`` (batches with resumable state), ``cli``.
"""

from minigpt.data.loader import RandomWindowLoader, SequentialLoader
from minigpt.data.prepare import prepare
from minigpt.data.shards import TokenShards
from minigpt.data.sources import default_corpus_documents, load_corpus

__all__ = [
    "RandomWindowLoader",
    "SequentialLoader",
    "TokenShards",
    "default_corpus_documents",
    "load_corpus",
    "prepare",
]
