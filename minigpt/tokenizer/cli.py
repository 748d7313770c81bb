"""``minigpt tokenizer``: train a BPE tokenizer, encode or decode with one.

minigpt tokenizer train --source shakespeare --vocab-size 8192 --out tok.json
minigpt tokenizer encode --tokenizer tok.json "Hello there"
minigpt tokenizer decode --tokenizer tok.json 72 101 108
minigpt tokenizer export-hf --tokenizer tok.json --out hf_dir
"""

from __future__ import annotations

import argparse
import itertools
import json

from minigpt.tokenizer.pretokenize import PATTERNS
from minigpt.tokenizer.tokenizer import Tokenizer
from minigpt.tokenizer.train import train_tokenizer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Sub-commands ``train``, ``encode``, ``decode``, ``export-hf``."""
    sub = parser.add_subparsers(dest="action", required=True)
    t = sub.add_parser("train", help="learn a vocabulary from a corpus source")
    t.add_argument("--source", default="shakespeare", help="corpus source (see load_corpus)")
    t.add_argument("--vocab-size", type=int, default=8192)
    t.add_argument("--pattern", choices=sorted(PATTERNS), default="gpt4")
    t.add_argument("--max-docs", type=int, default=None, help="use only the first N documents")
    t.add_argument("--out", required=True, help="where to write the tokenizer JSON")
    e = sub.add_parser("encode", help="print the ids of a text")
    e.add_argument("--tokenizer", required=True)
    e.add_argument("text")
    e.add_argument("--show", action="store_true", help="also print each token's text")
    d = sub.add_parser("decode", help="print the text of ids")
    d.add_argument("--tokenizer", required=True)
    d.add_argument("ids", type=int, nargs="+")
    x = sub.add_parser("export-hf", help="write a Hugging Face tokenizer.json folder")
    x.add_argument("--tokenizer", required=True)
    x.add_argument("--out", required=True)


def run(args: argparse.Namespace) -> int:
    """Run the chosen action; returns the exit code."""
    if args.action == "train":
        from minigpt.data.sources import load_corpus

        docs = load_corpus(args.source)
        if args.max_docs is not None:
            docs = itertools.islice(docs, args.max_docs)
        tok = train_tokenizer(docs, args.vocab_size, pattern=args.pattern)
        tok.save(args.out)
        print(f"saved {tok} to {args.out}")
        return 0
    tok = Tokenizer.load(args.tokenizer)
    if args.action == "encode":
        ids = tok.encode(args.text)
        print(json.dumps(ids))
        if args.show:
            print(" | ".join(repr(tok.decode([i])) for i in ids))
    elif args.action == "decode":
        print(tok.decode(args.ids))
    else:
        print(f"wrote {tok.export_hf(args.out)}")
    return 0
