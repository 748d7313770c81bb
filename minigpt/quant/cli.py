"""``minigpt quantize``: write a weight-only quantized copy of a model directory.

    minigpt quantize runs/tiny/model runs/tiny/model-int4 --format int4 --group-size 64

The output is a model directory (config.json + model.safetensors + the
tokenizer, if one sits beside the input) that ``minigpt generate`` loads as is.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

FORMAT_NAMES = ("int8", "int4", "nf4")


def config_for(fmt: str, block: int | None = None):
    """The :mod:`minigpt.quant` config for a format name (``int8``/``int4``/``nf4``)."""
    from minigpt.quant import NF4, Int4WeightOnly, Int8WeightOnly

    if fmt == "int8":
        return Int8WeightOnly()
    if fmt == "int4":
        return Int4WeightOnly(block or 64)
    if fmt == "nf4":
        return NF4(block or 64)
    raise ValueError(f"unknown quantization format {fmt!r}; choose from {FORMAT_NAMES}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``minigpt quantize``."""
    parser.add_argument("model", help="model directory (config.json + model.safetensors)")
    parser.add_argument("output", help="directory to write the quantized model to")
    parser.add_argument("--format", choices=FORMAT_NAMES, default="int8", dest="fmt")
    parser.add_argument(
        "--group-size", type=int, default=64, help="int4 group / nf4 block size (default 64)"
    )
    parser.add_argument(
        "--include-lm-head", action="store_true", help="quantize the output head too"
    )


def run(args: argparse.Namespace) -> int:
    """Load, quantize, save; print a size summary."""
    from minigpt.model.io import load_model
    from minigpt.quant import quantize_, quantized_modules, save_quantized
    from minigpt.quant.api import copy_tokenizer

    try:
        config = config_for(args.fmt, args.group_size)
        model = load_model(args.model)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    before = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    quantize_(model, config, include_lm_head=args.include_lm_head)
    out = save_quantized(model, args.output)
    copy_tokenizer(Path(args.model), out)
    after = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    n = len(quantized_modules(model))
    print(
        f"quantized {n} linear layers to {args.fmt}: {before / 1e6:.1f} MB -> "
        f"{after / 1e6:.1f} MB, written to {out}"
    )
    return 0


def load_for_generation(
    source: str,
    tokenizer_path: str | None = None,
    dtype: str | None = None,
    quant: str | None = None,
):
    """``(model, tokenizer)`` for ``minigpt generate``.

    A quantized checkpoint is loaded as saved; any other model is loaded
    normally and, with ``quant`` set (``int8``/``int4``/``nf4``), quantized in
    memory before generating. ``dtype`` casts the float parameters only (the
    packed weights and their scales keep their formats).
    """
    import torch

    from minigpt.infer.loading import load_for_inference
    from minigpt.quant import is_quantized_checkpoint, load_quantized, quantize_

    path = Path(source)
    if path.is_dir() and is_quantized_checkpoint(path):
        from minigpt.tokenizer import Tokenizer

        model = load_quantized(path)
        if dtype is not None:
            with torch.no_grad():
                for p in model.parameters():
                    p.data = p.data.to(getattr(torch, dtype))
        tok_file = Path(tokenizer_path) if tokenizer_path else path / "tokenizer.json"
        tok = Tokenizer.load(tok_file) if tok_file.is_file() else None
        return model, tok
    model, tok = load_for_inference(source, tokenizer_path, dtype)
    if quant is not None:
        quantize_(model, config_for(quant))
    return model, tok
