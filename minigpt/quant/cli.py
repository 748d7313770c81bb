"""``minigpt quantize``: write a weight-only quantized copy of a model directory.

    minigpt quantize runs/tiny/model runs/tiny/model-int4 --format int4 --group-size 64
    minigpt quantize runs/tiny/model runs/tiny/model-gptq --format int4 --calibration notes.txt

With ``--calibration FILE`` (UTF-8 text, or ``.gz``) the weights are rounded
with GPTQ (or ``--method mse``) using the model's activations on that text;
use text you will not evaluate on. Without it: round to nearest (``--method
mse`` gives the data-free search).

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
    parser.add_argument(
        "--method",
        choices=("rtn", "mse", "gptq"),
        default=None,
        help="rounding method (default: gptq with --calibration, else rtn)",
    )
    parser.add_argument(
        "--calibration", default=None, help="text file (.txt or .txt.gz) to calibrate on"
    )
    parser.add_argument(
        "--calibration-tokens",
        type=int,
        default=2048,
        help="tokens of the calibration text to use, in rows of 256 (default 2048)",
    )


def calibration_batches(path: str, tokenizer_file: Path, n_tokens: int, seq: int = 256) -> list:
    """The first ``n_tokens`` tokens of a text file as batches of 4 rows of ``seq`` ids
    (a shorter text: one row of all its tokens)."""
    import gzip

    import torch

    from minigpt.tokenizer import Tokenizer

    if not tokenizer_file.is_file():
        raise FileNotFoundError(f"calibration needs the model's tokenizer: {tokenizer_file}")
    if n_tokens < 1:
        raise ValueError(f"--calibration-tokens must be positive, got {n_tokens}")
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        text = f.read(n_tokens * 16)  # ample: a token is rarely more than 16 characters
    ids = Tokenizer.load(tokenizer_file).encode(text)[:n_tokens]
    if not ids:
        raise ValueError(f"calibration file {path} has no text")
    n_rows = len(ids) // seq
    if n_rows == 0:
        return [torch.tensor(ids)[None]]
    return list(torch.tensor(ids[: n_rows * seq]).reshape(n_rows, seq).split(4))


def run(args: argparse.Namespace) -> int:
    """Load, quantize, save; print a size summary."""
    from minigpt.model.io import load_model
    from minigpt.quant import quantize_, quantized_modules, save_quantized
    from minigpt.quant.api import copy_tokenizer

    try:
        config = config_for(args.fmt, args.group_size)
        model = load_model(args.model)
        calibration = None
        if args.calibration is not None:
            seq = min(256, getattr(getattr(model, "config", None), "max_seq_len", 256))
            tok_file = Path(args.model) / "tokenizer.json"
            if not tok_file.is_file():
                tok_file = Path(args.model).parent / "tokenizer.json"
            calibration = calibration_batches(
                args.calibration, tok_file, args.calibration_tokens, seq
            )
        method = args.method
        if method == "gptq" and calibration is None:
            raise ValueError("--method gptq needs --calibration FILE")
        if method == "rtn" and calibration is not None:
            raise ValueError("--method rtn uses no calibration; drop --calibration")
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    before = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    quantize_(
        model,
        config,
        include_lm_head=args.include_lm_head,
        method=method,
        calibration=calibration,
    )
    out = save_quantized(model, args.output)
    copy_tokenizer(Path(args.model), out)
    after = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    n = len(quantized_modules(model))
    used = method or ("rtn" if calibration is None else "gptq")
    print(
        f"quantized {n} linear layers to {args.fmt} ({used}): {before / 1e6:.1f} MB -> "
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
