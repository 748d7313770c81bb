"""``minigpt data``: prepare token shards from a corpus source.

minigpt data prepare --source shakespeare --tokenizer tok.json --out data/shakespeare
minigpt data show --source shakespeare          # document count and a preview
"""

from __future__ import annotations

import argparse
import json

from minigpt.data.prepare import prepare
from minigpt.data.sources import load_corpus


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Sub-commands ``prepare`` and ``show``."""
    sub = parser.add_subparsers(dest="action", required=True)
    p = sub.add_parser("prepare", help="tokenize a corpus into train/val token shards")
    p.add_argument("--source", default="shakespeare", help="corpus source (see load_corpus)")
    p.add_argument("--tokenizer", required=True, help="tokenizer JSON (minigpt tokenizer train)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--workers", type=int, default=None, help="encoding processes (default: all)")
    p.add_argument("--force", action="store_true", help="rebuild even if up to date")
    s = sub.add_parser("show", help="count the documents of a source and preview the first")
    s.add_argument("--source", default="shakespeare")
    s.add_argument("--chars", type=int, default=300, help="preview length")


def run(args: argparse.Namespace) -> int:
    """Run the chosen action; returns the exit code."""
    if args.action == "prepare":
        meta = prepare(
            args.source,
            args.tokenizer,
            args.out,
            val_fraction=args.val_fraction,
            num_workers=args.workers,
            force=args.force,
        )
        print(json.dumps({k: meta[k] for k in ("splits", "dtype", "vocab_size")}, indent=2))
        return 0
    stats: dict = {}
    first = None
    chars = 0
    for doc in load_corpus(args.source, stats=stats):
        first = doc if first is None else first
        chars += len(doc)
    print(f"{args.source}: {stats['documents']} documents, {chars:,} characters")
    print(first[: args.chars])
    return 0
