"""``minigpt export MODEL --hf DIR``: write a model in the Hugging Face Llama layout.

MODEL is a MiniGPT model directory (its ``tokenizer.json`` is exported too), a
Hugging Face Llama directory or a ``.gguf`` file. The result loads with
``transformers.AutoModelForCausalLM.from_pretrained(DIR)`` (and, with a
tokenizer, ``AutoTokenizer.from_pretrained(DIR)``).
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``minigpt export``."""
    parser.add_argument("model", help="model directory, Hugging Face directory or .gguf file")
    parser.add_argument("--hf", required=True, metavar="DIR", help="output directory")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.json (default: beside)")


def run(args: argparse.Namespace) -> int:
    """Load, convert, write; print where it went."""
    from minigpt.infer.loading import load_for_inference
    from minigpt.model.hf import export_hf

    try:
        model, tok = load_for_inference(args.model, args.tokenizer)
        our_tokenizer = tok if hasattr(tok, "export_hf") else None
        out = export_hf(model.float(), our_tokenizer, args.hf)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    extra = " + tokenizer.json" if our_tokenizer is not None else " (no tokenizer exported)"
    print(f"wrote {out}/config.json + model.safetensors{extra}")
    return 0
